"""The memory figures, computed here from the requests' token counts alone, against what the scripts report.

A request with p prompt tokens that generates g tokens gets its first token from its prefill and one more in each
decode step 1 .. g - 1; after decode step t it has p + t tokens cached. So, with every request started at once:
  naive: reserved N x max_seq_len throughout; held at step t: p + t for every request still decoding (g - 1 >= t).
  paged: the same requests hold ceil((p + t) / block_size) blocks; a request that ends at its prefill (g = 1) holds
         ceil((p + 1) / block_size) blocks, and its p cached tokens, until the end of step 1.
The peak is the first step holding the most tokens; fragmentation is what was reserved but empty at that step.
"""
import json

import pytest

from conftest import cpu_path_only, run_script

MAX_SEQ_LEN = 200
BLOCK_SIZE = 16
# Four conversations; the third answer is one token, so that request ends at its prefill.
ANSWERS = ["Paging the cache " * 9, "Blocks are handed out as tokens arrive. " * 4, "Yes", "It depends " * 20]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.json"
    questions = ["What is paging?", "How are blocks handed out in a paged KV cache, and when?", "Is it fast?",
                 "Does the block size matter for how much memory is wasted?"]
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
                                for q, a in zip(questions, ANSWERS)]))
    return path


def run(script, ckpt, prompts, tmp_path, *options):
    out = tmp_path / f"{script}.json"
    result = run_script(script, len(ANSWERS), "--ckpt-dir", ckpt, "--prompts", prompts, "--ref-lengths", "--quiet",
                        "--max-seq-len", MAX_SEQ_LEN, "--json", out, *options)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    return data, [(len(r["prompt_ids"]), len(r["generated_ids"])) for r in data["requests"]]


def kv_bytes_per_token(ckpt):
    params = json.loads((ckpt / "params.json").read_text())  # float32 K and V on the CPU, in every layer
    return 2 * params["n_layers"] * params["n_kv_heads"] * params["dim"] // params["n_heads"] * 4


def expected_figures(timeline, bytes_per_token):
    peak = max(range(len(timeline)), key=lambda t: (timeline[t][1], -t))  # the first step of the most tokens held
    reserved, held = timeline[peak]
    return {"decode_steps": len(timeline), "peak_reserved_tokens": max(r for r, _ in timeline),
            "peak_used_tokens": held, "reserved_at_peak_use": reserved,  # fragmented: the difference of these two
            "kv_bytes_per_token": bytes_per_token}


def check(data, timeline, bytes_per_token):
    assert list(zip(data["timeline"]["reserved_tokens"], data["timeline"]["used_tokens"])) == timeline
    expected = expected_figures(timeline, bytes_per_token)
    assert {key: data["stats"][key] for key in expected} == expected


def test_naive_figures(tiny_ckpt, prompts_file, tmp_path):
    data, lengths = run("llama3-naive.py", tiny_ckpt, prompts_file, tmp_path)
    assert sorted(g for _, g in lengths)[0] == 1, "one request should end at its prefill"
    steps = max(g for _, g in lengths) - 1
    reserved = len(lengths) * MAX_SEQ_LEN
    timeline = [(reserved, sum(p + t for p, g in lengths if g - 1 >= t)) for t in range(1, steps + 1)]
    check(data, timeline, kv_bytes_per_token(tiny_ckpt))


