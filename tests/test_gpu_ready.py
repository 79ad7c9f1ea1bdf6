"""What the scripts do on a GPU, checked on the CPU with torch.cuda's calls stood in for: the choice of kernel and
dtype, the default KV budget against what a step really allocates (counted as on a GPU by tools/memory_tally.py),
the report's GPU line, the one-line errors a GPU run can meet, and the progress line that only a terminal sees.
The scripts share all of this word for word (tests/test_twins.py), so llama3-paged.py's is tested where one
script stands for all."""
import os
import pty
import select
import subprocess
import sys
import importlib.util

import pytest
import torch

import flash_attn_standin
from conftest import ROOT, pin_cpu_path
from load_scripts import load_script
from memory_tally import MemoryTally
from scripts import SCRIPTS

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


BROKEN_IMPORT = ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")


@pytest.mark.parametrize("capability,flash,kernel,dtype", [
    (None, flash_attn_2_6, "pytorch", torch.float32),        # a CPU
    ((8, 0), flash_attn_2_6, "flash-attn", torch.bfloat16),  # A100
    ((8, 9), flash_attn_2_6, "flash-attn", torch.bfloat16),  # RTX 4090
    ((9, 0), flash_attn_2_6, "flash-attn", torch.bfloat16),  # H100, H200
    ((7, 5), flash_attn_2_6, "pytorch", torch.float16),      # T4: flash-attn 2 refuses it; no native bfloat16
    ((7, 0), None, "pytorch", torch.float16),                # V100, flash-attn not installed
    ((8, 6), flash_attn_2_4, "pytorch", torch.bfloat16),     # A10 with a flash-attn too old for a block table
    ((8, 6), None, "pytorch", torch.bfloat16),               # A10, flash-attn not installed
    ((8, 0), BROKEN_IMPORT, "flash-attn", torch.bfloat16),   # A100, flash-attn installed but failing to import:
    ((7, 5), BROKEN_IMPORT, "pytorch", torch.float16),       # check_kernel() says why; a T4 would not use it
], ids=["cpu", "a100", "rtx4090", "h100", "t4", "v100-no-flash", "a10-flash-2.4", "a10-no-flash", "a100-broken-flash",
        "t4-broken-flash"])
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


# main() is the same in every paged rung but for its report lines (the kernel check before the weights load, the
# one-line OOM): llama3-paged-beams.py stands for the rungs, its generate() the one furthest from llama3-paged.py's.
beams = load_script("beams")
MODULES = {"naive": naive, "paged": paged, "beams": beams}
PAGED_RUNGS = ["paged", "swap", "prefix", "samples", "beams"]


def kernel_raising(error, after_calls=0, kernel=flash_attn_standin.flash_attn_with_kvcache):
    """A kernel that is `kernel` (by default the stand-in) for its first `after_calls` calls, then raises `error`."""
    calls = []

    def raising(*args, **kwargs):
        calls.append(1)
        if len(calls) > after_calls:
            raise error
        return kernel(*args, **kwargs)
    return raising


def run_main(module, tiny_ckpt, kernel_name, kernel, monkeypatch, loads, *options):
    """main() on 2 prompts with this kernel as chosen (flash-attn: in bfloat16, as on a GPU); each checkpoint it
    loads is appended to `loads`."""
    load_weights = module.load_model

    def load_model(ckpt_dir):
        loads.append(ckpt_dir)
        return load_weights(ckpt_dir)
    pin_cpu_path(monkeypatch, module)
    monkeypatch.setattr(module, "load_model", load_model)
    monkeypatch.setattr(module, "attention", kernel)
    monkeypatch.setattr(module, "KERNEL", kernel_name)
    if kernel_name == "flash-attn":
        monkeypatch.setattr(module, "DTYPE", torch.bfloat16)
    module.main(["2", "--ckpt-dir", str(tiny_ckpt), "--ref-lengths", "--quiet", "--max-seq-len", "300",
                 *(["--block-size", "256"] if hasattr(module, "KVCacheManager") else []), *map(str, options)])


def one_line(excinfo):
    message = str(excinfo.value.code)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("name", MODULES)
def test_flash_attn_refusing_the_gpu_is_one_line_before_the_weights_load(name, tiny_ckpt, monkeypatch):
    """Its refusal at the tiny trial call: one line, naming the reason and how to run without it; no weight loaded."""
    refusal = RuntimeError("FlashAttention only supports Ampere GPUs or newer.\nException raised from mha_fwd_kvcache")
    loads = []
    with pytest.raises(SystemExit) as excinfo:
        run_main(MODULES[name], tiny_ckpt, "flash-attn", kernel_raising(refusal), monkeypatch, loads)
    assert one_line(excinfo).endswith("error: flash-attn fails on this GPU (RuntimeError: FlashAttention only supports "
                                      "Ampere GPUs or newer.): pip uninstall flash-attn to run with the PyTorch attention")
    assert loads == [], "the weights were loaded before the kernel was tried"


def test_the_trial_call_keeps_flash_attns_contract(tiny_ckpt, monkeypatch):
    """The stand-in, which refuses what the kernel would, accepts the trial call: the run goes on to load and finish."""
    loads = []
    run_main(paged, tiny_ckpt, "flash-attn", kernel_raising(None, after_calls=10**9), monkeypatch, loads)
    assert loads == [str(tiny_ckpt)]


