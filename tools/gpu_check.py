"""Does paging pay on this GPU? One command for anyone with a CUDA GPU, and no weights.

It writes (or reuses) a random-weight checkpoint of Llama-3-8B's shape, loads it once, and drives the scripts' own
generate() in this process on the shipped prompts with --ref-lengths, under the KV budget of a 24 GB card (61,691
tokens, the scripts' default on a CPU; the README shows the sum):
  * naive at 7 requests, and at 8, which must not fit;
  * paged at the README's largest batch: 307 requests at block 16 with the PyTorch attention, and 180 at block 256
    with flash-attn, where flash-attn runs on this GPU (otherwise it says why it skipped that run);
  * throughput on the first 70 prompts: paged in one run against naive in waves of 7.
It prints one table: the kernel, the requests, the preemptions, the peak GPU memory beside a 24 GB card's, the
median decode step beside the weight-read bound (the weights' bytes over this GPU's memory bandwidth, measured with
a device-to-device copy), and tokens per second. The random model's words are gibberish; with --ref-lengths only the
token counts matter, and the weights' shapes, bytes and kernels are Llama-3-8B's.

    python tools/gpu_check.py                                 # writes checkpoints/8b-random (16 GB) on first use
    python tools/gpu_check.py --ckpt-dir Meta-Llama-3-8B-Instruct/original     # the real weights instead
"""
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from cli import ArgumentParser, fail, log, print_table, run_main
from machine import machine
from scripts import DEFAULT_CKPT, DEFAULT_PROMPTS, ROOT, call_script, load_script

CARD_BYTES = 24_564 * 2**20  # a 24 GB RTX 4090, as nvidia-smi reports it
# The runs: naive at its largest batch and one more; paged at the README's largest batches, 307 at block 16 (the
# PyTorch attention) and 180 at block 256 (flash-attn), under the scripts' CPU default budget, a 24 GB card's room
# for K and V beside Llama-3-8B; throughput on the first 70 prompts.
FULL = {"budget_tokens": 61_691, "max_seq_len": 8192, "naive_batch": 7,
        "paged_runs": [("pytorch", 16, 307), ("flash-attn", 256, 180)], "throughput_requests": 70}


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
def timed_decode_steps(module, times):
    """Inside the block, every forward() of one token per request (a decode step) appends its seconds to times."""
    forward = module.forward

    def timed(model, tokens, *args, **kwargs):
        if tokens.shape[1] > 1:  # a prefill
            return forward(model, tokens, *args, **kwargs)
        synchronize()
        start = time.perf_counter()
        logits = forward(model, tokens, *args, **kwargs)
        synchronize()
        times.append(time.perf_counter() - start)
        return logits
    module.forward = timed
    try:
        yield
    finally:
        module.forward = forward


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(module, model, requests, budget_tokens, max_seq_len, block_size=None):
    """One run of a script's generate(), as its main() does it. Returns a row of the table's figures."""
    name = "naive" if not hasattr(module, "KVCacheManager") else "paged"
    argv = ["1", "--max-seq-len", str(max_seq_len), *(["--block-size", str(block_size)] if block_size else [])]
    args = call_script(module.parse_args, argv)
    row = {"script": name, "kernel": module.KERNEL, "block": getattr(args, "block_size", "-"), "requests": len(requests)}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    try:
        cache = module.make_kv_cache(model, budget_tokens, len(requests), args)  # naive: K and V; paged: and a manager
        start = time.perf_counter()
        with timed_decode_steps(module, times):
            stats = module.generate(model, requests, *([cache] if name == "naive" else cache), args, set())
        synchronize()
        seconds = time.perf_counter() - start
    except SystemExit as e:  # the script's one-line refusal (naive's budget): part of what is checked
        return row | {"failed": str(e.code).split(": error: ", 1)[-1]}
    finally:
        cache = None  # the pool goes back before the next run
    row |= {"finished": sum(r.done for r in requests), "preemptions": stats.get("preemptions", 0),
            "generated": sum(len(r.generated_ids) for r in requests), "seconds": seconds,
            "median_step": statistics.median(times) if times else float("nan")}
    if torch.cuda.is_available():
        row["peak_bytes"] = torch.cuda.max_memory_allocated()
    return row


