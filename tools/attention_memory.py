"""What the scripts' PyTorch attention (attention_torch) costs in one call at Llama-3-8B's shape (32 query heads, 8
KV heads of 128, bf16), counted on the CPU as it would be on a GPU by tools/memory_tally.py: the operators that would
each launch a kernel (all but views), the keys it reads from the cache against the keys its rows hold, and the most
memory it holds at once (every tensor the call's operators make, while it lives, its output included; not the cache
or the inputs).

Four calls:
  paged decode   llama3-paged.py's widest decode step at the README's largest batch: the first 307 shipped prompts
                 with --ref-lengths, block 16, the 24 GB budget (61,691 tokens), replayed through the script's own
                 generate(); its rows, block table and lengths as that step passes them;
  paged prefill  one prompt of 8,192 tokens into an empty pool, through its block table;
  naive decode   7 rows of 8,192 tokens, all but the last cached (the most a 24 GB card holds naive);
  naive prefill  one prompt of 8,192 tokens into an empty row.

    python tools/attention_memory.py                     # the scripts as they are
    python tools/attention_memory.py --scripts DIR       # llama3-naive.py and llama3-paged.py from DIR instead
    python tools/attention_memory.py --scripts DIR --sdpa-math
        # for a version that calls scaled_dot_product_attention: count what its math kernel allocates, the one
        # CUDA runs for a call with a mask and grouped-query heads (a fused kernel's memory is invisible here)

Tensors are allocated but not computed (MemoryTally's skip_compute), so each call counts in seconds.
"""
import importlib.util
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from cli import ArgumentParser, fail, log, print_table, run_main
from machine import machine
from memory_tally import LaunchCount, MemoryTally
from replay import replay
from scripts import ROOT, prompt_lengths

N_HEADS, N_KV_HEADS, HEAD_DIM, DTYPE = 32, 8, 128, torch.bfloat16  # Llama-3-8B
BUDGET_TOKENS, BLOCK_SIZE, LARGEST_BATCH = 61_691, 16, 307  # the README's largest paged batch under a 24 GB card
NAIVE_ROWS, LONGEST = 7, 8192


