"""llama3-paged-beams.py: beam search (--beams), forks made and dropped every step, block-table rows from a pool.

Against llama3-paged.py and llama3-paged-samples.py: without --beams the rung generates their tokens, with and
without preemption. Against a beam search written here that recomputes every beam from scratch at every step, with
no cache at all: each prompt's answer, and every figure of the report (blocks shared, blocks saved, the KV held and
reserved, copies), computed from the beams that search keeps, decode step by decode step. A preempted search starts
over and gives the same answer. The manager's row pool, and a fork at a block boundary, worked out by hand.
"""
import json
import re

import pytest
import torch

from conftest import pin_cpu_path
from load_scripts import load_script
from test_samples import generated, number, prefill_from_scratch, report_lines, run_main

beams = load_script("beams")
samples = load_script("samples")  # the parent
paged = load_script("paged")
naive = load_script("naive")  # prefill_from_scratch's forward


@pytest.fixture(autouse=True, scope="module")
def cpu_path():
    """The tests pick small block sizes and the CPU budget: they run the scripts' CPU path, on any machine."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        pin_cpu_path(monkeypatch, beams, samples, paged, naive)
        yield


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    model = beams.load_model(tiny_ckpt)
    model["rope_cos"], model["rope_sin"] = beams.rope_tables(model, 128)
    return model


@pytest.fixture(scope="module")
def prompts(tiny_ckpt):
    tokenizer = beams.load_tokenizer(tiny_ckpt / "tokenizer.model")
    return [beams.encode_chat(tokenizer, text) for text in ("Why is the sky blue?", "Name three prime numbers.")]


def run_generate(module, model, requests, args, budget_tokens=4096, stop_ids=frozenset()):
    kv_cache, manager = module.make_kv_cache(model, budget_tokens, len(requests), args)
    stats = module.generate(model, requests, kv_cache, manager, args, set(stop_ids))
    return stats, kv_cache, manager


# ---------------------------------------------------------------------------------------------
# Without --beams: its parents.

@pytest.mark.parametrize("budget", [None, 160])
def test_without_beams_it_is_llama3_paged(tiny_ckpt, tmp_path, budget):
    """llama3-paged.py's tokens, memory timeline and report, whether no request is preempted or (20 blocks of 8 for
    the first 3 prompts, of 98 to 120 tokens) several are."""
    options = ["--max-seq-len", 120, "--block-size", 8] + (["--kv-budget-tokens", budget] if budget else [])
    (parent, parent_out), (rung, rung_out) = (run_main(m, tiny_ckpt, tmp_path, 3, *options) for m in (paged, beams))
    assert generated(rung) == generated(parent) and rung["timeline"] == parent["timeline"]
    assert rung["stats"]["preemptions"] == parent["stats"]["preemptions"]
    assert (parent["stats"]["preemptions"] > 0) == bool(budget)
    assert report_lines(rung_out) == report_lines(parent_out)  # and no line about sharing


def test_without_beams_its_samples_are_llama3_paged_samples(model, prompts):
    """With --samples 2 at temperature 0.9, under a budget (12 blocks of 4 for 4 samples of 35 to 37 tokens) that
    preempts: the samples rung's tokens, timeline and sharing figures."""
    runs = []
    for module in (samples, beams):
        args = module.parse_args(["2", "--samples", "2", "--temperature", "0.9", "--seed", "4", "--block-size", "4",
                                  "--max-seq-len", "64"])
        requests = module.with_samples([module.Request(i, p, 21, list(p)) for i, p in enumerate(prompts)], 2)
        stats, _, _ = run_generate(module, model, requests, args, budget_tokens=48)
        runs.append(([r.tokens for r in requests], {k: v for k, v in stats.items() if k != "manager_seconds"}))
    assert runs[1] == runs[0]
    assert runs[0][1]["preemptions"] > 0 and runs[0][1]["cow_copies"] > 0 and len({tuple(t) for t in runs[0][0]}) == 4


