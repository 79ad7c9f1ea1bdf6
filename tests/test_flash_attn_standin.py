"""The CPU stand-in for flash-attn's flash_attn_with_kvcache (tests/flash_attn_standin.py).

1. Against the scripts' PyTorch fallback attention_torch, on the calls the scripts make (bf16, causal): paged
   caches with blocks of 256 and 512 and contiguous caches read through a shuffled cache_batch_idx; prefill from
   an empty cache and after cached tokens, decode, ragged lengths, grouped-query and plain multi-head. Both must
   return the same output and write the same new K and V into the same slots, and nothing else: every slot they
   must not read or write (past a row's tokens, spare blocks, spare block-table columns) holds random values.
2. Each rule the stand-in enforces, broken on purpose: a valid call with one thing changed must be refused with
   an AssertionError that names the rule. And valid calls, including the unusual ones the kernel accepts, must not be.
"""
import math

import pytest
import torch

from flash_attn_standin import flash_attn_with_kvcache
from load_scripts import load_script

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def attention_torch():
    """The block-table fallback in llama3-paged.py (the rungs above it hold the same; naive's reads rows)."""
    return load_script("paged").attention_torch


# ---------------------------------------------------------------------------------------------
# Valid calls, as the scripts make them: a dict of flash_attn_with_kvcache's arguments.

