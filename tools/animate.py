"""How does the paged KV pool hand out and take back its blocks, step by step, beside the naive cache's rows?

Replays llama3-paged.py's own generate() and KVCacheManager with a stand-in for the model (tools/replay.py) on
real shipped prompts with --ref-lengths, and draws a frame at every decode step where a block is handed out or
given back, and at least every --every steps between: the pool as a grid of blocks coloured by the request
holding them, dark where a slot holds a token and light where it is reserved and still empty (only a request's
last block is ever partly empty), the running and waiting requests, and the free blocks. Above it, the same budget
as the naive cache: budget // max_seq_len rows, each reserved whole for one request, replayed with
llama3-naive.py's own generate() in waves of that many requests (one run per wave, as bench.py's throughput runs
it), the other requests waiting for a row. Decode steps are counted across the waves.

The default scene: the 11 prompts 396 to 406 of the shipped set, blocks of 64 tokens and --max-seq-len 1024 (the
scripts' defaults are 16 and 8192; these are for legibility), in a budget of 2048 tokens: 32 blocks, or 2 naive
rows, drawn to the same scale. Two requests wait for blocks at step 1, one is preempted at step 288 and recomputed
at step 302, and after step 427 every block is back in the free list.

    python tools/animate.py                                       # about 20 s on 2 cores
    python tools/animate.py --first 0 --n 12 --out first12.gif   # the first 12 prompts: 4 preemptions

Writes docs/paged_pool.gif (needs matplotlib, and pillow, which matplotlib installs).
"""
from pathlib import Path

from cli import ArgumentParser, check_out, fail, run_main
from plotting import pyplot
from replay import replay, replay_naive
from scripts import DEFAULT_PROMPTS, ROOT, prompt_lengths

COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
          "tab:cyan", "navy", "goldenrod", "teal"]
MAX_COLUMNS, MAX_POOL_ROWS = 32, 6  # blocks across the drawing, and rows of them
WIDTH = 8.0                         # inches, at 100 dpi: 800 pixels, the README's width
FRAME_MS, EVENT_MS, PAUSE_MS, LAST_MS = 150, 700, 2000, 4000  # a frame's duration: nothing new, news, big news, the end