def fake_flash_attn(tmp_path, init):
    """A folder holding a package named flash_attn whose __init__.py is `init`."""
    (tmp_path / "flash_attn").mkdir()
    (tmp_path / "flash_attn" / "__init__.py").write_text(init)
    return tmp_path


def fresh_copy(name, monkeypatch, path=None):
    """A fresh import of a script (not the one load_script keeps), with `path` first on sys.path."""
    if path is not None:
        monkeypatch.syspath_prepend(str(path))
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # whatever this import leaves there goes after the test
    del sys.modules["flash_attn"]
    spec = importlib.util.spec_from_file_location(f"fresh_{name}", SCRIPTS[name])
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


BROKEN = {  # a flash_attn that is there but does not import, as a build for another torch or CUDA does
    "undefined symbol": ('raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")',
                         "ImportError: flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi"),
    "missing extension": ("import flash_attn_2_cuda", "ModuleNotFoundError: No module named 'flash_attn_2_cuda'"),
    "no kvcache kernel": ("def flash_attn_func(): pass", "ImportError: cannot import name 'flash_attn_with_kvcache'"),
}


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("broken", BROKEN)
def test_a_broken_flash_attn_install_is_one_line_before_the_weights_load(name, broken, tiny_ckpt, tmp_path,
                                                                         monkeypatch):
    """Installed but failing to import is not "not installed": on a GPU where flash-attn would be chosen, the run
    stops in one line that says why, before any weight loads; where it would not be (a T4), it runs without it."""
    init, reason = BROKEN[broken]
    module = fresh_copy(name, monkeypatch, fake_flash_attn(tmp_path, init))
    assert isinstance(module.flash_attn_with_kvcache, ImportError)
    chosen, kernel_name, _ = module.choose_kernel(module.flash_attn_with_kvcache, (8, 0))
    assert kernel_name == "flash-attn" and chosen is module.flash_attn_with_kvcache
    assert module.choose_kernel(module.flash_attn_with_kvcache, (7, 5))[1] == "pytorch"
    loads = []
    with pytest.raises(SystemExit) as excinfo:
        run_main(module, tiny_ckpt, "flash-attn", chosen, monkeypatch, loads)
    message = one_line(excinfo)
    assert f"error: flash-attn fails to import ({reason}" in message, message
    assert message.endswith("pip uninstall flash-attn to run with the PyTorch attention")
    assert loads == []


def test_flash_attn_not_installed_is_none(monkeypatch, tmp_path):
    """No flash_attn at all (an empty folder first on the path stands for this machine, as it has none): None, and
    the PyTorch attention on every GPU."""
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    module = fresh_copy("paged", monkeypatch, tmp_path)
    assert module.flash_attn_with_kvcache is None
    assert module.choose_kernel(None, (9, 0))[1] == "pytorch"


@pytest.mark.parametrize("name", PAGED_RUNGS)  # each rung has its own parse_args, where the check is
def test_a_block_size_is_checked_before_the_weights_load(name, tiny_ckpt, monkeypatch):
    module, loads = load_script(name), []
    for kernel_name, kernel, size, refusal in (
            ("pytorch", module.attention_torch, 0, "--block-size must be positive, "),
            ("flash-attn", flash_attn_standin.flash_attn_with_kvcache, 128, "paged kernel a multiple of 256, got 128$")):
        with pytest.raises(SystemExit, match=refusal):
            run_main(module, tiny_ckpt, kernel_name, kernel, monkeypatch, loads, "--block-size", size)
    assert loads == []


@pytest.mark.parametrize("kernel_name", ["pytorch", "flash-attn"])
@pytest.mark.parametrize("name", MODULES)
def test_out_of_gpu_memory_in_a_step_is_one_line(name, kernel_name, tiny_ckpt, monkeypatch):
    """(With flash-attn, after its trial call.)"""
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nGPU 0 has a total capacity")
    with pytest.raises(SystemExit) as excinfo:
        run_main(MODULES[name], tiny_ckpt, kernel_name, kernel_raising(oom, after_calls=int(kernel_name == "flash-attn")),
                 monkeypatch, [])
    assert one_line(excinfo).endswith("the run stopped on the GPU: CUDA out of memory. Tried to allocate 2.00 GiB.")


@pytest.mark.parametrize("kernel_name", ["pytorch", "flash-attn"])
@pytest.mark.parametrize("name", MODULES)
def test_any_other_error_in_a_run_keeps_its_traceback(name, kernel_name, tiny_ckpt, monkeypatch):
    """Only out of memory becomes one line during a run: any other RuntimeError, of either kernel, is a bug to see
    whole (here, after the flash-attn kernel passed its trial and ran a few calls)."""
    module = MODULES[name]
    bug = RuntimeError("CUDA error: an illegal memory access was encountered")
    passing = flash_attn_standin.flash_attn_with_kvcache if kernel_name == "flash-attn" else module.attention_torch
    with pytest.raises(RuntimeError, match="CUDA error: an illegal memory access was encountered"):
        run_main(module, tiny_ckpt, kernel_name, kernel_raising(bug, after_calls=3, kernel=passing), monkeypatch, [])


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
