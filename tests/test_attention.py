"""attention_torch, the PyTorch function that takes flash-attn's place where it can't run, against a dense reference;
and the memory it takes, counted as on a GPU, at Llama-3-8B's shape.

Each script has the attention_torch for its own cache layout: llama3-naive.py's reads rows at cache_batch_idx,
llama3-paged.py's reads through a block table (the rungs above it have the same, tests/test_twins.py checks
it). Each only has to handle what its script passes: causal=True, and its rows or its block table.

The reference below is written from flash-attn's documented semantics, one batch row and one head at a
time: the keys of row b are its cached keys [0, cache_seqlens[b]) followed by the new keys; query head
h reads kv head h // (n_heads // n_kv_heads); scores are q.k / sqrt(head_dim); with causal=True new
query i (0-based) sees keys j <= cache_seqlens[b] + i (the mask aligned to the bottom right), with
causal=False it sees every key j < cache_seqlens[b] + seqlen_q. The kernel also writes the new k and v
into the cache at positions cache_seqlens[b] + i, and must change nothing else there.

Every cache slot the kernel must not read (past a row's length, unused blocks, spare block-table
columns) holds random values, not zeros, so reading one changes the result.
"""
import math
import random

import pytest
import torch

from load_scripts import load_script

naive, paged = load_script("naive"), load_script("paged")
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}

# (cache_seqlens, seqlen_q): decode (seqlen_q 1) and prefill (seqlen_q > 1), from an empty cache and
# after cached tokens, ragged across the batch, around block boundaries of 5 and 16.
SHAPES = [
    ([0, 7, 33], 1),
    ([0, 7, 33], 6),
    ([0], 9),            # a whole prompt from an empty cache
    ([12], 1),
    ([0, 0, 2], 3),
    ([4, 5, 15, 16, 31], 1),
    ([16, 10, 1], 17),
]
HEADS = [(8, 2), (4, 4)]  # grouped-query (4 query heads per kv head) and plain multi-head


def assert_close(got, want, rtol, atol):
    """torch.testing.assert_close without its one-off second of imports."""
    err = (got - want).abs()
    bound = atol + rtol * want.abs()
    assert not torch.isnan(got).any(), "NaN in the output"
    assert (err <= bound).all(), f"max abs error {err.max().item():.3g} (worst excess {(err - bound).max().item():.3g})"


