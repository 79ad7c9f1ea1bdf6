"""The exercise: grades a paged KV cache built by hand, step by step, in the order of the lesson.

    python tools/exercise.py                                             # writes my-llama3-paged.py
    python -m pytest tests/test_exercise.py --script my-llama3-paged.py  # grades it

First KVCacheManager's verbs, each test needing only the holes before it: blocks_for, can_allocate, needs_block,
append_block, allocate (which takes its blocks with append_block), free, block_tables (its rows, then each block
written into the table once). Then the whole loop of generate(), with the grow and free steps: on the toy model of
tests/toy_model.py, which checks every cache read, and at every model call that each request holds the blocks its
tokens take, no fewer (a block taken late) and no more (taken early): with room for every request, with too little
room (the newest request must be preempted), on random workloads, every block back at the end. Last, on a tiny
random Llama 3: a request that fills the pool exactly finishes, and the same tokens as llama3-naive.py. The tests
read the manager's state through what __init__ sets up (free_blocks, blocks, block_table, new_entries) and expect
what the docstrings say; which free block goes to whom is the manager's choice.

Without --script the tests grade the shipped llama3-paged.py, which passes them all; the last test writes the
blank exercise and checks that it fails every one.
"""
import functools
import importlib.util
import json
import math
import random
import re
import subprocess
import sys
import traceback
import xml.etree.ElementTree as ElementTree
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import ROOT, pin_cpu_path
from load_scripts import load_script
from toy_model import VOCAB, check_tokens, toy_forward, toy_model

PROMPTS = ROOT / "sharegpt-filtered.json"


@pytest.fixture(scope="module")
def learner(request):
    """The script graded: --script PATH (relative to the current directory), else the shipped llama3-paged.py."""
    script = request.config.getoption("script")
    if script is None:
        yield load_script("paged")
        return
    path = Path(script).resolve()
    name = "exercise_" + re.sub(r"\W", "_", path.stem)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before exec: dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules[name]


def graded(test):
    """A hole not filled yet (raise NotImplementedError) fails the test with its hint, not a traceback."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        try:
            return test(*args, **kwargs)
        except NotImplementedError as e:
            where = traceback.extract_tb(e.__traceback__)[-1]
            hole = f"not written yet, in {where.name} ({Path(where.filename).name}, line {where.lineno}): {e}"
        pytest.fail(hole, pytrace=False)
    return run


def count(n, thing):
    """'1 block', '2 blocks': for the messages."""
    return f"{n} {thing}" if n == 1 else f"{n} {thing}s"


@contextmanager
def asked_about_a_request_gone():
    """A KeyError for a request id in the manager, explained: the loop asked about a request holding no blocks."""
    try:
        yield
    except KeyError as e:
        where = traceback.extract_tb(e.__traceback__)[-1]
        raise AssertionError(f"KeyError {e} in {where.name}: the manager was asked about request {e}, which holds no "
                             f"blocks. A request that has finished or been preempted has given its blocks back: it "
                             f"must leave running, and not grow") from e


def new_manager(learner, num_blocks, block_size, num_requests=3, max_blocks_per_request=8):
    return learner.KVCacheManager(num_blocks, block_size, num_requests, max_blocks_per_request, "cpu")


def hold(manager, req_id, n):
    """Set up, without the manager's verbs, a request holding n blocks taken from the free list."""
    manager.blocks[req_id] = [manager.free_blocks.popleft() for _ in range(n)]
    return list(manager.blocks[req_id])


# ---------------------------------------------------------------------------------------------
# The manager, verb by verb.

@graded
def test_blocks_for_rounds_up_to_whole_blocks(learner):
    for block_size in (1, 4, 16):
        manager = new_manager(learner, 8, block_size)
        for n in range(1, 3 * block_size + 2):
            want, got = math.ceil(n / block_size), manager.blocks_for(n)
            assert got == want, (f"with blocks of {count(block_size, 'token')}, blocks_for({n}) should be {want} "
                                 f"({n} / {block_size}, rounded up), got {got}")


