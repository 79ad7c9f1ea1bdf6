"""Sharing KV blocks in llama3-paged-sharing.py: --samples, --beams, --system-prompt --prefix-sharing, --preempt swap.

End-to-end runs on the tiny random checkpoint check that sharing changes no token, only memory; in-process
runs of generate() check the cache itself against from-scratch recomputes: each sample's K and V after the
samples diverge, the K and V a swapped-out request gets back, prefix blocks found after different blocks, and
beam search against a plain one that recomputes every beam with a fresh cache. The manager's reference counts,
copy-on-write and prefix lookup are also checked step by step on small cases worked out by hand. Last, the memory
that copy-on-write, swap and sampling take for a while, counted as on a GPU at Llama-3-8B's shape, and what
sampling draws, against the probabilities.
"""
import json
import re

import pytest
import torch

from conftest import cpu_path_only, pin_cpu_path, run_script
from load_scripts import load_script
from memory_tally import MemoryTally

sharing = load_script("sharing")
naive = load_script("naive")  # its forward() reads a contiguous cache: a from-scratch reference
N = 3
# The first 3 prompts (44, 27 and 72 tokens) stop at 160 tokens or at their reference length (71 for the second).
COMMON = ["--ref-lengths", "--max-seq-len", 160, "--quiet"]
SYSTEM = ("You are a careful assistant. Answer in plain words, say so when you are not sure, and keep every "
          "answer short unless the user asks for detail. Never invent a source.")


def run_json(ckpt, tmp_path, *args, n=N):
    out = tmp_path / f"run-{len(list(tmp_path.iterdir()))}.json"
    result = run_script("llama3-paged-sharing.py", n, "--ckpt-dir", ckpt, "--json", out, *args)
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text()), result.stdout


def generated(run):
    return [r["generated_ids"] for r in run["requests"]]


@pytest.fixture(scope="module")
def greedy(tiny_ckpt, tmp_path_factory):
    return run_json(tiny_ckpt, tmp_path_factory.mktemp("greedy"), *COMMON)[0]


@pytest.fixture(scope="module")
def samples(tiny_ckpt, tmp_path_factory):
    return run_json(tiny_ckpt, tmp_path_factory.mktemp("samples"), *COMMON, "--samples", 3)


# ---------------------------------------------------------------------------------------------
# End to end.

def test_greedy_samples_equal_the_single_sample_output(greedy, samples):
    run, _ = samples
    assert len(run["requests"]) == 3 * N
    for i, g in enumerate(generated(greedy)):  # samples of a prompt are adjacent
        assert [r["generated_ids"] for r in run["requests"][3 * i:3 * i + 3]] == [g] * 3
        assert all(r["prompt_ids"] == greedy["requests"][i]["prompt_ids"] for r in run["requests"][3 * i:3 * i + 3])
    stats = run["stats"]
    # The prompts (44, 27, 72 tokens) end inside a block: 2 forks each copy it before their first write.
    assert stats["cow_copies"] == 2 * N
    assert stats["shared_blocks_peak"] > 0 and stats["peak_reserved_tokens"] < stats["peak_unshared_tokens"]
    assert stats["preemptions"] == stats["swapped_bytes"] == stats["prefix_hit_tokens"] == 0


def test_report_agrees_with_json_on_sharing(samples):
    run, stdout = samples
    stats = run["stats"]
    shared, unshared = map(int, re.search(r"^shared blocks:\s+(\d+) at the peak \(peak KV reserved without sharing: "
                                          r"(\d+) tokens\)", stdout, re.M).groups())
    assert (shared, unshared) == (stats["shared_blocks_peak"], stats["peak_unshared_tokens"])
    number = lambda label: int(re.search(rf"^{label}:\s+(\d+)", stdout, re.M).group(1))
    assert number("prefix cache hits") == stats["prefix_hit_tokens"]
    assert number("copy-on-write copies") == stats["cow_copies"]
    assert number("swapped") == stats["swapped_bytes"]
    assert number("requests") == stats["requests"] == stats["finished"] == 3 * N
    assert stats["peak_used_tokens"] == max(run["timeline"]["used_tokens"])
    # Sharing stores each shared block once: the tokens held never exceed the room reserved.
    assert all(u <= r for u, r in zip(run["timeline"]["used_tokens"], run["timeline"]["reserved_tokens"]))


