"""How much KV memory does each cache reserve, step by step, against the tokens it actually holds?

Replays llama3-naive.py's and llama3-paged.py's own generate() loops on the same requests (default: the first 7
shipped prompts, naive's most, --ref-lengths, the scripts' default KV budget) with a stand-in for the model
(tools/replay.py): under --ref-lengths the memory timeline depends on token counts only, and is the one the
scripts' --json writes (bench.py checks this against real runs). Plots both: KV reserved (filled) and KV holding
tokens (line) after every decode step, with the budget as a line.

    python tools/plot_memory.py                                           # a second or two, no checkpoint
    python tools/plot_memory.py --naive-json n.json --paged-json p.json   # plot real runs you already have

Writes docs/memory_timeline.png (needs matplotlib: pip install -r tools/requirements.txt).
"""
import json
from pathlib import Path

from cli import ArgumentParser, check_out, fail, run_main
from plotting import pyplot, save_figure
from replay import replay, replay_naive
from scripts import DEFAULT_MAX_SEQ_LEN, LLAMA3_8B_KV_BYTES_PER_TOKEN, ROOT, SCRIPTS, load_script, prompt_lengths


def parse_args(argv):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=7, help="requests: the first N prompts (default 7, naive's most)")
    p.add_argument("--budget-tokens", type=int, help="KV budget in tokens (default: the scripts' CPU default)")
    p.add_argument("--max-seq-len", type=int, default=DEFAULT_MAX_SEQ_LEN)
    p.add_argument("--block-size", type=int, default=16, help="paged block size (default 16, the CPU default)")
    p.add_argument("--naive-json", help="a llama3-naive.py --json file to plot instead of the replay")
    p.add_argument("--paged-json", help="a llama3-paged.py --json file to plot instead of the replay")
    p.add_argument("--out", default=str(ROOT / "docs" / "memory_timeline.png"), help="figure to write")
    args = p.parse_args(argv)
    for name in ("n", "budget_tokens", "block_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not 2 <= args.max_seq_len <= 131_072:
        fail(f"--max-seq-len must be from 2 to 131072, got {args.max_seq_len}")
    check_out(args.out)
    return args


def read_json(path, script):
    try:
        data = json.loads(Path(path).read_text())
        data["stats"]["kv_budget_tokens"], data["timeline"]["reserved_tokens"], data["timeline"]["used_tokens"]
        [(r["prompt_ids"], r["generated_ids"]) for r in data["requests"]]
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror}")
    except (ValueError, KeyError, TypeError):
        fail(f"{path} is not the --json output of {script}")
    return data


def replayed(name, lengths, args, budget):
    """A replay of the script's generate(), in the shape of its --json output (what plot() reads)."""
    if name == "naive":
        if len(lengths) * args.max_seq_len > budget:
            fail(f"naive cannot run {len(lengths)} requests of {args.max_seq_len} tokens in a budget of {budget:,}")
        stats = replay_naive(lengths, args.max_seq_len)
    else:
        stats = replay(lengths, budget, args.block_size, args.max_seq_len)
        if stats["failed"]:
            fail(stats["failed"])
    timeline = {"reserved_tokens": [r for r, _ in stats["timeline"]], "used_tokens": [u for _, u in stats["timeline"]]}
    return {"stats": stats | {"kv_budget_tokens": budget, "requests": len(lengths)}, "timeline": timeline,
            "requests": [{"prompt_ids": [0] * p} for p, _ in lengths]}


