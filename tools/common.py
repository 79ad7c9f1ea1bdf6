"""Shared by the tools in this folder: load the two scripts as modules, read the shipped prompts'
real Llama 3 lengths, and replay the scripts' KV accounting without a model.

Nothing here runs on import. The replays reuse the scripts' own code (KVCacheManager, encode_chat,
load_prompts, load_tokenizer) and copy only the order of operations of their generate() loops, so
a replay's timeline is the one `--json` would write for the same requests with `--ref-lengths`
(bench.py checks this against real runs).
"""
import argparse
import importlib.resources
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"naive": ROOT / "llama3-naive.py", "paged": ROOT / "llama3-paged.py"}
DEFAULT_PROMPTS = ROOT / "sharegpt-filtered.json"
DEFAULT_CKPT = ROOT / "checkpoints" / "tiny"
DEFAULT_MAX_SEQ_LEN = 8192
# Llama-3-8B: 32 layers x 8 KV heads x 128 dims, K and V, bf16.
LLAMA3_8B_KV_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2

_modules = {}


def fail(message):
    """Bad input: one line on stderr naming the tool, exit status 1."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    sys.exit(1)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument gets one line (the tool's name and the problem) and exit 1."""
    def error(self, message):
        fail(message)


def pyplot():
    """matplotlib.pyplot, drawing to files only; one line and exit 1 if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        fail("matplotlib is not installed: pip install -r tools/requirements.txt")
    return plt


def save_figure(fig, out, dpi=110):
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi)
    except OSError as e:
        fail(f"cannot write {out}: {e.strerror or e}")


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


def run_main(main):
    """Run a tool's main(): Ctrl-C or a closed pipe (| head) end it with a one-line message, no traceback."""
    try:
        main()
    except KeyboardInterrupt:
        fail("interrupted")
    except BrokenPipeError:
        sys.stderr.close()  # nobody is reading; don't complain at exit either
        os._exit(1)


def check_out(path):
    """Fail now, before any work, if the figure cannot be written to path."""
    parent = Path(path).resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot write {path}: {e.strerror or e}")
    if not os.access(parent, os.W_OK) or Path(path).is_dir():
        fail(f"cannot write {path}")


def load_script(name):
    """llama3-naive.py or llama3-paged.py as a module ('naive' or 'paged'); main() does not run."""
    if name not in _modules:
        path = SCRIPTS[name]
        if not path.is_file():
            fail(f"{path} not found")
        module_name = f"llama3_{name}"
        if module_name in sys.modules:  # already imported, e.g. by the tests' loader
            _modules[name] = sys.modules[module_name]
            return _modules[name]
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # before exec: dataclasses look their module up by name
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
        _modules[name] = module
    return _modules[name]


