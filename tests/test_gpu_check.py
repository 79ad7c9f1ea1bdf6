"""tools/gpu_check.py on a machine without a GPU: it says so in one line; its runs, driven through the scripts' own
generate() with the tiny checkpoint on the CPU at a small scale, report what the requests' token counts say; a run
that fails is its own row and the others go on; and its parts (the operator count, the weight-read bound, the
memory limit of a 24 GB card, flash-attn's reasons, the checkpoint's writing) are checked with torch.cuda's calls
stood in for."""
import json
import statistics
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import flash_attn_standin
import gpu_check
import make_checkpoint
from conftest import ROOT, pin_cpu_path
from load_scripts import load_script
from replay import replay

naive, paged = load_script("naive"), load_script("paged")
SCALE = {"budget_tokens": 2 * 100, "max_seq_len": 100, "naive_batch": 2, "paged_runs": [("pytorch", 16, 3),
         ("flash-attn", 256, 3)], "default_budget_requests": 3, "throughput_requests": 3}
FREE_BYTES = 2**30  # torch.cuda.mem_get_info's free memory, stood in for the default-budget run


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_a_gpu_it_says_so_in_one_line():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py")], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "needs a CUDA GPU" in result.stderr, result.stderr


@pytest.fixture
def small(tiny_ckpt, monkeypatch):
    """The tiny model and tokenizer, the scripts pinned to the CPU path, no flash-attn, and a GPU's free memory."""
    pin_cpu_path(monkeypatch, naive, paged)
    monkeypatch.setattr(paged, "flash_attn_with_kvcache", None)  # as on a machine without flash-attn
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (FREE_BYTES, 2 * FREE_BYTES))
    tokenizer = paged.load_tokenizer(tiny_ckpt / "tokenizer.model")
    model = paged.load_model(tiny_ckpt)
    model["rope_cos"], model["rope_sin"] = paged.rope_tables(model, SCALE["max_seq_len"])
    return model, tokenizer


def prompt_lengths(tokenizer, n):
    """[(prompt tokens, tokens generated)] of the first n shipped prompts with --ref-lengths, counted here."""
    lengths = []
    for entry in json.loads((ROOT / "sharegpt-filtered.json").read_text())[:n]:
        prompt = len(paged.encode_chat(tokenizer, entry["conversations"][0]["value"]))
        answer = len(tokenizer.encode_ordinary(entry["conversations"][1]["value"].strip()))
        lengths.append((prompt, min(max(1, answer), SCALE["max_seq_len"] - prompt)))
    return lengths


def test_the_runs_at_a_small_scale(small):
    """Naive fits 2 requests of 100 tokens in a budget of 200, not 3; paged runs 3, preempting as a replay of its loop
    does; flash-attn is skipped with its reason; paged under the scripts' own GPU budget runs 3 without preempting;
    every run generates what the prompts' reference answers say. Naive's full-batch steps are computed here from the
    lengths: step s (1, 2, ...) has every request with more than s tokens to generate, each holding p + s keys."""
    model, tokenizer = small
    rows, skipped, (naive_rate, paged_rate, waves) = gpu_check.check(naive, paged, model, tokenizer, SCALE)
    lengths = prompt_lengths(tokenizer, 3)
    want = [g for _, g in lengths]
    two, three, paged_row, default_row = rows
    assert (two["script"], two["requests"], two["finished"], two["generated"]) == ("naive", 2, 2, sum(want[:2]))
    assert three["requests"] == 3 and "needs 3 x 100 = 300 tokens" in three["failed"]
    assert (paged_row["script"], paged_row["block"], paged_row["finished"]) == ("paged", 16, 3)
    replayed = replay(lengths, 200, 16, 100)
    assert paged_row["preemptions"] == replayed["preemptions"] > 0, "as its loop replayed says"
    assert paged_row["generated"] == sum(want) and paged_row["batch"] == max(replayed["batch_sizes"])
    assert skipped == ["paged with flash-attn at block 256: flash-attn is not installed"]
    assert waves == 2 and naive_rate > 0 and paged_rate > 0

    # The default-budget run: the budget llama3-paged.py's main() would take on this GPU, with its kernel and block.
    assert default_row["budget"] == paged.gpu_budget_tokens(model, 100, 3) != SCALE["budget_tokens"]
    assert (default_row["kernel"], default_row["block"], default_row["card_bytes"]) == ("pytorch", 16, None)
    assert (default_row["finished"], default_row["preemptions"], default_row["generated"]) == (3, 0, sum(want))

    # Naive's decode steps at its full batch (both requests), less the first 3, which are counted and not timed.
    full = [s for s in range(1, min(want[:2])) if s > gpu_check.COUNTED_STEPS]
    keys = statistics.median(sum(p + s for p, _ in lengths[:2]) for s in full)
    assert two["batch"] == 2 and two["step"] > 0
    assert two["read_bytes"] == gpu_check.weight_bytes(model) + keys * model["kv_bytes_per_token"]
    assert two["ops"] > 0 and "peak_bytes" not in two  # no GPU here

    cells = gpu_check.table(rows, 1e9, None)
    assert [c[5] for c in cells] == ["2/2", "failed", "3/3", "3/3"]
    assert [c[3] for c in cells][:3] == [200] * 3 and all(c[13] == "-" for c in cells), "no peak measured on a CPU"
    assert cells[0][9] == f"{1e3 * two['read_bytes'] / 1e9:.1f}"