@graded
def test_can_allocate_only_when_enough_blocks_are_free(learner):
    manager = new_manager(learner, 5, 4)
    for req_id, taken in ((0, 0), (1, 2), (2, 3)):  # 5, 3, then 0 blocks free
        hold(manager, req_id, taken)
        free = len(manager.free_blocks)
        for n in range(1, 4 * free + 6):
            want, got = math.ceil(n / 4) <= free, manager.can_allocate(n)
            assert got == want, (f"with {count(free, 'block')} of 4 tokens free, can_allocate({n}) should be {want}: "
                                 f"a request of {count(n, 'token')} needs {count(math.ceil(n / 4), 'block')}; "
                                 f"got {got}")
            assert len(manager.free_blocks) == free, f"can_allocate({n}) only asks; it must not take or give blocks"


@graded
def test_needs_block_when_the_tokens_outgrow_the_blocks(learner):
    manager = new_manager(learner, 6, 4)
    for req_id, n_blocks in ((0, 2), (1, 1), (2, 3)):
        hold(manager, req_id, n_blocks)
        room = 4 * n_blocks
        for n in range(1, room + 2):
            want, got = n > room, manager.needs_block(req_id, n)
            why = f"token {n} has no slot" if want else f"{n} tokens fit"
            assert got == want, (f"request {req_id} holds {n_blocks} blocks of 4 tokens, room for {room}: "
                                 f"needs_block({req_id}, {n}) should be {want} ({why}), got {got}")
    assert len(manager.free_blocks) == 0 and len(manager.blocks[0]) == 2, "needs_block only asks: it takes no block"


@graded
def test_append_block_adds_one_free_block_at_the_end(learner):
    manager = new_manager(learner, 7, 4)
    held = {0: hold(manager, 0, 2), 1: hold(manager, 1, 1)}
    for req_id in (0, 1, 1, 0):
        free_before = list(manager.free_blocks)
        manager.append_block(req_id)
        blocks = manager.blocks[req_id]
        assert len(blocks) == len(held[req_id]) + 1 and blocks[:-1] == held[req_id], \
            f"request {req_id} held {held[req_id]}: after append_block({req_id}) it should hold those and one more " \
            f"block at the end, but holds {blocks}"
        assert blocks[-1] in free_before and blocks[-1] not in manager.free_blocks, \
            f"append_block({req_id}) should take a free block ({free_before}); it gave {blocks[-1]}"
        assert len(manager.free_blocks) == len(free_before) - 1, f"append_block({req_id}) should take exactly one block"
        held[req_id] = list(blocks)
    assert sorted(held[0] + held[1]) == list(range(7)), f"all 7 blocks are handed out, each once: got {held}"


@graded
def test_allocate_gives_a_new_request_the_blocks_its_tokens_take(learner):
    manager = new_manager(learner, 10, 4)
    for req_id, n in ((0, 9), (2, 4), (1, 1)):
        free_before = set(manager.free_blocks)
        row = manager.allocate(req_id, n)
        assert row == req_id, f"allocate({req_id}, {n}) should return the request's row of the block table, its id " \
                              f"{req_id}; it returned {row}"
        blocks = manager.blocks.get(req_id)
        want = math.ceil(n / 4)
        assert blocks is not None and len(blocks) == want, (f"with blocks of 4 tokens, allocate({req_id}, {n}) should "
                                                            f"give request {req_id} {count(want, 'block')}; it holds "
                                                            f"{blocks}")
        assert set(blocks) <= free_before and len(set(blocks)) == want, \
            f"request {req_id} should get {count(want, 'block')} that were free, each once, got {blocks}"
        assert not set(blocks) & set(manager.free_blocks), f"blocks {blocks} were handed out but are still free"
    assert len(manager.free_blocks) == 10 - 3 - 1 - 1, "3 + 1 + 1 of the 10 blocks are handed out: 5 must be free"


