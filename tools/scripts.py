"""The scripts, from a tool: import one as a module (its main() does not run), call its functions with
its errors turned into the tool's one-line error, run it as a user would (a subprocess), and read the shipped
prompts' real Llama 3 lengths with its own tokenizer and chat format.

    from scripts import load_script
    paged = load_script("paged")  # "naive", "paged", "swap", "prefix", "samples" or "beams"
"""
import importlib.resources
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cli import fail

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"naive": ROOT / "llama3-naive.py", "paged": ROOT / "llama3-paged.py"}
# The rungs above llama3-paged.py, by the lesson each adds: llama3-paged-swap.py, ...
SCRIPTS |= {name: ROOT / f"llama3-paged-{name}.py" for name in ("swap", "prefix", "samples", "beams")}
DEFAULT_PROMPTS = ROOT / "sharegpt-filtered.json"
DEFAULT_CKPT = ROOT / "checkpoints" / "tiny"
DEFAULT_MAX_SEQ_LEN = 8192
# Llama-3-8B: 32 layers x 8 KV heads x 128 dims, K and V, bf16. The scripts' budgets are in its tokens.
LLAMA3_8B_KV_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2


def load_script(name):
    """A script as a module, by its name in SCRIPTS ('naive', 'paged', 'swap', 'prefix', 'samples', 'beams'),
    executed once per process and kept in sys.modules under its file name: llama3_naive, llama3_paged_swap, ..."""
    if name not in SCRIPTS:
        raise ValueError(f"unknown script {name!r}: expected one of {', '.join(SCRIPTS)}")
    path = SCRIPTS[name]
    module_name = path.stem.replace("-", "_")
    if module_name not in sys.modules:
        if not path.is_file():
            fail(f"{path} not found")
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # before exec: dataclasses look their module up by name
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
    return sys.modules[module_name]


def call_script(fn, *args):
    """Call a script's function that may end in its fail(); its message becomes this tool's one-line error."""
    try:
        return fn(*args)
    except SystemExit as e:
        if isinstance(e.code, str):
            fail(e.code.split(": error: ", 1)[-1])
        raise


def tokenizer_path():
    """The genuine Llama 3 tokenizer.model shipped in the llama-models package."""
    try:
        path = Path(str(importlib.resources.files("llama_models") / "llama3" / "tokenizer.model"))
    except ModuleNotFoundError:
        fail("llama-models is not installed (pip install llama-models): it ships Llama 3's tokenizer.model")
    if not path.is_file():
        fail(f"{path} not found in the llama-models package")
    return path


def prompt_lengths(prompts=DEFAULT_PROMPTS, n=None, max_seq_len=DEFAULT_MAX_SEQ_LEN):
    """[(p, g)] for the first n prompts (all when n is None), as the scripts see them with --ref-lengths:
    p = len(encode_chat(first human turn)), g = tokens the request generates = max(1, reference answer
    tokens), capped so that p + g <= max_seq_len."""
    paged = load_script("paged")
    tokenizer = call_script(paged.load_tokenizer, tokenizer_path())
    if n is None:  # as many as the file has: load_prompts says how many when asked for more
        try:
            entries = json.loads(Path(prompts).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            entries = []  # load_prompts below says what is wrong with the file
        n = max(1, len(entries) if isinstance(entries, list) else 1)
        try:
            texts = paged.load_prompts(prompts, n, tokenizer)
        except SystemExit as e:
            found = re.search(r"but .* has (\d+) \(", str(e.code))
            if not found or found.group(1) == "0":
                call_script(paged.load_prompts, prompts, n, tokenizer)  # reports the error
            texts = call_script(paged.load_prompts, prompts, int(found.group(1)), tokenizer)
    else:
        texts = call_script(paged.load_prompts, prompts, n, tokenizer)
    lengths = []
    for i, (text, ref_length) in enumerate(texts):
        p = len(paged.encode_chat(tokenizer, text))
        if p >= max_seq_len:
            fail(f"prompt {i} has {p} tokens: no room to generate within --max-seq-len {max_seq_len}")
        lengths.append((p, min(max(1, ref_length), max_seq_len - p)))
    return lengths


def require_checkpoint(ckpt_dir):
    """Check that the real runs have a checkpoint. The default tiny one is written on first use (a few
    seconds), as tools/cpu_demo.sh does, so a fresh clone runs every tool in one command."""
    if (Path(ckpt_dir) / "params.json").is_file():
        return
    if Path(ckpt_dir).resolve() != DEFAULT_CKPT:
        fail(f"no checkpoint in {ckpt_dir}: make one with python tools/make_checkpoint.py {ckpt_dir}")
    import make_checkpoint
    print(f"writing the tiny checkpoint to {DEFAULT_CKPT} (first use)", file=sys.stderr, flush=True)
    make_checkpoint.write_checkpoint(str(DEFAULT_CKPT), preset="tiny", seed=0)


def run_script(name, n, ckpt_dir, budget_tokens, max_seq_len, threads, prompts=None, block_size=None, extra=()):
    """One real run of a script (a name in SCRIPTS) on N prompts with --ref-lengths --quiet --json,
    torch limited to `threads` threads, and any `extra` arguments. Returns {rc, stderr (its last line),
    stderr_lines, json (None when it failed), seconds (the whole process)}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        cmd = [sys.executable, str(SCRIPTS[name]), str(n), "--ckpt-dir", str(ckpt_dir), "--ref-lengths", "--quiet",
               "--kv-budget-tokens", str(budget_tokens), "--max-seq-len", str(max_seq_len), "--json", str(out)]
        if prompts:
            cmd += ["--prompts", str(prompts)]
        if block_size:
            cmd += ["--block-size", str(block_size)]
        cmd += [str(arg) for arg in extra]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
        except subprocess.TimeoutExpired:
            fail(f"{SCRIPTS[name].name} {n} ran for over an hour")
        seconds = time.perf_counter() - start
        data = json.loads(out.read_text()) if proc.returncode == 0 and out.is_file() else None
    lines = proc.stderr.strip().splitlines()
    return {"rc": proc.returncode, "stderr": lines[-1] if lines else "", "stderr_lines": len(lines), "json": data,
            "seconds": seconds}
