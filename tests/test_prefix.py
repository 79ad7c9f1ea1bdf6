"""llama3-paged-prefix.py: --system-prompt and --prefix-sharing, full blocks found again by their tokens.

Against llama3-paged.py, an independent implementation of the same schedule that shares nothing: without the
option the rung generates its tokens, with and without preemption, and with it the same tokens again, blocks
found in the index or not. The report's figures (tokens found, those found in blocks nobody held, blocks shared,
references saved, and the tokens held and reserved) are computed here from the prompts' tokens. The manager's
reference counts, index and eviction order are checked step by step on small cases worked out by hand, and at
every model call of random workloads on the toy model that checks every cache read.
"""
import contextlib
import io
import json
import random
import re
from collections import Counter

import pytest
import torch

import flash_attn_standin
from conftest import pin_cpu_path
from load_scripts import load_script
from toy_model import VOCAB, check_tokens, toy_forward, toy_model

prefix = load_script("prefix")
paged = load_script("paged")
SYSTEM = ("You are a careful assistant. Answer in plain words, say so when you are not sure, and keep every "
          "answer short unless the user asks for detail. Never invent a source.")
USER = ("Why is the sky blue?", "Name three prime numbers.", "Name three prime numbers, and say why they are prime.")


@pytest.fixture(autouse=True, scope="module")
def cpu_path():
    """The in-process tests pick small block sizes: they run the scripts' CPU path, on any machine."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        pin_cpu_path(monkeypatch, prefix, paged)
        yield


@pytest.fixture(scope="module")
def tokenizer(tiny_ckpt):
    return prefix.load_tokenizer(tiny_ckpt / "tokenizer.model")


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    model = prefix.load_model(tiny_ckpt)
    model["rope_cos"], model["rope_sin"] = prefix.rope_tables(model, 128)
    return model


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Three prompts after the same system prompt; the last two also share the start of their user turn."""
    return [prefix.encode_chat(tokenizer, text, SYSTEM) for text in USER]


