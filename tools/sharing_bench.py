"""What does sharing KV blocks save in llama3-paged-sharing.py, and what does it cost?

Real runs of llama3-paged-sharing.py on a checkpoint (the tiny random one by default) and the shipped ShareGPT
prompts, all with --ref-lengths --quiet --json, block size 16 (--block-size), on the CPU:

1. Parallel samples: the first N prompts (default 8) with --samples S (S = 1, 2, 4, 8; --temperature 0.8
   --seed 0), whose S samples share the prompt's blocks, against the same N x S sequences run as separate
   requests (a prompts file with each prompt S times, --samples 1). --ref-lengths makes every sequence
   the same length in both, so only the sharing differs. Peak KV reserved, the ratio, shared blocks and
   copy-on-write copies; the budget is big enough that neither run preempts (checked).
2. A shared system prompt: the first N prompts (default 32) after a ~300-token system prompt, with prefix
   sharing and without: prompt tokens found in the cache, peak KV reserved, wall time, and a check that
   every request generates the same token ids either way (greedy).
3. Swap vs recompute: the first N prompts (default 16) under a budget of 1.5x the longest request, so
   requests are preempted: --preempt recompute against --preempt swap, with a check that every request
   generates the same token ids either way (greedy).

    python tools/sharing_bench.py            # full: ~6 min on one core of a 2-core machine
    python tools/sharing_bench.py --quick    # fewer prompts (2, 2, 5): about 2 min
    python tools/sharing_bench.py --block-size 256   # flash-attn's blocks: prefix sharing finds whole ones only

The tiny checkpoint (`python tools/make_checkpoint.py checkpoints/tiny`) is written on first use. Its K
and V take far fewer bytes per token than Llama-3-8B's, so memory is reported in tokens, and in GB as it
would be for Llama-3-8B (128 KiB per token). Every run uses one torch thread by default (--threads). Exits 1 with one
line if a run fails, preempts where it must not, or the tokens of two runs that must agree differ.
"""
import json
import tempfile
import time
from pathlib import Path

from cli import ArgumentParser, fail, log, print_table, run_main
from machine import machine
from replay import replay
from scripts import (DEFAULT_CKPT, DEFAULT_MAX_SEQ_LEN, DEFAULT_PROMPTS, LLAMA3_8B_KV_BYTES_PER_TOKEN, call_script,
                     load_script, prompt_lengths, require_checkpoint, run_script, tokenizer_path)

BLOCK_SIZE = 16  # the default; --block-size
SAMPLES = (1, 2, 4, 8)
TEMPERATURE, SEED = 0.8, 0
FULL = {"sample_prompts": 8, "system_prompts": 32, "preempt_prompts": 16}
QUICK = {"sample_prompts": 2, "system_prompts": 2, "preempt_prompts": 5}
# Section 3's budget, as a multiple of the longest request's tokens: tight enough that the first N requests
# cannot all run together, loose enough that several can.
PREEMPT_BUDGET_FACTOR = 1.5

# A plain assistant system prompt of the kind a chat service puts before every conversation (~300 tokens).
SYSTEM_PROMPT = """\
You are a helpful, honest and careful assistant for a general audience. Follow these instructions in every \
conversation.

1. Answer the question that was asked. If the request is ambiguous, say what you are assuming, or ask one short \
question to clarify it before you give a long answer.
2. Be accurate. If you are not sure of a fact, say so plainly. Never invent sources, quotations, numbers, links \
or the names of people, books or papers. If a question depends on recent events you may not know about, say that \
your information may be out of date.
3. Keep answers as short as the question allows. Use plain words. Use numbered steps for procedures, bullet \
points for lists of options, and tables only when they make a comparison clearer.
4. When you write code, write complete, working examples, say which language and version they are for, and \
explain briefly what the code does and how to run it. Point out anything that could lose data or cost money.
5. For medical, legal or financial questions, give general information, explain the main options and their \
risks, and suggest speaking to a qualified professional for decisions that matter.
6. Be polite and patient. Do not lecture the user or repeat their question back to them. Do not claim to have \
feelings, a body or experiences you do not have.
7. Refuse clearly and briefly if a request would help someone harm people, break the law or invade someone's \
privacy, and offer a safe alternative where there is one.
8. If the user writes in a language other than English, answer in that language unless they ask otherwise."""


