"""What the scripts do on a GPU, checked on the CPU with torch.cuda's calls stood in for: the choice of kernel and
dtype, the default KV budget against what a step really allocates (counted as on a GPU by tools/memory_tally.py),
the report's GPU line, the one-line errors a GPU run can meet, and the progress line that only a terminal sees.
The three scripts share all of this word for word (tests/test_twins.py), so llama3-paged.py's is tested where one
script stands for all."""
import os
import pty
import select
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, pin_cpu_path
from load_scripts import load_script
from memory_tally import MemoryTally

naive, paged = load_script("naive"), load_script("paged")


# --- The kernel and the dtype ---------------------------------------------------------------------------------

def flash_attn_2_6(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                   cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None, causal=False,
                   window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                   return_softmax_lse=False):
    """flash_attn_with_kvcache's signature in flash-attn 2.6 (2.5 added block_table)."""


def flash_attn_2_4(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                   cache_batch_idx=None, softmax_scale=None, causal=False, window_size=(-1, -1),
                   rotary_interleaved=True, alibi_slopes=None, num_splits=0):
    """flash_attn_with_kvcache's signature in flash-attn 2.4: no block_table, so no paged cache."""


@pytest.mark.parametrize("capability,flash,kernel,dtype", [
    (None, flash_attn_2_6, "pytorch", torch.float32),        # a CPU
    ((8, 0), flash_attn_2_6, "flash-attn", torch.bfloat16),  # A100
    ((8, 9), flash_attn_2_6, "flash-attn", torch.bfloat16),  # RTX 4090
    ((9, 0), flash_attn_2_6, "flash-attn", torch.bfloat16),  # H100, H200
    ((7, 5), flash_attn_2_6, "pytorch", torch.float16),      # T4: flash-attn 2 refuses it; no native bfloat16
    ((7, 0), None, "pytorch", torch.float16),                # V100, flash-attn not installed
    ((8, 6), flash_attn_2_4, "pytorch", torch.bfloat16),     # A10 with a flash-attn too old for a block table
    ((8, 6), None, "pytorch", torch.bfloat16),               # A10, flash-attn not installed
], ids=["cpu", "a100", "rtx4090", "h100", "t4", "v100-no-flash", "a10-flash-2.4", "a10-no-flash"])
def test_kernel_and_dtype_follow_what_the_device_can_do(capability, flash, kernel, dtype):
    chosen, name, chosen_dtype = paged.choose_kernel(flash, capability)
    assert (name, chosen_dtype) == (kernel, dtype)
    assert chosen is (flash if kernel == "flash-attn" else paged.attention_torch)


# --- The GPU budget -------------------------------------------------------------------------------------------

SHAPES = {  # (dim, n_heads, n_kv_heads, FFN hidden size, tied output): one layer of each is enough
    "llama-3-8b": (4096, 32, 8, 14336, False),
    "llama-3.2-1b": (2048, 32, 8, 8192, True),
}


def one_layer_model(module, dim, n_heads, n_kv_heads, hidden, tied, max_seq_len, dtype=torch.bfloat16):
    """A model dict of one layer with a real model's shapes; its weights are never read (the tally skips compute)."""
    empty = lambda *shape: torch.empty(*shape, dtype=dtype)
    head_dim = dim // n_heads
    layer = dict(wq=empty(dim, dim), wk=empty(n_kv_heads * head_dim, dim), wv=empty(n_kv_heads * head_dim, dim),
                 wo=empty(dim, dim), w1=empty(hidden, dim), w2=empty(dim, hidden), w3=empty(hidden, dim),
                 attention_norm=empty(dim), ffn_norm=empty(dim))
    model = dict(n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, norm_eps=1e-5, vocab_size=128256,
                 layers=[layer], rope_theta=500000.0, use_scaled_rope=False, tok_embeddings=empty(128256, dim),
                 norm=empty(dim), kv_bytes_per_token=2 * 32 * n_kv_heads * head_dim * 2)
    model["output"] = model["tok_embeddings"] if tied else empty(128256, dim)
    model["rope_cos"], model["rope_sin"] = module.rope_tables(model, max_seq_len)
    return model


