"""Model-free replays of the scripts' own generate() loops, and what the tools compute from them.

A replay calls a script's generate() as it is, with the script's forward() replaced for the while by a stand-in
that returns logits of zeros, (batch, 1), and touches no cache. Under --ref-lengths every request stops at its
reference length whatever token it gets, so only token counts matter: the requests get dummy prompt ids of the
right lengths, there is no model and no KV cache (kv_cache=None), and the script's own KVCacheManager runs on
the CPU. The order of a step (grow, admit, prefill, decode, free) is the script's, so a replay's stats are the
ones the script's --json writes for the same requests (bench.py checks this against real runs).
"""
from contextlib import contextmanager

import torch

from scripts import DEFAULT_MAX_SEQ_LEN, call_script, load_script


class StopReplay(Exception):
    """Raised by an on_decode callback to end a replay at that decode step."""


@contextmanager
def stand_in_forward(module, forward):
    """Inside the with block, the script's generate() calls `forward` instead of its own, with its tensors
    on the CPU (module.DEVICE) and one torch thread; all three are put back afterwards."""
    saved = module.forward, module.DEVICE, torch.get_num_threads()
    # A replay's tensors are small: on a busy machine more threads only wait for each other (the block-size
    # study ran 2 to 7 times slower with torch's default two threads on 2 shared cores).
    module.forward, module.DEVICE = forward, torch.device("cpu")
    torch.set_num_threads(1)
    try:
        yield
    finally:
        module.forward, module.DEVICE = saved[:2]
        torch.set_num_threads(saved[2])


def replay(lengths, budget_tokens, block_size, max_seq_len=DEFAULT_MAX_SEQ_LEN, script="paged", on_decode=None,
           replace_manager=None, stop_at_preemption=False):
    """Run a paged script's generate() ('paged' or a rung above it, no options) on requests of lengths [(p, g)]: p
    prompt tokens, g tokens to generate, as with --ref-lengths.

    on_decode(step, manager, block_table, cache_seqlens), if given, is called at every decode step (1, 2, ...)
    with the kernel's inputs before the step's tokens are written; raising StopReplay ends the replay there.
    replace_manager(manager), if given, returns the manager generate() drives instead of the script's own.
    stop_at_preemption: end the replay when a request first gives its blocks back before it is done.
    Returns a dict: generate()'s stats (timeline [(reserved, used)], decode_steps, peaks, preemptions,
    manager_seconds, block_size, num_blocks), unless stopped or failed; batch_sizes, the requests in each decode
    step; failed, the script's error if a request can never fit, else None; stopped; manager; requests."""
    module = load_script(script)
    args = call_script(module.parse_args, ["1", "--block-size", str(block_size), "--max-seq-len", str(max_seq_len)])
    requests = [module.Request(i, [0] * p, g, [0] * p) for i, (p, g) in enumerate(lengths)]
    out = {"batch_sizes": [], "failed": None, "stopped": False, "requests": requests}

    def forward(model, tokens, cache_seqlens, kv_cache, block_table=None, cache_batch_idx=None):
        if tokens.shape[1] == 1 and bool((cache_seqlens > 0).all()):  # a decode step, not a prefill
            out["batch_sizes"].append(tokens.shape[0])
            if on_decode:
                on_decode(len(out["batch_sizes"]), out["manager"], block_table, cache_seqlens)
        return torch.zeros(tokens.shape[0], 1)

    with stand_in_forward(module, forward):
        # The script's make_kv_cache sizes the manager (its parse_args, above, checked the block size); for a model
        # of no layers the K and V it allocates are empty, and generate() gets kv_cache=None: only forward() reads it.
        no_layers = {"layers": [], "n_kv_heads": 0, "head_dim": 0}
        _, manager = call_script(module.make_kv_cache, no_layers, budget_tokens, len(requests), args)
        out["manager"] = replace_manager(manager) if replace_manager else manager
        if stop_at_preemption:  # a request that gives its blocks back before it is done is being preempted
            free = out["manager"].free

            def free_or_stop(req_id):
                if not requests[req_id].done:
                    raise StopReplay
                free(req_id)
            out["manager"].free = free_or_stop
        try:
            out |= module.generate(None, requests, None, out["manager"], args, set())
        except StopReplay:
            out["stopped"] = True
        except SystemExit as e:  # the script's fail(): the pool can never hold a waiting request
            if not isinstance(e.code, str):
                raise
            out["failed"] = e.code.split(": error: ", 1)[-1]
    return out


