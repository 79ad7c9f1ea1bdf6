"""The figures of README section 5, rung by rung: what sharing KV blocks saves, and what swapping costs.

Real runs of the rungs above llama3-paged.py on a checkpoint (the tiny random one by default) and the shipped
ShareGPT prompts (--prompts), all with --ref-lengths --quiet --json, block size 16 (--block-size), on the CPU:

1. samples: llama3-paged-samples.py, the first N prompts (default 8) with --samples S (S = 1, 2, 4, 8;
   --temperature 0.8 --seed 0), whose S samples share the prompt's blocks, against the same N x S sequences run
   as separate requests (a prompts file with each prompt S times, --samples 1). --ref-lengths makes every
   sequence the same length in both, so only the sharing differs. Peak KV reserved and the ratio; the budget is
   big enough that neither run preempts (checked). Skipped, with a line that says so, where the script is absent.
2. prefix: llama3-paged-prefix.py, the first N prompts (default 32) after a ~300-token system prompt, with
   --prefix-sharing and without, greedy: in a budget that holds them all at once, the tokens found through the
   prefix index, blocks shared and references saved, each checked against what the prompts' tokens give; and in a
   budget of a few requests at a time (PREFIX_FEW_FACTOR x the longest request), where a request often comes after
   the last holder of the system prompt's blocks has finished, and finds them held by nobody. Every run generates
   the same token ids (checked).
3. swap: llama3-paged-swap.py, the first N prompts (default 16) under a budget of 1.5x the longest request, so
   requests are preempted: --preempt recompute against --preempt swap, the tokens recomputed against the blocks
   and bytes moved, with a check that every request generates the same token ids either way (greedy), and that
   recompute preempts as often as a replay of llama3-paged.py's loop says (the same schedule).

    python tools/sharing_bench.py            # full: ~8 min on one core of a 2-core machine
    python tools/sharing_bench.py --quick    # fewer prompts (2, 2, 5)
    python tools/sharing_bench.py --block-size 256   # flash-attn's blocks: prefix sharing finds whole ones only
    python tools/sharing_bench.py --sections prefix,swap

The tiny checkpoint (`python tools/make_checkpoint.py checkpoints/tiny`) is written on first use. Its K
and V take far fewer bytes per token than Llama-3-8B's, so memory is reported in tokens, and in GB as it
would be for Llama-3-8B (128 KiB per token). Every run uses one torch thread by default (--threads). Exits 1 with one
line if a run fails, preempts where it must not, or a figure or the tokens of two runs that must agree differ.
"""
import json
import tempfile
import time
from pathlib import Path

from cli import ArgumentParser, fail, log, print_table, run_main
from machine import machine
from replay import replay
from scripts import (DEFAULT_CKPT, DEFAULT_MAX_SEQ_LEN, DEFAULT_PROMPTS, LLAMA3_8B_KV_BYTES_PER_TOKEN, SCRIPTS,
                     call_script, load_script, prompt_lengths, require_checkpoint, run_script, tokenizer_path)

BLOCK_SIZE = 16  # the default; --block-size
SAMPLES = (1, 2, 4, 8)
TEMPERATURE, SEED = 0.8, 0
FULL = {"sample_prompts": 8, "system_prompts": 32, "preempt_prompts": 16}
QUICK = {"sample_prompts": 2, "system_prompts": 2, "preempt_prompts": 5}
SECTIONS = ("samples", "prefix", "swap")
# Section 2's second budget, as a multiple of the longest request's tokens: a few requests at a time.
PREFIX_FEW_FACTOR = 2
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
    p.add_argument("--quick", action="store_true", help="fewer prompts per section (2, 2, 5)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"which to run, of {','.join(SECTIONS)} (default all)")
    p.add_argument("--sample-prompts", type=int, help="N for section 1 (default 8; 2 with --quick)")
    p.add_argument("--system-prompts", type=int, help="N for section 2 (default 32; 2 with --quick)")
    p.add_argument("--preempt-prompts", type=int, help="N for section 3 (default 16; 5 with --quick)")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="ShareGPT-style JSON (default: the shipped one)")
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
    args.sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    if not args.sections or set(args.sections) - set(SECTIONS):
        fail(f"--sections takes names from {','.join(SECTIONS)}, got {','.join(args.sections) or 'none'}")
    if not Path(args.prompts).is_file():
        fail(f"no prompts file {args.prompts}")
    require_checkpoint(args.ckpt_dir)
    return args