def test_one_beam_is_greedy(greedy, tiny_ckpt, tmp_path):
    run, _ = run_json(tiny_ckpt, tmp_path, *COMMON, "--beams", 1)
    assert generated(run) == generated(greedy)


@cpu_path_only
def test_sampling_is_reproducible_and_survives_preemption_by_swap_and_by_recompute(tiny_ckpt, tmp_path):
    sample = ["--ref-lengths", "--max-seq-len", 120, "--quiet", "--samples", 2, "--temperature", 0.9, "--seed", 5,
              "--block-size", 8]
    free, _ = run_json(tiny_ckpt, tmp_path, *sample, n=2)
    outputs = generated(free)
    assert len({tuple(g) for g in outputs}) == 4, "samples at temperature 0.9 should differ"
    assert free["stats"]["preemptions"] == 0
    budget = ["--kv-budget-tokens", 240]  # 30 blocks for 4 samples of 98 to 120 tokens: preemption
    runs = {mode: run_json(tiny_ckpt, tmp_path, *sample, *budget, "--preempt", mode, n=2)[0]
            for mode in ("swap", "recompute")}
    for mode, run in runs.items():
        assert generated(run) == outputs, f"--preempt {mode} changed the samples"
        assert run["stats"]["preemptions"] > 0 and run["stats"]["peak_reserved_tokens"] <= 240
    assert runs["swap"]["stats"]["swapped_bytes"] > 0 and runs["recompute"]["stats"]["swapped_bytes"] == 0


