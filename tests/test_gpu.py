"""GPU-only: flash-attn's flash_attn_with_kvcache against the PyTorch fallback and against the CPU stand-in written
from its contract (tests/flash_attn_standin.py), on the same inputs. Skipped on machines without CUDA (and, for the
flash-attn tests, without flash-attn): there the stand-in is what checks the scripts' flash-attn path."""
import pytest
import torch

import flash_attn_standin
from load_scripts import load_script

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
try:
    from flash_attn import flash_attn_with_kvcache
except ImportError:
    flash_attn_with_kvcache = None
flash = pytest.mark.skipif(flash_attn_with_kvcache is None or not torch.cuda.is_available(),
                           reason="needs a CUDA GPU and flash-attn")


def inputs(paged, seqlen, cache_seqlens, n_heads=32, n_kv_heads=8, head_dim=128, block_size=256,
           dtype=torch.bfloat16, device="cuda"):
    g = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)
    batch = len(cache_seqlens)
    lens = torch.tensor(cache_seqlens, dtype=torch.int32, device=device)
    q, k, v = rand(batch, seqlen, n_heads, head_dim), rand(batch, seqlen, n_kv_heads, head_dim), rand(batch, seqlen, n_kv_heads, head_dim)
    blocks_per_seq = -(-(max(cache_seqlens) + seqlen) // block_size)
    if paged:
        num_blocks = batch * blocks_per_seq + 3
        k_cache, v_cache = rand(num_blocks, block_size, n_kv_heads, head_dim), rand(num_blocks, block_size, n_kv_heads, head_dim)
        perm = torch.randperm(num_blocks, generator=g)[:batch * blocks_per_seq]  # shuffled physical blocks
        table = perm.view(batch, blocks_per_seq).to(device, torch.int32)
        return q, k_cache, v_cache, k, v, lens, dict(block_table=table)
    k_cache = rand(batch + 2, blocks_per_seq * block_size, n_kv_heads, head_dim)
    v_cache = rand(batch + 2, blocks_per_seq * block_size, n_kv_heads, head_dim)
    rows = torch.randperm(batch + 2, generator=g)[:batch].to(device, torch.int32)
    return q, k_cache, v_cache, k, v, lens, dict(cache_batch_idx=rows)


CASES = [(True, 1, [0, 300, 1000]), (True, 37, [0, 255, 513]), (False, 1, [5, 700]), (False, 64, [0, 200])]


@flash
@pytest.mark.parametrize("paged,seqlen,cache_seqlens", CASES)
def test_flash_attn_matches_the_fallback(paged, seqlen, cache_seqlens):
    fallback = load_script("paged" if paged else "naive").attention_torch
    q, k_cache, v_cache, k, v, lens, index = inputs(paged, seqlen, cache_seqlens)
    k_cache2, v_cache2 = k_cache.clone(), v_cache.clone()
    expected = fallback(q, k_cache, v_cache, k, v, cache_seqlens=lens, causal=True, **index)
    got = flash_attn_with_kvcache(q, k_cache2, v_cache2, k, v, cache_seqlens=lens, causal=True, **index)
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
    assert torch.equal(k_cache2, k_cache) and torch.equal(v_cache2, v_cache)  # both wrote the same new K and V


@cuda
@pytest.mark.parametrize("paged,seqlen,cache_seqlens", CASES)
def test_fallback_on_cuda_matches_cpu(paged, seqlen, cache_seqlens):
    fallback = load_script("paged" if paged else "naive").attention_torch
    gpu = inputs(paged, seqlen, cache_seqlens, dtype=torch.float32, device="cuda")
    cpu = inputs(paged, seqlen, cache_seqlens, dtype=torch.float32, device="cpu")
    out_gpu = fallback(*gpu[:5], cache_seqlens=gpu[5], **gpu[6])
    out_cpu = fallback(*cpu[:5], cache_seqlens=cpu[5], **cpu[6])
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, atol=1e-4, rtol=1e-4)


@flash
@pytest.mark.parametrize("paged,seqlen,cache_seqlens", CASES)
def test_flash_attn_matches_the_stand_in(paged, seqlen, cache_seqlens):
    """The stand-in accepts what the kernel is given here, and computes and writes what it does."""
    q, k_cache, v_cache, k, v, lens, index = inputs(paged, seqlen, cache_seqlens)
    k_cache2, v_cache2 = k_cache.clone(), v_cache.clone()
    expected = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, causal=True, **index)
    got = flash_attn_standin.flash_attn_with_kvcache(q, k_cache2, v_cache2, k, v, cache_seqlens=lens, causal=True, **index)
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
    assert torch.equal(k_cache2, k_cache) and torch.equal(v_cache2, v_cache)
