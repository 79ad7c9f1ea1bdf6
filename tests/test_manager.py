"""KVCacheManager (llama3-paged.py) under random sequences of operations, driven the way generate() drives it.

One decode step, as generate() runs it:
  1. blocks_due(): the running requests whose token in this step starts a new block; each gets
     append_block(id), or, when no block is free, requests are preempted (free(id)) until one is;
  2. allocate(id, num_tokens) admits a request: room for num_tokens tokens, all written by the end of
     this step (generate passes len(tokens) + 1: the prefill writes len(tokens), the decode one more);
  3. batch_block_table(rows, width) flushes the pending table writes and gathers the batch's rows;
  4. every running request admitted before this step writes exactly one token;
  5. finished requests are freed, and end_step() closes the step.

The driver below keeps its own count of each running request's tokens and checks the manager against it
after every step. A request's blocks are read from the device block table (what the kernel sees) as well
as from manager.blocks, the attribute generate() itself consults.

SharingDriver, further down, adds what --samples, --beams and prefix sharing do: fork(parent, child) at the
end of a step, copy-on-write copies (take_copies) before the writes, and allocate(..., token_ids) finding
blocks already in the cache; it checks ref counts and the tokens each request reads back through its blocks.
"""
import math
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

if str(Path(__file__).resolve().parent) not in sys.path:  # pytest puts it there, unless in importlib mode
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_scripts import load_script  # noqa: E402

