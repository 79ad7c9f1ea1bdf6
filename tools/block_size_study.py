"""How does the KV block size trade wasted memory against requests served, and how far is the
paged cache from a perfect one?

For block sizes 1 to 512 this replays llama3-paged.py's own generate() loop and KVCacheManager, with a stand-in
for the model (tools/replay.py), on the shipped ShareGPT prompts' real Llama 3 lengths (--ref-lengths: each
request generates as many tokens as its reference answer), and reports per block size:
  * the most requests N such that a paged run of the first N prompts never preempts, and the most
    that ran at once in that run;
  * the bound: the largest N a perfect on-demand manager fits if all N start together and each holds
    ceil(tokens / block_size) blocks at every step, freed when done (from lengths alone);
  * the KV reserved but not holding a token (the empty part of last blocks), as % of reserved, at the
    step of peak use and averaged over steps, in that N-request run; and blocks per request;
next to naive (max_seq_len reserved per request up front), and then how many requests fit as the GPU
grows. Everything depends only on token counts and the budget, not on the machine it runs on.

    python tools/block_size_study.py            # shipped prompts, budget of a 24 GB card (61,691 tokens)
    python tools/block_size_study.py --budget-tokens 20000 --prompts my.json --out /tmp/study.png

Prints the tables and writes docs/block_size_study.png (needs matplotlib: pip install -r tools/requirements.txt).
"""
import time
from pathlib import Path

from cli import ArgumentParser, check_out, fail, print_table, run_main
from plotting import pyplot, save_figure
from replay import bound_max_n, paged_max_n, replay, replay_naive, waste
from scripts import (DEFAULT_MAX_SEQ_LEN, DEFAULT_PROMPTS, LLAMA3_8B_KV_BYTES_PER_TOKEN, ROOT, load_script,
                     prompt_lengths)

BLOCK_SIZES = [1, 8, 16, 32, 64, 128, 256, 512]
# Beside the weights, the card table leaves 1.5 GiB for the CUDA context and a step, as the scripts' CPU default does.
HEADROOM_BYTES = 1536 * 2**20
# Two setups a learner is likely to have: (card, its memory in MiB as nvidia-smi reports it, model, checkpoint preset
# of its shape (tools/make_checkpoint.py), attention kernel, block size).
LEARNER_GPUS = [("T4 16 GB", 15_360, "Llama-3.2-1B-Instruct", "1b", "pytorch", 16),
                ("24 GB (RTX 4090)", 24_564, "Llama-3-8B-Instruct", "8b", "flash-attn", 256)]
# GPU memory in MiB: the 24 GB row is the RTX 4090 as nvidia-smi reports it (the scripts' CPU default budget
# comes from it); the others are nominal sizes, a little above what such cards report.
CARDS_MIB = [(16 * 1024, "16 GB", "nominal"), (24_564, "24 GB", "RTX 4090 as reported"), (32 * 1024, "32 GB", "nominal"),
             (40 * 1024, "40 GB", "nominal"), (48 * 1024, "48 GB", "nominal"), (80 * 1024, "80 GB", "nominal")]


