#!/usr/bin/env python3
"""Llama 3 batch inference with a paged KV cache whose requests SHARE the blocks of a common PREFIX.

    python llama3-paged-prefix.py 32 --ckpt-dir checkpoints/tiny --ref-lengths --prefix-sharing --system-prompt \
        "You are a careful assistant. Answer in plain words, and say so when you are not sure of something."

Read it next to llama3-paged.py: `diff` shows the lesson. Requests that start alike, as all do after the same system
prompt, compute the same K and V for that start. With --prefix-sharing a full block, once computed, is found again by
its tokens and the block before it; a new request holds the blocks of its prompt's start that are found, counted by
reference, and prefills only the rest. A block nobody holds any more stays findable until its memory is needed.
Without the option it does what llama3-paged.py does.
"""
import argparse
import base64
import inspect
import json
import math
import os
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import tiktoken
import torch
import torch.nn.functional as F

try:
    from flash_attn import flash_attn_with_kvcache  # the real kernel, on a CUDA GPU
except ImportError as e:  # not installed: None; installed but broken (built for another torch, say): check_kernel()
    flash_attn_with_kvcache = None if isinstance(e, ModuleNotFoundError) and e.name == "flash_attn" else e

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The default budget on a CPU, in tokens of K and V: a 24 GB GPU's room beside Llama-3-8B (the README shows the sum).
CPU_KV_BUDGET_TOKENS = (24_564 * 2**20 - 16_060_522_496 - 1536 * 2**20) // (128 * 2**10)  # 61,691


def fail(message):
    """Bad input, or a run that cannot fit: one line on stderr and exit status 1, never a traceback."""
    sys.exit(f"{Path(__file__).name}: error: {message}")


def parse_args(argv):
    budget = "free GPU memory less a step's needs" if DEVICE.type == "cuda" else f"{CPU_KV_BUDGET_TOKENS}, a 24 GB GPU's"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.error = fail  # one line instead of argparse's usage dump
    p.add_argument("n", metavar="N", type=int, help="how many prompts to run together: the first N of --prompts")
    p.add_argument("--ckpt-dir", default="Meta-Llama-3-8B-Instruct/original", help="Meta's checkpoint: params.json, "
                   "consolidated.00.pth, tokenizer.model; RoPE scaled 32x without output.weight, else 8x (default: %(default)s)")
    p.add_argument("--prompts", default=str(Path(__file__).with_name("sharegpt-filtered.json")),
                   help="ShareGPT-style JSON; each entry's first human turn is a prompt (default: sharegpt-filtered.json)")
    p.add_argument("--max-seq-len", type=int, default=8192, help="most tokens per request, prompt and answer (default 8192)")
    p.add_argument("--kv-budget-tokens", type=int, help=f"room for K and V, in tokens (default here: {budget})")
    p.add_argument("--ref-lengths", action="store_true", help="generate as many tokens as each reference answer has")
    p.add_argument("--json", metavar="PATH", help="write the stats and every request's tokens to PATH")
    p.add_argument("--quiet", action="store_true", help="don't print the responses")
    p.add_argument("--block-size", type=int, default=256 if KERNEL == "flash-attn" else 16,
                   help="tokens per KV block (default here: %(default)s; flash-attn's kernel takes multiples of 256)")
    p.add_argument("--system-prompt", metavar="TEXT", help="a system message before every request's user turn")
    p.add_argument("--prefix-sharing", action="store_true",
                   help="reuse the full blocks of a prompt's start that the cache holds already")
    args = p.parse_args(argv)
    if args.n < 1:
        fail(f"N must be positive, got {args.n}")
    if not 2 <= args.max_seq_len <= 131_072:  # Llama 3.1's 128K context; Llama 3 was trained on 8192
        fail(f"--max-seq-len must be from 2 to 131072 (Llama 3.1's context), got {args.max_seq_len}")
    if args.kv_budget_tokens is not None and args.kv_budget_tokens < 1:
        fail(f"--kv-budget-tokens must be positive, got {args.kv_budget_tokens}")
    if args.block_size < 1 or KERNEL == "flash-attn" and args.block_size % 256:  # it reads keys in tiles of 256
        fail(f"--block-size must be positive, and with flash-attn's paged kernel a multiple of 256, got {args.block_size}")
    return args


# --- Tokenizer: tiktoken with Llama 3's vocabulary, split pattern and chat format ---------------------------------
SPLIT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# Llama 3 reserves 256 special ids after its 128,000 BPE tokens; these are the ones we use.
SPECIAL_NAMES = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "<|eot_id|>"}


def load_tokenizer(path):
    try:
        lines = path.read_bytes().splitlines()
        ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}
    except FileNotFoundError:  # most likely no checkpoint at all: say how to make the tiny one, or where it is
        root = Path(__file__).resolve().parent
        tiny, tool = os.path.relpath(root / "checkpoints" / "tiny"), os.path.relpath(root / "tools" / "make_checkpoint.py")
        make = "" if Path(tiny, "params.json").is_file() else f"make a tiny random one with python {tool} {tiny} and "
        fail(f"{path} not found: {make}pass --ckpt-dir {tiny}, or download Meta's weights (see the README)")
    except (OSError, ValueError) as e:
        fail(f"cannot read tokenizer {path}: {e}")
    special = {SPECIAL_NAMES.get(i, f"<|reserved_special_token_{i}|>"): len(ranks) + i for i in range(256)}
    return tiktoken.Encoding(path.name, pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=special)


