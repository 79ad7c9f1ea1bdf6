"""How many more requests does the paged KV cache fit than the naive one, what does its bookkeeping
cost per decode step, and what throughput does that buy on this machine?

1. Max batch: under one KV budget, with the shipped prompts and --ref-lengths, the largest N naive fits
   (budget // max_seq_len), the largest N paged runs with no preemption at block 256 and 16 (found by
   replaying llama3-paged.py's own generate() and KVCacheManager with a stand-in for the model, see
   replay.py), and the perfect-manager bound. Then real runs of both scripts on the tiny checkpoint confirm
   it: paged at N max has no preemption and at N max + 1 has some (as many as the replay predicts, with the
   same memory timeline); naive at its max runs and at max + 1 exits 1 with one line.
2. Bookkeeping: the paged script's manager time per decode step (its stats' manager_seconds / decode_steps),
   replayed through its own generate() with 8 to ~300 requests running together at block 16 and 256, beside
   a baseline driven by the same loop that does what the original paged-attention-minimal did: one manager
   per layer (32) and the block table rebuilt from Python lists in every layer of every step.
3. Throughput: the same R requests done by naive in waves of its largest batch (one invocation per
   consecutive slice of the prompts) and by paged in one run (admission as the script does it), on the
   tiny checkpoint; plus paged in naive's waves, to separate the batch size from the kernels' cost.

    python tools/bench.py            # full: 61,691-token budget, max_seq_len 8192; ~20 min on 2 CPU cores
    python tools/bench.py --quick    # 8,192-token budget, max_seq_len 2048, fewer runs: 2-4 min

The tiny checkpoint (`python tools/make_checkpoint.py checkpoints/tiny`) is written on first use. Runs use
one torch thread by default (--threads): on a shared 2-core machine, two OpenMP threads that wait for each
other can be much slower than one.
"""
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cli import ArgumentParser, fail, log, print_table, run_main
from machine import machine
from replay import bound_max_n, paged_max_n, replay, replay_naive
from scripts import (DEFAULT_CKPT, DEFAULT_MAX_SEQ_LEN, DEFAULT_PROMPTS, SCRIPTS, load_script, prompt_lengths,
                     require_checkpoint, run_script)

FULL = {"budget_tokens": None, "max_seq_len": 8192, "requests": 70, "confirm": (16, 256), "repeats": 5}
QUICK = {"budget_tokens": 8192, "max_seq_len": 2048, "requests": 16, "confirm": (16,), "repeats": 3}
# Section 2: (block size, numbers of requests), the first N shipped prompts: all of them run at once, without
# preemption, in the scripts' default budget (checked).
BOOKKEEPING = [(16, (8, 64, 300)), (256, (8, 64, 170))]
LLAMA3_8B_LAYERS = 32