def reference(q, k_cache, v_cache, k, v, cache_seqlens, block_table=None, cache_batch_idx=None, causal=True):
    """Dense attention over each row's cached keys plus its new keys, with explicit loops."""
    batch, seqlen_q, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    group = n_heads // n_kv_heads
    kv_head_of = [h // group for h in range(n_heads)]  # query head h reads kv head h // group
    out = torch.empty_like(q)
    for b in range(batch):
        cached = int(cache_seqlens[b])
        if block_table is not None:
            block_size = k_cache.shape[1]
            slots = [(int(block_table[b, t // block_size]), t % block_size) for t in range(cached)]
            old_k = torch.stack([k_cache[blk, off] for blk, off in slots]) if slots else k_cache[0, :0]
            old_v = torch.stack([v_cache[blk, off] for blk, off in slots]) if slots else v_cache[0, :0]
        else:
            row = b if cache_batch_idx is None else int(cache_batch_idx[b])
            old_k, old_v = k_cache[row, :cached], v_cache[row, :cached]
        keys = torch.cat([old_k, k[b]])[:, kv_head_of]      # (cached + seqlen_q, n_heads, head_dim)
        values = torch.cat([old_v, v[b]])[:, kv_head_of]
        scores = torch.einsum("ihd,jhd->hij", q[b], keys) / math.sqrt(head_dim)  # (n_heads, seqlen_q, keys)
        for i in range(seqlen_q):
            last = cached + i if causal else cached + seqlen_q - 1  # the last key query i sees
            scores[:, i, last + 1:] = -math.inf
        out[b] = torch.einsum("hij,jhd->ihd", torch.softmax(scores, dim=-1), values)
    return out


def make_inputs(gen, cache_seqlens, seqlen_q, n_heads, n_kv_heads, head_dim, dtype):
    batch = len(cache_seqlens)
    q = torch.randn(batch, seqlen_q, n_heads, head_dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, seqlen_q, n_kv_heads, head_dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, seqlen_q, n_kv_heads, head_dim, generator=gen, dtype=dtype)
    return q, k, v, torch.tensor(cache_seqlens, dtype=torch.int32)


def contiguous_case(seed, cache_seqlens, seqlen_q, n_heads, n_kv_heads, head_dim=8, dtype=torch.float64):
    """A (cache_batch, max_seq_len, ...) cache, of which the batch reads a shuffled subset of rows."""
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    q, k, v, seqlens = make_inputs(gen, cache_seqlens, seqlen_q, n_heads, n_kv_heads, head_dim, dtype)
    batch = len(cache_seqlens)
    max_seq_len = max(cache_seqlens) + seqlen_q + 3  # room to spare past every row's end
    cache_batch = batch + 3
    rows = rng.sample(range(cache_batch), batch)
    if batch > 1 and rows == sorted(rows):  # make sure the rows are out of order
        rows.reverse()
    cache_batch_idx = torch.tensor(rows, dtype=torch.int32)
    k_cache = torch.randn(cache_batch, max_seq_len, n_kv_heads, head_dim, generator=gen, dtype=dtype)
    v_cache = torch.randn(cache_batch, max_seq_len, n_kv_heads, head_dim, generator=gen, dtype=dtype)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, cache_seqlens=seqlens,
                block_table=None, cache_batch_idx=cache_batch_idx)


def paged_case(seed, cache_seqlens, seqlen_q, n_heads, n_kv_heads, block_size, head_dim=8, dtype=torch.float64,
               extra_columns=2, spare_blocks=3):
    """A (num_blocks, block_size, ...) pool; each row's blocks are shuffled physical blocks, and the block
    table is wider than any row needs, its spare columns pointing at arbitrary (even other rows') blocks."""
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    q, k, v, seqlens = make_inputs(gen, cache_seqlens, seqlen_q, n_heads, n_kv_heads, head_dim, dtype)
    needed = [-(-(n + seqlen_q) // block_size) for n in cache_seqlens]
    num_blocks = sum(needed) + spare_blocks
    physical = list(range(num_blocks))
    rng.shuffle(physical)
    width = max(needed) + extra_columns
    table = []
    for n in needed:
        own, physical = physical[:n], physical[n:]
        table.append(own + [rng.randrange(num_blocks) for _ in range(width - n)])
    k_cache = torch.randn(num_blocks, block_size, n_kv_heads, head_dim, generator=gen, dtype=dtype)
    v_cache = torch.randn(num_blocks, block_size, n_kv_heads, head_dim, generator=gen, dtype=dtype)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, cache_seqlens=seqlens,
                block_table=torch.tensor(table, dtype=torch.int32), cache_batch_idx=None)


def expected_cache(case):
    """The caches as they must be after the call: the new k, v at positions cache_seqlens[b] + i, nothing else."""
    k_cache, v_cache = case["k_cache"].clone(), case["v_cache"].clone()
    table, idx = case["block_table"], case["cache_batch_idx"]
    for b, cached in enumerate(case["cache_seqlens"].tolist()):
        for i in range(case["k"].shape[1]):
            t = cached + i
            if table is not None:
                slot = (int(table[b, t // k_cache.shape[1]]), t % k_cache.shape[1])
            else:
                slot = (b if idx is None else int(idx[b]), t)
            k_cache[slot], v_cache[slot] = case["k"][b, i], case["v"][b, i]
    return k_cache, v_cache


def check(case, causal=True):
    before = {name: case[name].clone() for name in ("k_cache", "v_cache")}
    want = reference(**{**case, **before}, causal=causal)
    want_k_cache, want_v_cache = expected_cache(case)

    got = (naive if case["block_table"] is None else paged).attention_torch(**case, causal=causal)

    assert got.shape == case["q"].shape and got.dtype == case["q"].dtype
    assert_close(got, want, **TOL[case["q"].dtype])
    # The write is exact (a copy), and touches only the new tokens' slots.
    assert torch.equal(case["k_cache"], want_k_cache), "k_cache: wrong slots written, or a new key missing"
    assert torch.equal(case["v_cache"], want_v_cache), "v_cache: wrong slots written, or a new value missing"


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"h{h[0]}kv{h[1]}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"L{'-'.join(map(str, s[0]))}_q{s[1]}")
def test_contiguous_cache(heads, shape):
    check(contiguous_case(hash((tuple(shape[0]), shape[1], heads)) % 2**31, *shape, *heads))


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"h{h[0]}kv{h[1]}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"L{'-'.join(map(str, s[0]))}_q{s[1]}")
@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_paged_cache(heads, shape, block_size):
    check(paged_case(hash((tuple(shape[0]), shape[1], heads, block_size)) % 2**31, *shape, *heads, block_size))


@pytest.mark.parametrize("layout", ["paged", "contiguous"])
@pytest.mark.parametrize("shape", [([0, 7, 33], 1), ([3, 0], 5)], ids=["decode", "prefill"])
def test_float32(layout, shape):
    if layout == "paged":
        check(paged_case(7, *shape, 8, 2, block_size=5, head_dim=16, dtype=torch.float32))
    else:
        check(contiguous_case(7, *shape, 8, 2, head_dim=16, dtype=torch.float32))


def test_paged_and_contiguous_agree():
    """The same tokens laid out in blocks and in rows give the same outputs and the same cached tokens."""
    cache_seqlens, seqlen_q, block_size = [0, 7, 33, 16], 3, 5
    in_blocks = paged_case(11, cache_seqlens, seqlen_q, 8, 2, block_size)
    # Copy each row's cached tokens out of its blocks into a contiguous cache, read through shuffled rows.
    rows = [2, 0, 3, 1]
    max_len = max(cache_seqlens) + seqlen_q
    k_rows = torch.randn(len(rows), max_len, 2, 8, dtype=torch.float64)
    v_rows = torch.randn(len(rows), max_len, 2, 8, dtype=torch.float64)
    table = in_blocks["block_table"]
    for b, cached in enumerate(cache_seqlens):
        for t in range(cached):
            slot = (int(table[b, t // block_size]), t % block_size)
            k_rows[rows[b], t], v_rows[rows[b], t] = in_blocks["k_cache"][slot], in_blocks["v_cache"][slot]
    contiguous = dict(in_blocks, k_cache=k_rows, v_cache=v_rows, block_table=None,
                      cache_batch_idx=torch.tensor(rows, dtype=torch.int32))

    out_paged, out_rows = paged.attention_torch(**in_blocks), naive.attention_torch(**contiguous)

    assert_close(out_paged, out_rows, rtol=1e-12, atol=1e-12)
    for b, cached in enumerate(cache_seqlens):
        for t in range(cached + seqlen_q):
            slot = (int(table[b, t // block_size]), t % block_size)
            assert torch.equal(in_blocks["k_cache"][slot], k_rows[rows[b], t])
            assert torch.equal(in_blocks["v_cache"][slot], v_rows[rows[b], t])


def test_reference_mask_is_bottom_right_aligned():
    """Sanity check of the reference itself: with all-equal keys and distinct values, each query's output is
    the mean of the values it sees, which pins down exactly which keys those are."""
    seqlen_q, cached, head_dim = 3, 2, 4
    q = torch.zeros(1, seqlen_q, 1, head_dim, dtype=torch.float64)
    values = torch.arange(cached + seqlen_q, dtype=torch.float64)[:, None, None].expand(-1, 1, head_dim)
    k_cache = torch.zeros(1, cached + seqlen_q, 1, head_dim, dtype=torch.float64)
    v_cache = values[None].clone()
    k, v = torch.zeros(1, seqlen_q, 1, head_dim, dtype=torch.float64), values[None, cached:].clone()
    seqlens = torch.tensor([cached], dtype=torch.int32)
    causal = reference(q, k_cache, v_cache, k, v, seqlens, causal=True)[0, :, 0, 0]
    full = reference(q, k_cache, v_cache, k, v, seqlens, causal=False)[0, :, 0, 0]
    # query i sees keys 0..cached+i: means of 0..2, 0..3, 0..4
    assert causal.tolist() == [1.0, 1.5, 2.0]
    assert full.tolist() == [2.0, 2.0, 2.0]


# --- Chunks, and the memory they bound ------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 200, 5000], ids=["one row and one query at a time", "a few", "many"])
@pytest.mark.parametrize("layout", ["paged", "contiguous"])
def test_chunks_of_rows_and_queries_change_nothing(layout, chunk, monkeypatch):
    """The result, and what is written to the cache, are the same whatever the chunk size: from one row and one
    query at a time (ATTENTION_CHUNK 1) to the whole call at once."""
    monkeypatch.setattr(naive if layout == "contiguous" else paged, "ATTENTION_CHUNK", chunk)
    for seed, (cache_seqlens, seqlen_q) in enumerate([([0, 7, 33, 16, 2], 1), ([16, 10, 1], 17), ([0], 30)]):
        if layout == "paged":
            check(paged_case(seed, cache_seqlens, seqlen_q, 8, 2, block_size=5))
        else:
            check(contiguous_case(seed, cache_seqlens, seqlen_q, 8, 2))


@pytest.fixture(scope="module")
def llama3_8b_calls():
    """tools/attention_memory.py's four calls at Llama-3-8B's shape: the widest decode step of a replay of
    llama3-paged.py at the README's largest batch, an 8,192-token prefill, and naive's two (7 rows of 8,192)."""
    import attention_memory
    return attention_memory.cases()


@pytest.mark.parametrize("call", ["paged decode", "paged prefill", "naive decode", "naive prefill"])
def test_memory_of_one_call_is_bounded_at_llama3_8b_shape(call, llama3_8b_calls, monkeypatch):
    """The most attention_torch holds at once, its output included, counted as on a GPU: under the 300 MB its
    docstring states, whatever the batch. (The version before chunking held 19.6 GB at the paged decode step, and
    18 GB for the prefill, with the math kernel CUDA picks for a masked grouped-query call.)"""
    import attention_memory
    layout, arguments = llama3_8b_calls[call]
    if call == "paged decode":  # the step the README's batch makes widest: 301 rows, tables 66 blocks of 16 wide
        assert tuple(arguments["block_table"].shape) == (301, 66)
    module = paged if layout == "paged" else naive
    assert "under 300 MB" in module.attention_torch.__doc__
    peak = attention_memory.peak_bytes(module.attention_torch, arguments)
    assert peak < 300e6, f"{call}: {peak / 1e6:.0f} MB"


# --- What a call costs, counted as on a GPU (tools/memory_tally.py's LaunchCount) ------------------------------

def test_the_widest_decode_step_reads_what_its_rows_hold_in_few_launches(llama3_8b_calls):
    """The README's widest decode step: 301 rows holding 41,495 keys, tables 1,056 keys wide. Before its rows were
    sorted by length and chunked, the call ran 345 operators and read 7.7 times the keys its rows hold; each
    operator is a kernel launch on a GPU, which costs the host more than a little padding costs the device."""
    import attention_memory
    _, arguments = llama3_8b_calls["paged decode"]
    held = sum(n + 1 for n in arguments["cache_seqlens"].tolist())  # cached keys and the new one, row by row
    cost = attention_memory.costs(paged.attention_torch, arguments)
    assert cost["launches"] <= 80, f"{cost['launches']} kernel-launching operators"
    assert cost["keys_read"] <= 2 * held, f"read {cost['keys_read']} keys where the rows hold {held}"
    assert cost["host_reads"] == 0


def test_naives_decode_step_runs_few_operators(llama3_8b_calls):
    import attention_memory
    cost = attention_memory.costs(naive.attention_torch, llama3_8b_calls["naive decode"][1])
    assert cost["launches"] <= 100 and cost["host_reads"] == 0, cost


def poisoned(case, value):
    """The case with `value` in every cache slot that no row reads: past each row's length, in blocks that only
    padding columns name (and free blocks), in rows of the cache no request has. flash-attn never reads them."""
    read = torch.zeros(case["k_cache"].shape[:2], dtype=torch.bool)
    seqlen_q = case["q"].shape[1]
    for b, cached in enumerate(case["cache_seqlens"].tolist()):
        for t in range(cached + seqlen_q):
            if case["block_table"] is not None:
                read[int(case["block_table"][b, t // read.shape[1]]), t % read.shape[1]] = True
            else:
                read[int(case["cache_batch_idx"][b]), t] = True
    k_cache, v_cache = case["k_cache"].clone(), case["v_cache"].clone()
    k_cache[~read], v_cache[~read] = value, value
    return dict(case, k_cache=k_cache, v_cache=v_cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("layout", ["paged", "contiguous"])
def test_no_slot_the_kernel_would_not_read_reaches_an_output(layout, value, dtype):
    """A freed block keeps its last holder's K and V, which in float16 may have overflowed: NaN or inf there, or
    in a slot past a row's end, must change no output, since flash-attn never reads those slots (0 * inf is NaN)."""
    for seed, (cache_seqlens, seqlen_q) in enumerate([([0, 7, 33, 16, 2], 1), ([16, 10, 1], 3)]):
        if layout == "paged":
            case = paged_case(seed, cache_seqlens, seqlen_q, 8, 2, block_size=5, head_dim=16, dtype=dtype)
        else:
            case = contiguous_case(seed, cache_seqlens, seqlen_q, 8, 2, head_dim=16, dtype=dtype)
        module = paged if layout == "paged" else naive
        bad = poisoned(case, value)
        want = module.attention_torch(**{**case, "k_cache": case["k_cache"].clone(), "v_cache": case["v_cache"].clone()})
        got = module.attention_torch(**bad)
        assert torch.isfinite(got).all(), f"rows {sorted(set(torch.nonzero(~torch.isfinite(got))[:, 0].tolist()))}"
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["paged", "contiguous"])
def test_error_within_flash_attns_own_tolerance(layout, dtype):
    """flash-attn's test of flash_attn_with_kvcache holds the kernel's error, against attention in float32, to at
    most 3 times that of plain PyTorch attention in the kernel's own dtype (plus 1e-5): the bar the fallback
    must clear where it takes the kernel's place. Here at a head shape of Llama 3's (128), grouped-query."""
    for seed, (cache_seqlens, seqlen_q) in enumerate([([300, 7, 129, 0], 1), ([40, 0], 33)]):
        make = paged_case if layout == "paged" else contiguous_case
        extra = dict(block_size=16) if layout == "paged" else {}
        case = make(seed, cache_seqlens, seqlen_q, 8, 2, head_dim=128, dtype=torch.float32, **extra)
        case = {name: value.to(dtype) if value is not None and value.is_floating_point() else value
                for name, value in case.items()}
        upcast = {name: value.float() if value is not None and value.is_floating_point() else value
                  for name, value in case.items()}
        want = reference(**upcast)
        in_dtype = reference(**{**case, "k_cache": case["k_cache"].clone(), "v_cache": case["v_cache"].clone()})
        got = (paged if layout == "paged" else naive).attention_torch(**case)
        bound = 3 * (in_dtype.float() - want).abs().max().item() + 1e-5
        assert (got.float() - want).abs().max().item() <= bound


def test_forward_reads_the_device_once_per_attention_call_and_nowhere_else(tiny_ckpt, monkeypatch):
    """On a GPU each read of a tensor's value on the host waits for every kernel before it. attention_torch reads
    the rows' lengths once (to sort and chunk them); forward() itself, and flash-attn's path, read nothing."""
    from torch.overrides import TorchFunctionMode
    from conftest import pin_cpu_path
    from memory_tally import LaunchCount

    class HostReads(TorchFunctionMode):  # tolist() of a CPU tensor runs no ATen operator: count the calls here
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            HostReads.calls += func in (torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__int__,
                                        torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__index__)
            return func(*args, **(kwargs or {}))

    for module in (naive, paged):
        pin_cpu_path(monkeypatch, module)
        model = module.load_model(tiny_ckpt)
        model["rope_cos"], model["rope_sin"] = module.rope_tables(model, 64)
        shape = (len(model["layers"]), 3, 64, model["n_kv_heads"], model["head_dim"])
        kv_cache = torch.zeros(shape), torch.zeros(shape)
        tokens, cache_seqlens = torch.tensor([[5], [6], [7]]), torch.tensor([3, 0, 9], dtype=torch.int32)
        rows = dict(block_table=torch.arange(3, dtype=torch.int32)[:, None]) if module is paged else \
            dict(cache_batch_idx=torch.arange(3, dtype=torch.int32))
        HostReads.calls = 0
        with HostReads(), LaunchCount() as count:
            module.forward(model, tokens, cache_seqlens, kv_cache, **rows)
        assert count.host_reads == 0 and HostReads.calls == len(model["layers"]), (module.__name__, HostReads.calls)
        monkeypatch.setattr(module, "attention", lambda q, *args, **kwargs: torch.zeros_like(q))  # reads nothing
        HostReads.calls = 0
        with HostReads(), LaunchCount() as count:
            module.forward(model, tokens, cache_seqlens, kv_cache, **rows)
        assert count.host_reads == 0 and HostReads.calls == 0, (module.__name__, HostReads.calls)