def encode_chat(tokenizer, user_message, system_message=None):
    """One user turn in Llama 3's chat format (after a system turn, if given), ending with the header that asks
    the assistant to answer. encode_ordinary: text that looks like a special token stays text, as typed."""
    special, text = tokenizer.encode_single_token, tokenizer.encode_ordinary
    header = lambda role: [special("<|start_header_id|>"), *text(role), special("<|end_header_id|>"), *text("\n\n")]
    system = [*header("system"), *text(system_message.strip()), special("<|eot_id|>")] if system_message else []
    return [special("<|begin_of_text|>"), *system, *header("user"), *text(user_message.strip()), special("<|eot_id|>"),
            *header("assistant")]


def load_prompts(path, n, tokenizer):
    """The first user turn of each ShareGPT entry, and the length of its reference answer (first gpt turn)."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        fail(f"cannot read prompts file {path}: {e.strerror}")
    except ValueError as e:
        fail(f"prompts file {path} is not valid JSON: {e}")
    prompts = []
    for entry in entries if isinstance(entries, list) else []:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        turns = [t for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str)] if isinstance(turns, list) else []
        user = next((i for i, t in enumerate(turns) if t.get("from") == "human" and t["value"].strip()), None)
        if user is not None:
            answer = next((t["value"] for t in turns[user + 1:] if t.get("from") == "gpt"), "")
            prompts.append((turns[user]["value"], len(tokenizer.encode_ordinary(answer.strip()))))
        if len(prompts) == n:
            return prompts
    fail(f"asked for {n} prompts but {path} has {len(prompts)} (ShareGPT entries with a human turn)")


# --- The model: Meta's Llama 3 checkpoint format, RMSNorm, RoPE, grouped-query attention, SwiGLU ------------------
def load_model(ckpt_dir):
    ckpt_dir = Path(ckpt_dir)
    try:
        params = json.loads((ckpt_dir / "params.json").read_text())
        weights = torch.load(ckpt_dir / "consolidated.00.pth", map_location="cpu", weights_only=True, mmap=True)
        n_layers, n_heads, dim = params["n_layers"], params["n_heads"], params["dim"]
        names = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
                 "feed_forward.w3", "attention_norm", "ffn_norm")
        layers = [{name.split(".")[-1]: weights[f"layers.{i}.{name}.weight"].to(DEVICE, DTYPE) for name in names}
                  for i in range(n_layers)]
        model = {"n_heads": n_heads, "n_kv_heads": params.get("n_kv_heads") or n_heads, "head_dim": dim // n_heads,
                 "norm_eps": params["norm_eps"], "vocab_size": params["vocab_size"], "layers": layers,
                 "rope_theta": params.get("rope_theta", 500000.0), "use_scaled_rope": params.get("use_scaled_rope", False),
                 "tok_embeddings": weights["tok_embeddings.weight"].to(DEVICE, DTYPE),
                 "norm": weights["norm.weight"].to(DEVICE, DTYPE)}
        # Llama 3.2 1B and 3B have no output.weight: the output layer is the embedding matrix.
        model["output"] = weights["output.weight"].to(DEVICE, DTYPE) if "output.weight" in weights else model["tok_embeddings"]
        model["kv_bytes_per_token"] = 2 * n_layers * model["n_kv_heads"] * model["head_dim"] * DTYPE.itemsize  # 128 KiB: 8B
        return model
    except KeyError as e:
        fail(f"the checkpoint in {ckpt_dir} has no {e}")
    except torch.cuda.OutOfMemoryError:
        fail(f"the weights in {ckpt_dir} do not fit in the GPU's {torch.cuda.mem_get_info(DEVICE)[1] / 1e9:.3g} GB")
    except Exception as e:  # unreadable, truncated or not a checkpoint: torch and json raise many kinds
        fail(f"cannot load the checkpoint in {ckpt_dir}: {str(e).splitlines()[0]}")


def rope_tables(model, max_seq_len):
    """cos and sin of every position's rotation angles: (max_seq_len, head_dim / 2) each."""
    head_dim = model["head_dim"]
    freqs = 1.0 / model["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if model["use_scaled_rope"]:
        # Llama 3.1+: slow down the low frequencies 8x (32x in Llama 3.2 1B and 3B, the only ones whose output layer
        # is the embedding) so 8192-token training stretches to 128K; keep the high ones, blend from 2048 to 8192.
        factor, low, high, trained_len = 32.0 if model["output"] is model["tok_embeddings"] else 8.0, 1.0, 4.0, 8192
        smooth = ((trained_len * freqs / (2 * math.pi) - low) / (high - low)).clamp(0, 1)
        freqs = (1 - smooth) * freqs / factor + smooth * freqs
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), freqs)
    return angles.cos().float().to(DEVICE), angles.sin().float().to(DEVICE)