def parse_args(argv):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer prompts per section (2, 2, 5): under ~2 min")
    p.add_argument("--sample-prompts", type=int, help="N for section 1 (default 8; 2 with --quick)")
    p.add_argument("--system-prompts", type=int, help="N for section 2 (default 32; 2 with --quick)")
    p.add_argument("--preempt-prompts", type=int, help="N for section 3 (default 16; 5 with --quick)")
    p.add_argument("--ckpt-dir", default=str(DEFAULT_CKPT), help="checkpoint for the runs (default: the tiny one)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in every run (default 1)")
    p.add_argument("--block-size", type=int, default=BLOCK_SIZE, help=f"tokens per KV block (default {BLOCK_SIZE})")
    args = p.parse_args(argv)
    mode = QUICK if args.quick else FULL
    for name, default in mode.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    for name in (*mode, "threads", "block_size"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    require_checkpoint(args.ckpt_dir)
    return args


def round_up(tokens, block_size):
    return -(-tokens // block_size) * block_size


def gb_8b(tokens):
    """GB that many tokens of K and V would take for Llama-3-8B in bf16."""
    return f"{tokens * LLAMA3_8B_KV_BYTES_PER_TOKEN / 1e9:.3f}"


def run_sharing(label, n, args, budget, extra=(), prompts=None):
    """One real run of llama3-paged-sharing.py on n prompts; returns (its --json output, seconds for the whole
    process). A failed run ends the tool with its error."""
    log(f"running {label}")
    run = run_script("sharing", n, args.ckpt_dir, budget, DEFAULT_MAX_SEQ_LEN, args.threads, prompts=prompts,
                     block_size=args.block_size, extra=extra)
    if run["json"] is None:
        fail(f"{label} failed (exit {run['rc']}): {run['stderr'] or 'no message'}")
    stats = run["json"]["stats"]
    if stats["finished"] != stats["requests"]:
        fail(f"{label}: only {stats['finished']} of {stats['requests']} requests finished")
    return run["json"], run["seconds"]


def generated(data):
    return [r["generated_ids"] for r in data["requests"]]


def check_same_tokens(a, b, what):
    """Exit 1 with one line unless two runs generated the same token ids for every request."""
    ga, gb = generated(a), generated(b)
    if len(ga) != len(gb):
        fail(f"{what}: {len(ga)} requests against {len(gb)}")
    for i, (x, y) in enumerate(zip(ga, gb)):
        if x != y:
            at = next((k for k, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
            fail(f"{what}: request {i} generates different token ids from its token {at} on")
    return f"yes, all {len(ga)} requests"


# ---------------------------------------------------------------------------------------------
# 1. Parallel samples

def repeated_prompts_file(tmp, n, samples, tokenizer):
    """A prompts file with each of the first n shipped entries `samples` times in a row: run with --samples 1,
    its request i * samples + s is sample s of prompt i, the request the --samples run gives the same id."""
    sharing = load_script("sharing")
    entries = json.loads(DEFAULT_PROMPTS.read_text(encoding="utf-8"))[:n]
    path = Path(tmp) / f"repeated-{n}x{samples}.json"
    path.write_text(json.dumps([e for e in entries for _ in range(samples)]))
    # The scripts skip entries with no human turn; then "the first n entries" would not be "the first n prompts".
    want = call_script(sharing.load_prompts, DEFAULT_PROMPTS, n, tokenizer)
    try:
        got = sharing.load_prompts(path, n * samples, tokenizer)
    except SystemExit:  # the script's fail(): fewer usable prompts than entries
        got = None
    if got != [p for p in want for _ in range(samples)]:
        fail(f"the first {n} entries of {DEFAULT_PROMPTS.name} are not all usable prompts")
    return path


def parallel_samples(lengths, tokenizer, args):
    n = args.sample_prompts
    # Enough that neither run preempts even if every sequence held its longest at once, unshared.
    budget = max(SAMPLES) * sum(round_up(p + g + 1, args.block_size) for p, g in lengths[:n])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in SAMPLES:
            path = repeated_prompts_file(tmp, n, s, tokenizer)
            shared, _ = run_sharing(f"--samples {s} on {n} prompts", n, args, budget,
                                  ["--samples", s, "--temperature", TEMPERATURE, "--seed", SEED])
            alone, _ = run_sharing(f"{n * s} separate requests ({n} prompts x {s})", n * s, args, budget,
                                  ["--temperature", TEMPERATURE, "--seed", SEED], prompts=path)
            a, b = shared["stats"], alone["stats"]
            if a["preemptions"] or b["preemptions"]:
                fail(f"S={s}: a run preempted ({a['preemptions']} shared, {b['preemptions']} separate) "
                            f"in a budget of {budget} tokens meant to avoid it")
            # Same prompts and, with --ref-lengths, the same lengths: the two runs hold the same tokens.
            if ([(r["prompt_ids"], len(r["generated_ids"])) for r in shared["requests"]]
                    != [(r["prompt_ids"], len(r["generated_ids"])) for r in alone["requests"]]):
                fail(f"S={s}: the separate run's prompts or lengths differ from the --samples run's")
            rows.append([s, n * s, a["peak_reserved_tokens"], b["peak_reserved_tokens"],
                         f"{b['peak_reserved_tokens'] / a['peak_reserved_tokens']:.2f}",
                         gb_8b(a["peak_reserved_tokens"]), gb_8b(b["peak_reserved_tokens"]),
                         a["shared_blocks_peak"], a["cow_copies"], a["peak_unshared_tokens"],
                         f"{a['wall_seconds']:.1f}", f"{b['wall_seconds']:.1f}"])
    print(f"\n== 1. Parallel samples: the first {n} prompts, --samples S --temperature {TEMPERATURE} --seed {SEED}, "
          f"vs the same {n} x S sequences as separate requests (each prompt S times in a prompts file, --samples 1); "
          f"block {args.block_size}, KV budget {budget:,} tokens, prefix sharing off in both, --ref-lengths ==")
    print_table(["S", "sequences", "peak KV shared", "peak KV separate", "separate/shared",
                        "GB shared (8B)", "GB separate (8B)", "shared blocks peak", "CoW copies",
                        "script's unshared est.", "wall s shared", "wall s separate"], rows)
    print(f"peak KV in tokens reserved (blocks x {args.block_size}); GB (8B) = those tokens at Llama-3-8B's 128 KiB "
          "per token. Preemptions: 0 in every run (checked). Every sequence has the same prompt and length in both "
          "runs (checked). script's unshared est. = the --samples run's own peak_unshared_tokens (its peak of "
          "reserved + shared blocks), to set beside the real separate run. wall s = the generate loop.")


# ---------------------------------------------------------------------------------------------
# 2. A shared system prompt

def system_prompt(lengths, tokenizer, args):
    sharing = load_script("sharing")
    n = args.system_prompts
    system_tokens = len(tokenizer.encode_ordinary(SYSTEM_PROMPT.strip()))
    # The system turn (its header, text and end-of-turn token) goes before every user turn, whatever it says.
    added = len(sharing.encode_chat(tokenizer, "x", SYSTEM_PROMPT)) - len(sharing.encode_chat(tokenizer, "x"))
    # What every prompt starts with (up to the user's own words), and so the full blocks a later request can
    # find in the cache: all of them for every request after the first.
    a, b = sharing.encode_chat(tokenizer, "a", SYSTEM_PROMPT), sharing.encode_chat(tokenizer, "b", SYSTEM_PROMPT)
    common_prefix = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    block = args.block_size
    expected_hits = (n - 1) * (common_prefix // block) * block
    budget = sum(round_up(p + added + g + 1, block) for p, g in lengths[:n])  # all at once, unshared: no preemption
    extra = ["--system-prompt", SYSTEM_PROMPT]
    on, on_s = run_sharing(f"{n} prompts + system prompt, prefix sharing", n, args, budget,
                         extra + ["--prefix-sharing"])
    off, off_s = run_sharing(f"{n} prompts + system prompt, no prefix sharing", n, args, budget,
                           extra)
    rows = []
    for label, data, seconds in (("prefix sharing", on, on_s), ("no prefix sharing", off, off_s)):
        s = data["stats"]
        if s["preemptions"]:
            fail(f"{label}: {s['preemptions']} preemptions in a budget of {budget} tokens meant to avoid them")
        rows.append([label, s["prefix_hit_tokens"], s["peak_reserved_tokens"], gb_8b(s["peak_reserved_tokens"]),
                     s["shared_blocks_peak"], s["decode_steps"], f"{s['wall_seconds']:.1f}", f"{seconds:.1f}"])
    prompt_tokens = sum(len(r["prompt_ids"]) for r in on["requests"])
    print(f"\n== 2. Shared system prompt: the first {n} prompts after a system prompt of {system_tokens} tokens "
          f"({added} with its chat header and end-of-turn; every prompt starts with the same {common_prefix} tokens, "
          f"{common_prefix // block} full blocks), greedy, block {block}, KV budget {budget:,} tokens, "
          f"--ref-lengths ==")
    print_table(["run", "prefix hit tokens", "peak KV reserved", "GB (8B)", "shared blocks peak",
                        "decode steps", "wall s", "process s"], rows)
    same = check_same_tokens(on, off, "prefix sharing changed the generated tokens")
    print(f"prompt tokens in all: {prompt_tokens:,}; prefix hits expected if every request after the first finds "
          f"all {common_prefix // block} common blocks: {expected_hits:,}; preemptions: 0 in both runs (checked); "
          f"peak KV with / without: {on['stats']['peak_reserved_tokens'] / off['stats']['peak_reserved_tokens']:.2f}")
    print(f"generated token ids identical in both runs: {same}")


# ---------------------------------------------------------------------------------------------
# 3. Swap vs recompute

def preempt_budget(lengths, block_size):
    """A budget a bit above the longest request (PREEMPT_BUDGET_FACTOR x its tokens, whole blocks) that a
    replay of the script's generate() (tools/replay.py) says makes it preempt; else the tightest one that holds the
    longest request. Returns (budget, preemptions the replay predicts for --preempt recompute)."""
    longest = max(p + g for p, g in lengths)
    for budget in (round_up(int(PREEMPT_BUDGET_FACTOR * longest), block_size), round_up(longest + 1, block_size)):
        replayed = replay(lengths, budget, block_size, script="sharing")
        if replayed["failed"] is None and replayed["preemptions"]:
            return budget, replayed["preemptions"]
    fail(f"the first {len(lengths)} prompts never preempt in any budget that holds the longest one: "
         f"use more (--preempt-prompts)")


def swap_vs_recompute(lengths, budget, replayed, args):
    n = args.preempt_prompts
    longest = max(p + g for p, g in lengths[:n])
    total = sum(p + g for p, g in lengths[:n])
    runs = {mode: run_sharing(f"{n} prompts, --preempt {mode}, budget {budget}", n, args, budget,
                            ["--preempt", mode])
            for mode in ("recompute", "swap")}
    rows = []
    for mode, (data, seconds) in runs.items():
        s = data["stats"]
        if not s["preemptions"]:
            fail(f"--preempt {mode}: no preemption in a budget of {budget} tokens meant to force some")
        # The tiny model's swapped bytes, and what the same tokens would be for Llama-3-8B.
        tokens = s["swapped_bytes"] / s["kv_bytes_per_token"]
        rows.append([mode, s["preemptions"], s["swapped_bytes"], f"{s['swapped_bytes'] / 1e6:.2f}",
                     f"{tokens:,.0f}", gb_8b(tokens), s["decode_steps"], s["generated_tokens"],
                     s["peak_reserved_tokens"], f"{s['wall_seconds']:.1f}", f"{seconds:.1f}"])
    print(f"\n== 3. Swap vs recompute: the first {n} prompts, greedy, block {args.block_size}, KV budget {budget:,} "
          f"tokens ({PREEMPT_BUDGET_FACTOR}x the longest request's {longest} tokens, in whole blocks; all {n} requests "
          f"hold {total:,} tokens), prefix sharing off, --ref-lengths ==")
    print_table(["--preempt", "preemptions", "swapped bytes", "swapped MB", "swapped tokens", "GB (8B)",
                        "decode steps", "generated", "peak KV reserved", "wall s", "process s"], rows)
    same = check_same_tokens(runs["recompute"][0], runs["swap"][0], "--preempt swap and recompute disagree")
    kv = runs["swap"][0]["stats"]["kv_bytes_per_token"]
    print(f"swapped bytes count both directions (out to host memory and back in), at this checkpoint's {kv} bytes "
          f"per token; swapped tokens = bytes / {kv}; GB (8B) = those tokens at 128 KiB per token. The replay of the "
          f"scheduling (the script's generate() replayed with a stand-in model, recompute) predicted {replayed} "
          f"preemptions.")
    print(f"generated token ids identical in both runs: {same}")


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    print(f"machine: {machine()}")
    print(f"mode: {'quick' if args.quick else 'full'}; checkpoint {args.ckpt_dir}; llama3-paged-sharing.py --ref-lengths "
          f"--quiet --json --block-size {args.block_size} --max-seq-len {DEFAULT_MAX_SEQ_LEN}; "
          f"torch threads per run {args.threads}; N = {args.sample_prompts} / {args.system_prompts} / "
          f"{args.preempt_prompts} prompts in sections 1 / 2 / 3")
    sharing = load_script("sharing")
    tokenizer = call_script(sharing.load_tokenizer, tokenizer_path())
    n_max = max(args.sample_prompts, args.system_prompts, args.preempt_prompts)
    lengths = prompt_lengths(DEFAULT_PROMPTS, n_max)  # [(prompt tokens, tokens to generate)]

    # Section 3's budget now, so that prompts that can't be made to preempt fail before any run.
    preempt_tokens, replayed = preempt_budget(lengths[:args.preempt_prompts], args.block_size)

    parallel_samples(lengths, tokenizer, args)
    system_prompt(lengths, tokenizer, args)
    swap_vs_recompute(lengths, preempt_tokens, replayed, args)
    print(f"\nmachine at the end: {machine()}")
    print(f"sharing_bench.py took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    run_main(main)