def test_one_beam_is_greedy(model, prompts):
    args = beams.parse_args(["2", "--beams", "1", "--block-size", "4", "--max-seq-len", "64"])
    requests = [beams.Request(i, p, 20, list(p)) for i, p in enumerate(prompts)]
    run_generate(beams, model, requests, args)
    parent_args = paged.parse_args(["2", "--block-size", "4", "--max-seq-len", "64"])
    greedy = [paged.Request(i, p, 20, list(p)) for i, p in enumerate(prompts)]
    run_generate(paged, model, greedy, parent_args)
    assert [r.tokens for r in requests] == [r.tokens for r in greedy]


# ---------------------------------------------------------------------------------------------
# Against a beam search that recomputes every beam.

def plain_beam_search(model, prompt, width, done):
    """Beam search by summed log-probability with no cache at all: every beam recomputed from its tokens. A beam
    for which done(tokens) holds keeps its place and score, and stops growing. Returns the best beam's tokens, and
    for each step after the first (each decode step of generate()) the tokens of the live beams it starts with and
    of those among them that a winner extends (the others are dropped)."""
    beams_now, steps = [(0.0, list(prompt))], []
    while len(beams_now[0][1]) == len(prompt) or not all(done(tokens) for _, tokens in beams_now):
        candidates, live = [], []
        for score, tokens in beams_now:
            if len(tokens) > len(prompt) and done(tokens):
                candidates.append((score, tokens, None))
                continue
            live.append(tokens)
            values, ids = prefill_from_scratch(model, tokens)[2].topk(width)
            candidates += [(score + v, tokens + [t], len(live) - 1) for v, t in zip(values.tolist(), ids.tolist())]
        kept = sorted(candidates, key=lambda c: -c[0])[:width]
        if len(beams_now[0][1]) > len(prompt):
            steps.append((live, [live[i] for i in sorted({beam for _, _, beam in kept if beam is not None})]))
        beams_now = [(score, tokens) for score, tokens, _ in kept]
    return max(beams_now, key=lambda b: b[0])[1], steps