def parse_args(argv):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="reduced run: 8192-token budget, max_seq_len 2048, R 16")
    p.add_argument("--budget-tokens", type=int, help="KV budget in tokens (default 61,691; 8,192 with --quick)")
    p.add_argument("--max-seq-len", type=int, help="per request (default 8192; 2048 with --quick)")
    p.add_argument("--requests", type=int, help="R for the throughput runs (default 70; 16 with --quick)")
    p.add_argument("--repeats", type=int, help="replays per bookkeeping figure, of which the median (default 5; 3 "
                                                "with --quick)")
    p.add_argument("--ckpt-dir", default=str(DEFAULT_CKPT), help="checkpoint for the real runs")
    p.add_argument("--threads", type=int, default=1, help="torch threads in every run (default 1)")
    args = p.parse_args(argv)
    mode = QUICK if args.quick else FULL
    for name in ("budget_tokens", "max_seq_len", "requests", "repeats"):
        if getattr(args, name) is None:
            setattr(args, name, mode[name])
    if args.budget_tokens is None:  # the scripts' CPU default
        args.budget_tokens = load_script("paged").CPU_KV_BUDGET_TOKENS
    args.confirm = mode["confirm"]
    for name in ("budget_tokens", "requests", "repeats", "threads"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 2 <= args.max_seq_len <= 131_072:
        fail(f"--max-seq-len must be from 2 to 131072, got {args.max_seq_len}")
    require_checkpoint(args.ckpt_dir)
    return args


def real_run(name, n, args, prompts=None, block_size=None):
    """One real run (see scripts.run_script) with this bench's budget, max_seq_len, checkpoint and threads."""
    label = f"{SCRIPTS[name].name} {n}" + (f" --block-size {block_size}" if block_size else "")
    log(f"running {label}")
    return run_script(name, n, args.ckpt_dir, args.budget_tokens, args.max_seq_len, args.threads, prompts=prompts,
                      block_size=block_size)


def timeline_of(data):
    return list(zip(data["timeline"]["reserved_tokens"], data["timeline"]["used_tokens"]))


# ---------------------------------------------------------------------------------------------
# 1. Max batch

def max_batch(lengths, args):
    total = len(lengths)
    naive_n = min(args.budget_tokens // args.max_seq_len, total)
    paged = {}
    for bs in (256, 16):
        n = paged_max_n(lengths, args.budget_tokens, bs, args.max_seq_len)
        run = replay(lengths[:n], args.budget_tokens, bs, args.max_seq_len) if n else None
        paged[bs] = {"n": n, "bound": bound_max_n(lengths, args.budget_tokens, bs),
                     "at_once": max(run["batch_sizes"], default=0) if run else 0}
    return naive_n, paged


def print_max_batch(naive_n, paged, args, total):
    print(f"\n== 1. Max batch: KV budget {args.budget_tokens:,} tokens, max_seq_len {args.max_seq_len}, first N of "
          f"{total} shipped prompts, --ref-lengths (model-free replay) ==")
    ratio = lambda a, b: f"{a / b:.2f}" if b else "-"
    rows = [["naive", "-", naive_n, naive_n, "-", "1.00" if naive_n else "-", "-"]]
    for bs in (256, 16):
        r = paged[bs]
        rows.append(["paged", bs, r["n"], r["at_once"], r["bound"], ratio(r["n"], naive_n), ratio(r["n"], r["bound"])])
    print_table(["script", "block", "N max", "at once", "bound", "paged/naive", "paged/bound"], rows)
    print("N max: naive = budget // max_seq_len; paged = largest N whose run never preempts. at once = most requests "
          "running together in that run. bound = perfect on-demand manager, all N starting together.")


def confirm(lengths, naive_n, paged, args):
    """Real runs at N max and N max + 1; each compared with the replay."""
    rows, ok, real, notes = [], True, {}, []
    total = len(lengths)
    for bs in args.confirm:
        n = paged[bs]["n"]
        for k in (n, n + 1):
            if k < 1 or k > total:
                continue
            replayed = replay(lengths[:k], args.budget_tokens, bs, args.max_seq_len)
            run = real_run("paged", k, args, block_size=bs)
            if replayed["failed"]:  # request k can never fit: the script must say so in one line
                good = run["rc"] == 1 and run["stderr_lines"] == 1
                rows.append(["paged", bs, k, "exits 1 (replayed)", run["rc"], "-", "-", "-", f"{run['seconds']:.0f}",
                             "ok (1 line on stderr)" if good else f"MISMATCH {run['stderr']}"])
                ok &= good
                continue
            expected = "0 preemptions" if k == n else f">0 ({replayed['preemptions']} replayed)"
            if run["json"] is None:
                rows.append(["paged", bs, k, expected, run["rc"], "-", "-", "-", f"{run['seconds']:.0f}", run["stderr"]])
                ok = False
                continue
            stats = run["json"]["stats"]
            same = timeline_of(run["json"]) == replayed["timeline"]
            good = stats["preemptions"] == replayed["preemptions"] and (stats["preemptions"] == 0) == (k == n) and same
            ok &= good and stats["finished"] == k
            rows.append(["paged", bs, k, expected, run["rc"], stats["preemptions"], f"{stats['finished']}/{k}",
                         "yes" if same else "NO", f"{run['seconds']:.0f}", "ok" if good else "MISMATCH"])
            real[(bs, k)] = stats
    for k in (naive_n, naive_n + 1):
        if k < 1 or k > total:
            continue
        run = real_run("naive", k, args)
        if k == naive_n:
            good = run["rc"] == 0 and run["json"] is not None and run["json"]["stats"]["finished"] == k
            replayed = replay_naive(lengths[:k], args.max_seq_len)
            same = run["json"] is not None and timeline_of(run["json"]) == replayed["timeline"]
            rows.append(["naive", "-", k, "runs", run["rc"], "-", f"{run['json']['stats']['finished']}/{k}" if run["json"] else "-",
                         "yes" if same else "NO", f"{run['seconds']:.0f}",
                         "ok" if good and same else f"MISMATCH {run['stderr']}"])
            ok &= good and same
            if run["json"]:
                real[("naive", k)] = run["json"]["stats"]
        else:
            good = run["rc"] == 1 and run["stderr_lines"] == 1
            rows.append(["naive", "-", k, "exits 1", run["rc"], "-", "-", "-", f"{run['seconds']:.0f}",
                         "ok (1 line on stderr)" if good else f"MISMATCH ({run['stderr_lines']} lines on stderr)"])
            notes.append(f"naive {k}: {run['stderr']}")
            ok &= good
    print(f"\nConfirmed with real runs on {args.ckpt_dir} (--ref-lengths --quiet --json, {args.threads} torch thread(s)); "
          f"'timeline = replay': the run's --json memory timeline equals the replay's, step for step:")
    print_table(["script", "block", "N", "expected", "rc", "preemptions", "finished", "timeline = replay",
                 "seconds", "verdict"], rows)
    for note in notes:
        print(f"  {note}")
    return ok, real


# ---------------------------------------------------------------------------------------------
# 2. Bookkeeping

class PerLayerManagers:
    """The original paged-attention-minimal's bookkeeping, as a baseline with the script's KVCacheManager
    interface, so that the script's own generate() drives it: one manager per layer (32 for Llama-3-8B), each
    told of every block handed out and given back, and the batch's block table rebuilt from Python lists in
    every layer of every step."""

    def __init__(self, manager, n_layers=LLAMA3_8B_LAYERS):
        rows, width = manager.block_table.shape
        self.layers = [type(manager)(manager.num_blocks, manager.block_size, rows, width, manager.block_table.device)
                       for _ in range(n_layers)]
        self.num_blocks, self.block_size = manager.num_blocks, manager.block_size

    @property
    def free_blocks(self):
        return self.layers[0].free_blocks

    def _each(self, method, *args):
        """Every layer's manager is asked and told everything; they agree, so the first answers."""
        return [getattr(layer, method)(*args) for layer in self.layers][0]

    def blocks_for(self, num_tokens):
        return self._each("blocks_for", num_tokens)

    def can_allocate(self, num_tokens):
        return self._each("can_allocate", num_tokens)

    def allocate(self, req_id, num_tokens):
        return self._each("allocate", req_id, num_tokens)

    def needs_block(self, req_id, num_tokens):
        return self._each("needs_block", req_id, num_tokens)

    def append_block(self, req_id):
        self._each("append_block", req_id)

    def free(self, req_id):
        self._each("free", req_id)

    def block_tables(self, rows, width):
        """(batch, width) int32, built from the Python lists once per layer, as each layer's attention did."""
        for layer in self.layers:  # in the paged script, a request's row is its id
            table = torch.tensor([(layer.blocks[r] + [0] * width)[:width] for r in rows.tolist()], dtype=torch.int32,
                                 device=rows.device)
        return table


def manager_time(lengths, block_size, baseline):
    """A model-free replay of llama3-paged.py's generate() through the script's KVCacheManager, or through the
    per-layer baseline: its stats, and all_at_once: whether every request held blocks at the first decode step."""
    held = []

    def first_step(step, manager, block_table, cache_seqlens):
        if step == 1:
            held.append(len((manager.layers[0] if baseline else manager).blocks))

    run = replay(lengths, load_script("paged").CPU_KV_BUDGET_TOKENS, block_size, on_decode=first_step,
                 replace_manager=PerLayerManagers if baseline else None)
    return run | {"all_at_once": held == [len(lengths)]}


def bookkeeping(lengths, args):
    budget = load_script("paged").CPU_KV_BUDGET_TOKENS
    print(f"\n== 2. Bookkeeping: the paged script's manager time per decode step (manager_seconds / decode_steps, as "
          f"its report prints it), replayed through its own generate() with no model: the first N shipped prompts, "
          f"--ref-lengths, KV budget {budget:,} tokens (the default, whatever the mode), max_seq_len "
          f"{DEFAULT_MAX_SEQ_LEN}; median of {args.repeats} replays each ==")
    per_step = lambda runs: statistics.median(r["manager_seconds"] / r["decode_steps"] for r in runs)
    rows = []
    for block_size, counts in BOOKKEEPING:
        for n in counts:
            runs = {"script": [], "baseline": []}
            for _ in range(args.repeats):  # interleaved, so that a busy spell slows both alike
                for key in runs:
                    runs[key].append(manager_time(lengths[:n], block_size, key == "baseline"))
            first = runs["script"][0]
            if any(r["failed"] or r["preemptions"] or not r["all_at_once"] for r in runs["script"] + runs["baseline"]):
                fail(f"bookkeeping: the first {n} prompts do not all run at once without preemption at block "
                     f"{block_size}")
            if any(r["timeline"] != first["timeline"] for r in runs["baseline"]):
                fail(f"bookkeeping: the per-layer baseline scheduled the first {n} prompts differently at block "
                     f"{block_size}")
            script, baseline = per_step(runs["script"]), per_step(runs["baseline"])
            batches = first["batch_sizes"]
            rows.append([block_size, n, max(batches), f"{sum(batches) / len(batches):.0f}", first["decode_steps"],
                         f"{1e6 * script:.1f}", f"{1e6 * baseline:.1f}", f"{baseline / script:.0f}x"])
    print_table(["block", "N", "most in a decode batch", "mean decode batch", "decode steps", "script us/step",
                 "per-layer baseline us/step", "baseline/script"], rows)
    print(f"script: one KVCacheManager for all layers, its device block table written once per new block and "
          f"gathered once per step. per-layer baseline (bench.PerLayerManagers): what the original "
          f"paged-attention-minimal did, {LLAMA3_8B_LAYERS} managers (one per layer of Llama-3-8B) told everything, "
          f"and the batch's table built from Python lists in each of the {LLAMA3_8B_LAYERS} layers, every step. Both "
          f"driven by the same generate() over the same requests (their memory timelines agree: checked); all N "
          f"requests hold blocks from the first decode step (checked; those generating one token never decode); one "
          f"torch thread. Times are of the manager's calls only, with no model between steps (in the real runs of "
          f"section 1 they are larger: see 'for scale').")


# ---------------------------------------------------------------------------------------------
# 3. Throughput

def throughput(entries, lengths, naive_n, args):
    r = min(args.requests, len(lengths))
    runs = {"naive": [], "paged-waves": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(0, r, naive_n):
            wave = entries[i:min(i + naive_n, r)]
            path = Path(tmp) / f"wave{i}.json"
            path.write_text(json.dumps(wave))
            runs["naive"].append(real_run("naive", len(wave), args, prompts=path))
            runs["paged-waves"].append(real_run("paged", len(wave), args, prompts=path, block_size=16))
    runs["paged"] = [real_run("paged", r, args, block_size=16)]
    table, rates = [], {}
    labels = {"naive": f"naive, {len(runs['naive'])} waves of <= {naive_n}",
              "paged": f"paged block 16, one run of {r} (admission as needed)",
              "paged-waves": f"paged block 16, naive's {len(runs['naive'])} waves (control)"}
    for key in ("naive", "paged", "paged-waves"):
        bad = [x for x in runs[key] if x["json"] is None]
        if bad:
            fail(f"a throughput run failed ({labels[key]}): {bad[0]['stderr']}")
        stats = [x["json"]["stats"] for x in runs[key]]
        tokens = sum(s["generated_tokens"] for s in stats)
        seconds = sum(s["wall_seconds"] for s in stats)
        process = sum(x["seconds"] for x in runs[key])
        rates[key] = tokens / seconds
        table.append([labels[key], len(runs[key]), tokens, sum(s["decode_steps"] for s in stats),
                      sum(s.get("preemptions", 0) for s in stats), f"{seconds:.1f}", f"{tokens / seconds:.1f}",
                      f"{process:.1f}", f"{tokens / process:.1f}"])
    expected = sum(g for _, g in lengths[:r])
    print(f"\n== 3. Throughput: the first {r} prompts, --ref-lengths ({expected} tokens to generate), KV budget "
          f"{args.budget_tokens:,} tokens, max_seq_len {args.max_seq_len}, tiny checkpoint, {args.threads} torch thread(s) ==")
    print_table(["run", "invocations", "generated", "decode steps", "preemptions", "generate s", "tokens/s",
                 "process s", "tokens/s incl. start-up"], table)
    print(f"paged / naive: {rates['paged'] / rates['naive']:.2f}x tokens/s (generate loop); paged in naive's waves / "
          f"naive: {rates['paged-waves'] / rates['naive']:.2f}x (same batches: the per-step cost of the two caches' "
          f"attention on this CPU); paged / paged in waves: {rates['paged'] / rates['paged-waves']:.2f}x (the batch size)")
    return rates


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    print(f"machine: {machine()}")
    default_budget = (QUICK if args.quick else FULL)["budget_tokens"] or load_script("paged").CPU_KV_BUDGET_TOKENS
    print(f"mode: {'quick' if args.quick else 'full'}; KV budget {args.budget_tokens:,} tokens "
          f"({'default' if args.budget_tokens == default_budget else '--budget-tokens'}), max_seq_len "
          f"{args.max_seq_len}, throughput R {args.requests}, torch threads per run {args.threads}")
    lengths = prompt_lengths(DEFAULT_PROMPTS, max_seq_len=args.max_seq_len)
    entries = json.loads(DEFAULT_PROMPTS.read_text(encoding="utf-8"))
    if len(entries) != len(lengths):
        fail(f"{DEFAULT_PROMPTS} has entries with no usable prompt: the waves need every entry usable")

    naive_n, paged = max_batch(lengths, args)
    print_max_batch(naive_n, paged, args, len(lengths))
    ok, real = confirm(lengths, naive_n, paged, args)
    for (key, k), stats in sorted(real.items(), key=str):
        if key != "naive" and stats["preemptions"] == 0:
            print(f"  for scale: paged block {key}, {k} requests: {1e3 * stats['wall_seconds'] / stats['decode_steps']:.1f} ms "
                  f"per decode step, of which the manager {1e6 * stats['manager_seconds'] / stats['decode_steps']:.0f} us")

    bookkeeping(prompt_lengths(DEFAULT_PROMPTS, max(n for _, counts in BOOKKEEPING for n in counts)), args)
    if naive_n:
        throughput(entries, lengths, naive_n, args)
    else:
        print("\n== 3. Throughput: skipped, naive fits no request in this budget ==")
    print(f"\nmachine at the end: {machine()}")
    print(f"bench.py took {time.perf_counter() - start:.0f} s")
    if not ok:
        fail("a real run disagreed with the replay (see 'verdict' above)")


if __name__ == "__main__":
    run_main(main)