def test_a_failed_run_is_its_own_row_and_the_others_go_on(small, monkeypatch, capsys):
    """Out of memory in the paged run at block 16 and a bug (a RuntimeError) in naive's attention: each fails its
    own row in one line (the bug's traceback on stderr), and the rest of the table still runs."""
    model, tokenizer = small

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB.\nGPU 0 has ...")

    def bug(*args, **kwargs):
        raise RuntimeError("index 9 is out of bounds for dimension 0 with size 3")
    monkeypatch.setattr(paged, "attention_torch", out_of_memory)  # what the block-16 run takes as its kernel
    monkeypatch.setattr(naive, "attention", bug)
    scale = dict(SCALE, default_budget_requests=1, throughput_requests=1)  # (faster: 1 request each)
    rows, skipped, throughput = gpu_check.check(naive, paged, model, tokenizer, scale)
    two, three, paged_row, default_row = rows
    assert two["failed"] == "RuntimeError: index 9 is out of bounds for dimension 0 with size 3 (traceback above)"
    assert "needs 3 x 100 = 300 tokens" in three["failed"], "the budget's refusal comes before any step"
    assert paged_row["failed"] == "out of GPU memory: CUDA out of memory. Tried to allocate 20.00 MiB."
    assert default_row["finished"] == 1, "the run after the failed ones goes on"
    assert throughput.startswith("naive, 1 requests: RuntimeError: index 9"), "its waves failed: not measured"
    assert "Traceback" in capsys.readouterr().err
    cells = gpu_check.table(rows, 1e9, None)
    assert [c[5] for c in cells] == ["failed", "failed", "failed", "1/1"]
    assert [c[13] for c in cells] == ["-", "-", "no", "-"], "out of memory: it does not fit"


def test_operators_that_launch_a_kernel_are_counted():
    """gpu_check counts with tools/memory_tally.py's LaunchCount. Counted by hand: mm, clone (a reshape that must
    copy), add, sum, _local_scalar_dense (.item(), a copy to the host), zeros, arange, fill_ (an indexed write);
    views, and a reshape that needs no copy, launch nothing."""
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    with gpu_check.LaunchCount() as ops:
        x = a @ b
        x.view(-1).reshape(3, 5).t()
        x.t().reshape(-1)
        (x.view(-1) + 1).sum().item()
        torch.zeros(2, 3), torch.arange(4)
        x[0] = 1
        x.expand(2, 3, 5), x.permute(1, 0), x.unsqueeze(0), x[:, 1], x.flatten()
    assert ops.launches == 8