def parse_args(argv):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--first", type=int, default=396, help="the scene's first prompt, an index (default 396)")
    p.add_argument("--n", type=int, default=11, help=f"requests: prompts FIRST to FIRST + N - 1 (default 11, at "
                   f"most {len(COLORS)})")
    p.add_argument("--block-size", type=int, default=64, help="paged block size (default 64)")
    p.add_argument("--max-seq-len", type=int, default=1024, help="a naive row, in tokens (default 1024)")
    p.add_argument("--budget-tokens", type=int, default=2048, help="KV budget in tokens (default 2048)")
    p.add_argument("--every", type=int, default=8, help="at most this many decode steps between frames (default 8)")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    p.add_argument("--out", default=str(ROOT / "docs" / "paged_pool.gif"), help="animation to write (.gif)")
    args = p.parse_args(argv)
    if args.first < 0:
        fail(f"--first must be a prompt index >= 0, got {args.first}")
    for name in ("n", "block_size", "max_seq_len", "budget_tokens", "every"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.n > len(COLORS):
        fail(f"--n: at most {len(COLORS)} requests have a colour of their own, got {args.n}")
    if args.max_seq_len % args.block_size:
        fail(f"--max-seq-len must be a multiple of --block-size, so that a row of the pool is a naive row, got "
             f"{args.max_seq_len} and {args.block_size}")
    if args.max_seq_len // args.block_size > MAX_COLUMNS:
        fail(f"a naive row of {args.max_seq_len} tokens is {args.max_seq_len // args.block_size} blocks of "
             f"{args.block_size}: at most {MAX_COLUMNS} fit across the drawing, use a larger --block-size")
    if args.budget_tokens < args.max_seq_len:
        fail(f"--budget-tokens must hold at least one naive row of {args.max_seq_len} tokens, got {args.budget_tokens}")
    if -(-(args.budget_tokens // args.block_size) // (args.max_seq_len // args.block_size)) > MAX_POOL_ROWS:
        fail(f"--budget-tokens: at most {MAX_POOL_ROWS} rows of {args.max_seq_len} tokens fit the drawing, got "
             f"{args.budget_tokens}")
    if not Path(args.prompts).is_file():
        fail(f"prompts file {args.prompts} not found")
    if Path(args.out).suffix.lower() != ".gif":
        fail(f"--out must name a .gif file, got {args.out}")
    check_out(args.out)
    return args


def scene_lengths(args):
    """[(p, g)] for the scene's prompts, as the scripts count them with --ref-lengths and --max-seq-len."""
    lengths = prompt_lengths(args.prompts, args.first + args.n, max_seq_len=131_072)[args.first:]
    for i, (p, _) in enumerate(lengths):
        if p >= args.max_seq_len:
            fail(f"prompt {args.first + i} has {p} tokens: no room to generate within --max-seq-len {args.max_seq_len}")
    return [(p, min(g, args.max_seq_len - p)) for p, g in lengths]  # capped as prompt_lengths caps them


def replay_paged(lengths, args):
    """llama3-paged.py's generate() on the scene. Returns held, {decode step: {request: (its blocks, tokens
    cached with the step's own)}}, and calls, [(decode steps done, 'allocate' or 'free', request, tokens
    prefilled or blocks given back)] in the order the loop made them, and the replay."""
    held, calls = {}, []

    def record(manager):  # the script's manager, telling us when it admits a request and when it frees one
        allocate, free = manager.allocate, manager.free

        def recording_allocate(req_id, num_tokens):  # room for the tokens prefilled and the next one
            calls.append((len(held), "allocate", req_id, num_tokens - 1))
            return allocate(req_id, num_tokens)

        def recording_free(req_id):
            calls.append((len(held), "free", req_id, len(manager.blocks[req_id])))
            free(req_id)
        manager.allocate, manager.free = recording_allocate, recording_free
        return manager

    def snapshot(step, manager, block_table, cache_seqlens):
        # Row r of the kernel's table is a running request's: the one holding the block in its first column.
        owner = {blocks[0]: req_id for req_id, blocks in manager.blocks.items()}
        cached = {owner[b]: n + 1 for b, n in zip(block_table[:, 0].tolist(), cache_seqlens.tolist())}
        prefilled = {req_id: n for _, kind, req_id, n in calls if kind == "allocate"}  # the latest admission's
        held[step] = {req_id: (list(blocks), cached.get(req_id, prefilled[req_id]))  # not decoding: done in prefill
                      for req_id, blocks in manager.blocks.items()}

    run = replay(lengths, args.budget_tokens, args.block_size, args.max_seq_len, on_decode=snapshot,
                 replace_manager=record)
    if run["failed"]:  # cannot happen while the budget holds a naive row: a request fits one; but say so if it does
        fail(run["failed"])
    return held, calls, run


def replay_naive_waves(lengths, args):
    """llama3-naive.py's generate() on the scene, in waves of the rows the budget holds, one run per wave.
    Returns, for each decode step counted across the waves, [(request, tokens cached, still decoding)] per row."""
    rows = args.budget_tokens // args.max_seq_len
    steps = []
    for start in range(0, len(lengths), rows):
        wave = list(range(start, min(start + rows, len(lengths))))
        cached = [lengths[req][0] for req in wave]  # after its prefill

        def snapshot(step, batch_rows, cache_seqlens):
            for row, n in zip(batch_rows.tolist(), cache_seqlens.tolist()):
                cached[row] = n + 1
            decoding = set(batch_rows.tolist())
            steps.append([(req, cached[row], row in decoding) for row, req in enumerate(wave)])
        replay_naive([lengths[req] for req in wave], args.max_seq_len, on_decode=snapshot)
    return steps


def build_scene(args):
    """Everything the frames show, from the two replays: no drawing."""
    lengths = scene_lengths(args)
    held, calls, run = replay_paged(lengths, args)
    if not held:
        fail("these requests end in their prefills, with no decode step to show: choose other prompts")
    last = len(held)
    held[last + 1] = {}  # after the last step's free: the script checked that every block came back
    # A free followed by another admission of the same request is a preemption; the admission, its recompute.
    final_free = {req_id: i for i, (_, kind, req_id, _) in enumerate(calls) if kind == "free"}
    events = []  # (decode steps done, what, request, tokens or blocks)
    for i, (step, kind, req_id, n) in enumerate(calls):
        if kind == "allocate":
            back = any(k == "free" and r == req_id for _, k, r, _ in calls[:i])
            events.append((step, "recomputed" if back else "admitted", req_id, n))
        else:
            events.append((step, "finished" if final_free[req_id] == i else "preempted", req_id, n))
    return {"lengths": lengths, "held": held, "events": events, "last_step": last, "preemptions": run["preemptions"],
            "num_blocks": run["manager"].num_blocks, "free_at_end": len(run["manager"].free_blocks),
            "naive": replay_naive_waves(lengths, args)}


def paged_status(scene, step):
    """{request: 'running', 'waiting' or 'done'} at a decode step (last_step + 1: after the last)."""
    status = {}
    for req_id in range(len(scene["lengths"])):
        before = [kind for s, kind, r, _ in scene["events"] if r == req_id and s < step]
        status[req_id] = ("running" if req_id in scene["held"][step] else
                          "done" if before and before[-1] == "finished" else "waiting")
    return status


def naive_state(scene, step):
    """(rows [(request, tokens cached, still decoding)], {request: status}) at a decode step."""
    naive, n = scene["naive"], len(scene["lengths"])
    rows = naive[step - 1] if step <= len(naive) else []
    status = {req_id: "done" for req_id in range(n)}
    if rows:
        for req_id in range(rows[-1][0] + 1, n):
            status[req_id] = "waiting"
        for req_id, _, decoding in rows:
            status[req_id] = "running" if decoding else "done"
    return rows, status


def frame_steps(scene, every):
    """The decode steps to draw: the first; every one where a block is handed out or given back, or a naive wave
    starts; at least one every `every` steps; and the state after the last step."""
    held, naive, last = scene["held"], scene["naive"], scene["last_step"]
    owners = lambda step: {req_id: blocks for req_id, (blocks, _) in held[step].items()}
    wave = lambda step: [row[0] for row in naive[step - 1]] if step <= len(naive) else []
    chosen = [1]
    for step in range(2, last + 1):
        if owners(step) != owners(step - 1) or wave(step) != wave(step - 1) or step - chosen[-1] >= every:
            chosen.append(step)
    return chosen + [last + 1]


def caption(scene, prev, step, args):
    """What happened since the previous frame's decode step, in a line, and how long to show it: 'pause' for a
    wait, a preemption, a recompute or an admission, 'event' for a request finishing. (A block handed out to a
    growing request has no caption: its black edge shows it.)"""
    name = lambda req_id: str(args.first + req_id)
    names = lambda req_ids: ", ".join(name(r) for r in req_ids)
    held, last = scene["held"], scene["last_step"]
    if step == 1:
        waiting = [r for r, s in paged_status(scene, 1).items() if s == "waiting"]
        text = f"step 1: {len(held[1])} requests admitted, their prompts prefilled"
        return text + (f"; {names(waiting)} wait: no room in the pool" if waiting else ""), "pause"
    if step > last:
        done = sum(s == "done" for s in naive_state(scene, step)[1].values())
        return (f"all {len(scene['lengths'])} done, every block back in the free list; naive, in the same budget, "
                f"has done {done} and needs {len(scene['naive']):,} steps"), "pause"
    events = [e for e in scene["events"] if prev <= e[0] < step]
    of = lambda what: [(req_id, n) for _, kind, req_id, n in events if kind == what]
    finished, preempted, back, admitted = of("finished"), of("preempted"), of("recomputed"), of("admitted")
    ids = lambda pairs: names(req_id for req_id, _ in pairs)
    blocks = lambda pairs: f"{sum(n for _, n in pairs)} block{'s' * (sum(n for _, n in pairs) != 1)}"
    parts = []
    if finished:
        parts.append(f"{ids(finished)} finished: {blocks(finished)} back to the free list")
    if preempted:  # the newest requests, for the blocks that growing ones need
        grew = [r for r, (blocks, _) in held[step].items() if r in held[prev] and len(blocks) > len(held[prev][r][0])]
        parts.append(f"too few free blocks{' for ' + names(grew) if grew else ''}: {ids(preempted)}, the newest, "
                     f"preempted, {blocks(preempted)} back, waiting")
    if back:
        parts.append(f"{ids(back)} back: {', '.join(str(n) for _, n in back)} tokens recomputed in one prefill"
                     + (" each" if len(back) > 1 else ""))
    if admitted:
        parts.append(f"{ids(admitted)} admitted")
    kind = "pause" if preempted or back or admitted else "event" if finished else None
    return (f"step {step}: " + "; ".join(parts) if parts else ""), kind


def draw_frame(ax, scene, prev, step, text, fresh, args):
    """One frame, in inches from the top left: the pool at a decode step, with the blocks handed out since the
    previous frame's step edged in black, and a caption (grey unless fresh)."""
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Rectangle
    ax.clear()
    ax.axis("off")
    height = ax.figure.get_figheight()
    ax.set_xlim(0, WIDTH)
    ax.set_ylim(height, 0)
    bs, msl, n = args.block_size, args.max_seq_len, len(scene["lengths"])
    columns, left, span = msl // bs, 0.2, WIDTH - 0.4
    light = lambda c: tuple(0.25 * x + 0.75 for x in to_rgb(c))
    name = lambda req_id: str(args.first + req_id)
    last = scene["last_step"]

    title = f"decode step {step}" if step <= last else f"after decode step {last}: done"
    ax.text(left, 0.22, title, fontsize=13, weight="bold", va="center")
    ax.text(WIDTH - left, 0.22, f"prompts {args.first} to {args.first + n - 1}, their real token counts, "
            f"budget {args.budget_tokens:,} tokens", fontsize=8, color="dimgray", ha="right", va="center")
    ax.text(left, 0.52, text, fontsize=9, va="center", color="darkred" if fresh else "gray")

    def chips(y, status):
        for req_id in range(n):
            x, c, s = left + req_id * 0.42, COLORS[req_id], status[req_id]
            face, edge, ink = {"running": (c, c, "white"), "waiting": ("white", c, c),
                               "done": ("#e6e6e6", "#e6e6e6", "#999999")}[s]
            ax.add_patch(Rectangle((x, y), 0.38, 0.22, facecolor=face, edgecolor=edge, lw=1.2))
            ax.text(x + 0.19, y + 0.115, name(req_id), fontsize=7, color=ink, ha="center", va="center",
                    weight="bold")
        counts = {s: sum(v == s for v in status.values()) for s in ("running", "waiting", "done")}
        ax.text(left + n * 0.42 + 0.05, y + 0.11, f"running {counts['running']}, waiting {counts['waiting']}, "
                f"done {counts['done']}", fontsize=8, va="center")

    # The naive cache: budget // max_seq_len rows, a request's whole row reserved from its start to its wave's end.
    rows, status = naive_state(scene, step)
    n_rows = args.budget_tokens // msl
    y = 0.78
    ax.text(left, y, f"naive: {n_rows} row{'s' * (n_rows > 1)} of {msl:,} tokens, each reserved whole for one "
            f"request until its run of {n_rows} ends", fontsize=9, weight="bold", va="center")
    y += 0.16
    for k in range(n_rows):
        if k < len(rows):
            req_id, cached, decoding = rows[k]
            c = COLORS[req_id]
            ax.add_patch(Rectangle((left, y), span, 0.28, facecolor=light(c), edgecolor=c, lw=1))
            ax.add_patch(Rectangle((left, y), span * cached / msl, 0.28, facecolor=c, edgecolor="none"))
            label = f"{name(req_id)}: {cached:,} of {msl:,} tokens" + ("" if decoding else ", done: row still reserved")
            ax.text(left + span - 0.06, y + 0.14, label, fontsize=8, ha="right", va="center")
        else:
            ax.add_patch(Rectangle((left, y), span, 0.28, facecolor="#f2f2f2", edgecolor="#cccccc", lw=1))
        y += 0.34
    chips(y + 0.02, status)

    # The paged pool: the same tokens as blocks, a row of the grid as long as a naive row.
    held = scene["held"][step]
    owner = {b: (req_id, j) for req_id, (blocks, _) in held.items() for j, b in enumerate(blocks)}
    had = {req_id: len(blocks) for req_id, (blocks, _) in scene["held"].get(prev, {}).items()}
    new = {b for b, (req_id, j) in owner.items() if prev and j >= had.get(req_id, 0)}  # handed out since then
    y += 0.5
    preempted = sum(kind == "preempted" for s, kind, _, _ in scene["events"] if s < step)
    ax.text(left, y, f"paged: the same {args.budget_tokens:,} tokens as {scene['num_blocks']} blocks of {bs}",
            fontsize=9, weight="bold", va="center")
    ax.text(WIDTH - left, y, f"free blocks {scene['num_blocks'] - len(owner)} of {scene['num_blocks']}, preemptions "
            f"{preempted}", fontsize=9, ha="right", va="center")
    y += 0.16
    cell = span / columns
    for b in range(scene["num_blocks"]):
        x, by = left + (b % columns) * cell, y + (b // columns) * 0.46
        if b not in owner:
            ax.add_patch(Rectangle((x + 0.02, by), cell - 0.04, 0.4, facecolor="#f2f2f2", edgecolor="#cccccc", lw=1))
            continue
        req_id, j = owner[b]
        c, tokens = COLORS[req_id], min(bs, held[req_id][1] - j * bs)
        ax.add_patch(Rectangle((x + 0.02, by), cell - 0.04, 0.4, facecolor=light(c), edgecolor="none"))
        ax.add_patch(Rectangle((x + 0.02, by), (cell - 0.04) * tokens / bs, 0.4, facecolor=c, edgecolor="none"))
        ax.add_patch(Rectangle((x + 0.02, by), cell - 0.04, 0.4, facecolor="none",
                               edgecolor="black" if b in new else c, lw=2 if b in new else 1))
        ax.text(x + cell / 2, by + 0.2, name(req_id), fontsize=7, ha="center", va="center",
                bbox=dict(facecolor="white", edgecolor="none", alpha=0.75, pad=0.8))
    y += -(-scene["num_blocks"] // columns) * 0.46 + 0.06
    chips(y, paged_status(scene, step))

    y += 0.42
    ax.text(left, y, f"dark: slots holding a token; light: reserved, still empty; grey: free; black edge: a block "
            f"just handed out. Requests: filled running, outlined waiting, grey done.", fontsize=7, color="dimgray",
            va="center")


def figure_height(args):
    n_rows = args.budget_tokens // args.max_seq_len
    pool_rows = -(-(args.budget_tokens // args.block_size) // (args.max_seq_len // args.block_size))
    return 0.94 + 0.34 * n_rows + 0.02 + 0.5 + 0.16 + 0.46 * pool_rows + 0.06 + 0.42 + 0.2


def write_gif(scene, steps, args, out):
    """Draw the frames at these decode steps and write them as one looping GIF; returns the frame count."""
    plt = pyplot()
    from PIL import Image
    fig = plt.figure(figsize=(WIDTH, figure_height(args)), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    frames, durations, shown = [], [], ""
    for k, step in enumerate(steps):
        prev = steps[k - 1] if k else 0
        text, kind = caption(scene, prev, step, args)
        shown = text or shown  # a frame with nothing new keeps the last caption, in grey
        draw_frame(ax, scene, prev, step, shown, bool(text), args)
        fig.canvas.draw()
        frames.append(Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()).convert("RGB"))
        durations.append(LAST_MS if k == len(steps) - 1 else {"pause": PAUSE_MS, "event": EVENT_MS}.get(kind, FRAME_MS))
    plt.close(fig)
    # One palette for all frames, from all of them: every request keeps its colour, and a frame stores only the
    # rectangle where it differs from the one before.
    width, height = frames[0].size
    everything = Image.new("RGB", (width, height * len(frames)))
    for k, frame in enumerate(frames):
        everything.paste(frame, (0, k * height))
    palette = everything.quantize(colors=255)
    # Quantizing averages the background's white with the near-whites at text edges: make that entry white again.
    rgb = palette.getpalette()
    entries = [rgb[i:i + 3] for i in range(0, len(rgb), 3)]
    palette.putpalette([v for entry in entries for v in ([255] * 3 if min(entry) >= 245 else entry)])
    frames = [frame.quantize(palette=palette, dither=Image.Dither.NONE) for frame in frames]
    try:
        frames[0].save(out, save_all=True, append_images=frames[1:], duration=durations, loop=0, optimize=True)
    except OSError as e:
        fail(f"cannot write {out}: {e.strerror or e}")
    return len(frames)


def main(argv=None):
    args = parse_args(argv)
    scene = build_scene(args)
    steps = frame_steps(scene, args.every)
    count = write_gif(scene, steps, args, args.out)
    name = lambda req_id: args.first + req_id
    for step, kind, req_id, n in scene["events"]:
        if kind in ("preempted", "recomputed") or (kind == "admitted" and step > 0):
            print(f"decode step {step + 1}: prompt {name(req_id)} {kind}")  # as the frame of that step says
    print(f"paged: {len(scene['lengths'])} requests in {scene['last_step']} decode steps, {scene['preemptions']} "
          f"preemption(s), {scene['free_at_end']} of {scene['num_blocks']} blocks free at the end; naive, in "
          f"runs of {args.budget_tokens // args.max_seq_len}: {len(scene['naive'])} decode steps")
    print(f"wrote {args.out}: {count} frames, {Path(args.out).stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    run_main(main)
