"""Does paging pay on this GPU? One command for anyone with a CUDA GPU, and no weights.

It writes (or reuses) a random-weight checkpoint of Llama-3-8B's shape, timing the writing, loads it once, and drives
the scripts' own generate() in this process on the shipped prompts with --ref-lengths:
  * under the KV budget of a 24 GB card (61,691 tokens, the scripts' default on a CPU; the README shows the sum), and
    inside a 24 GB card's memory (below): naive at 7 requests, and at 8, which must not fit; paged at the README's
    largest batches, 307 requests at block 16 with the PyTorch attention and 180 at block 256 with flash-attn, where
    flash-attn runs on this GPU (otherwise it says why it skipped that run);
  * paged at 307 requests with the kernel and block size the scripts choose here, under their own default budget
    for this GPU (gpu_budget_tokens: its free memory less what a step needs), with no limit but this GPU's memory;
  * throughput on the first 70 prompts: paged in one run against naive in waves of 7.
It prints one table, a row per run: the kernel, block size, budget, requests, how many finished, preemptions, and
  * the decode step at the run's full batch: the median time of the steps whose batch is at least 90% of the run's
    largest, beside the least time such a step can take: the bytes it must read (every weight but the embedding
    table, which a step only indexes, plus the K and V its rows hold) over this GPU's memory bandwidth, measured with
    a device-to-device copy;
  * the kernel-launching operators of a decode step: ATen operators counted on the run's first 3 decode steps (not
    timed) by tools/memory_tally.py's LaunchCount, as tools/attention_memory.py counts them, views left out since
    they launch nothing; flash-attn's kernel, which its wrapper calls outside PyTorch's dispatcher, adds one a layer;
  * the peak GPU memory: what this process holds outside PyTorch's caching allocator (the CUDA context, the libraries'
    kernels, and on a GPU shared with others their memory too, so it errs high), measured after the run as the GPU's
    used memory less what the allocator reserved, plus the most the allocator reserved during the run. The 24 GB runs
    are made under torch.cuda.set_per_process_memory_fraction, so that the allocator may reserve no more than a
    24 GB card would leave it beside that context: "fits" means the run finished inside that limit (the allocator
    gives back what it caches before it gives up, as it would on the card);
  * tokens per second.
A run that fails (out of memory, the script's own refusal, or a bug, whose traceback goes to stderr) is one line under
the table, and the other runs go on. The random model's words are gibberish; with --ref-lengths only the token counts
matter, and the weights' shapes, bytes and kernels are Llama-3-8B's.

    python tools/gpu_check.py                                 # writes checkpoints/8b-random (16 GB) on first use
    python tools/gpu_check.py --ckpt-dir Meta-Llama-3-8B-Instruct/original     # the real weights instead
"""
import statistics
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

from cli import ArgumentParser, fail, log, print_table, run_main
from machine import machine
from memory_tally import LaunchCount
from scripts import DEFAULT_CKPT, DEFAULT_PROMPTS, ROOT, call_script, load_script

CARD_BYTES = 24_564 * 2**20  # a 24 GB RTX 4090, as nvidia-smi reports it
# The runs: naive at its largest batch and one more; paged at the README's largest batches, 307 at block 16 (the
# PyTorch attention) and 180 at block 256 (flash-attn), under the scripts' CPU default budget, a 24 GB card's room
# for K and V beside Llama-3-8B; paged at 307 under the scripts' own budget for this GPU; throughput on 70 prompts.
FULL = {"budget_tokens": 61_691, "max_seq_len": 8192, "naive_batch": 7,
        "paged_runs": [("pytorch", 16, 307), ("flash-attn", 256, 180)], "default_budget_requests": 307,
        "throughput_requests": 70}
COUNTED_STEPS = 3  # decode steps whose operators are counted, at the start of each run; counting slows them
FULL_BATCH = 0.9   # a step of at least this fraction of the run's largest batch is a step at its full batch


