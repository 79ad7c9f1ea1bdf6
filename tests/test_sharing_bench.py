"""tools/sharing_bench.py, sections prefix and swap, on five short prompts and the tiny checkpoint.

Each rung runs in this process (its own main() on the command line the tool gives it, instead of a subprocess, to
save the start-up of six processes). The figures the tool prints are checked against what this test computes from
the prompts' tokens and the checkpoint's shape; a run whose tokens disagree, and a bad argument, end the tool with
one line.
"""
import contextlib
import io
import json
import re
import tempfile
import time
from pathlib import Path

import pytest

from load_scripts import load_script
import sharing_bench

USERS = ["Name three prime numbers.", "Name three prime numbers and say why.", "Why is the sky blue?",
         "Write a haiku about the sea.", "What is a block table?"]
ANSWERS = ["Two, three and five.", "Two, three and five: each has two divisors, one and itself.",
           "Blue light scatters most.", "Grey waves fold and break, salt wind carries the gulls home.",
           "For each request, the blocks that hold its keys and values, in order."]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "prompts.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": u}, {"from": "gpt", "value": a}]}
                                for u, a in zip(USERS, ANSWERS)]))
    return path


def in_process(name, n, ckpt_dir, budget_tokens, max_seq_len, threads, prompts=None, block_size=None, extra=(),
               edit=None):
    """tools/scripts.py's run_script, in this process: the rung's main() on the same command line. edit(name,
    extra, data), if given, may change a run's --json output."""
    module = load_script(name)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        argv = [str(n), "--ckpt-dir", str(ckpt_dir), "--ref-lengths", "--quiet", "--kv-budget-tokens",
                str(budget_tokens), "--max-seq-len", str(max_seq_len), "--json", str(out), "--prompts", str(prompts),
                "--block-size", str(block_size), *map(str, extra)]
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                module.main(argv)
            rc, stderr = 0, ""
        except SystemExit as e:
            rc, stderr = 1, str(e.code)
        data = json.loads(out.read_text()) if rc == 0 else None
    if edit and data:
        edit(name, list(extra), data)
    return {"rc": rc, "stderr": stderr, "stderr_lines": int(bool(stderr)), "json": data,
            "seconds": time.perf_counter() - start}


def table_rows(stdout, section):
    """The rows of a section's table: {first cell: [cells]} (cells split on two spaces or more)."""
    text = stdout.split(f"== {section}.", 1)[1]
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("---")) + 1
    rows = {}
    for line in lines[start:]:
        if not line.strip() or line.startswith(("prompt tokens", "tokens recomputed")):
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells[1:]
    return rows


def test_the_prefix_and_swap_figures(tiny_ckpt, prompts_file, monkeypatch, capsys):
    monkeypatch.setattr(sharing_bench, "run_script", in_process)
    sharing_bench.main(["--sections", "prefix,swap", "--prompts", str(prompts_file), "--system-prompts", "2",
                        "--preempt-prompts", "5", "--ckpt-dir", str(tiny_ckpt)])
    stdout = capsys.readouterr().out

    prefix = load_script("prefix")
    tokenizer = prefix.load_tokenizer(tiny_ckpt / "tokenizer.model")
    prompts = [prefix.encode_chat(tokenizer, u, sharing_bench.SYSTEM_PROMPT) for u in USERS[:2]]
    # All admitted together: each finds the full blocks of its start that an earlier one has, never its last.
    common = lambda a, b: next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    found = [max([min(common(p, q), len(p) - 1) // 16 for q in prompts[:i]], default=0) for i, p in enumerate(prompts)]
    assert found == [0, 21]  # the system turn and the user's header, 338 tokens, and the same 5 words after
    distinct = len({tuple(p[:16 * k]) for p, n in zip(prompts, found) for k in range(1, n + 1)})
    rows = table_rows(stdout, 2)
    tokens_found, unheld, shared, saved = map(int, rows["prefix sharing, all at once"][1:5])
    assert (tokens_found, unheld, shared, saved) == (16 * sum(found), 0, distinct, sum(found))
    assert rows["no prefix sharing, all at once"][1:5] == ["0"] * 4
    assert int(rows["prefix sharing, all at once"][5]) < int(rows["no prefix sharing, all at once"][5])  # peak KV
    assert "generated token ids identical in all four runs: yes, all 2 requests" in stdout

    params = json.loads((tiny_ckpt / "params.json").read_text())
    bytes_per_token = 2 * params["n_layers"] * params["n_kv_heads"] * params["dim"] // params["n_heads"] * 4
    rows = table_rows(stdout, 3)
    preemptions, recomputed, blocks, moved = map(int, rows["swap"][:4])
    assert preemptions > 0 and recomputed == 0 and blocks > 0 and moved == 2 * blocks * 16 * bytes_per_token
    preemptions, recomputed, blocks, moved = map(int, rows["recompute"][:4])
    assert preemptions > 0 and recomputed > 0 and blocks == moved == 0
    assert "generated token ids identical in both runs: yes, all 5 requests" in stdout


def test_runs_that_disagree_end_it_with_one_line(tiny_ckpt, prompts_file, monkeypatch, capsys):
    def change_a_token(name, extra, data):
        if extra[-1] == "swap":
            data["requests"][3]["generated_ids"][2] += 1

    monkeypatch.setattr(sharing_bench, "run_script", lambda *a, **k: in_process(*a, **k, edit=change_a_token))
    with pytest.raises(SystemExit) as exit:
        sharing_bench.main(["--sections", "swap", "--prompts", str(prompts_file), "--preempt-prompts", "5",
                            "--ckpt-dir", str(tiny_ckpt)])
    assert exit.value.code == 1
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "--preempt swap and recompute disagree: request 3 generates different token ids from its token 2 on")


@pytest.mark.parametrize("argv, message", [(["--sections", "beams"], "--sections takes names from"),
                                           (["--prompts", "no-such.json"], "no prompts file no-such.json")])
def test_bad_arguments_get_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        sharing_bench.parse_args(argv)
    assert exit.value.code == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err
