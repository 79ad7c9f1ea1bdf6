"""How many more requests does the paged KV cache fit than the naive one, what does its bookkeeping
cost per decode step, and what throughput does that buy on this machine?

1. Max batch: under one KV budget, with the shipped prompts and --ref-lengths, the largest N naive fits
   (budget // max_seq_len), the largest N paged runs with no preemption at block 256 and 16 (found by
   replaying llama3-paged.py's scheduling with its real KVCacheManager, no model), and the perfect-manager
   bound. Then real runs of both scripts on the tiny checkpoint confirm it: paged at N max has no
   preemption and at N max + 1 has some (as many as the replay predicts, with the same memory timeline);
   naive at its max runs and at max + 1 exits 1.
2. Bookkeeping: the manager's time per decode step (blocks_due / append_block / allocate /
   batch_block_table / free / end_step, with requests finishing and new ones admitted) as the number
   of running requests grows, in a model-free loop, at block 16 and 256.
3. Throughput: the same R requests done by naive in waves of its largest batch (one invocation per
   consecutive slice of the prompts) and by paged in one run (admission as the script does it), on the
   tiny checkpoint; plus paged in naive's waves, to separate the batch size from the kernels' cost.

    python tools/bench.py            # full: 61,691-token budget, max_seq_len 8192; ~15-20 min on 2 CPU cores
    python tools/bench.py --quick    # 8,192-token budget, max_seq_len 2048, fewer runs: ~3 min

The tiny checkpoint (`python tools/make_checkpoint.py checkpoints/tiny`) is written on first use. Runs use
one torch thread by default (--threads): on a shared 2-core machine, two OpenMP threads that wait for each
other can be much slower than one.
"""
import json
import sys
import tempfile
import time
from pathlib import Path

import common

FULL = {"budget": None, "max_seq_len": 8192, "requests": 70, "confirm": (16, 256), "steps": 300}
QUICK = {"budget": 8192, "max_seq_len": 2048, "requests": 16, "confirm": (16,), "steps": 100}
RUNNING = [1, 4, 16, 64, 256, 1024]


def parse_args(argv):
    p = common.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="reduced run: 8192-token budget, max_seq_len 2048, R 16")
    p.add_argument("--budget-tokens", type=int, help="KV budget in tokens (default 61,691; 8,192 with --quick)")
    p.add_argument("--max-seq-len", type=int, help="per request (default 8192; 2048 with --quick)")
    p.add_argument("--requests", type=int, help="R for the throughput runs (default 70; 16 with --quick)")
    p.add_argument("--ckpt-dir", default=str(common.DEFAULT_CKPT), help="checkpoint for the real runs")
    p.add_argument("--threads", type=int, default=1, help="torch threads in every run (default 1)")
    args = p.parse_args(argv)
    mode = QUICK if args.quick else FULL
    args.budget_tokens = args.budget_tokens or mode["budget"] or common.load_script("paged").CPU_KV_BUDGET_TOKENS
    args.max_seq_len = args.max_seq_len or mode["max_seq_len"]
    args.requests = args.requests or mode["requests"]
    args.confirm, args.steps = mode["confirm"], mode["steps"]
    for name in ("budget_tokens", "requests", "threads"):
        if getattr(args, name) < 1:
            common.fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.max_seq_len < 2:
        common.fail(f"--max-seq-len must be at least 2, got {args.max_seq_len}")
    common.require_checkpoint(args.ckpt_dir)
    return args


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_script(name, n, args, prompts=None, block_size=None):
    """One real run (see common.run_script) with this bench's budget, max_seq_len, checkpoint and threads."""
    label = f"{common.SCRIPTS[name].name} {n}" + (f" --block-size {block_size}" if block_size else "")
    log(f"running {label}")
    return common.run_script(name, n, args.ckpt_dir, args.budget_tokens, args.max_seq_len, args.threads,
                             prompts=prompts, block_size=block_size)


def timeline_of(data):
    return list(zip(data["timeline"]["reserved_tokens"], data["timeline"]["used_tokens"]))


# ---------------------------------------------------------------------------------------------
# 1. Max batch