def round_up(tokens, block_size):
    return -(-tokens // block_size) * block_size


def gb_8b(tokens):
    """GB that many tokens of K and V would take for Llama-3-8B in bf16."""
    return f"{tokens * LLAMA3_8B_KV_BYTES_PER_TOKEN / 1e9:.3f}"


def run_rung(script, label, n, args, budget, extra=(), prompts=None):
    """One real run of a rung ('samples', 'prefix' or 'swap') on n prompts; returns (its --json output, seconds for
    the whole process). A failed run ends the tool with its error."""
    log(f"running {SCRIPTS[script].name}: {label}")
    run = run_script(script, n, args.ckpt_dir, budget, DEFAULT_MAX_SEQ_LEN, args.threads,
                     prompts=prompts or args.prompts, block_size=args.block_size, extra=extra)
    if run["json"] is None:
        fail(f"{SCRIPTS[script].name}, {label}, failed (exit {run['rc']}): {run['stderr'] or 'no message'}")
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

def repeated_prompts_file(tmp, prompts, n, samples, tokenizer):
    """A prompts file with each of the first n entries of `prompts` `samples` times in a row: run with --samples 1,
    its request i * samples + s is sample s of prompt i, the request the --samples run gives the same id."""
    rung = load_script("samples")
    entries = json.loads(Path(prompts).read_text(encoding="utf-8"))[:n]
    path = Path(tmp) / f"repeated-{n}x{samples}.json"
    path.write_text(json.dumps([e for e in entries for _ in range(samples)]))
    # The scripts skip entries with no human turn; then "the first n entries" would not be "the first n prompts".
    want = call_script(rung.load_prompts, prompts, n, tokenizer)
    try:
        got = rung.load_prompts(path, n * samples, tokenizer)
    except SystemExit:  # the script's fail(): fewer usable prompts than entries
        got = None
    if got != [p for p in want for _ in range(samples)]:
        fail(f"the first {n} entries of {Path(prompts).name} are not all usable prompts")
    return path


def parallel_samples(lengths, tokenizer, args):
    """Section 1: llama3-paged-samples.py's --samples S against S separate requests for each prompt."""
    n = args.sample_prompts
    # Enough that neither run preempts even if every sequence held its longest at once, unshared.
    budget = max(SAMPLES) * sum(round_up(p + g + 1, args.block_size) for p, g in lengths[:n])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in SAMPLES:
            path = repeated_prompts_file(tmp, args.prompts, n, s, tokenizer)
            shared, _ = run_rung("samples", f"--samples {s} on {n} prompts", n, args, budget,
                                ["--samples", s, "--temperature", TEMPERATURE, "--seed", SEED])
            alone, _ = run_rung("samples", f"{n * s} separate requests ({n} prompts x {s})", n * s, args, budget,
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
                         a.get("shared_blocks_peak", "-"), a.get("saved_blocks_peak", "-"), a.get("cow_copies", "-"),
                         f"{a['wall_seconds']:.1f}", f"{b['wall_seconds']:.1f}"])
    print(f"\n== 1. Parallel samples: the first {n} prompts, --samples S --temperature {TEMPERATURE} --seed {SEED}, "
          f"vs the same {n} x S sequences as separate requests (each prompt S times in a prompts file, --samples 1); "
          f"block {args.block_size}, KV budget {budget:,} tokens, prefix sharing off in both, --ref-lengths ==")
    print_table(["S", "sequences", "peak KV shared", "peak KV separate", "separate/shared", "GB shared (8B)",
                 "GB separate (8B)", "blocks shared", "references saved", "CoW copies", "wall s shared",
                 "wall s separate"], rows)
    print(f"peak KV in tokens reserved (blocks x {args.block_size}); GB (8B) = those tokens at Llama-3-8B's 128 KiB "
          "per token. Preemptions: 0 in every run (checked). Every sequence has the same prompt and length in both "
          "runs (checked). blocks shared (held by more than one sample), references saved (holds beyond the first) and "
          "CoW copies: the --samples run's own stats, the most at once after a decode step for the first two. "
          "wall s = the generate loop.")


# ---------------------------------------------------------------------------------------------
# 2. A shared system prompt

