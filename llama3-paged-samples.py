#!/usr/bin/env python3
"""Llama 3 batch inference with a PAGED KV cache whose blocks parallel SAMPLES of a prompt share.

    python llama3-paged-samples.py 8 --ckpt-dir checkpoints/tiny --ref-lengths --samples 4 --temperature 0.8

Read it next to llama3-paged.py: `diff` shows the lesson. With --samples S a prompt is prefilled once, and its
other S - 1 samples fork from it: they hold the prompt's blocks too. Each block counts its holders (a reference
count) and goes back to the pool when the last lets go. A sample about to write into a block that others hold
first gets a copy of its own (copy-on-write): only the prompt's last, partly filled block is ever copied, and the
full ones stay shared to the end. Without --samples no block is shared: the script does what llama3-paged.py does.
"""
import argparse
import base64
import inspect
import json
import math
import os
import sys
import time
from collections import deque
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
    p.add_argument("--samples", type=int, default=1, help="samples per prompt, sharing the prompt's blocks (default 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling (default 0)")
    args = p.parse_args(argv)
    if args.samples < 1:
        fail(f"--samples must be positive, got {args.samples}")
    if not 0 <= args.temperature < math.inf:
        fail(f"--temperature must be a number >= 0, got {args.temperature}")
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

    Requests share blocks: ref_count[b] counts the requests holding block b, and b goes back to the free list only
    when the last of them lets go. A fork (a prompt's second sample, its third, ...) holds all its parent's blocks.
    Nobody writes into a full block again, so only a shared last block, partly filled, is ever copied: just before
    the first write into it (copy-on-write). The README's section 5 follows one prompt's 4 samples, step by step."""

    def __init__(self, num_blocks, block_size, num_requests, max_blocks_per_request, device):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks = deque(range(num_blocks))  # O(1) to take from and give back to
        self.ref_count = [0] * num_blocks            # requests holding each block; 0: free
        self.shared_blocks = 0  # blocks held by more than one request
        self.saved_blocks = 0   # the sum of ref_count - 1 over the blocks held: what sharing saves
        self.blocks = {}  # request id -> its blocks, in order
        # (num_requests, max_blocks_per_request) int32, where the kernel reads it. It lives from step to step: a
        # block handed out is written into it once, not rebuilt from Python lists in every layer of every step.
        self.block_table = torch.zeros(num_requests, max_blocks_per_request, dtype=torch.int32, device=device)
        self.new_entries = {}  # (row, column) -> block, for block_tables() to write: one entry per slot, the latest

    def blocks_for(self, num_tokens):
        return -(-num_tokens // self.block_size)  # ceil(num_tokens / block_size)

    def can_allocate(self, num_tokens):
        return self.blocks_for(num_tokens) <= len(self.free_blocks)

    def allocate(self, req_id, num_tokens):
        """Blocks for a new request's first num_tokens tokens. Returns its row of the block table: its id."""
        self.blocks[req_id] = []
        for _ in range(self.blocks_for(num_tokens)):
            self.append_block(req_id)
        return req_id

    def fork(self, parent_id, child_id):
        """A new request holding all its parent's blocks. Returns its row of the block table: its id."""
        self.blocks[child_id] = []
        for block in self.blocks[parent_id]:
            self._hold(child_id, block)
        return child_id

    def needs_block(self, req_id, num_tokens):  # does a request of num_tokens tokens need one more block than it has?
        return num_tokens > len(self.blocks[req_id]) * self.block_size

    def needs_copy(self, req_id, num_tokens):
        """Does token num_tokens - 1 go into a block that other requests hold too? Then, before it is written, the
        request needs a copy of that block of its own: the others must not see the write."""
        return not self.needs_block(req_id, num_tokens) and self.ref_count[self.blocks[req_id][-1]] > 1

    def append_block(self, req_id):
        self._hold(req_id, self.free_blocks.popleft())

    def copy_on_write(self, req_id):
        """The request's last block, which others hold too, becomes a free block of its own, for the caller to fill
        from the original before any token is written. The others keep the original. Returns (copy, original)."""
        original = self.blocks[req_id].pop()
        self.append_block(req_id)
        self._release(original)
        return self.blocks[req_id][-1], original

    def free(self, req_id):
        """A finished (or preempted) request lets go of all its blocks at once: those nobody else holds go back."""
        for block in self.blocks.pop(req_id):
            self._release(block)

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
        """Add block to the end of a request's blocks: a free one, or one that others hold too."""
        self.ref_count[block] += 1
        self.shared_blocks += self.ref_count[block] == 2
        self.saved_blocks += self.ref_count[block] > 1
        self.new_entries[req_id, len(self.blocks[req_id])] = block
        self.blocks[req_id].append(block)

    def _release(self, block):
        self.ref_count[block] -= 1
        self.shared_blocks -= self.ref_count[block] == 1
        self.saved_blocks -= self.ref_count[block] > 0
        if not self.ref_count[block]:  # its last holder let go
            self.free_blocks.append(block)


def make_kv_cache(model, budget_tokens, num_requests, args):
    """The pool, K and V, each (n_layers, num_blocks, block_size, n_kv_heads, head_dim), and its manager."""
    max_blocks_per_request = -(-args.max_seq_len // args.block_size)
    num_blocks = min(budget_tokens // args.block_size, num_requests * max_blocks_per_request)  # no more than all can use
    kv_cache = allocate_kv((len(model["layers"]), num_blocks, args.block_size, model["n_kv_heads"], model["head_dim"]))
    return kv_cache, KVCacheManager(num_blocks, args.block_size, num_requests, max_blocks_per_request, DEVICE)


def with_samples(requests, samples):
    """--samples S: each prompt's request S times in a row, ids 0..N*S-1. generate() forks all but the first."""
    return [Request(i * samples + s, r.prompt_ids, r.ref_length, list(r.tokens))
            for i, r in enumerate(requests) for s in range(samples)]


SAMPLE_ROWS = 32  # 16 MB for each float32 (rows, vocab) temporary of pick_tokens, at Llama 3's 128,256 tokens


def pick_tokens(logits, batch, args):
    """Each request's next token from its row of logits (batch, vocab): the likeliest at --temperature 0, else a
    sample. Its random numbers come from a generator seeded by --seed, the prompt, which sample it is and the
    position (as vLLM does for a seeded request), so neither the rest of the batch, nor sharing, nor preemption
    changes them. A few rows at a time, so that the float32 (rows, vocab) temporaries stay small."""
    if args.temperature == 0:
        return logits.argmax(-1).tolist()
    seeds = [hash((args.seed, r.id // args.samples, r.id % args.samples, len(r.tokens))) for r in batch]  # ints: stable
    tokens = []
    for i in range(0, len(batch), SAMPLE_ROWS):
        probs = torch.softmax(logits[i:i + SAMPLE_ROWS].to(torch.float32, copy=True).div_(args.temperature), dim=-1)
        race = torch.empty_like(probs)
        for row, seed in enumerate(seeds[i:i + SAMPLE_ROWS]):
            race[row].exponential_(generator=torch.Generator(probs.device).manual_seed(seed))
        # An exponential race: token t finishes at race[t] / probs[t], first with probability probs[t]. Unlike the
        # inverse of a cumulative sum, the winner barely depends on rounding in the logits.
        tokens += probs.div_(race).argmax(-1).tolist()  # (in place: no third (rows, vocab) tensor)
        del probs, race  # before the next rows' are made
    return tokens


def tokens_to_hold(req, args):
    """A waiting request's tokens, and the one the next decode writes (step 1's rule); but a prompt's first sample,
    not yet prefilled, decodes from the next step on, with its forks, each writing its own token: its tokens only."""
    return len(req.tokens) + (args.samples == 1 or len(req.tokens) > len(req.prompt_ids))


def generate(model, requests, kv_cache, manager, args, stop_ids):
    """Run every request to its end, as many at a time as the blocks allow. Returns the stats."""
    stats = {"timeline": [], "decode_steps": 0, "peak_reserved_tokens": 0, "peak_used_tokens": 0,
             "reserved_at_peak_use": 0, "preemptions": 0, "manager_seconds": 0.0, "shared_blocks_peak": 0,
             "saved_blocks_peak": 0, "peak_unshared_tokens": 0, "cow_copies": 0}
    waiting = deque(requests[::args.samples])  # not started yet (each prompt's first sample), or preempted
    running = []               # in the order they were admitted: the newest is preempted first
    while waiting or running:
        start = time.perf_counter()
        # 1. Grow: a request whose newest token starts a new block gets one now, since this step's decode writes that
        #    token's K and V, at position len(r.tokens) - 1 (room for len(r.tokens) tokens, no + 1), and one whose
        #    newest token goes into a block it shares gets a copy of it. Oldest first: while no block is free, the
        #    newest request is preempted: it lets go of its blocks and waits, to be recomputed. Each one preempted is
        #    newer than every request served before it, so no block handed out here is taken back in the same step.
        preempted = set()  # ids
        for req in list(running):
            while (req.id not in preempted and not manager.free_blocks
                   and (manager.needs_block(req.id, len(req.tokens)) or manager.needs_copy(req.id, len(req.tokens)))):
                victim = running.pop()
                manager.free(victim.id)
                waiting.appendleft(victim)
                preempted.add(victim.id)
                stats["preemptions"] += 1
            if req.id in preempted:
                continue
            if manager.needs_block(req.id, len(req.tokens)):
                manager.append_block(req.id)
            elif manager.needs_copy(req.id, len(req.tokens)):  # not if its other holders copied it (or were
                copy, original = manager.copy_on_write(req.id)  # preempted) first: the last holder keeps the block
                for cache in kv_cache:  # (n_layers, num_blocks, block_size, n_kv_heads, head_dim)
                    cache[:, copy] = cache[:, original]  # int indices: a view copied into a view, no temporary
                stats["cow_copies"] += 1
        # 2. Admit waiting requests, first come first served, while the tokens they must hold fit (tokens_to_hold).
        #    After a preemption the head of waiting is the request just preempted, and fewer blocks are free than it
        #    held: no one is admitted.
        admitted = []
        while waiting and manager.can_allocate(tokens_to_hold(waiting[0], args)):
            req = waiting.popleft()
            req.cache_row = manager.allocate(req.id, tokens_to_hold(req, args))
            admitted.append(req)
        if not running and not admitted:
            fail(f"the KV budget of {manager.num_blocks} blocks of {manager.block_size} tokens cannot hold request "
                 f"{waiting[0].id}, which needs {manager.blocks_for(tokens_to_hold(waiting[0], args))}")
        stats["manager_seconds"] += time.perf_counter() - start
        # 3. Prefill each admitted request whole: its prompt (after a preemption, its prompt and all it had
        #    generated) goes through the model in one pass, filling its blocks and giving its next token. With
        #    --samples, each sample of a prompt draws its own first token from the prompt's logits.
        joining, forks = [], []  # groups' first samples, and (first sample, fork): they join the batch after this step
        for req in admitted:
            family = requests[req.id:req.id + args.samples] if req.tokens == req.prompt_ids else [req]  # its samples
            table = manager.block_tables(torch.tensor([req.cache_row], device=DEVICE), manager.blocks_for(len(req.tokens)))
            tokens = torch.tensor([req.tokens], device=DEVICE)  # all of them new: none cached yet
            logits = forward(model, tokens, torch.zeros(1, dtype=torch.int32, device=DEVICE), kv_cache, block_table=table)
            for r, token in zip(family, pick_tokens(logits.expand(len(family), -1), family, args)):
                append_token(r, token, stop_ids, args.max_seq_len)
            forks += [(req, r) for r in family[1:] if not r.done]
            (joining if len(family) > 1 else running).append(req)
        # 4. One decode step for every running request, in one batch.
        batch = [r for r in running if not r.done]
        if batch:
            tokens, cache_seqlens, rows = batch_inputs(batch)
            start = time.perf_counter()
            table = manager.block_tables(rows, manager.blocks_for(max(len(r.tokens) for r in batch)))  # (batch, width)
            stats["manager_seconds"] += time.perf_counter() - start
            logits = forward(model, tokens, cache_seqlens, kv_cache, block_table=table)
            for req, token in zip(batch, pick_tokens(logits, batch, args)):
                append_token(req, token, stop_ids, args.max_seq_len)
            stats["decode_steps"] += 1
            reserved_tokens = (manager.num_blocks - len(manager.free_blocks)) * manager.block_size
            saved_tokens = manager.saved_blocks * manager.block_size  # each shared block is full after step 1's copies
            # Tokens held: each request's cached ones, less those in blocks it shares, counted once for all holders.
            record_memory(stats, reserved_tokens, sum(len(r.tokens) - 1 for r in running + joining) - saved_tokens,
                          f"{len(running)} running, "
                          f"{len(waiting)} waiting, {sum(r.done for r in requests)} of {len(requests)} finished, "
                          f"{reserved_tokens // manager.block_size} of {manager.num_blocks} blocks in use")
            stats["shared_blocks_peak"] = max(stats["shared_blocks_peak"], manager.shared_blocks)
            stats["saved_blocks_peak"] = max(stats["saved_blocks_peak"], manager.saved_blocks)
            stats["peak_unshared_tokens"] = max(stats["peak_unshared_tokens"], reserved_tokens + saved_tokens)
        # 5. Forks join, right after their first sample (as if admitted just after it), holding its blocks; then a
        #    finished request lets go of all its blocks at once, for waiting requests to take those nobody else holds.
        start = time.perf_counter()
        children = {}
        for parent, child in forks:
            child.cache_row = manager.fork(parent.id, child.id)
            children.setdefault(parent.id, []).append(child)
        running += [r for first in joining for r in (first, *children.get(first.id, []))]
        for req in running:
            if req.done:
                manager.free(req.id)
        running = [r for r in running if not r.done]
        stats["manager_seconds"] += time.perf_counter() - start
    assert len(manager.free_blocks) == manager.num_blocks, "every block comes back once every request is done"
    return stats | {"block_size": manager.block_size, "num_blocks": manager.num_blocks}

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
        prompt_ids = encode_chat(tokenizer, text)
        if len(prompt_ids) >= args.max_seq_len:
            fail(f"prompt {i} has {len(prompt_ids)} tokens: no room to generate within --max-seq-len {args.max_seq_len}")
        requests.append(Request(i, prompt_ids, max(1, ref_length) if args.ref_lengths else None, list(prompt_ids)))
    requests = with_samples(requests, args.samples)
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
    if args.samples > 1:  # what sharing saved, each figure its most at once
        print(f"blocks shared:         {stats['shared_blocks_peak']} at most at once, each held by more than one "
              f"request\nreferences saved:      {stats['saved_blocks_peak']} blocks at most at once, that unshared "
              f"copies would take\npeak KV unshared:      {stats['peak_unshared_tokens']} tokens, were each holder's "
              f"blocks its own\ncopy-on-write copies:  {stats['cow_copies']} blocks")
    if args.json:
        out = [{"prompt_ids": r.prompt_ids, "generated_ids": r.generated_ids, "text": t} for r, t in zip(requests, texts)]
        try:
            Path(args.json).write_text(json.dumps({"stats": stats, "timeline": timeline, "requests": out}))
        except OSError as e:
            fail(f"cannot write {args.json}: {e.strerror}")


if __name__ == "__main__":
    main()