@graded
def test_free_gives_all_of_a_requests_blocks_back(learner):
    manager = new_manager(learner, 8, 4)
    a, b = hold(manager, 0, 3), hold(manager, 1, 2)
    manager.free(0)
    free = list(manager.free_blocks)
    assert set(a) <= set(free), f"after free(0), request 0's blocks {a} should all be free; free are {free}"
    assert not set(b) & set(free), f"free(0) gave back request 1's blocks: {sorted(set(b) & set(free))}"
    assert len(free) == 8 - 2 and len(set(free)) == len(free), f"6 different blocks should be free, got {free}"
    assert not manager.blocks.get(0), f"after free(0), request 0 should hold no block; it holds {manager.blocks[0]}"
    manager.free(1)
    assert sorted(manager.free_blocks) == list(range(8)), f"after free(1) every block should be free, each once: " \
                                                          f"free are {list(manager.free_blocks)}"


@graded
def test_block_tables_list_each_requests_blocks_in_order(learner):
    manager = new_manager(learner, 12, 4, num_requests=3, max_blocks_per_request=5)

    def check(rows, width, when):
        for dtype in (torch.int32, torch.int64):  # the decode step passes int32 rows, the prefill int64
            table = manager.block_tables(torch.tensor(rows, dtype=dtype), width)
            assert table.dtype == torch.int32 and tuple(table.shape) == (len(rows), width), \
                f"{when}: block_tables({rows}, {width}) should be an int32 tensor of shape ({len(rows)}, {width}), " \
                f"one row per request asked for; got {table.dtype} {tuple(table.shape)}"
            for i, row in enumerate(rows):
                want = manager.blocks[row][:width]
                got = table[i, :len(want)].tolist()
                assert got == want, (f"{when}: row {i} of block_tables({rows}, {width}) should start with request "
                                     f"{row}'s blocks {want}, in order, got {table[i].tolist()} (append_block notes "
                                     f"each block handed out in new_entries, for block_tables to write)")

    for req_id, n in ((0, 9), (1, 2), (2, 5)):
        manager.allocate(req_id, n)
    check([2, 0], 3, "after allocate(0, 9), allocate(1, 2), allocate(2, 5)")
    check([0, 1, 2], 3, "asked again")
    for req_id in (1, 1, 2):
        manager.append_block(req_id)
    check([1, 2, 0], 4, "after append_block(1) twice and append_block(2)")
    manager.free(0)
    manager.allocate(0, 17)
    check([0], 5, "after free(0) and allocate(0, 17), request 0's row lists its new blocks")
    manager.free(2)
    manager.append_block(1)
    manager.free(1)
    manager.allocate(1, 5)
    check([0, 1], 5, "after request 1 got a 4th block, gave all back and was allocated 2 blocks again")


