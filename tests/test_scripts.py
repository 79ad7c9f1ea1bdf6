"""End to end: the scripts on a tiny random checkpoint, as a user runs them."""
import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, cpu_path_only, pin_cpu_path, run_script
from load_scripts import load_script

SCRIPTS = ["llama3-naive.py", "llama3-paged.py", "llama3-paged-swap.py", "llama3-paged-prefix.py",
           "llama3-paged-samples.py", "llama3-paged-beams.py"]
# Where a test reads what main() and the twin parts do (tests/test_twins.py), which are the same in every rung but
# for the report's lines: naive, paged, and llama3-paged-beams.py, whose generate() is furthest from paged's.
FEW = ["llama3-naive.py", "llama3-paged.py", "llama3-paged-beams.py"]

N = 6
# --max-seq-len 384 keeps every run to a few seconds: of the first 6 prompts, 4 stop at their reference
# length and 2 at 384 tokens.
COMMON = ["--ref-lengths", "--max-seq-len", 384, "--quiet"]


RUNS = {}  # (script, arguments) -> (--json, stdout): several tests read the same run


def run_json(script, ckpt, tmp_path, *args):
    key = (script, str(ckpt), *map(str, args))
    if key not in RUNS:
        out = tmp_path / f"{script}-{len(list(tmp_path.iterdir()))}.json"
        result = run_script(script, N, "--ckpt-dir", ckpt, "--json", out, *COMMON, *args)
        assert result.returncode == 0, result.stderr
        assert result.stderr == "", "stderr is not a terminal here: no progress line, nothing at all"
        RUNS[key] = json.loads(out.read_text()), result.stdout
    return RUNS[key]


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
    tokenizer = load_script("paged").load_tokenizer(tiny_ckpt / "tokenizer.model")
    entries = json.loads((ROOT / "sharegpt-filtered.json").read_text())[:N]
    for entry, req in zip(entries, naive[0]["requests"]):
        ref_length = len(tokenizer.encode_ordinary(entry["conversations"][1]["value"].strip()))
        assert len(req["generated_ids"]) == min(ref_length, 384 - len(req["prompt_ids"]))
    assert any(len(r["prompt_ids"]) + len(r["generated_ids"]) == 384 for r in naive[0]["requests"])


@cpu_path_only
@pytest.mark.parametrize("block_size", [1, 7, 16, 256])
def test_paged_matches_naive_token_for_token(naive, tiny_ckpt, tmp_path, block_size):
    paged, _ = run_json("llama3-paged.py", tiny_ckpt, tmp_path, "--block-size", block_size)
    assert generated(paged) == generated(naive[0])
    assert [r["prompt_ids"] for r in paged["requests"]] == [r["prompt_ids"] for r in naive[0]["requests"]]
    assert paged["stats"]["preemptions"] == 0


# Each rung without its options is llama3-paged.py, token for token, timeline and report: in its own tests
# (test_swap.py, test_prefix.py, test_samples.py, test_beams.py).


def test_naive_refuses_the_budget_the_paged_scripts_run_in(tiny_ckpt):
    refused = run_script("llama3-naive.py", N, "--ckpt-dir", tiny_ckpt, "--kv-budget-tokens", 600, *COMMON)
    assert refused.returncode == 1
    assert "needs 6 x 384 = 2304 tokens" in refused.stderr and "budget is 600 tokens" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


@cpu_path_only
@pytest.mark.parametrize("script,preempt", [("llama3-paged.py", None), ("llama3-paged-swap.py", "swap")])
def test_paged_fits_where_naive_does_not_and_preemption_changes_nothing(naive, tiny_ckpt, tmp_path, script, preempt):
    budget = 600  # tokens: one naive request of 384 (see above), or all six paged ones with a few preempted
    options = ["--preempt", preempt] if preempt else []  # the swap rung's default is recompute
    paged, _ = run_json(script, tiny_ckpt, tmp_path, "--kv-budget-tokens", budget, *options)
    stats = paged["stats"]
    assert stats["preemptions"] > 0, "the budget is meant to force preemption"
    # Swapped out, a request's K and V go to host memory and come back; recomputed, nothing is swapped.
    assert stats.get("swapped_in_blocks", 0) > 0 if preempt == "swap" else "swapped_in_blocks" not in stats
    assert stats["finished"] == N and stats["peak_reserved_tokens"] <= budget
    assert generated(paged) == generated(naive[0])


