"""What do blocks and block tables look like in a real run of the paged KV cache?

Drives llama3-paged.py's own KVCacheManager through its scheduling loop (replayed without a model) with
a few real requests' Llama 3 lengths (--ref-lengths), a small pool and block size 16, stops after a
given decode step, and draws each running request's logical blocks, the physical block each maps to
(from the manager's block table, as batch_block_table returns it), how full each block is, and which
blocks of the pool are free, including those given back by a request that already finished.

    python tools/plot_blocks.py                                   # prompts 1, 6, 12, 32; 12 blocks; step 30
    python tools/plot_blocks.py --requests 0,1,2,3 --pool-blocks 48 --step 60

Writes docs/block_table.png (needs matplotlib: pip install -r tools/requirements.txt).
"""
from pathlib import Path

import common

COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]


def parse_args(argv):
    p = common.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", default="1,6,12,32", help="prompt indices, comma-separated (default 1,6,12,32)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--pool-blocks", type=int, default=12, help="blocks in the pool (default 12)")
    p.add_argument("--step", type=int, default=30, help="stop after this many decode steps (default 30)")
    p.add_argument("--prompts", default=str(common.DEFAULT_PROMPTS))
    p.add_argument("--out", default=str(common.ROOT / "docs" / "block_table.png"), help="figure to write")
    args = p.parse_args(argv)
    try:
        args.ids = [int(x) for x in args.requests.split(",")]
    except ValueError:
        common.fail(f"--requests must be comma-separated prompt indices, got {args.requests!r}")
    if not args.ids or min(args.ids) < 0 or len(set(args.ids)) != len(args.ids) or len(args.ids) > len(COLORS):
        common.fail(f"--requests must name 1 to {len(COLORS)} distinct prompt indices >= 0, got {args.requests!r}")
    for name in ("block_size", "pool_blocks", "step"):
        if getattr(args, name) < 1:
            common.fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not Path(args.prompts).is_file():
        common.fail(f"prompts file {args.prompts} not found")
    common.check_out(args.out)
    return args


def run(args):
    """Replay up to the chosen step; returns the state to draw."""
    import torch
    all_lengths = common.prompt_lengths(args.prompts)
    if max(args.ids) >= len(all_lengths):
        common.fail(f"--requests: prompt {max(args.ids)} asked for, but {args.prompts} has {len(all_lengths)} usable prompts (0 to {len(all_lengths) - 1})")
    lengths = [all_lengths[i] for i in args.ids]
    sim = common.simulate_paged(lengths, args.pool_blocks * args.block_size, args.block_size,
                                stop_after_steps=args.step, device="cpu")
    if sim["failed"] is not None:
        common.fail(f"a pool of {args.pool_blocks} blocks cannot hold request {args.ids[sim['failed']]}")
    if "manager" not in sim:
        common.fail(f"every request finished within {sim['decode_steps']} decode steps: choose --step below that")
    manager = sim["manager"]
    running = list(sim["cached"])  # in admission order
    rows = torch.tensor([manager.rows[r] for r in running], dtype=torch.int32)
    width = max(len(manager.blocks[r]) for r in running)
    table = manager.batch_block_table(rows, width).tolist()  # the device table, as the kernel would read it
    for r, row in zip(running, table):
        if row[:len(manager.blocks[r])] != manager.blocks[r]:
            common.fail(f"the block table disagrees with the manager's list for request {args.ids[r]}")
    return {"lengths": lengths, "running": running, "cached": sim["cached"], "blocks": dict(manager.blocks),
            "table_rows": {r: manager.rows[r] for r in running}, "free": list(manager.free_blocks),
            "finished": sim.get("finished", []), "preemptions": sim["preemptions"]}