def _script_call(fn, *args):
    """Call a script function that may exit through its fail(); re-raise as this tool's one-line error."""
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
    """[(p, g)] for the first n usable prompts (all when n is None), as the scripts see them with
    --ref-lengths: p = len(encode_chat(first human turn)), g = tokens the request generates
    = max(1, reference answer tokens), capped so that p + g <= max_seq_len."""
    paged = load_script("paged")
    tokenizer = _script_call(paged.load_tokenizer, tokenizer_path())
    if n is None:
        try:
            entries = json.loads(Path(prompts).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            entries = []  # load_prompts below says what is wrong with the file
        n = max(1, len(entries) if isinstance(entries, list) else 1)
        try:
            texts = paged.load_prompts(prompts, n, tokenizer)
        except SystemExit as e:
            found = re.search(r"has only (\d+) usable prompts", str(e.code))
            if not found:
                _script_call(paged.load_prompts, prompts, n, tokenizer)  # reports the error
            texts = _script_call(paged.load_prompts, prompts, int(found.group(1)), tokenizer)
    else:
        texts = _script_call(paged.load_prompts, prompts, n, tokenizer)
    lengths = []
    for i, (text, ref_length) in enumerate(texts):
        p = len(paged.encode_chat(tokenizer, text))
        if p >= max_seq_len:
            fail(f"prompt {i} has {p} tokens: no room to generate within --max-seq-len {max_seq_len}")
        lengths.append((p, min(max(1, ref_length), max_seq_len - p)))
    return lengths


def run_script(name, n, ckpt_dir, budget_tokens, max_seq_len, threads, prompts=None, block_size=None, extra=()):
    """One real run of llama3-{name}.py on N prompts with --ref-lengths --quiet --json, torch limited to
    `threads` threads, and any `extra` arguments. Returns {rc, stderr (its last line), stderr_lines, json (None when it failed),
    seconds (the whole process)}."""
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


# ---------------------------------------------------------------------------------------------
# Model-free replays of the two generate() loops.

def simulate_paged(lengths, budget_tokens, block_size, max_seq_len=DEFAULT_MAX_SEQ_LEN, stop_after_steps=None,
                   device="meta"):
    """Replay llama3-paged.py's generate() for requests [(p, g)], driving the real KVCacheManager.

    Each decode step appends one token to every running request, exactly as the script does with
    --ref-lengths, so no model is needed. The manager's device block table is never read here, so it
    lives on the 'meta' device (no memory). Returns a dict: timeline [(reserved, used)] per decode step,
    running [count] per decode step, preemptions, decode_steps, max_blocks [per request], failed (the
    request the script would stop on, else None), and, with stop_after_steps, the manager, each running
    request's cached tokens after that many decode steps (finished requests freed) and finished:
    [(decode step, request, its blocks)] for the requests that finished by then.
    """
    import torch
    paged = load_script("paged")
    num_blocks = budget_tokens // block_size
    manager = paged.KVCacheManager(num_blocks, block_size, -(-max_seq_len // block_size), torch.device(device))
    ntok = [p for p, _ in lengths]            # len(req.tokens): prompt + generated so far
    end = [p + g for p, g in lengths]         # len(req.tokens) when the request is done
    max_blocks = [0] * len(lengths)
    waiting = deque(range(len(lengths)))
    running = {}                              # request id -> None, in admission order (newest last)
    used = 0
    out = {"timeline": [], "running": [], "preemptions": 0, "decode_steps": 0, "failed": None,
           "num_blocks": num_blocks, "block_size": block_size}
    while waiting or running:
        # 1. Blocks for requests whose next token starts a new block; preempt the newest when none is free.
        preempted = False
        for rid in manager.blocks_due():
            while not manager.free_blocks and rid in manager.blocks:
                victim, _ = running.popitem()
                manager.free(victim)
                used -= ntok[victim] - 1
                waiting.appendleft(victim)
                out["preemptions"] += 1
                preempted = True
            if rid in manager.blocks:
                manager.append_block(rid)
                max_blocks[rid] = max(max_blocks[rid], len(manager.blocks[rid]))
        # 2. Admission while the head of the queue fits.
        admitted = []
        while waiting and not preempted and manager.can_allocate(ntok[waiting[0]] + 1):
            rid = waiting.popleft()
            manager.allocate(rid, ntok[rid] + 1)
            max_blocks[rid] = max(max_blocks[rid], len(manager.blocks[rid]))
            admitted.append(rid)
        if not running and not admitted:
            out["failed"] = waiting[0]
            break
        # 3. Prefill: the request's tokens are cached and it gets its next token.
        for rid in admitted:
            used += ntok[rid]
            ntok[rid] += 1
            running[rid] = None
        # 4. One decode step for every running request that is not done.
        batch = [rid for rid in running if ntok[rid] < end[rid]]
        if batch:
            for rid in batch:
                ntok[rid] += 1
            used += len(batch)
            out["decode_steps"] += 1
            out["timeline"].append(((num_blocks - len(manager.free_blocks)) * block_size, used))
            out["running"].append(len(batch))
        # 5. Finished requests give their blocks back.
        for rid in [r for r in running if ntok[r] >= end[r]]:
            if stop_after_steps is not None:
                out.setdefault("finished", []).append((out["decode_steps"], rid, list(manager.blocks[rid])))
            manager.free(rid)
            used -= ntok[rid] - 1
            del running[rid]
        manager.end_step()
        if stop_after_steps is not None and batch and out["decode_steps"] >= stop_after_steps:
            out.update(manager=manager, cached={rid: ntok[rid] - 1 for rid in running})
            break
    out["max_blocks"] = max_blocks
    return out


def simulate_naive(lengths, max_seq_len=DEFAULT_MAX_SEQ_LEN):
    """Replay llama3-naive.py's generate(): its timeline [(reserved, used)], one entry per decode step,
    with the script's own used-token bookkeeping (a request done at its prefill is never subtracted)."""
    reserved = len(lengths) * max_seq_len
    ntok = [p + 1 for p, _ in lengths]  # after the prefill
    end = [p + g for p, g in lengths]
    used = sum(p for p, _ in lengths)
    timeline = []
    running = [i for i in range(len(lengths)) if ntok[i] < end[i]]
    while running:
        for i in running:
            ntok[i] += 1
        used += len(running)
        timeline.append((reserved, used))
        used -= sum(ntok[i] - 1 for i in running if ntok[i] >= end[i])
        running = [i for i in running if ntok[i] < end[i]]
    return {"timeline": timeline, "decode_steps": len(timeline)}


def waste(timeline):
    """(% of reserved KV not holding a token at the first step of peak use, mean of that % over steps)."""
    if not timeline:
        return 0.0, 0.0
    reserved, used = max(timeline, key=lambda t: t[1])  # max() keeps the first, as record_memory does
    at_peak = 100 * (reserved - used) / max(1, reserved)
    mean = sum(100 * (r - u) / max(1, r) for r, u in timeline) / len(timeline)
    return at_peak, mean


def largest_true(predicate, hi):
    """Largest n in 1..hi with predicate(n) true, for a predicate true up to some n and false after;
    0 when predicate(1) is false."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if predicate(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def paged_max_n(lengths, budget_tokens, block_size, max_seq_len=DEFAULT_MAX_SEQ_LEN):
    """Largest N such that a paged run of the first N requests never preempts (replayed with the real manager).

    Monotone in N, so a binary search is exact: admission is first come first served, so request N+1
    starts only after requests 1..N have all started; until then the two runs are identical, and after
    it it only holds blocks, so whenever run N finds no free block for a request that is due, run N+1
    finds none either."""
    def fits(n):
        sim = simulate_paged(lengths[:n], budget_tokens, block_size, max_seq_len)
        return sim["preemptions"] == 0 and sim["failed"] is None
    return largest_true(fits, len(lengths))


def bound_peaks(lengths, block_size):
    """Blocks a perfect on-demand manager holds at its peak, for the first N requests, for every N.

    All N start together; a request (p, g) holds ceil((p + t) / block_size) blocks at decode step t for
    t = 1 .. max(1, g - 1) (its admission room, ceil((p + 1) / block_size), covers step 1) and none after.
    Returns a list: element N-1 is the peak over steps of the blocks held by the first N requests."""
    import numpy as np
    p = np.array([x for x, _ in lengths], dtype=np.int64)[:, None]
    last = np.array([max(1, g - 1) for _, g in lengths], dtype=np.int64)[:, None]
    t = np.arange(1, int(last.max()) + 1, dtype=np.int64)[None, :]
    held = np.where(t <= last, -(-(p + t) // block_size), 0)  # (requests, steps)
    return np.cumsum(held, axis=0).max(axis=1).tolist()


def bound_max_n(lengths, budget_tokens, block_size):
    """Largest N whose perfect-manager peak fits the pool of budget_tokens // block_size blocks."""
    num_blocks = budget_tokens // block_size
    return sum(1 for peak in bound_peaks(lengths, block_size) if peak <= num_blocks)  # peaks grow with N


def machine():
    """One line naming the machine: CPU model, cores, torch version, device, load average."""
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = f"cuda ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "cpu"
    try:
        load = "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "load average unknown"
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"device {device}, {load}")


def print_table(headers, rows, title=None):
    """A plain fixed-width table; right-aligned columns except the first."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if title:
        print(title)
    for k, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))