def paged_call(cache_seqlens, seqlen, heads=(8, 2), head_dim=16, block_size=256, dtype=BF16, seed=0):
    """A pool of blocks in random order, one or two spare ones, and a spare block-table column holding other
    rows' blocks: a wrong read or write lands on random values."""
    g = torch.Generator().manual_seed(seed)
    (n_heads, n_kv_heads), batch = heads, len(cache_seqlens)
    needed = [-(-(c + seqlen) // block_size) for c in cache_seqlens]
    num_blocks = sum(needed) + 2
    order = torch.randperm(num_blocks, generator=g).tolist()
    width = max(needed) + 1
    table = torch.randint(0, num_blocks, (batch, width), generator=g, dtype=torch.int32)
    for b, n in enumerate(needed):
        table[b, :n] = torch.tensor(order[:n], dtype=torch.int32)
        order = order[n:]
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dtype)
    return dict(q=rand(batch, seqlen, n_heads, head_dim), k_cache=rand(num_blocks, block_size, n_kv_heads, head_dim),
                v_cache=rand(num_blocks, block_size, n_kv_heads, head_dim), k=rand(batch, seqlen, n_kv_heads, head_dim),
                v=rand(batch, seqlen, n_kv_heads, head_dim), cache_seqlens=torch.tensor(cache_seqlens, dtype=torch.int32),
                block_table=table, causal=True)


def contiguous_call(cache_seqlens, seqlen, heads=(8, 2), head_dim=16, cache_rows=5, max_seq_len=64, dtype=BF16, seed=0):
    """A cache of cache_rows rows of max_seq_len tokens; the batch reads distinct rows in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    (n_heads, n_kv_heads), batch = heads, len(cache_seqlens)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dtype)
    return dict(q=rand(batch, seqlen, n_heads, head_dim), k_cache=rand(cache_rows, max_seq_len, n_kv_heads, head_dim),
                v_cache=rand(cache_rows, max_seq_len, n_kv_heads, head_dim), k=rand(batch, seqlen, n_kv_heads, head_dim),
                v=rand(batch, seqlen, n_kv_heads, head_dim), cache_seqlens=torch.tensor(cache_seqlens, dtype=torch.int32),
                cache_batch_idx=torch.randperm(cache_rows, generator=g)[:batch].int(), causal=True)


def clone(call):
    return {name: value.clone() if isinstance(value, torch.Tensor) else value for name, value in call.items()}


def expected_caches(call):
    """The caches after the call: the new k and v at positions cache_seqlens[b] + i of row b, nothing else changed."""
    k_cache, v_cache = call["k_cache"].clone(), call["v_cache"].clone()
    for b, cached in enumerate(call["cache_seqlens"].tolist()):
        for i in range(call["k"].shape[1]):
            t = cached + i
            if call.get("block_table") is not None:
                block_size = k_cache.shape[1]
                slot = int(call["block_table"][b, t // block_size]), t % block_size
            else:
                slot = int(call["cache_batch_idx"][b]), t
            k_cache[slot], v_cache[slot] = call["k"][b, i], call["v"][b, i]
    return k_cache, v_cache


def assert_close(got, want, tol):
    assert got.shape == want.shape and got.dtype == want.dtype
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol, f"max abs error {err:.3g} > {tol}"


BF16_TOL = 2e-2  # outputs are ~0.1-1 in size; bf16 keeps 8 bits, and the two round differently on the way


# ---------------------------------------------------------------------------------------------
# 1. The stand-in and the fallback agree.

# (cache_seqlens, seqlen): prefill from empty caches, prefill after cached tokens (across a block boundary), decode
# around block boundaries, ragged across the batch.
PAGED_SHAPES = [([0], 9), ([0, 0], 300), ([250, 3, 0], 20), ([0, 5, 255, 256, 511], 1), ([700, 1023, 1], 1)]
HEADS = [(8, 2), (4, 4)]  # grouped-query (4 query heads per KV head) and plain multi-head


@pytest.mark.parametrize("heads", HEADS, ids=["gqa", "mha"])
@pytest.mark.parametrize("block_size", [256, 512])
@pytest.mark.parametrize("cache_seqlens,seqlen", PAGED_SHAPES)
def test_paged_matches_fallback(attention_torch, cache_seqlens, seqlen, block_size, heads):
    call = paged_call(cache_seqlens, seqlen, heads, block_size=block_size)
    want_k, want_v = expected_caches(call)
    ours, theirs = clone(call), clone(call)
    out = flash_attn_with_kvcache(**ours)
    ref = attention_torch(**theirs)
    assert_close(out, ref, BF16_TOL)
    for got in (ours, theirs):
        assert torch.equal(got["k_cache"], want_k) and torch.equal(got["v_cache"], want_v)


CONTIGUOUS_SHAPES = [([0], 9), ([5, 0, 40], 1), ([10, 2, 30], 6), ([63, 0], 1), ([0, 0, 0], 64)]


@pytest.mark.parametrize("heads", HEADS, ids=["gqa", "mha"])
@pytest.mark.parametrize("cache_seqlens,seqlen", CONTIGUOUS_SHAPES)
def test_contiguous_matches_fallback(cache_seqlens, seqlen, heads):
    call = contiguous_call(cache_seqlens, seqlen, heads)
    want_k, want_v = expected_caches(call)
    ours, theirs = clone(call), clone(call)
    assert_close(flash_attn_with_kvcache(**ours), load_script("naive").attention_torch(**theirs), BF16_TOL)
    for got in (ours, theirs):
        assert torch.equal(got["k_cache"], want_k) and torch.equal(got["v_cache"], want_v)


# ---------------------------------------------------------------------------------------------
# 2. What the fallback doesn't cover: no causal mask, no new tokens, the defaults.

def dense(q, keys, values, hidden=None, scale=None):
    """One row, float32: q (seqlen, n_heads, d), keys/values (length, n_heads, d), hidden (seqlen, length) or None."""
    scores = torch.einsum("ihd,jhd->hij", q.float(), keys.float()) * (scale or q.shape[-1] ** -0.5)
    if hidden is not None:
        scores = scores.masked_fill(hidden, float("-inf"))
    return torch.einsum("hij,jhd->ihd", scores.softmax(-1), values.float())


def test_not_causal_sees_every_key_of_its_row():
    call = contiguous_call([10, 3], 4, heads=(4, 4), seed=1) | {"causal": False, "softmax_scale": 0.3}
    out = flash_attn_with_kvcache(**call).float()
    for b, cached in enumerate([10, 3]):
        row = int(call["cache_batch_idx"][b])
        keys, values = call["k_cache"][row, :cached + 4], call["v_cache"][row, :cached + 4]
        assert_close(out[b], dense(call["q"][b], keys, values, scale=0.3), BF16_TOL)


def test_without_new_tokens_reads_the_cache_and_masks_bottom_right():
    """k=None: row b attends to its cache_seqlens[b] tokens, and writes nothing. Query i sees key j <= i + 1 - 3:
    queries 0 and 1 see no key at all, and give zeros (api.py:1519); query 2 sees key 0 alone."""
    call = paged_call([1], 3, heads=(2, 2), seed=2)
    del call["k"], call["v"]
    k_cache, v_cache = call["k_cache"].clone(), call["v_cache"].clone()
    out = flash_attn_with_kvcache(**call)
    first = int(call["block_table"][0, 0])
    assert torch.equal(out[0, :2], torch.zeros_like(out[0, :2]))
    assert torch.equal(out[0, 2], v_cache[first, 0])
    assert torch.equal(call["k_cache"], k_cache) and torch.equal(call["v_cache"], v_cache)


def test_without_cache_seqlens_reads_the_whole_cache():
    call = contiguous_call([0], 2, heads=(2, 1), max_seq_len=8, seed=3) | {"causal": False}
    del call["k"], call["v"], call["cache_seqlens"]
    row = int(call["cache_batch_idx"][0])
    keys, values = (c[row].repeat_interleave(2, dim=1) for c in (call["k_cache"], call["v_cache"]))
    assert_close(flash_attn_with_kvcache(**call)[0], dense(call["q"][0], keys, values).to(BF16), BF16_TOL)


# ---------------------------------------------------------------------------------------------
# 3. Calls the kernel accepts must not be refused.

def noncontiguous(t):
    """The same values with a last dimension that is not contiguous."""
    return t.mT.contiguous().mT if t.dim() > 1 else t


ACCEPTED = {
    "paged": lambda: paged_call([3, 300], 1),
    "paged, fp16": lambda: paged_call([3, 300], 5, dtype=torch.float16),
    "paged, blocks of 768": lambda: paged_call([3, 900], 2, block_size=768),
    "contiguous": lambda: contiguous_call([5, 0, 40], 1),
    "contiguous, no cache_batch_idx": lambda: contiguous_call([5, 0], 3) | {"cache_batch_idx": None},
    "contiguous, int cache_seqlens": lambda: contiguous_call([7] * 5, 2, cache_rows=5) | {"cache_seqlens": 7},
    "head_dim 12, not a multiple of 8 (padded)": lambda: paged_call([3, 4], 1, head_dim=12),
    "head_dim 256": lambda: paged_call([3], 1, head_dim=256),
    "decode, 4 groups, a cache of 2 tokens, head_dim 12 (not swapped)":
        lambda: contiguous_call([0], 1, heads=(8, 2), head_dim=12, max_seq_len=2),
    "num_splits 128": lambda: paged_call([3], 1) | {"num_splits": 128},
    "softcap 0": lambda: paged_call([3], 1) | {"softcap": 0.0},
    # The wrapper copies q, k, v and block_table to a contiguous last dimension itself (api.py:1574, 1583).
    "q, k, v, block_table not contiguous": lambda: {**(c := paged_call([3, 260], 2)),
                                                    **{n: noncontiguous(c[n]) for n in ("q", "k", "v", "block_table")}},
    # Entries past those covering a row's tokens are never read: they may hold anything.
    "spare table entries out of the pool": lambda: {**(c := paged_call([3, 300], 1)),
                                                    "block_table": c["block_table"].index_fill(1, torch.tensor([2]), -1)},
    # Prefix sharing: both rows read block 0; each writes into its own block.
    "a shared block read, not written": lambda: shared_prefix_call(write_into_shared=False),
    # Two rows may read one cache row when they write nothing.
    "one cache row read twice, no new tokens": lambda: contiguous_call([10, 30], 1) | {
        "k": None, "v": None, "cache_batch_idx": torch.tensor([2, 2], dtype=torch.int32)},
}


def shared_prefix_call(write_into_shared):
    """Rows 0 and 1 share block 0 (a prompt of 200 tokens); they continue in blocks 1 and 2, or, if
    write_into_shared, row 0's next token goes into the shared block, at position 200, which row 1 reads."""
    call = paged_call([0, 0], 1, seed=4)
    call["k_cache"], call["v_cache"] = (torch.randn(3, 256, 2, 16).to(BF16) for _ in range(2))
    lengths = [200, 300] if write_into_shared else [256, 300]
    call["cache_seqlens"] = torch.tensor(lengths, dtype=torch.int32)
    call["block_table"] = torch.tensor([[0, 1], [0, 2]], dtype=torch.int32)
    return call


@pytest.mark.parametrize("make", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_valid_call_is_accepted(make):
    call = make()
    out = flash_attn_with_kvcache(**call)
    assert out.shape == call["q"].shape and out.dtype == call["q"].dtype and out.device == call["q"].device
    assert torch.isfinite(out).all()


def test_noncontiguous_inputs_give_the_same_result():
    call = paged_call([3, 260], 2, seed=5)
    strided = clone(call) | {n: noncontiguous(call[n]) for n in ("q", "k", "v", "block_table")}
    plain = clone(call)
    assert torch.equal(flash_attn_with_kvcache(**strided), flash_attn_with_kvcache(**plain))
    assert torch.equal(strided["k_cache"], plain["k_cache"]) and torch.equal(strided["v_cache"], plain["v_cache"])


def test_spare_table_entries_are_not_read():
    call = paged_call([3, 300], 1, seed=6)
    garbage = clone(call)
    garbage["block_table"][:, -1] = 10**6
    garbage["block_table"][0, 1] = -7  # row 0 has 4 tokens: one block
    assert torch.equal(flash_attn_with_kvcache(**garbage), flash_attn_with_kvcache(**clone(call)))


# ---------------------------------------------------------------------------------------------
# 4. Each rule, broken on purpose: a valid call with one thing changed, and the words the refusal must contain.

def with_dtype(call, dtype, *names):
    return call | {n: call[n].to(dtype) for n in names}


def with_block_size(call, block_size):
    """The same call over a pool of blocks of block_size (and a block table to match)."""
    n_kv, d = call["k_cache"].shape[2:]
    need = -(-(int(call["cache_seqlens"].max()) + call["q"].shape[1]) // block_size)
    batch = call["q"].shape[0]
    return call | {"k_cache": torch.randn(batch * need, block_size, n_kv, d).to(BF16),
                   "v_cache": torch.randn(batch * need, block_size, n_kv, d).to(BF16),
                   "block_table": torch.arange(batch * need, dtype=torch.int32).view(batch, need)}


def with_head_dim(call, head_dim):
    return call | {n: torch.randn(*call[n].shape[:-1], head_dim).to(BF16) for n in ("q", "k", "v", "k_cache", "v_cache")}


def paged():  # rows of 4 and 301 tokens after the call: 1 and 2 blocks of 256; a table 3 wide
    return paged_call([3, 300], 1)


def contiguous():
    return contiguous_call([5, 0, 40], 1)


def set_entry(call, name, index, value):
    t = call[name].clone()
    t[index] = value
    return call | {name: t}


REFUSED = {
    # dtypes (cpp:1233-1236, 1359-1360, 1250, 1388, 1435)
    "all fp32": (lambda: with_dtype(paged(), torch.float32, "q", "k", "v", "k_cache", "v_cache"), "fp16 or bf16"),
    "q fp16, caches bf16": (lambda: with_dtype(paged(), torch.float16, "q", "k", "v"), "k_cache must have q's dtype"),
    "k fp16": (lambda: with_dtype(paged(), torch.float16, "k"), "k must have q's dtype"),
    "v_cache fp16": (lambda: with_dtype(paged(), torch.float16, "v_cache"), "v_cache must have q's dtype"),
    "cache_seqlens int64": (lambda: with_dtype(paged(), torch.int64, "cache_seqlens"), "cache_seqlens must have dtype int32"),
    "block_table int64": (lambda: with_dtype(paged(), torch.int64, "block_table"), "block_table must have dtype int32"),
    "cache_batch_idx int64": (lambda: with_dtype(contiguous(), torch.int64, "cache_batch_idx"),
                              "cache_batch_idx must have dtype int32"),
    # layout (api.py:1572-1573; cpp:1390)
    "k_cache last dim strided": (lambda: (c := paged()) | {"k_cache": noncontiguous(c["k_cache"])},
                                 "k_cache must have contiguous last dimension"),
    "v_cache last dim strided": (lambda: (c := contiguous()) | {"v_cache": noncontiguous(c["v_cache"])},
                                 "v_cache must have contiguous last dimension"),
    "cache_seqlens strided": (lambda: paged() | {"cache_seqlens": torch.tensor([[3, 0], [300, 0]], dtype=torch.int32)[:, 0]},
                              "seqlens_k must be contiguous"),
    # device (cpp:1238, 1249, 1361, 1389, 1433): on a CPU, the meta device stands for another one
    "block_table on another device": (lambda: (c := paged()) | {"block_table": c["block_table"].to("meta")},
                                      "block_table must be on q's device"),
    "k on another device": (lambda: (c := paged()) | {"k": c["k"].to("meta")}, "k must be on q's device"),
    # paged cache (cpp:1247, 1264)
    "blocks of 128": (lambda: with_block_size(paged(), 128), "block size must be divisible by 256"),
    "blocks of 16": (lambda: with_block_size(paged(), 16), "block size must be divisible by 256"),
    "blocks of 384": (lambda: with_block_size(paged(), 384), "block size must be divisible by 256"),
    "block_table and cache_batch_idx": (lambda: paged() | {"cache_batch_idx": torch.tensor([0, 1], dtype=torch.int32)},
                                        "does not support cache_batch_idx"),
    # heads and head dimension (cpp:1269-1270)
    "6 query heads, 4 KV heads": (lambda: paged_call([3], 1, heads=(6, 4)), "must divide number of heads in query"),
    "head_dim 264": (lambda: with_head_dim(paged(), 264), "head dimension at most 256"),
    # shapes (cpp:1289-1296, 1365-1366, 1391; api.py:1528-1530, 1542)
    "q 3-D": (lambda: (c := paged()) | {"q": c["q"][:, 0]}, "must be 4-D"),
    "q batch 3, k batch 2": (lambda: (c := paged()) | {"q": torch.cat([c["q"], c["q"][:1]])}, "block_table must have shape"),
    "k batch 1": (lambda: (c := paged()) | {"k": c["k"][:1], "v": c["v"][:1]}, "k and v must both have shape"),
    "k and v seqlens differ": (lambda: (c := paged()) | {"v": torch.cat([c["v"], c["v"]], 1)}, "k and v must both have shape"),
    "k with 4 KV heads, caches 2": (lambda: (c := paged()) | {"k": c["k"].repeat(1, 1, 2, 1), "v": c["v"].repeat(1, 1, 2, 1)},
                                    "k and v must both have shape"),
    "k head_dim 8, caches 16": (lambda: (c := paged()) | {"k": c["k"][..., :8].contiguous(), "v": c["v"][..., :8].contiguous()},
                                "k and v must both have shape"),
    "q head_dim 32, caches 16": (lambda: (c := paged()) | {"q": torch.cat([c["q"], c["q"]], -1)},
                                 "k_cache and v_cache must both have shape"),
    "v_cache fewer blocks": (lambda: (c := paged()) | {"v_cache": c["v_cache"][:-1]}, "k_cache and v_cache must both have shape"),
    "v_cache fewer KV heads": (lambda: (c := paged()) | {"v_cache": c["v_cache"][:, :, :1]},
                               "k_cache and v_cache must both have shape"),
    "cache_seqlens 3 long": (lambda: paged() | {"cache_seqlens": torch.tensor([3, 300, 0], dtype=torch.int32)},
                             "cache_seqlens must have shape"),
    "int cache_seqlens, paged": (lambda: paged() | {"cache_seqlens": 3}, "cache_seqlens must have shape"),  # api.py:1577
    "block_table 1 row": (lambda: (c := paged()) | {"block_table": c["block_table"][:1]}, "block_table must have shape"),
    "block_table 1-D": (lambda: (c := paged()) | {"block_table": c["block_table"][0]}, "block_table must have shape"),
    "cache_batch_idx 2 long, batch 3": (lambda: (c := contiguous()) | {"cache_batch_idx": c["cache_batch_idx"][:2]},
                                        "cache_batch_idx must have shape"),
    "batch 0": (lambda: (c := paged()) | {n: c[n][:0] for n in ("q", "k", "v", "cache_seqlens", "block_table")},
                "batch size must be positive"),
    # k, v and cache_seqlens go together (cpp:1353-1356)
    "k without v": (lambda: paged() | {"v": None}, "value must also be passed in"),
    "v without k": (lambda: paged() | {"k": None}, "v given without k"),
    "k without cache_seqlens": (lambda: paged() | {"cache_seqlens": None}, "seqlens_k must also be passed in"),
    "more new tokens than the cache holds": (lambda: contiguous_call([0], 9, max_seq_len=8),
                                             "seqlen <= the seqlen of the KV cache"),
    "decode, 4 groups, a cache of 2 tokens": (lambda: contiguous_call([0], 1, heads=(8, 2), max_seq_len=2),
                                              "seqlen <= the seqlen of the KV cache"),  # cpp:1278 swaps groups in
    # what the kernel reads and writes must lie in the cache
    "block_table row too narrow": (lambda: set_entry(paged(), "cache_seqlens", 1, 3 * 256), "block_table row 1 must cover"),
    "block_table entry = num_blocks": (lambda: set_entry(c := paged(), "block_table", (1, 1), len(c["k_cache"])),
                                       "block_table row 1 names a block outside the pool"),
    "block_table entry -1": (lambda: set_entry(paged(), "block_table", (0, 0), -1), "block_table row 0 names a block outside"),
    "past the end of a cache row": (lambda: set_entry(contiguous(), "cache_seqlens", 2, 64), "goes past the end of the cache row"),
    "past the end, prefill": (lambda: contiguous_call([60], 5), "goes past the end of the cache row"),
    "cache_batch_idx = cache rows": (lambda: set_entry(contiguous(), "cache_batch_idx", 1, 5), "must index the cache's 5 rows"),
    "cache_batch_idx -1": (lambda: set_entry(contiguous(), "cache_batch_idx", 0, -1), "must index the cache's 5 rows"),
    "cache_seqlens -1": (lambda: set_entry(paged(), "cache_seqlens", 0, -1), "must not be negative"),
    # writes another row reads (api.py:1544-1545)
    "writes into a shared block": (lambda: shared_prefix_call(write_into_shared=True), "race"),
    "one cache row, a write the other reads": (lambda: contiguous_call([30, 10], 1) | {
        "cache_batch_idx": torch.tensor([2, 2], dtype=torch.int32)}, "race"),
    "a block twice in one row": (lambda: set_entry(c := paged(), "block_table", (1, 1), int(c["block_table"][1, 0])), "race"),
    # not modelled
    "rotary": (lambda: paged() | {"rotary_cos": torch.ones(512, 8), "rotary_sin": torch.zeros(512, 8)}, "does not model"),
    "alibi": (lambda: paged() | {"alibi_slopes": torch.ones(8)}, "does not model"),
    "window": (lambda: paged() | {"window_size": (16, 0)}, "does not model"),
    "softcap": (lambda: paged() | {"softcap": 30.0}, "does not model"),
    "leftpad": (lambda: contiguous() | {"cache_leftpad": torch.zeros(3, dtype=torch.int32)}, "does not model"),
    "return_softmax_lse": (lambda: paged() | {"return_softmax_lse": True}, "does not model"),
    "num_splits 129": (lambda: paged() | {"num_splits": 129}, "num_splits > 128"),
}


@pytest.mark.parametrize("make,rule", REFUSED.values(), ids=REFUSED.keys())
def test_refused(make, rule):
    call = make()
    before = {n: t.clone() for n, t in call.items() if n in ("k_cache", "v_cache") and t.device.type != "meta"}
    with pytest.raises(AssertionError, match="flash_attn_with_kvcache: ") as refusal:
        flash_attn_with_kvcache(**call)
    assert rule in str(refusal.value)
    for name, t in before.items():  # refused before it wrote anything
        assert torch.equal(call[name], t), f"{name} changed by a refused call"