def rms_norm(x, weight, eps):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def apply_rope(x, cos, sin):
    """Rotate each pair (x[2i], x[2i+1]) of x (batch, seqlen, heads, head_dim) by its angle: Meta pairs neighbours."""
    even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).type_as(x)


def forward(model, tokens, cache_seqlens, kv_cache, block_table=None, cache_batch_idx=None):
    """Run new tokens (batch, seqlen) through the model, their K and V written into kv_cache (k, v: each (n_layers,
    ...)) after the cache_seqlens (batch,) tokens each request has there. Returns the last position's logits."""
    batch, seqlen = tokens.shape
    positions = cache_seqlens[:, None].long() + torch.arange(seqlen, device=tokens.device)  # (batch, seqlen)
    cos, sin = model["rope_cos"][positions], model["rope_sin"][positions]
    h = model["tok_embeddings"][tokens]  # (batch, seqlen, dim)
    for i, layer in enumerate(model["layers"]):
        x = rms_norm(h, layer["attention_norm"], model["norm_eps"])
        q = F.linear(x, layer["wq"]).view(batch, seqlen, model["n_heads"], model["head_dim"])
        k = F.linear(x, layer["wk"]).view(batch, seqlen, model["n_kv_heads"], model["head_dim"])
        v = F.linear(x, layer["wv"]).view(batch, seqlen, model["n_kv_heads"], model["head_dim"])
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention(q, kv_cache[0][i], kv_cache[1][i], k, v, cache_seqlens=cache_seqlens,
                        block_table=block_table, cache_batch_idx=cache_batch_idx, causal=True)
        h = h + F.linear(out.reshape(batch, seqlen, -1), layer["wo"])
        x = rms_norm(h, layer["ffn_norm"], model["norm_eps"])
        h = h + F.linear(F.silu(F.linear(x, layer["w1"])) * F.linear(x, layer["w3"]), layer["w2"])
    return F.linear(rms_norm(h[:, -1], model["norm"], model["norm_eps"]), model["output"])  # in DTYPE: no float copy


ATTENTION_CHUNK = 2**24  # elements: attention_torch gathers K and V, and computes scores, this many at a time