paged = load_script("paged")
KVCacheManager = paged.KVCacheManager


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The block tables are tiny: intra-op threads only add overhead (a lot of it when the cores are busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Driver:
    """A model-free stand-in for generate(): admits, grows, preempts and finishes requests at random."""

    def __init__(self, rng, num_blocks, block_size, max_seq_len):
        self.rng, self.block_size, self.max_seq_len = rng, block_size, max_seq_len
        self.m = KVCacheManager(num_blocks, block_size, math.ceil(max_seq_len / block_size), "cpu")
        self.tokens = {}     # running id -> tokens written by the end of the current (or last) step
        self.rows = {}       # running id -> the row allocate() returned
        self.blocks = {}     # running id -> its blocks as the device table showed them last time
        self.order = []      # running ids, oldest admission first
        self.waiting = {}    # preempted id -> tokens it held
        self.next_id = 0
        self.events = {"preempted": 0, "readmitted": 0, "freed_while_due": 0, "freed_after_due_popped": 0,
                       "appended": 0, "id_reused": 0}

    # -- the manager calls, with the driver's own bookkeeping ---------------------------------------

    def need(self, req_id):
        return math.ceil(self.tokens[req_id] / self.block_size)

    def admit(self, req_id, num_tokens):
        row = self.m.allocate(req_id, num_tokens)
        assert row not in self.rows.values(), f"row {row} handed to request {req_id} is still in use"
        self.tokens[req_id], self.rows[req_id] = num_tokens, row
        self.blocks[req_id] = []
        self.order.append(req_id)

    def release(self, req_id, preempt=False):
        self.m.free(req_id)
        held = self.tokens.pop(req_id)
        del self.rows[req_id], self.blocks[req_id]
        self.order.remove(req_id)
        if preempt:
            self.waiting[req_id] = held
            self.events["preempted"] += 1

    # -- one decode step --------------------------------------------------------------------------

    def step(self):
        rng, m = self.rng, self.m
        # Requests may also finish before the step's blocks_due (= at the end of the previous step),
        # including those due in this very step.
        for req_id in list(self.order):
            if rng.random() < 0.05:
                if self.tokens[req_id] % self.block_size == 0:
                    self.events["freed_while_due"] += 1
                self.release(req_id)

        # 1. Exactly the requests whose next token (at position tokens[r]) starts a new block are due.
        due = m.blocks_due()
        assert len(due) == len(set(due)), f"step {m.step}: a request is due twice: {due}"
        expected = {r for r in self.order if self.tokens[r] % self.block_size == 0}
        assert set(due) == expected, (f"step {m.step}: blocks_due() returned {sorted(due)}, expected {sorted(expected)} "
                                      f"(tokens {self.tokens})")
        preempted = False
        for req_id in due:
            if req_id not in self.tokens:  # preempted earlier in this loop, before its block came
                continue
            if rng.random() < 0.1:  # preempted (or finished) though it is due, before it got its block
                self.events["freed_after_due_popped"] += 1
                self.release(req_id, preempt=rng.random() < 0.5)
                continue
            while not m.free_blocks and req_id in self.tokens:
                # The newest request goes first, as in generate(); sometimes another one, to vary things.
                victim = self.order[-1] if rng.random() < 0.7 else rng.choice(self.order)
                self.release(victim, preempt=True)
                preempted = True
            if req_id in self.tokens:
                m.append_block(req_id)
                self.events["appended"] += 1

        # 2. Admissions: preempted requests come back with more tokens than they held; new ones arrive.
        #    (generate() admits nothing in a step that preempted; the manager must cope either way.)
        admitted = set()
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
            if self.waiting and rng.random() < 0.6:
                req_id = rng.choice(sorted(self.waiting))
                num_tokens = min(self.max_seq_len, self.waiting[req_id] + rng.randint(1, 2 * self.block_size))
            else:
                if self.next_id and rng.random() < 0.2:
                    # The id of a request that finished: ids may come back (skip running and waiting ones).
                    req_id = rng.randrange(self.next_id)
                    if req_id in self.tokens or req_id in self.waiting:
                        continue
                    self.events["id_reused"] += 1
                else:
                    req_id, self.next_id = self.next_id, self.next_id + 1
                num_tokens = rng.randint(1, min(self.max_seq_len, 3 * self.block_size + 1))
            if preempted and rng.random() < 0.5:
                continue
            if m.can_allocate(num_tokens):
                if self.waiting.pop(req_id, None) is not None:
                    self.events["readmitted"] += 1
                self.admit(req_id, num_tokens)
                admitted.add(req_id)

        # 3-4. Every request admitted before this step writes one token in it (those admitted now already
        #      count theirs); the table the kernel reads must hold all of those tokens' blocks.
        for req_id in self.order:
            if req_id not in admitted:
                self.tokens[req_id] += 1
        self.check_invariants()

        # 5. Finished requests (and those that reached max_seq_len) give their blocks back.
        for req_id in list(self.order):
            if self.tokens[req_id] >= self.max_seq_len or rng.random() < 0.05:
                self.release(req_id)
        self.check_pool()
        m.end_step()

    # -- invariants -------------------------------------------------------------------------------

    def check_pool(self):
        m = self.m
        assert set(m.blocks) == set(self.tokens), f"manager holds {sorted(m.blocks)}, running {sorted(self.tokens)}"
        owned = [b for req_id in self.tokens for b in m.blocks[req_id]]
        free = list(m.free_blocks)
        assert len(owned) == len(set(owned)), f"a block is owned twice: {sorted(owned)}"
        assert len(free) == len(set(free)), f"a block is free twice (double free): {sorted(free)}"
        assert not set(owned) & set(free), f"blocks both owned and free: {sorted(set(owned) & set(free))}"
        assert sorted(owned + free) == list(range(m.num_blocks)), "blocks leaked (neither owned nor free)"

    def check_invariants(self):
        m = self.m
        self.check_pool()
        for req_id in self.tokens:
            assert len(m.blocks[req_id]) == self.need(req_id), (
                f"step {m.step}: request {req_id} holds {len(m.blocks[req_id])} blocks for {self.tokens[req_id]} "
                f"tokens of block size {self.block_size}: needs exactly {self.need(req_id)}")
        assert len(set(self.rows.values())) == len(self.rows), f"rows shared: {self.rows}"
        if not self.order:
            return
        rows = torch.tensor([self.rows[r] for r in self.order], dtype=torch.int32)
        width = max(self.need(r) for r in self.order)
        table = m.batch_block_table(rows, width)
        assert tuple(table.shape) == (len(self.order), width) and table.dtype == torch.int32
        for i, req_id in enumerate(self.order):
            listed = table[i, :self.need(req_id)].tolist()
            assert listed == m.blocks[req_id], (f"step {m.step}: device table row {self.rows[req_id]} of request "
                                                f"{req_id} lists {listed}, the request holds {m.blocks[req_id]}")
            # Blocks already holding a request's tokens never move: only new ones are added at the end.
            assert listed[:len(self.blocks[req_id])] == self.blocks[req_id], (
                f"step {m.step}: request {req_id}'s blocks changed from {self.blocks[req_id]} to {listed}")
            self.blocks[req_id] = listed
        assert not m.pending, "batch_block_table() left table writes pending"

    def drain(self):
        """Free everything, then check that nothing is left behind, and that no ghost ever comes due."""
        m = self.m
        for req_id in list(self.order):
            self.release(req_id)
        self.check_pool()
        assert sorted(m.free_blocks) == list(range(m.num_blocks))
        assert not m.blocks and not m.rows
        assert sorted(m.free_rows) == list(range(m.num_blocks)), "rows leaked or freed twice"
        assert not m.due_step, f"due entries left for freed requests: {m.due_step}"
        assert not any(m.due.values()), f"stale due entries: { {s: r for s, r in m.due.items() if r} }"
        for _ in range(2 * self.block_size + 2):
            assert m.blocks_due() == [], f"step {m.step}: a freed request came due"
            m.end_step()


EVENTS = {}  # seed -> the driver's event counts, for test_random_operations_cover


@pytest.mark.parametrize("seed", range(60))
def test_random_operations(seed):
    rng = random.Random(seed)
    block_size = [1, 2, 3, 4, 5, 16][seed % 6]
    num_blocks = rng.randint(2, 10)
    max_seq_len = rng.randint(num_blocks * block_size // 2 + 1, num_blocks * block_size)
    driver = Driver(rng, num_blocks, block_size, max_seq_len)
    for _ in range(150):
        driver.step()
    driver.drain()
    # The run did exercise the paths that matter (checked over all seeds in test_random_operations_cover).
    EVENTS[seed] = driver.events


def test_random_operations_cover():
    """Across the seeds, blocks ran out, requests were preempted and re-admitted, freed while due, and so on."""
    if len(EVENTS) < 60:
        pytest.skip("needs every test_random_operations case to run first")
    totals = {k: sum(e[k] for e in EVENTS.values()) for k in next(iter(EVENTS.values()))}
    assert all(v > 20 for v in totals.values()), totals
    assert sum(e["preempted"] > 0 for e in EVENTS.values()) > 40, "most seeds should run out of blocks"


def test_due_step_exact():
    """block_size 4, 5 tokens at admission: 2 blocks; the 9th token (position 8) needs the 3rd at step 4."""
    m = KVCacheManager(num_blocks=8, block_size=4, max_blocks_per_seq=8, device="cpu")
    assert m.blocks_due() == []
    row = m.allocate(7, 5)  # step 0: positions 0..4 written (prefill 4 + this step's decode token)
    assert len(m.blocks[7]) == 2
    first = m.blocks[7][:]
    assert m.batch_block_table(torch.tensor([row]), 2).tolist() == [first]
    m.end_step()
    for step in (1, 2, 3):  # positions 5, 6, 7 fill block 2
        assert m.blocks_due() == [], f"due too early, at step {step}"
        m.end_step()
    assert m.blocks_due() == [7]  # step 4: position 8 starts block 3
    m.append_block(7)
    assert len(m.blocks[7]) == 3 and m.blocks[7][:2] == first
    assert m.batch_block_table(torch.tensor([row]), 3).tolist() == [m.blocks[7]]
    m.end_step()
    for step in (5, 6, 7):
        assert m.blocks_due() == [], f"due too early, at step {step}"
        m.end_step()
    assert m.blocks_due() == [7]  # step 8: position 12 starts block 4
    m.append_block(7)
    m.end_step()
    m.free(7)
    assert sorted(m.free_blocks) == list(range(8))
    for _ in range(10):
        assert m.blocks_due() == []
        m.end_step()


@pytest.mark.parametrize("num_tokens, due_in", [(1, 4), (3, 2), (4, 1), (8, 1), (9, 4)])
def test_due_step_after_allocate(num_tokens, due_in):
    """Allocated at step s with n tokens written by its end, a request is next due when position n rounds up."""
    m = KVCacheManager(num_blocks=8, block_size=4, max_blocks_per_seq=8, device="cpu")
    for _ in range(3):  # start at step 3, not 0
        m.blocks_due()
        m.end_step()
    m.allocate("a", num_tokens)
    assert len(m.blocks["a"]) == math.ceil(num_tokens / 4)
    m.end_step()
    for _ in range(due_in - 1):
        assert m.blocks_due() == []
        m.end_step()
    assert m.blocks_due() == ["a"]


def test_freed_before_due_never_comes_due():
    """Freed at the end of the step before its block was due, then re-admitted: only the new schedule counts."""
    m = KVCacheManager(num_blocks=6, block_size=4, max_blocks_per_seq=6, device="cpu")
    m.allocate(1, 4)      # step 0: due at step 1
    m.allocate(2, 2)      # step 0: due at step 3
    m.end_step()
    assert m.blocks_due() == [1]
    m.append_block(1)     # due again at step 5
    m.free(2)             # finished at step 1, before its due step 3
    m.allocate(2, 8)      # back at step 1 with 8 tokens (2 full blocks): due at step 2
    m.end_step()
    assert m.blocks_due() == [2]
    m.free(1)             # preempted at step 2; its step-5 entry must go
    m.append_block(2)     # due again at step 6
    m.end_step()
    for step in (3, 4, 5):
        assert m.blocks_due() == [], f"step {step}: a ghost came due"
        m.end_step()
    assert m.blocks_due() == [2]
    m.free(2)
    assert sorted(m.free_blocks) == list(range(6))
    assert not m.due_step and not any(m.due.values())


def test_freed_after_due_popped():
    """A due request preempted after blocks_due() returned it, before its block came (generate's victim loop)."""
    m = KVCacheManager(num_blocks=3, block_size=2, max_blocks_per_seq=3, device="cpu")
    m.allocate("old", 2)   # step 0: 1 block, due at step 1
    m.allocate("new", 3)   # step 0: 2 blocks, due at step 2; the pool is full
    m.end_step()
    assert m.blocks_due() == ["old"] and not m.free_blocks
    m.free("new")          # step 1: the newest is preempted to make room; its step-2 entry must go
    m.append_block("old")  # due again at step 3
    m.end_step()
    assert m.blocks_due() == []                    # step 2
    assert not m.can_allocate(4)                   # "new" wants back in with 4 tokens: 1 block free, 2 needed
    m.free("old")          # finished at step 2, due at step 3
    m.end_step()
    assert m.blocks_due() == []                    # step 3
    m.allocate("new", 5)   # 3 blocks, due at step 3 + 3*2 - 5 + 1 = 5
    m.end_step()
    assert m.blocks_due() == []                    # step 4
    m.end_step()
    assert m.blocks_due() == ["new"]               # step 5


# ---------------------------------------------------------------------------------------------
# generate() itself, with the model replaced by a fake that checks the cache through the block table.

TOKEN_SPAN = 10_000  # token at position p of request i: i * TOKEN_SPAN + p, so any token names its owner


def fake_forward(block_size, checks):
    """A forward() that writes each token into a (num_blocks, block_size) pool through the block table,
    after checking that every token already cached for the row reads back as that request's own token."""

    def forward(model, tokens, cache_seqlens, kv_cache, block_table=None, cache_batch_idx=None):
        assert block_table is not None and cache_batch_idx is None
        pool = kv_cache[0]
        batch, seqlen = tokens.shape
        logits = torch.zeros(batch, model["vocab_size"])
        seen = {}
        for b in range(batch):
            owner, start = int(tokens[b, 0]) // TOKEN_SPAN, int(cache_seqlens[b])
            assert tokens[b].tolist() == [owner * TOKEN_SPAN + start + j for j in range(seqlen)]
            needed = -(-(start + seqlen) // block_size)
            assert block_table.shape[1] >= needed, "block table narrower than the row's tokens"
            blocks = block_table[b, :needed].tolist()
            for blk in blocks:
                assert seen.setdefault(blk, owner) == owner, f"block {blk} in the tables of two requests"
            for p in range(start):
                got = int(pool[blocks[p // block_size], p % block_size])
                assert got == owner * TOKEN_SPAN + p, (f"request {owner} position {p} reads {got}: "
                                                       "its block was handed to someone else, or never written")
            for j in range(seqlen):
                p = start + j
                pool[blocks[p // block_size], p % block_size] = owner * TOKEN_SPAN + p
            logits[b, owner * TOKEN_SPAN + start + seqlen] = 1.0
        checks["calls"] += 1
        return logits

    return forward


def generate_args(max_seq_len):
    """The options generate() reads, at their defaults (no sharing flags, greedy, recompute on preemption)."""
    return paged.parse_args(["1", "--max-seq-len", str(max_seq_len)])


GENERATE_PREEMPTIONS = {}  # seed -> stats["preemptions"], for test_generate_with_fake_model_preempts


@pytest.mark.parametrize("seed", range(12))
def test_generate_with_fake_model(seed, monkeypatch):
    rng = random.Random(seed)
    block_size = [1, 3, 4, 16][seed % 4]
    num_requests = rng.randint(3, 12)
    max_seq_len = rng.randint(2, 6) * block_size + rng.randint(2, 9)
    need_most = -(-max_seq_len // block_size)
    num_blocks = rng.randint(need_most, need_most * 3)  # room for the longest request, rarely for all
    checks = {"calls": 0}
    monkeypatch.setattr(paged, "forward", fake_forward(block_size, checks))
    requests = []
    for i in range(num_requests):
        prompt_len = rng.randint(1, max_seq_len - 1)
        prompt = [i * TOKEN_SPAN + p for p in range(prompt_len)]
        requests.append(paged.Request(i, prompt, rng.randint(1, max_seq_len), list(prompt)))
    model = {"vocab_size": num_requests * TOKEN_SPAN}
    manager = KVCacheManager(num_blocks, block_size, need_most, "cpu")
    pool = torch.full((num_blocks, block_size), -1, dtype=torch.int64)
    args = generate_args(max_seq_len)

    stats = paged.generate(model, requests, (pool, pool), manager, args, stop_ids=set(), device=torch.device("cpu"))

    for req in requests:
        assert req.done
        expected_len = min(len(req.prompt_ids) + req.ref_length, max_seq_len)
        assert req.tokens == [req.id * TOKEN_SPAN + p for p in range(expected_len)]
    assert sorted(manager.free_blocks) == list(range(num_blocks))
    assert not manager.due_step and not any(manager.due.values())
    GENERATE_PREEMPTIONS[seed] = stats["preemptions"]


def test_generate_with_fake_model_preempts():
    if len(GENERATE_PREEMPTIONS) < 12:
        pytest.skip("needs every test_generate_with_fake_model case to run first")
    assert sum(n > 0 for n in GENERATE_PREEMPTIONS.values()) >= 4, GENERATE_PREEMPTIONS


def test_generate_request_outgrows_pool(monkeypatch):
    """A request that outgrows the whole pool preempts itself and generate() stops with a one-line error."""
    checks = {"calls": 0}
    monkeypatch.setattr(paged, "forward", fake_forward(4, checks))
    manager = KVCacheManager(3, 4, 16, "cpu")  # 12 tokens in all
    pool = torch.full((3, 4), -1, dtype=torch.int64)
    requests = [paged.Request(0, [0, 1], 20, [0, 1])]
    with pytest.raises(SystemExit, match="cannot hold request 0, which needs 4"):
        paged.generate({"vocab_size": TOKEN_SPAN}, requests, (pool, pool), manager, generate_args(64),
                       stop_ids=set(), device=torch.device("cpu"))
    assert requests[0].tokens == list(range(13))  # 12 tokens cached, the 13th found no room


# ---------------------------------------------------------------------------------------------
# Sharing: forks (--samples, --beams) with copy-on-write, and prefix sharing, under random operations.

class SharingDriver:
    """A model-free stand-in for generate() with forks and prefix sharing, checked against a pool of token values.

    Each running request has its token values (the newest one not yet in the cache, as in generate()) and a
    count of those written. The pool holds one value per slot; the driver writes every token through the
    manager's blocks and applies its copy-on-write copies, then checks that every request reads back exactly
    its own tokens, that no request ever writes into a block another one holds, and that ref_count counts
    the requests holding each block. Prompts are drawn from a few templates so that prefixes repeat.
    """

    def __init__(self, rng, num_blocks, block_size, max_seq_len, width):
        self.rng, self.block_size, self.max_seq_len, self.width = rng, block_size, max_seq_len, width
        self.m = KVCacheManager(num_blocks, block_size, math.ceil(max_seq_len / block_size), "cpu",
                                num_rows=num_blocks * width, share_prefixes=True)
        self.pool = [[None] * block_size for _ in range(num_blocks)]
        self.templates = [[rng.randrange(3) for _ in range(max_seq_len)] for _ in range(3)]
        self.seq = {}        # running id -> its tokens; all but the newest are in the cache by the step's end
        self.order = []      # running ids, oldest admission first
        self.waiting = {}    # preempted id -> (its tokens, values saved to the host if it was swapped out, or None)
        self.forked = set()  # ids forked at the end of the last step: due in this one
        self.next_id = 0
        self.events = Counter()

    def written(self, req_id):
        return len(self.seq[req_id]) - 1

    def read(self, req_id, position):
        block = self.m.blocks[req_id][position // self.block_size]
        return self.pool[block][position % self.block_size]

    def write(self, req_id, position):
        block = self.m.blocks[req_id][position // self.block_size]
        assert self.m.ref_count[block] == 1, (f"step {self.m.step}: request {req_id} writes position {position} into "
                                              f"block {block}, which {self.m.ref_count[block]} requests hold")
        self.pool[block][position % self.block_size] = self.seq[req_id][position]

    def make_copies(self):
        """The copy-on-write copies, all at once as generate() makes them: every source is read before any block
        is written. A source may have been freed since (its other holder was preempted): nothing wrote into it."""
        dst, src = self.m.take_copies()
        assert len(set(dst)) == len(dst) and all(self.m.ref_count[d] == 1 for d in dst), "a copy into a block not its own"
        for d, values in zip(dst, [list(self.pool[s]) for s in src]):
            self.pool[d] = values
        self.events["copies"] += len(dst)
        self.events["copy_from_freed"] += sum(self.m.ref_count[s] == 0 for s in src)

    def release(self, req_id, preempt=False):
        if preempt and self.rng.random() < 0.5:  # swapped out: its values go to the host (copies made first)
            self.make_copies()
            saved = [self.read(req_id, p) for p in range(self.written(req_id))]
            self.events["swapped"] += 1
        else:
            saved = None
        self.m.free(req_id)
        tokens = self.seq.pop(req_id)
        self.order.remove(req_id)
        self.forked.discard(req_id)
        if preempt:
            self.waiting[req_id] = (tokens, saved)
            self.events["preempted"] += 1

    def admit(self, req_id, tokens, saved, group):
        """As generate() step 2-3: allocate (sharing cached blocks), then prefill or swap in what is not shared."""
        m = self.m
        cached_ids = tokens[:-1] if saved is not None else tokens
        need = len(cached_ids) + (not group)
        hit = m.cached_tokens(cached_ids)
        assert hit % self.block_size == 0 and hit < max(1, len(cached_ids))
        if not m.can_allocate(need - hit):
            return False
        free_before = len(m.free_blocks)
        row = m.allocate(req_id, need, cached_ids)
        assert free_before - len(m.free_blocks) == m.blocks_for(need) - hit // self.block_size
        assert row not in [m.rows[r] for r in self.order], f"row {row} handed to request {req_id} is still in use"
        self.seq[req_id] = list(cached_ids)
        for p in range(hit):  # the shared blocks already hold this request's tokens
            assert self.read(req_id, p) == tokens[p], f"prefix hit for request {req_id} reads wrong token at {p}"
        for p in range(hit, len(cached_ids)):
            if saved is not None:
                self.pool[m.blocks[req_id][p // self.block_size]][p % self.block_size] = saved[p]
            else:
                self.write(req_id, p)
        self.seq[req_id] = list(tokens) if saved is not None else list(tokens) + [self.rng.randrange(3)]
        self.order.append(req_id)
        self.events["prefix_hit_tokens"] += hit
        return True

    def fork(self, parent):
        child, self.next_id = self.next_id, self.next_id + 1
        self.m.fork(parent, child)
        self.seq[child] = self.seq[parent][:-1] + [self.rng.randrange(3)]
        self.order.append(child)
        self.forked.add(child)
        self.events["forked"] += 1

    def step(self):
        rng, m = self.rng, self.m
        for req_id in list(self.order):
            if rng.random() < 0.03:
                self.release(req_id)
        # 1. Due: the requests whose token of this step starts a block, and every fork of the last step.
        due = m.blocks_due()
        assert len(due) == len(set(due)), f"step {m.step}: a request is due twice: {due}"
        expected = {r for r in self.order if self.written(r) % self.block_size == 0} | self.forked
        assert set(due) == expected, f"step {m.step}: blocks_due() returned {sorted(due)}, expected {sorted(expected)}"
        self.forked = set()
        preempted = False
        for req_id in due:
            while not m.free_blocks and req_id in self.seq:
                victim = self.order[-1] if rng.random() < 0.8 else rng.choice(self.order)
                self.release(victim, preempt=True)
                preempted = True
            if req_id in self.seq:
                m.append_block(req_id)
        self.make_copies()
        # 2-3. Admissions: preempted requests come back (recomputed or swapped in), new prompts arrive, some of
        #      them the root of a group that decodes from the next step on, with its forks.
        joining = []
        for _ in range(rng.choice([0, 1, 1, 2])):
            if preempted:
                break
            if self.waiting and rng.random() < 0.5:
                req_id = rng.choice(sorted(self.waiting))
                (tokens, saved), group = self.waiting[req_id], False
            else:
                template = rng.choice(self.templates)
                tokens = template[:rng.randint(1, self.max_seq_len // 2)]
                if rng.random() < 0.3:  # the same beginning, then something else
                    tokens = tokens + [3]
                req_id, self.next_id, saved, group = self.next_id, self.next_id + 1, None, rng.random() < 0.3
            if self.admit(req_id, tokens, saved, group):
                if self.waiting.pop(req_id, None) is not None:
                    self.events["readmitted"] += 1
                if group:
                    self.order.remove(req_id)
                    joining.append(req_id)
        # 4. Every running request writes one token (those admitted now have written theirs, but for that one).
        for req_id in self.order:
            self.write(req_id, self.written(req_id))
            self.seq[req_id].append(rng.randrange(3))
        self.order += joining
        self.check()
        # 5. Forks: a group's root forks the group's other members from its prompt; a running request (a beam)
        #    forks new beams from all it holds.
        for root in joining:
            for _ in range(rng.randrange(self.width)):
                self.fork(root)
        for parent in list(self.order):
            if rng.random() < 0.08 and parent not in self.forked:
                for _ in range(rng.randrange(1, self.width)):
                    self.fork(parent)
        for req_id in list(self.order):
            if self.written(req_id) + 1 >= self.max_seq_len or rng.random() < 0.03:
                self.release(req_id)
        self.check()
        m.end_step()

    def check(self):
        m, held = self.m, Counter()
        for req_id in self.order:
            held.update(m.blocks[req_id])
            assert len(m.blocks[req_id]) == math.ceil(self.written(req_id) / self.block_size) or req_id in self.forked
            for p in range(self.written(req_id)):
                assert self.read(req_id, p) == self.seq[req_id][p], (
                    f"step {m.step}: request {req_id} position {p} reads {self.read(req_id, p)}, "
                    f"wrote {self.seq[req_id][p]}")
        free = list(m.free_blocks)
        assert len(free) == len(set(free)), "a block is free twice"
        assert sorted(free) == [b for b in range(m.num_blocks) if not held[b]], "a held block is free, or one leaked"
        assert m.ref_count == [held[b] for b in range(m.num_blocks)], "ref_count is not the number of holders"
        assert m.shared == sum(n - 1 for n in held.values())
        for (previous, tokens), block in m.prefix.items():  # the cache's index lists only held blocks, correctly
            assert held[block] and m.prefix_key[block] == (previous, tokens)
            assert self.pool[block] == list(tokens), f"block {block} is listed with tokens {tokens}, holds {self.pool[block]}"
        assert len(m.prefix_key) == len(m.prefix)
        assert len({m.rows[r] for r in self.order}) == len(self.order), "a row is shared"
        if self.order:  # the device table the kernel reads agrees
            rows = torch.tensor([m.rows[r] for r in self.order], dtype=torch.int32)
            table = m.batch_block_table(rows, max(len(m.blocks[r]) for r in self.order)).tolist()
            assert all(row[:len(m.blocks[r])] == m.blocks[r] for row, r in zip(table, self.order))

    def drain(self):
        m = self.m
        for req_id in list(self.order):
            self.release(req_id)
        assert sorted(m.free_blocks) == list(range(m.num_blocks)) and m.ref_count == [0] * m.num_blocks
        assert m.shared == 0 and not m.prefix and not m.prefix_key and not m.copies
        assert not m.blocks and not m.rows and not m.start and not m.due_step and not any(m.due.values())
        assert sorted(m.free_rows) == list(range(m.num_blocks * self.width)), "rows leaked or freed twice"


SHARING_EVENTS = {}


@pytest.mark.parametrize("seed", range(40))
def test_random_operations_with_sharing(seed):
    rng = random.Random(seed)
    block_size = [1, 2, 3, 4, 16][seed % 5]
    num_blocks = rng.randint(3, 14)
    max_seq_len = rng.randint(num_blocks * block_size // 2 + 2, num_blocks * block_size + 1)
    driver = SharingDriver(rng, num_blocks, block_size, max_seq_len, width=rng.choice([2, 3, 4]))
    for _ in range(120):
        driver.step()
    driver.drain()
    SHARING_EVENTS[seed] = driver.events


def test_random_operations_with_sharing_cover():
    """Across the seeds: forks, copies, prefix hits, preemptions, swap-ins and re-admissions all happened, often."""
    if len(SHARING_EVENTS) < 40:
        pytest.skip("needs every test_random_operations_with_sharing case to run first")
    totals = sum(SHARING_EVENTS.values(), Counter())
    for event in ("forked", "copies", "prefix_hit_tokens", "preempted", "swapped", "readmitted"):
        assert totals[event] > 50, totals
    assert sum(e["copies"] > 0 for e in SHARING_EVENTS.values()) > 30, "most seeds should copy on write"


def test_fork_copy_on_write_and_ref_counts():
    """block_size 4: a prompt of 6 tokens forked twice, as --samples 3 does. The forks copy the shared, partly
    filled block before their first write into it; the full block stays shared; a block goes back to the free
    list only when its last holder lets go."""
    m = KVCacheManager(num_blocks=8, block_size=4, max_blocks_per_seq=4, device="cpu", num_rows=24)
    m.allocate("p", 6)    # step 0: a group's root, prefilled; it decodes from step 1 on, with its forks
    full, partial = m.blocks["p"]
    m.fork("p", "a")   # end of step 0: two samples share both blocks
    m.fork("p", "b")
    assert m.ref_count[full] == m.ref_count[partial] == 3 and m.shared == 4 and len(m.free_blocks) == 6
    m.end_step()
    assert sorted(m.blocks_due()) == ["a", "b"]  # step 1: all three write token 6 into the partial block
    m.append_block("a")
    m.append_block("b")
    dst, src = m.take_copies()
    assert src == [partial, partial] and len(set(dst)) == 2 and partial not in dst
    assert m.blocks["a"] == [full, dst[0]] and m.blocks["b"] == [full, dst[1]] and m.blocks["p"] == [full, partial]
    assert m.ref_count[full] == 3 and m.ref_count[partial] == 1 and m.shared == 2
    table = m.batch_block_table(torch.tensor([m.rows[r] for r in "pab"]), 2).tolist()
    assert table == [m.blocks[r] for r in "pab"]
    m.free("p")           # the root finishes: its partial block goes back, the full one stays with the forks
    assert partial in m.free_blocks and full not in m.free_blocks and m.ref_count[full] == 2 and m.shared == 1
    m.end_step()
    assert m.blocks_due() == []                  # step 2: token 7 fills the second block
    m.end_step()
    assert sorted(m.blocks_due()) == ["a", "b"]  # step 3: token 8 starts a third block; nothing to copy
    m.append_block("a")
    m.append_block("b")
    assert m.take_copies() == ([], []) and len(m.blocks["a"]) == len(m.blocks["b"]) == 3
    m.free("a")
    assert full not in m.free_blocks and m.ref_count[full] == 1 and m.shared == 0
    m.free("b")
    assert sorted(m.free_blocks) == list(range(8)) and m.ref_count == [0] * 8


def test_fork_after_block_boundary_shares_only_full_blocks():
    """A beam forked when its tokens fill their blocks exactly shares them all and copies nothing: its next
    token starts a block of its own."""
    m = KVCacheManager(num_blocks=8, block_size=4, max_blocks_per_seq=4, device="cpu", num_rows=16)
    m.allocate("p", 8)    # step 0: prefill 7, decode 1: two full blocks, due at step 1
    m.fork("p", "c")   # end of step 0
    m.end_step()
    assert sorted(m.blocks_due()) == ["c", "p"]
    m.append_block("p")
    m.append_block("c")
    assert m.take_copies() == ([], [])
    assert m.blocks["p"][:2] == m.blocks["c"][:2] and m.blocks["p"][2] != m.blocks["c"][2]
    assert m.shared == 2
    m.free("p")
    m.free("c")
    assert sorted(m.free_blocks) == list(range(8))


def test_prefix_sharing_reuses_full_blocks_only():
    """Full blocks of a prompt that match, with everything before them, a block in the cache are shared; the
    block holding the prompt's last token never is (its prefill gives the next token); a block leaves the
    index when it goes back to the free list."""
    m = KVCacheManager(num_blocks=10, block_size=4, max_blocks_per_seq=4, device="cpu", share_prefixes=True)
    system = [1, 2, 3, 4, 5, 6, 7, 8, 9]           # two full blocks and one token more
    assert m.cached_tokens(system + [10]) == 0
    m.allocate("a", 11, system + [10])              # prefill 10 tokens, decode 1: 3 blocks, 2 of them full
    a = list(m.blocks["a"])
    assert m.cached_tokens(system + [11, 12]) == 8
    assert m.cached_tokens(system[:8]) == 4          # its last token's block is computed, not shared
    assert m.cached_tokens([1, 2, 3, 4, 0, 6, 7, 8, 9]) == 4
    assert m.cached_tokens([0, 2, 3, 4, 5, 6, 7, 8, 9]) == 0
    free_before = len(m.free_blocks)
    m.allocate("b", 12, system + [11, 12])          # 3 blocks, 2 of them shared
    assert m.blocks["b"][:2] == a[:2] and free_before - len(m.free_blocks) == 1
    assert [m.ref_count[x] for x in a] == [2, 2, 1] and m.shared == 2
    m.free("a")
    assert a[2] in m.free_blocks and a[0] not in m.free_blocks and m.cached_tokens(system + [10]) == 8
    m.free("b")
    assert m.cached_tokens(system + [10]) == 0 and not m.prefix and not m.prefix_key
    assert sorted(m.free_blocks) == list(range(10)) and m.shared == 0


def test_no_prefix_sharing_without_the_flag():
    m = KVCacheManager(num_blocks=10, block_size=4, max_blocks_per_seq=4, device="cpu")
    m.allocate("a", 11, list(range(10)))
    assert m.cached_tokens(list(range(12))) == 0
    m.allocate("b", 13, list(range(12)))
    assert not set(m.blocks["a"]) & set(m.blocks["b"])