def forward_peak(module, model, batch, seqlen, cached, block_size=16):
    """The most bytes forward() holds at once for `batch` requests of `seqlen` new tokens after `cached` ones."""
    width = -(-(cached + seqlen) // block_size)
    pool = torch.empty(1, width, block_size, model["n_kv_heads"], model["head_dim"], dtype=torch.bfloat16)
    table = torch.arange(width, dtype=torch.int32).expand(batch, width)  # every row reads the same blocks: same bytes
    tokens = torch.zeros(batch, seqlen, dtype=torch.long)
    with MemoryTally(skip_compute=True) as tally:
        module.forward(model, tokens, torch.full((batch,), cached, dtype=torch.int32), (pool, pool), block_table=table)
    return tally.peak


@pytest.mark.parametrize("max_seq_len,batch", [(8192, 512), (512, 8192)], ids=["long prefill", "large batch"])
@pytest.mark.parametrize("shape", SHAPES)
def test_gpu_budget_leaves_room_for_the_largest_step(shape, max_seq_len, batch, monkeypatch):
    """With torch.cuda's free memory stood in for, the budget is that memory less what a step needs beside the pool:
    at least what forward() really allocates, counted as on a GPU, in a prefill of max_seq_len tokens (a preempted
    request recomputes all it has) or a decode step of the largest batch, besides the 256 MiB the docstring allows
    for CUDA's own libraries (not counted here); and not wildly more."""
    monkeypatch.setattr(paged, "DTYPE", torch.bfloat16)
    model = one_layer_model(paged, *SHAPES[shape], max_seq_len)
    free = 40 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * 2**30))
    budget = paged.gpu_budget_tokens(model, max_seq_len, batch)
    step_bytes = free - budget * model["kv_bytes_per_token"]  # what the budget leaves beside the pool, to a token
    needed = max(forward_peak(paged, model, 1, max_seq_len, 0), forward_peak(paged, model, batch, 1, max_seq_len - 1))
    assert needed <= step_bytes - 2**28 <= 2 * needed, f"a step allocates {needed / 2**20:.0f} MiB, the budget leaves " \
                                                        f"{(step_bytes - 2**28) / 2**20:.0f} MiB besides CUDA's"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (step_bytes // 2, 80 * 2**30))
    assert paged.gpu_budget_tokens(model, max_seq_len, batch) == 0, "less free memory than a step needs: no KV at all"


def test_the_pool_never_outgrows_what_the_requests_can_hold():
    """A budget of a whole large GPU, for 3 requests of at most 100 tokens: 3 x 7 blocks of 16, not millions."""
    args = paged.parse_args(["3", "--max-seq-len", "100", "--block-size", "16"])
    no_layers = {"layers": [], "n_kv_heads": 0, "head_dim": 0}
    _, manager = paged.make_kv_cache(no_layers, 10**9, 3, args)
    assert manager.num_blocks == 3 * 7 and len(manager.free_blocks) == 21


# --- The report's GPU line and the errors of a GPU run ----------------------------------------------------------

def test_report_shows_the_peak_gpu_memory_on_a_gpu(monkeypatch, capsys):
    stats = dict(requests=2, finished=2, generated_tokens=10, wall_seconds=1.0, decode_steps=5, kernel="flash-attn",
                 dtype="bfloat16", kv_budget_tokens=1000, peak_reserved_tokens=512, peak_used_tokens=500,
                 reserved_at_peak_use=512, kv_bytes_per_token=131072, block_size=256, num_blocks=3, preemptions=0,
                 manager_seconds=0.001)
    paged.report(stats, "llama3-paged.py")
    assert "GPU" not in capsys.readouterr().out, "no GPU line on a CPU"
    monkeypatch.setattr(paged, "DEVICE", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 23_400_000_000)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10**9, 25_757_220_864))
    paged.report(stats, "llama3-paged.py")
    out = capsys.readouterr().out
    assert "attention kernel:      flash-attn, bfloat16" in out
    assert "peak GPU memory:       23.4 GB of the GPU's 25.8 GB" in out


def test_out_of_gpu_memory_while_loading_the_weights_is_one_line(tiny_ckpt, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1002.00 MiB.")
    monkeypatch.setattr(torch.Tensor, "to", out_of_memory)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 16_000_000_000))
    with pytest.raises(SystemExit, match=r"the weights in .* do not fit in the GPU's 16 GB$"):
        paged.load_model(tiny_ckpt)


