"""What do blocks and block tables look like in a real run of the paged KV cache?

Runs llama3-paged.py's own generate() loop and KVCacheManager with a stand-in for the model (tools/replay.py)
on a few real requests' Llama 3 lengths (--ref-lengths), a small pool and block size 16, and stops at a given
decode step: the stand-in takes the block_table and cache_seqlens that step hands the attention kernel, and
the manager holds the pool as it is then. Draws each running request's logical blocks with an arrow to the
physical block its block-table entry names, how full each block is, the table itself as numbers, and which
blocks of the pool are free, including those given back by a request that already finished.

    python tools/plot_blocks.py                                   # prompts 1, 6, 12, 32; 12 blocks; step 30
    python tools/plot_blocks.py --requests 0,1,2,3 --pool-blocks 48 --step 60

Writes docs/block_table.png (needs matplotlib: pip install -r tools/requirements.txt).
"""
from pathlib import Path

from cli import ArgumentParser, check_out, fail, run_main
from plotting import pyplot, save_figure
from replay import StopReplay, replay
from scripts import DEFAULT_PROMPTS, ROOT, prompt_lengths

COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
POOL_COLUMNS = 16  # physical blocks per row of the drawing


def parse_args(argv):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", default="1,6,12,32", help="prompt indices, comma-separated (default 1,6,12,32)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--pool-blocks", type=int, default=12, help="blocks in the pool (default 12)")
    p.add_argument("--step", type=int, default=30, help="the decode step to show (default 30)")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    p.add_argument("--out", default=str(ROOT / "docs" / "block_table.png"), help="figure to write")
    args = p.parse_args(argv)
    try:
        args.ids = [int(x) for x in args.requests.split(",")]
    except ValueError:
        fail(f"--requests must be comma-separated prompt indices, got {args.requests!r}")
    if not args.ids or min(args.ids) < 0 or len(set(args.ids)) != len(args.ids) or len(args.ids) > len(COLORS):
        fail(f"--requests must name 1 to {len(COLORS)} distinct prompt indices >= 0, got {args.requests!r}")
    for name in ("block_size", "pool_blocks", "step"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.pool_blocks > 4 * POOL_COLUMNS:
        fail(f"--pool-blocks: at most {4 * POOL_COLUMNS} fit the drawing, got {args.pool_blocks}")
    if not Path(args.prompts).is_file():
        fail(f"prompts file {args.prompts} not found")
    check_out(args.out)
    return args


def run(args):
    """Replay up to the chosen decode step; returns the state to draw."""
    all_lengths = prompt_lengths(args.prompts)
    if max(args.ids) >= len(all_lengths):
        fail(f"--requests: prompt {max(args.ids)} asked for, but {args.prompts} has {len(all_lengths)} prompts "
             f"(0 to {len(all_lengths) - 1})")
    lengths = [all_lengths[i] for i in args.ids]
    state = {"last_seen": {}}  # request -> (decode step, its blocks), the last step it held blocks at

    def capture(step, manager, block_table, cache_seqlens):
        for req_id, blocks in manager.blocks.items():
            state["last_seen"][req_id] = (step, list(blocks))
        if step == args.step:
            state.update(table=block_table.tolist(), cache_seqlens=cache_seqlens.tolist(),
                         blocks={req_id: list(blocks) for req_id, blocks in manager.blocks.items()},
                         free=list(manager.free_blocks))
            raise StopReplay

    replayed = replay(lengths, args.pool_blocks * args.block_size, args.block_size, on_decode=capture)
    if replayed["failed"]:
        stuck = min(r.id for r in replayed["requests"] if not r.done)  # the head of the queue: waiting keeps id order
        fail(f"a pool of {args.pool_blocks} blocks of {args.block_size} tokens cannot hold prompt {args.ids[stuck]} "
             f"({lengths[stuck][0]} prompt tokens): use more --pool-blocks")
    if not replayed["stopped"]:
        fail(f"every request finished within {replayed['decode_steps']} decode steps: choose --step below that")
    # Row r of the kernel's table is a running request's: the one holding the block in its first column.
    owner = {blocks[0]: req_id for req_id, blocks in state["blocks"].items()}
    state["rows"] = [owner[row[0]] for row in state["table"]]
    for req_id, row in zip(state["rows"], state["table"]):
        if row[:len(state["blocks"][req_id])] != state["blocks"][req_id]:
            fail(f"the block table disagrees with the manager's list for prompt {args.ids[req_id]}")
    requests = replayed["requests"]
    state["finished"] = [(step, req_id, blocks) for req_id, (step, blocks) in state["last_seen"].items()
                         if req_id not in state["blocks"] and requests[req_id].done]
    state["waiting"] = [r.id for r in requests if not r.done and r.id not in state["blocks"]]
    state["lengths"] = lengths
    return state


def draw(state, args):
    plt = pyplot()
    from matplotlib.colors import to_rgba
    from matplotlib.patches import Rectangle
    bs, n_pool = args.block_size, args.pool_blocks
    rows, blocks = state["rows"], state["blocks"]
    cached = {req_id: seqlen + 1 for req_id, seqlen in zip(rows, state["cache_seqlens"])}  # with this step's token
    color = {req_id: COLORS[req_id % len(COLORS)] for req_id in range(len(args.ids))}
    owner = {b: (req_id, j) for req_id in rows for j, b in enumerate(blocks[req_id])}
    fill = {b: min(bs, cached[req_id] - j * bs) for b, (req_id, j) in owner.items()}

    def light(c):
        r, g, b, _ = to_rgba(c)
        return (0.45 * r + 0.55, 0.45 * g + 0.55, 0.45 * b + 0.55)

    def block_box(ax, x, y, tokens, c, label, sub, label_color="black"):
        """A block: light colour where slots hold a token, hatched where reserved but still empty."""
        if tokens:
            ax.add_patch(Rectangle((x, y), tokens / bs, 1, facecolor=light(c), edgecolor="none", zorder=2))
        if tokens < bs:
            ax.add_patch(Rectangle((x + tokens / bs, y), 1 - tokens / bs, 1, facecolor="white", edgecolor="gray",
                                   hatch="///", lw=0, zorder=2))
        ax.add_patch(Rectangle((x, y), 1, 1, facecolor="none", edgecolor=c, lw=2, zorder=3))
        box = dict(facecolor="white", edgecolor="none", alpha=0.85, pad=0.6)
        ax.text(x + 0.5, y + 0.62, label, ha="center", va="center", fontsize=12, weight="bold", color=label_color,
                zorder=4, bbox=box)
        ax.text(x + 0.5, y + 0.22, sub, ha="center", va="center", fontsize=7.5, zorder=4, bbox=box)

    # Geometry, in block widths: logical blocks on top, grouped by request; the pool below, POOL_COLUMNS a row.
    step_l, group_gap, step_p = 1.2, 1.0, 1.3
    cols = min(n_pool, POOL_COLUMNS)
    pool_rows = -(-n_pool // cols)
    logical_w = sum(len(blocks[r]) for r in rows) * step_l + (len(rows) - 1) * group_gap
    width = max(logical_w, cols * step_p)
    y_logical, y_pool = 3.1 + 1.3 * (pool_rows - 1), 1.3 * (pool_rows - 1)
    x_lim, y_lim = (-1.6, width + 0.2), (-0.5, y_logical + 2.3)
    # Inches: a block is `scale` wide; the notes and the table below take a line each.
    scale, line, title = 0.8, 0.17, 0.55
    n_lines = len(rows) + len(state["finished"]) + bool(state["waiting"]) + 5
    fig_w, ax_h = max(12, (x_lim[1] - x_lim[0]) * scale + 0.3), (y_lim[1] - y_lim[0]) * scale
    fig_h = title + ax_h + n_lines * line + 0.45
    fig = plt.figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes([0.15 / fig_w, 1 - (title + ax_h) / fig_h, 1 - 0.3 / fig_w, ax_h / fig_h])

    # The pool: physical block b, labelled by its number, coloured by the request that holds it.
    pool_x0 = (width - cols * step_p + (step_p - 1)) / 2
    top_of = {}
    for b in range(n_pool):
        x, y = pool_x0 + (b % cols) * step_p, y_pool - 1.3 * (b // cols)
        top_of[b] = (x + 0.5, y + 1)
        if b in owner:
            req_id, j = owner[b]
            block_box(ax, x, y, fill[b], color[req_id], f"#{b}", f"{fill[b]}/{bs} tokens")
        else:
            ax.add_patch(Rectangle((x, y), 1, 1, facecolor="#f2f2f2", edgecolor="gray", lw=1, ls="--", zorder=2))
            ax.text(x + 0.5, y + 0.62, f"#{b}", ha="center", va="center", fontsize=12, color="gray", zorder=4)
            ax.text(x + 0.5, y + 0.22, "free", ha="center", va="center", fontsize=7.5, color="gray", zorder=4)
    ax.text(pool_x0 - 0.25, y_pool + 0.5, "physical\nblocks", ha="right", va="center", fontsize=9, color="dimgray")
    ax.text(pool_x0, -0.3, f"the pool: {n_pool} blocks x {bs} tokens, K and V of every layer", ha="left", va="center",
            fontsize=9, color="dimgray")

    # Each running request's logical blocks, its block-table row above them, and an arrow from each logical
    # block's bottom edge to the top edge of the physical block it maps to, drawn over everything else.
    x = (width - logical_w) / 2
    ax.text(x - 0.25, y_logical + 0.5, "logical\nblocks", ha="right", va="center", fontsize=9, color="dimgray")
    for k, req_id in enumerate(rows):
        p, g = state["lengths"][req_id]
        group_w = len(blocks[req_id]) * step_l - (step_l - 1)
        ax.text(x + group_w / 2, y_logical + 1.75,
                f"request {args.ids[req_id]}: {p} prompt + {cached[req_id] - p} generated = {cached[req_id]} tokens\n"
                f"block_table row {k}: {state['table'][k][:len(blocks[req_id])]}",
                ha="center", va="center", fontsize=9, color=color[req_id], weight="bold")
        for j, b in enumerate(blocks[req_id]):
            tokens = min(bs, cached[req_id] - j * bs)
            block_box(ax, x, y_logical, tokens, color[req_id], f"{j}", f"{tokens}/{bs} -> #{b}", color[req_id])
            ax.annotate("", xy=top_of[b], xytext=(x + 0.5, y_logical), zorder=6,
                        arrowprops=dict(arrowstyle="-|>,head_length=0.5,head_width=0.25", color=color[req_id],
                                        lw=1.8, shrinkA=0, shrinkB=0))
            x += step_l
        x += group_gap - step_l + 1

    # The kernel's inputs at this step, as numbers, and what happened before it.
    table_lines = [f"block_table ({len(rows)} x {len(state['table'][0])}, int32) and cache_seqlens, as the kernel "
                   f"gets them at decode step {args.step}:"]
    for k, (req_id, row) in enumerate(zip(rows, state["table"])):
        unread = f" (entries past its {len(blocks[req_id])} blocks are never read)" * (len(blocks[req_id]) < len(row))
        table_lines.append(f"  row {k}: [{' '.join(f'{b:2d}' for b in row)}]   cache_seqlens "
                           f"{state['cache_seqlens'][k]:4d}   request {args.ids[req_id]}{unread}")
    notes = [f"llama3-paged.py's own generate() and KVCacheManager with a stand-in model, prompts "
             f"{', '.join(map(str, args.ids))} of the shipped set (real Llama 3 token counts, --ref-lengths), at "
             f"decode step {args.step}; tokens counted with the one this step writes."]
    for step, req_id, freed in state["finished"]:
        reused = [b for b in freed if b in owner]
        p, g = state["lengths"][req_id]
        notes.append(f"Request {args.ids[req_id]} ({p} + {g} tokens) finished at step {step}: its blocks {freed} went "
                     f"back to the free list"
                     + (f"; {', '.join(f'#{b}' for b in reused)} now hold{'s' if len(reused) == 1 else ''} other "
                        f"requests' tokens." if reused else "."))
    if state["waiting"]:
        notes.append(f"Waiting for blocks: {', '.join(f'request {args.ids[r]}' for r in state['waiting'])}.")
    notes.append(f"Light colour = slots holding a token; hatched = reserved, still empty (only a last block is ever "
                 f"partly empty). Free list order now: {state['free']}.")
    fig.text(0.15 / fig_w, 0.2 / fig_h, "\n".join(table_lines), fontsize=8.5, family="monospace", va="bottom",
             linespacing=1.35)
    fig.text(0.15 / fig_w, (0.35 + len(table_lines) * line) / fig_h, "\n".join(notes), fontsize=8.5, va="bottom",
             linespacing=1.35)
    ax.set_xlim(*x_lim)
    ax.set_ylim(*y_lim)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.suptitle(f"Paged KV cache: each request's logical blocks map, through its block-table row, to physical "
                 f"blocks anywhere in one pool", fontsize=12,
                 y=1 - 0.2 / fig_h, va="top")
    save_figure(fig, args.out, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    state = run(args)
    draw(state, args)
    for k, (req_id, row) in enumerate(zip(state["rows"], state["table"])):
        print(f"request {args.ids[req_id]}: {state['cache_seqlens'][k]} tokens cached before decode step {args.step}, "
              f"block_table row {k}: {row}, its blocks {state['blocks'][req_id]}")
    for step, req_id, freed in state["finished"]:
        print(f"request {args.ids[req_id]}: finished at decode step {step}, gave back {freed}")
    print(f"free blocks: {state['free']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