def test_stop_at_max_seq_len_without_reference_lengths(tiny_ckpt, tmp_path):
    args = ["--max-seq-len", 120, "--quiet"]
    runs = []
    for script in FEW:
        out = tmp_path / f"{script}.json"
        result = run_script(script, 3, "--ckpt-dir", tiny_ckpt, "--json", out, *args)
        assert result.returncode == 0, result.stderr
        runs.append(json.loads(out.read_text()))
    assert generated(runs[0]) == generated(runs[1]) == generated(runs[2])
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
        wasted = stats["reserved_at_peak_use"] - stats["peak_used_tokens"]  # reserved, holding no token
        assert float(gb) == pytest.approx(wasted * stats["kv_bytes_per_token"] / 1e9, rel=1e-2, abs=1e-12)
        assert float(percent) == pytest.approx(100 * wasted / stats["reserved_at_peak_use"], abs=0.06)
        if "preemptions" in stats:
            assert number("preemptions") == stats["preemptions"]
            blocks = re.search(r"^blocks:\s+(\d+) of (\d+) tokens, (\d+) used at the peak", stdout, re.M).groups()
            assert list(map(int, blocks)) == [stats["num_blocks"], stats["block_size"],
                                              stats["peak_reserved_tokens"] // stats["block_size"]]


def test_responses_are_printed_unless_quiet(tiny_ckpt):
    result = run_script("llama3-paged.py", 2, "--ckpt-dir", tiny_ckpt, "--ref-lengths", "--max-seq-len", 80)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- request ") == 2
    assert result.stdout.index("--- request 1") < result.stdout.index("=== llama3-paged.py ===")


@cpu_path_only
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
    "N zero": (lambda d, c: ["0"], "N must be positive, got 0"),
    "N not a number": (lambda d, c: ["many"], "argument N: invalid int value: 'many'"),
    "N negative": (lambda d, c: ["-3"], "N must be positive, got -3"),
    "N too large": (lambda d, c: ["3", "--prompts", write(d / "two.json", json.dumps(
        [{"conversations": [{"from": "human", "value": "hi"}]}] * 2))], "asked for 3 prompts but"),
    "no checkpoint": (lambda d, c: ["1", "--ckpt-dir", d / "nowhere"], "tokenizer.model not found"),
    "garbage checkpoint": (lambda d, c: ["1", "--ckpt-dir", copy_ckpt(c, d, weights=b"not a checkpoint")],
                           "cannot load the checkpoint"),
    "params without keys": (lambda d, c: ["1", "--ckpt-dir", copy_ckpt(c, d, params='{"dim": 128}')],
                            "has no 'n_layers'"),
    "tensor missing": (lambda d, c: ["1", "--ckpt-dir", copy_ckpt(c, d, drop="layers.1.feed_forward.w2.weight")],
                       "has no 'layers.1.feed_forward.w2.weight'"),
    "json unwritable": (lambda d, c: ["1", "--max-seq-len", "60", "--json", d / "missing" / "out.json"],
                        "cannot write"),
    "prompts missing": (lambda d, c: ["1", "--prompts", d / "absent.json"], "cannot read prompts file"),
    "prompts not JSON": (lambda d, c: ["1", "--prompts", write(d / "bad.json", "{oops")], "is not valid JSON"),
    "no usable prompt": (lambda d, c: ["1", "--prompts", write(d / "empty.json", '[{"conversations": []}]')],
                         "empty.json has 0 (ShareGPT entries with a human turn)"),
    "prompt too long": (lambda d, c: ["1", "--max-seq-len", "20"], "no room to generate within --max-seq-len 20"),
    "unknown option": (lambda d, c: ["1", "--bogus"], "unrecognized arguments: --bogus"),
    "budget not positive": (lambda d, c: ["1", "--kv-budget-tokens", "0"], "--kv-budget-tokens must be positive"),
}
PAGED_ONLY = {
    "block size zero": (lambda d, c: ["1", "--block-size", "0"], "--block-size must be positive"),
    "budget below one request": (lambda d, c: ["1", "--kv-budget-tokens", "40", "--ref-lengths"],
                                 "cannot hold request 0"),
}
# Each rung's own options' bad values are in its tests (test_swap.py, test_samples.py, test_beams.py); here, an
# option of another rung is an unknown option, in one line.
OPTIONS = {"llama3-paged-swap.py": [("--preempt=swap", [])], "llama3-paged-prefix.py": [("--prefix-sharing", []),
           ("--system-prompt", ["Be brief."])], "llama3-paged-samples.py": [("--samples", ["2"]), ("--seed", ["1"])],
           "llama3-paged-beams.py": [("--beams", ["2"])]}
OPTIONS["llama3-paged-beams.py"] += OPTIONS["llama3-paged-samples.py"]  # the beams rung is the samples rung's child
RUNG_ONLY = {script: {f"option {option} of another rung": (lambda d, c, option=option, value=value: ["1", option, *value],
                                                           f"unrecognized arguments: {option}")
                      for other, options in OPTIONS.items() if other != script
                      for option, value in options if (option, value) not in OPTIONS.get(script, [])}
             for script in ["llama3-paged.py", *OPTIONS]}
# A beam search needs all its beams at once: more than the blocks is refused in one line. (More samples than blocks
# take turns, and finish: test_more_samples_than_blocks_take_turns, below.)
RUNG_ONLY["llama3-paged-beams.py"]["more beams than blocks"] = (
    lambda d, c: ["1", "--kv-budget-tokens", "160", "--beams", "11"],
    "the KV budget of 10 blocks of 16 tokens cannot hold request 0, searching with 11 beams")
NAIVE_ONLY = {
    "budget below one request": (lambda d, c: ["1", "--kv-budget-tokens", "4000"],
                                 "needs 1 x 8192 = 8192 tokens"),
}


