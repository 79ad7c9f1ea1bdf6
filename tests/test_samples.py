"""llama3-paged-samples.py: reference counts, fork and copy-on-write, --samples --temperature --seed.

Against llama3-paged.py, an independent implementation of the same schedule: without --samples the rung generates
its tokens and reports its memory, with and without preemption, and greedy samples are its tokens S times over.
Against from-scratch prefills in a contiguous cache (llama3-naive.py's forward): the K and V each sample leaves in
its blocks. Against figures computed here from the requests' token counts: every memory figure of the report, and
the timeline decode step by decode step. The manager's reference counts and copy-on-write on a case worked out by
hand, and the README's worked example (a 37-token prompt, --samples 4). Last, the memory that copy-on-write and
sampling take, counted as on a GPU at Llama-3-8B's shape, and what sampling draws, against the probabilities.
"""
import contextlib
import io
import json
import re

import pytest
import torch

from conftest import pin_cpu_path
from load_scripts import load_script
from memory_tally import MemoryTally

samples = load_script("samples")
paged = load_script("paged")  # the parent: the same schedule, with no sharing in it
naive = load_script("naive")  # its forward() reads a contiguous cache: a from-scratch reference


@pytest.fixture(autouse=True, scope="module")
def cpu_path():
    """The tests pick small block sizes and the CPU budget: they run the scripts' CPU path, on any machine."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        pin_cpu_path(monkeypatch, samples, paged, naive)
        yield


RUNS = {}  # (script, arguments) -> (--json, stdout): tests of both rungs read llama3-paged.py's runs


def run_main(module, ckpt, out_dir, n, *args):
    """main() in process, as a user runs it (no new process: quicker). Returns its --json and its stdout."""
    key = (module.__name__, str(ckpt), n, *map(str, args))
    if key not in RUNS:
        out = out_dir / f"run-{len(list(out_dir.iterdir()))}.json"
        with contextlib.redirect_stdout(io.StringIO()) as stdout:
            module.main([str(n), "--ckpt-dir", str(ckpt), "--json", str(out), "--ref-lengths", "--quiet",
                         *map(str, args)])
        RUNS[key] = json.loads(out.read_text()), stdout.getvalue()
    return RUNS[key]


def generated(run):
    return [r["generated_ids"] for r in run["requests"]]


def number(stdout, label):
    return int(re.search(rf"^{label}:\s+(\d+)", stdout, re.M).group(1))


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    model = samples.load_model(tiny_ckpt)
    model["rope_cos"], model["rope_sin"] = samples.rope_tables(model, 128)
    return model


@pytest.fixture(scope="module")
def prompts(tiny_ckpt):
    tokenizer = samples.load_tokenizer(tiny_ckpt / "tokenizer.model")
    return [samples.encode_chat(tokenizer, text) for text in ("Why is the sky blue?", "Name three prime numbers.")]


def run_generate(model, requests, args, budget_tokens=4096, stop_ids=frozenset()):
    kv_cache, manager = samples.make_kv_cache(model, budget_tokens, len(requests), args)
    stats = samples.generate(model, requests, kv_cache, manager, args, set(stop_ids))
    return stats, kv_cache, manager


# ---------------------------------------------------------------------------------------------
# End to end (main() in process), against llama3-paged.py and against figures computed from token counts.

# The first 3 prompts (44, 27 and 72 tokens) stop at their reference length (71 for the second) or at 120 tokens.
COMMON = ["--max-seq-len", 120, "--block-size", 8]


def report_lines(stdout):
    """The report, less its times and its title."""
    lines = stdout.split("===", 2)[2].splitlines()[1:]
    return [line for line in lines if not re.match(r"generated tokens|cache manager", line)]


@pytest.mark.parametrize("budget", [None, 160])
def test_without_samples_it_is_llama3_paged(tiny_ckpt, tmp_path, budget):
    """Without --samples, llama3-paged.py's tokens, memory timeline and report, whether no request is preempted or
    (20 blocks of 8 for requests of 98 to 120 tokens) several are."""
    options = COMMON + (["--kv-budget-tokens", budget] if budget else [])
    (parent, parent_out), (rung, rung_out) = (run_main(m, tiny_ckpt, tmp_path, 3, *options) for m in (paged, samples))
    assert generated(rung) == generated(parent) and rung["timeline"] == parent["timeline"]
    assert rung["stats"]["preemptions"] == parent["stats"]["preemptions"]
    assert (parent["stats"]["preemptions"] > 0) == bool(budget)
    assert report_lines(rung_out) == report_lines(parent_out)  # and no line about sharing


# Prompts of 39, 32 and 23 tokens, to generate 23, 3 and 10 (--ref-lengths): at block 8 the second fills its blocks
# exactly, the others end inside one; and the most KV is reserved after the most tokens were held (expected_steps()).
LENGTHS = [(39, 23), (32, 3), (23, 10)]


@pytest.fixture(scope="module")
def greedy_runs(tiny_ckpt, tmp_path_factory):
    """llama3-paged.py's greedy run of the LENGTHS prompts, and the rung's with --samples 3."""
    out_dir = tmp_path_factory.mktemp("greedy")
    chat = len(samples.encode_chat(samples.load_tokenizer(tiny_ckpt / "tokenizer.model"), ""))  # the format's tokens
    words = lambda n: " ".join(["word"] * n)
    entries = [{"conversations": [{"from": "human", "value": words(p - chat)}, {"from": "gpt", "value": words(g)}]}
               for p, g in LENGTHS]
    (out_dir / "prompts.json").write_text(json.dumps(entries))
    options = ["--prompts", out_dir / "prompts.json", "--block-size", 8]
    return run_main(paged, tiny_ckpt, out_dir, 3, *options), run_main(samples, tiny_ckpt, out_dir, 3, *options,
                                                                        "--samples", 3)


def test_greedy_samples_are_llama3_paged_tokens_three_times(greedy_runs):
    (parent, _), (run, _) = greedy_runs
    assert len(run["requests"]) == 3 * 3 and run["stats"]["finished"] == 9
    for i, tokens in enumerate(generated(parent)):  # the samples of a prompt are adjacent
        assert generated(run)[3 * i:3 * i + 3] == [tokens] * 3
        assert all(r["prompt_ids"] == parent["requests"][i]["prompt_ids"] for r in run["requests"][3 * i:3 * i + 3])


def expected_steps(lengths, samples_per_prompt, block):
    """Each decode step's (KV reserved, KV holding tokens, KV reserved counted once per holder) in tokens, and
    (blocks shared, blocks saved), when every prompt is admitted in the first step and none is preempted. lengths:
    (prompt tokens, generated tokens) of each prompt, as many for each of its samples. The first step prefills every
    prompt and decodes nothing; at decode step k a prompt's samples, running while k < generated, hold their
    p + k cached tokens each. The prompt's p // block full blocks are held by all of them, once; every other block
    is one sample's own (the prompt's last, partly filled one too: copied on write, but for the last to ask)."""
    ceil = lambda tokens: -(-tokens // block)
    steps = []
    for k in range(1, max(g for _, g in lengths)):
        running = [p for p, g in lengths if k < g]
        full, s = [p // block for p in running], samples_per_prompt
        steps.append({"reserved": sum(s * ceil(p + k) - (s - 1) * f for p, f in zip(running, full)) * block,
                      "held": sum(s * (p + k) - (s - 1) * f * block for p, f in zip(running, full)),
                      "per_holder": sum(s * ceil(p + k) for p in running) * block,
                      "shared": sum(full) if s > 1 else 0, "saved": (s - 1) * sum(full)})
    return steps


def test_the_report_counts_what_sharing_holds_and_saves(greedy_runs):
    """Every memory figure of the report, and the timeline, against expected_steps() for the LENGTHS prompts, whose
    4, 4 and 2 full blocks of 8 are shared by their 3 samples."""
    _, (run, stdout) = greedy_runs
    lengths = [(len(r["prompt_ids"]), len(r["generated_ids"])) for r in run["requests"]]
    assert lengths == [length for length in LENGTHS for _ in range(3)]
    steps = expected_steps(LENGTHS, 3, 8)
    reserved, held = [s["reserved"] for s in steps], [s["held"] for s in steps]
    assert run["timeline"] == {"reserved_tokens": reserved, "used_tokens": held}
    assert run["stats"]["preemptions"] == 0 and number(stdout, "preemptions") == 0
    assert number(stdout, "peak KV reserved") == max(reserved)
    assert number(stdout, "peak KV holding tokens") == max(held)
    reserved_then = reserved[held.index(max(held))]  # when the most tokens were held: less than at the peak
    assert reserved_then < max(reserved)
    percent = float(re.search(r"^Fragmented Memory: \S+ GB \(([\d.]+)% of", stdout, re.M).group(1))
    assert percent == pytest.approx(100 * (reserved_then - max(held)) / reserved_then, abs=0.05)
    assert re.search(rf"^blocks:\s+\d+ of 8 tokens, {max(reserved) // 8} used at the peak$", stdout, re.M)
    assert number(stdout, "blocks shared") == max(s["shared"] for s in steps) == 4 + 4 + 2
    assert number(stdout, "references saved") == max(s["saved"] for s in steps) == 2 * (4 + 4 + 2)
    assert number(stdout, "peak KV unshared") == max(s["per_holder"] for s in steps)
    # Two copies of the prompt's last block for each prompt that ends inside one (39 and 23 tokens, not 32).
    assert number(stdout, "copy-on-write copies") == 2 * sum(p % 8 > 0 for p, _ in LENGTHS) == 4
    assert max(reserved) < max(s["per_holder"] for s in steps)


def test_sampling_is_reproducible_and_survives_preemption(tiny_ckpt, tmp_path):
    sample = ["--max-seq-len", 120, "--samples", 2, "--temperature", 0.9, "--seed", 5, "--block-size", 8]
    free, _ = run_main(samples, tiny_ckpt, tmp_path, 2, *sample)
    outputs = generated(free)
    assert len({tuple(g) for g in outputs}) == 4, "samples at temperature 0.9 should differ"
    assert free["stats"]["preemptions"] == 0
    tight, _ = run_main(samples, tiny_ckpt, tmp_path, 2, *sample, "--kv-budget-tokens", 240)  # 30 blocks for 4
    assert generated(tight) == outputs, "preemption changed the samples"  # samples of 98 to 120 tokens
    assert tight["stats"]["preemptions"] > 0 and tight["stats"]["peak_reserved_tokens"] <= 240


# ---------------------------------------------------------------------------------------------
# In process: the cache against from-scratch recomputes.

def prefill_from_scratch(model, tokens):
    """K and V of tokens from a fresh contiguous cache that holds nothing else, and the next token's
    log-probabilities (float64): each (n_layers, len(tokens), n_kv_heads, head_dim)."""
    shape = (len(model["layers"]), 1, len(tokens), model["n_kv_heads"], model["head_dim"])
    cache = (torch.zeros(shape), torch.zeros(shape))
    logits = naive.forward(model, torch.tensor([tokens]), torch.zeros(1, dtype=torch.int32), cache,
                           cache_batch_idx=torch.zeros(1, dtype=torch.int32))
    return cache[0][:, 0], cache[1][:, 0], torch.log_softmax(logits[0].float(), dim=-1).double()


def test_each_sample_caches_its_own_tokens(model, prompts):
    """After the samples diverge, each one's K and V, read through its own block table when it finishes,
    equal a from-scratch prefill of its own tokens; and they did share the prompt's blocks until then."""
    args = samples.parse_args(["1", "--samples", "3", "--temperature", "1.5", "--seed", "3", "--block-size", "5",
                               "--max-seq-len", "80"])
    requests = samples.with_samples([samples.Request(0, prompts[0], 24, list(prompts[0]))], 3)
    seen = {}

    def read_then_free(req_id):  # every sample's cache, just before it gives its blocks back
        req, blocks = requests[req_id], manager.blocks[req_id]
        cached = len(req.tokens) - 1
        seen[req_id] = (kv_cache[0][:, blocks].flatten(1, 2)[:, :cached], kv_cache[1][:, blocks].flatten(1, 2)[:, :cached])
        free(req_id)

    kv_cache, manager = samples.make_kv_cache(model, 4096, len(requests), args)
    free, manager.free = manager.free, read_then_free
    stats = samples.generate(model, requests, kv_cache, manager, args, set())

    assert len({tuple(r.generated_ids) for r in requests}) == 3, "samples at temperature 1.5 should differ"
    # The prompt (16 tokens) ends inside its fourth block: the two forks copy it, and share the three before.
    assert stats["cow_copies"] == 2 and (stats["shared_blocks_peak"], stats["saved_blocks_peak"]) == (3, 2 * 3)
    for req in requests:
        k, v, _ = prefill_from_scratch(model, req.tokens[:-1])
        torch.testing.assert_close(seen[req.id][0], k, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(seen[req.id][1], v, rtol=1e-4, atol=1e-5)


def test_samples_do_not_depend_on_the_batch_or_on_their_number(model, prompts):
    """A sample's randomness is its own: a prompt's first two samples are the same alone or beside a third
    sample and another prompt's samples."""
    def sample(prompt_list, count):
        args = samples.parse_args(["1", "--samples", str(count), "--temperature", "1.0", "--seed", "11",
                                   "--max-seq-len", "80"])
        requests = samples.with_samples([samples.Request(i, p, 12, list(p)) for i, p in enumerate(prompt_list)], count)
        run_generate(model, requests, args)
        return [r.generated_ids for r in requests]

    together = sample(prompts, 3)
    assert sample(prompts[:1], 2) == together[:2]


def test_more_samples_than_the_pool_holds_at_once_take_turns(model, prompts):
    """6 blocks of 5 tokens, 5 samples of 16 + 10 tokens (6 blocks each, at the end): they run as far as they fit,
    the newest preempted and recomputed alone, and draw what they draw with all the room they need."""
    args = samples.parse_args(["1", "--samples", "5", "--temperature", "1", "--seed", "2", "--block-size", "5",
                               "--max-seq-len", "80"])
    outputs = []
    for budget in (4096, 30):
        requests = samples.with_samples([samples.Request(0, prompts[0], 10, list(prompts[0]))], 5)
        stats, _, _ = run_generate(model, requests, args, budget_tokens=budget)
        outputs.append([r.tokens for r in requests])
        assert all(r.done for r in requests) and (stats["preemptions"] > 0) == (budget == 30)
    assert outputs[0] == outputs[1] and len({tuple(t) for t in outputs[0]}) == 5


def test_a_samples_group_that_can_never_fit_gets_one_line_with_the_blocks_it_needs(model):
    """A --samples group's first request is admitted with room for its prompt alone (its forks decode from the
    next step on): 48 tokens at block 16 need 3 blocks, not the 4 that 49 tokens would, and a budget of 2 never
    holds them."""
    args = samples.parse_args(["1", "--samples", "2", "--temperature", "1", "--block-size", "16"])
    requests = samples.with_samples([samples.Request(0, list(range(48)), 5, list(range(48)))], 2)
    with pytest.raises(SystemExit, match="cannot hold request 0, which needs 3$"):
        run_generate(model, requests, args, budget_tokens=32)


# ---------------------------------------------------------------------------------------------
# The manager, step by step.

def test_fork_copy_on_write_and_ref_counts():
    """block_size 4: a prompt of 6 tokens forked twice, as --samples 3 does. All three write their 7th token into the
    shared, partly filled block: asked in turn, the first two get copies of it and the last keeps it. The full
    block stays shared; a block goes back to the free list only when its last holder lets go."""
    m = samples.KVCacheManager(num_blocks=8, block_size=4, num_requests=3, max_blocks_per_request=4, device="cpu")
    m.allocate(0, 6)  # a group's first sample, prefilled; it decodes from the next step on, with its forks
    full, partial = m.blocks[0]
    m.fork(0, 1)
    m.fork(0, 2)
    assert m.ref_count[full] == m.ref_count[partial] == 3 and len(m.free_blocks) == 6
    assert (m.shared_blocks, m.saved_blocks) == (2, 4)
    assert not any(m.needs_block(r, 7) for r in range(3)) and all(m.needs_copy(r, 7) for r in range(3))
    copies = [m.copy_on_write(r) for r in range(3) if m.needs_copy(r, 7)]  # as the grow step does, oldest first
    assert [original for _, original in copies] == [partial, partial] and partial not in [c for c, _ in copies]
    assert m.blocks == {0: [full, copies[0][0]], 1: [full, copies[1][0]], 2: [full, partial]}
    assert m.ref_count[full] == 3 and m.ref_count[partial] == 1 and (m.shared_blocks, m.saved_blocks) == (1, 2)
    assert m.block_tables(torch.tensor([0, 1, 2]), 2).tolist() == [m.blocks[r] for r in range(3)]
    m.free(0)  # the first sample finishes: its copy goes back, the full block stays with the forks
    assert m.blocks.keys() == {1, 2} and m.ref_count[full] == 2 and len(m.free_blocks) == 5
    assert (m.shared_blocks, m.saved_blocks) == (1, 1)
    assert not any(m.needs_block(r, 8) for r in (1, 2))  # token 8 fills the second block
    assert all(m.needs_block(r, 9) for r in (1, 2))      # token 9 starts a third: nothing to copy
    assert not any(m.needs_copy(r, n) for r in (1, 2) for n in (8, 9))
    for r in (1, 2):
        m.append_block(r)
    assert len(m.blocks[1]) == len(m.blocks[2]) == 3 and m.blocks[1][2] != m.blocks[2][2]
    m.free(1)
    assert m.ref_count[full] == 1 and (m.shared_blocks, m.saved_blocks) == (0, 0)
    m.free(2)
    assert sorted(m.free_blocks) == list(range(8)) and m.ref_count == [0] * 8 and not m.blocks


def test_the_readme_example_a_37_token_prompt_with_4_samples(model):
    """README section 5, in generate(): at block 16 the prompt fills 3 blocks, held by all 4 samples (reference
    count 4) once the forks join, when sharing saves 9 blocks; at the first decode step samples 0, 1 and 2, asking
    in that order, each get a copy of the third, and sample 3, asking last, keeps the original. The first two
    blocks stay shared to the end: the report's 2 blocks shared and 6 saved, at the peak, and 3 copies."""
    args = samples.parse_args(["1", "--samples", "4", "--temperature", "1", "--block-size", "16"])
    prompt = list(range(100, 137))
    requests = samples.with_samples([samples.Request(0, prompt, 3, list(prompt))], 4)
    kv_cache, manager = samples.make_kv_cache(model, 4096, len(requests), args)
    copied, held = [], {}
    copy_on_write, free = manager.copy_on_write, manager.free

    def trace_copy(req_id):
        if not copied:  # the first copy: every fork has joined
            copied.append((list(manager.blocks[0]), [manager.ref_count[b] for b in manager.blocks[0]],
                           manager.shared_blocks, manager.saved_blocks))
        copied.append(req_id)
        return copy_on_write(req_id)

    def trace_free(req_id):
        held[req_id] = list(manager.blocks[req_id])
        free(req_id)

    manager.copy_on_write, manager.free = trace_copy, trace_free
    stats = samples.generate(model, requests, kv_cache, manager, args, set())
    (prompt_blocks, ref_counts, shared, saved), *copiers = copied
    assert ref_counts == [4, 4, 4] and (shared, saved) == (3, 9)
    assert copiers == [0, 1, 2] and stats["cow_copies"] == 3
    assert (stats["shared_blocks_peak"], stats["saved_blocks_peak"]) == (2, 6)
    assert held[3] == prompt_blocks, "the last to ask keeps the prompt's blocks"
    assert [held[r][:2] for r in range(3)] == [prompt_blocks[:2]] * 3
    assert len({held[r][2] for r in range(4)}) == 4, "each sample's third block is its own"


# ---------------------------------------------------------------------------------------------
# Transient memory at Llama-3-8B's shape, counted as on a GPU (tools/memory_tally.py), and sampling's odds.

LLAMA3_8B = {"layers": [None] * 32, "n_kv_heads": 8, "head_dim": 128}  # what make_kv_cache reads of a model


def stand_in_forward(model, tokens, *rest, **kwargs):
    return torch.zeros(tokens.shape[0], 8)  # logits over 8 tokens, on the host; reads and writes no cache


def test_copy_on_write_takes_no_device_memory_however_many_copies(monkeypatch):
    """8 prompts of 37 tokens with --samples 4, Llama-3-8B's KV cache at block 256 in bf16 on the meta device (a
    GPU's stand-in: only its tensors are counted, and they take no memory here): the first decode step copies 24
    blocks (3 per prompt), 384 MiB of K if they were gathered at once. Each copy is one block into another, in
    place: nothing is allocated for it."""
    for name, value in (("DEVICE", torch.device("meta")), ("DTYPE", torch.bfloat16), ("forward", stand_in_forward)):
        monkeypatch.setattr(samples, name, value)
    args = samples.parse_args(["1", "--block-size", "256", "--samples", "4", "--temperature", "1"])
    requests = samples.with_samples([samples.Request(i, [i] * 37, 3, [i] * 37) for i in range(8)], 4)
    kv_cache, manager = samples.make_kv_cache(LLAMA3_8B, 40 * 256, len(requests), args)
    with MemoryTally(device="meta") as tally:
        stats = samples.generate(None, requests, kv_cache, manager, args, set())
    assert all(r.done for r in requests)
    assert stats["cow_copies"] == 24 and stats["preemptions"] == 0
    assert tally.peak < 2**20, f"copy-on-write held {tally.peak / 2**20:.1f} MiB on the device (one block is 16 MiB)"


def test_sampling_memory_does_not_grow_with_the_batch():
    """pick_tokens on bf16 logits over Llama 3's 128,256 tokens: its temporaries stay under 40 MiB for 64 rows and
    for 512 alike (a float32 copy of 512 rows alone is 263 MB). Each row's token is the one it gets alone."""
    vocab, peaks = 128_256, []
    args = samples.parse_args(["1", "--samples", "2", "--temperature", "0.8"])
    for rows in (64, 512):
        logits = torch.zeros(rows, vocab, dtype=torch.bfloat16)  # all tokens alike: the token follows the draw
        batch = [samples.Request(i, [1, 2], None, [1, 2, 3]) for i in range(rows)]
        with MemoryTally() as tally:
            tokens = samples.pick_tokens(logits, batch, args)
        peaks.append(tally.peak)
        for i in (0, 31, 32, rows - 1):
            assert samples.pick_tokens(logits[i:i + 1], batch[i:i + 1], args) == tokens[i:i + 1]
    assert max(peaks) <= 40 * 2**20, f"pick_tokens held {[f'{p / 2**20:.0f} MiB' for p in peaks]} at 64 and 512 rows"


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampling_draws_each_token_with_its_probability(temperature):
    """Tokens 0, 4 and 9 of 10 with probabilities 0.2, 0.3 and 0.5, the others 0; at a temperature T the odds are
    these to the power 1 / T, normalized. 3000 draws, at 3000 positions: the counts pass a chi-square test (2
    degrees of freedom, p > 0.001) and no other token is ever drawn."""
    p = torch.tensor([0.2, 0, 0, 0, 0.3, 0, 0, 0, 0, 0.5], dtype=torch.float64)
    odds = p ** (1 / temperature) / (p ** (1 / temperature)).sum()
    args = samples.parse_args(["1", "--temperature", str(temperature), "--seed", "7"])
    batch = [samples.Request(0, [1], None, [1] * position) for position in range(1, 3001)]
    tokens = samples.pick_tokens(p.log().float().expand(len(batch), -1), batch, args)
    counts = torch.bincount(torch.tensor(tokens), minlength=10).double()
    assert counts[odds == 0].sum() == 0, f"drew tokens of probability 0: {counts.tolist()}"
    expected = odds[odds > 0] * len(batch)
    chi2 = float(((counts[odds > 0] - expected) ** 2 / expected).sum())
    assert chi2 < 13.82, f"counts {counts[odds > 0].tolist()} against {expected.tolist()}: chi-square {chi2:.1f}"


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit status 1.

@pytest.mark.parametrize("options, message", [
    (["--samples", "0"], "--samples must be positive, got 0"),
    (["--samples", "many"], "argument --samples: invalid int value: 'many'"),
    (["--temperature", "-1"], "--temperature must be a number >= 0, got -1.0"),
    (["--temperature", "nan"], "--temperature must be a number >= 0, got nan"),
    (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
])
def test_bad_sampling_options_get_one_line(tiny_ckpt, options, message):
    with pytest.raises(SystemExit) as exit:
        samples.main(["1", "--ckpt-dir", str(tiny_ckpt), *options])
    assert exit.value.code == f"llama3-paged-samples.py: error: {message}"


def test_samples_through_flash_attns_contract(tiny_ckpt, tmp_path, monkeypatch):
    """main() with tests/flash_attn_standin.py as its kernel, as on a GPU with flash-attn (bf16, 256-token blocks):
    forks and copy-on-write, preempted, through the kernel's contract. The stand-in refuses a block written by one
    row while another reads it, so a copy not made fails here."""
    from test_flash_attn_path import run  # (its own checks: a block table in every call, every request finished)
    stats = run("samples", tiny_ckpt, tmp_path, monkeypatch, "--samples", 2, "--temperature", 0.8,
                "--kv-budget-tokens", 1024)["stats"]
    assert stats["block_size"] == 256 and stats["cow_copies"] > 0 and stats["preemptions"] > 0