def tokenizer_file():
    """Llama 3's tokenizer.model: the tiny checkpoint's copy, or llama-models' (no internet needed either way)."""
    tiny = DEFAULT_CKPT / "tokenizer.model"
    if tiny.is_file():
        return tiny
    import make_checkpoint
    try:
        return Path(str(make_checkpoint.tokenizer_source()))
    except RuntimeError:
        fail(f"no Llama 3 tokenizer: write the tiny checkpoint first (python tools/make_checkpoint.py {DEFAULT_CKPT}) "
             f"or pip install llama-models")


def make_requests(module, tokenizer, n, max_seq_len, first=0):
    """Shipped prompts first .. first + n - 1 as module's Requests 0 .. n - 1, with --ref-lengths: each generates
    as many tokens as its reference answer."""
    requests = []
    for text, ref_length in call_script(module.load_prompts, DEFAULT_PROMPTS, first + n, tokenizer)[first:]:
        prompt = module.encode_chat(tokenizer, text)
        if len(prompt) >= max_seq_len:
            fail(f"prompt {first + len(requests)} has {len(prompt)} tokens: no room to generate within {max_seq_len}")
        ref_length = min(max(1, ref_length), max_seq_len - len(prompt))
        requests.append(module.Request(len(requests), prompt, ref_length, list(prompt)))
    return requests


@contextmanager
def kernel(module, name):
    """Inside the block, module's forward() calls this attention kernel: "pytorch" (attention_torch) or "flash-attn"."""
    saved = module.attention, module.KERNEL
    module.attention = module.attention_torch if name == "pytorch" else module.flash_attn_with_kvcache
    module.KERNEL = name
    try:
        yield
    finally:
        module.attention, module.KERNEL = saved


@contextmanager
def decode_steps(module, steps, counted=COUNTED_STEPS):
    """Inside the block, every forward() of one new token per request (a decode step) appends a dict to steps:
    batch, its rows; keys, the tokens of K and V they hold (cache_seqlens + 1 each); and, for the first `counted`
    steps, ops, the kernel-launching operators it ran, else seconds, its time."""
    forward = module.forward

    def step(model, tokens, cache_seqlens, *args, **kwargs):
        if tokens.shape[1] > 1:  # a prefill
            return forward(model, tokens, cache_seqlens, *args, **kwargs)
        record = {"batch": tokens.shape[0], "keys": int(cache_seqlens.sum()) + tokens.shape[0]}
        if len(steps) < counted:
            with LaunchCount() as ops:
                logits = forward(model, tokens, cache_seqlens, *args, **kwargs)
            outside = module.attention is not module.attention_torch  # flash-attn: its kernel, one a layer
            record["ops"] = ops.launches + outside * len(model["layers"])
        else:
            synchronize()
            start = time.perf_counter()
            logits = forward(model, tokens, cache_seqlens, *args, **kwargs)
            synchronize()
            record["seconds"] = time.perf_counter() - start
        steps.append(record)
        return logits
    module.forward = step
    try:
        yield
    finally:
        module.forward = forward


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def outside_allocator():
    """Bytes of the GPU in use but not reserved by this process's caching allocator: the CUDA context and the
    libraries' kernels (and, on a GPU shared with others, their memory: so this errs high)."""
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