def copy_ckpt(src, dest, weights=None, params=None, drop=None):
    dest = dest / "ckpt"
    dest.mkdir()
    for name in ("params.json", "consolidated.00.pth", "tokenizer.model"):
        (dest / name).write_bytes((src / name).read_bytes())
    if weights is not None:
        (dest / "consolidated.00.pth").write_bytes(weights)
    if params is not None:
        (dest / "params.json").write_text(params)
    if drop is not None:
        state = torch.load(dest / "consolidated.00.pth", weights_only=True)
        del state[drop]
        torch.save(state, dest / "consolidated.00.pth")
    return dest


CASES = [(s, name, *case) for s in FEW for name, case in BAD_INPUTS.items()]
CASES += [(s, name, *case) for s in SCRIPTS[1:] for name, case in PAGED_ONLY.items()]  # each parse_args and loop
CASES += [(s, name, *case) for s, cases in RUNG_ONLY.items() for name, case in cases.items()]
CASES += [("llama3-naive.py", name, *case) for name, case in NAIVE_ONLY.items()]


@pytest.mark.parametrize("script,name,make_args,message", CASES, ids=[f"{c[0][7:-3]}-{c[1]}" for c in CASES])
def test_bad_input_gets_one_line_and_nonzero_exit(tiny_ckpt, tmp_path, monkeypatch, script, name, make_args, message):
    """In process, to keep the suite quick, on the CPU path (the messages name its block size): fail() exits with
    its one-line message, which Python prints to stderr with exit status 1 (the next test checks that as a user
    sees it). Any other exception fails the test."""
    args = [str(a) for a in make_args(tmp_path, tiny_ckpt)]
    if "--ckpt-dir" not in args:
        args += ["--ckpt-dir", str(tiny_ckpt)]
    module = load_script(script.removeprefix("llama3-").removeprefix("paged-").removesuffix(".py"))
    pin_cpu_path(monkeypatch, module)
    with pytest.raises(SystemExit) as exit:
        module.main(args)
    line = exit.value.code
    assert isinstance(line, str) and "\n" not in line, line
    assert line.startswith(f"{script}: error: ") and message in line, line


def test_more_samples_than_blocks_take_turns(tiny_ckpt, tmp_path, monkeypatch):
    """11 samples of the first prompt (44 tokens, 52 with 8 generated: 4 blocks of 16 each) in a budget of 10 blocks
    is no bad input for the samples rung: the samples run in turns, the newest preempted and recomputed, all finish,
    and each draws what it draws with room for all of them at once."""
    samples = load_script("samples")
    pin_cpu_path(monkeypatch, samples)
    runs = []
    for budget in (160, 11 * 4 * 16):
        out = tmp_path / f"{budget}.json"
        samples.main(["1", "--ckpt-dir", str(tiny_ckpt), "--ref-lengths", "--quiet", "--max-seq-len", "52", "--samples",
                      "11", "--temperature", "1", "--kv-budget-tokens", str(budget), "--json", str(out)])
        runs.append(json.loads(out.read_text()))
    turns, room = runs
    assert turns["stats"]["num_blocks"] == 10 and turns["stats"]["preemptions"] > 0 == room["stats"]["preemptions"]
    assert turns["stats"]["finished"] == turns["stats"]["requests"] == 11
    assert generated(turns) == generated(room) and len({tuple(g) for g in generated(turns)}) == 11


@pytest.mark.parametrize("script", FEW)
def test_bad_input_as_a_user_sees_it(tiny_ckpt, script):
    result = run_script(script, 1, "--ckpt-dir", tiny_ckpt, "--max-seq-len", 1)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr == f"{script}: error: --max-seq-len must be from 2 to 131072 (Llama 3.1's context), got 1\n"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_option_has_help_and_machine_defaults(script):
    result = run_script(script, "--help")
    assert result.returncode == 0
    options = re.findall(r"^  (-[-\w]+|N)", result.stdout, re.M)
    assert "--ckpt-dir" in options and "--prompts" in options and len(options) >= 9
    for option in options:  # each option's help text follows it on its line, or the next
        entry = result.stdout.split(option, 1)[1].split("\n  -", 1)[0]
        assert re.search(r"[a-z]{3,}", entry.replace(option, "")), f"{option} has no help text"
    budget = "free GPU memory" if torch.cuda.is_available() else "default here: 61691"
    assert budget in " ".join(result.stdout.split())


@pytest.mark.parametrize("tiny_exists", [False, True])
def test_missing_checkpoint_names_the_command_and_the_folder(tmp_path, tiny_exists):
    """Run from a copy of the project: the message says how to make the tiny checkpoint, or that it is there."""
    for name in ("llama3-naive.py", "sharegpt-filtered.json"):
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    if tiny_exists:
        (tmp_path / "checkpoints" / "tiny").mkdir(parents=True)
        (tmp_path / "checkpoints" / "tiny" / "params.json").write_text("{}")
    result = subprocess.run([sys.executable, "llama3-naive.py", "1"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "pass --ckpt-dir checkpoints/tiny" in result.stderr
    assert ("python tools/make_checkpoint.py checkpoints/tiny" in result.stderr) != tiny_exists