def replay_naive(lengths, max_seq_len=DEFAULT_MAX_SEQ_LEN, on_decode=None):
    """Run llama3-naive.py's generate() on requests of lengths [(p, g)], with a stand-in forward as replay()
    does. on_decode(step, rows, cache_seqlens), if given, is called at every decode step (1, 2, ...) with the
    batch's cache rows (request i owns row i) and their cached tokens, before the step's tokens are written.
    Returns its stats: timeline [(reserved, used)] per decode step, decode_steps and peaks."""
    module = load_script("naive")
    args = call_script(module.parse_args, ["1", "--max-seq-len", str(max_seq_len)])
    requests = [module.Request(i, [0] * p, g, [0] * p) for i, (p, g) in enumerate(lengths)]
    steps = [0]

    def forward(model, tokens, cache_seqlens, kv_cache, block_table=None, cache_batch_idx=None):
        if on_decode and tokens.shape[1] == 1 and bool((cache_seqlens > 0).all()):  # a decode step, not a prefill
            steps[0] += 1
            on_decode(steps[0], cache_batch_idx, cache_seqlens)
        return torch.zeros(tokens.shape[0], 1)

    with stand_in_forward(module, forward):
        return module.generate(None, requests, None, args, set())


def fits_without_preemption(lengths, budget_tokens, block_size, max_seq_len=DEFAULT_MAX_SEQ_LEN):
    """Does llama3-paged.py run these requests to their end with no preemption? (Replayed up to the first.)"""
    run = replay(lengths, budget_tokens, block_size, max_seq_len, stop_at_preemption=True)
    return not run["stopped"] and run["failed"] is None


def paged_max_n(lengths, budget_tokens, block_size, max_seq_len=DEFAULT_MAX_SEQ_LEN):
    """Largest N such that llama3-paged.py never preempts running the first N requests (replayed).

    Monotone in N, so a search is exact: admission is first come first served, so request N+1 starts only
    after requests 1..N have all started; until then the two runs are identical, and after it it only holds
    blocks, so whenever run N finds no free block for a request that is due, run N+1 finds none either. The
    search starts from the perfect manager's bound, which N max is usually at or near."""
    return largest_true(lambda n: fits_without_preemption(lengths[:n], budget_tokens, block_size, max_seq_len),
                        len(lengths), guess=bound_max_n(lengths, budget_tokens, block_size))


def largest_true(predicate, hi, guess=1):
    """Largest n in 1..hi with predicate(n) true, for a predicate true up to some n and false after; 0 when
    predicate(1) is false. Exact whatever the guess, and quick when it is close: it probes guess, then steps
    away from it, doubling the step, until the answer is bracketed, then halves the bracket."""
    lo, n, step = 0, min(max(guess, 1), hi), 1
    seen_true = seen_false = False
    while lo < hi:
        if predicate(n):
            lo, seen_true = n, True
        else:
            hi, seen_false = n - 1, True
        if seen_true and seen_false:
            n = (lo + hi + 1) // 2
        elif seen_true:
            n = min(lo + step, hi)
        else:
            n = max(hi + 1 - step, lo + 1)
        step *= 2
    return lo


def waste(timeline):
    """(% of reserved KV not holding a token at the first step of peak use, mean of that % over steps)."""
    if not timeline:
        return 0.0, 0.0
    reserved, used = max(timeline, key=lambda t: t[1])  # max() keeps the first, as record_memory does
    at_peak = 100 * (reserved - used) / max(1, reserved)
    mean = sum(100 * (r - u) / max(1, r) for r, u in timeline) / len(timeline)
    return at_peak, mean


def bound_peaks(lengths, block_size):
    """Blocks a perfect on-demand manager holds at its peak, for the first N requests, for every N.

    All N start together; a request (p, g) holds ceil((p + t) / block_size) blocks at decode step t for
    t = 1 .. max(1, g - 1) (its admission room, ceil((p + 1) / block_size), covers step 1) and none after.
    Returns a list: element N-1 is the peak over steps of the blocks held by the first N requests."""
    import numpy as np
    p = np.array([x for x, _ in lengths], dtype=np.int64)[:, None]
    last = np.array([max(1, g - 1) for _, g in lengths], dtype=np.int64)[:, None]
    t = np.arange(1, int(last.max()) + 1, dtype=np.int64)[None, :]
    held = np.where(t <= last, -(-(p + t) // block_size), 0)  # (requests, steps)
    return np.cumsum(held, axis=0).max(axis=1).tolist()


def bound_max_n(lengths, budget_tokens, block_size):
    """Largest N whose perfect-manager peak fits the pool of budget_tokens // block_size blocks."""
    num_blocks = budget_tokens // block_size
    return sum(1 for peak in bound_peaks(lengths, block_size) if peak <= num_blocks)  # peaks grow with N
