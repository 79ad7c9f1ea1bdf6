"""End-to-end: both scripts on a tiny random checkpoint, as a user runs them."""
import json
import re

import pytest

from conftest import ROOT, run_script
from load_scripts import load_script

N = 6
# --max-seq-len 384 keeps every run to a few seconds: of the first 6 prompts, 4 stop at their reference
# length and 2 at 384 tokens.
COMMON = ["--ref-lengths", "--max-seq-len", 384, "--quiet"]


def run_json(script, ckpt, tmp_path, *args):
    out = tmp_path / f"{script}-{len(list(tmp_path.iterdir()))}.json"
    result = run_script(script, N, "--ckpt-dir", ckpt, "--json", out, *COMMON, *args)
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text()), result.stdout


def generated(run):
    return [r["generated_ids"] for r in run["requests"]]


@pytest.fixture(scope="module")
def naive(tiny_ckpt, tmp_path_factory):
    return run_json("llama3-naive.py", tiny_ckpt, tmp_path_factory.mktemp("naive"))


def test_naive_output_depends_on_the_prompt(naive):
    # Guards the other tests against a degenerate model whose output would match whatever the cache did.
    outputs = generated(naive[0])
    assert len({tuple(g) for g in outputs}) == N
    assert all(len(set(g)) > len(g) // 4 for g in outputs)


def test_reference_lengths_and_max_seq_len_set_each_length(naive, tiny_ckpt):
    # --ref-lengths: as many tokens as the reference answer, unless max_seq_len (384 here) comes first.
    tokenizer = load_script("llama3-paged.py").load_tokenizer(tiny_ckpt / "tokenizer.model")
    entries = json.loads((ROOT / "sharegpt-filtered.json").read_text())[:N]
    for entry, req in zip(entries, naive[0]["requests"]):
        ref_length = len(tokenizer.encode_ordinary(entry["conversations"][1]["value"].strip()))
        assert len(req["generated_ids"]) == min(ref_length, 384 - len(req["prompt_ids"]))
    assert any(len(r["prompt_ids"]) + len(r["generated_ids"]) == 384 for r in naive[0]["requests"])


@pytest.mark.parametrize("block_size", [1, 7, 16, 256])
def test_paged_matches_naive_token_for_token(naive, tiny_ckpt, tmp_path, block_size):
    paged, _ = run_json("llama3-paged.py", tiny_ckpt, tmp_path, "--block-size", block_size)
    assert generated(paged) == generated(naive[0])
    assert [r["prompt_ids"] for r in paged["requests"]] == [r["prompt_ids"] for r in naive[0]["requests"]]
    assert paged["stats"]["preemptions"] == 0


@pytest.mark.parametrize("preempt", ["recompute", "swap"])
def test_paged_fits_where_naive_does_not_and_preemption_changes_nothing(naive, tiny_ckpt, tmp_path, preempt):
    budget = 600  # tokens: one naive request of 384, or all six paged ones with a few preempted
    refused = run_script("llama3-naive.py", N, "--ckpt-dir", tiny_ckpt, "--kv-budget-tokens", budget, *COMMON)
    assert refused.returncode == 1
    assert "needs 6 x 384 = 2304 tokens" in refused.stderr and "budget is 600 tokens" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1

    paged, _ = run_json("llama3-paged.py", tiny_ckpt, tmp_path, "--kv-budget-tokens", budget, "--block-size", 16,
                        "--preempt", preempt)
    stats = paged["stats"]
    assert stats["preemptions"] > 0, "the budget is meant to force preemption"
    # Swapped out, a request's K and V go to host memory and come back; recomputed, nothing is swapped.
    assert (stats["swapped_bytes"] > 0) == (preempt == "swap")
    assert stats["finished"] == N and stats["peak_reserved_tokens"] <= budget
    assert generated(paged) == generated(naive[0])


def test_stop_at_max_seq_len_without_reference_lengths(tiny_ckpt, tmp_path):
    args = ["--max-seq-len", 120, "--quiet"]
    runs = []
    for script in ("llama3-naive.py", "llama3-paged.py"):
        out = tmp_path / f"{script}.json"
        result = run_script(script, 3, "--ckpt-dir", tiny_ckpt, "--json", out, *args)
        assert result.returncode == 0, result.stderr
        runs.append(json.loads(out.read_text()))
    assert generated(runs[0]) == generated(runs[1])
    # A random model never says <|eot_id|>, so each request runs to max_seq_len exactly.
    assert all(len(r["prompt_ids"]) + len(r["generated_ids"]) == 120 for r in runs[0]["requests"])


def test_report_agrees_with_json(naive, tiny_ckpt, tmp_path):
    for run, stdout in (naive, run_json("llama3-paged.py", tiny_ckpt, tmp_path, "--kv-budget-tokens", 600)):
        stats = run["stats"]
        assert stats["requests"] == stats["finished"] == N
        assert stats["generated_tokens"] == sum(len(g) for g in generated(run))
        assert stats["decode_steps"] == len(run["timeline"]["used_tokens"]) > 0
        assert stats["peak_used_tokens"] == max(run["timeline"]["used_tokens"])
        assert stats["peak_reserved_tokens"] == max(run["timeline"]["reserved_tokens"])
        number = lambda label: int(re.search(rf"^{label}:\s+(\d+)", stdout, re.M).group(1))
        assert number("requests") == stats["requests"]
        assert number("generated tokens") == stats["generated_tokens"]
        assert number("KV budget") == stats["kv_budget_tokens"]
        assert number("peak KV reserved") == stats["peak_reserved_tokens"]
        assert number("peak KV holding tokens") == stats["peak_used_tokens"]
        gb, percent = re.search(r"^Fragmented Memory: ([\d.e+-]+) GB \(([\d.]+)% of", stdout, re.M).groups()
        assert float(gb) == pytest.approx(stats["fragmented_bytes"] / 1e9, rel=1e-2, abs=1e-12)
        wasted = stats["fragmented_bytes"] / stats["kv_bytes_per_token"]
        at_peak = stats["peak_used_tokens"] + wasted
        assert float(percent) == pytest.approx(100 * wasted / at_peak, abs=0.06)
        if "preemptions" in stats:
            assert number("preemptions") == stats["preemptions"]
            assert number("block size") == stats["block_size"]


def test_responses_are_printed_unless_quiet(tiny_ckpt):
    result = run_script("llama3-paged.py", 2, "--ckpt-dir", tiny_ckpt, "--ref-lengths", "--max-seq-len", 80)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- request ") == 2
    assert result.stdout.index("--- request 1") < result.stdout.index("=== llama3-paged.py ===")


def test_default_budget_fits_seven_naive_requests_not_eight(tiny_ckpt):
    # The CPU default is the KV room of a 24 GB card beside Llama-3-8B: 7 requests of 8192 tokens fit, 8 don't.
    result = run_script("llama3-naive.py", 8, "--ckpt-dir", tiny_ckpt, "--ref-lengths", "--quiet")
    assert result.returncode == 1
    assert "needs 8 x 8192 = 65536 tokens" in result.stderr and "budget is 61691 tokens" in result.stderr
    result = run_script("llama3-naive.py", 7, "--ckpt-dir", tiny_ckpt, "--ref-lengths", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "peak KV reserved:      57344 tokens" in result.stdout


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line on stderr and a non-zero exit, never a traceback.

def write(path, text):
    path.write_text(text)
    return path


BAD_INPUTS = {
    "N zero": (lambda d, c: ["0"], "N must be a positive integer"),
    "N not a number": (lambda d, c: ["many"], "N must be a positive integer"),
    "N negative": (lambda d, c: ["-3"], "N must be a positive integer"),
    "N too large": (lambda d, c: ["3", "--prompts", write(d / "two.json", json.dumps(
        [{"conversations": [{"from": "human", "value": "hi"}]}] * 2))], "has only 2 usable prompts"),
    "no checkpoint": (lambda d, c: ["1", "--ckpt-dir", d / "nowhere"], "not found"),
    "garbage checkpoint": (lambda d, c: ["1", "--ckpt-dir", copy_ckpt(c, d, weights=b"not a checkpoint")],
                           "cannot load the checkpoint"),
    "params without keys": (lambda d, c: ["1", "--ckpt-dir", copy_ckpt(c, d, params='{"dim": 128}')],
                            "params.json lacks n_layers, n_heads, vocab_size, norm_eps"),
    "prompts missing": (lambda d, c: ["1", "--prompts", d / "absent.json"], "cannot read prompts file"),
    "prompts not JSON": (lambda d, c: ["1", "--prompts", write(d / "bad.json", "{oops")], "is not valid JSON"),
    "no usable prompt": (lambda d, c: ["1", "--prompts", write(d / "empty.json", '[{"conversations": []}]')],
                         "has no usable prompt"),
    "prompt too long": (lambda d, c: ["1", "--max-seq-len", "20"], "no room to generate within --max-seq-len 20"),
    "unknown option": (lambda d, c: ["1", "--bogus"], "unrecognized arguments: --bogus"),
    "budget not positive": (lambda d, c: ["1", "--kv-budget-tokens", "0"], "--kv-budget-tokens must be positive"),
}
PAGED_ONLY = {
    "block size zero": (lambda d, c: ["1", "--block-size", "0"], "--block-size must be positive"),
    "budget below one request": (lambda d, c: ["1", "--kv-budget-tokens", "40", "--ref-lengths"],
                                 "cannot hold request 0"),
}
NAIVE_ONLY = {
    "budget below one request": (lambda d, c: ["1", "--kv-budget-tokens", "4000"],
                                 "needs 1 x 8192 = 8192 tokens"),
}


def copy_ckpt(src, dest, weights=None, params=None):
    dest = dest / "ckpt"
    dest.mkdir()
    for name in ("params.json", "consolidated.00.pth", "tokenizer.model"):
        (dest / name).write_bytes((src / name).read_bytes())
    if weights is not None:
        (dest / "consolidated.00.pth").write_bytes(weights)
    if params is not None:
        (dest / "params.json").write_text(params)
    return dest


CASES = [(s, name, *case) for s in ("llama3-naive.py", "llama3-paged.py") for name, case in BAD_INPUTS.items()]
CASES += [("llama3-paged.py", name, *case) for name, case in PAGED_ONLY.items()]
CASES += [("llama3-naive.py", name, *case) for name, case in NAIVE_ONLY.items()]


@pytest.mark.parametrize("script,name,make_args,message", CASES, ids=[f"{c[0][7:12]}-{c[1]}" for c in CASES])
def test_bad_input_gets_one_line_and_nonzero_exit(tiny_ckpt, tmp_path, script, name, make_args, message):
    args = [str(a) for a in make_args(tmp_path, tiny_ckpt)]
    if "--ckpt-dir" not in args:
        args += ["--ckpt-dir", str(tiny_ckpt)]
    result = run_script(script, *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{script}: error: ") and message in lines[0], lines[0]