class TableWrites(TorchDispatchMode):
    """Counts the entries of one block table that tensor operations write, however they are written: an indexed
    write (table[rows, columns] = blocks) counts its indices, any other in-place operation on the table or a view
    of it (table[r, c] = b, a slice assigned, zero_()) counts the elements of what it writes into."""

    def __init__(self, table):
        super().__init__()
        self.storage, self.written = table.untyped_storage().data_ptr(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        target = args[0] if args and isinstance(args[0], torch.Tensor) else None
        first = func._schema.arguments[0] if func._schema.arguments else None
        writes = first is not None and first.alias_info is not None and first.alias_info.is_write
        if writes and target is not None and target.untyped_storage().data_ptr() == self.storage:
            if func is torch.ops.aten.index_put_.default:
                self.written += torch.broadcast_tensors(*[i for i in args[1] if i is not None])[0].numel()
            else:
                self.written += target.numel()
        return func(*args, **(kwargs or {}))


@graded
def test_block_tables_writes_each_block_handed_out_once(learner):
    manager = new_manager(learner, 12, 4, num_requests=3, max_blocks_per_request=5)
    # What is done between two calls of block_tables, and how many slots of the table it hands a block to: the
    # entries the second call (or the verbs before it) must write, and no more, from the verbs' token counts.
    steps = [
        ("allocate(0, 9) and allocate(1, 2)", lambda: (manager.allocate(0, 9), manager.allocate(1, 2)), 3 + 1),
        ("nothing", lambda: None, 0),
        ("append_block(1) and append_block(0)", lambda: (manager.append_block(1), manager.append_block(0)), 2),
        ("nothing", lambda: None, 0),
        ("free(0) and allocate(0, 5)", lambda: (manager.free(0), manager.allocate(0, 5)), 2),
        ("allocate(2, 4), free(2) and allocate(2, 8)",  # slot (2, 0) twice: only its latest block is written
         lambda: (manager.allocate(2, 4), manager.free(2), manager.allocate(2, 8)), 2),
        ("nothing", lambda: None, 0),
    ]
    for call, (done, verbs, want) in enumerate(steps, 1):
        with TableWrites(manager.block_table) as writes:
            verbs()
            manager.block_tables(torch.tensor([0, 1, 2]), 3)
        assert writes.written == want, (
            f"after {done}, block_tables (call {call}) wrote {count(writes.written, 'slot')} of block_table, but "
            f"{count(want, 'slot')} got a block since the call before: each block handed out is written into the "
            f"table once, when it is new. " + ("Did you clear new_entries after writing them? Entries left there are "
                                               "written again at every call" if writes.written > want else
                                               "append_block notes each new block in new_entries, for block_tables "
                                               "to write"))


# ---------------------------------------------------------------------------------------------
# The whole loop: generate() on the toy model, which checks every cache read.

def peak_blocks(prompt_len, generate_len, block_size):
    """The most blocks a request holds: room for its prompt and first token at admission, then for every token
    but the last, which is never cached."""
    return math.ceil(max(prompt_len + 1, prompt_len + generate_len - 1) / block_size)


def workload(lengths):
    """[(prompt, tokens to generate)]: request i's prompt starts with i, so a prefill tells which request it is."""
    rng = random.Random(len(lengths))
    return [([i] + [rng.randrange(VOCAB) for _ in range(p - 1)], g) for i, (p, g) in enumerate(lengths)]


def check_pool(manager):
    """The pool is exactly the held blocks and the free ones, each once."""
    holders = {}
    for req_id, blocks in manager.blocks.items():
        for block in blocks:
            assert holders.get(block) != req_id, f"request {req_id} holds block {block} twice"
            assert block not in holders, (f"block {block} is held by requests {holders[block]} and {req_id}: a "
                                          f"block belongs to one request at a time")
            holders[block] = req_id
    free = Counter(manager.free_blocks)
    twice = [b for b, n in free.items() if n > 1]
    assert not twice, f"blocks {twice} are in free_blocks twice: each block is given back once"
    both = {b: holders[b] for b in free if b in holders}
    assert not both, f"blocks free and held at once (block: holder): {both}"
    lost = manager.num_blocks - len(free) - len(holders)
    assert lost == 0, (f"{count(lost, 'block')} neither free nor held by any request: every block a request lets "
                       f"go of must go back to free_blocks")


def check_blocks_held(manager, rows, tokens, cache_seqlens):
    """At a model call, each request holds exactly the blocks of the tokens cached once this step's decode has
    run: for a prefill of n tokens, room for n + 1 (the token it makes is written by the decode that follows); for
    a decode with c tokens cached, room for c + 1 (it writes the newest, at position c). Fewer: a block taken
    late; more: a block taken early. rows: the requests of the batch, in its order."""
    size = manager.block_size
    for b, req_id in enumerate(rows):
        cached, new = int(cache_seqlens[b]), tokens.shape[1]
        held = len(manager.blocks.get(req_id) or [])
        if cached == 0:  # a prefill of the whole request
            want = math.ceil((new + 1) / size)
            assert held == want, (
                f"request {req_id} is prefilled with its {new} tokens, and this step's decode writes the token its "
                f"prefill makes: it needs room for {new} + 1 tokens, {count(want, 'block')} of {size} (the + 1 at "
                f"admission), but holds {held}. allocate(req_id, num_tokens) should give it blocks_for(num_tokens)")
            continue
        want = math.ceil((cached + 1) / size)
        situation = (f"request {req_id} has {count(cached, 'token')} cached, and this decode step writes the K and V "
                     f"of its newest, at position {cached}: {cached + 1} tokens, {count(want, 'block')} of {size}. ")
        assert held <= want, (
            situation + f"It holds {held}: a block was taken a step before it was needed. In step 1 (grow), ask "
            f"manager.needs_block(r.id, len(r.tokens)): the newest token is not cached yet, so a request needs room "
            f"for len(r.tokens) tokens, not len(r.tokens) + 1 (the + 1 is admission's, for the token a prefill adds)")
        assert held == want, (
            situation + f"It holds only {held}, room for {held * size}: its block comes too late, and the decode "
            f"writes into a slot it does not hold. In step 1 (grow), every running request r for which "
            f"manager.needs_block(r.id, len(r.tokens)) is true must get append_block before the decode")


def run_loop(learner, spec, block_size, num_blocks, max_seq_len, monkeypatch):
    """The learner's generate() on the toy model. Checks the pool at every model call. Returns the requests, the
    stats, the requests prefilled in order (twice: preempted, then recomputed), the manager and the model calls."""
    args = learner.parse_args(["1", "--max-seq-len", str(max_seq_len), "--block-size", str(block_size)])
    manager = learner.KVCacheManager(num_blocks, block_size, len(spec), math.ceil(max_seq_len / block_size), "cpu")
    prefilled, calls = [], []  # the request of each prefill, in order; "prefill" or "decode" for each model call
    rows, block_tables = [], manager.block_tables  # the rows of the batch, as the loop last asked for their tables

    def recording_block_tables(batch_rows, width):
        rows[:] = batch_rows.tolist()
        return block_tables(batch_rows, width)

    def watching_forward(model, tokens, cache_seqlens, kv_cache, block_table=None, cache_batch_idx=None):
        check_pool(manager)
        check_blocks_held(manager, rows, tokens, cache_seqlens)
        if int(cache_seqlens.max()) == 0:  # a prefill: nothing cached yet. A decode step has cached tokens
            prefilled.append(int(tokens[0, 0]))
        calls.append("prefill" if int(cache_seqlens.max()) == 0 else "decode")
        try:
            return toy_forward(model, tokens, cache_seqlens, kv_cache, block_table, cache_batch_idx)
        except AssertionError as e:
            if "never written" not in str(e):
                raise
            raise AssertionError(f"{e}: the table sends a token to a slot its K and V never went to. A block handed "
                                 f"out after the step that writes into it (step 1's needs_block count, or the + 1 at "
                                 f"admission), or a row of block_tables that does not list the request's blocks in "
                                 f"order") from e

    manager.block_tables = recording_block_tables
    pin_cpu_path(monkeypatch, learner)
    monkeypatch.setattr(learner, "forward", watching_forward)
    requests = [learner.Request(i, list(p), g, list(p)) for i, (p, g) in enumerate(spec)]
    with asked_about_a_request_gone():
        stats = learner.generate(None, requests, toy_model(num_blocks, block_size), manager, args, set())
    for req, (prompt, g) in zip(requests, spec):
        assert req.done, (f"request {req.id} never finished: it has {len(req.tokens)} of its {len(prompt)} + {g} "
                          f"tokens. Every request must end; one preempted waits at the head of waiting")
        assert len(req.tokens) == min(len(prompt) + g, max_seq_len), \
            f"request {req.id} should end with {len(prompt)} + {g} tokens, it has {len(req.tokens)}"
        problem = check_tokens(prompt, req.tokens)
        assert problem is None, (f"request {req.id}: {problem}. Its cache held something other than its own tokens: "
                                 f"a wrong block in its table, or a block another request wrote")
    return requests, stats, prefilled, manager, calls


# Six requests (prompt tokens, tokens to generate), with blocks of 4 tokens.
LENGTHS = [(5, 6), (3, 9), (9, 2), (1, 11), (7, 4), (12, 8)]


@graded
def test_loop_with_room_for_all_admits_everyone_and_preempts_no_one(learner, monkeypatch):
    room = sum(peak_blocks(p, g, 4) for p, g in LENGTHS)  # every request at its largest, all at once
    requests, stats, prefilled, _, calls = run_loop(learner, workload(LENGTHS), 4, room, 64, monkeypatch)
    assert calls[:len(LENGTHS)] == ["prefill"] * len(LENGTHS), \
        f"{room} blocks of 4 hold all {len(LENGTHS)} requests at their largest: all should be admitted (and " \
        f"prefilled) in the first step, before the first decode; the model was called for {calls[:len(LENGTHS)]}"
    assert stats["preemptions"] == 0 and sorted(prefilled) == list(range(len(LENGTHS))), \
        f"with room for all, no request should be preempted; stats['preemptions'] is {stats['preemptions']} and " \
        f"the requests prefilled were {prefilled} (twice: preempted, then recomputed)"


@graded
def test_loop_preempts_the_newest_request_when_blocks_run_out(learner, monkeypatch):
    # Blocks of 4, 6 blocks. A, B, C and D have 5 prompt tokens: A, B and C are admitted with 2 blocks each (room
    # for 6 tokens, the prompt and the first token), which fills the pool; D waits. At the 4th decode step A, B and
    # C have 9 tokens each and need a 3rd block, and none is free: C, the newest, must give its 2 blocks back and
    # wait at the head of the queue, so that A and B grow. When A finishes, C comes back before D.
    spec = workload([(5, 6), (5, 7), (5, 9), (5, 3)])
    _, stats, prefilled, _, calls = run_loop(learner, spec, 4, 6, 64, monkeypatch)
    assert calls[:4] == ["prefill"] * 3 + ["decode"], \
        f"A, B and C take 2 blocks each, all 6: all three should be admitted (and prefilled) in the first step, " \
        f"and D should wait; the model was called for {calls[:4]}"
    order = prefilled
    assert order == [0, 1, 2, 2, 3], \
        f"C (request 2), the newest, should be preempted once and come back, recomputed by a second prefill, as soon " \
        f"as A finishes and before D (request 3), which waits behind it: prefills should go A, B, C, C, D, but went " \
        f"{', '.join('ABCD'[i] for i in order)}"
    assert stats["preemptions"] == 1, f"one preemption, but stats['preemptions'] is {stats['preemptions']}"


@graded
def test_loop_on_random_workloads_in_tight_budgets(learner, monkeypatch):
    preempted = 0
    for seed in range(12):
        rng = random.Random(seed)
        block_size = [1, 2, 3, 4, 7, 16][seed % 6]
        max_seq_len = rng.randint(2, 8) * block_size + rng.randint(2, 9)
        lengths = [(rng.randint(1, max_seq_len - 1), rng.randint(1, max_seq_len)) for _ in range(rng.randint(2, 8))]
        lengths = [(p, min(g, max_seq_len - p)) for p, g in lengths]
        room = max(peak_blocks(p, g, block_size) for p, g in lengths)  # the largest request fits alone
        num_blocks = rng.randint(room, 2 * room)
        with monkeypatch.context() as patch:
            _, stats, prefilled, _, _ = run_loop(learner, workload(lengths), block_size, num_blocks, max_seq_len, patch)
        assert stats["preemptions"] == len(prefilled) - len(lengths), \
            f"random workload {seed}: requests were prefilled {len(prefilled) - len(lengths)} times more " \
            f"than once (preempted, then recomputed), but stats['preemptions'] is {stats['preemptions']}"
        preempted += stats["preemptions"] > 0
    assert preempted >= 4, f"only {preempted} of the 12 random workloads preempted a request"


@graded
def test_loop_gives_every_block_back_at_the_end(learner, monkeypatch):
    lengths = LENGTHS
    room = max(peak_blocks(p, g, 4) for p, g in lengths)
    _, _, _, manager, _ = run_loop(learner, workload(lengths), 4, room + 2, 64, monkeypatch)  # preempts
    held = {req_id: blocks for req_id, blocks in manager.blocks.items() if blocks}
    assert not held, f"every request has finished, yet some still hold blocks: {held}"
    assert sorted(manager.free_blocks) == list(range(room + 2)), \
        f"at the end all {room + 2} blocks should be free, each once; free are {sorted(manager.free_blocks)}"


# ---------------------------------------------------------------------------------------------
# The whole script, on a tiny random Llama 3: the same tokens as llama3-naive.py.

N, MAX_SEQ_LEN = 4, 128  # the first 4 shipped prompts: 44, 27, 72 and 101 tokens, then 84, 71, 56 and 27 generated
TIGHT_BUDGET = 192  # tokens: 12 blocks of 16, where the 4 requests hold 8 + 7 + 8 + 8 at their largest
NAIVE_TOKENS = {}


def run_main(module, ckpt, tmp_path, *options, n=N, max_seq_len=MAX_SEQ_LEN):
    out = tmp_path / f"{module.__name__}.json"
    with asked_about_a_request_gone():
        module.main([str(n), "--ckpt-dir", str(ckpt), "--prompts", str(PROMPTS), "--ref-lengths", "--max-seq-len",
                     str(max_seq_len), "--quiet", "--json", str(out), *options])
    data = json.loads(out.read_text())
    return [r["generated_ids"] for r in data["requests"]], data["stats"]


def naive_tokens(ckpt, tmp_path, monkeypatch):
    if "tokens" not in NAIVE_TOKENS:
        naive = load_script("naive")
        pin_cpu_path(monkeypatch, naive)
        NAIVE_TOKENS["tokens"], _ = run_main(naive, ckpt, tmp_path)
    return NAIVE_TOKENS["tokens"]


def check_same_tokens(got, want, when):
    for i, (g, w) in enumerate(zip(got, want)):
        first = next((k for k, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
        assert g == w, (f"{when}, request {i} should generate llama3-naive.py's {len(w)} tokens; it generated "
                        f"{len(g)}, the first {first} of them the same")


@graded
def test_same_tokens_as_llama3_naive(learner, tiny_ckpt, tmp_path, monkeypatch):
    pin_cpu_path(monkeypatch, learner)
    got, stats = run_main(learner, tiny_ckpt, tmp_path, "--block-size", "16")
    check_same_tokens(got, naive_tokens(tiny_ckpt, tmp_path, monkeypatch), "with room for all in the default budget")
    assert stats["preemptions"] == 0, f"the default budget has room for all: no preemption, got {stats['preemptions']}"


@graded
def test_same_tokens_as_llama3_naive_when_preempted(learner, tiny_ckpt, tmp_path, monkeypatch):
    pin_cpu_path(monkeypatch, learner)
    got, stats = run_main(learner, tiny_ckpt, tmp_path, "--block-size", "16", "--kv-budget-tokens", str(TIGHT_BUDGET))
    check_same_tokens(got, naive_tokens(tiny_ckpt, tmp_path, monkeypatch),
                      f"in {TIGHT_BUDGET // 16} blocks of 16 tokens, where requests are preempted and recomputed")
    assert stats["preemptions"] > 0, (f"{TIGHT_BUDGET // 16} blocks of 16 tokens cannot hold the 4 requests at "
                                      f"once: some must be preempted, but stats['preemptions'] is 0")


@graded
def test_a_request_that_fills_the_pool_exactly_finishes(learner, tiny_ckpt, tmp_path, monkeypatch):
    pin_cpu_path(monkeypatch, learner)
    tokenizer = learner.load_tokenizer(Path(tiny_ckpt) / "tokenizer.model")
    (text, ref_length), = learner.load_prompts(PROMPTS, 1, tokenizer)
    prompt = len(learner.encode_chat(tokenizer, text))
    # Blocks of 16. The first prompt is admitted with room for its tokens + 1, grows by one block, and ends at
    # --max-seq-len with all but its last token cached (the last is never written): a whole number of blocks.
    size = 16
    blocks = math.ceil((prompt + 1) / size) + 1
    max_seq_len = blocks * size + 1
    assert prompt + ref_length >= max_seq_len, "the test expects the request to end at --max-seq-len"
    cached = f"request 0 ({prompt} prompt tokens) ends at --max-seq-len {max_seq_len}, with {max_seq_len - 1} tokens " \
             f"cached (its last is never written): {blocks} blocks of {size}"
    stopped = None
    try:
        got, stats = run_main(learner, tiny_ckpt, tmp_path, "--block-size", str(size), "--kv-budget-tokens",
                              str(blocks * size), n=1, max_seq_len=max_seq_len)
    except SystemExit as e:
        stopped = e.code
    if stopped is not None:
        pytest.fail(f"{cached}, exactly the pool, yet the run stopped: {stopped}. A block was taken before it "
                    f"was needed: in step 1 (grow), ask manager.needs_block(r.id, len(r.tokens)); the newest token is "
                    f"not cached yet, and this step's decode writes it at position len(r.tokens) - 1, so a request "
                    f"needs room for len(r.tokens) tokens, not len(r.tokens) + 1", pytrace=False)
    assert len(got[0]) == max_seq_len - prompt and stats["peak_reserved_tokens"] == blocks * size, \
        f"{cached}; it generated {len(got[0])} tokens and held at most {stats['peak_reserved_tokens']} tokens' blocks"
    with pytest.raises(SystemExit) as stopped:  # one block fewer cannot hold it: one line, and the run stops
        run_main(learner, tiny_ckpt, tmp_path, "--block-size", str(size), "--kv-budget-tokens",
                 str((blocks - 1) * size), n=1, max_seq_len=max_seq_len)
        pytest.fail(f"{cached}: in {blocks - 1} the run must stop with one line, but it finished. Its blocks came too "
                    f"late, and it wrote into slots it does not hold: in step 1 (grow), every running request r for "
                    f"which manager.needs_block(r.id, len(r.tokens)) is true gets append_block, or preempts",
                    pytrace=False)
    assert "cannot hold request 0" in str(stopped.value.code), \
        f"{cached}: in {blocks - 1} the run should stop with 'cannot hold request 0', got {stopped.value.code!r}"


# ---------------------------------------------------------------------------------------------
# The exercise itself: the blank copy fails every test above.

def test_the_blank_exercise_fails_every_test(request, tmp_path):
    if request.config.getoption("script") is not None:
        pytest.skip("checks the blank exercise against the tests; runs without --script")
    blank = tmp_path / "blank-llama3-paged.py"
    made = subprocess.run([sys.executable, str(ROOT / "tools" / "exercise.py"), str(blank)], capture_output=True,
                          text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    report = tmp_path / "report.xml"
    graded_run = subprocess.run([sys.executable, "-m", "pytest", __file__, "--script", str(blank), "-q",
                                 "-p", "no:cacheprovider", f"--junitxml={report}"], capture_output=True, text=True,
                                cwd=ROOT, timeout=100)
    assert report.is_file(), graded_run.stdout[-3000:] + graded_run.stderr[-3000:]
    outcomes = {}
    for case in ElementTree.parse(report).iter("testcase"):
        kind = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        message = next((child.get("message", "") for child in case if child.tag == "failure"), "")
        if kind == "failure" and "not written yet" not in message:
            kind = f"failure: {message}"
        outcomes[case.get("name")] = kind
    tests = {name for name in globals() if name.startswith("test_")} - {"test_the_blank_exercise_fails_every_test"}
    assert outcomes == {**{name: "failure" for name in tests}, "test_the_blank_exercise_fails_every_test": "skipped"}, \
        graded_run.stdout[-3000:]
