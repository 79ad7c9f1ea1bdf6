"""The scripts' own generate() loops over random workloads, with the toy model of tests/toy_model.py in place of
the network: every token each request generates must follow from its own history, which it can only if every
cache read went to the right slots. Tight budgets force preemption; the paged scripts must give every block back.

Also here: the preemption policy (the newest request goes first), and the manager's bookkeeping checked at every
model call against the requests' blocks: no block held twice (paged, swap) or ref_count = number of holders
(prefix, samples, beams), no block both free and held (or, with prefix sharing, indexed and held by nobody), none
lost, and with beams no block-table row held twice or both free and held. Every write into the block table is watched as the kernel's table gets it:
no write may name a (row, column) twice, and the tokens must not change when such a write keeps its first value.
"""
import random
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import pin_cpu_path
from load_scripts import load_script
from toy_model import VOCAB, check_tokens, toy_forward, toy_model

naive, paged = load_script("naive"), load_script("paged")
swap, prefix, samples, beams = (load_script(name) for name in ("swap", "prefix", "samples", "beams"))
RUNGS = {"paged": paged, "swap": swap, "prefix": prefix, "samples": samples, "beams": beams}


def random_workload(rng, max_seq_len, templates=None):
    """Requests [(prompt, ref_length)]: random tokens, or with templates, prompts that start alike."""
    spec = []
    for _ in range(rng.randint(2, 10)):
        length = rng.randint(1, max_seq_len - 1)
        if templates:
            prompt = rng.choice(templates)[:length] + [rng.randrange(VOCAB)] * rng.randint(0, 1)
            prompt = prompt[:max_seq_len - 1]
        else:
            prompt = [rng.randrange(VOCAB) for _ in range(length)]
        spec.append((prompt, rng.randint(1, max_seq_len)))
    return spec


def make_requests(module, spec):
    return [module.Request(i, list(prompt), ref_length, list(prompt)) for i, (prompt, ref_length) in enumerate(spec)]


def check_manager(manager):
    """The pool is exactly the held blocks plus the free ones (and, with a prefix index, those indexed and held by
    nobody); where blocks are shared, ref_count counts each block's holders; where rows are handed out (beams), each
    is held once or free."""
    held = Counter(b for blocks in manager.blocks.values() for b in blocks)
    free, unheld = list(manager.free_blocks), list(getattr(manager, "unheld", ()))
    assert len(free) == len(set(free)), "a block is free twice"
    assert not set(free) & set(held), f"blocks both free and held: {sorted(set(free) & set(held))}"
    assert not set(unheld) & (set(free) | set(held)), "a block is unheld and also free or held"
    assert len(free) + len(unheld) + len(held) == manager.num_blocks, "a block was lost: neither free nor held"
    if hasattr(manager, "ref_count"):
        assert manager.ref_count == [held[b] for b in range(manager.num_blocks)], "ref_count is not the holders"
        assert manager.saved_blocks == sum(n - 1 for n in held.values())
        assert manager.shared_blocks == sum(n > 1 for n in held.values())
    else:
        assert max(held.values(), default=1) == 1, "a block is held by two requests"
    if hasattr(manager, "rows"):
        rows, free_rows = list(manager.rows.values()), list(manager.free_rows)
        assert manager.rows.keys() == manager.blocks.keys(), "a request holds blocks but no row, or a row but no blocks"
        assert len(set(rows + free_rows)) == len(rows) + len(free_rows) == len(manager.block_table), \
            "a row of the block table is held twice, both free and held, or lost"


class BlockTableWrites(TorchDispatchMode):
    """Sees every indexed write into one block table (aten.index_put_ on its storage) and records the (row, column)
    pairs that one write names more than once. PyTorch leaves the outcome of such a write undefined: the CPU keeps
    the last value, a GPU may keep any. With first_wins, such a write keeps the first value instead, as a GPU may."""

    def __init__(self, table, first_wins=False):
        super().__init__()
        self.table, self.first_wins, self.repeated = table.untyped_storage(), first_wins, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.index_put_.default and args[0].untyped_storage()._cdata == self.table._cdata:
            indices = torch.broadcast_tensors(*args[1])  # the scripts index every dimension: (row, column)
            pairs = list(zip(*(i.flatten().tolist() for i in indices)))
            first = {}
            for n, pair in enumerate(pairs):
                first.setdefault(pair, n)
            self.repeated += [pair for n, pair in enumerate(pairs) if first[pair] != n]
            if self.first_wins and len(first) < len(pairs):
                keep = torch.tensor(sorted(first.values()))
                values = args[2].expand(indices[0].shape).flatten()[keep]
                args = (args[0], [i.flatten()[keep] for i in indices], values, *args[3:])
        return func(*args, **kwargs)