@cpu_path_only
def test_paged_figures(tiny_ckpt, prompts_file, tmp_path):
    data, lengths = run("llama3-paged.py", tiny_ckpt, prompts_file, tmp_path, "--block-size", BLOCK_SIZE)
    assert data["stats"]["preemptions"] == 0
    blocks = lambda tokens: -(-tokens // BLOCK_SIZE)
    timeline = []
    for t in range(1, max(g for _, g in lengths)):
        held = sum(p + t for p, g in lengths if g - 1 >= t) + (t == 1) * sum(p for p, g in lengths if g == 1)
        reserved = sum(blocks(p + t) for p, g in lengths if g - 1 >= t) + (t == 1) * sum(
            blocks(p + 1) for p, g in lengths if g == 1)
        timeline.append((reserved * BLOCK_SIZE, held))
    check(data, timeline, kv_bytes_per_token(tiny_ckpt))
    # The pool: the budget's blocks, but never more than all the requests could hold at max_seq_len tokens each.
    assert data["stats"]["num_blocks"] == min(data["stats"]["kv_budget_tokens"] // BLOCK_SIZE,
                                              len(lengths) * blocks(MAX_SEQ_LEN))
    assert data["stats"]["num_blocks"] == len(lengths) * blocks(MAX_SEQ_LEN) < data["stats"]["kv_budget_tokens"] // BLOCK_SIZE


@cpu_path_only
def test_naive_budget_edge(tiny_ckpt, prompts_file):
    """N x max_seq_len tokens exactly fit; one token fewer does not, and says so in one line."""
    needed = len(ANSWERS) * MAX_SEQ_LEN
    for budget, fits in ((needed, True), (needed - 1, False)):
        result = run_script("llama3-naive.py", len(ANSWERS), "--ckpt-dir", tiny_ckpt, "--prompts", prompts_file,
                            "--ref-lengths", "--quiet", "--max-seq-len", MAX_SEQ_LEN, "--kv-budget-tokens", budget)
        assert (result.returncode == 0) == fits, result.stderr
        if not fits:
            assert result.stderr.count("\n") == 1 and f"needs 4 x 200 = {needed} tokens" in result.stderr


@cpu_path_only
def test_paged_budget_edge(tiny_ckpt, prompts_file, tmp_path):
    """A budget of exactly the peak the requests reach runs them with no preemption; one token fewer is one block
    fewer, and a request must be preempted (and the tokens stay the same)."""
    free, lengths = run("llama3-paged.py", tiny_ckpt, prompts_file, tmp_path, "--block-size", BLOCK_SIZE)
    peak = max(free["timeline"]["reserved_tokens"])
    exact, _ = run("llama3-paged.py", tiny_ckpt, prompts_file, tmp_path, "--block-size", BLOCK_SIZE,
                   "--kv-budget-tokens", peak)
    short, _ = run("llama3-paged.py", tiny_ckpt, prompts_file, tmp_path, "--block-size", BLOCK_SIZE,
                   "--kv-budget-tokens", peak - 1)
    assert exact["stats"]["preemptions"] == 0 and exact["timeline"] == free["timeline"]
    assert short["stats"]["preemptions"] > 0 and short["stats"]["peak_reserved_tokens"] <= peak - BLOCK_SIZE
    generated = lambda data: [r["generated_ids"] for r in data["requests"]]
    assert generated(short) == generated(exact) == generated(free)


def report_lines(stdout):
    """The report's lines after its header, by label: 'peak KV reserved:      123 tokens (...)' -> its text."""
    lines = stdout[stdout.index("=== "):].splitlines()[1:]
    return dict(line.split(":", 1) for line in lines)


def check_report(stdout, lengths, timeline, ckpt, budget, blocks=None):
    """Every figure the report prints, from the token counts alone (timeline is the test's own, from them)."""
    bytes_per_token = kv_bytes_per_token(ckpt)
    gb = lambda tokens: f"{tokens * bytes_per_token / 1e9:.3g} GB"
    peak = max(range(len(timeline)), key=lambda t: (timeline[t][1], -t))
    reserved_at_peak, held = timeline[peak]
    peak_reserved = max(r for r, _ in timeline)
    got = report_lines(stdout)
    assert got["requests"].split() == [str(len(lengths)), f"({len(lengths)}", "finished)"]
    generated = got["generated tokens"].split()
    assert generated[0] == str(sum(g for _, g in lengths)) and f"{len(timeline)} decode steps)" in got["generated tokens"]
    assert got["KV budget"].strip() == f"{budget} tokens ({gb(budget)})"
    assert got["peak KV reserved"].strip() == f"{peak_reserved} tokens ({gb(peak_reserved)})"
    assert got["peak KV holding tokens"].strip() == f"{held} tokens ({gb(held)})"
    wasted = reserved_at_peak - held
    assert got["Fragmented Memory"].strip().startswith(f"{gb(wasted)} ({100 * wasted / reserved_at_peak:.1f}% of")
    if blocks is not None:
        num_blocks, block_size = blocks
        assert got["blocks"].strip() == f"{num_blocks} of {block_size} tokens, {peak_reserved // block_size} used at the peak"
        assert got["preemptions"].strip() == "0"


def test_naive_report_figures(tiny_ckpt, prompts_file, tmp_path):
    result = run_script("llama3-naive.py", len(ANSWERS), "--ckpt-dir", tiny_ckpt, "--prompts", prompts_file,
                        "--ref-lengths", "--quiet", "--max-seq-len", MAX_SEQ_LEN, "--kv-budget-tokens", 1000)
    data, lengths = run("llama3-naive.py", tiny_ckpt, prompts_file, tmp_path, "--kv-budget-tokens", 1000)
    reserved = len(lengths) * MAX_SEQ_LEN
    timeline = [(reserved, sum(p + t for p, g in lengths if g - 1 >= t)) for t in range(1, max(g for _, g in lengths))]
    check_report(result.stdout, lengths, timeline, tiny_ckpt, 1000)


@pytest.fixture(scope="module")
def reserve_first_prompts(tmp_path_factory):
    """A long prompt answered in one token, beside three short prompts with longer answers: the most blocks are
    reserved at step 1, while the long prompt still holds its own, the most tokens held some steps later."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.json"
    pairs = [("Explain copy on write " * 11, "Yes"), ("What is paging?", "It depends " * 10),
             ("How are blocks handed out in a paged KV cache, and when?", "It depends " * 10),
             ("Is it fast?", "It depends " * 10)]
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
                                for q, a in pairs]))
    return path


@cpu_path_only
def test_paged_report_figures(tiny_ckpt, reserve_first_prompts, tmp_path):
    """A percentage of fragmented memory taken against the peak reserved, not against what was reserved when the
    most tokens were held, shows here."""
    budget = 2000
    result = run_script("llama3-paged.py", 4, "--ckpt-dir", tiny_ckpt, "--prompts", reserve_first_prompts,
                        "--ref-lengths", "--quiet", "--max-seq-len", MAX_SEQ_LEN, "--block-size", BLOCK_SIZE,
                        "--kv-budget-tokens", budget)
    _, lengths = run("llama3-paged.py", tiny_ckpt, reserve_first_prompts, tmp_path, "--block-size", BLOCK_SIZE)
    blocks = lambda tokens: -(-tokens // BLOCK_SIZE)
    timeline = []
    for t in range(1, max(g for _, g in lengths)):
        held = sum(p + t for p, g in lengths if g - 1 >= t) + (t == 1) * sum(p for p, g in lengths if g == 1)
        reserved = sum(blocks(p + t) for p, g in lengths if g - 1 >= t) + (t == 1) * sum(
            blocks(p + 1) for p, g in lengths if g == 1)
        timeline.append((reserved * BLOCK_SIZE, held))
    peak = max(range(len(timeline)), key=lambda t: (timeline[t][1], -t))
    assert timeline[peak][0] < max(r for r, _ in timeline), f"the most should be reserved before the most is held"
    num_blocks = min(budget // BLOCK_SIZE, len(lengths) * blocks(MAX_SEQ_LEN))
    check_report(result.stdout, lengths, timeline, tiny_ckpt, budget, blocks=(num_blocks, BLOCK_SIZE))
