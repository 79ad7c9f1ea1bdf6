"""Why a bigger batch pays: one decode step's time against the batch size, beside the two bounds on it.

A decode step reads every weight once, whatever the batch, and does arithmetic in proportion to the batch. While
reading the weights takes longer than the arithmetic, one more request in the batch costs almost nothing: it is
one more token per step for free, which is what the room the paged cache makes is worth. Past the batch where the
two cross, the arithmetic bounds the step.

This loads a checkpoint once, in this process, with llama3-paged.py's own load_model(), and times its own forward()
for one decode step at batch 1, 2, 4, ... (to --up-to at least, then on while a token keeps getting cheaper, by 10%
or more than at any smaller batch, to --max-batch at most), each request holding --context cached tokens in the
script's paged pool (its KVCacheManager, its default block size here), the median of --steps steps after one
warm-up. The cache holds zeros: the values do not change the work. Beside each batch, measured on this machine:
  * weight read: the bytes of every weight the step reads (all but the embedding table, of which a decode step
    reads one row per request; where the output layer is tied to it, as in Llama-3.2-1B, it is read as the
    output layer and counted once) over the bandwidth of a large tensor copy;
  * arithmetic: the step's FLOPs, 2 x the parameters in matmuls x batch, plus attention's 4 x n_heads x head_dim x
    keys attended (the cached tokens and the new one) x batch in each layer, over the rate of matmuls of the
    model's own weight shapes (layer 0's seven, on 512 rows at once);
  * KV read: the bytes of K and V those keys hold, over the same bandwidth (for scale; not in the crossing).
It prints the table, where the two bounds cross, and the same crossing COMPUTED (not measured) for Llama-3-8B in
bf16 on two GPUs from their published bandwidth and dense bf16 rate; and draws the figure.

    python tools/batch_bench.py        # writes checkpoints/1b (Llama-3.2-1B's shape, 2.5 GB) on first use
    python tools/batch_bench.py --ckpt-dir checkpoints/tiny --up-to 4 --steps 2 --out /tmp/b.png

The default context is the mean a decode step sees over the shipped prompts run with --ref-lengths: a request
that has generated k tokens holds its prompt and k - 1 of them in the cache, averaged over every decode step.
Writes docs/batch_step.png (needs matplotlib: pip install -r tools/requirements.txt).
"""
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cli import ArgumentParser, check_out, fail, log, print_table, run_main
from gpu_check import bandwidth, synchronize
from machine import machine
from plotting import pyplot, save_figure
from scripts import DEFAULT_PROMPTS, ROOT, call_script, load_script, prompt_lengths

DEFAULT_CKPT_1B = ROOT / "checkpoints" / "1b"
CHEAPER = 0.9  # past --up-to, go on doubling while a token costs at most this much of the cheapest before
MATMUL_ROWS = 512  # rows of the matmuls that measure the arithmetic rate: enough to keep the cores busy
# Published figures (dense, no sparsity) for the computed crossing. RTX 4090: 1008 GB/s GDDR6X; 165.2 TFLOP/s bf16
# tensor with fp32 accumulate (Ada whitepaper; 330 with sparsity). H100 SXM: 3.35 TB/s HBM3; 989.4 TFLOP/s bf16
# tensor dense (1,979 with sparsity).
GPUS = [("RTX 4090", 1008e9, 165.2e12, "bf16 dense, fp32 accumulate"),
        ("H100 SXM", 3.35e12, 989.4e12, "bf16 dense")]
HEADERS = ["batch", "step ms", "tokens/s", "weight read ms", "arithmetic ms", "KV read ms", "step / larger bound"]