def common_length(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def expected_sharing(prompts, block):
    """What prefix sharing must find when all the prompts are admitted together, in order, computed from their
    tokens: each finds the full blocks of its start that an earlier one has (never the block of its last token).
    Returns (tokens found, distinct blocks found: the blocks shared, blocks found: the references saved)."""
    found = [max([min(common_length(p, q), len(p) - 1) // block for q in prompts[:i]], default=0)
             for i, p in enumerate(prompts)]
    distinct = {tuple(p[:block * k]) for p, n in zip(prompts, found) for k in range(1, n + 1)}
    return block * sum(found), len(distinct), sum(found)


def system_prompt(lengths, tokenizer, args):
    """Section 2: llama3-paged-prefix.py with and without --prefix-sharing, all at once and a few at a time."""
    prefix = load_script("prefix")
    n, block = args.system_prompts, args.block_size
    system_tokens = len(tokenizer.encode_ordinary(SYSTEM_PROMPT.strip()))
    # The system turn (its header, text and end-of-turn token) goes before every user turn, whatever it says.
    added = len(prefix.encode_chat(tokenizer, "x", SYSTEM_PROMPT)) - len(prefix.encode_chat(tokenizer, "x"))
    a, b = prefix.encode_chat(tokenizer, "a", SYSTEM_PROMPT), prefix.encode_chat(tokenizer, "b", SYSTEM_PROMPT)
    common_prefix = common_length(a, b)  # what every prompt starts with, up to the user's own words
    all_at_once = sum(round_up(p + added + g + 1, block) for p, g in lengths[:n])  # unshared: no preemption
    few = round_up(PREFIX_FEW_FACTOR * max(p + added + g + 1 for p, g in lengths[:n]), block)
    runs = []
    for label, budget, options in (("no prefix sharing, all at once", all_at_once, []),
                                   ("prefix sharing, all at once", all_at_once, ["--prefix-sharing"]),
                                   ("no prefix sharing, a few at a time", few, []),
                                   ("prefix sharing, a few at a time", few, ["--prefix-sharing"])):
        data, seconds = run_rung("prefix", f"{n} prompts + system prompt, {label}", n, args, budget,
                                 ["--system-prompt", SYSTEM_PROMPT, *options])
        runs.append((label, budget, options, data, seconds))
    rows = []
    for label, budget, options, data, seconds in runs:
        s = data["stats"]
        if budget == all_at_once and s["preemptions"]:
            fail(f"{label}: {s['preemptions']} preemptions in a budget of {budget} tokens meant to avoid them")
        got = (s["prefix_hit_tokens"], s["shared_blocks_peak"], s["saved_blocks_peak"], s["prefix_unheld_hit_tokens"])
        want = (*expected_sharing([r["prompt_ids"] for r in data["requests"]], block), 0)
        if budget == all_at_once and options and got != want:
            fail(f"{label}: (tokens found, blocks shared, references saved, tokens found unheld) are {got}; the "
                 f"prompts' tokens give {want}")
        rows.append([label, f"{budget:,}", s["prefix_hit_tokens"], s["prefix_unheld_hit_tokens"],
                     s["shared_blocks_peak"], s["saved_blocks_peak"], s["peak_reserved_tokens"],
                     gb_8b(s["peak_reserved_tokens"]), s["preemptions"], s["decode_steps"], f"{s['wall_seconds']:.1f}",
                     f"{seconds:.1f}"])
    prompt_tokens = sum(len(r["prompt_ids"]) for r in runs[0][3]["requests"])
    print(f"\n== 2. Shared system prompt (llama3-paged-prefix.py): the first {n} prompts after a system prompt of "
          f"{system_tokens} tokens ({added} with its chat header and end-of-turn; every prompt starts with the same "
          f"{common_prefix} tokens, {common_prefix // block} full blocks), greedy, block {block}, --ref-lengths; "
          f"KV budgets: all at once {all_at_once:,} tokens, a few at a time {few:,} ({PREFIX_FEW_FACTOR}x the "
          "longest request) ==")
    print_table(["run", "KV budget", "tokens found", "found unheld", "blocks shared", "references saved",
                 "peak KV reserved", "GB (8B)", "preemptions", "decode steps", "wall s", "process s"], rows)
    same = [check_same_tokens(runs[0][3], run[3], f"{run[0]} changed the generated tokens") for run in runs[1:]][-1]
    print(f"prompt tokens in all: {prompt_tokens:,}. tokens found: through the prefix index, so not prefilled; "
          "found unheld: those in blocks no request held when found (their last holder had finished, or was "
          "preempted). blocks shared, references saved: the most at once after a decode step, of blocks held by more "
          "than one request, and of the blocks unshared copies would take. All at once: no preemption, and the "
          "tokens found, blocks shared and references saved are what the prompts' tokens give (checked).")
    print(f"generated token ids identical in all four runs: {same}")


# ---------------------------------------------------------------------------------------------
# 3. Swap vs recompute

def preempt_budget(lengths, block_size):
    """A budget a bit above the longest request (PREEMPT_BUDGET_FACTOR x its tokens, whole blocks) that a
    replay of llama3-paged.py's generate() (tools/replay.py) says makes it preempt; else the tightest one that holds
    the longest request. Returns (budget, preemptions the replay predicts for --preempt recompute, which is
    llama3-paged.py's schedule)."""
    longest = max(p + g for p, g in lengths)
    for budget in (round_up(int(PREEMPT_BUDGET_FACTOR * longest), block_size), round_up(longest + 1, block_size)):
        replayed = replay(lengths, budget, block_size, script="paged")
        if replayed["failed"] is None and replayed["preemptions"]:
            return budget, replayed["preemptions"]
    fail(f"the first {len(lengths)} prompts never preempt in any budget that holds the longest one: "
         f"use more (--preempt-prompts)")


def swap_vs_recompute(lengths, budget, replayed, args):
    """Section 3: llama3-paged-swap.py's --preempt recompute against --preempt swap."""
    n = args.preempt_prompts
    longest = max(p + g for p, g in lengths[:n])
    total = sum(p + g for p, g in lengths[:n])
    runs = {mode: run_rung("swap", f"{n} prompts, --preempt {mode}, budget {budget}", n, args, budget,
                           ["--preempt", mode])
            for mode in ("recompute", "swap")}
    rows = []
    for mode, (data, seconds) in runs.items():
        s = data["stats"]
        if not s["preemptions"]:
            fail(f"--preempt {mode}: no preemption in a budget of {budget} tokens meant to force some")
        if s["swapped_out_blocks"] != s["swapped_in_blocks"]:
            fail(f"--preempt {mode}: {s['swapped_out_blocks']} blocks swapped out but {s['swapped_in_blocks']} in")
        block_bytes = s["block_size"] * s["kv_bytes_per_token"]
        moved = (s["swapped_out_blocks"] + s["swapped_in_blocks"]) * block_bytes
        rows.append([mode, s["preemptions"], s["recomputed_tokens"], s["swapped_out_blocks"], moved,
                     f"{moved / 1e6:.2f}", gb_8b(s["swapped_out_blocks"] * s["block_size"]), s["decode_steps"],
                     s["generated_tokens"], s["peak_reserved_tokens"], f"{s['wall_seconds']:.1f}", f"{seconds:.1f}"])
    if runs["recompute"][0]["stats"]["preemptions"] != replayed:
        fail(f"--preempt recompute preempted {runs['recompute'][0]['stats']['preemptions']} times; a replay of "
             f"llama3-paged.py's loop, the same schedule, {replayed}")
    print(f"\n== 3. Swap vs recompute (llama3-paged-swap.py): the first {n} prompts, greedy, block {args.block_size}, "
          f"KV budget {budget:,} tokens ({PREEMPT_BUDGET_FACTOR}x the longest request's {longest} tokens, in whole "
          f"blocks; all {n} requests hold {total:,} tokens), --ref-lengths ==")
    print_table(["--preempt", "preemptions", "tokens recomputed", "blocks out (= in)", "bytes out + in", "MB",
                 "GB out (8B)", "decode steps", "generated", "peak KV reserved", "wall s", "process s"], rows)
    same = check_same_tokens(runs["recompute"][0], runs["swap"][0], "--preempt swap and recompute disagree")
    kv = runs["swap"][0]["stats"]["kv_bytes_per_token"]
    print(f"tokens recomputed: prefilled again, all but the newest of each preempted request's. Blocks out: to host "
          f"memory, each {args.block_size} tokens of K and V at this checkpoint's {kv} bytes a token; GB out (8B) = "
          f"those blocks at Llama-3-8B's 128 KiB a token. recompute preempted {replayed} times, as the replay of "
          "llama3-paged.py's loop says (checked).")
    print(f"generated token ids identical in both runs: {same}")


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    print(f"machine: {machine()}")
    for name in [name for name in args.sections if not SCRIPTS[name].is_file()]:
        print(f"section {name}: skipped, {SCRIPTS[name].name} is not here")
    sections = [name for name in args.sections if SCRIPTS[name].is_file()]
    print(f"mode: {'quick' if args.quick else 'full'}; sections {', '.join(sections) or 'none'}; checkpoint "
          f"{args.ckpt_dir}; prompts {args.prompts}; --ref-lengths --quiet --json --block-size {args.block_size} "
          f"--max-seq-len {DEFAULT_MAX_SEQ_LEN}; torch threads per run {args.threads}; N = {args.sample_prompts} / "
          f"{args.system_prompts} / {args.preempt_prompts} prompts in sections 1 / 2 / 3")
    paged = load_script("paged")
    tokenizer = call_script(paged.load_tokenizer, tokenizer_path())
    n_max = max([args.sample_prompts * ("samples" in sections), args.system_prompts * ("prefix" in sections),
                 args.preempt_prompts * ("swap" in sections), 1])
    lengths = prompt_lengths(args.prompts, n_max)  # [(prompt tokens, tokens to generate)]
    if "swap" in sections:  # section 3's budget now, so that prompts that can't be made to preempt fail first
        preempt_tokens, replayed = preempt_budget(lengths[:args.preempt_prompts], args.block_size)
    if "samples" in sections:
        parallel_samples(lengths, tokenizer, args)
    if "prefix" in sections:
        system_prompt(lengths, tokenizer, args)
    if "swap" in sections:
        swap_vs_recompute(lengths, preempt_tokens, replayed, args)
    print(f"\nmachine at the end: {machine()}")
    print(f"sharing_bench.py took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    run_main(main)
