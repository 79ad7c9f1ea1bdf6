"""llama3-paged-swap.py: --preempt swap sends a preempted request's K and V to host memory and back.

Against llama3-paged.py, an independent implementation of the same schedule: without the option the rung generates
its tokens, with and without preemption, and recomputes what it recomputes; with it, the same tokens again. The
blocks a swapped request gets back hold the K and V it had, block by block; the report's figures (blocks and bytes
out and in, tokens recomputed) are counted here from the preempted requests' tokens and the checkpoint's shape.
The memory a swap takes on the device, counted as on a GPU at Llama-3-8B's shape: one block at a time. Last,
random workloads on the toy model that checks every cache read.
"""
import contextlib
import io
import json
import random
import re

import pytest
import torch

import flash_attn_standin
from conftest import pin_cpu_path, run_script
from load_scripts import load_script
from memory_tally import MemoryTally
from toy_model import VOCAB, check_tokens, toy_forward, toy_model

swap = load_script("swap")
paged = load_script("paged")


@pytest.fixture(autouse=True, scope="module")
def cpu_path():
    """The in-process tests pick small block sizes: they run the scripts' CPU path, on any machine."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        pin_cpu_path(monkeypatch, swap, paged)
        yield


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    model = swap.load_model(tiny_ckpt)
    model["rope_cos"], model["rope_sin"] = swap.rope_tables(model, 128)
    return model


@pytest.fixture(scope="module")
def prompts(tiny_ckpt):
    tokenizer = swap.load_tokenizer(tiny_ckpt / "tokenizer.model")
    return [swap.encode_chat(tokenizer, text) for text in ("Why is the sky blue?", "Name three prime numbers.")]


def run_generate(module, model, prompts, options=(), budget_tokens=4096, ref_length=30):
    """generate() of a script at block 4 on these prompts. Returns each request's tokens, the stats, and the
    token count of each request preempted, seen as the manager lets go of a request that is not done."""
    args = module.parse_args([str(len(prompts)), "--block-size", "4", "--max-seq-len", "80", *options])
    requests = [module.Request(i, p, ref_length, list(p)) for i, p in enumerate(prompts)]
    kv_cache, manager = module.make_kv_cache(model, budget_tokens, len(requests), args)
    preempted, free = [], manager.free

    def watch_free(req_id):
        if not requests[req_id].done:
            preempted.append(len(requests[req_id].tokens))
        free(req_id)

    manager.free = watch_free
    stats = module.generate(model, requests, kv_cache, manager, args, set())
    assert all(r.done for r in requests)
    return [r.tokens for r in requests], stats, preempted


@pytest.mark.parametrize("budget", [4096, 72])  # 72: 18 blocks, too few for both requests of 46 tokens at once
def test_without_swap_it_does_what_llama3_paged_does(model, prompts, budget):
    tokens, stats, preempted = run_generate(swap, model, prompts, budget_tokens=budget)
    parent_tokens, parent_stats, parent_preempted = run_generate(paged, model, prompts, budget_tokens=budget)
    assert tokens == parent_tokens and preempted == parent_preempted and (budget == 72) == bool(preempted)
    same = ("decode_steps", "preemptions", "peak_reserved_tokens", "peak_used_tokens", "reserved_at_peak_use")
    assert {k: stats[k] for k in same} == {k: parent_stats[k] for k in same}
    # A recomputed request prefills all its tokens again: all but its newest had their K and V before.
    assert stats["recomputed_tokens"] == sum(n - 1 for n in parent_preempted)
    assert stats["swapped_out_blocks"] == stats["swapped_in_blocks"] == 0


def test_swap_generates_the_same_tokens_and_counts_the_blocks_it_moves(model, prompts):
    tokens, stats, preempted = run_generate(swap, model, prompts, ["--preempt", "swap"], budget_tokens=72)
    assert tokens == run_generate(paged, model, prompts, budget_tokens=72)[0]
    assert preempted and stats["preemptions"] == len(preempted) and stats["recomputed_tokens"] == 0
    # Out: the blocks of each victim's cached tokens (all but its newest), 4 a block; in: the same, as all finish.
    assert stats["swapped_out_blocks"] == stats["swapped_in_blocks"] == sum(-(-(n - 1) // 4) for n in preempted)


def test_swap_gives_a_request_back_the_k_and_v_it_had(model, prompts, monkeypatch):
    """Every request swapped out finds, when it next runs, its cached K and V as they were, block by block."""
    args = swap.parse_args(["2", "--block-size", "4", "--max-seq-len", "80", "--preempt", "swap"])
    requests = [swap.Request(i, p, 30, list(p)) for i, p in enumerate(prompts)]
    kv_cache, manager = swap.make_kv_cache(model, 72, len(requests), args)  # 18 blocks: too few for both
    had, checked = {}, []
    free, real_forward = manager.free, swap.forward

    def read_then_free(req_id):
        victim = requests[req_id]
        if not victim.done:  # preempted: what it has cached now must come back
            cached = len(victim.tokens) - 1
            had[req_id] = [cache[:, manager.blocks[req_id]].flatten(1, 2)[:, :cached].clone() for cache in kv_cache]
        free(req_id)

    def forward(*call, **kwargs):  # the next model call after a swapped request is back
        for req_id in [r for r in had if r in manager.blocks]:
            for cache, before in zip(kv_cache, had.pop(req_id)):
                for j, block in enumerate(manager.blocks[req_id][:-(-before.shape[1] // 4)]):
                    assert torch.equal(cache[:, block, :before.shape[1] - 4 * j], before[:, 4 * j:4 * j + 4]), \
                        f"request {req_id}'s block {j} came back changed"
            checked.append(req_id)
        return real_forward(*call, **kwargs)

    manager.free = read_then_free
    monkeypatch.setattr(swap, "forward", forward)
    stats = swap.generate(model, requests, kv_cache, manager, args, set())
    assert stats["preemptions"] > 0 and stats["swapped_out_blocks"] > 0 and checked and not had


# ---------------------------------------------------------------------------------------------
# End to end: the report's lines.

def run_main(tiny_ckpt, tmp_path, capsys, *options):
    out = tmp_path / f"run-{len(list(tmp_path.iterdir()))}.json"
    swap.main(["3", "--ckpt-dir", str(tiny_ckpt), "--ref-lengths", "--max-seq-len", "100", "--quiet",
               "--kv-budget-tokens", "160", "--json", str(out), *options])
    return json.loads(out.read_text()), capsys.readouterr().out


def test_the_report_says_what_moved(tiny_ckpt, tmp_path, capsys):
    params = json.loads((tiny_ckpt / "params.json").read_text())
    block_bytes = 2 * params["n_layers"] * params["n_kv_heads"] * params["dim"] // params["n_heads"] * 4 * 16  # fp32
    run, stdout = run_main(tiny_ckpt, tmp_path, capsys, "--preempt", "swap")
    stats = run["stats"]
    assert stats["preemptions"] > 0
    for direction in ("out", "in"):
        blocks, nbytes = map(int, re.search(rf"^swapped {direction}:\s+(\d+) blocks \((\d+) bytes\)", stdout,
                                            re.M).groups())
        assert blocks == stats[f"swapped_{direction}_blocks"] > 0 and nbytes == blocks * block_bytes
    assert "recomputed:" not in stdout
    recomputed, stdout = run_main(tiny_ckpt, tmp_path, capsys)
    found = int(re.search(r"^recomputed:\s+(\d+) tokens, prefilled again after preemptions$", stdout, re.M).group(1))
    assert found == recomputed["stats"]["recomputed_tokens"] > 0 and "swapped" not in stdout
    # Both ran the same requests to the same lengths, and generated the same tokens.
    assert [r["generated_ids"] for r in recomputed["requests"]] == [r["generated_ids"] for r in run["requests"]]


def test_a_bad_preempt_mode_gets_one_line():
    result = run_script("llama3-paged-swap.py", 1, "--preempt", "later")
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("llama3-paged-swap.py: error: argument --preempt: invalid choice: 'later'")


# ---------------------------------------------------------------------------------------------
# The device memory a swap takes, at Llama-3-8B's shape, counted as on a GPU (tools/memory_tally.py).

LLAMA3_8B = {"layers": [None] * 32, "n_kv_heads": 8, "head_dim": 128}  # what make_kv_cache reads of a model
BLOCK_BYTES = 32 * 256 * 8 * 128 * 2  # K (or V) of one 256-token block in all 32 layers, in bf16: 16 MiB


class GPUOnMeta(MemoryTally):
    """The meta device stands for a GPU: tensors there take no memory, whatever their size, and only they are
    counted. Copies between it and the CPU (the host) move no data; as CUDA's copy_ does, a copy whose side on the
    device is not contiguous goes through a contiguous temporary of that side, counted while the copy runs. Each
    such copy is recorded: (bytes, whether it was asked not to block)."""

    def __init__(self):
        super().__init__(device="meta")
        self.transfers = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.copy_.default and {args[0].device.type, args[1].device.type} == {"meta", "cpu"}:
            on_device = args[0] if args[0].device.type == "meta" else args[1]
            temporary = 0 if on_device.is_contiguous() else on_device.numel() * on_device.element_size()
            held = sum(size for ref, size in self.live.values() if not ref.expired())
            self.peak = max(self.peak, held + temporary)
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            self.transfers.append((on_device.numel() * on_device.element_size(), non_blocking))
            return args[0]
        return super().__torch_dispatch__(func, types, args, kwargs)


def stand_in_forward(model, tokens, *rest, **kwargs):
    return torch.zeros(tokens.shape[0], 8)  # logits over 8 tokens, on the host; reads and writes no cache


@pytest.mark.parametrize("prompt_tokens", [1000, 4000])
def test_swap_holds_at_most_one_block_on_the_device_however_long_the_request(monkeypatch, prompt_tokens):
    """Two requests fill the pool; when the older needs another block, the newer is swapped out (all its blocks but
    none of its tokens lost), and back in when the older finishes. Out and in, the device holds at most one block
    in all layers of the copy at once: 16 MiB (and a few bytes of block table), whether the request has 4 blocks
    or 16; and each copy is one block's K or V, asked not to block."""
    for name, value in (("DEVICE", torch.device("meta")), ("DTYPE", torch.bfloat16), ("forward", stand_in_forward)):
        monkeypatch.setattr(swap, name, value)
    blocks = -(-(prompt_tokens + 1) // 256)
    generate_tokens = blocks * 256 - prompt_tokens + 4  # past the last of its blocks
    args = swap.parse_args(["2", "--block-size", "256", "--preempt", "swap"])
    requests = [swap.Request(i, [i + 1] * prompt_tokens, generate_tokens, [i + 1] * prompt_tokens) for i in range(2)]
    kv_cache, manager = swap.make_kv_cache(LLAMA3_8B, 2 * blocks * 256, len(requests), args)
    with GPUOnMeta() as tally:
        stats = swap.generate(None, requests, kv_cache, manager, args, set())
    assert all(r.done for r in requests)
    assert stats["preemptions"] == 1 and stats["swapped_out_blocks"] == stats["swapped_in_blocks"] == blocks
    assert tally.transfers == [(BLOCK_BYTES, True)] * (2 * 2 * blocks)  # K and V of each block, out and in
    assert tally.peak <= BLOCK_BYTES + 2**10, f"swap held {tally.peak / BLOCK_BYTES:.2f} blocks' K or V at once"


# ---------------------------------------------------------------------------------------------
# Random workloads on the toy model of tests/toy_model.py, whose cache holds a hash of each request's whole prefix.

PREEMPTED = {}  # seed -> preemptions with --preempt swap, to check that the random runs do swap


@pytest.mark.parametrize("seed", range(20))
def test_swap_on_random_workloads(seed, monkeypatch):
    """Random requests in a pool that holds the longest and rarely all: with --preempt swap every token follows
    from its request's own history (a block brought back wrong changes what follows), and every block comes back."""
    rng = random.Random(seed)
    block_size = [1, 2, 3, 4, 7, 16][seed % 6]
    max_seq_len = rng.randint(2, 8) * block_size + rng.randint(2, 9)
    num_blocks = rng.randint(1, 2) * -(-max_seq_len // block_size)
    spec = [([rng.randrange(VOCAB) for _ in range(rng.randint(1, max_seq_len - 1))], rng.randint(1, max_seq_len))
            for _ in range(rng.randint(2, 10))]
    args = swap.parse_args(["1", "--max-seq-len", str(max_seq_len), "--block-size", str(block_size),
                            "--preempt", "swap"])
    manager = swap.KVCacheManager(num_blocks, block_size, len(spec), -(-max_seq_len // block_size), "cpu")
    monkeypatch.setattr(swap, "forward", toy_forward)
    requests = [swap.Request(i, list(p), g, list(p)) for i, (p, g) in enumerate(spec)]
    stats = swap.generate(None, requests, toy_model(num_blocks, block_size), manager, args, set())
    for req, (prompt, ref_length) in zip(requests, spec):
        assert req.done and len(req.tokens) == min(len(prompt) + ref_length, max_seq_len)
        assert check_tokens(prompt, req.tokens) is None, f"request {req.id}: {check_tokens(prompt, req.tokens)}"
    assert sorted(manager.free_blocks) == list(range(num_blocks)) and not manager.blocks
    assert stats["swapped_out_blocks"] == stats["swapped_in_blocks"]
    PREEMPTED[seed] = stats["preemptions"]


def test_the_random_workloads_do_swap():
    if len(PREEMPTED) < 20:
        pytest.skip("needs every test_swap_on_random_workloads case to run first")
    assert sum(n > 0 for n in PREEMPTED.values()) >= 8, PREEMPTED


# ---------------------------------------------------------------------------------------------
# Through flash-attn's contract (tests/flash_attn_standin.py), as on a GPU with flash-attn: bf16, 256-token blocks.

def run_through_the_kernel_contract(module, ckpt, out, monkeypatch, *options):
    for name, value in (("attention", flash_attn_standin.flash_attn_with_kvcache), ("KERNEL", "flash-attn"),
                        ("DTYPE", torch.bfloat16)):
        monkeypatch.setattr(module, name, value)
    with contextlib.redirect_stdout(io.StringIO()):
        module.main(["3", "--ckpt-dir", str(ckpt), "--ref-lengths", "--quiet", "--max-seq-len", "300",
                     "--kv-budget-tokens", "512", "--json", str(out), *options])
    return json.loads(out.read_text())


def test_swap_through_the_kernel_contract(tiny_ckpt, tmp_path, monkeypatch):
    """2 blocks of 256 for 3 requests: swapped out and back, and read by the stand-in kernel, which refuses any call
    the real one would refuse or get wrong. (In bf16 a recomputed K or V may round otherwise than the one swapped
    back, so the tokens are compared with llama3-paged.py's in float32 only, above.)"""
    run = run_through_the_kernel_contract(swap, tiny_ckpt, tmp_path / "swap.json", monkeypatch, "--preempt", "swap")
    assert run["stats"]["block_size"] == 256 and run["stats"]["preemptions"] > 0
    assert run["stats"]["finished"] == run["stats"]["requests"] == 3
    assert run["stats"]["swapped_out_blocks"] == run["stats"]["swapped_in_blocks"] > 0
