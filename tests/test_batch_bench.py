"""tools/batch_bench.py at a tiny scale: its table is what its own measurements give with the bytes and FLOPs of a
decode step counted here from the checkpoint's tensors; its computed GPU crossing is Llama-3-8B's, counted here from
its published shape; it goes on doubling the batch while a token gets cheaper; bad arguments get one line."""
import json
import math
import re
import subprocess
import sys

import pytest
import torch

import batch_bench
from conftest import ROOT
from load_scripts import load_script

paged = load_script("paged")


def decode_context_of_shipped_prompts():
    """Cached tokens per request at every decode step of the shipped prompts with --ref-lengths, step by step: the
    prefill gives a request its first token; each decode then feeds the newest, with all before it cached."""
    import make_checkpoint
    tokenizer = paged.load_tokenizer(make_checkpoint.tokenizer_source())
    cached = []
    for entry in json.loads((ROOT / "sharegpt-filtered.json").read_text(encoding="utf-8")):
        turns = entry["conversations"]
        user = next(i for i, t in enumerate(turns) if t["from"] == "human" and t["value"].strip())
        answer = next((t["value"] for t in turns[user + 1:] if t["from"] == "gpt"), "")
        held = len(paged.encode_chat(tokenizer, turns[user]["value"]))  # the prompt, all cached by the prefill
        for _ in range(max(1, len(tokenizer.encode_ordinary(answer.strip()))) - 1):  # one decode per later token
            cached.append(held)
            held += 1
    return sum(cached) / len(cached)


