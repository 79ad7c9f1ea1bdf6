"""The scripts' flash-attn path, end to end, on a machine without a GPU: each script runs as it would on a GPU with
flash-attn (bf16 weights and cache, the kernel flash_attn_with_kvcache, 256-token blocks by default), with
tests/flash_attn_standin.py in the kernel's place. The stand-in refuses, with an AssertionError naming the rule,
every call the real kernel would refuse or get wrong; so these runs show the scripts call the kernel as its
contract asks (int32 tables and lengths, block sizes, tables that cover every row, copy-on-write before a shared
block is written), and that paging changes no token under it.
"""
import json

import pytest
import torch

import flash_attn_standin
from load_scripts import load_script

N, MAX_SEQ_LEN = 4, 300


def run(name, ckpt, tmp_path, monkeypatch, *options):
    """main() of a script with the stand-in as its kernel, as chosen on a GPU with flash-attn; returns its --json."""
    module, calls = load_script(name), []

    def kernel(*args, **kwargs):
        calls.append(kwargs.get("block_table") is not None)
        return flash_attn_standin.flash_attn_with_kvcache(*args, **kwargs)

    monkeypatch.setattr(module, "attention", kernel)
    monkeypatch.setattr(module, "KERNEL", "flash-attn")
    monkeypatch.setattr(module, "DTYPE", torch.bfloat16)
    out = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}.json"
    module.main([str(N), "--ckpt-dir", str(ckpt), "--ref-lengths", "--quiet", "--max-seq-len", str(MAX_SEQ_LEN),
                 "--json", str(out), *map(str, options)])
    assert calls and all(calls) == (name != "naive"), "the paged scripts pass a block table, naive its rows"
    data = json.loads(out.read_text())
    assert data["stats"]["kernel"] == "flash-attn" and data["stats"]["finished"] == data["stats"]["requests"]
    return data


def generated(data):
    return [r["generated_ids"] for r in data["requests"]]


@pytest.fixture(scope="module")
def naive_tokens(tiny_ckpt, tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        return generated(run("naive", tiny_ckpt, tmp_path_factory.mktemp("naive"), monkeypatch))


# llama3-paged-prefix.py's and llama3-paged-beams.py's managers and generate() without their options (beams holds
# samples' too), which are to change no token: the swap rung's differ from llama3-paged.py's only when it swaps.
@pytest.mark.parametrize("name", ["paged", "prefix", "beams"])
@pytest.mark.parametrize("budget", [None, 768], ids=["default budget", "3 blocks: preempts"])
def test_paged_scripts_through_the_kernel_contract(name, budget, naive_tokens, tiny_ckpt, tmp_path, monkeypatch):
    options = ["--kv-budget-tokens", budget] if budget else []
    data = run(name, tiny_ckpt, tmp_path, monkeypatch, *options)
    assert data["stats"]["block_size"] == 256, "the default block size with flash-attn"
    assert (data["stats"]["preemptions"] > 0) == (budget is not None)
    assert generated(data) == naive_tokens


# Forks, copy-on-write, swap and prefix blocks go through the contract in each rung's own tests: test_swap.py,
# test_prefix.py, test_samples.py (forks preempted) and test_beams.py, the last two with run() above.


@pytest.mark.parametrize("name", ["paged", "swap", "prefix", "samples", "beams"])  # each parse_args its own
def test_the_block_size_check_is_flash_attns_own(name, tiny_ckpt, tmp_path, monkeypatch):
    """With flash-attn as the kernel, a block size that is not a multiple of 256 is refused in one line before any
    work, as the kernel itself would refuse it mid-run; 512 is a multiple, and runs."""
    with pytest.raises(SystemExit, match="multiple of 256, got 128"):
        run(name, tiny_ckpt, tmp_path, monkeypatch, "--block-size", 128)
    if name == "paged":  # (the same check, word for word, in every rung)
        assert run(name, tiny_ckpt, tmp_path, monkeypatch, "--block-size", 512)["stats"]["block_size"] == 512
