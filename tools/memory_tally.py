"""Count the memory a piece of code allocates, on the CPU, as it would on a GPU.

    with MemoryTally(skip_compute=True) as tally:
        attention_torch(...)
    tally.peak  # bytes: the most that the tensors made inside held at once

A TorchDispatchMode sees every ATen operator the code runs, after PyTorch has broken composite operators (matmul,
softmax with a dtype, indexing) into the ones a device implements. The storages that operators create inside the
block are counted while they live; storages made before it (weights, the KV cache, the inputs) are not, and an
operator that writes into one in place allocates nothing. The peak is the most counted after any operator, with
that operator's inputs still alive. What a single kernel allocates internally (cuBLAS's workspace, say) is not
seen. These operators, and so these bytes, are the same on a CPU and on CUDA as long as the code under test calls
no fused kernel whose choice depends on the device (scaled_dot_product_attention does).

skip_compute=True: an operator whose output has more than SKIP_ABOVE elements allocates that output (or, in place,
keeps it) without computing it, so that Llama-3-8B-sized work counts in seconds. The values are then garbage:
for a test of memory, not of values. Views and small operators (lengths, indices) still run for real.

device="meta" (say) counts only the storages on that device type: the others are neither counted nor held
against the peak.
"""
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

SKIP_ABOVE = 2**16  # elements


def _storages(values):
    return [t.untyped_storage() for t in tree_flatten(values)[0] if isinstance(t, torch.Tensor)]


def _to_meta(value):
    if isinstance(value, torch.device):
        return torch.device("meta")
    return value.to("meta") if isinstance(value, torch.Tensor) else value


class MemoryTally(TorchDispatchMode):
    def __init__(self, skip_compute=False, device=None):
        super().__init__()
        self.skip_compute, self.device = skip_compute, device
        self.live = {}     # storage address -> (weak reference, bytes), for storages made inside the block
        self.outside = {}  # storage address -> weak reference, for storages made before it
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for storage in _storages((args, kwargs)):
            if storage._cdata not in self.live and storage._cdata not in self.outside:
                self.outside[storage._cdata] = StorageWeakRef(storage)
        out = self._skipped(func, args, kwargs) if self.skip_compute else None
        if out is None:
            out = func(*args, **kwargs)
        # Forget the storages freed since the last operator, before a new one can take a freed one's address.
        self.live = {key: (ref, size) for key, (ref, size) in self.live.items() if not ref.expired()}
        self.outside = {key: ref for key, ref in self.outside.items() if not ref.expired()}
        for storage in _storages(out):
            key = storage._cdata
            if key not in self.live and key not in self.outside and self.device in (None, storage.device.type):
                self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, sum(size for _, size in self.live.values()))
        return out

    @staticmethod
    def _skipped(func, args, kwargs):
        """The output of a large operator, allocated (or, in place, kept) but not computed; None to run it."""
        returns = func._schema.returns
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if len(returns) != 1 or not str(returns[0].type).startswith("Tensor") or not tensors:
            return None  # several outputs, or a factory (arange, zeros): run it
        alias = returns[0].alias_info
        if alias is not None and not alias.is_write or func is torch.ops.aten._unsafe_view.default:
            return None  # a view: costs nothing, and later operators read through it
        meta = func(*tree_map(_to_meta, args), **tree_map(_to_meta, kwargs))
        if not isinstance(meta, torch.Tensor) or meta.numel() <= SKIP_ABOVE:
            return None
        if alias is not None:  # written in place (or into out=): that tensor, unchanged
            for i, argument in enumerate(func._schema.arguments):
                if argument.alias_info is not None and argument.alias_info.is_write:
                    return args[i] if i < len(args) else kwargs[argument.name]
        return torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype, device=tensors[0].device)


class LaunchCount(TorchDispatchMode):
    """Count the operators a piece of code runs that would each launch a kernel on a GPU: every ATen operator but
    views and reshapes, which only make a new header for the same memory.

        with LaunchCount(k_cache) as count:
            attention_torch(...)
        count.launches, count.host_reads, count.elements_read_from[0]

    host_reads counts the operators that copy a value to the host (item(), int(), bool() of a tensor): on a GPU
    each waits for the device. (tolist() of a CPU tensor reads its memory without an operator, so it isn't seen
    here.) For each tensor given, elements_read_from counts the elements that operators other than in-place ones
    produce from it: what a gather from the KV cache reads."""

    def __init__(self, *watched):
        super().__init__()
        self.watched = [t.untyped_storage()._cdata for t in watched]
        self.launches, self.host_reads, self.elements_read_from = 0, 0, [0] * len(watched)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        returns = func._schema.returns
        view = len(returns) == 1 and returns[0].alias_info is not None and not returns[0].alias_info.is_write
        if view or func is torch.ops.aten._unsafe_view.default:
            return out
        self.launches += 1
        self.host_reads += func is torch.ops.aten._local_scalar_dense.default
        in_place = any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)
        if isinstance(out, torch.Tensor) and not in_place:
            read = {s._cdata for s in _storages((args, kwargs))}
            for i, storage in enumerate(self.watched):
                self.elements_read_from[i] += out.numel() if storage in read else 0
        return out