def run_paged(module, spec, block_size, num_blocks, max_seq_len, monkeypatch, options=(), stop_ids=(),
              writes="no repeats"):
    """Run a paged script's generate() on the toy model; checks the manager at every model call. writes: "no
    repeats" checks that no write into the block table names a (row, column) twice; "last wins" (the CPU's way)
    and "first wins" (a GPU's, possibly) let such writes through, keeping that value."""
    args = module.parse_args(["1", "--max-seq-len", str(max_seq_len), "--block-size", str(block_size), *options])
    # As each script's make_kv_cache makes it: a row per request, per sample, or per beam a search can hold.
    rows = len(spec) * max(getattr(args, "samples", 1), getattr(args, "beams", None) or 1)
    manager = module.KVCacheManager(num_blocks, block_size, rows, -(-max_seq_len // block_size), "cpu",
                                    *([args.prefix_sharing] if module is prefix else []))

    def checked_forward(*call, **kwargs):
        check_manager(manager)
        return toy_forward(*call, **kwargs)

    pin_cpu_path(monkeypatch, module)
    monkeypatch.setattr(module, "forward", checked_forward)
    requests = make_requests(module, spec)
    if hasattr(module, "with_samples"):
        requests = module.with_samples(requests, args.samples)
    # The scripts write their block table in block_tables() only; the mode sees that write as the kernel gets it.
    watch, block_tables = BlockTableWrites(manager.block_table, writes == "first wins"), manager.block_tables

    def watched_block_tables(rows, width):
        with watch:
            return block_tables(rows, width)

    manager.block_tables = watched_block_tables
    stats = module.generate(None, requests, toy_model(num_blocks, block_size), manager, args, set(stop_ids))
    check_manager(manager)
    assert sorted([*manager.free_blocks, *getattr(manager, "unheld", ())]) == list(range(num_blocks))
    assert not manager.blocks
    assert writes != "no repeats" or not watch.repeated, \
        f"block-table writes named {len(watch.repeated)} (row, column) pairs twice, e.g. {watch.repeated[:3]}"
    return requests, stats


def random_case(seed):
    rng = random.Random(seed)
    block_size = [1, 2, 3, 4, 7, 16][seed % 6]
    max_seq_len = rng.randint(2, 8) * block_size + rng.randint(2, 9)
    need_most = -(-max_seq_len // block_size)
    return rng, block_size, max_seq_len, rng.randint(need_most, 3 * need_most)  # room for the longest, rarely all


PREEMPTED = {}  # seed -> preemptions, to check that the random runs do preempt
TOKENS = {}     # (script, seed) -> every request's tokens in a random run, with the CPU's last-wins table writes


@pytest.mark.parametrize("seed", range(30))
def test_paged_loop_on_random_workloads(seed, monkeypatch):
    rng, block_size, max_seq_len, num_blocks = random_case(seed)
    spec = random_workload(rng, max_seq_len)
    requests, stats = run_paged(paged, spec, block_size, num_blocks, max_seq_len, monkeypatch)
    TOKENS["paged", seed] = [r.tokens for r in requests]
    for req, (prompt, ref_length) in zip(requests, spec):
        assert req.done and len(req.tokens) == min(len(prompt) + ref_length, max_seq_len)
        assert check_tokens(prompt, req.tokens) is None, f"request {req.id}: {check_tokens(prompt, req.tokens)}"
    PREEMPTED[seed] = stats["preemptions"]


def test_random_workloads_do_preempt():
    if len(PREEMPTED) < 30:
        pytest.skip("needs every test_paged_loop_on_random_workloads case to run first")
    assert sum(n > 0 for n in PREEMPTED.values()) >= 10, PREEMPTED


SHARED = {}  # seed -> the stats of the run of a rung that shares blocks


def sharing_case(seed):
    """A random workload for a rung that shares blocks, by seed: samples (llama3-paged-samples.py), beams
    (llama3-paged-beams.py) or prefix sharing (llama3-paged-prefix.py), on prompts that start alike. Returns
    (kind, module, spec, block_size, num_blocks, max_seq_len, options)."""
    rng, block_size, max_seq_len, _ = random_case(seed)
    # Prompts that start alike; from two tokens only for half the seeds, so that equal blocks follow unequal ones.
    alphabet = VOCAB if seed % 4 < 2 else 2
    templates = [[rng.randrange(alphabet) for _ in range(max_seq_len)] for _ in range(3)]
    spec = random_workload(rng, max_seq_len, templates)
    kind, width = ["samples", "beams", "prefix"][seed % 3], rng.randint(1, 3)
    need_most = -(-max_seq_len // block_size)
    num_blocks = rng.randint(need_most, 2 * need_most) * width  # room for a prompt's samples or beams, rarely all
    module, options = {"samples": (samples, ["--samples", str(width), "--temperature", "1.0", "--seed", str(seed)]),
                       "beams": (beams, ["--beams", str(width)]), "prefix": (prefix, ["--prefix-sharing"])}[kind]
    return kind, module, spec, block_size, num_blocks, max_seq_len, options


@pytest.mark.parametrize("seed", range(60))
def test_sharing_rungs_on_random_workloads(seed, monkeypatch):
    """Samples, beams and prefix sharing, each in its rung, at random, under budgets that often preempt."""
    kind, module, spec, block_size, num_blocks, max_seq_len, options = sharing_case(seed)
    requests, SHARED[seed] = run_paged(module, spec, block_size, num_blocks, max_seq_len, monkeypatch, options)
    TOKENS[kind, seed] = [r.tokens for r in requests]
    for req in requests:
        assert req.done, f"request {req.id} never finished"
        problem = check_tokens(req.prompt_ids, req.tokens, greedy=kind != "samples")
        assert problem is None, f"request {req.id}: {problem}"
    if kind != "beams":  # a beam search's answer is its best beam, of whatever length it stopped at
        assert all(len(r.tokens) == min(len(r.prompt_ids) + r.ref_length, max_seq_len) for r in requests)


def test_random_sharing_workloads_share_copy_and_preempt():
    """The random runs of the sharing rungs are not vacuous: blocks were shared, copied on write, found in the prefix
    cache, and requests preempted, in many of them."""
    if len(SHARED) < 60:
        pytest.skip("needs every test_sharing_rungs_on_random_workloads case to run first")
    runs = Counter(k for stats in SHARED.values() for k in ("shared_blocks_peak", "cow_copies", "prefix_hit_tokens",
                                                            "preemptions") if stats.get(k))
    assert min(runs.values()) >= 5 and runs["preemptions"] >= 20 and len(runs) == 4, runs


@pytest.mark.parametrize("script, seed", [("paged", s) for s in range(30)] + [("sharing", s) for s in range(60)])
def test_tokens_do_not_depend_on_which_value_a_repeated_table_entry_keeps(script, seed, monkeypatch):
    """The random workloads above, run again with every block-table write that names a (row, column) twice keeping
    its first value, as a GPU may, instead of its last, as the CPU does: every request's tokens must be the same."""
    if script == "paged":
        rng, block_size, max_seq_len, num_blocks = random_case(seed)
        kind, module, spec, options = "paged", paged, random_workload(rng, max_seq_len), []
    else:
        kind, module, spec, block_size, num_blocks, max_seq_len, options = sharing_case(seed)
    case = (module, spec, block_size, num_blocks, max_seq_len, monkeypatch, options)
    if (kind, seed) not in TOKENS:  # run alone, or the run above failed
        TOKENS[kind, seed] = [r.tokens for r in run_paged(*case, writes="last wins")[0]]
    requests, _ = run_paged(*case, writes="first wins")
    for req, last_wins in zip(requests, TOKENS[kind, seed]):
        assert req.tokens == last_wins, f"request {req.id}'s tokens depend on which value a table write keeps"


@pytest.mark.parametrize("seed", range(6))
def test_the_three_loops_agree_on_greedy_tokens(seed, monkeypatch):
    """naive and every paged rung (with none of its options; swap and prefix also with theirs) generate the same
    tokens."""
    rng, block_size, max_seq_len, num_blocks = random_case(seed)
    spec = random_workload(rng, max_seq_len, [[rng.randrange(VOCAB) for _ in range(max_seq_len)]])
    pin_cpu_path(monkeypatch, naive)
    monkeypatch.setattr(naive, "forward", toy_forward)
    requests = make_requests(naive, spec)
    cache = (torch.full((1, len(spec), max_seq_len), -1), torch.full((1, len(spec), max_seq_len), -1))
    naive.generate(None, requests, cache, naive.parse_args(["1", "--max-seq-len", str(max_seq_len)]), set())
    want = [r.tokens for r in requests]
    assert all(check_tokens(p, t) is None for (p, _), t in zip(spec, want))
    for module, options in ((paged, []), (swap, []), (swap, ["--preempt", "swap"]), (prefix, []),
                            (prefix, ["--prefix-sharing"]), (samples, []), (beams, [])):
        got, _ = run_paged(module, spec, block_size, num_blocks, max_seq_len, monkeypatch, options)
        assert [r.tokens for r in got] == want, f"{module.__name__} {options}"


def test_stop_tokens_end_requests(monkeypatch):
    """Without --ref-lengths a request ends at a stop token (kept as its last token) or at max_seq_len."""
    spec = [([5, 6, 7], None), ([8, 9], None), ([1, 2, 3, 4], None)]
    stop = set(range(VOCAB // 2))  # about half the tokens stop
    requests, _ = run_paged(paged, spec, 4, 20, 30, monkeypatch, stop_ids=stop)
    for (prompt, _), req in zip(spec, requests):
        generated = req.tokens[len(prompt):]
        assert check_tokens(prompt, req.tokens) is None
        assert all(t not in stop for t in generated[:-1])
        assert generated[-1] in stop or len(req.tokens) == 30


# ---------------------------------------------------------------------------------------------
# Preemption: the newest request goes first, and one that cannot fit even alone gets one line.

def test_the_newest_request_is_preempted_first(monkeypatch):
    """Block size 4, 6 blocks. A (5 tokens), B (5) and C (5) are admitted in that order, 2 blocks each: the pool is
    full. At the 4th decode step all three need a third block: C, the newest, gives its 2 blocks back, and A and B
    grow. C waits, and comes back when A finishes; it was preempted once, and everyone's tokens are right."""
    spec = [([1, 2, 3, 4, 5], 6), ([6, 7, 8, 9, 10], 7), ([11, 12, 13, 14, 15], 9)]
    freed = []
    monkeypatch.setattr(paged.KVCacheManager, "free", lambda self, req_id, free=paged.KVCacheManager.free:
                        (freed.append((req_id, list(self.blocks))), free(self, req_id))[1])
    requests, stats = run_paged(paged, spec, 4, 6, 64, monkeypatch)
    assert stats["preemptions"] == 1
    assert freed[0] == (2, [0, 1, 2]), "the first request to let go must be C, the newest, while all three held blocks"
    assert all(check_tokens(p, r.tokens) is None for (p, _), r in zip(spec, requests))


@pytest.mark.parametrize("script, options", [("paged", []), ("swap", ["--preempt", "swap"]), ("prefix", []),
                                             ("samples", []), ("beams", [])])
def test_a_preempted_request_goes_back_to_the_head_of_the_queue(script, options, monkeypatch):
    """As in the test above, plus D, which waits from the start: C, preempted, waits before D, so C is admitted
    again first, when A finishes, and D after it."""
    module = RUNGS[script]
    spec = [([1, 2, 3, 4, 5], 6), ([6, 7, 8, 9, 10], 7), ([11, 12, 13, 14, 15], 9), ([16, 17, 18, 19, 20], 3)]
    admitted, allocate = [], module.KVCacheManager.allocate

    def admit(self, req_id, *rest):
        admitted.append(req_id)
        return allocate(self, req_id, *rest)

    monkeypatch.setattr(module.KVCacheManager, "allocate", admit)
    requests, stats = run_paged(module, spec, 4, 6, 64, monkeypatch, options)
    assert stats["preemptions"] == 1
    assert admitted == [0, 1, 2, 2, 3], "C, preempted, must be admitted again before D, which waited behind it"
    assert all(check_tokens(p, r.tokens) is None for (p, _), r in zip(spec, requests))


@pytest.mark.parametrize("seed", range(10))
def test_preemption_takes_the_newest_running_request(seed, monkeypatch):
    """Over random workloads: whenever a request still running gives its blocks back, it is the newest held."""
    rng, block_size, max_seq_len, num_blocks = random_case(seed + 100)
    spec = random_workload(rng, max_seq_len)
    requests = {}
    real_free = paged.KVCacheManager.free

    def free(self, req_id):
        if not requests[req_id].done:  # a preemption
            assert req_id == list(self.blocks)[-1], f"preempted {req_id}, but the newest held is {list(self.blocks)[-1]}"
        real_free(self, req_id)

    real_generate = paged.generate

    def generate(model, reqs, *rest):
        requests.update({r.id: r for r in reqs})
        return real_generate(model, reqs, *rest)

    monkeypatch.setattr(paged.KVCacheManager, "free", free)
    monkeypatch.setattr(paged, "generate", generate)
    run_paged(paged, spec, block_size, num_blocks, max_seq_len, monkeypatch)


@pytest.mark.parametrize("seed", range(20))
def test_a_step_that_preempts_admits_no_one(seed, monkeypatch):
    """With no rule for it in the loop: once a request is preempted, none is admitted before the next decode step,
    since the head of the queue is then the request just preempted, and fewer blocks are free than it held."""
    rng, block_size, max_seq_len, num_blocks = random_case(seed + 200)
    spec = random_workload(rng, max_seq_len)
    requests, preempted = {}, []  # preempted: the requests preempted since the last decode step
    real_free, real_allocate, real_batch_inputs, real_generate = (paged.KVCacheManager.free,
                                                                  paged.KVCacheManager.allocate, paged.batch_inputs,
                                                                  paged.generate)

    def free(self, req_id):
        if not requests[req_id].done:
            preempted.append(req_id)
        real_free(self, req_id)

    def allocate(self, req_id, num_tokens):
        assert not preempted, f"request {req_id} admitted in the step that preempted {preempted}"
        return real_allocate(self, req_id, num_tokens)

    def batch_inputs(batch):  # the decode step's inputs
        preempted.clear()
        return real_batch_inputs(batch)

    def generate(model, reqs, *rest):
        requests.update({r.id: r for r in reqs})
        return real_generate(model, reqs, *rest)

    for name, value in (("free", free), ("allocate", allocate)):
        monkeypatch.setattr(paged.KVCacheManager, name, value)
    monkeypatch.setattr(paged, "batch_inputs", batch_inputs)
    monkeypatch.setattr(paged, "generate", generate)
    _, stats = run_paged(paged, spec, block_size, num_blocks, max_seq_len, monkeypatch)
    PREEMPTED_HERE[seed] = stats["preemptions"]


PREEMPTED_HERE = {}  # seed -> preemptions in the test above


def test_the_admission_test_sees_preemptions():
    if len(PREEMPTED_HERE) < 20:
        pytest.skip("needs every test_a_step_that_preempts_admits_no_one case to run first")
    assert sum(n > 0 for n in PREEMPTED_HERE.values()) >= 8, PREEMPTED_HERE


def test_a_request_that_outgrows_the_pool_gets_one_line(monkeypatch):
    """A request that outgrows the whole pool preempts itself, and generate() stops with a one-line error."""
    with pytest.raises(SystemExit, match="cannot hold request 0, which needs 4"):
        run_paged(paged, [([0, 1], 20)], 4, 3, 64, monkeypatch)  # 12 tokens in all; the 13th finds no room