def max_batch(lengths, args):
    total = len(lengths)
    naive_n = min(args.budget_tokens // args.max_seq_len, total)
    paged = {}
    for bs in (256, 16):
        n = common.paged_max_n(lengths, args.budget_tokens, bs, args.max_seq_len)
        sim = common.simulate_paged(lengths[:n], args.budget_tokens, bs, args.max_seq_len) if n else None
        paged[bs] = {"n": n, "bound": common.bound_max_n(lengths, args.budget_tokens, bs),
                     "at_once": max(sim["running"], default=0) if sim else 0}
    return naive_n, paged


def print_max_batch(naive_n, paged, args, total):
    print(f"\n== 1. Max batch: KV budget {args.budget_tokens:,} tokens, max_seq_len {args.max_seq_len}, first N of "
          f"{total} shipped prompts, --ref-lengths (model-free replay) ==")
    ratio = lambda a, b: f"{a / b:.2f}" if b else "-"
    rows = [["naive", "-", naive_n, naive_n, "-", "1.00" if naive_n else "-", "-"]]
    for bs in (256, 16):
        r = paged[bs]
        rows.append(["paged", bs, r["n"], r["at_once"], r["bound"], ratio(r["n"], naive_n), ratio(r["n"], r["bound"])])
    common.print_table(["script", "block", "N max", "at once", "bound", "paged/naive", "paged/bound"], rows)
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
            sim = common.simulate_paged(lengths[:k], args.budget_tokens, bs, args.max_seq_len)
            run = run_script("paged", k, args, block_size=bs)
            expected = "0 preemptions" if k == n else f">0 ({sim['preemptions']} replayed)"
            if run["json"] is None:
                rows.append(["paged", bs, k, expected, run["rc"], "-", "-", "-", f"{run['seconds']:.0f}", run["stderr"]])
                ok = False
                continue
            stats = run["json"]["stats"]
            same = timeline_of(run["json"]) == [tuple(t) for t in sim["timeline"]]
            good = stats["preemptions"] == sim["preemptions"] and (stats["preemptions"] == 0) == (k == n) and same
            ok &= good and stats["finished"] == k
            rows.append(["paged", bs, k, expected, run["rc"], stats["preemptions"], f"{stats['finished']}/{k}",
                         "yes" if same else "NO", f"{run['seconds']:.0f}", "ok" if good else "MISMATCH"])
            real[(bs, k)] = stats
    for k in (naive_n, naive_n + 1):
        if k < 1 or k > total:
            continue
        run = run_script("naive", k, args)
        if k == naive_n:
            good = run["rc"] == 0 and run["json"] is not None and run["json"]["stats"]["finished"] == k
            same = run["json"] is not None and timeline_of(run["json"]) == [
                tuple(t) for t in common.simulate_naive(lengths[:k], args.max_seq_len)["timeline"]]
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
    common.print_table(["script", "block", "N", "expected", "rc", "preemptions", "finished", "timeline = replay",
                        "seconds", "verdict"], rows)
    for note in notes:
        print(f"  {note}")
    return ok, real


# ---------------------------------------------------------------------------------------------
# 2. Bookkeeping

def bookkeeping(lengths, block_size, running, steps, max_seq_len):
    """Seconds of manager calls per decode step with `running` requests kept running: each finished request
    is replaced by the next prompt (cycling through the list). The pool is big enough never to run out.
    Returns (seconds per step, blocks handed out per step, admissions per step), after a warm-up."""
    import torch
    paged = common.load_script("paged")
    need = max(-(-(p + g) // block_size) for p, g in lengths)
    # As the script sizes it: a block-table row for every request that can run at once.
    manager = paged.KVCacheManager(running * (need + 1), block_size, -(-max_seq_len // block_size), torch.device("cpu"),
                                   num_rows=running)
    ntok, end, row = {}, {}, {}
    next_prompt, next_id = 0, 0
    warmup = steps
    spent = blocks = admissions = 0
    for step in range(warmup + steps):
        # Only the manager's calls are timed, as the script's manager_seconds does.
        t0 = time.perf_counter()
        due = manager.blocks_due()
        for rid in due:
            manager.append_block(rid)
        admitted = []
        while len(ntok) < running:  # admissions: keep `running` requests in flight
            p, g = lengths[next_prompt % len(lengths)]
            next_prompt += 1
            rid, next_id = next_id, next_id + 1
            if not manager.can_allocate(p + 1):
                raise RuntimeError("bookkeeping pool too small")
            row[rid] = manager.allocate(rid, p + 1)
            ntok[rid], end[rid] = p, p + g
            admitted.append(rid)
        spent_now = time.perf_counter() - t0
        for rid in admitted:  # prefill: each admitted request's own table, as the script builds it
            t0 = time.perf_counter()
            torch.tensor([manager.blocks[rid][:manager.blocks_for(ntok[rid])]], dtype=torch.int32)
            spent_now += time.perf_counter() - t0
            ntok[rid] += 1
        batch = [rid for rid in ntok if ntok[rid] < end[rid]]
        if batch:  # the decode step's block tables
            rows = torch.tensor([row[rid] for rid in batch], dtype=torch.int32)
            width = manager.blocks_for(max(ntok[rid] for rid in batch))
            t0 = time.perf_counter()
            manager.batch_block_table(rows, width)
            spent_now += time.perf_counter() - t0
        for rid in batch:  # the model's part: one token each
            ntok[rid] += 1
        t0 = time.perf_counter()
        for rid in [r for r in ntok if ntok[r] >= end[r]]:
            manager.free(rid)
            del ntok[rid], end[rid], row[rid]
        manager.end_step()
        spent_now += time.perf_counter() - t0
        if step >= warmup:
            spent += spent_now
            blocks += len(due)
            admissions += len(admitted)
    return spent / steps, blocks / steps, admissions / steps


def print_bookkeeping(lengths, args):
    print(f"\n== 2. Bookkeeping: KVCacheManager time per decode step (model-free, real prompt lengths, finished "
          f"requests replaced; {args.steps} warm-up + {args.steps} timed steps; torch {args.threads} thread(s)) ==")
    import torch
    torch.set_num_threads(args.threads)
    rows = []
    for running in RUNNING:
        row = [running]
        for bs in (16, 256):
            per_step, blocks, admitted = bookkeeping(lengths, bs, running, args.steps, args.max_seq_len)
            row += [f"{1e6 * per_step:.1f}", f"{1e6 * per_step / running:.2f}", f"{blocks:.2f}", f"{admitted:.2f}"]
        rows.append(row)
    common.print_table(["running", "us/step @16", "us/req @16", "new blocks/step @16", "admits/step @16",
                        "us/step @256", "us/req @256", "new blocks/step @256", "admits/step @256"], rows)


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
            runs["naive"].append(run_script("naive", len(wave), args, prompts=path))
            runs["paged-waves"].append(run_script("paged", len(wave), args, prompts=path, block_size=16))
    runs["paged"] = [run_script("paged", r, args, block_size=16)]
    table, rates = [], {}
    labels = {"naive": f"naive, {len(runs['naive'])} waves of <= {naive_n}",
              "paged": f"paged block 16, one run of {r} (admission as needed)",
              "paged-waves": f"paged block 16, naive's {len(runs['naive'])} waves (control)"}
    for key in ("naive", "paged", "paged-waves"):
        bad = [x for x in runs[key] if x["json"] is None]
        if bad:
            common.fail(f"a throughput run failed ({labels[key]}): {bad[0]['stderr']}")
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
    common.print_table(["run", "invocations", "generated", "decode steps", "preemptions", "generate s", "tokens/s",
                        "process s", "tokens/s incl. start-up"], table)
    print(f"paged / naive: {rates['paged'] / rates['naive']:.2f}x tokens/s (generate loop); paged in naive's waves / "
          f"naive: {rates['paged-waves'] / rates['naive']:.2f}x (same batches: the per-step cost of the two caches' "
          f"attention on this CPU); paged / paged in waves: {rates['paged'] / rates['paged-waves']:.2f}x (the batch size)")
    return rates


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    print(f"machine: {common.machine()}")
    print(f"mode: {'quick' if args.quick else 'full'}; KV budget {args.budget_tokens:,} tokens "
          f"({'--budget-tokens' if args.budget_tokens != (QUICK['budget'] if args.quick else common.load_script('paged').CPU_KV_BUDGET_TOKENS) else 'default'}), "
          f"max_seq_len {args.max_seq_len}, throughput R {args.requests}, torch threads per run {args.threads}")
    lengths = common.prompt_lengths(common.DEFAULT_PROMPTS, max_seq_len=args.max_seq_len)
    entries = json.loads(common.DEFAULT_PROMPTS.read_text(encoding="utf-8"))
    if len(entries) != len(lengths):
        common.fail(f"{common.DEFAULT_PROMPTS} has entries with no usable prompt: the waves need every entry usable")

    naive_n, paged = max_batch(lengths, args)
    print_max_batch(naive_n, paged, args, len(lengths))
    ok, real = confirm(lengths, naive_n, paged, args)
    for (key, k), stats in sorted(real.items(), key=str):
        if key != "naive" and stats["preemptions"] == 0:
            print(f"  for scale: paged block {key}, {k} requests: {1e3 * stats['wall_seconds'] / stats['decode_steps']:.1f} ms "
                  f"per decode step, of which the manager {1e6 * stats['manager_seconds'] / stats['decode_steps']:.0f} us")

    print_bookkeeping(lengths, args)
    if naive_n:
        throughput(entries, lengths, naive_n, args)
    else:
        print("\n== 3. Throughput: skipped, naive fits no request in this budget ==")
    print(f"\nmachine at the end: {common.machine()}")
    print(f"bench.py took {time.perf_counter() - start:.0f} s")
    if not ok:
        common.fail("a real run disagreed with the replay (see 'verdict' above)")


if __name__ == "__main__":
    common.run_main(main)