def test_decode_steps_are_counted_first_then_timed():
    """A stand-in forward of 2 operators a step: the first COUNTED_STEPS steps are counted (plus one a layer where
    the kernel is not attention_torch: flash-attn's, which runs outside the dispatcher), the rest timed; a prefill
    (more than one new token) is neither."""
    def forward(model, tokens, cache_seqlens, *args, **kwargs):
        return (tokens + 1).sum(0)
    for kernel, extra in (("attention_torch", 0), ("flash-attn", 5)):
        module = SimpleNamespace(forward=forward, attention_torch=len, attention=len if extra == 0 else max)
        steps, model = [], {"layers": [{}] * 5}
        with gpu_check.decode_steps(module, steps):
            module.forward(model, torch.zeros(3, 7), torch.zeros(3, dtype=torch.int32))  # a prefill
            for i in range(5):
                module.forward(model, torch.zeros(4 - i // 3, 1), torch.full((4 - i // 3,), 10, dtype=torch.int32))
        assert module.forward is forward
        assert [s.get("ops") for s in steps] == [2 + extra] * 3 + [None] * 2
        assert [s["batch"] for s in steps] == [4, 4, 4, 3, 3] and [s["keys"] for s in steps] == [44] * 3 + [33] * 2
        assert all(s["seconds"] > 0 for s in steps[3:])


def test_the_full_batch_figures_take_the_steps_of_at_least_90_percent_of_the_largest():
    steps = [{"batch": 10, "keys": 100, "ops": 7}, {"batch": 10, "keys": 110, "ops": 9}, {"batch": 10, "keys": 120,
             "seconds": 0.5}, {"batch": 9, "keys": 130, "seconds": 0.7}, {"batch": 9, "keys": 140, "seconds": 0.9},
             {"batch": 8, "keys": 150, "seconds": 0.1}, {"batch": 1, "keys": 20, "seconds": 0.01}]
    figures = gpu_check.full_batch(steps, weight_bytes=1000, kv_bytes_per_token=2)
    assert figures == {"batch": 10, "ops": 9, "step": 0.7, "read_bytes": 1000 + 2 * 130}


def model_of_shapes(preset):
    """A model dict of `preset`'s tensors on the meta device, in bfloat16: their bytes, but no memory."""
    shapes = make_checkpoint.tensor_shapes(preset)
    meta = {name: torch.empty(shape, dtype=torch.bfloat16, device="meta") for name, shape in shapes.items()}
    layers = [{name.split(".")[-2]: t for name, t in meta.items() if name.startswith(f"layers.{i}.")}
              for i in range(make_checkpoint.PRESETS[preset]["params"]["n_layers"])]
    model = {"layers": layers, "tok_embeddings": meta["tok_embeddings.weight"], "norm": meta["norm.weight"]}
    model["output"] = meta.get("output.weight", model["tok_embeddings"])
    return model


@pytest.mark.parametrize("preset", ["8b", "1b", "tiny"])
def test_the_weights_a_step_reads_leave_out_the_embedding_table(preset):
    """All the parameters, counted from the shapes, less the embedding table's vocab x dim, which a step only
    indexes; where the output layer is tied to it (1b, tiny), it is read there, once."""
    params = make_checkpoint.PRESETS[preset]["params"]
    table = params["vocab_size"] * params["dim"]
    tied = make_checkpoint.PRESETS[preset]["tied"]
    expected = make_checkpoint.param_count(preset) - (0 if tied else table)
    assert gpu_check.weight_bytes(model_of_shapes(preset)) == 2 * expected
    if preset == "8b":  # the bound it gives is about 7% below one that counts the table
        assert 0.06 < table / make_checkpoint.param_count(preset) < 0.07


def test_a_24_gb_card_is_a_limit_on_the_allocator(monkeypatch):
    """With torch.cuda stood in for: an 80 GB GPU, 70 GB free, 9 GB reserved by the allocator, so 1 GB in use
    outside it (the context); the allocator may then reserve the card's bytes less that 1 GB, as a fraction of 80
    GB; after the block, or an error inside it, no limit again."""
    fractions = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 * 10**9, 80 * 10**9))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 9 * 10**9)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, device=None: fractions.append(f))
    assert gpu_check.outside_allocator() == 10**9
    with pytest.raises(torch.cuda.OutOfMemoryError):
        with gpu_check.card_limit(gpu_check.CARD_BYTES):
            assert fractions == [(gpu_check.CARD_BYTES - 10**9) / (80 * 10**9)]
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    assert fractions[-1] == 1.0
    with gpu_check.card_limit(None):
        pass
    assert len(fractions) == 2, "no limit: nothing set"