def table_rows(stdout, first_header):
    """The cells of the printed table whose header starts with first_header."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_header))
    rows = []
    for line in lines[start + 2:]:
        if not line.strip():
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def close(printed, expected, rel=1e-3):
    return math.isclose(float(printed), expected, rel_tol=rel)


def test_the_table_is_its_measurements_over_the_counts(tiny_ckpt, tmp_path):
    out, data_path = tmp_path / "b.png", tmp_path / "b.json"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "batch_bench.py"), "--ckpt-dir", str(tiny_ckpt),
                             "--up-to", "4", "--max-batch", "4", "--steps", "3", "--out", str(out), "--json",
                             str(data_path)], capture_output=True, text=True, timeout=100, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(data_path.read_text())

    # What one decode step reads and computes, counted here from the checkpoint's own tensors.
    params = json.loads((tiny_ckpt / "params.json").read_text())
    weights = torch.load(tiny_ckpt / "consolidated.00.pth", weights_only=True)
    assert "output.weight" not in weights  # tied: the embedding table is the output layer, read whole once
    layers, heads, kv_heads = params["n_layers"], params["n_heads"], params["n_kv_heads"]
    head_dim = params["dim"] // heads
    matrices = sum(w.numel() for name, w in weights.items() if w.dim() == 2)  # the layers' and the output layer
    norms = sum(w.numel() for w in weights.values() if w.dim() == 1)
    itemsize = paged.DTYPE.itemsize
    weight_bytes = (matrices + norms) * itemsize
    context = round(decode_context_of_shipped_prompts())
    keys = context + 1
    flops_per_request = 2 * matrices + 4 * heads * head_dim * keys * layers
    kv_bytes_per_request = 2 * layers * kv_heads * head_dim * keys * itemsize
    assert f"context: {context} cached tokens per request" in result.stdout
    assert f"{matrices:,} parameters in matmuls" in result.stdout

    copy, rate = data["copy_bandwidth"], data["matmul_rate"]
    rows = table_rows(result.stdout, "batch  ")
    assert [int(r[0]) for r in rows] == [m["batch"] for m in data["measured"]] == [1, 2, 4]
    for cells, m in zip(rows, data["measured"]):
        b, times = m["batch"], m["step_seconds"]
        assert len(times) == 3
        step = sorted(times)[1]
        weight_read, arithmetic = weight_bytes / copy, b * flops_per_request / rate
        assert close(cells[1], 1e3 * step) and close(cells[2], b / step)
        assert close(cells[3], 1e3 * weight_read) and close(cells[4], 1e3 * arithmetic), cells
        assert close(cells[5], 1e3 * b * kv_bytes_per_request / copy)
        assert close(cells[6], step / max(weight_read, arithmetic), rel=5e-3)
    cross = float(re.search(r"the two bounds cross at batch ([\d.]+)", result.stdout).group(1))
    assert cross == pytest.approx((weight_bytes / copy) / (flops_per_request / rate), abs=0.051)

    # Computed for Llama-3-8B in bf16: 32 layers of 4096 wide, 8 KV heads of 128, FFN 14336, 128,256 tokens, untied.
    layer_matrices = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336
    matrices_8b = 32 * layer_matrices + 128_256 * 4096  # the output layer; the embedding table is only indexed
    bytes_8b = 2 * (matrices_8b + (2 * 32 + 1) * 4096)
    flops_8b = 2 * matrices_8b + 4 * 32 * 128 * keys * 32
    gpus = table_rows(result.stdout, "GPU  ")
    assert [g[0] for g in gpus] == ["RTX 4090", "H100 SXM"]
    for cells, (bandwidth, tflops) in zip(gpus, [(1.008e12, 165.2), (3.35e12, 989.4)]):
        assert close(cells[1], bandwidth / 1e12) and cells[2].startswith(f"{tflops} (bf16 dense")
        assert close(cells[3], 1e3 * bytes_8b / bandwidth, rel=5e-3)
        batch = (bytes_8b / bandwidth) / (flops_8b / (tflops * 1e12))
        assert int(cells[5]) == round(batch)
        assert close(cells[6], 1e3 * round(batch) * 2 * 32 * 8 * 128 * keys * 2 / bandwidth, rel=5e-3)


def test_it_doubles_the_batch_while_a_token_gets_cheaper(monkeypatch, tmp_path):
    """With steps of 32 ms up to batch 32 and 1 ms a request beyond, a token costs half as much each doubling to 32
    (past --up-to 8: go on) and as much at 64 as at 32: stop there, having measured it; or at --max-batch."""
    step = lambda batch: 0.001 * max(32, batch)
    monkeypatch.setattr(batch_bench, "time_decode_steps", lambda paged, model, batch, context, steps: [step(batch)] * steps)
    args = batch_bench.parse_args(["--up-to", "8", "--steps", "2", "--out", str(tmp_path / "unused.png")])
    assert [m["batch"] for m in batch_bench.measure(None, None, args, 100)] == [1, 2, 4, 8, 16, 32, 64]
    args = batch_bench.parse_args(["--up-to", "8", "--max-batch", "16", "--out", str(tmp_path / "unused.png")])
    assert [m["batch"] for m in batch_bench.measure(None, None, args, 100)] == [1, 2, 4, 8, 16]
    blip = lambda paged, model, batch, context, steps: [{32: 0.0384, 64: 0.0608}.get(batch, 0.016)] * steps
    monkeypatch.setattr(batch_bench, "time_decode_steps", blip)  # a slow 32, then 64 only 5% cheaper than 16: stop
    args = batch_bench.parse_args(["--up-to", "64", "--out", str(tmp_path / "unused.png")])
    assert [m["batch"] for m in batch_bench.measure(None, None, args, 100)] == [1, 2, 4, 8, 16, 32, 64]
    flat = lambda paged, model, batch, context, steps: [0.001 * batch] * steps  # never cheaper: stop at --up-to
    monkeypatch.setattr(batch_bench, "time_decode_steps", flat)
    args = batch_bench.parse_args(["--up-to", "4", "--out", str(tmp_path / "unused.png")])
    assert [m["batch"] for m in batch_bench.measure(None, None, args, 100)] == [1, 2, 4]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be positive, got 0"),
    (["--up-to", "-2"], "--up-to must be positive, got -2"),
    (["--context", "0"], "--context must be positive, got 0"),
    (["--up-to", "128", "--max-batch", "64"], "--up-to 128 is past --max-batch 64"),
    (["--steps", "three"], "argument --steps: invalid int value: 'three'"),
    (["--ckpt-dir", "/nonexistent/ckpt"], "no checkpoint in /nonexistent/ckpt: make one with python "
                                          "tools/make_checkpoint.py /nonexistent/ckpt"),
    (["--out", "/proc/version/b.png"], "cannot write /proc/version/b.png"),
])
def test_bad_arguments_get_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        batch_bench.parse_args(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1 and message in err, err


def test_a_missing_checkpoint_from_the_command_line():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "batch_bench.py"), "--ckpt-dir", "/nonexistent"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == ("batch_bench.py: error: no checkpoint in /nonexistent: make one with python "
                             "tools/make_checkpoint.py /nonexistent\n")