def plot(naive, paged, out, source):
    plt = pyplot()
    n = len(naive["requests"])
    fig, axes = plt.subplots(2, 1, figsize=(11, 8), sharex=True, sharey=True)
    tokens_to_gb = lambda t: t * LLAMA3_8B_KV_BYTES_PER_TOKEN / 1e9
    gb_to_tokens = lambda g: g * 1e9 / LLAMA3_8B_KV_BYTES_PER_TOKEN
    for ax, data, name, color in ((axes[0], naive, "naive", "tab:red"), (axes[1], paged, "paged", "tab:blue")):
        reserved, used = data["timeline"]["reserved_tokens"], data["timeline"]["used_tokens"]
        stats = data["stats"]
        steps = range(1, len(reserved) + 1)
        budget = stats["kv_budget_tokens"]
        ax.fill_between(steps, reserved, color=color, alpha=0.25, lw=0, label="KV reserved")
        ax.plot(steps, reserved, color=color, lw=1)
        ax.plot(steps, used, color="black", lw=1.6, label="KV holding tokens")
        ax.axhline(budget, color="gray", ls="--", lw=1.2, label=f"KV budget ({budget:,} tokens)")
        peak_used = stats["peak_used_tokens"]
        idle = stats["reserved_at_peak_use"] - peak_used
        share = 100 * idle / max(1, stats["reserved_at_peak_use"])
        if name == "naive":
            what = (f"naive: {n} requests x {stats['peak_reserved_tokens'] // n:,} tokens reserved up front "
                    f"= {stats['peak_reserved_tokens']:,}, for the whole run")
        else:
            what = (f"paged (block {stats['block_size']}): blocks taken as tokens arrive, given back when a request "
                    f"ends; peak reserved {stats['peak_reserved_tokens']:,}")
        ax.set_title(what, fontsize=10, loc="left")
        free = budget - stats["reserved_at_peak_use"]
        ax.text(0.99, 0.62, f"most tokens held: {peak_used:,}\nreserved then but empty: {idle:,} ({share:.1f}%)\n"
                f"budget left then for other requests: {free:,}",
                transform=ax.transAxes, ha="right", va="top", fontsize=9,
                bbox=dict(facecolor="white", edgecolor="lightgray"))
        ax.set_ylabel("KV tokens")
        ax.grid(alpha=0.3)
        ax.legend(loc="center left", bbox_to_anchor=(0.01, 0.55), fontsize=9)
        sec = ax.secondary_yaxis("right", functions=(tokens_to_gb, gb_to_tokens))
        sec.set_ylabel("GB if this were Llama-3-8B\n(128 KiB per token)", fontsize=8)
        if name == "paged":  # a zoom: on the shared scale the paged curves hug zero
            inset = ax.inset_axes([0.34, 0.2, 0.3, 0.5])
            inset.fill_between(steps, reserved, color=color, alpha=0.25, lw=0)
            inset.plot(steps, reserved, color=color, lw=1)
            inset.plot(steps, used, color="black", lw=1.2)
            inset.set_ylim(0, max(reserved) * 1.1)
            inset.set_title("zoom: same paged run", fontsize=8)
            inset.tick_params(labelsize=7)
            inset.grid(alpha=0.3)
    axes[0].set_ylim(0, max(naive["stats"]["kv_budget_tokens"], paged["stats"]["kv_budget_tokens"]) * 1.12)
    axes[1].set_xlabel("decode step")
    fig.suptitle(f"KV cache reserved vs. holding tokens: the same {n} requests, same budget\n{source}", fontsize=11)
    fig.tight_layout()
    save_figure(fig, out, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    given = {name: read_json(path, SCRIPTS[name].name) for name, path in
             (("naive", args.naive_json), ("paged", args.paged_json)) if path}  # check them before any replay
    if given:  # a script with no --json of its own is replayed on the given run's requests, in its budget
        data = next(iter(given.values()))
        lengths = [(len(r["prompt_ids"]), len(r["generated_ids"])) for r in data["requests"]]
        budget = data["stats"]["kv_budget_tokens"]
    else:
        lengths = prompt_lengths(n=args.n, max_seq_len=args.max_seq_len)
        budget = args.budget_tokens or load_script("paged").CPU_KV_BUDGET_TOKENS
    naive = given.get("naive") or replayed("naive", lengths, args, budget)
    paged = given.get("paged") or replayed("paged", lengths, args, budget)
    if len(given) == 2 and [r["prompt_ids"] for r in naive["requests"]] != [r["prompt_ids"] for r in paged["requests"]]:
        fail("the naive and paged runs are not of the same requests")
    if naive["stats"]["kv_budget_tokens"] != paged["stats"]["kv_budget_tokens"]:
        fail("the naive and paged runs had different KV budgets")
    runs = ", ".join(f"{name} {path}" for name, path in (("naive", args.naive_json), ("paged", args.paged_json))
                     if path)
    what = (f"the first {args.n} shipped ShareGPT prompts, --ref-lengths" if not given else
            f"--json runs: {runs}" + ("" if len(given) == 2 else "; the other script replayed on their requests"))
    source = (f"{what}\nReplays run the scripts' own generate() with a stand-in model: the curves depend on token "
              f"counts only, and equal a real run's --json timeline")
    plot(naive, paged, args.out, source)
    for name, data in (("naive", naive), ("paged", paged)):
        s = data["stats"]
        print(f"{name}{' (--json)' if name in given else ' (replayed)'}: {s['requests']} requests, {s['decode_steps']} "
              f"decode steps, peak reserved {s['peak_reserved_tokens']:,}, peak holding {s['peak_used_tokens']:,} "
              f"tokens, budget {s['kv_budget_tokens']:,}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
