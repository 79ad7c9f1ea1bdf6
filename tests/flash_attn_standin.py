"""A CPU stand-in for flash-attn's flash_attn_with_kvcache, for testing code that calls the kernel where no
GPU (or no flash-attn) is available.

It is written from the kernel's contract in flash-attn 2.8.3.post2 (the latest release on PyPI, read from its
sdist), not from its code:
  api.py:N  the line of flash_attn/flash_attn_interface.py: the docstring and Python wrapper of
            flash_attn_with_kvcache (lines 1464-1606);
  cpp:N     the line of csrc/flash_attn/flash_api.cpp: the TORCH_CHECKs of its C++ entry point
            mha_fwd_kvcache (lines 1203-1475);
  block_info.h:N  csrc/flash_attn/src/block_info.h: how many keys each row attends to.
It raises AssertionError, with a message naming the rule, for every call the kernel refuses, and for every call
it would get wrong without a word: reading or writing outside the cache, or a slot written by this call that
the kernel would read elsewhere at the same time (a race between its thread blocks). Arguments the project never
uses (rotary, alibi, local windows, softcap, leftpad, returning the LSE) are refused as not modelled.

Otherwise it does what the kernel does: writes k and v into the cache in place at positions cache_seqlens[b] + i,
then attends densely in float32 over each row's first cache_seqlens[b] + seqlen_new tokens, and returns a tensor
shaped and typed like q. It is slow, and meant to be read.
"""
import torch