def test_flash_attn_is_skipped_with_its_reason(monkeypatch):
    monkeypatch.setattr(paged, "flash_attn_with_kvcache", lambda *args, block_table=None: None)
    monkeypatch.setattr(paged, "KERNEL", "pytorch")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert gpu_check.flash_attn_reason(paged) == "flash-attn 2 runs on Ampere GPUs or newer"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert gpu_check.flash_attn_reason(paged) == "this flash-attn is older than 2.5: its kernel takes no block table"
    # Chosen: it is tried as the scripts try it, and runs (the stand-in keeps its contract), or fails there.
    monkeypatch.setattr(paged, "KERNEL", "flash-attn")
    monkeypatch.setattr(paged, "DTYPE", torch.bfloat16)
    monkeypatch.setattr(paged, "attention", flash_attn_standin.flash_attn_with_kvcache)
    assert gpu_check.flash_attn_reason(paged) is None

    def refuses(*args, **kwargs):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
    monkeypatch.setattr(paged, "attention", refuses)
    assert gpu_check.flash_attn_reason(paged) == ("flash-attn fails on this GPU (RuntimeError: CUDA error: no kernel "
                                                  "image is available for execution on the device): pip uninstall "
                                                  "flash-attn to run with the PyTorch attention")
    # Not installed, or installed but failing to import: told apart.
    monkeypatch.setattr(paged, "flash_attn_with_kvcache", None)
    assert gpu_check.flash_attn_reason(paged) == "flash-attn is not installed"
    broken = ImportError("libcudart.so.12: cannot open shared object file: No such file or directory")
    monkeypatch.setattr(paged, "flash_attn_with_kvcache", broken)
    assert gpu_check.flash_attn_reason(paged) == ("flash-attn is installed but fails to import (ImportError: "
                                                  "libcudart.so.12: cannot open shared object file: No such file or "
                                                  "directory)")


def test_the_checkpoint_is_written_once_and_timed(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "tokenizer_file", make_checkpoint.tokenizer_source)
    seconds = gpu_check.ensure_checkpoint(tmp_path / "ckpt", "tiny", device="cpu")
    assert seconds > 0 and (tmp_path / "ckpt" / "consolidated.00.pth").is_file()
    assert gpu_check.ensure_checkpoint(tmp_path / "ckpt", "tiny", device="cpu") is None, "there: not written again"


def test_bandwidth_of_a_copy_is_measured():
    assert gpu_check.bandwidth("cpu", size=2**20, repeats=3) > 1e6  # bytes per second: any machine moves more


def test_a_run_on_a_gpu_is_limited_to_the_card_and_measured(small, monkeypatch):
    """run()'s GPU path, with torch.cuda stood in for (the scripts stay on the CPU): an 80 GB GPU with 70 GB free and
    9 GB reserved, so 1 GB outside the allocator; the run is limited to what the 24 GB card leaves beside that 1 GB,
    its peak is that 1 GB plus the most the allocator reserved (20 GB here: it fits; 25 GB: it does not), and the
    limit is lifted after it. Out of memory inside the limit is its row's one line."""
    model, tokenizer = small
    calls = []
    for name, value in (("is_available", lambda: True), ("synchronize", lambda device=None: None),
                        ("empty_cache", lambda: calls.append("empty_cache")),
                        ("reset_peak_memory_stats", lambda device=None: calls.append("reset")),
                        ("mem_get_info", lambda device=None: (70 * 10**9, 80 * 10**9)),
                        ("memory_reserved", lambda device=None: 9 * 10**9),
                        ("set_per_process_memory_fraction", lambda f, device=None: calls.append(f))):
        monkeypatch.setattr(torch.cuda, name, value)
    rows = []
    for reserved in (20 * 10**9, 25 * 10**9):
        monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None, r=reserved: r)
        requests = gpu_check.make_requests(paged, tokenizer, 1, 60)  # 44 prompt tokens, 16 generated
        rows.append(gpu_check.run(paged, model, requests, 200, 60, 16))
        assert calls[:2] == ["empty_cache", "reset"] and calls[2:] == [(gpu_check.CARD_BYTES - 10**9) / 80e9, 1.0]
        calls.clear()
    assert [r["peak_bytes"] for r in rows] == [21 * 10**9, 26 * 10**9]
    assert [c[12:14] for c in gpu_check.table(rows, 1e12, 80 * 10**9)] == [["25.76", "yes"], ["25.76", "no"]]

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
    monkeypatch.setattr(paged, "attention", out_of_memory)
    row = gpu_check.run(paged, model, gpu_check.make_requests(paged, tokenizer, 1, 60), 200, 60, 16)
    assert row["failed"] == "out of GPU memory inside a 25.76 GB card: CUDA out of memory. Tried to allocate 2.00 GiB."
    assert calls[-1] == 1.0, "the limit is lifted after a failed run too"