def common(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def found_blocks(prompts, block_size, earlier=()):
    """For each prompt, the full blocks of its start that an earlier prompt (or one of `earlier`) has: never the
    block of its last token."""
    return [max([min(common(p, q), len(p) - 1) // block_size for q in [*earlier, *prompts[:i]]], default=0)
            for i, p in enumerate(prompts)]


def distinct_blocks(prompts, found, block_size):
    """How many distinct blocks the found ones are: one for each distinct start of a prompt, in whole blocks."""
    return len({tuple(p[:block_size * k]) for p, n in zip(prompts, found) for k in range(1, n + 1)})


def run_generate(module, model, prompts, options=(), budget_tokens=4096, ref_length=12, cache=None):
    """generate() of a script at block 4 on these prompts (on the KV cache and manager `cache`, if given). Returns
    each request's tokens, the stats and the (kv_cache, manager)."""
    args = module.parse_args([str(len(prompts)), "--block-size", "4", "--max-seq-len", "128", *options])
    requests = [module.Request(i, p, ref_length, list(p)) for i, p in enumerate(prompts)]
    cache = cache or module.make_kv_cache(model, budget_tokens, len(requests), args)
    stats = module.generate(model, requests, *cache, args, set())
    assert all(r.done for r in requests)
    return [r.tokens for r in requests], stats, cache


@pytest.mark.parametrize("budget", [4096, 120])  # 120: 30 blocks, for 3 requests of 68 to 75 tokens: preemption
def test_without_prefix_sharing_it_does_what_llama3_paged_does(model, prompts, budget):
    tokens, stats, _ = run_generate(prefix, model, prompts, budget_tokens=budget)
    parent_tokens, parent_stats, _ = run_generate(paged, model, prompts, budget_tokens=budget)
    assert tokens == parent_tokens and (budget == 120) == (parent_stats["preemptions"] > 0)
    same = ("decode_steps", "preemptions", "peak_reserved_tokens", "peak_used_tokens", "reserved_at_peak_use")
    assert {k: stats[k] for k in same} == {k: parent_stats[k] for k in same}
    assert stats["prefix_hit_tokens"] == stats["shared_blocks_peak"] == stats["saved_blocks_peak"] == 0


@pytest.mark.parametrize("budget", [4096, 96])  # 96: 24 blocks, with sharing too few: a preemption
def test_prefix_sharing_changes_no_token(model, prompts, budget):
    """With preemption too: a recomputed request finds its own prompt's blocks again, held by nobody."""
    tokens, stats, (_, manager) = run_generate(prefix, model, prompts, ["--prefix-sharing"], budget_tokens=budget)
    assert tokens == run_generate(paged, model, prompts, budget_tokens=budget)[0]
    assert stats["prefix_hit_tokens"] >= 4 * sum(found_blocks(prompts, 4)) > 0
    assert (budget == 96) == (stats["preemptions"] > 0) == (stats["prefix_unheld_hit_tokens"] > 0)
    assert manager.ref_count == [0] * manager.num_blocks and manager.saved_blocks == manager.shared_blocks == 0


def test_the_figures_when_all_start_together(model, prompts):
    """Room for all three at once: each finds what an earlier one stored. At the first decode step all hold their
    blocks; the tokens held count a shared block once, and the blocks reserved are the ones held."""
    _, stats, _ = run_generate(prefix, model, prompts, ["--prefix-sharing"])
    found = found_blocks(prompts, 4)
    assert found[0] == 0 and all(found[1:]) and found[2] > found[1]  # the third shares its user turn's start too
    assert stats["preemptions"] == stats["prefix_unheld_hit_tokens"] == 0
    assert stats["prefix_hit_tokens"] == 4 * sum(found)
    assert stats["shared_blocks_peak"] == distinct_blocks(prompts, found, 4) < stats["saved_blocks_peak"] == sum(found)
    reserved, used = stats["timeline"][0]  # after the first decode: each prompt and its first token cached
    assert reserved == 4 * (sum(-(-(len(p) + 1) // 4) for p in prompts) - sum(found))
    assert used == sum(len(p) + 1 for p in prompts) - 4 * sum(found)


def test_a_system_prompt_survives_a_gap_between_requests(model, prompts):
    """The first request runs alone to its end and lets go of its blocks; the second, run afterwards on the same
    cache, still finds the full blocks of the system prompt's start, held by nobody, and generates what it does in
    a cache of its own."""
    _, _, cache = run_generate(prefix, model, prompts[:1], ["--prefix-sharing"])
    assert cache[1].num_free() == cache[1].num_blocks and cache[1].unheld
    tokens, stats, _ = run_generate(prefix, model, prompts[1:2], ["--prefix-sharing"], cache=cache)
    assert tokens == run_generate(paged, model, prompts[1:2])[0]
    found = found_blocks(prompts[1:2], 4, earlier=prompts[:1])[0]
    assert found > 0 and stats["prefix_unheld_hit_tokens"] == stats["prefix_hit_tokens"] == 4 * found


# ---------------------------------------------------------------------------------------------
# End to end: the report's lines, and Llama 3's chat format with a system turn.

def run_main(tiny_ckpt, tmp_path, capsys, *options):
    out = tmp_path / f"run-{len(list(tmp_path.iterdir()))}.json"
    prefix.main(["3", "--ckpt-dir", str(tiny_ckpt), "--ref-lengths", "--max-seq-len", "140", "--quiet",
                 "--json", str(out), "--system-prompt", SYSTEM, *options])
    return json.loads(out.read_text()), capsys.readouterr().out


def test_the_report_counts_what_was_found_and_shared(tiny_ckpt, tmp_path, capsys, tokenizer):
    shared, stdout = run_main(tiny_ckpt, tmp_path, capsys, "--prefix-sharing")
    alone, alone_stdout = run_main(tiny_ckpt, tmp_path, capsys)
    assert [r["generated_ids"] for r in shared["requests"]] == [r["generated_ids"] for r in alone["requests"]]
    prompts = [r["prompt_ids"] for r in shared["requests"]]
    # Llama 3's chat format: the system turn right after <|begin_of_text|>, then the user's.
    before_user_text = prefix.encode_chat(tokenizer, "", SYSTEM)[:-5]  # less <|eot_id|> and the assistant header
    assert tokenizer.decode(before_user_text) == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                                                  f"{SYSTEM}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n")
    assert all(p[:len(before_user_text)] == before_user_text for p in prompts) and len(before_user_text) > 32
    found = found_blocks(prompts, 16)  # all three admitted together, at the CPU's block size
    hits, unheld = map(int, re.search(r"^prefix cache hits:\s+(\d+) tokens found through the prefix index, (\d+) of "
                                      r"them in blocks no request held$", stdout, re.M).groups())
    blocks = int(re.search(r"^blocks shared:\s+(\d+) at most at once, each held by more than one request$", stdout,
                           re.M).group(1))
    saved = int(re.search(r"^references saved:\s+(\d+) blocks at most at once", stdout, re.M).group(1))
    assert (hits, unheld, blocks, saved) == (16 * sum(found), 0, distinct_blocks(prompts, found, 16), sum(found))
    stats = shared["stats"]
    assert hits > 0 and (hits, blocks, saved) == (stats["prefix_hit_tokens"], stats["shared_blocks_peak"],
                                                  stats["saved_blocks_peak"])
    assert stats["peak_reserved_tokens"] < alone["stats"]["peak_reserved_tokens"]
    assert "prefix cache hits" not in alone_stdout and alone["stats"]["prefix_hit_tokens"] == 0


# ---------------------------------------------------------------------------------------------
# The manager, step by step.

P, Q, R, S = [1000, 1001, 1002, 1003], [2000, 2001, 2002, 2003], [3000, 3001, 3002, 3003], [4000, 4001, 4002, 4003]


def small_manager(num_blocks, share_prefixes=True):
    return prefix.KVCacheManager(num_blocks=num_blocks, block_size=4, num_requests=8, max_blocks_per_request=8,
                                 device="cpu", share_prefixes=share_prefixes)


def test_prefix_lookup_follows_the_chain_of_blocks():
    """Block size 4. After [P, Q, 7] and [R, Q, 8] are cached, [R, Q, S, 9] finds R and the Q that followed R, not
    the Q that followed P: a block's K and V depend on every token before it, not only its own."""
    m = small_manager(20)
    m.allocate(0, 10, P + Q + [7])
    assert m.cached_tokens(R + Q + [8]) == 0  # its first block is not R
    m.allocate(1, 10, R + Q + [8])
    assert m.blocks[1][1] != m.blocks[0][1], "Q after R must be a block of its own"
    assert m.cached_tokens(R + Q + S + [9]) == 8 and m.cached_tokens(P + Q + S + [9]) == 8
    m.allocate(2, 14, R + Q + S + [9])
    assert m.blocks[2][:2] == m.blocks[1][:2] and m.blocks[2][2] not in m.blocks[0] + m.blocks[1]
    assert m.cached_tokens(Q + Q + [1]) == 0 and m.cached_tokens(P + P + [1]) == 4
    assert m.shared_blocks == 2 and m.saved_blocks == 2
    for req_id in (0, 1, 2):
        m.free(req_id)
    assert m.num_free() == 20 and m.ref_count == [0] * 20 and m.shared_blocks == m.saved_blocks == 0
    assert len(m.unheld) == len(m.prefix) == 5 and m.cached_tokens(R + Q + S + [9]) == 12  # P, Q; R, Q, S


def test_prefix_sharing_reuses_full_blocks_only():
    """Full blocks of a prompt that match, with everything before them, a block in the cache are shared; the block
    holding the prompt's last token never is (its prefill gives the next token). When the last holder lets go, an
    indexed block stays findable, held by nobody; the others go back to the free list."""
    m = small_manager(10)
    system = [1, 2, 3, 4, 5, 6, 7, 8, 9]  # two full blocks and one token more
    assert m.cached_tokens(system + [10]) == 0
    m.allocate("a", 11, system + [10])    # prefill 10 tokens, decode 1: 3 blocks, 2 of them full
    a = list(m.blocks["a"])
    assert m.cached_tokens(system + [11, 12]) == 8
    assert m.cached_tokens(system[:8]) == 4  # its last token's block is computed, not shared
    assert m.cached_tokens([1, 2, 3, 4, 0, 6, 7, 8, 9]) == 4
    assert m.cached_tokens([0, 2, 3, 4, 5, 6, 7, 8, 9]) == 0
    assert m.can_allocate(36, system + [11, 12]) and not m.can_allocate(37, system + [11, 12])  # 7 free, 2 found
    m.allocate("b", 12, system + [11, 12])  # 3 blocks, 2 of them shared
    assert m.blocks["b"][:2] == a[:2] and m.num_free() == 10 - 4
    assert [m.ref_count[x] for x in a] == [2, 2, 1] and m.saved_blocks == m.shared_blocks == 2
    m.free("a")
    assert a[2] in m.free_blocks and a[0] not in m.free_blocks and m.cached_tokens(system + [10]) == 8
    assert m.saved_blocks == m.shared_blocks == 0 and not m.unheld
    m.free("b")
    assert m.cached_tokens(system + [10]) == 8 and list(m.unheld) == [a[1], a[0]] and len(m.free_blocks) == 8
    assert m.num_free() == 10 and m.ref_count == [0] * 10
    assert m.can_allocate(4 * 10, system + [10]) and not m.can_allocate(4 * 11, system + [10])
    m.allocate("c", 11, system + [10])  # finds both again: they are held, no longer unheld
    assert m.blocks["c"][:2] == a[:2] and not m.unheld and m.found_unheld_blocks == 2 and m.found_blocks == 4


def test_unheld_blocks_are_taken_last_and_least_recently_let_go_first():
    """4 blocks. [P, Q, 7] is cached and let go: P and Q stay indexed, held by nobody, Q let go first (a request
    lets go of its last block first). A request of 12 other tokens takes the 2 free blocks, then Q's, which leaves
    the index: P is found still, Q no more."""
    m = small_manager(4)
    m.allocate("a", 10, P + Q + [7])
    p_block, q_block, last = m.blocks["a"]
    m.free("a")
    assert list(m.unheld) == [q_block, p_block] and list(m.free_blocks) == [3, last]
    m.allocate("b", 12)
    assert m.blocks["b"] == [3, last, q_block] and list(m.unheld) == [p_block]
    assert m.cached_tokens(P + Q + [7]) == 4 and q_block not in m.prefix_key and m.num_free() == 1
    m.append_block("b")  # and now P's, the last one
    assert m.blocks["b"][-1] == p_block and not m.prefix and not m.prefix_key and m.num_free() == 0
    m.free("b")
    assert sorted(m.free_blocks) == [0, 1, 2, 3] and not m.unheld


def test_no_prefix_sharing_without_the_option():
    m = small_manager(10, share_prefixes=False)
    m.allocate("a", 11, list(range(10)))
    assert m.cached_tokens(list(range(12))) == 0
    m.allocate("b", 13, list(range(12)))
    assert not set(m.blocks["a"]) & set(m.blocks["b"])
    m.free("a")
    assert not m.unheld and len(m.free_blocks) == 10 - 4


def test_prefix_sharing_after_different_blocks_changes_no_token(model):
    """The same three prompts generate the same tokens with and without prefix sharing; the third finds 8 tokens."""
    prompts = [P + Q + [7], R + Q + [8], R + Q + S + [9]]
    runs = []
    for options in ([], ["--prefix-sharing"]):
        tokens, stats, _ = run_generate(prefix, model, prompts, options)
        runs.append((tokens, stats["prefix_hit_tokens"]))
    assert runs[0][0] == runs[1][0] == run_generate(paged, model, prompts)[0]
    assert (runs[0][1], runs[1][1]) == (0, 8)


# ---------------------------------------------------------------------------------------------
# Random workloads on the toy model of tests/toy_model.py, whose cache holds a hash of each request's whole prefix.

RANDOM_RUNS = {}  # seed -> stats, to check that the random runs find unheld blocks, evict and preempt


def check_manager(m):
    """Every block is held (ref_count = its holders), free, or indexed and held by nobody: exactly one of these."""
    held = Counter(b for blocks in m.blocks.values() for b in blocks)
    assert m.ref_count == [held[b] for b in range(m.num_blocks)], "ref_count is not the holders"
    assert m.saved_blocks == sum(n - 1 for n in held.values()) and m.shared_blocks == sum(n > 1 for n in held.values())
    free, unheld = set(m.free_blocks), set(m.unheld)
    assert len(free) + len(unheld) + len(held) == m.num_blocks and not (free | unheld) & set(held) | free & unheld
    assert unheld <= set(m.prefix_key) and set(m.prefix.values()) == set(m.prefix_key)


@pytest.mark.parametrize("seed", range(30))
def test_prefix_sharing_on_random_workloads(seed, monkeypatch):
    """Prompts cut from three templates (from two tokens only for half the seeds, so that equal blocks follow
    unequal ones), in a pool that holds the longest and rarely all: every token follows from its request's own
    history (a block found in the index that holds other tokens changes what follows), and every block comes back."""
    rng = random.Random(seed)
    block_size = [1, 2, 3, 4, 7, 16][seed % 6]
    max_seq_len = rng.randint(2, 8) * block_size + rng.randint(2, 9)
    num_blocks = rng.randint(1, 3) * -(-max_seq_len // block_size)
    templates = [[rng.randrange(VOCAB if seed % 4 < 2 else 2) for _ in range(max_seq_len)] for _ in range(3)]
    spec = [(rng.choice(templates)[:rng.randint(1, max_seq_len - 1)], rng.randint(1, max_seq_len))
            for _ in range(rng.randint(2, 10))]
    args = prefix.parse_args(["1", "--max-seq-len", str(max_seq_len), "--block-size", str(block_size),
                              "--prefix-sharing"])
    m = prefix.KVCacheManager(num_blocks, block_size, len(spec), -(-max_seq_len // block_size), "cpu", True)

    def checked_forward(*call, **kwargs):
        check_manager(m)
        return toy_forward(*call, **kwargs)

    monkeypatch.setattr(prefix, "forward", checked_forward)
    requests = [prefix.Request(i, list(p), g, list(p)) for i, (p, g) in enumerate(spec)]
    evicted, take = [], m.unheld.popitem
    m.unheld.popitem = lambda last=True: evicted.append(1) or take(last)  # count the blocks taken from the index
    RANDOM_RUNS[seed] = prefix.generate(None, requests, toy_model(num_blocks, block_size), m, args, set())
    for req, (p, ref_length) in zip(requests, spec):
        assert req.done and len(req.tokens) == min(len(p) + ref_length, max_seq_len)
        assert check_tokens(p, req.tokens) is None, f"request {req.id}: {check_tokens(p, req.tokens)}"
    check_manager(m)
    assert not m.blocks and m.num_free() == num_blocks
    RANDOM_RUNS[seed]["evicted"] = len(evicted)


def test_the_random_workloads_find_unheld_blocks_evict_and_preempt():
    if len(RANDOM_RUNS) < 30:
        pytest.skip("needs every test_prefix_sharing_on_random_workloads case to run first")
    runs = Counter(k for stats in RANDOM_RUNS.values() for k in ("prefix_hit_tokens", "prefix_unheld_hit_tokens",
                                                                 "shared_blocks_peak", "evicted", "preemptions")
                   if stats[k])
    assert min(runs.values()) >= 5 and len(runs) == 5, runs


# ---------------------------------------------------------------------------------------------
# Through flash-attn's contract (tests/flash_attn_standin.py), as on a GPU with flash-attn: bf16, 256-token blocks.

def test_prefix_sharing_through_the_kernel_contract(tiny_ckpt, tmp_path, monkeypatch):
    """A system prompt of over 256 tokens: every request after the first reads a block that the first wrote, through
    the stand-in kernel, which refuses any call the real one would refuse or get wrong (a block one row writes while
    another reads it among them); the tokens are those of the same prompts without prefix sharing."""
    for name, value in (("attention", flash_attn_standin.flash_attn_with_kvcache), ("KERNEL", "flash-attn"),
                        ("DTYPE", torch.bfloat16)):
        monkeypatch.setattr(prefix, name, value)
    runs = []
    for options in (["--prefix-sharing"], []):
        out = tmp_path / f"run-{len(runs)}.json"
        with contextlib.redirect_stdout(io.StringIO()):
            prefix.main(["3", "--ckpt-dir", str(tiny_ckpt), "--ref-lengths", "--quiet", "--max-seq-len", "400",
                         "--json", str(out), "--system-prompt", "Answer briefly. " * 90, *options])
        runs.append(json.loads(out.read_text()))
    shared, alone = runs
    assert shared["stats"]["block_size"] == 256 and shared["stats"]["prefix_hit_tokens"] == 256 * 2
    assert [r["generated_ids"] for r in shared["requests"]] == [r["generated_ids"] for r in alone["requests"]]