def run_with_kernel(module, tiny_ckpt, kernel_name, error, monkeypatch):
    """main() with an attention kernel that raises `error` at its first call."""
    def kernel(*args, **kwargs):
        raise error
    pin_cpu_path(monkeypatch, module)
    monkeypatch.setattr(module, "attention", kernel)
    monkeypatch.setattr(module, "KERNEL", kernel_name)
    module.main(["2", "--ckpt-dir", str(tiny_ckpt), "--ref-lengths", "--quiet", "--max-seq-len", "300",
                 *(["--block-size", "256"] if module is not naive else [])])


@pytest.mark.parametrize("module", [naive, paged], ids=["naive", "paged"])
def test_flash_attn_refusing_the_gpu_is_one_line(module, tiny_ckpt, monkeypatch):
    refusal = RuntimeError("FlashAttention only supports Ampere GPUs or newer.")
    with pytest.raises(SystemExit, match="the run stopped on the GPU: FlashAttention only supports Ampere GPUs"):
        run_with_kernel(module, tiny_ckpt, "flash-attn", refusal, monkeypatch)


def test_out_of_gpu_memory_in_a_step_is_one_line(tiny_ckpt, monkeypatch):
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
    with pytest.raises(SystemExit, match="the run stopped on the GPU: CUDA out of memory. Tried to allocate 2.00 GiB"):
        run_with_kernel(paged, tiny_ckpt, "pytorch", oom, monkeypatch)


def test_a_bug_in_the_pytorch_attention_keeps_its_traceback(tiny_ckpt, monkeypatch):
    """Only a GPU's errors become one line: a RuntimeError of the PyTorch path is a bug to see whole."""
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_with_kernel(paged, tiny_ckpt, "pytorch", RuntimeError("shape mismatch"), monkeypatch)


# --- The progress line ---------------------------------------------------------------------------------------------

def run_on_a_terminal(script, *args):
    """Run a script with its stderr on a pseudo-terminal (stdout a pipe); returns (stdout, what the terminal got)."""
    main, terminal = pty.openpty()
    process = subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=terminal, text=True)
    os.close(terminal)
    seen = b""
    while True:
        ready, _, _ = select.select([main], [], [], 60)
        if not ready:
            process.kill()
            pytest.fail("no output from the terminal for 60 s")
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the script closed it
            break
        if not chunk:
            break
        seen += chunk
    stdout = process.communicate(timeout=60)[0]
    os.close(main)
    assert process.returncode == 0, seen.decode()
    return stdout, seen.decode()


@pytest.mark.parametrize("script,unit", [("llama3-naive.py", "rows reserved"), ("llama3-paged.py", "blocks in use")])
def test_progress_line_on_a_terminal(script, unit, tiny_ckpt):
    args = [3, "--ckpt-dir", tiny_ckpt, "--ref-lengths", "--quiet", "--max-seq-len", 96, "--kv-budget-tokens", 400]
    stdout, terminal = run_on_a_terminal(script, *args)
    lines = terminal.split("\r")
    steps = [line for line in lines if line.startswith("decode step ")]
    assert len(steps) > 10 and all(unit in line for line in steps), terminal[:300]
    assert steps[0].startswith("decode step 1: 3 running")
    assert "3 of 3 finished" in steps[-1] and terminal.endswith("\n"), "the last line says all finished, then ends"
    assert f"=== {script} ===" in stdout and "\rdecode step" not in stdout
    # What a terminal shows after each rewrite is that step's line alone, never the end of a longer one before it.
    shown, shorter = "", 0
    for line, before in zip(steps[1:], steps):
        shown = on_screen(shown, line)
        shorter += len(line) < len(before)
        assert shown == line.removesuffix("\x1b[K").rstrip("\n"), f"{shown!r} on screen after {line!r}"
    if "paged" in script:  # requests wait there, and "12 waiting" becomes "9 waiting"
        assert shorter, "no line was shorter than the one before: nothing here could be left on screen"


def on_screen(screen, text):
    """The one line a terminal shows after `text` (after a \\r) is written over `screen`: characters overwrite
    from the start, and ESC [ K erases from the cursor to the end of the line."""
    line, cursor, text = list(screen), 0, text.split("\n")[0]
    while text:
        if text.startswith("\x1b[K"):
            del line[cursor:]
            text = text[3:]
            continue
        line[cursor:cursor + 1] = [text[0]]
        cursor, text = cursor + 1, text[1:]
    return "".join(line)
    # Where stderr is not a terminal, nothing: tests/test_scripts.py's runs check that their stderr is empty.