def check(naive, paged, model, tokenizer, scale=FULL):
    """The runs, with the loaded model. Returns (the table's rows, what was skipped and why, throughput: naive's
    tokens/s in waves, paged's in one run, the number of waves)."""
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
    n = scale["throughput_requests"]
    log(f"throughput: the first {n} prompts, naive in waves of {batch}, paged in one run")
    waves = [run(naive, model, make_requests(naive, tokenizer, min(batch, n - i), max_seq_len, i), budget, max_seq_len)
             for i in range(0, n, batch)]
    one_run = run(paged, model, make_requests(paged, tokenizer, n, max_seq_len), budget, max_seq_len)
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
    """Bytes of every weight a decode step reads (a tied output layer once)."""
    tensors = {id(t): t for layer in model["layers"] for t in layer.values()}
    tensors |= {id(model[name]): model[name] for name in ("tok_embeddings", "norm", "output")}
    return sum(t.nbytes for t in tensors.values())


def flash_attn_reason(module):
    """None where flash-attn runs here; else why not."""
    if module.flash_attn_with_kvcache is None:
        return "flash-attn is not installed"
    if module.KERNEL == "flash-attn":
        return None
    if torch.cuda.get_device_capability() < (8, 0):
        return "flash-attn 2 runs on Ampere GPUs or newer"
    return "this flash-attn is older than 2.5: its kernel takes no block table"


def table(rows, bound_seconds):
    """The printed table's rows."""
    out = []
    for r in rows:
        if "failed" in r:  # its one line is printed under the table
            out.append([r["script"], r["kernel"], r["block"], r["requests"], "exits 1", "-", "-", "-", "-", "-", "-"])
            continue
        peak = r.get("peak_bytes")
        out.append([r["script"], r["kernel"], r["block"], r["requests"], f"{r['finished']}/{r['requests']}",
                    r["preemptions"], f"{peak / 1e9:.2f}" if peak else "-",
                    ("yes" if peak <= CARD_BYTES else "no") if peak else "-", f"{1e3 * r['median_step']:.1f}",
                    f"{1e3 * bound_seconds:.1f}" if bound_seconds else "-", f"{r['generated'] / r['seconds']:.0f}"])
    return out


HEADERS = ["script", "kernel", "block", "requests", "finished", "preemptions", "peak GPU GB",
           f"fits {CARD_BYTES / 1e9:.2f} GB", "median step ms", "weight-read ms", "tokens/s"]


def main():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt-dir", default=str(ROOT / "checkpoints" / "8b-random"),
                        help="a Llama-3-8B checkpoint; a random one is written there if none is (default: %(default)s)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        fail("needs a CUDA GPU, and this machine has none (the CPU is checked by python -m pytest tests)")
    start = time.perf_counter()
    naive, paged = load_script("naive"), load_script("paged")
    print(f"# {machine()}; {torch.cuda.get_device_name()}, compute capability "
          f"{'.'.join(map(str, torch.cuda.get_device_capability()))}, {torch.cuda.mem_get_info()[1] / 1e9:.1f} GB; "
          f"kernel chosen: {paged.KERNEL}, {str(paged.DTYPE)[6:]}")
    ckpt = Path(args.ckpt_dir)
    if not (ckpt / "params.json").is_file():
        import make_checkpoint
        log(f"writing a random checkpoint of Llama-3-8B's shape to {ckpt} (16 GB, once)")
        make_checkpoint.write_checkpoint(str(ckpt), "8b", device="cuda", tokenizer=tokenizer_file())
    tokenizer = call_script(paged.load_tokenizer, ckpt / "tokenizer.model")
    log(f"loading {ckpt}")
    model = call_script(paged.load_model, ckpt)
    model["rope_cos"], model["rope_sin"] = paged.rope_tables(model, FULL["max_seq_len"])
    bound = weight_bytes(model) / bandwidth("cuda")
    log(f"weights {weight_bytes(model) / 1e9:.2f} GB; a decode step reads them all: at least {1e3 * bound:.1f} ms")

    rows, skipped, (naive_rate, paged_rate, waves) = check(naive, paged, model, tokenizer)

    print_table(HEADERS, table(rows, bound))
    for r in rows:
        if "failed" in r:
            print(f"{r['script']}, {r['requests']} requests: {r['failed']}")
    print(f"\nthroughput, the first {FULL['throughput_requests']} prompts: naive in {waves} waves of {FULL['naive_batch']} "
          f"{naive_rate:.0f} tokens/s; paged in one run ({paged.KERNEL}) {paged_rate:.0f} tokens/s, "
          f"{paged_rate / naive_rate:.2f}x")
    for line in skipped:
        print(f"skipped: {line}")
    print(f"gpu_check.py took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    run_main(main)