def _require(condition, rule):
    if not condition:  # not `assert`, which python -O would strip
        raise AssertionError(f"flash_attn_with_kvcache: {rule}")


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    # --- Features the project never uses: refused rather than modelled. rotary_interleaved only matters with rotary.
    for name, value in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin), ("cache_leftpad", cache_leftpad),
                        ("alibi_slopes", alibi_slopes)):
        _require(value is None, f"{name}: the stand-in does not model it")
    _require(tuple(window_size) == (-1, -1), "window_size (local attention): the stand-in does not model it")
    _require(not softcap > 0, "softcap: the stand-in does not model it (api.py:1552: anything > 0 activates it)")
    _require(not return_softmax_lse, "return_softmax_lse: the stand-in does not model it")
    _require(num_splits <= 128, "num_splits > 128 not supported (cpp:325)")  # a speed knob; < 1 means a heuristic

    # --- The Python wrapper (api.py:1572-1583). It copies q, k, v and block_table to a contiguous last dimension
    # itself (api.py:1574, 1583), so only the caches, which it must update in place, have to come that way.
    _require(k_cache.stride(-1) == 1, "k_cache must have contiguous last dimension (api.py:1572)")
    _require(v_cache.stride(-1) == 1, "v_cache must have contiguous last dimension (api.py:1573)")
    if isinstance(cache_seqlens, int):  # api.py:1577-1580: one length for each of k_cache's first dimension
        cache_seqlens = torch.full((k_cache.shape[0],), cache_seqlens, dtype=torch.int32, device=k_cache.device)

    # --- Types and devices.
    _require(q.dtype in (torch.float16, torch.bfloat16), f"q must be fp16 or bf16, got {q.dtype} (cpp:1233)")
    given = {name: t for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v),
             ("cache_seqlens", cache_seqlens), ("block_table", block_table), ("cache_batch_idx", cache_batch_idx))
             if t is not None}
    for name, t in given.items():
        if name in ("cache_seqlens", "block_table", "cache_batch_idx"):
            _require(t.dtype == torch.int32, f"{name} must have dtype int32, got {t.dtype} (cpp:1250, 1388, 1435)")
        else:
            _require(t.dtype == q.dtype, f"{name} must have q's dtype {q.dtype}, got {t.dtype} (cpp:1235-1236, 1359-1360)")
        # The kernel: each must be on CUDA (CHECK_DEVICE, cpp:1238, 1249, 1361, 1389, 1433). Here: on q's device.
        _require(t.device == q.device, f"{name} must be on q's device {q.device}, not {t.device}")

    # --- Shapes.
    _require(q.dim() == 4 and k_cache.dim() == 4, "q and k_cache must be 4-D (api.py:1528-1530)")
    batch, seqlen_q, n_heads, head_dim = q.shape
    paged = block_table is not None
    if paged:
        _require(cache_batch_idx is None, "Paged KVcache does not support cache_batch_idx (cpp:1247)")
        num_blocks, block_size = k_cache.shape[:2]
        _require(block_size % 256 == 0, f"Paged KV cache block size must be divisible by 256, got {block_size} "
                                        "(cpp:1264; api.py:1531)")
        _require(block_table.dim() == 2 and block_table.shape[0] == batch,
                 f"block_table must have shape (batch_size={batch}, max_num_blocks_per_seq), got "
                 f"{tuple(block_table.shape)} (cpp:1296)")
        seqlen_k = block_table.shape[1] * block_size  # cpp:1265
    else:
        seqlen_k = k_cache.shape[1]
    n_kv_heads = k_cache.shape[2]
    _require(batch > 0, "batch size must be positive (cpp:1268)")
    _require(head_dim <= 256, f"FlashAttention forward only supports head dimension at most 256, got {head_dim} (cpp:1269)")
    _require(n_heads % n_kv_heads == 0, f"Number of heads in key/value ({n_kv_heads}) must divide number of heads "
                                        f"in query ({n_heads}) (cpp:1270)")
    _require(k_cache.shape[3] == head_dim and v_cache.shape == k_cache.shape,
             f"k_cache and v_cache must both have shape (..., nheads_k, headdim={head_dim}), got "
             f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)} (cpp:1291-1295)")
    if k is not None:
        _require(v is not None, "If key is supplied, value must also be passed in (cpp:1354)")
        _require(cache_seqlens is not None, "If key is supplied, seqlens_k must also be passed in (cpp:1355)")
        # cpp:1278: a decode step with grouped-query heads runs each KV head's query heads as its queries.
        swapped = seqlen_q == 1 and n_heads > n_kv_heads and head_dim % 8 == 0
        _require((n_heads // n_kv_heads if swapped else seqlen_q) <= seqlen_k,
                 "If key is supplied, it must have seqlen <= the seqlen of the KV cache (cpp:1356)")
        _require(k.dim() == 4 and k.shape[0] == batch and k.shape[2:] == (n_kv_heads, head_dim) and v.shape == k.shape,
                 f"k and v must both have shape (batch_size={batch}, seqlen_new, nheads_k={n_kv_heads}, "
                 f"headdim={head_dim}), got {tuple(k.shape)} and {tuple(v.shape)} (cpp:1365-1366)")
    else:
        _require(v is None, "v given without k: the kernel would ignore it (cpp:1353 reads v only with k)")
    if cache_seqlens is not None:
        _require(cache_seqlens.is_contiguous(), "seqlens_k must be contiguous (cpp:1390)")
        _require(cache_seqlens.shape == (batch,), f"cache_seqlens must have shape (batch_size={batch},), got "
                                                  f"{tuple(cache_seqlens.shape)} (cpp:1391)")
    if cache_batch_idx is not None:
        _require(cache_batch_idx.shape == (batch,), f"cache_batch_idx must have shape (batch_size={batch},), got "
                                                    f"{tuple(cache_batch_idx.shape)} (api.py:1542)")

    # --- The values: what the kernel can't check, and would read or write out of bounds.
    seqlen_new = 0 if k is None else k.shape[1]
    cached = [seqlen_k] * batch if cache_seqlens is None else cache_seqlens.tolist()  # None: the whole cache (block_info.h:23)
    lengths = [c + seqlen_new for c in cached]  # the keys row b attends to (block_info.h:24, actual_seqlen_k)
    _require(min(cached) >= 0, f"cache_seqlens must not be negative, got {cached}")
    rows = cache_batch_idx.tolist() if cache_batch_idx is not None else list(range(batch))  # api.py:1542-1543
    if not paged:
        _require(all(0 <= r < k_cache.shape[0] for r in rows),
                 f"cache_batch_idx {rows} must index the cache's {k_cache.shape[0]} rows (api.py:1542)")
    for b, length in enumerate(lengths):
        if paged:
            _require(length <= seqlen_k, f"block_table row {b} must cover cache_seqlens[b] + seqlen_new = {length} "
                                         f"tokens, but its {block_table.shape[1]} blocks of {block_size} hold {seqlen_k}")
            used = block_table[b, :-(-length // block_size)]  # the entries the kernel reads; the rest may hold anything
            _require(((used >= 0) & (used < num_blocks)).all(),
                     f"block_table row {b} names a block outside the pool [0, {num_blocks}): {used.tolist()}")
        else:
            _require(length <= seqlen_k, f"row {b}: cache_seqlens[b] + seqlen_new = {length} goes past the end of the "
                                         f"cache row ({seqlen_k} tokens): the cache must be large enough (api.py:1491)")

    def slots(b, positions):
        """Where row b's tokens at `positions` live: (index into k_cache's dim 0, index into its dim 1)."""
        if paged:
            return block_table[b, positions // block_size].long(), positions % block_size
        return torch.full_like(positions, rows[b]), positions

    # A slot this call writes must be read by its own row only, at one position: the kernel's thread blocks for
    # different rows run at once, so another reader might see the old value or the new (api.py:1544-1545).
    if k is not None:
        def keys(b, start):
            block, offset = slots(b, torch.arange(start, lengths[b], device=q.device))
            return block * k_cache.shape[1] + offset
        read = torch.cat([keys(b, 0) for b in range(batch)])
        unique, count = read.unique(return_counts=True)
        written = torch.cat([keys(b, cached[b]) for b in range(batch)])
        _require(not torch.isin(written, unique[count > 1]).any(),
                 "a cache slot written by the new k/v is also read by another row, or at another position of the "
                 "same row: the kernel's writes and reads of it would race")

    # --- Accepted: append the new tokens in place, then attend.
    if k is not None:
        for b in range(batch):
            block, offset = slots(b, torch.arange(cached[b], lengths[b], device=q.device))
            k_cache[block, offset], v_cache[block, offset] = k[b], v[b]
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale  # api.py:1548-1549
    group = n_heads // n_kv_heads  # query head h reads KV head h // group (api.py:1504-1507)
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for b in range(batch):
        block, offset = slots(b, torch.arange(lengths[b], device=q.device))
        keys_b = k_cache[block, offset].float().repeat_interleave(group, dim=1)  # (length, n_heads, head_dim)
        values_b = v_cache[block, offset].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("ihd,jhd->hij", q[b].float(), keys_b) * scale  # (n_heads, seqlen_q, length)
        query, key = torch.arange(seqlen_q, device=q.device), torch.arange(lengths[b], device=q.device)
        # causal: aligned to the bottom right, query i sees key j <= i + length - seqlen_q (api.py:1509-1518)
        hidden = key[None, :] > query[:, None] + lengths[b] - seqlen_q if causal else key[None, :] < 0
        probs = scores.masked_fill(hidden, float("-inf")).softmax(-1)
        probs = probs.masked_fill(hidden, 0.0)  # a query that sees no key gives zeros, not NaN (api.py:1519)
        out[b] = torch.einsum("hij,jhd->ihd", probs, values_b)
    return out.to(q.dtype)