def load(path):
    """A script file as a module of its own (another version of a script may sit beside this one)."""
    spec = importlib.util.spec_from_file_location(f"attention_memory_{Path(path).stem.replace('-', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def kv(*shape):
    return torch.zeros(*shape, N_KV_HEADS, HEAD_DIM, dtype=DTYPE)


def new_tokens(batch, seqlen):
    """q, k, v of `seqlen` new tokens for `batch` rows."""
    return (torch.randn(batch, seqlen, N_HEADS, HEAD_DIM, dtype=DTYPE), torch.randn(batch, seqlen, N_KV_HEADS, HEAD_DIM,
            dtype=DTYPE), torch.randn(batch, seqlen, N_KV_HEADS, HEAD_DIM, dtype=DTYPE))


def widest_decode_step():
    """(block_table, cache_seqlens) of the decode step with the largest table (rows x columns) in a replay of
    llama3-paged.py's loop on the first 307 prompts under the 24 GB budget."""
    widest = {}

    def on_decode(step, manager, block_table, cache_seqlens):
        if block_table.numel() > widest.get("size", 0):
            widest.update(size=block_table.numel(), table=block_table.clone(), seqlens=cache_seqlens.clone())
    run = replay(prompt_lengths(n=LARGEST_BATCH), BUDGET_TOKENS, BLOCK_SIZE, on_decode=on_decode)
    if run["failed"] or run["preemptions"]:
        fail(f"the replay of {LARGEST_BATCH} requests should run without preemption: {run['failed'] or 'it preempted'}")
    return widest["table"], widest["seqlens"]


def cases(widest=None):
    """name -> (layout, attention_torch's arguments)."""
    table, seqlens = widest if widest is not None else widest_decode_step()
    pool_blocks = BUDGET_TOKENS // BLOCK_SIZE
    q, k, v = new_tokens(len(table), 1)
    paged_decode = dict(q=q, k_cache=kv(pool_blocks, BLOCK_SIZE), v_cache=kv(pool_blocks, BLOCK_SIZE), k=k, v=v,
                        cache_seqlens=seqlens, block_table=table)
    blocks = LONGEST // BLOCK_SIZE
    q, k, v = new_tokens(1, LONGEST)
    paged_prefill = dict(q=q, k_cache=kv(blocks, BLOCK_SIZE), v_cache=kv(blocks, BLOCK_SIZE), k=k, v=v,
                         cache_seqlens=torch.zeros(1, dtype=torch.int32),
                         block_table=torch.arange(blocks, dtype=torch.int32)[None])
    rows = torch.arange(NAIVE_ROWS, dtype=torch.int32)
    q, k, v = new_tokens(NAIVE_ROWS, 1)
    naive_decode = dict(q=q, k_cache=kv(NAIVE_ROWS, LONGEST), v_cache=kv(NAIVE_ROWS, LONGEST), k=k, v=v,
                        cache_seqlens=torch.full((NAIVE_ROWS,), LONGEST - 1, dtype=torch.int32), cache_batch_idx=rows)
    q, k, v = new_tokens(1, LONGEST)
    naive_prefill = dict(q=q, k_cache=kv(1, LONGEST), v_cache=kv(1, LONGEST), k=k, v=v,
                         cache_seqlens=torch.zeros(1, dtype=torch.int32), cache_batch_idx=rows[:1])
    return {"paged decode": ("paged", paged_decode), "paged prefill": ("paged", paged_prefill),
            "naive decode": ("naive", naive_decode), "naive prefill": ("naive", naive_prefill)}


def peak_bytes(attention_torch, arguments, sdpa_math=False):
    """The most bytes one call holds at once (its output included), counted as on a GPU."""
    return costs(attention_torch, arguments, sdpa_math)["peak_bytes"]


def costs(attention_torch, arguments, sdpa_math=False):
    """One call's peak bytes, its kernel-launching operators, and the keys it reads from k_cache against the keys
    its rows hold (cache_seqlens plus the new tokens), counted as on a GPU."""
    math_only = nullcontext()
    if sdpa_math:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        math_only = sdpa_kernel([SDPBackend.MATH])
    k_cache = arguments["k_cache"]
    with math_only, MemoryTally(skip_compute=True) as tally, LaunchCount(k_cache) as count:
        attention_torch(**arguments, causal=True)
    held = int((arguments["cache_seqlens"] + arguments["q"].shape[1]).sum())
    return {"peak_bytes": tally.peak, "launches": count.launches, "host_reads": count.host_reads,
            "keys_read": count.elements_read_from[0] // k_cache[0, 0].numel(), "keys_held": held}


def main():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scripts", metavar="DIR", default=str(ROOT),
                        help="where llama3-naive.py and llama3-paged.py are (default: this project)")
    parser.add_argument("--sdpa-math", action="store_true",
                        help="run scaled_dot_product_attention with its math kernel, as CUDA does for these calls")
    args = parser.parse_args()
    modules = {}
    for layout in ("naive", "paged"):
        path = Path(args.scripts) / f"llama3-{layout}.py"
        if not path.is_file():
            fail(f"{path} not found")
        modules[layout] = load(path)
    torch.set_num_threads(1)
    log(f"replaying llama3-paged.py on {LARGEST_BATCH} prompts for its widest decode step")
    rows = []
    for name, (layout, arguments) in cases().items():
        if layout == "paged":
            shape = f"{arguments['block_table'].shape[0]} rows x {arguments['block_table'].shape[1] * BLOCK_SIZE} keys"
        else:
            shape = f"{arguments['q'].shape[0]} rows x {arguments['q'].shape[1]} new of {LONGEST} keys"
        log(f"{name}: {shape}")
        cost = costs(modules[layout].attention_torch, arguments, args.sdpa_math)
        rows.append((name, shape, f"{cost['launches']:,}", f"{cost['keys_read']:,}", f"{cost['keys_held']:,}",
                     f"{cost['keys_read'] / cost['keys_held']:.2f}", f"{cost['peak_bytes'] / 2**20:,.0f}",
                     f"{cost['peak_bytes'] / 1e6:,.0f}"))
    print(f"# {machine()}; scripts from {args.scripts}{', SDPA math kernel' if args.sdpa_math else ''}")
    print_table(["call", "shape", "operators", "keys read", "keys held", "read/held", "peak MiB", "peak MB"], rows)


if __name__ == "__main__":
    run_main(main)
