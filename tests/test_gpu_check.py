"""tools/gpu_check.py on a machine without a GPU: it says so in one line; and its runs, driven through the scripts'
own generate() with the tiny checkpoint on the CPU at a small scale, report what the requests' token counts say."""
import json
import subprocess
import sys

import pytest
import torch

import gpu_check
import make_checkpoint
from conftest import ROOT, pin_cpu_path
from load_scripts import load_script
from replay import replay

naive, paged = load_script("naive"), load_script("paged")
SCALE = {"budget_tokens": 2 * 160, "max_seq_len": 160, "naive_batch": 2, "paged_runs": [("pytorch", 16, 3),
         ("flash-attn", 256, 3)], "throughput_requests": 3}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_a_gpu_it_says_so_in_one_line():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py")], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "needs a CUDA GPU" in result.stderr, result.stderr


def test_the_runs_at_a_small_scale(tiny_ckpt, monkeypatch):
    """Naive fits 2 requests of 160 tokens in a budget of 320, not 3; paged runs 3, preempting as a replay of its loop
    does; flash-attn is skipped with its reason; every run generates what the prompts' reference answers say
    (counted here from the prompts file)."""
    pin_cpu_path(monkeypatch, naive, paged)
    monkeypatch.setattr(paged, "flash_attn_with_kvcache", None)  # as on a machine without flash-attn
    tokenizer = paged.load_tokenizer(tiny_ckpt / "tokenizer.model")
    model = paged.load_model(tiny_ckpt)
    model["rope_cos"], model["rope_sin"] = paged.rope_tables(model, SCALE["max_seq_len"])
    rows, skipped, (naive_rate, paged_rate, waves) = gpu_check.check(naive, paged, model, tokenizer, SCALE)

    entries = json.loads((ROOT / "sharegpt-filtered.json").read_text())[:3]
    want = []
    for entry in entries:
        prompt = len(paged.encode_chat(tokenizer, entry["conversations"][0]["value"]))
        answer = len(tokenizer.encode_ordinary(entry["conversations"][1]["value"].strip()))
        want.append(min(max(1, answer), SCALE["max_seq_len"] - prompt))
    two, three, paged_row = rows
    assert (two["script"], two["requests"], two["finished"], two["generated"]) == ("naive", 2, 2, sum(want[:2]))
    assert three["requests"] == 3 and "needs 3 x 160 = 480 tokens" in three["failed"]
    assert (paged_row["script"], paged_row["block"], paged_row["finished"]) == ("paged", 16, 3)
    lengths = [(len(paged.encode_chat(tokenizer, e["conversations"][0]["value"])), g) for e, g in zip(entries, want)]
    assert paged_row["preemptions"] == replay(lengths, 320, 16, 160)["preemptions"] > 0, "as its loop replayed says"
    assert paged_row["generated"] == sum(want) and paged_row["median_step"] > 0 and "peak_bytes" not in paged_row
    assert skipped == ["paged with flash-attn at block 256: flash-attn is not installed"]
    assert waves == 2 and naive_rate > 0 and paged_rate > 0
    assert [cells[4] for cells in gpu_check.table(rows, 0.001)] == ["2/2", "exits 1", "3/3"]


def test_weight_bytes_count_every_weight_once(tiny_ckpt, monkeypatch):
    """The tiny checkpoint's parameters, counted from its shapes, in float32 on the CPU; its output layer is tied to
    the embeddings and counted once."""
    pin_cpu_path(monkeypatch, paged)
    assert gpu_check.weight_bytes(paged.load_model(tiny_ckpt)) == 4 * make_checkpoint.param_count("tiny")


def test_flash_attn_is_skipped_with_its_reason(monkeypatch):
    monkeypatch.setattr(paged, "flash_attn_with_kvcache", lambda *args, block_table=None: None)
    monkeypatch.setattr(paged, "KERNEL", "pytorch")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert gpu_check.flash_attn_reason(paged) == "flash-attn 2 runs on Ampere GPUs or newer"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert gpu_check.flash_attn_reason(paged) == "this flash-attn is older than 2.5: its kernel takes no block table"
    monkeypatch.setattr(paged, "KERNEL", "flash-attn")
    assert gpu_check.flash_attn_reason(paged) is None


def test_bandwidth_of_a_copy_is_measured():
    assert gpu_check.bandwidth("cpu", size=2**20, repeats=3) > 1e6  # bytes per second: any machine moves more