def draw(state, args):
    plt = common.pyplot()
    from matplotlib.colors import to_rgba
    from matplotlib.patches import Rectangle
    bs, n_pool = args.block_size, args.pool_blocks
    running, blocks, cached = state["running"], state["blocks"], state["cached"]
    color = {r: COLORS[r % len(COLORS)] for r in range(len(args.ids))}
    owner = {b: (r, j) for r in running for j, b in enumerate(blocks[r])}
    fill = {b: min(bs, cached[r] - j * bs) for b, (r, j) in owner.items()}

    cols = min(n_pool, 4 if n_pool <= 16 else 8)
    pool_rows = -(-n_pool // cols)
    max_logical = max(len(blocks[r]) for r in running)
    left_w = max_logical * 1.15
    gap = 3.6
    row_h = 1.9
    height = max(len(running) * row_h, pool_rows * 1.25) + 1.0
    fig_w = 2.2 + left_w + gap + cols * 1.25 + 0.4
    fig, ax = plt.subplots(figsize=(max(11, fig_w * 0.95), max(4.5, height * 0.8 + 1.4)))

    def light(c):  # opaque, so the arrows pass under the boxes
        r, g, b, _ = to_rgba(c)
        return (0.45 * r + 0.55, 0.45 * g + 0.55, 0.45 * b + 0.55)

    def block_box(x, y, tokens, c, label, sub):
        """A block: coloured where slots hold a token, hatched where reserved but still empty."""
        if tokens:
            ax.add_patch(Rectangle((x, y), tokens / bs, 1, facecolor=light(c), edgecolor="none", zorder=2))
        if tokens < bs:
            ax.add_patch(Rectangle((x + tokens / bs, y), 1 - tokens / bs, 1, facecolor="white", edgecolor="gray",
                                   hatch="///", lw=0, zorder=2))
        ax.add_patch(Rectangle((x, y), 1, 1, facecolor="none", edgecolor="black", lw=1, zorder=3))
        box = dict(facecolor="white", edgecolor="none", alpha=0.8, pad=0.5)
        ax.text(x + 0.5, y + 0.66, label, ha="center", va="center", fontsize=9, weight="bold", zorder=4,
                bbox=box if tokens < bs else None)
        ax.text(x + 0.5, y + 0.27, sub, ha="center", va="center", fontsize=7, zorder=4, bbox=box if tokens < bs else None)

    # Logical view: one row per running request, its blocks in order.
    x0 = 2.2
    top = height - 0.6
    centers = {}
    for k, r in enumerate(running):
        y = top - (k + 1) * row_h + 0.3
        p, g = state["lengths"][r]
        ax.text(0, y + 1.45, f"request {args.ids[r]}: {p} prompt + {cached[r] - p} generated = {cached[r]} tokens cached "
                f"(of {p + g - 1} at its end); block table row {state['table_rows'][r]}: {blocks[r]}",
                fontsize=8.5, color=color[r], weight="bold", va="center")
        ax.text(x0 - 0.2, y + 0.5, "logical\nblocks", ha="right", va="center", fontsize=8, color="dimgray")
        for j, b in enumerate(blocks[r]):
            x = x0 + j * 1.15
            tokens = min(bs, cached[r] - j * bs)
            block_box(x, y, tokens, color[r], f"{j}", f"{tokens}/{bs} -> #{b}")
            centers[(r, j)] = (x + 1, y + 0.5)

    # Physical view: the pool.
    px0 = x0 + left_w + gap
    ax.text(px0, top + 0.15, f"physical KV pool: {n_pool} blocks x {bs} tokens (K and V, every layer)", fontsize=9,
            weight="bold")
    cell = {}
    for b in range(n_pool):
        x, y = px0 + (b % cols) * 1.25, top - 1.25 * (b // cols + 1)
        cell[b] = (x, y + 0.5)
        if b in owner:
            r, j = owner[b]
            block_box(x, y, fill[b], color[r], f"#{b}", f"req {args.ids[r]}, block {j}")
        else:
            ax.add_patch(Rectangle((x, y), 1, 1, facecolor="#eeeeee", edgecolor="gray", lw=1, ls="--", zorder=2))
            ax.text(x + 0.5, y + 0.62, f"#{b}", ha="center", va="center", fontsize=9, color="gray")
            ax.text(x + 0.5, y + 0.28, "free", ha="center", va="center", fontsize=7, color="gray")
    for (r, j), (x, y) in centers.items():
        b = blocks[r][j]
        tx, ty = cell[b]
        ax.annotate("", xy=(tx, ty), xytext=(x - 0.5, y), zorder=1,  # from the block's centre, drawn under the boxes
                    arrowprops=dict(arrowstyle="->", color=color[r], lw=1.1, alpha=0.75,
                                    connectionstyle="arc3,rad=0.06", shrinkA=0, shrinkB=1))

    # What happened before this step.
    notes = [f"Replay of llama3-paged.py's loop with its real KVCacheManager, prompts {', '.join(map(str, args.ids))} of "
             f"the shipped set (real Llama 3 token counts, --ref-lengths), after decode step {args.step}."]
    for step, r, freed in state["finished"]:
        reused = [b for b in freed if b in owner]
        notes.append(f"Request {args.ids[r]} ({state['lengths'][r][0]} + {state['lengths'][r][1]} tokens) finished at step "
                     f"{step}: its blocks {freed} went back to the free list"
                     + (f"; {', '.join(f'#{b}' for b in reused)} now hold{'s' if len(reused) == 1 else ''} other requests' tokens."
                        if reused else "."))
    if state["preemptions"]:
        notes.append(f"{state['preemptions']} preemption(s) happened on the way.")
    notes.append(f"Colour fill = slots holding a token; hatched = reserved, still empty (only a last block is ever partly "
                 f"empty). Free list order now: {state['free']}.")
    fig.text(0.01, 0.01, "\n".join(notes), fontsize=8.5, va="bottom")
    ax.set_xlim(-0.2, px0 + cols * 1.25 + 0.2)
    ax.set_ylim(top - max(len(running) * row_h, pool_rows * 1.25) - 0.2, top + 0.6)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.suptitle("Paged KV cache: each request's logical blocks point, through its block-table row, to any physical "
                 "blocks of one shared pool", fontsize=11)
    fig.tight_layout(rect=(0, 0.03 + 0.022 * len(notes), 1, 0.97))
    common.save_figure(fig, args.out, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    state = run(args)
    draw(state, args)
    for r in state["running"]:
        print(f"request {args.ids[r]}: {state['cached'][r]} tokens cached, block table row "
              f"{state['table_rows'][r]}: {state['blocks'][r]}")
    for step, r, freed in state["finished"]:
        print(f"request {args.ids[r]}: finished at decode step {step}, gave back {freed}")
    print(f"free blocks: {state['free']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    common.run_main(main)