@contextmanager
def card_limit(card_bytes):
    """Inside the block, the caching allocator may reserve no more than a card of card_bytes leaves beside what
    this process holds outside it: past that it gives back what it caches, then raises out of memory, as on that
    card. None: no limit but this GPU's memory."""
    if card_bytes is None:
        yield
        return
    fraction = (card_bytes - outside_allocator()) / torch.cuda.mem_get_info()[1]  # of this GPU's memory
    torch.cuda.set_per_process_memory_fraction(max(0.0, fraction))
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def run(module, model, requests, budget_tokens, max_seq_len, block_size=None, card_bytes=CARD_BYTES):
    """One run of a script's generate(), as its main() does it, with the kernel the module holds. budget_tokens
    None: the script's own default on this GPU (gpu_budget_tokens). Returns a row of the table's figures; where the
    run failed, with its one line as "failed"."""
    name = "naive" if not hasattr(module, "KVCacheManager") else "paged"
    argv = ["1", "--max-seq-len", str(max_seq_len), *(["--block-size", str(block_size)] if block_size else [])]
    args = call_script(module.parse_args, argv)
    row = {"script": name, "kernel": module.KERNEL, "block": getattr(args, "block_size", "-"),
           "requests": len(requests), "card_bytes": card_bytes}
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()  # what earlier runs cached goes back, for the budget and the limit to see
        torch.cuda.reset_peak_memory_stats()
    steps, cache = [], None
    try:
        module.check_kernel()
        row["budget"] = budget_tokens or module.gpu_budget_tokens(model, max_seq_len, len(requests))
        with card_limit(card_bytes if cuda else None), decode_steps(module, steps):
            cache = module.make_kv_cache(model, row["budget"], len(requests), args)  # naive: K, V; paged: and a manager
            start = time.perf_counter()
            stats = module.generate(model, requests, *([cache] if name == "naive" else cache), args, set())
            synchronize()
            seconds = time.perf_counter() - start
        if cuda:
            row["peak_bytes"] = outside_allocator() + torch.cuda.max_memory_reserved()
    except SystemExit as e:  # the script's one-line refusal (naive's budget, a kernel that fails here)
        return row | {"failed": str(e.code).split(": error: ", 1)[-1]}
    except torch.cuda.OutOfMemoryError as e:
        inside = f" inside a {card_bytes / 1e9:.2f} GB card" if card_bytes and cuda else ""
        return row | {"failed": f"out of GPU memory{inside}: {str(e).splitlines()[0]}", "out_of_memory": True}
    except Exception as e:  # a bug: its traceback on stderr, and the other runs go on
        traceback.print_exc()
        return row | {"failed": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (traceback above)"}
    finally:
        cache = None  # the pool goes back before the next run
    row |= {"finished": sum(r.done for r in requests), "preemptions": stats.get("preemptions", 0),
            "generated": sum(len(r.generated_ids) for r in requests), "seconds": seconds}
    return row | full_batch(steps, weight_bytes(model), model["kv_bytes_per_token"])


def full_batch(steps, weight_bytes, kv_bytes_per_token):
    """The figures of a run's decode steps: batch, its largest; ops, the most operators of the counted steps; step
    and read_bytes, the median time and bytes to read of the timed steps whose batch is at least FULL_BATCH of it."""
    out = {"batch": max((s["batch"] for s in steps), default=0),
           "ops": max((s["ops"] for s in steps if "ops" in s), default=None)}
    full = [s for s in steps if "seconds" in s and s["batch"] >= FULL_BATCH * out["batch"]]
    if full:
        out["step"] = statistics.median(s["seconds"] for s in full)
        out["read_bytes"] = statistics.median(weight_bytes + s["keys"] * kv_bytes_per_token for s in full)
    return out


def check(naive, paged, model, tokenizer, scale=FULL):
    """The runs, with the loaded model. Returns (the table's rows, what was skipped and why, throughput: naive's
    tokens/s in waves, paged's in one run, the number of waves, or the line of a run that failed)."""
    budget, max_seq_len, batch = scale["budget_tokens"], scale["max_seq_len"], scale["naive_batch"]
    rows, skipped = [], []
    for n in (batch, batch + 1):
        log(f"naive, {n} requests")
        rows.append(run(naive, model, make_requests(naive, tokenizer, n, max_seq_len), budget, max_seq_len))
    for name, block_size, n in scale["paged_runs"]:
        reason = flash_attn_reason(paged) if name == "flash-attn" else None
        if reason:
            skipped.append(f"paged with flash-attn at block {block_size}: {reason}")
            continue
        log(f"paged, {name}, block {block_size}, {n} requests")
        with kernel(paged, name):
            rows.append(run(paged, model, make_requests(paged, tokenizer, n, max_seq_len), budget, max_seq_len,
                            block_size))
    n = scale["default_budget_requests"]
    log(f"paged, the scripts' choices here ({paged.KERNEL}, their default block size and GPU budget), {n} requests")
    rows.append(run(paged, model, make_requests(paged, tokenizer, n, max_seq_len), None, max_seq_len, card_bytes=None))
    n = scale["throughput_requests"]
    log(f"throughput: the first {n} prompts, naive in waves of {batch}, paged in one run")
    waves = [run(naive, model, make_requests(naive, tokenizer, min(batch, n - i), max_seq_len, i), budget, max_seq_len)
             for i in range(0, n, batch)]
    one_run = run(paged, model, make_requests(paged, tokenizer, n, max_seq_len), budget, max_seq_len)
    failed = [f"{r['script']}, {r['requests']} requests: {r['failed']}" for r in [*waves, one_run] if "failed" in r]
    if failed:
        return rows, skipped, failed[0]
    rate = lambda runs: sum(r["generated"] for r in runs) / sum(r["seconds"] for r in runs)
    return rows, skipped, (rate(waves), rate([one_run]), len(waves))


def bandwidth(device, size=2**30, repeats=10):
    """Bytes per second a device-to-device copy of `size` bytes moves (each read once and written once), median of
    repeats."""
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        synchronize()
        start = time.perf_counter()
        target.copy_(source)
        synchronize()
        times.append(time.perf_counter() - start)
    return 2 * source.numel() / statistics.median(times[1:])


def weight_bytes(model):
    """Bytes of every weight a decode step reads: all but the embedding table, of which it reads only its tokens'
    rows (a table tied to the output layer is read whole there, once)."""
    tensors = {id(t): t for layer in model["layers"] for t in layer.values()}
    tensors |= {id(model[name]): model[name] for name in ("norm", "output")}
    return sum(t.nbytes for t in tensors.values())


def flash_attn_reason(module):
    """None where flash-attn runs here; else why not."""
    if module.flash_attn_with_kvcache is None:
        return "flash-attn is not installed"
    if isinstance(module.flash_attn_with_kvcache, ImportError):
        error = module.flash_attn_with_kvcache
        return f"flash-attn is installed but fails to import ({type(error).__name__}: {str(error).splitlines()[0]})"
    if module.KERNEL == "flash-attn":
        try:
            module.check_kernel()  # its one tiny call, as the scripts make it before loading the weights
        except SystemExit as e:
            return str(e.code).split(": error: ", 1)[-1]
        return None
    if torch.cuda.get_device_capability() < (8, 0):
        return "flash-attn 2 runs on Ampere GPUs or newer"
    return "this flash-attn is older than 2.5: its kernel takes no block table"


def table(rows, bandwidth_bytes, gpu_bytes):
    """The printed table's rows: a failed run's figures are "-" (its line is printed under the table); it fits
    where it finished with its peak within the limit, and not where it ran out of memory."""
    out = []
    for r in rows:
        ms = lambda seconds: f"{1e3 * seconds:.1f}" if seconds is not None else "-"
        limit = r["card_bytes"] or gpu_bytes
        peak, failed = r.get("peak_bytes"), "failed" in r
        out.append([r["script"], r["kernel"], r["block"], r.get("budget", "-"), r["requests"],
                    "failed" if failed else f"{r['finished']}/{r['requests']}", r.get("preemptions", "-"),
                    r.get("batch", "-"), ms(r.get("step")),
                    ms(r["read_bytes"] / bandwidth_bytes) if "read_bytes" in r and bandwidth_bytes else "-",
                    r.get("ops") if r.get("ops") is not None else "-",
                    f"{peak / 1e9:.2f}" if peak else "-", f"{limit / 1e9:.2f}" if limit else "-",
                    "no" if r.get("out_of_memory") else "-" if failed or not peak or not limit else
                    "yes" if peak <= limit else "no",
                    f"{r['generated'] / r['seconds']:.0f}" if not failed else "-"])
    return out


HEADERS = ["script", "kernel", "block", "KV budget", "requests", "finished", "preemptions", "full batch",
           "step ms", "read-bound ms", "ops/step", "peak GB", "limit GB", "fits", "tokens/s"]


def ensure_checkpoint(ckpt, preset="8b", device="cuda"):
    """A random checkpoint of the preset's shape in ckpt, written unless one is there. Returns the seconds the
    writing took (weights made on `device`, written as bfloat16), or None where one was there already."""
    if (Path(ckpt) / "params.json").is_file():
        return None
    import make_checkpoint
    log(f"writing a random checkpoint of {preset}'s shape to {ckpt} (once)")
    start = time.perf_counter()
    make_checkpoint.write_checkpoint(str(ckpt), preset, device=device, tokenizer=tokenizer_file())
    return time.perf_counter() - start


def main():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt-dir", default=str(ROOT / "checkpoints" / "8b-random"),
                        help="a Llama-3-8B checkpoint; a random one is written there if none is (default: %(default)s)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        fail("needs a CUDA GPU, and this machine has none (the CPU is checked by python -m pytest tests)")
    start = time.perf_counter()
    naive, paged = load_script("naive"), load_script("paged")
    gpu_bytes = torch.cuda.mem_get_info()[1]
    print(f"# {machine()}; {torch.cuda.get_device_name()}, compute capability "
          f"{'.'.join(map(str, torch.cuda.get_device_capability()))}, {gpu_bytes / 1e9:.1f} GB; "
          f"kernel chosen: {paged.KERNEL}, {str(paged.DTYPE)[6:]}")
    ckpt = Path(args.ckpt_dir)
    written = ensure_checkpoint(ckpt)
    tokenizer = call_script(paged.load_tokenizer, ckpt / "tokenizer.model")
    log(f"loading {ckpt}")
    model = call_script(paged.load_model, ckpt)
    model["rope_cos"], model["rope_sin"] = paged.rope_tables(model, FULL["max_seq_len"])
    bytes_per_second = bandwidth("cuda")
    log(f"weights a decode step reads: {weight_bytes(model) / 1e9:.2f} GB, at least "
        f"{1e3 * weight_bytes(model) / bytes_per_second:.1f} ms at {bytes_per_second / 1e9:.0f} GB/s")

    rows, skipped, throughput = check(naive, paged, model, tokenizer)

    print_table(HEADERS, table(rows, bytes_per_second, gpu_bytes))
    for r in rows:
        if "failed" in r:
            print(f"{r['script']}, {r['kernel']}, {r['requests']} requests: {r['failed']}")
    if isinstance(throughput, str):
        print(f"\nthroughput, the first {FULL['throughput_requests']} prompts: not measured: {throughput}")
    else:
        naive_rate, paged_rate, waves = throughput
        print(f"\nthroughput, the first {FULL['throughput_requests']} prompts: naive in {waves} waves of "
              f"{FULL['naive_batch']} {naive_rate:.0f} tokens/s; paged in one run ({paged.KERNEL}) {paged_rate:.0f} "
              f"tokens/s, {paged_rate / naive_rate:.2f}x")
    for line in skipped:
        print(f"skipped: {line}")
    print(f"memory bandwidth (a device-to-device copy): {bytes_per_second / 1e9:.0f} GB/s; "
          + (f"the random checkpoint was written in {written:.0f} s" if written is not None else
             f"checkpoint {ckpt} was there already"))
    print(f"gpu_check.py took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    run_main(main)