@cpu_path_only
def test_prefix_sharing_changes_no_token(tiny_ckpt, tmp_path):
    shared, _ = run_json(tiny_ckpt, tmp_path, *COMMON, "--system-prompt", SYSTEM, "--prefix-sharing")
    alone, _ = run_json(tiny_ckpt, tmp_path, *COMMON, "--system-prompt", SYSTEM)
    assert generated(shared) == generated(alone)
    prompts = [r["prompt_ids"] for r in shared["requests"]]
    tokenizer = sharing.load_tokenizer(tiny_ckpt / "tokenizer.model")
    # Llama 3's chat format: the system turn right after <|begin_of_text|>, then the user's.
    before_user_text = sharing.encode_chat(tokenizer, "", SYSTEM)[:-5]  # less <|eot_id|> and the assistant header
    assert tokenizer.decode(before_user_text) == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                                                  f"{SYSTEM}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n")
    assert all(p[:len(before_user_text)] == before_user_text for p in prompts) and len(before_user_text) > 32

    def common(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    # All three are admitted together: the first stores its blocks, the others share every full block
    # they have in common with an earlier one (never the block of their last token).
    block = 16
    expected = sum(max(min(common(p, q), len(p) - 1) // block * block for q in prompts[:i]) for i, p in enumerate(prompts) if i)
    assert shared["stats"]["prefix_hit_tokens"] == expected > 0
    assert alone["stats"]["prefix_hit_tokens"] == 0
    assert shared["stats"]["peak_reserved_tokens"] < alone["stats"]["peak_reserved_tokens"]


# ---------------------------------------------------------------------------------------------
# In process: the cache against from-scratch recomputes.

@pytest.fixture(autouse=True, scope="module")
def cpu_path():
    """The in-process tests pick small block sizes: they run the script's CPU path, on any machine."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        pin_cpu_path(monkeypatch, sharing, naive)
        yield


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    model = sharing.load_model(tiny_ckpt)
    model["rope_cos"], model["rope_sin"] = sharing.rope_tables(model, 128)
    return model


@pytest.fixture(scope="module")
def prompts(tiny_ckpt):
    tokenizer = sharing.load_tokenizer(tiny_ckpt / "tokenizer.model")
    return [sharing.encode_chat(tokenizer, text) for text in ("Why is the sky blue?", "Name three prime numbers.")]


def run_generate(model, requests, args, budget_tokens=4096, stop_ids=frozenset()):
    kv_cache, manager = sharing.make_kv_cache(model, budget_tokens, len(requests), args)
    stats = sharing.generate(model, requests, kv_cache, manager, args, set(stop_ids))
    return stats, kv_cache, manager


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
    args = sharing.parse_args(["1", "--samples", "3", "--temperature", "1.5", "--seed", "3", "--block-size", "5",
                               "--max-seq-len", "80"])
    requests = sharing.with_samples([sharing.Request(0, prompts[0], 24, list(prompts[0]))], 3)
    seen = {}

    def read_then_free(req_id):  # every sample's cache, just before it gives its blocks back
        req, blocks = requests[req_id], manager.blocks[req_id]
        cached = len(req.tokens) - 1
        seen[req_id] = (kv_cache[0][:, blocks].flatten(1, 2)[:, :cached], kv_cache[1][:, blocks].flatten(1, 2)[:, :cached])
        free(req_id)

    kv_cache, manager = sharing.make_kv_cache(model, 4096, len(requests), args)
    free, manager.free = manager.free, read_then_free
    stats = sharing.generate(model, requests, kv_cache, manager, args, set())

    assert len({tuple(r.generated_ids) for r in requests}) == 3, "samples at temperature 1.5 should differ"
    # The prompt (16 tokens) ends inside its fourth block: the two forks copy it, and share the three before.
    assert stats["cow_copies"] == 2 and stats["shared_blocks_peak"] >= 2 * 3
    for req in requests:
        k, v, _ = prefill_from_scratch(model, req.tokens[:-1])
        torch.testing.assert_close(seen[req.id][0], k, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(seen[req.id][1], v, rtol=1e-4, atol=1e-5)


def test_samples_do_not_depend_on_the_batch_or_on_their_number(model, prompts):
    """A sample's randomness is its own: a prompt's first two samples are the same alone or beside a third
    sample and another prompt's samples."""
    def sample(prompt_list, count):
        args = sharing.parse_args(["1", "--samples", str(count), "--temperature", "1.0", "--seed", "11",
                                   "--max-seq-len", "80"])
        requests = sharing.with_samples([sharing.Request(i, p, 12, list(p)) for i, p in enumerate(prompt_list)], count)
        run_generate(model, requests, args)
        return [r.generated_ids for r in requests]

    together = sample(prompts, 3)
    assert sample(prompts[:1], 2) == together[:2]


def plain_beam_search(model, prompt, width, done):
    """Beam search by summed log-probability with no cache at all: every beam recomputed from its tokens.
    A beam for which done(tokens) holds keeps its place and score, and stops growing."""
    beams = [(0.0, list(prompt))]
    while not all(done(tokens) for _, tokens in beams if len(tokens) > len(prompt)) or len(beams[0][1]) == len(prompt):
        candidates = []
        for score, tokens in beams:
            if len(tokens) > len(prompt) and done(tokens):
                candidates.append((score, tokens))
                continue
            values, ids = prefill_from_scratch(model, tokens)[2].topk(width)
            candidates += [(score + v, tokens + [t]) for v, t in zip(values.tolist(), ids.tolist())]
        beams = sorted(candidates, key=lambda c: -c[0])[:width]
    return max(beams, key=lambda b: b[0])[1]


@pytest.mark.parametrize("stop", ["length", "stop token"])
def test_beam_search_matches_a_search_that_recomputes_every_beam(model, prompts, stop):
    width, max_seq_len = 3, 64
    if stop == "length":
        length = 7
        done = lambda tokens, p: len(tokens) - len(p) >= length
        stop_ids, ref_length = set(), length
    else:
        # A stop token that some beams (not all) produce: the second-best first token.
        stop_ids = {prefill_from_scratch(model, prompts[0])[2].topk(2).indices[1].item()}
        done = lambda tokens, p: tokens[-1] in stop_ids or len(tokens) >= len(p) + 8
        ref_length, max_seq_len = None, len(prompts[0]) + 8
    args = sharing.parse_args(["2", "--beams", str(width), "--block-size", "4", "--max-seq-len", str(max_seq_len)])
    requests = [sharing.Request(i, p, ref_length, list(p)) for i, p in enumerate(prompts)]
    if stop != "length":
        requests = requests[:1]
    stats, _, manager = run_generate(model, requests, args, stop_ids=stop_ids)
    for req in requests:
        assert req.done
        assert req.tokens == plain_beam_search(model, req.prompt_ids, width, lambda t: done(t, req.prompt_ids))
    # The beams shared their blocks (the prompt's, and each other's history) and copied on write.
    assert stats["shared_blocks_peak"] > 0 and stats["cow_copies"] > 0
    assert stats["peak_reserved_tokens"] < stats["peak_unshared_tokens"]
    assert sorted(manager.free_blocks) == list(range(manager.num_blocks)) and manager.saved_blocks == 0


def test_beam_search_under_preemption_starts_over_and_gives_the_same_answer(model, prompts):
    """A preempted beam search (its beams move together) starts over from its prompt, after the older one."""
    args = sharing.parse_args(["2", "--beams", "3", "--block-size", "4", "--max-seq-len", "64"])
    answers = []
    for budget in (4096, 48):  # 12 blocks: one prompt's 3 beams of 26 tokens fit (in 10), both don't
        requests = [sharing.Request(i, p, 10, list(p)) for i, p in enumerate(prompts)]
        stats, _, _ = run_generate(model, requests, args, budget_tokens=budget)
        answers.append([r.tokens for r in requests])
        assert (stats["preemptions"] > 0) == (budget == 48)
    assert answers[0] == answers[1]
    requests = [sharing.Request(i, p, 10, list(p)) for i, p in enumerate(prompts)]
    with pytest.raises(SystemExit, match="cannot hold request 0, searching with 3 beams"):
        run_generate(model, requests, args, budget_tokens=32)  # 8 blocks: one prompt's beams don't fit


def test_a_samples_group_that_can_never_fit_gets_one_line_with_the_blocks_it_needs(model):
    """A --samples group's first request is admitted with room for its prompt alone (its forks decode from the
    next step on): 48 tokens at block 16 need 3 blocks, not the 4 that 49 tokens would, and a budget of 2 never
    holds them."""
    args = sharing.parse_args(["1", "--samples", "2", "--temperature", "1", "--block-size", "16"])
    requests = sharing.with_samples([sharing.Request(0, list(range(48)), 5, list(range(48)))], 2)
    with pytest.raises(SystemExit, match="cannot hold request 0, which needs 3$"):
        run_generate(model, requests, args, budget_tokens=32)


# ---------------------------------------------------------------------------------------------
# Swap and prefix sharing, in process.

def test_swap_gives_a_request_back_the_k_and_v_it_had(model, prompts, monkeypatch):
    """Every request swapped out finds, when it next runs, its cached K and V as they were, block by block."""
    args = sharing.parse_args(["2", "--block-size", "4", "--max-seq-len", "80", "--preempt", "swap"])
    requests = [sharing.Request(i, p, 30, list(p)) for i, p in enumerate(prompts)]
    kv_cache, manager = sharing.make_kv_cache(model, 72, len(requests), args)  # 18 blocks: too few for both
    had, checked = {}, []
    real_preempt, real_forward = sharing.preempt, sharing.forward

    def preempt(running, *rest):
        victim = running[-1]
        cached = len(victim.tokens) - 1
        had[victim.id] = [cache[:, manager.blocks[victim.id]].flatten(1, 2)[:, :cached].clone() for cache in kv_cache]
        return real_preempt(running, *rest)

    def forward(*call, **kwargs):  # the next model call after a swapped request is back
        for req_id in [r for r in had if r in manager.blocks]:
            for cache, before in zip(kv_cache, had.pop(req_id)):
                for j, block in enumerate(manager.blocks[req_id][:-(-before.shape[1] // 4)]):
                    assert torch.equal(cache[:, block, :before.shape[1] - 4 * j], before[:, 4 * j:4 * j + 4]), \
                        f"request {req_id}'s block {j} came back changed"
            checked.append(req_id)
        return real_forward(*call, **kwargs)

    monkeypatch.setattr(sharing, "preempt", preempt)
    monkeypatch.setattr(sharing, "forward", forward)
    stats = sharing.generate(model, requests, kv_cache, manager, args, set())
    assert stats["preemptions"] > 0 and stats["swapped_bytes"] > 0 and checked and not had


P, Q, R, S = [1000, 1001, 1002, 1003], [2000, 2001, 2002, 2003], [3000, 3001, 3002, 3003], [4000, 4001, 4002, 4003]


def test_prefix_lookup_follows_the_chain_of_blocks():
    """Block size 4. After [P, Q, 7] and [R, Q, 8] are cached, [R, Q, S, 9] finds R and the Q that followed R, not
    the Q that followed P: a block's K and V depend on every token before it, not only its own."""
    m = sharing.KVCacheManager(num_blocks=20, block_size=4, num_rows=8, max_blocks_per_request=8, device="cpu",
                               share_prefixes=True)
    m.allocate(0, 10, P + Q + [7])
    assert m.cached_tokens(R + Q + [8]) == 0  # its first block is not R
    m.allocate(1, 10, R + Q + [8])
    assert m.blocks[1][1] != m.blocks[0][1], "Q after R must be a block of its own"
    assert m.cached_tokens(R + Q + S + [9]) == 8 and m.cached_tokens(P + Q + S + [9]) == 8
    m.allocate(2, 14, R + Q + S + [9])
    assert m.blocks[2][:2] == m.blocks[1][:2] and m.blocks[2][2] not in m.blocks[0] + m.blocks[1]
    assert m.cached_tokens(Q + Q + [1]) == 0 and m.cached_tokens(P + P + [1]) == 4
    for req_id in (0, 1, 2):
        m.free(req_id)
    assert not m.prefix and not m.prefix_key and sorted(m.free_blocks) == list(range(20))


def test_prefix_sharing_after_different_blocks_changes_no_token(model):
    """The same three prompts generate the same tokens with and without prefix sharing; the third finds 8 tokens."""
    prompts = [P + Q + [7], R + Q + [8], R + Q + S + [9]]
    runs = []
    for options in ([], ["--prefix-sharing"]):
        args = sharing.parse_args(["3", "--block-size", "4", "--max-seq-len", "64", *options])
        requests = [sharing.Request(i, p, 12, list(p)) for i, p in enumerate(prompts)]
        stats, _, _ = run_generate(model, requests, args)
        runs.append(([r.tokens for r in requests], stats["prefix_hit_tokens"]))
    assert runs[0][0] == runs[1][0]
    assert (runs[0][1], runs[1][1]) == (0, 8)


# ---------------------------------------------------------------------------------------------
# The manager, step by step.

def test_fork_copy_on_write_and_ref_counts():
    """block_size 4: a prompt of 6 tokens forked twice, as --samples 3 does. All three write their 7th token into the
    shared, partly filled block: asked in turn, the first two get copies of it and the last keeps it. The full
    block stays shared; a block goes back to the free list only when its last holder lets go."""
    m = sharing.KVCacheManager(num_blocks=8, block_size=4, num_rows=24, max_blocks_per_request=4, device="cpu")
    m.allocate("p", 6)  # a group's root, prefilled; it decodes from the next step on, with its forks
    full, partial = m.blocks["p"]
    m.fork("p", "a")
    m.fork("p", "b")
    assert m.ref_count[full] == m.ref_count[partial] == 3 and m.saved_blocks == 4 and len(m.free_blocks) == 6
    assert not any(m.needs_block(r, 7) for r in "pab") and all(m.needs_copy(r, 7) for r in "pab")
    for r in "pab":  # as the loop's grow step does, oldest first
        if m.needs_copy(r, 7):
            m.copy_on_write(r)
    copies = dict(m.copies)
    assert list(copies.values()) == [partial, partial] and partial not in copies
    assert m.blocks["p"] == [full, list(copies)[0]] and m.blocks["a"] == [full, list(copies)[1]]
    assert m.blocks["b"] == [full, partial]
    assert m.ref_count[full] == 3 and m.ref_count[partial] == 1 and m.saved_blocks == 2
    assert m.block_tables(torch.tensor([m.rows[r] for r in "pab"]), 2).tolist() == [m.blocks[r] for r in "pab"]
    m.free("p")  # the root finishes: its copy goes back, the full block stays with the forks
    assert m.blocks.keys() == {"a", "b"} and m.ref_count[full] == 2 and m.saved_blocks == 1 and len(m.free_blocks) == 5
    assert not any(m.needs_block(r, 8) for r in "ab")  # token 8 fills the second block
    assert all(m.needs_block(r, 9) for r in "ab")      # token 9 starts a third: nothing to copy
    assert not any(m.needs_copy(r, n) for r in "ab" for n in (8, 9))
    m.copies.clear()
    for r in "ab":
        m.append_block(r)
    assert not m.copies and len(m.blocks["a"]) == len(m.blocks["b"]) == 3
    m.free("a")
    assert m.ref_count[full] == 1 and m.saved_blocks == 0
    m.free("b")
    assert sorted(m.free_blocks) == list(range(8)) and m.ref_count == [0] * 8 and sorted(m.free_rows) == list(range(24))


def test_the_readme_example_a_37_token_prompt_with_4_samples(model):
    """README section 5, in generate(): at block 16 the prompt fills 3 blocks, held by all 4 samples (reference
    count 4) once the forks join; at the first decode step samples 0, 1 and 2, asking in that order, each get a
    copy of the third, and sample 3, asking last, keeps the original. The first two blocks stay shared to the end."""
    args = sharing.parse_args(["1", "--samples", "4", "--temperature", "1", "--block-size", "16"])
    prompt = list(range(100, 137))
    requests = sharing.with_samples([sharing.Request(0, prompt, 3, list(prompt))], 4)
    kv_cache, manager = sharing.make_kv_cache(model, 4096, 1, args)
    copied, held = [], {}
    fork, copy_on_write, free = manager.fork, manager.copy_on_write, manager.free

    def trace_copy(req_id):
        if not copied:  # the first copy: every fork has joined
            copied.append((list(manager.blocks[0]), [manager.ref_count[b] for b in manager.blocks[0]]))
        copied.append(req_id)
        copy_on_write(req_id)

    def trace_free(req_id):
        held[req_id] = list(manager.blocks[req_id])
        free(req_id)

    manager.copy_on_write, manager.free = trace_copy, trace_free
    stats = sharing.generate(model, requests, kv_cache, manager, args, set())
    (prompt_blocks, ref_counts), *copiers = copied
    assert ref_counts == [4, 4, 4] and copiers == [0, 1, 2] and stats["cow_copies"] == 3
    assert held[3] == prompt_blocks, "the last to ask keeps the prompt's blocks"
    assert [held[r][:2] for r in range(3)] == [prompt_blocks[:2]] * 3
    assert len({held[r][2] for r in range(4)}) == 4, "each sample's third block is its own"


def test_fork_at_a_block_boundary_shares_only_full_blocks():
    """A beam forked when its tokens fill their blocks exactly shares them all and copies nothing: its next token
    starts a block of its own."""
    m = sharing.KVCacheManager(num_blocks=8, block_size=4, num_rows=16, max_blocks_per_request=4, device="cpu")
    m.allocate("p", 8)
    m.fork("p", "c")
    for r in "pc":
        assert m.needs_block(r, 9) and not m.needs_copy(r, 9)
        m.append_block(r)
    assert not m.copies and m.blocks["p"][:2] == m.blocks["c"][:2] and m.blocks["p"][2] != m.blocks["c"][2]
    assert m.saved_blocks == 2


def test_prefix_sharing_reuses_full_blocks_only():
    """Full blocks of a prompt that match, with everything before them, a block in the cache are shared; the block
    holding the prompt's last token never is (its prefill gives the next token); a block leaves the index when it
    goes back to the free list."""
    m = sharing.KVCacheManager(num_blocks=10, block_size=4, num_rows=4, max_blocks_per_request=4, device="cpu",
                               share_prefixes=True)
    system = [1, 2, 3, 4, 5, 6, 7, 8, 9]  # two full blocks and one token more
    assert m.cached_tokens(system + [10]) == 0
    m.allocate("a", 11, system + [10])    # prefill 10 tokens, decode 1: 3 blocks, 2 of them full
    a = list(m.blocks["a"])
    assert m.cached_tokens(system + [11, 12]) == 8
    assert m.cached_tokens(system[:8]) == 4  # its last token's block is computed, not shared
    assert m.cached_tokens([1, 2, 3, 4, 0, 6, 7, 8, 9]) == 4
    assert m.cached_tokens([0, 2, 3, 4, 5, 6, 7, 8, 9]) == 0
    free_before = len(m.free_blocks)
    m.allocate("b", 12, system + [11, 12])  # 3 blocks, 2 of them shared
    assert m.blocks["b"][:2] == a[:2] and free_before - len(m.free_blocks) == 1
    assert [m.ref_count[x] for x in a] == [2, 2, 1] and m.saved_blocks == 2
    m.free("a")
    assert a[2] in m.free_blocks and a[0] not in m.free_blocks and m.cached_tokens(system + [10]) == 8
    m.free("b")
    assert m.cached_tokens(system + [10]) == 0 and not m.prefix and not m.prefix_key
    assert sorted(m.free_blocks) == list(range(10)) and m.saved_blocks == 0


def test_no_prefix_sharing_without_the_option():
    m = sharing.KVCacheManager(num_blocks=10, block_size=4, num_rows=4, max_blocks_per_request=4, device="cpu")
    m.allocate("a", 11, list(range(10)))
    assert m.cached_tokens(list(range(12))) == 0
    m.allocate("b", 13, list(range(12)))
    assert not set(m.blocks["a"]) & set(m.blocks["b"])


# ---------------------------------------------------------------------------------------------
# Transient memory at Llama-3-8B's shape, counted as on a GPU (tools/memory_tally.py), and sampling's odds.

LLAMA3_8B = {"layers": [None] * 32, "n_kv_heads": 8, "head_dim": 128}  # what make_kv_cache reads of a model
BLOCK_BYTES = 32 * 256 * 8 * 128 * 2  # K (or V) of one 256-token block in all 32 layers, in bf16: 16 MiB


class GPUOnMeta(MemoryTally):
    """The meta device stands for a GPU: tensors there take no memory, whatever their size, and only they are
    counted. Copies between it and the CPU (the host) move no data; as CUDA's copy_ does, a copy whose side on the
    device is not contiguous goes through a contiguous temporary of that side, counted while the copy runs."""

    def __init__(self):
        super().__init__(device="meta")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.copy_.default and {args[0].device.type, args[1].device.type} == {"meta", "cpu"}:
            on_device = args[0] if args[0].device.type == "meta" else args[1]
            temporary = 0 if on_device.is_contiguous() else on_device.numel() * on_device.element_size()
            held = sum(size for ref, size in self.live.values() if not ref.expired())
            self.peak = max(self.peak, held + temporary)
            return args[0]
        if func is torch.ops.aten._to_copy.default and args[0].device.type == "meta" and kwargs.get("device") == \
                torch.device("cpu"):  # .cpu(): an empty host tensor of the same shape
            return super().__torch_dispatch__(fake_copy_to_host, types, args, kwargs)
        return super().__torch_dispatch__(func, types, args, kwargs)


def fake_copy_to_host(tensor, dtype=None, **_):
    return torch.empty(tensor.shape, dtype=dtype or tensor.dtype)


def stand_in_forward(model, tokens, *rest, **kwargs):
    return torch.zeros(tokens.shape[0], 8)  # logits over 8 tokens, on the host; reads and writes no cache


def generate_at_8b_shape(monkeypatch, prompts, ref_length, budget_tokens, options):
    """generate() with Llama-3-8B's KV cache at block 256 in bf16, on the meta device, and a stand-in for the
    model. Returns its stats and the most bytes its own tensors held at once on the device."""
    for name, value in (("DEVICE", torch.device("meta")), ("DTYPE", torch.bfloat16), ("forward", stand_in_forward)):
        monkeypatch.setattr(sharing, name, value)
    args = sharing.parse_args(["1", "--block-size", "256", *options])
    requests = [sharing.Request(i, p, ref_length, list(p)) for i, p in enumerate(prompts)]
    kv_cache, manager = sharing.make_kv_cache(LLAMA3_8B, budget_tokens, len(requests), args)
    requests = sharing.with_samples(requests, args.samples)
    with GPUOnMeta() as tally:
        stats = sharing.generate(None, requests, kv_cache, manager, args, set())
    assert all(r.done for r in requests)
    return stats, tally.peak


def test_copy_on_write_takes_no_device_memory_however_many_copies(monkeypatch):
    """8 prompts of 37 tokens with --samples 4: the first decode step copies 24 blocks (3 per prompt), 384 MiB of
    K if they were gathered at once. Each copy is one block into another, in place: nothing is allocated for it."""
    stats, peak = generate_at_8b_shape(monkeypatch, [[p] * 37 for p in range(8)], 3, 40 * 256,
                                       ["--samples", "4", "--temperature", "1"])
    assert stats["cow_copies"] == 24 and stats["preemptions"] == 0
    assert peak < 2**20, f"copy-on-write held {peak / 2**20:.1f} MiB on the device (one block is 16 MiB)"


@pytest.mark.parametrize("prompt_tokens", [1000, 4000])
def test_swap_holds_at_most_one_block_on_the_device_however_long_the_request(monkeypatch, prompt_tokens):
    """Two requests fill the pool; when the older needs another block, the newer is swapped out (all its blocks but
    none of its tokens lost), and back in when the older finishes. Out and in, the device holds at most one block
    in all layers of the copy at once: 16 MiB (and a few bytes of block table), whether the request has 4 blocks
    or 16."""
    blocks = -(-(prompt_tokens + 1) // 256)
    generate_tokens = blocks * 256 - prompt_tokens + 4  # past the last of its blocks
    stats, peak = generate_at_8b_shape(monkeypatch, [[1] * prompt_tokens, [2] * prompt_tokens], generate_tokens,
                                       2 * blocks * 256, ["--preempt", "swap"])
    assert stats["preemptions"] == 1 and stats["swapped_bytes"] == 2 * 2 * blocks * BLOCK_BYTES  # K and V, out and in
    assert peak <= BLOCK_BYTES + 2**10, f"swap held {peak / BLOCK_BYTES:.2f} blocks' K or V on the device at once"


def test_sampling_memory_does_not_grow_with_the_batch():
    """pick_tokens on bf16 logits over Llama 3's 128,256 tokens: its temporaries stay under 40 MiB for 64 rows and
    for 512 alike (a float32 copy of 512 rows alone is 263 MB). Each row's token is the one it gets alone."""
    vocab, peaks = 128_256, []
    args = sharing.parse_args(["1", "--samples", "2", "--temperature", "0.8"])
    for rows in (64, 512):
        logits = torch.zeros(rows, vocab, dtype=torch.bfloat16)  # all tokens alike: the token follows the draw
        batch = [sharing.Request(i, [1, 2], None, [1, 2, 3]) for i in range(rows)]
        with MemoryTally() as tally:
            tokens = sharing.pick_tokens(logits, batch, args)
        peaks.append(tally.peak)
        for i in (0, 31, 32, rows - 1):
            assert sharing.pick_tokens(logits[i:i + 1], batch[i:i + 1], args) == tokens[i:i + 1]
    assert max(peaks) <= 40 * 2**20, f"pick_tokens held {[f'{p / 2**20:.0f} MiB' for p in peaks]} at 64 and 512 rows"


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampling_draws_each_token_with_its_probability(temperature):
    """Tokens 0, 4 and 9 of 10 with probabilities 0.2, 0.3 and 0.5, the others 0; at a temperature T the odds are
    these to the power 1 / T, normalized. 3000 draws, at 3000 positions: the counts pass a chi-square test (2
    degrees of freedom, p > 0.001) and no other token is ever drawn."""
    p = torch.tensor([0.2, 0, 0, 0, 0.3, 0, 0, 0, 0, 0.5], dtype=torch.float64)
    odds = p ** (1 / temperature) / (p ** (1 / temperature)).sum()
    args = sharing.parse_args(["1", "--temperature", str(temperature), "--seed", "7"])
    batch = [sharing.Request(0, [1], None, [1] * position) for position in range(1, 3001)]
    tokens = sharing.pick_tokens(p.log().float().expand(len(batch), -1), batch, args)
    counts = torch.bincount(torch.tensor(tokens), minlength=10).double()
    assert counts[odds == 0].sum() == 0, f"drew tokens of probability 0: {counts.tolist()}"
    expected = odds[odds > 0] * len(batch)
    chi2 = float(((counts[odds > 0] - expected) ** 2 / expected).sum())
    assert chi2 < 13.82, f"counts {counts[odds > 0].tolist()} against {expected.tolist()}: chi-square {chi2:.1f}"