def attention_torch(q, k_cache, v_cache, k, v, cache_seqlens, block_table=None, cache_batch_idx=None, causal=True):
    """flash_attn_with_kvcache in plain PyTorch, for the arguments these scripts pass (always causal): k, v (batch,
    seqlen, n_kv_heads, head_dim) go into the cache at positions cache_seqlens[b] + 0, 1, ..., and q (batch, seqlen,
    n_heads, head_dim) attends, a few rows of similar length at a time: under 300 MB at Llama-3-8B's shape whatever
    the batch, up to 8192 tokens (the tests count it). The cache is a pool, k_cache and v_cache (num_blocks,
    block_size, n_kv_heads, head_dim), read through block_table (batch, blocks_per_seq)."""
    batch, seqlen, n_heads, head_dim = q.shape
    block_size, n_kv_heads = k_cache.shape[1:3]
    positions = cache_seqlens[:, None].long() + torch.arange(seqlen, device=q.device)  # (batch, seqlen)
    blocks, offsets = block_table.gather(1, positions // block_size), positions % block_size  # of each new token
    k_cache[blocks, offsets], v_cache[blocks, offsets] = k, v
    out = q.new_empty(batch, seqlen, n_kv_heads, n_heads // n_kv_heads, head_dim)  # flash-attn's out, heads grouped
    lengths = [n + seqlen for n in cache_seqlens.tolist()]  # keys per row: the call's one host read
    order = sorted(range(batch), key=lengths.__getitem__, reverse=True)  # longest first
    by_length = torch.tensor(order, device=q.device)
    # (batch, n_kv_heads, group, seqlen, head_dim), rows by length: query head h reads KV head h // group
    q = q.view(batch, seqlen, n_kv_heads, -1, head_dim).permute(0, 2, 3, 1, 4)[by_length].mul_(head_dim**-0.5)
    positions, block_table = positions[by_length], block_table[by_length]
    heads = torch.arange(n_kv_heads, device=q.device)[:, None]  # (n_kv_heads, 1), beside a chunk's (rows, 1, blocks)
    start = 0
    while start < batch:  # chunks of rows of similar length, each as many as fit beside its first, the longest
        num_blocks = -(-lengths[order[start]] // block_size)  # whole blocks: the table's columns hold its keys
        end = start + max(1, ATTENTION_CHUNK // (num_blocks * block_size * n_kv_heads * head_dim))
        # (rows, n_kv_heads, num_keys, head_dim): read from the pool seen KV head first, as the matmuls read them
        keys = k_cache.permute(2, 0, 1, 3)[heads, block_table[start:end, None, :num_blocks]].flatten(2, 3)
        values = v_cache.permute(2, 0, 1, 3)[heads, block_table[start:end, None, :num_blocks]].flatten(2, 3)
        attend(q[start:end], keys, values, positions[start:end], out, by_length[start:end])
        start = end
    return out.flatten(2, 3)


def attend(q, keys, values, positions, out, rows):
    """Causal attention of q (rows, n_kv_heads, group, seqlen, head_dim), scaled, over keys and values (rows,
    n_kv_heads, num_keys, head_dim), into out (batch, seqlen, n_kv_heads, group, head_dim) at rows: query i sees keys
    0..positions[row, i] (flash-attn's causal mask, aligned to the bottom right), no slot past the row's length."""
    num_rows, n_kv_heads, group, seqlen, head_dim = q.shape
    key_index = torch.arange(keys.shape[2], device=q.device)
    values.masked_fill_((key_index > positions[:, -1:])[:, None, :, None], 0)  # whatever they held: 0 * inf is NaN
    queries = max(1, ATTENTION_CHUNK // (num_rows * n_kv_heads * group * len(key_index)))  # scores this many at a time
    for i in range(0, seqlen, queries):
        scores = q[:, :, :, i:i + queries].flatten(2, 3) @ keys.transpose(2, 3)  # (rows, n_kv_heads, group * queries, keys)
        hidden = key_index > positions[:, None, None, i:i + queries, None]  # (rows, 1, 1, queries, keys)
        probs = torch.softmax(scores.unflatten(2, (group, -1)).masked_fill_(hidden, -math.inf), dim=-1)  # float32 inside
        part = (probs.flatten(2, 3) @ values).unflatten(2, (group, -1))  # (rows, n_kv_heads, group, queries, head_dim)
        out[:, i:i + queries].index_copy_(0, rows, part.permute(0, 3, 1, 2, 4))


def choose_kernel(flash_attn, capability):
    """Kernel and dtype for a CPU (capability None) or a GPU of compute capability (major, minor): flash-attn 2.5+
    (its kernel takes a block table; or its import's error) on Ampere (8.0) or newer; bfloat16 where native, float16."""
    if capability is None:
        return attention_torch, "pytorch", torch.float32
    if flash_attn and capability >= (8, 0) and (isinstance(flash_attn, ImportError)
                                                or "block_table" in inspect.signature(flash_attn).parameters):
        return flash_attn, "flash-attn", torch.bfloat16
    return attention_torch, "pytorch", torch.bfloat16 if capability >= (8, 0) else torch.float16


attention, KERNEL, DTYPE = choose_kernel(flash_attn_with_kvcache,  # once; forward() calls the kernel by this name
                                         torch.cuda.get_device_capability() if DEVICE.type == "cuda" else None)


def check_kernel():
    """Before the weights load, flash-attn (where chosen) runs once on a tiny input, or one line says why it can't."""
    try:
        if isinstance(attention, ImportError):  # flash_attn is installed, but importing it raised this
            raise attention
        if KERNEL == "flash-attn":  # q, k, v (1, 1, 1, 64): one token of one head, into a pool of one 256-token block
            (q, cache), table = allocate_kv((1, 256, 1, 64)), torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
            attention(q[:, :1], cache, cache.clone(), q[:, :1], q[:, :1], cache_seqlens=table[0], block_table=table)
    except (ImportError, RuntimeError) as e:  # built for another torch or CUDA, or without this GPU's kernels
        fail(f"flash-attn fails {'to import' if e is attention else 'on this GPU'} ({f'{type(e).__name__}: {e}'.splitlines()[0]}): pip uninstall flash-attn to run with the PyTorch attention")


# --- Requests and the KV budget -----------------------------------------------------------------------------------
@dataclass
class Request:
    id: int                   # position in the prompt list
    prompt_ids: list
    ref_length: int | None    # --ref-lengths: generate exactly this many tokens
    tokens: list = field(default_factory=list)  # prompt + generated so far; all but the newest are cached
    cache_row: int = -1       # which row of the cache (or of the block table) belongs to this request
    done: bool = False

    @property
    def generated_ids(self):
        return self.tokens[len(self.prompt_ids):]


def append_token(req, token, stop_ids, max_seq_len):
    req.tokens.append(token)
    stop = len(req.generated_ids) >= req.ref_length if req.ref_length is not None else token in stop_ids
    req.done = stop or len(req.tokens) >= max_seq_len


def gpu_budget_tokens(model, max_seq_len, batch):
    """Free GPU memory with the weights loaded, less the most a step needs beside the pool: 3 FFN-wide and 5 model-wide
    vectors a token for a prefill of max_seq_len or a decode of the batch, attention_torch's chunk, logits, 256 MiB."""
    dim, hidden = model["tok_embeddings"].shape[1], model["layers"][0]["w1"].shape[0]
    step_bytes = (max(max_seq_len, batch) * (3 * hidden + 5 * dim) + batch * model["vocab_size"]) * DTYPE.itemsize
    step_bytes += 16 * ATTENTION_CHUNK + 2**28
    return max(0, torch.cuda.mem_get_info(DEVICE)[0] - step_bytes) // model["kv_bytes_per_token"]


def allocate_kv(shape):
    """K and V, each of `shape`, zeroed; on a CPU, one line instead if the machine hasn't the memory."""
    gb = 2 * math.prod(shape) * DTYPE.itemsize / 1e9
    if DEVICE.type == "cpu" and gb > os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9:  # fail now, not later
        fail(f"the KV cache would take {gb:.3g} GB, more than this machine's memory: lower --kv-budget-tokens")
    return torch.zeros(shape, dtype=DTYPE, device=DEVICE), torch.zeros(shape, dtype=DTYPE, device=DEVICE)


# --- The paged KV cache -------------------------------------------------------------------------------------------
class KVCacheManager:
    """Hands out the blocks of one KV pool as requests grow, and takes them back when they end.

    One manager serves all layers: block b holds block_size tokens of K and V in every layer, so a request's
    blocks are the same in layer 0 and layer 31. Row r of block_table lists request r's blocks in order: its
    token t lives in block block_table[r, t // block_size], at offset t % block_size. flash-attn reads that table
    directly. Entries past a request's last block hold 0, or blocks given back that others may hold now: the
    kernel never reads them, since it stops at the request's cache_seqlens plus its new tokens.

    With prefix sharing (share_prefixes) requests share blocks: ref_count[b] counts the requests holding block b.
    Each full block a prefill writes goes into an index (self.prefix), keyed by its tokens and the key of the block
    before it; a new request holds the full blocks of its prompt's start found there, and needs fewer of its own.
    Nobody writes into a full block again, so sharing one needs no copy. When the last holder of an indexed block
    lets go, the block stays in the index, held by nobody (self.unheld): a request that comes later with the same
    start still finds it. Its memory is taken back only when no free block is left, least recently let go first.
    """

    def __init__(self, num_blocks, block_size, num_requests, max_blocks_per_request, device, share_prefixes=False):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks = deque(range(num_blocks))  # O(1) to take from and give back to
        self.ref_count = [0] * num_blocks  # requests holding each block
        self.shared_blocks = self.saved_blocks = 0  # blocks with ref_count > 1; the sum of ref_count - 1 over those
        self.prefix = {} if share_prefixes else None  # key (see _key) -> a full block
        self.prefix_key = {}     # block -> its key in self.prefix
        self.unheld = OrderedDict()  # indexed blocks nobody holds, let go of longest ago first: block -> None
        self.found_blocks = self.found_unheld_blocks = 0  # blocks found in the index; those found held by nobody
        self.blocks = {}  # request id -> its blocks, in order
        # (num_requests, max_blocks_per_request) int32, where the kernel reads it. It lives from step to step: a
        # block handed out is written into it once, not rebuilt from Python lists in every layer of every step.
        self.block_table = torch.zeros(num_requests, max_blocks_per_request, dtype=torch.int32, device=device)
        self.new_entries = {}  # (row, column) -> block, for block_tables() to write: one entry per slot, the latest

    def blocks_for(self, num_tokens):
        return -(-num_tokens // self.block_size)  # ceil(num_tokens / block_size)

    def num_free(self):  # blocks a request can take: the free ones, and indexed ones that nobody holds
        return len(self.free_blocks) + len(self.unheld)

    def cached_tokens(self, token_ids):
        """How many leading tokens of token_ids the index holds already, in whole blocks."""
        return len(self._cached_prefix(token_ids)) * self.block_size

    def can_allocate(self, num_tokens, token_ids=()):
        """Room for a new request of num_tokens tokens whose prefill writes token_ids? It holds the blocks found in
        the index, and takes the others from the free and unheld blocks, less the unheld ones it holds."""
        found = self._cached_prefix(token_ids)
        return self.blocks_for(num_tokens) - len(found) <= self.num_free() - sum(b in self.unheld for b in found)

    def allocate(self, req_id, num_tokens, token_ids=()):
        """Blocks for a new request's first num_tokens tokens: those of token_ids' start found in the index, then
        new ones. The full blocks of token_ids (the tokens its prefill writes) go into the index. Returns its row of
        the block table: its id."""
        self.blocks[req_id] = []
        for block in self._cached_prefix(token_ids):
            self.found_blocks += 1
            self.found_unheld_blocks += block in self.unheld
            self._hold(req_id, block)
        while len(self.blocks[req_id]) < self.blocks_for(num_tokens):
            self.append_block(req_id)
        key = None
        for j in range(len(token_ids) // self.block_size if self.prefix is not None else 0):
            key = self._key(key, token_ids, j)
            # Indexed already: block j itself, found there; or, for the block of its last token (which a lookup
            # never returns, see _cached_prefix), another request's block of the same tokens, which stays.
            if key not in self.prefix:
                self.prefix[key], self.prefix_key[self.blocks[req_id][j]] = self.blocks[req_id][j], key
        return req_id

    def needs_block(self, req_id, num_tokens):  # does a request of num_tokens tokens need one more block than it has?
        return num_tokens > len(self.blocks[req_id]) * self.block_size

    def append_block(self, req_id):
        if self.free_blocks:
            self._hold(req_id, self.free_blocks.popleft())
        else:  # none free: the unheld indexed block let go of longest ago leaves the index, for its memory
            block, _ = self.unheld.popitem(last=False)
            del self.prefix[self.prefix_key.pop(block)]
            self._hold(req_id, block)

    def free(self, req_id):
        """A finished (or preempted) request lets go of all its blocks at once. Those nobody else holds go back to
        the free list or, if indexed, to the unheld ones. Last block first: a prompt's later blocks are then taken
        back before its first ones, which every request with the same start needs, and which lead to the rest."""
        for block in reversed(self.blocks.pop(req_id)):
            self.ref_count[block] -= 1
            self.shared_blocks -= self.ref_count[block] == 1
            self.saved_blocks -= self.ref_count[block] > 0
            if self.ref_count[block] == 0 and block in self.prefix_key:
                self.unheld[block] = None
            elif self.ref_count[block] == 0:
                self.free_blocks.append(block)

    def block_tables(self, rows, width):
        """The tables of a batch, read from block_table: (batch, width) int32, rows (batch,) in batch order."""
        if self.new_entries:  # one write for all the blocks handed out since the last call (with no index twice:
            # where an indexed write repeats an index, a GPU may keep any of the values, not the last)
            row, column = zip(*self.new_entries)
            block = list(self.new_entries.values())
            self.block_table[row, column] = torch.tensor(block, dtype=torch.int32, device=self.block_table.device)
            self.new_entries.clear()
        return self.block_table[:, :width].index_select(0, rows)

    def _hold(self, req_id, block):
        """Add block to the end of a request's blocks: a free one, or one found in the index."""
        self.ref_count[block] += 1
        self.shared_blocks += self.ref_count[block] == 2
        self.saved_blocks += self.ref_count[block] > 1
        self.unheld.pop(block, None)  # found in the index, held by nobody until now
        self.new_entries[req_id, len(self.blocks[req_id])] = block
        self.blocks[req_id].append(block)

    def _cached_prefix(self, token_ids):
        """The blocks holding token_ids' leading full blocks, as far as the index has them; never the one with the
        last token, which a prefill must compute to give the next token's logits."""
        blocks, key = [], None
        while self.prefix is not None and len(blocks) < (len(token_ids) - 1) // self.block_size:
            key = self._key(key, token_ids, len(blocks))
            if key not in self.prefix:
                break
            blocks.append(self.prefix[key])
        return blocks

    def _key(self, previous_key, token_ids, j):
        """Block j of token_ids: its tokens, and the key of the block before it, which stands for all the tokens
        before (a block's K and V depend on every one of them). Made of tokens, not block numbers, a key stays
        true when the memory of a block before is taken back and holds other tokens."""
        return previous_key, tuple(token_ids[j * self.block_size:(j + 1) * self.block_size])


def make_kv_cache(model, budget_tokens, num_requests, args):
    """The pool, K and V, each (n_layers, num_blocks, block_size, n_kv_heads, head_dim), and its manager."""
    max_blocks_per_request = -(-args.max_seq_len // args.block_size)
    num_blocks = min(budget_tokens // args.block_size, num_requests * max_blocks_per_request)  # no more than all can use
    kv_cache = allocate_kv((len(model["layers"]), num_blocks, args.block_size, model["n_kv_heads"], model["head_dim"]))
    return kv_cache, KVCacheManager(num_blocks, args.block_size, num_requests, max_blocks_per_request, DEVICE,
                                    args.prefix_sharing)


def generate(model, requests, kv_cache, manager, args, stop_ids):
    """Run every request to its end, as many at a time as the blocks allow. Returns the stats."""
    stats = {"timeline": [], "decode_steps": 0, "peak_reserved_tokens": 0, "peak_used_tokens": 0,
             "reserved_at_peak_use": 0, "preemptions": 0, "manager_seconds": 0.0, "shared_blocks_peak": 0,
             "saved_blocks_peak": 0}
    waiting = deque(requests)  # not started yet, or preempted and waiting to come back
    running = []               # in the order they were admitted: the newest is preempted first
    while waiting or running:
        start = time.perf_counter()
        # 1. Grow: a request whose newest token starts a new block gets one now, since this step's decode writes that
        #    token's K and V, at position len(r.tokens) - 1 (room for len(r.tokens) tokens, no + 1). While too few
        #    blocks are free, the newest request is preempted: it gives its blocks back and waits, to be recomputed.
        growing = [r for r in running if manager.needs_block(r.id, len(r.tokens))]
        preempted = len(growing) > manager.num_free()
        while len(growing) > manager.num_free():
            victim = running.pop()
            if growing[-1] is victim:
                growing.pop()
            manager.free(victim.id)
            waiting.appendleft(victim)
            stats["preemptions"] += 1
        for req in growing:
            manager.append_block(req.id)
        # 2. Admit waiting requests, first come first served, while their tokens fit with the one their prefill adds,
        #    which this step's decode writes (+ 1), less the blocks found in the index. Not right after a preemption:
        #    the request just preempted, at the head of waiting, may find its own blocks there and come straight back.
        admitted = []
        while waiting and not preempted and manager.can_allocate(len(waiting[0].tokens) + 1, waiting[0].tokens):
            req = waiting.popleft()
            found = manager.cached_tokens(req.tokens)
            req.cache_row = manager.allocate(req.id, len(req.tokens) + 1, req.tokens)
            admitted.append((req, found))
        if not running and not admitted:
            fail(f"the KV budget of {manager.num_blocks} blocks of {manager.block_size} tokens cannot hold request "
                 f"{waiting[0].id}, which needs {manager.blocks_for(len(waiting[0].tokens) + 1)}")
        stats["manager_seconds"] += time.perf_counter() - start
        # 3. Prefill each admitted request whole, less the tokens of the blocks found: its prompt (after a
        #    preemption, its prompt and all it had generated) goes through the model in one pass, filling its blocks
        #    and giving its next token.
        for req, found in admitted:
            table = manager.block_tables(torch.tensor([req.cache_row], device=DEVICE), manager.blocks_for(len(req.tokens)))
            tokens = torch.tensor([req.tokens[found:]], device=DEVICE)  # those after the first `found`, cached already
            logits = forward(model, tokens, torch.tensor([found], dtype=torch.int32, device=DEVICE), kv_cache,
                             block_table=table)
            append_token(req, logits.argmax(-1).item(), stop_ids, args.max_seq_len)
            running.append(req)
        # 4. One decode step for every running request, in one batch.
        batch = [r for r in running if not r.done]
        if batch:
            tokens, cache_seqlens, rows = batch_inputs(batch)
            start = time.perf_counter()
            table = manager.block_tables(rows, manager.blocks_for(max(len(r.tokens) for r in batch)))  # (batch, width)
            stats["manager_seconds"] += time.perf_counter() - start
            logits = forward(model, tokens, cache_seqlens, kv_cache, block_table=table)
            for req, token in zip(batch, logits.argmax(-1).tolist()):
                append_token(req, token, stop_ids, args.max_seq_len)
            stats["decode_steps"] += 1
            # Reserved: the blocks requests hold. Tokens held: each request's cached ones, a shared block's once.
            reserved_tokens = (manager.num_blocks - manager.num_free()) * manager.block_size
            used_tokens = sum(len(r.tokens) - 1 for r in running) - manager.saved_blocks * manager.block_size
            record_memory(stats, reserved_tokens, used_tokens, f"{len(running)} running, "
                          f"{len(waiting)} waiting, {sum(r.done for r in requests)} of {len(requests)} finished, "
                          f"{reserved_tokens // manager.block_size} of {manager.num_blocks} blocks in use")
            stats["shared_blocks_peak"] = max(stats["shared_blocks_peak"], manager.shared_blocks)
            stats["saved_blocks_peak"] = max(stats["saved_blocks_peak"], manager.saved_blocks)
        # 5. Free: a finished request gives all its blocks back at once, for waiting requests to take.
        start = time.perf_counter()
        for req in running:
            if req.done:
                manager.free(req.id)
        running = [r for r in running if not r.done]
        stats["manager_seconds"] += time.perf_counter() - start
    assert manager.num_free() == manager.num_blocks, "every block comes back once every request is done"
    return stats | {"block_size": manager.block_size, "num_blocks": manager.num_blocks,
                    "prefix_hit_tokens": manager.found_blocks * manager.block_size,
                    "prefix_unheld_hit_tokens": manager.found_unheld_blocks * manager.block_size}

# --- Shared by the three scripts: batch inputs and the report -----------------------------------------------------
def batch_inputs(batch):
    """Each request's newest token (batch, 1), its cached token count (batch,) and its cache row (batch,)."""
    tokens = torch.tensor([[r.tokens[-1]] for r in batch], device=DEVICE)
    cache_seqlens = torch.tensor([len(r.tokens) - 1 for r in batch], dtype=torch.int32, device=DEVICE)
    rows = torch.tensor([r.cache_row for r in batch], dtype=torch.int32, device=DEVICE)
    return tokens, cache_seqlens, rows


def record_memory(stats, reserved_tokens, used_tokens, progress):  # after each decode step
    stats["timeline"].append((reserved_tokens, used_tokens))
    stats["peak_reserved_tokens"] = max(stats["peak_reserved_tokens"], reserved_tokens)
    if used_tokens > stats["peak_used_tokens"]:
        stats["peak_used_tokens"], stats["reserved_at_peak_use"] = used_tokens, reserved_tokens
    if sys.stderr.isatty():  # one line, rewritten in place (\033[K clears the rest), to watch the batch grow and shrink
        print(f"\rdecode step {stats['decode_steps']}: {progress}\033[K", end="", file=sys.stderr, flush=True)


def report(stats, name):
    gb = lambda tokens: f"{tokens * stats['kv_bytes_per_token'] / 1e9:.3g} GB"
    wasted = stats["reserved_at_peak_use"] - stats["peak_used_tokens"]
    lines = [
        f"=== {name} ===",
        f"requests:              {stats['requests']} ({stats['finished']} finished)",
        f"generated tokens:      {stats['generated_tokens']} in {stats['wall_seconds']:.2f} s "
        f"({stats['generated_tokens'] / stats['wall_seconds']:.1f} tokens/s, {stats['decode_steps']} decode steps)",
        f"attention kernel:      {stats['kernel']}, {stats['dtype']}",
        f"KV budget:             {stats['kv_budget_tokens']} tokens ({gb(stats['kv_budget_tokens'])})",
        f"peak KV reserved:      {stats['peak_reserved_tokens']} tokens ({gb(stats['peak_reserved_tokens'])})",
        f"peak KV holding tokens: {stats['peak_used_tokens']} tokens ({gb(stats['peak_used_tokens'])})",
        # The original's label. Naive: what the rows reserved and never wrote; paged: the empty ends of last blocks.
        f"Fragmented Memory: {gb(wasted)} ({100 * wasted / max(1, stats['reserved_at_peak_use']):.1f}% of the KV "
        f"reserved when the most tokens were held)"]
    if "block_size" in stats:  # the paged scripts
        lines += [f"blocks:                {stats['num_blocks']} of {stats['block_size']} tokens, "
                  f"{stats['peak_reserved_tokens'] // stats['block_size']} used at the peak",
                  f"preemptions:           {stats['preemptions']}",
                  f"cache manager time:    {stats['manager_seconds']:.4f} s "
                  f"({1e6 * stats['manager_seconds'] / max(1, stats['decode_steps']):.1f} us per decode step)"]
    if DEVICE.type == "cuda":  # the most this run held at once: weights, KV pool and a step's tensors
        lines.append(f"peak GPU memory:       {torch.cuda.max_memory_allocated(DEVICE) / 1e9:.3g} GB of the GPU's "
                     f"{torch.cuda.mem_get_info(DEVICE)[1] / 1e9:.3g} GB")
    print("\n".join(lines))


def main(argv=None):
    args = parse_args(argv)
    check_kernel()
    tokenizer = load_tokenizer(Path(args.ckpt_dir) / "tokenizer.model")
    requests = []
    for i, (text, ref_length) in enumerate(load_prompts(args.prompts, args.n, tokenizer)):
        prompt_ids = encode_chat(tokenizer, text, args.system_prompt)
        if len(prompt_ids) >= args.max_seq_len:
            fail(f"prompt {i} has {len(prompt_ids)} tokens: no room to generate within --max-seq-len {args.max_seq_len}")
        requests.append(Request(i, prompt_ids, max(1, ref_length) if args.ref_lengths else None, list(prompt_ids)))
    stop_ids = {tokenizer.encode_single_token("<|eot_id|>"), tokenizer.encode_single_token("<|end_of_text|>")}
    model = load_model(args.ckpt_dir)
    if model["vocab_size"] < tokenizer.n_vocab:
        fail(f"the checkpoint's vocab_size {model['vocab_size']} is smaller than the tokenizer's {tokenizer.n_vocab}")
    model["rope_cos"], model["rope_sin"] = rope_tables(model, args.max_seq_len)
    budget_tokens = args.kv_budget_tokens or (gpu_budget_tokens(model, args.max_seq_len, len(requests))
                                              if DEVICE.type == "cuda" else CPU_KV_BUDGET_TOKENS)
    try:
        kv_cache, manager = make_kv_cache(model, budget_tokens, len(requests), args)
        start = time.perf_counter()
        stats = generate(model, requests, kv_cache, manager, args, stop_ids)
    except torch.cuda.OutOfMemoryError as e:  # one line, as for bad input; any other error is a bug: its traceback
        fail(f"the run stopped on the GPU: {str(e).splitlines()[0]}")
    if sys.stderr.isatty():
        print(file=sys.stderr)  # after the progress line
    stats.update(requests=len(requests), finished=sum(r.done for r in requests), kernel=KERNEL, dtype=str(DTYPE)[6:],
                 generated_tokens=sum(len(r.generated_ids) for r in requests), wall_seconds=time.perf_counter() - start,
                 kv_budget_tokens=budget_tokens, kv_bytes_per_token=model["kv_bytes_per_token"])
    timeline = {"reserved_tokens": [r for r, _ in stats["timeline"]], "used_tokens": [u for _, u in stats.pop("timeline")]}
    texts = [tokenizer.decode(r.generated_ids[:-1] if r.tokens[-1] in stop_ids else r.generated_ids) for r in requests]
    for req, text in zip(requests, [] if args.quiet else texts):
        print(f"--- request {req.id}: {len(req.prompt_ids)} prompt tokens, {len(req.generated_ids)} generated ---\n{text}")
    report(stats, Path(__file__).name)
    if args.prefix_sharing:
        print(f"prefix cache hits:     {stats['prefix_hit_tokens']} tokens found through the prefix index, "
              f"{stats['prefix_unheld_hit_tokens']} of them in blocks no request held\n"
              f"blocks shared:         {stats['shared_blocks_peak']} at most at once, each held by more than one "
              f"request\nreferences saved:      {stats['saved_blocks_peak']} blocks at most at once, that unshared "
              "copies would take")
    if args.json:
        out = [{"prompt_ids": r.prompt_ids, "generated_ids": r.generated_ids, "text": t} for r, t in zip(requests, texts)]
        try:
            Path(args.json).write_text(json.dumps({"stats": stats, "timeline": timeline, "requests": out}))
        except OSError as e:
            fail(f"cannot write {args.json}: {e.strerror}")


if __name__ == "__main__":
    main()
