"""Count the memory a piece of code allocates, on the CPU, as it would on a GPU.

    with MemoryTally(skip_matmuls=True) as tally:
        attention_torch(...)
    tally.peak  # bytes: the most that the tensors made inside held at once

A TorchDispatchMode sees every ATen operator the code runs, after PyTorch has broken composite operators (matmul,
softmax with a dtype, indexing) into the ones a device implements. The storages that operators create inside the
block are counted while they live; storages made before it (weights, the KV cache, the inputs) are not, and an
operator that writes into one in place allocates nothing. The peak is the most counted after any operator, with
that operator's inputs still alive. What a single kernel allocates internally (cuBLAS's workspace, say) is not
seen. These operators, and so these bytes, are the same on a CPU and on CUDA: the code under test uses no fused
kernel whose choice depends on the device.

skip_matmuls=True makes matrix products allocate their output without computing it (the values are garbage), so
that a product of Llama-3-8B's size counts in milliseconds: for a test of memory, not of values.

device="meta" (say) counts only the storages on that device type: the others are neither counted nor held
against the peak.
"""
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

MATMULS = {torch.ops.aten.bmm.default, torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
           torch.ops.aten.baddbmm.default}


def _storages(values):
    return [t.untyped_storage() for t in tree_flatten(values)[0] if isinstance(t, torch.Tensor)]


class MemoryTally(TorchDispatchMode):
    def __init__(self, skip_matmuls=False, device=None):
        super().__init__()
        self.skip_matmuls, self.device = skip_matmuls, device
        self.live = {}  # storage address -> (weak reference, bytes)
        self.outside = {}  # storage address -> weak reference, for storages made before the block
        self.peak = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        for storage in _storages((args, kwargs)):
            if storage._cdata not in self.live and storage._cdata not in self.outside:
                self.outside[storage._cdata] = StorageWeakRef(storage)
        if self.skip_matmuls and func in MATMULS:
            meta = func(*tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, args),
                        **tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, kwargs))
            out = torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype, device=args[-1].device)
        else:
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