def parse_args(argv):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-tokens", type=int, help="KV budget in tokens (default: the scripts' CPU default, 61,691)")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="ShareGPT-style JSON (default: the shipped set)")
    p.add_argument("--max-seq-len", type=int, default=DEFAULT_MAX_SEQ_LEN,
                   help="tokens per request: what naive reserves, and the cap on prompt + generated (default 8192)")
    p.add_argument("--out", default=str(ROOT / "docs" / "block_size_study.png"), help="figure to write")
    args = p.parse_args(argv)
    if args.budget_tokens is not None and args.budget_tokens < 1:
        fail(f"--budget-tokens must be positive, got {args.budget_tokens}")
    if not 2 <= args.max_seq_len <= 131_072:
        fail(f"--max-seq-len must be from 2 to 131072, got {args.max_seq_len}")
    check_out(args.out)
    return args


def study_block_size(lengths, budget, block_size, max_seq_len):
    """One row: max N without preemption, peak running, bound, waste and blocks per request."""
    n = paged_max_n(lengths, budget, block_size, max_seq_len)
    row = {"block_size": block_size, "num_blocks": budget // block_size, "n": n,
           "bound": bound_max_n(lengths, budget, block_size), "peak_running": 0,
           "waste_peak": float("nan"), "waste_mean": float("nan"), "blocks_per_request": float("nan")}
    if n:
        most_blocks = [0] * n  # the most blocks each request held at a decode step

        def count_blocks(step, manager, block_table, cache_seqlens):
            for req_id, blocks in manager.blocks.items():
                most_blocks[req_id] = max(most_blocks[req_id], len(blocks))

        run = replay(lengths[:n], budget, block_size, max_seq_len, on_decode=count_blocks)
        row["peak_running"] = max(run["batch_sizes"], default=0)
        row["waste_peak"], row["waste_mean"] = waste(run["timeline"])
        row["blocks_per_request"] = sum(most_blocks) / n
    return row


def study_naive(lengths, budget, max_seq_len):
    n = min(budget // max_seq_len, len(lengths))
    row = {"n": n, "waste_peak": float("nan"), "waste_mean": float("nan")}
    if n:
        row["waste_peak"], row["waste_mean"] = waste(replay_naive(lengths[:n], max_seq_len)["timeline"])
    return row


def card_budget(mib, weight_bytes, headroom_bytes):
    """KV tokens beside Llama-3-8B in bf16 on a card of `mib` MiB, as the scripts compute it on a GPU."""
    return max(0, mib * 2**20 - weight_bytes - headroom_bytes) // LLAMA3_8B_KV_BYTES_PER_TOKEN


def study_cards(lengths, max_seq_len, known):
    """One row per card; known: {(budget, block size): N max} found already."""
    import make_checkpoint  # tools/make_checkpoint.py: Llama-3-8B's parameter count from its shapes
    paged = load_script("paged")
    weight_bytes = 2 * make_checkpoint.param_count("8b")
    rows = []
    for mib, label, example in CARDS_MIB:
        budget = card_budget(mib, weight_bytes, HEADROOM_BYTES)
        row = {"gib": mib / 1024, "label": label, "mib": mib, "example": example, "budget": budget,
               "naive": min(budget // max_seq_len, len(lengths))}
        for bs in (16, 256):
            if (budget, bs) not in known:
                known[budget, bs] = paged_max_n(lengths, budget, bs, max_seq_len) if budget else 0
            row[bs] = known[budget, bs]
        row["bound16"] = bound_max_n(lengths, budget, 16) if budget else 0
        rows.append(row)
    return rows, weight_bytes, HEADROOM_BYTES


def gpu_budget(preset, card_bytes, batch, max_seq_len):
    """(KV budget in tokens, weight bytes, KV bytes per token): what the scripts' own gpu_budget_tokens() computes
    for a model of the preset's shape in 16-bit weights, taking the card's memory less the weights as free (the
    CUDA context, a few hundred MB, is not subtracted here)."""
    import torch

    import make_checkpoint
    paged = load_script("paged")
    shapes, params = make_checkpoint.tensor_shapes(preset), make_checkpoint.PRESETS[preset]["params"]
    meta = lambda name: torch.empty(shapes[name], device="meta")
    head_dim = params["dim"] // params["n_heads"]
    model = {"tok_embeddings": meta("tok_embeddings.weight"), "layers": [{"w1": meta("layers.0.feed_forward.w1.weight")}],
             "vocab_size": params["vocab_size"], "kv_bytes_per_token": 2 * params["n_layers"] * params["n_kv_heads"] * head_dim * 2}
    weight_bytes = 2 * make_checkpoint.param_count(preset)
    saved = paged.DTYPE, torch.cuda.mem_get_info
    paged.DTYPE, torch.cuda.mem_get_info = torch.bfloat16, lambda device=None: (card_bytes - weight_bytes, card_bytes)
    try:
        return paged.gpu_budget_tokens(model, max_seq_len, batch), weight_bytes, model["kv_bytes_per_token"]
    finally:
        paged.DTYPE, torch.cuda.mem_get_info = saved


def study_learner_gpus(lengths, max_seq_len):
    """What the two setups of LEARNER_GPUS fit: the budget the scripts compute on that card for N requests (which
    counts N's logits), and the most requests paged runs without preemption in it, found as above."""
    rows = []
    for card, mib, model, preset, kernel, block_size in LEARNER_GPUS:
        n = len(lengths)
        for _ in range(3):  # the budget depends a little on N (its logits), and N on the budget
            budget, weight_bytes, kv_bytes = gpu_budget(preset, mib * 2**20, n, max_seq_len)
            n = paged_max_n(lengths, budget, block_size, max_seq_len) if budget else 0
        rows.append({"card": card, "model": model, "kernel": kernel, "block": block_size, "weights": weight_bytes,
                     "kv_bytes": kv_bytes, "budget": budget, "naive": min(budget // max_seq_len, len(lengths)),
                     "paged": n})
    return rows


def print_learner_gpus(rows, max_seq_len, total):
    print(f"\nTwo GPUs a learner may have, as the scripts compute their budget there (the card's memory less the "
          f"16-bit weights and what a step needs beside the pool; not measured on these cards), max_seq_len "
          f"{max_seq_len}:")
    print_table(["card", "model", "kernel", "block", "weights GB", "KV KiB/token", "KV budget (tokens)", "naive",
                 "paged", "paged/naive"],
                [[r["card"], r["model"], r["kernel"], r["block"], f"{r['weights'] / 1e9:.2f}", r["kv_bytes"] // 1024,
                  f"{r['budget']:,}", r["naive"], fmt_n(r["paged"], total),
                  ratio(r["paged"], r["naive"], r["paged"] == total)] for r in rows])


def fmt_n(n, total):
    return f"{n}" + ("+" if n == total else "")


def ratio(a, b, capped=False):
    """a / b; '>=' when a is every prompt in the file (the true a may be larger)."""
    return (">=" if capped else "") + f"{a / b:.2f}" if b else "-"


def print_tables(rows, naive, cards, weight_bytes, headroom, budget, max_seq_len, total):
    gb = budget * LLAMA3_8B_KV_BYTES_PER_TOKEN / 1e9
    print(f"KV budget {budget:,} tokens ({gb:.2f} GB of Llama-3-8B bf16 K+V at 128 KiB/token); {total} prompts; "
          f"max_seq_len {max_seq_len}; --ref-lengths lengths")
    print("N max = largest N such that a paged run of the first N prompts never preempts (llama3-paged.py's "
          "generate() and KVCacheManager, replayed with a stand-in model); at once = most requests running together "
          "in that run; bound = perfect manager, all N start together; waste = reserved KV holding no token, in the "
          "N max run.\n")
    headers = ["block", "blocks in pool", "N max", "at once", "bound", "N/bound", "at once/bound",
               "waste @peak use %", "waste mean %", "blocks/request"]
    table = [[r["block_size"], r["num_blocks"], fmt_n(r["n"], total), r["peak_running"], fmt_n(r["bound"], total),
              ratio(r["n"], r["bound"]), ratio(r["peak_running"], r["bound"]), f"{r['waste_peak']:.1f}",
              f"{r['waste_mean']:.1f}", f"{r['blocks_per_request']:.1f}"] for r in rows]
    table.append([f"naive ({max_seq_len}/request)", f"{naive['n']} rows", naive["n"], naive["n"], "-", "-", "-",
                  f"{naive['waste_peak']:.1f}", f"{naive['waste_mean']:.1f}", f"1 x {max_seq_len} tokens"])
    print_table(headers, table)
    print("('+' = every prompt in the file fits: the true maximum is at least that.)\n")

    print(f"Requests that fit as the GPU grows (Llama-3-8B bf16 beside the cache): KV budget = (card - "
          f"{weight_bytes / 1e9:.2f} GB of weights - {headroom / 2**20:.0f} MiB headroom, as in the scripts' CPU default) "
          f"/ 128 KiB per token; naive = budget // {max_seq_len}; paged = N max as above.")
    headers = ["card", "memory (MiB)", "KV budget (tokens)", "naive", "paged 16", "paged 256", "bound 16", "paged16/naive",
               "paged256/naive"]
    table = []
    for c in cards:
        if not c["budget"]:
            table.append([c["label"], f"{c['mib']:,} ({c['example']})", "0 (weights don't fit)", 0, 0, 0, 0, "-", "-"])
            continue
        table.append([c["label"], f"{c['mib']:,} ({c['example']})", f"{c['budget']:,}", c["naive"], fmt_n(c[16], total),
                      fmt_n(c[256], total), fmt_n(c["bound16"], total), ratio(c[16], c["naive"], c[16] == total),
                      ratio(c[256], c["naive"], c[256] == total)])
    print_table(headers, table)
    print(f"(The scripts' CPU default, {load_script('paged').CPU_KV_BUDGET_TOKENS:,} tokens, is the 24 GB row; "
          f"24 GiB exactly would give {card_budget(24 * 1024, weight_bytes, headroom):,}. N max is not monotone in the "
          f"budget: one more free block at the start lets first-come-first-served admission start one more request, "
          f"which can force a preemption later.)")


def plot(rows, naive, cards, budget, max_seq_len, total, prompts, out):
    plt = pyplot()
    bs = [r["block_size"] for r in rows]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 5.6))

    ax1.plot(bs, [r["bound"] for r in rows], "k--", marker="s", ms=4, label="bound: perfect manager, all start together")
    ax1.plot(bs, [r["n"] for r in rows], "-o", color="tab:blue", label="paged (real manager): most requests, no preemption")
    ax1.plot(bs, [r["peak_running"] for r in rows], ":^", color="tab:blue", ms=4, label="paged: of those, most running at once")
    ax1.axhline(naive["n"], color="tab:red", lw=2, label=f"naive: {naive['n']} ({max_seq_len} tokens reserved each)")
    for r in rows:
        ax1.annotate(f"{r['n']}", (r["block_size"], r["n"]), textcoords="offset points", xytext=(5, 5), ha="left",
                     fontsize=8, color="tab:blue")
    b16 = next((r for r in rows if r["block_size"] == 16), None)
    if b16 and naive["n"]:
        ax1.text(0.03, 0.2, f"block 16: {b16['n']} requests vs naive {naive['n']} ({b16['n'] / naive['n']:.0f}x)",
                 transform=ax1.transAxes, fontsize=9, color="tab:blue")
    ax1.set_title("Requests that fit the budget", fontsize=11)
    ax1.set_ylabel("requests")
    ax1.set_ylim(0, max(r["bound"] for r in rows + [{"bound": naive["n"]}]) * 1.15 + 1)

    ax2.plot(bs, [r["waste_peak"] for r in rows], "-o", color="tab:blue", label="paged, at the step of peak use")
    ax2.plot(bs, [r["waste_mean"] for r in rows], ":^", color="tab:blue", ms=4, label="paged, mean over steps")
    ax2.axhline(naive["waste_peak"], color="tab:red", lw=2, label=f"naive, at peak use ({naive['waste_peak']:.0f}%)")
    for r in rows:
        ax2.annotate(f"{r['waste_peak']:.1f}", (r["block_size"], r["waste_peak"]), textcoords="offset points",
                     xytext=(-4, 7), ha="right", fontsize=8, color="tab:blue")
    ax2.set_title("KV reserved but holding no token (empty part of last blocks)", fontsize=11)
    ax2.set_ylabel("% of reserved KV")
    ax2.set_ylim(0, 105)

    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(bs, [str(b) for b in bs])
        ax.set_xlabel("block size (tokens per KV block)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center left" if ax is ax1 else "upper left")

    fit = [c for c in cards if c["budget"]]
    gib = [c["gib"] for c in fit]
    ax3.plot(gib, [c[16] for c in fit], "-o", color="tab:blue", label="paged, block 16")
    ax3.plot(gib, [c[256] for c in fit], "-s", color="tab:cyan", label="paged, block 256")
    ax3.plot(gib, [c["naive"] for c in fit], "-D", color="tab:red", label=f"naive ({max_seq_len} tokens each)")
    ax3.axhline(total, color="gray", ls=":", label=f"all {total} prompts")
    for c in fit:
        ax3.annotate(f"{c[16]}", (c["gib"], c[16]), textcoords="offset points", xytext=(0, 7), ha="center",
                     fontsize=8, color="tab:blue")
        ax3.annotate(f"{c[256]}", (c["gib"], c[256]), textcoords="offset points", xytext=(8, -10), ha="left",
                     fontsize=8, color="tab:cyan")
        ax3.annotate(f"{c['naive']}", (c["gib"], c["naive"]), textcoords="offset points", xytext=(0, 7), ha="center",
                     fontsize=8, color="tab:red")
    no_fit = [c["label"] for c in cards if not c["budget"]]
    note = f"{', '.join(no_fit)}: weights don't fit; " if no_fit else ""
    ax3.set_title("Most requests without preemption, by GPU memory", fontsize=11)
    ax3.set_xlabel("GPU memory (GB), Llama-3-8B bf16 weights beside the cache\n"
                   f"({note}KV = (card - weights - 1.5 GiB) / 128 KiB per token)", fontsize=9)
    ax3.set_ylabel("requests")
    ax3.set_xticks(gib, [c["label"].split()[0] for c in fit])
    ax3.set_ylim(0, total * 1.1)
    ax3.grid(alpha=0.3)
    ax3.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1, 0.12))

    default = budget == load_script("paged").CPU_KV_BUDGET_TOKENS
    where = ", what a 24 GB RTX 4090 has beside its weights" if default else ""
    source = "shipped ShareGPT prompts" if Path(prompts).resolve() == DEFAULT_PROMPTS else f"prompts of {Path(prompts).name}"
    fig.suptitle(f"Llama 3 KV cache: block size vs. memory wasted and requests served, KV budget {budget:,} tokens "
                 f"(= {budget * LLAMA3_8B_KV_BYTES_PER_TOKEN / 1e9:.1f} GB for Llama-3-8B{where})\n"
                 f"llama3-paged.py's own loop and KVCacheManager, replayed without a model, on the first {total} {source} "
                 f"(real Llama 3 token counts, reference answer lengths): the same on any machine",
                 fontsize=11)
    fig.tight_layout()
    save_figure(fig, out, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    budget = args.budget_tokens or load_script("paged").CPU_KV_BUDGET_TOKENS
    if not Path(args.prompts).is_file():
        fail(f"prompts file {args.prompts} not found")
    lengths = prompt_lengths(args.prompts, max_seq_len=args.max_seq_len)
    rows = [study_block_size(lengths, budget, bs, args.max_seq_len) for bs in BLOCK_SIZES]
    naive = study_naive(lengths, budget, args.max_seq_len)
    cards, weight_bytes, headroom = study_cards(lengths, args.max_seq_len, {(budget, r["block_size"]): r["n"] for r in rows})
    totals = [p + g for p, g in lengths]
    print(f"Prompt + reference answer, chat-formatted Llama 3 tokens: mean {sum(totals) / len(totals):.0f} "
          f"(prompt {sum(p for p, _ in lengths) / len(lengths):.0f}, answer {sum(g for _, g in lengths) / len(lengths):.0f}), "
          f"longest {max(totals)}; naive reserves {args.max_seq_len} for each.")
    print_tables(rows, naive, cards, weight_bytes, headroom, budget, args.max_seq_len, len(lengths))
    print_learner_gpus(study_learner_gpus(lengths, args.max_seq_len), args.max_seq_len, len(lengths))
    plot(rows, naive, cards, budget, args.max_seq_len, len(lengths), args.prompts, args.out)
    print(f"\nwrote {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run_main(main)