def parse_args(argv):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt-dir", default=str(DEFAULT_CKPT_1B),
                   help="checkpoint to time (default: %(default)s, a random one of Llama-3.2-1B's shape, written on "
                        "first use)")
    p.add_argument("--context", type=int, help="cached tokens per request (default: the shipped prompts' mean a "
                                                "decode step sees, with --ref-lengths)")
    p.add_argument("--up-to", type=int, default=64, help="batch sizes 1, 2, 4, ... at least to this (default 64)")
    p.add_argument("--max-batch", type=int, default=256, help="never past this batch (default 256: at Llama-3.2-1B's "
                                                                "shape in float32, 5.9 GB of cache)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per batch, of which the median (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared machine, two "
                                                            "OpenMP threads that wait for each other can be much "
                                                            "slower than one)")
    p.add_argument("--out", default=str(ROOT / "docs" / "batch_step.png"), help="figure to write")
    p.add_argument("--json", metavar="PATH", help="also write the measurements to PATH")
    args = p.parse_args(argv)
    for name in ("context", "up_to", "max_batch", "steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.context is not None and args.context >= 131_072:
        fail(f"--context must be under 131072 (Llama 3.1's context), got {args.context}")
    if args.up_to > args.max_batch:
        fail(f"--up-to {args.up_to} is past --max-batch {args.max_batch}")
    check_out(args.out)
    if args.json:
        check_out(args.json)
    if not (Path(args.ckpt_dir) / "params.json").is_file() and Path(args.ckpt_dir).resolve() != DEFAULT_CKPT_1B:
        fail(f"no checkpoint in {args.ckpt_dir}: make one with python tools/make_checkpoint.py {args.ckpt_dir}")
    return args


def mean_decode_context(lengths):
    """The mean cached tokens per request over every decode step of requests of (prompt p, generated g) tokens: the
    decode that gives token k + 1 (k = 1 .. g - 1; the prefill gives the first) finds p + k - 1 tokens cached."""
    steps = sum(g - 1 for _, g in lengths)
    if not steps:
        fail("the prompts' reference answers are one token each: no decode step to average over")
    return round(sum((g - 1) * p + (g - 1) * (g - 2) / 2 for p, g in lengths) / steps)


# ---------------------------------------------------------------------------------------------
# What a decode step reads and computes, from the model's shape

def step_tensors(model):
    """Shapes of the tensors a decode step reads whole: each layer's seven matrices and two norms, the final norm
    and the output layer (the embedding table where tied: it is read whole as the output layer, and only one row
    per request as the embedding)."""
    shapes = [tuple(t.shape) for layer in model["layers"] for t in layer.values()]
    return shapes + [tuple(model["norm"].shape), tuple(model["output"].shape)]


def preset_tensors(preset):
    """The same, for a tools/make_checkpoint.py preset, computed from its shapes alone."""
    import make_checkpoint
    shapes = make_checkpoint.tensor_shapes(preset)
    output = shapes.get("output.weight", shapes["tok_embeddings.weight"])
    return [s for name, s in shapes.items() if name not in ("tok_embeddings.weight", "output.weight")] + [output]


def step_counts(tensors, n_layers, n_heads, n_kv_heads, head_dim, context, itemsize):
    """Per request in one decode step: FLOPs (matmuls 2 x params; attention 4 x n_heads x head_dim x keys in each
    layer, for q.k and p.v), K and V bytes read; and, once per step, the weights' bytes."""
    keys = context + 1  # the cached tokens and the new one
    matmul_params = sum(math.prod(s) for s in tensors if len(s) == 2)
    return {"matmul_params": matmul_params,
            "weight_bytes": sum(math.prod(s) for s in tensors) * itemsize,
            "flops_per_request": 2 * matmul_params + 4 * n_heads * head_dim * keys * n_layers,
            "kv_bytes_per_request": 2 * n_layers * n_kv_heads * head_dim * keys * itemsize}


def crossing(counts, bandwidth_bytes, flop_rate):
    """The batch at which the arithmetic takes as long as reading the weights."""
    return (counts["weight_bytes"] / bandwidth_bytes) / (counts["flops_per_request"] / flop_rate)


# ---------------------------------------------------------------------------------------------
# Measurements

def matmul_rate(model, rows=MATMUL_ROWS, repeats=3):
    """FLOP/s of layer 0's seven matmuls on `rows` rows at once (each input its weight's width), median of repeats
    after a warm-up."""
    weights = list(model["layers"][0][name] for name in ("wq", "wk", "wv", "wo", "w1", "w3", "w2"))
    inputs = [torch.randn(rows, w.shape[1], dtype=w.dtype, device=w.device) for w in weights]
    flops = sum(2 * rows * w.numel() for w in weights)
    times = []
    for _ in range(repeats + 1):
        synchronize()
        start = time.perf_counter()
        for x, w in zip(inputs, weights):
            F.linear(x, w)
        synchronize()
        times.append(time.perf_counter() - start)
    return flops / statistics.median(times[1:])


def time_decode_steps(paged, model, batch, context, steps):
    """Seconds of each of `steps` decode steps of the script's forward() at `batch` requests of `context` cached
    tokens, after one warm-up, in a pool from its make_kv_cache() laid out by its KVCacheManager."""
    args = call_script(paged.parse_args, ["1", "--max-seq-len", str(context + 1)])
    blocks = -(-(context + 1) // args.block_size)
    kv_cache, manager = call_script(paged.make_kv_cache, model, batch * blocks * args.block_size, batch, args)
    for req_id in range(batch):
        manager.allocate(req_id, context + 1)  # the cached tokens and the one this step writes
    table = manager.block_tables(torch.arange(batch, dtype=torch.int32, device=paged.DEVICE), blocks)
    tokens = torch.zeros(batch, 1, dtype=torch.long, device=paged.DEVICE)  # any token: the work is the same
    cache_seqlens = torch.full((batch,), context, dtype=torch.int32, device=paged.DEVICE)
    times = []
    for _ in range(steps + 1):  # the first is a warm-up
        synchronize()
        start = time.perf_counter()
        paged.forward(model, tokens, cache_seqlens, kv_cache, block_table=table)
        synchronize()
        times.append(time.perf_counter() - start)
    return times[1:]


def measure(paged, model, args, context):
    """Every batch's step times: 1, 2, 4, ... to --up-to, then on while a token keeps getting cheaper."""
    measured, batch = [], 1
    while batch <= args.max_batch:
        times = time_decode_steps(paged, model, batch, context, args.steps)
        measured.append({"batch": batch, "step_seconds": times})
        log(f"batch {batch}: {1e3 * statistics.median(times):.1f} ms a step")
        if batch >= args.up_to and len(measured) > 1:  # against the cheapest before, so one slow batch ends nothing
            per_token = [statistics.median(m["step_seconds"]) / m["batch"] for m in measured]
            if per_token[-1] > CHEAPER * min(per_token[:-1]):
                break
        batch *= 2
    return measured


# ---------------------------------------------------------------------------------------------
# Report

def table(measured, counts, bandwidth_bytes, flop_rate):
    """The printed table's rows."""
    rows = []
    for m in measured:
        b, step = m["batch"], statistics.median(m["step_seconds"])
        weights = counts["weight_bytes"] / bandwidth_bytes
        arithmetic = b * counts["flops_per_request"] / flop_rate
        kv = b * counts["kv_bytes_per_request"] / bandwidth_bytes
        rows.append([b, f"{1e3 * step:.4g}", f"{b / step:.4g}", f"{1e3 * weights:.4g}", f"{1e3 * arithmetic:.4g}",
                     f"{1e3 * kv:.4g}", f"{step / max(weights, arithmetic):.3g}"])
    return rows


def gpu_rows(context):
    """Computed, not measured: Llama-3-8B in bf16 at `context` cached tokens, on each of GPUS."""
    import make_checkpoint
    shape = make_checkpoint.PRESETS["8b"]["params"]
    counts = step_counts(preset_tensors("8b"), shape["n_layers"], shape["n_heads"], shape["n_kv_heads"],
                         shape["dim"] // shape["n_heads"], context, 2)
    rows = []
    for name, bandwidth_bytes, flop_rate, what in GPUS:
        b = crossing(counts, bandwidth_bytes, flop_rate)
        rows.append([name, f"{bandwidth_bytes / 1e12:.4g}", f"{flop_rate / 1e12:.4g} ({what})",
                     f"{1e3 * counts['weight_bytes'] / bandwidth_bytes:.3g}",
                     f"{1e6 * counts['flops_per_request'] / flop_rate:.3g}", f"{b:.0f}",
                     f"{1e3 * round(b) * counts['kv_bytes_per_request'] / bandwidth_bytes:.3g}"])
    return counts, rows


def plot(measured, counts, bandwidth_bytes, flop_rate, out, title):
    plt = pyplot()
    batches = [m["batch"] for m in measured]
    steps = [statistics.median(m["step_seconds"]) for m in measured]
    weights = counts["weight_bytes"] / bandwidth_bytes
    per_request = counts["flops_per_request"] / flop_rate
    cross = weights / per_request
    span = [min(batches) / 1.5, max(max(batches), cross) * 1.5]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 8), sharex=True)
    top.plot(batches, [1e3 * s for s in steps], "o-", color="black", label="measured step (median)")
    top.plot(span, [1e3 * weights] * 2, "--", color="tab:blue", label="weight read: weights' bytes / copy bandwidth")
    top.plot(span, [1e3 * b * per_request for b in span], "--", color="tab:red",
             label="arithmetic: step FLOPs / matmul rate")
    top.set_ylabel("decode step (ms)")
    top.set_yscale("log")
    bottom.plot(batches, [b / s for b, s in zip(batches, steps)], "o-", color="black", label="measured tokens/s")
    bottom.plot(span, [b / weights for b in span], "--", color="tab:blue", label="batch / weight read")
    bottom.plot(span, [1 / per_request] * 2, "--", color="tab:red", label="1 / arithmetic per request")
    bottom.set_ylabel("tokens per second")
    bottom.set_yscale("log")
    bottom.set_xscale("log", base=2)
    bottom.set_xticks(batches, [str(b) for b in batches])
    bottom.set_xlabel("requests in the decode batch")
    for ax in (top, bottom):
        ax.axvline(cross, color="gray", linestyle=":")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    top.annotate(f"bounds cross at batch {cross:.1f}", (cross, 1e3 * weights), textcoords="offset points",
                 xytext=(6, -14), fontsize=9, color="gray")
    top.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, out, dpi=96)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    paged = load_script("paged")
    ckpt = Path(args.ckpt_dir)
    if not (ckpt / "params.json").is_file():  # only the default comes this far
        import make_checkpoint
        log(f"writing a random checkpoint of Llama-3.2-1B's shape to {ckpt} (2.5 GB, once)")
        make_checkpoint.write_checkpoint(str(ckpt), "1b")
    if args.context is None:
        lengths = prompt_lengths(DEFAULT_PROMPTS)
        args.context = mean_decode_context(lengths)
        source = f"the mean a decode step sees over the {len(lengths)} shipped prompts with --ref-lengths"
    else:
        source = "--context"
    print(f"machine: {machine()}; {torch.get_num_threads()} torch thread(s)")
    log(f"loading {ckpt}")
    model = call_script(paged.load_model, ckpt)
    model["rope_cos"], model["rope_sin"] = paged.rope_tables(model, args.context + 1)
    dtype = str(paged.DTYPE)[6:]
    counts = step_counts(step_tensors(model), len(model["layers"]), model["n_heads"], model["n_kv_heads"],
                         model["head_dim"], args.context, paged.DTYPE.itemsize)
    log("measuring the copy bandwidth and the matmul rate")
    copy = bandwidth(paged.DEVICE.type, size=2**29, repeats=5)
    rate = matmul_rate(model)
    measured = measure(paged, model, args, args.context)

    cross = crossing(counts, copy, rate)
    print(f"model: {ckpt}, {len(model['layers'])} layers, {counts['matmul_params']:,} parameters in matmuls, "
          f"{dtype} on {paged.DEVICE.type} ({paged.KERNEL} attention); a step reads {counts['weight_bytes'] / 1e9:.3g} "
          f"GB of weights and does {counts['flops_per_request'] / 1e9:.3g} GFLOP per request")
    print(f"context: {args.context} cached tokens per request ({source})")
    print(f"measured here: copy bandwidth {copy / 1e9:.3g} GB/s (a {2**29 // 2**20} MiB tensor copied, read and "
          f"written, median of 5); matmul rate {rate / 1e9:.3g} GFLOP/s (layer 0's seven weights on {MATMUL_ROWS} "
          f"rows, median of 3)")
    print()
    print_table(HEADERS, table(measured, counts, copy, rate),
                title=f"one decode step of llama3-paged.py's forward(), median of {args.steps} after a warm-up:")
    print(f"\nthe two bounds cross at batch {cross:.1f}: below it reading the weights bounds a step, above it the "
          f"arithmetic does")
    gpu_counts, rows = gpu_rows(args.context)
    print(f"\nCOMPUTED, not measured: Llama-3-8B in bf16 ({gpu_counts['weight_bytes'] / 1e9:.3g} GB of weights read "
          f"a step, {gpu_counts['flops_per_request'] / 1e9:.3g} GFLOP per request at {args.context} cached tokens), "
          f"from published bandwidth and dense bf16 rates:")
    print_table(["GPU", "TB/s", "TFLOP/s", "weight read ms", "arithmetic us per request", "bounds cross at batch",
                 "KV read at that batch ms"], rows)
    title = (f"{ckpt.name}: one decode step of llama3-paged.py's forward(), {args.context} cached tokens per request, "
             f"{dtype}\n{machine()}")
    plot(measured, counts, copy, rate, args.out, title)
    if args.json:
        data = {"machine": machine(), "context": args.context, "steps": args.steps, "copy_bandwidth": copy,
                "matmul_rate": rate, "measured": measured, "counts": counts}
        try:
            Path(args.json).write_text(json.dumps(data, indent=1))
        except OSError as e:
            fail(f"cannot write {args.json}: {e.strerror or e}")
    print(f"\nwrote {args.out}; machine at the end: {machine()}")
    print(f"batch_bench.py took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    run_main(main)