def expected_figures(searches, block):
    """What generate() holds at each decode step, from plain_beam_search's steps for each prompt (all admitted in
    the first step, none preempted). A beam extended in a step holds, when the step ends, blocks for the tokens it
    had: two beams hold the same full block j when their tokens agree up to its end (one forked from the other, or
    both from a third, after block j was full); a block that is not full is one beam's own, since the beams that
    shared it (a parent and its forks of the step before) copied it, but for the last to ask. Copies: in each group
    of live beams that start a step with the same cached tokens, ending inside a block, all but one."""
    figures = []
    for i in range(max(len(steps) for steps in searches)):
        at = [steps[i] for steps in searches if i < len(steps)]
        holders = {}
        for prompt_id, (_, extended) in enumerate(at):
            for tokens in extended:
                for j in range(len(tokens) // block):
                    key = (prompt_id, tuple(tokens[:(j + 1) * block]))
                    holders[key] = holders.get(key, 0) + 1
        extended = [tokens for _, ext in at for tokens in ext]
        saved = sum(count - 1 for count in holders.values())
        cached = {}
        for prompt_id, (live, _) in enumerate(at):
            for tokens in live:
                key = (prompt_id, tuple(tokens[:-1]))
                cached[key] = cached.get(key, 0) + 1
        figures.append({
            "reserved": (len(holders) + sum(len(t) % block > 0 for t in extended)) * block,
            "held": sum(len(t) for t in extended) - saved * block,
            "per_holder": sum(-(-len(t) // block) for t in extended) * block,
            "shared": sum(count > 1 for count in holders.values()), "saved": saved,
            "copies": sum(count - 1 for (_, tokens), count in cached.items() if len(tokens) % block)})
    return figures


def check_figures(stats, figures):
    assert stats["timeline"] == [(f["reserved"], f["held"]) for f in figures]
    assert stats["cow_copies"] == sum(f["copies"] for f in figures) > 0
    assert stats["shared_blocks_peak"] == max(f["shared"] for f in figures) > 0
    assert stats["saved_blocks_peak"] == max(f["saved"] for f in figures)
    assert stats["peak_unshared_tokens"] == max(f["per_holder"] for f in figures) > stats["peak_reserved_tokens"]


@pytest.mark.parametrize("stop", ["length", "stop token"])
def test_beam_search_matches_a_search_that_recomputes_every_beam(model, prompts, stop):
    """Each prompt's answer, and what the cache held at every decode step, as the plain search's beams imply."""
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
    args = beams.parse_args(["2", "--beams", str(width), "--block-size", "4", "--max-seq-len", str(max_seq_len)])
    requests = [beams.Request(i, p, ref_length, list(p)) for i, p in enumerate(prompts)]
    if stop != "length":
        requests = requests[:1]
    stats, _, manager = run_generate(beams, model, requests, args, stop_ids=stop_ids)
    searches = []
    for req in requests:
        best, steps = plain_beam_search(model, req.prompt_ids, width, lambda t: done(t, req.prompt_ids))
        assert req.done and req.tokens == best
        searches.append(steps)
    check_figures(stats, expected_figures(searches, 4))
    assert sorted(manager.free_blocks) == list(range(manager.num_blocks)) and manager.saved_blocks == 0
    assert manager.shared_blocks == 0 and sorted(manager.free_rows) == list(range(len(manager.block_table)))


def test_the_report_prints_what_the_beams_share(model, prompts, tiny_ckpt, tmp_path):
    """main() with --beams 3 on two prompts that generate 7 tokens: each figure the report adds, as the plain
    search's beams imply (expected_figures)."""
    words = " ".join(["word"] * 7)  # a reference answer of 7 tokens
    entries = [{"conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": words}]}
               for text in ("Why is the sky blue?", "Name three prime numbers.")]
    (tmp_path / "prompts.json").write_text(json.dumps(entries))
    run, stdout = run_main(beams, tiny_ckpt, tmp_path, 2, "--prompts", tmp_path / "prompts.json", "--beams", 3,
                           "--block-size", 4, "--max-seq-len", 64)
    searches = [plain_beam_search(model, p, 3, lambda t, p=p: len(t) - len(p) >= 7)[1] for p in prompts]
    figures = expected_figures(searches, 4)
    assert [r["prompt_ids"] for r in run["requests"]] == prompts
    assert number(stdout, "blocks shared") == max(f["shared"] for f in figures)
    assert number(stdout, "references saved") == max(f["saved"] for f in figures)
    assert number(stdout, "peak KV unshared") == max(f["per_holder"] for f in figures)
    assert number(stdout, "copy-on-write copies") == sum(f["copies"] for f in figures)
    assert number(stdout, "peak KV reserved") == max(f["reserved"] for f in figures)
    assert number(stdout, "peak KV holding tokens") == max(f["held"] for f in figures)
    assert re.search(r"^requests:\s+2 \(2 finished\)$", stdout, re.M)


def test_beam_search_under_preemption_starts_over_and_gives_the_same_answer(model, prompts):
    """A preempted beam search (its beams move together) starts over from its prompt, after the older one."""
    args = beams.parse_args(["2", "--beams", "3", "--block-size", "4", "--max-seq-len", "64"])
    answers = []
    for budget in (4096, 48):  # 12 blocks: one prompt's 3 beams of 26 tokens fit (in 10), both don't
        requests = [beams.Request(i, p, 10, list(p)) for i, p in enumerate(prompts)]
        stats, _, _ = run_generate(beams, model, requests, args, budget_tokens=budget)
        answers.append([r.tokens for r in requests])
        assert (stats["preemptions"] > 0) == (budget == 48)
    assert answers[0] == answers[1]
    requests = [beams.Request(i, p, 10, list(p)) for i, p in enumerate(prompts)]
    with pytest.raises(SystemExit, match="cannot hold request 0, searching with 3 beams"):
        run_generate(beams, model, requests, args, budget_tokens=32)  # 8 blocks: one prompt's beams don't fit


# ---------------------------------------------------------------------------------------------
# The manager, step by step.

def test_fork_at_a_block_boundary_shares_only_full_blocks():
    """A beam forked when its tokens fill their blocks exactly shares them all and copies nothing: its next token
    starts a block of its own."""
    m = beams.KVCacheManager(num_blocks=8, block_size=4, num_rows=16, max_blocks_per_request=4, device="cpu")
    m.allocate("p", 8)
    m.fork("p", "c")
    for r in "pc":
        assert m.needs_block(r, 9) and not m.needs_copy(r, 9)
        m.append_block(r)
    assert m.blocks["p"][:2] == m.blocks["c"][:2] and m.blocks["p"][2] != m.blocks["c"][2]
    assert (m.shared_blocks, m.saved_blocks) == (2, 2)


def test_rows_of_the_block_table_are_handed_out_and_taken_back():
    """The README's beams example. Two rows for beams that come and go, each with a new id: a dropped beam's row
    goes to the next fork, whose blocks overwrite the entries there, and block_tables() reads each beam's own blocks
    through its row."""
    m = beams.KVCacheManager(num_blocks=8, block_size=4, num_rows=2, max_blocks_per_request=3, device="cpu")
    assert m.allocate(10, 5) == 0 and m.fork(10, 11) == 1 and not m.free_rows
    a, b = m.blocks[10]
    assert m.ref_count[a] == m.ref_count[b] == 2 and m.needs_copy(10, 6) and m.needs_copy(11, 6)
    c, original = m.copy_on_write(10)  # oldest first, as the grow step asks: 10 gets a copy, 11 keeps b
    assert original == b and m.blocks == {10: [a, c], 11: [a, b]} and not m.needs_copy(11, 6)
    assert m.block_tables(torch.tensor([0, 1]), 2).tolist() == [[a, c], [a, b]]
    m.free(11)  # dropped: b, which only it held, goes back, and so does its row
    assert list(m.free_rows) == [1] and b in m.free_blocks and m.ref_count[a] == 1 and m.saved_blocks == 0
    assert m.fork(10, 12) == 1 and m.blocks[12] == [a, c]
    assert m.block_tables(torch.tensor([1, 0]), 2).tolist() == [[a, c]] * 2, "row 1 holds beam 12's blocks, not 11's"
    m.free(10)
    m.free(12)
    assert sorted(m.free_rows) == [0, 1] and sorted(m.free_blocks) == list(range(8)) and not m.rows


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit status 1.

@pytest.mark.parametrize("options, message", [
    (["--beams", "0"], "--beams must be positive, got 0"),
    (["--beams", "x"], "argument --beams: invalid int value: 'x'"),
    (["--beams", "2", "--samples", "2"], "--beams searches deterministically: use it without --samples and"),
    (["--beams", "2", "--temperature", "0.5"], "--beams searches deterministically: use it without --samples"),
])
def test_bad_beam_options_get_one_line(tiny_ckpt, options, message):
    with pytest.raises(SystemExit) as exit:
        beams.main(["1", "--ckpt-dir", str(tiny_ckpt), *options])
    assert exit.value.code.startswith(f"llama3-paged-beams.py: error: {message}")


def test_beams_through_flash_attns_contract(tiny_ckpt, tmp_path, monkeypatch):
    """main() with tests/flash_attn_standin.py as its kernel, as on a GPU with flash-attn (bf16, 256-token blocks):
    beams forked, copied on write and dropped, through the kernel's contract."""
    from test_flash_attn_path import run  # (its own checks: a block table in every call, every request finished)
    stats = run("beams", tiny_ckpt, tmp_path, monkeypatch, "--beams", 2)["stats"]
    assert stats["block_size"] == 256 and stats["cow_copies"] > 0 and stats["shared_blocks_peak"] > 0
