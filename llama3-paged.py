#!/usr/bin/env python3
"""Llama 3 batch inference with a PAGED KV cache.

    python llama3-paged.py 49      # run the first 49 ShareGPT prompts together

Read this next to llama3-naive.py: the two files share every line except the KV cache. The naive
script reserves max_seq_len tokens of K and V for every request before it starts. Most requests
finish far sooner, so most of that memory is never written, yet no other request can use it.
Here the cache is a pool of small fixed-size blocks. A request takes a block when its tokens fill
the last one, and gives all of them back the moment it finishes, so the memory in use follows the
tokens actually held and many more requests fit in the same budget.

Once blocks are counted, requests can share them: --samples and --beams fork a request's blocks
(copy-on-write), --prefix-sharing reuses the blocks of a prompt start already cached (with
--system-prompt), and --preempt swap parks a preempted request's blocks in host memory. Without
these options no block is ever shared.
"""
import argparse
import base64
import json
import math
import os
import sys
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

import tiktoken
import torch
import torch.nn.functional as F

try:
    from flash_attn import flash_attn_with_kvcache
except ImportError:
    flash_attn_with_kvcache = None

MAX_SEQ_LEN_LIMIT = 131_072  # Llama 3.1's 128K context; Llama 3 was trained on 8192
CUDA_HEADROOM_BYTES = 1536 * 2**20  # left free on a GPU for activations and the CUDA context
# The default budget on a CPU, in tokens of K and V: what a 24 GB RTX 4090 (24,564 MiB) has left beside
# Llama-3-8B's bf16 weights (16,060,522,496 bytes) and the headroom, at 128 KiB per token. It holds
# 7 naive requests of 8192 tokens, not 8.
CPU_KV_BUDGET_TOKENS = (24_564 * 2**20 - 16_060_522_496 - CUDA_HEADROOM_BYTES) // (128 * 2**10)  # 61,691


def fail(message):
    """Bad input, or a run that cannot fit: one line on stderr and exit status 1, never a traceback."""
    sys.exit(f"{Path(__file__).name}: error: {message}")


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage dump
        fail(message)


def parse_args(argv):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("n", metavar="N", help="number of prompts to run together")
    p.add_argument("--ckpt-dir", default="Meta-Llama-3-8B-Instruct/original")
    p.add_argument("--prompts", default=str(Path(__file__).with_name("sharegpt-filtered.json")))
    p.add_argument("--max-seq-len", type=int, default=8192, help="prompt + generated tokens, per request")
    p.add_argument("--kv-budget-tokens", type=int, help="KV cache budget in tokens (default: free GPU memory)")
    p.add_argument("--ref-lengths", action="store_true",
                   help="generate exactly as many tokens as each prompt's reference answer")
    p.add_argument("--block-size", type=int, help="tokens per KV block (256 with flash-attn, else 16)")
    p.add_argument("--json", metavar="PATH", help="write stats and every request's tokens to PATH")
    p.add_argument("--quiet", action="store_true", help="don't print the responses")
    p.add_argument("--system-prompt", metavar="TEXT", help="a system message before every request's user turn")
    p.add_argument("--prefix-sharing", action="store_true",
                   help="reuse the full blocks of a prompt's start that the cache already holds")
    p.add_argument("--samples", type=int, default=1, help="samples per prompt, sharing the prompt's blocks")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling")
    p.add_argument("--beams", type=int, help="beam search with this many beams per prompt (the best is returned)")
    p.add_argument("--preempt", choices=("recompute", "swap"), default="recompute",
                   help="a preempted request's K and V are recomputed, or swapped to host memory and back "
                        "(a beam search starts over)")
    args = p.parse_args(argv)
    if args.samples < 1:
        fail(f"--samples must be positive, got {args.samples}")
    if args.beams is not None and args.beams < 1:
        fail(f"--beams must be positive, got {args.beams}")
    if not 0 <= args.temperature < math.inf:
        fail(f"--temperature must be a number >= 0, got {args.temperature}")
    if args.beams and (args.samples > 1 or args.temperature > 0):
        fail("--beams searches deterministically: use it without --samples and --temperature")
    return args


# ---------------------------------------------------------------------------------------------
# Tokenizer: tiktoken with Llama 3's vocabulary, split pattern and chat format.

SPLIT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# Llama 3 reserves 256 special ids after its 128,000 BPE tokens; these are the ones we use.
SPECIAL_NAMES = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>",
                 7: "<|end_header_id|>", 9: "<|eot_id|>"}


def load_tokenizer(path):
    try:
        lines = path.read_bytes().splitlines()
        ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}
    except FileNotFoundError:
        fail(f"tokenizer {path} not found")
    except (OSError, ValueError) as e:
        fail(f"cannot read tokenizer {path}: {e}")
    special = {SPECIAL_NAMES.get(i, f"<|reserved_special_token_{i}|>"): len(ranks) + i for i in range(256)}
    return tiktoken.Encoding(path.name, pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=special)


def encode_chat(tokenizer, user_message, system_message=None):
    """One user turn in Llama 3's chat format (after a system turn, if given), ending with the header that asks
    the assistant to answer."""
    special = tokenizer.encode_single_token
    def header(role):
        return [special("<|start_header_id|>"), *tokenizer.encode_ordinary(role), special("<|end_header_id|>"),
                *tokenizer.encode_ordinary("\n\n")]
    # encode_ordinary: text that looks like a special token stays text, as the user typed it.
    system = [*header("system"), *tokenizer.encode_ordinary(system_message.strip()),
              special("<|eot_id|>")] if system_message else []
    return [special("<|begin_of_text|>"), *system, *header("user"), *tokenizer.encode_ordinary(user_message.strip()),
            special("<|eot_id|>"), *header("assistant")]


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
        if user is None:
            continue
        answer = next((t["value"] for t in turns[user + 1:] if t.get("from") == "gpt"), "")
        prompts.append((turns[user]["value"], len(tokenizer.encode_ordinary(answer.strip()))))
        if len(prompts) == n:
            return prompts
    if not prompts:
        fail(f"prompts file {path} has no usable prompt (expected ShareGPT entries with a human turn)")
    fail(f"asked for {n} requests but {path} has only {len(prompts)} usable prompts")


# ---------------------------------------------------------------------------------------------
# The model: Meta's Llama 3 checkpoint format, RMSNorm, RoPE, grouped-query attention, SwiGLU.

def load_model(ckpt_dir, device, dtype):
    ckpt_dir = Path(ckpt_dir)
    try:
        params = json.loads((ckpt_dir / "params.json").read_text())
        weights = torch.load(ckpt_dir / "consolidated.00.pth", map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError as e:
        fail(f"checkpoint file {e.filename} not found (see the README to download or make one)")
    except Exception as e:  # unreadable, truncated or not a checkpoint: torch and json raise many kinds
        fail(f"cannot load the checkpoint in {ckpt_dir}: {str(e).splitlines()[0]}")
    missing = [k for k in ("dim", "n_layers", "n_heads", "vocab_size", "norm_eps") if k not in params]
    if missing:
        fail(f"{ckpt_dir / 'params.json'} lacks {', '.join(missing)}")

    def weight(name):
        if name not in weights:
            fail(f"{ckpt_dir / 'consolidated.00.pth'} has no tensor {name}")
        return weights[name].to(device, dtype)

    layers = [{name: weight(f"layers.{i}.{prefix}{name}.weight") for prefix, names in
               (("attention.", "wq wk wv wo"), ("feed_forward.", "w1 w2 w3"), ("", "attention_norm ffn_norm"))
               for name in names.split()} for i in range(params["n_layers"])]
    embeddings = weight("tok_embeddings.weight")
    return {
        "n_heads": params["n_heads"],
        "n_kv_heads": params.get("n_kv_heads") or params["n_heads"],
        "head_dim": params["dim"] // params["n_heads"],
        "norm_eps": params["norm_eps"],
        "vocab_size": params["vocab_size"],
        "rope_theta": params.get("rope_theta", 500000.0),
        "use_scaled_rope": params.get("use_scaled_rope", False),
        "tok_embeddings": embeddings,
        "layers": layers,
        "norm": weight("norm.weight"),
        # Llama 3.2 1B and 3B have no output.weight: the output layer is the embedding matrix.
        "output": weight("output.weight") if "output.weight" in weights else embeddings,
    }


def rope_tables(model, max_seq_len, device):
    """cos and sin of every position's rotation angles: (max_seq_len, head_dim / 2) each."""
    head_dim = model["head_dim"]
    freqs = 1.0 / model["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if model["use_scaled_rope"]:
        # Llama 3.1+: slow down the low frequencies 8x so 8192-token training stretches to 128K,
        # keep the high frequencies, and blend smoothly between wavelengths of 2048 and 8192 tokens.
        factor, low, high, trained_len = 8.0, 1.0, 4.0, 8192
        wavelen = 2 * math.pi / freqs
        smooth = ((trained_len / wavelen - low) / (high - low)).clamp(0, 1)
        freqs = (1 - smooth) * freqs / factor + smooth * freqs
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), freqs)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def rms_norm(x, weight, eps):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def apply_rope(x, cos, sin):
    """Rotate each pair (x[2i], x[2i+1]) by its angle. x: (batch, seqlen, heads, head_dim);
    cos, sin: (batch, seqlen, head_dim / 2). Meta's checkpoints pair adjacent dimensions."""
    even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).type_as(x)


def forward(model, tokens, cache_seqlens, kv_cache, block_table=None, cache_batch_idx=None):
    """Run new tokens through the model, appending their K and V to the cache.

    tokens: (batch, seqlen) new tokens of each request; cache_seqlens: (batch,) int32 tokens already cached.
    kv_cache: (k, v), each (n_layers, ...) in the layout the attention kernel reads through block_table
    (paged) or cache_batch_idx (one row per request). Returns the last position's logits: (batch, vocab).
    """
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
        out = model["attention"](q, kv_cache[0][i], kv_cache[1][i], k, v, cache_seqlens=cache_seqlens,
                                 block_table=block_table, cache_batch_idx=cache_batch_idx, causal=True)
        h = h + F.linear(out.reshape(batch, seqlen, -1), layer["wo"])
        x = rms_norm(h, layer["ffn_norm"], model["norm_eps"])
        h = h + F.linear(F.silu(F.linear(x, layer["w1"])) * F.linear(x, layer["w3"]), layer["w2"])
    return F.linear(rms_norm(h[:, -1], model["norm"], model["norm_eps"]), model["output"]).float()


def attention_torch(q, k_cache, v_cache, k, v, cache_seqlens, block_table=None, cache_batch_idx=None, causal=True):
    """flash_attn_with_kvcache in plain PyTorch, for the arguments these scripts pass.

    q: (batch, seqlen, n_heads, head_dim); k, v: (batch, seqlen, n_kv_heads, head_dim), written into
    the cache at positions cache_seqlens[b] + 0..seqlen-1. k_cache, v_cache: (num_blocks, block_size,
    n_kv_heads, head_dim) read through block_table (batch, blocks_per_seq), or (cache_batch,
    max_seq_len, n_kv_heads, head_dim) read at rows cache_batch_idx. Returns (batch, seqlen, n_heads, head_dim).
    """
    batch, seqlen = q.shape[:2]
    positions = cache_seqlens[:, None].long() + torch.arange(seqlen, device=q.device)  # (batch, seqlen)
    if block_table is not None:
        block_size = k_cache.shape[1]
        blocks = block_table.long().gather(1, positions // block_size)  # physical block of each new token
        k_cache[blocks, positions % block_size], v_cache[blocks, positions % block_size] = k, v
        keys = k_cache[block_table.long()].flatten(1, 2)  # (batch, blocks_per_seq * block_size, n_kv_heads, head_dim)
        values = v_cache[block_table.long()].flatten(1, 2)
    else:
        rows = torch.arange(batch, device=q.device) if cache_batch_idx is None else cache_batch_idx.long()
        k_cache[rows[:, None], positions], v_cache[rows[:, None], positions] = k, v
        # Like flash-attn, read no further than the longest row's tokens, not all max_seq_len of them.
        longest = int(positions.max()) + 1
        keys, values = k_cache[rows, :longest], v_cache[rows, :longest]  # (batch, longest, n_kv_heads, head_dim)
    # Query i of a row sees the keys up to its own position: flash-attn's causal mask, aligned to the
    # bottom right. Keys past the row's length (unwritten cache) are never visible.
    key_positions = torch.arange(keys.shape[1], device=q.device)
    last_visible = positions if causal else positions[:, -1:].expand(-1, seqlen)
    mask = key_positions[None, None, :] <= last_visible[:, :, None]  # (batch, seqlen, keys)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=mask[:, None], enable_gqa=True)
    return out.transpose(1, 2)


def pick_attention(device):
    if device.type == "cuda" and flash_attn_with_kvcache is not None:
        return flash_attn_with_kvcache, "flash-attn"
    return attention_torch, "pytorch"


# ---------------------------------------------------------------------------------------------
# Requests and the KV budget.

@dataclass
class Request:
    id: int                   # position in the prompt list
    prompt_ids: list
    ref_length: int | None    # --ref-lengths: generate exactly this many tokens
    tokens: list = field(default_factory=list)  # prompt + generated so far
    cache_row: int = -1       # which row of the cache (or of the block table) belongs to this request
    done: bool = False

    @property
    def generated_ids(self):
        return self.tokens[len(self.prompt_ids):]


def append_token(req, token, stop_ids, max_seq_len):
    req.tokens.append(token)
    if req.ref_length is not None:
        req.done = len(req.generated_ids) >= req.ref_length
    else:
        req.done = token in stop_ids
    req.done = req.done or len(req.tokens) >= max_seq_len


def kv_bytes_per_token(model, dtype):
    """K and V of one token in every layer: 128 KiB for Llama-3-8B in bf16."""
    return 2 * len(model["layers"]) * model["n_kv_heads"] * model["head_dim"] * dtype.itemsize


def kv_budget_tokens(args, model, device, dtype):
    if args.kv_budget_tokens is not None:
        return args.kv_budget_tokens
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        return max(0, free_bytes - CUDA_HEADROOM_BYTES) // kv_bytes_per_token(model, dtype)
    return CPU_KV_BUDGET_TOKENS


def allocate_kv(shape, dtype, device):
    """K and V, each of `shape`, zeroed; or one line saying the memory isn't there."""
    num_bytes = 2 * math.prod(shape) * dtype.itemsize
    ram_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if device.type == "cpu" and num_bytes > ram_bytes:  # fail now, not after the machine starts swapping
        fail(f"the KV cache would take {num_bytes / 1e9:.3g} GB, more than this machine's {ram_bytes / 1e9:.3g} GB "
             f"of memory: lower --kv-budget-tokens")
    try:
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
    except torch.cuda.OutOfMemoryError:
        fail(f"out of GPU memory allocating the KV cache ({num_bytes / 1e9:.3g} GB), "
             f"{torch.cuda.mem_get_info(device)[0] / 1e9:.3g} GB free")


# ---------------------------------------------------------------------------------------------
# The paged KV cache.

class KVCacheManager:
    """Hands out fixed-size blocks of one KV pool as requests grow, and takes them back when they end.

    One manager serves all layers: block b holds block_size tokens of K and V in every layer, so a
    request's block table is the same in layer 0 and layer 31. Row r of block_table lists, in order,
    the blocks of the request that holds row r: its token t lives in block block_table[r, t // block_size]
    at offset t % block_size. flash-attn reads that table directly.

    Requests may share blocks: ref_count[b] counts the requests that hold block b, and b goes back to the
    free list only when the last of them lets go. A fork (--samples, --beams) holds its parent's blocks.
    Nobody writes into a full block again, so only a shared last block, partly filled, is copied, before
    the first write into it (copy-on-write). With prefix sharing, a new request also holds the full blocks
    of its prompt that the cache already has, found by their tokens and the block before them.
    """

    def __init__(self, num_blocks, block_size, max_blocks_per_seq, device, num_rows=None, share_prefixes=False):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks = deque(range(num_blocks))  # O(1) to take from and give back to
        self.ref_count = [0] * num_blocks            # requests holding each block; 0: free
        self.shared = 0                              # sum of (ref_count - 1) over held blocks: blocks saved
        # Each request holds >= 1 block of its own, so rows run out only with forks (see make_kv_cache).
        self.free_rows = deque(range(num_rows or num_blocks))
        self.block_table = torch.zeros(num_rows or num_blocks, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.table_entries = self.block_table.view(-1)  # the same memory, entry row * max_blocks_per_seq + column
        self.blocks = {}        # request id -> its blocks, in order
        self.rows = {}          # request id -> its block-table row
        self.pending = {}       # (row, column) -> block: writes not yet copied to the device table
        self.copies = {}        # block -> the block it must become a copy of before this step's writes
        self.prefix = {} if share_prefixes else None  # (block before it or -1, its tokens) -> a full block
        self.prefix_key = {}    # block -> its key in self.prefix
        # Every running request grows by one token per decode step, so we know when each one will fill
        # its last block: at that step and no other do we need to look at it. No per-step scan.
        self.step = 0
        self.start = {}               # request id -> step s: in step t it writes its token t - s
        self.due = defaultdict(list)  # decode step -> requests that need a new block (or a copy) before it
        self.due_step = {}            # request id -> the step it is due at

    def blocks_for(self, num_tokens):
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens):
        return self.blocks_for(num_tokens) <= len(self.free_blocks)

    def cached_tokens(self, token_ids):
        """How many leading tokens of token_ids the cache holds already, in whole blocks (prefix sharing)."""
        return len(self._cached_prefix(token_ids)) * self.block_size

    def allocate(self, req_id, num_tokens, token_ids=()):
        """Room for num_tokens tokens, all written by the end of the coming decode step. Returns the row.
        The first cached_tokens(token_ids) are in the cache already: those blocks are shared. The full
        blocks of token_ids (the tokens this step's prefill writes) become shareable in turn."""
        blocks = self._cached_prefix(token_ids)
        self._share(blocks)
        blocks += [self._take() for _ in range(self.blocks_for(num_tokens) - len(blocks))]
        for j in range(len(token_ids) // self.block_size if self.prefix is not None else 0):
            key = self._key(token_ids, j, blocks[j - 1] if j else -1)
            if key not in self.prefix:  # (it is if block j was shared, or is the last and so could not be)
                self.prefix[key], self.prefix_key[blocks[j]] = blocks[j], key
        start = self.step + 1 - num_tokens
        return self._add(req_id, blocks, start, start + len(blocks) * self.block_size)

    def fork(self, parent_id, child_id):
        """At the end of a step, a new request holding all the parent's tokens by sharing its blocks. It writes
        its next token in the next step and is due then: for a new block, or a copy of its shared last one."""
        blocks = list(self.blocks[parent_id])
        self._share(blocks)
        return self._add(child_id, blocks, self.start[parent_id], self.step + 1)

    def blocks_due(self):
        """Requests whose token in the coming decode step starts a new block, or goes into a shared one."""
        due = self.due.pop(self.step, [])
        for req_id in due:
            del self.due_step[req_id]
        return due

    def append_block(self, req_id):
        """The block a due request writes this step's token into, made its own: a new block if the token
        starts one, otherwise a copy of its last block, which others share (they must not see the write)."""
        blocks = self.blocks[req_id]
        if self.step - self.start[req_id] == len(blocks) * self.block_size:
            blocks.append(self._take())
        elif self.ref_count[blocks[-1]] > 1:
            shared, blocks[-1] = blocks[-1], self._take()
            self.copies[blocks[-1]] = shared
            self._release(shared)
        self.pending[self.rows[req_id], len(blocks) - 1] = blocks[-1]
        self._schedule(req_id, self.start[req_id] + len(blocks) * self.block_size)

    def take_copies(self):
        """The copy-on-write copies to make before this step's writes: (destination blocks, source blocks)."""
        copies, self.copies = self.copies, {}
        return list(copies), list(copies.values())

    def free(self, req_id):
        """A finished (or preempted) request lets go of all its blocks at once; those nobody else holds go back."""
        for block in self.blocks.pop(req_id):
            self._release(block)
        self.free_rows.append(self.rows.pop(req_id))
        del self.start[req_id]
        if req_id in self.due_step:
            self.due[self.due_step.pop(req_id)].remove(req_id)

    def batch_block_table(self, rows, width):
        """The block tables of the running requests, in batch order: (batch, width) int32 on the device."""
        if self.pending:  # one write per step, however many blocks were handed out
            device, columns = self.block_table.device, self.block_table.shape[1]
            entries = torch.tensor([row * columns + column for row, column in self.pending], device=device)
            self.table_entries[entries] = torch.tensor(list(self.pending.values()), dtype=torch.int32, device=device)
            self.pending.clear()
        return self.block_table[:, :width].index_select(0, rows)

    def end_step(self):
        self.step += 1

    def _add(self, req_id, blocks, start, due_step):
        row = self.free_rows.popleft()
        self.blocks[req_id], self.rows[req_id], self.start[req_id] = blocks, row, start
        self.pending.update(((row, j), b) for j, b in enumerate(blocks))
        self._schedule(req_id, due_step)
        return row

    def _schedule(self, req_id, step):
        self.due[step].append(req_id)
        self.due_step[req_id] = step

    def _take(self):
        block = self.free_blocks.popleft()
        self.ref_count[block] = 1
        return block

    def _share(self, blocks):
        for block in blocks:
            self.ref_count[block] += 1
        self.shared += len(blocks)

    def _release(self, block):
        self.ref_count[block] -= 1
        if self.ref_count[block]:
            self.shared -= 1
            return
        self.free_blocks.append(block)
        self.copies.pop(block, None)       # a copy into a block nobody holds any more
        if block in self.prefix_key:       # its tokens leave the cache
            del self.prefix[self.prefix_key.pop(block)]

    def _cached_prefix(self, token_ids):
        """The blocks holding token_ids' leading full blocks, as far as the cache has them; never the one
        with the last token, which a prefill must compute to give the next token's logits."""
        blocks = []
        while self.prefix is not None and len(blocks) < (len(token_ids) - 1) // self.block_size:
            block = self.prefix.get(self._key(token_ids, len(blocks), blocks[-1] if blocks else -1))
            if block is None:
                break
            blocks.append(block)
        return blocks

    def _key(self, token_ids, j, previous):
        """Block j of token_ids: its tokens, and the block before it, which stands for all tokens before."""
        return previous, tuple(token_ids[j * self.block_size:(j + 1) * self.block_size])


def make_kv_cache(model, budget_tokens, num_requests, args, device, dtype):
    """The pool: K and V, each (n_layers, num_blocks, block_size, n_kv_heads, head_dim)."""
    if args.block_size is None:
        args.block_size = 256 if model["kernel_name"] == "flash-attn" else 16
    if args.block_size <= 0:
        fail(f"--block-size must be positive, got {args.block_size}")
    if model["kernel_name"] == "flash-attn" and args.block_size % 256:
        fail(f"flash-attn's paged kernel needs --block-size to be a multiple of 256, got {args.block_size}")
    num_blocks = budget_tokens // args.block_size
    sequences_per_prompt = max(args.samples, args.beams or 1)
    if sequences_per_prompt > num_blocks:  # each sample or beam soon holds a block of its own
        fail(f"{sequences_per_prompt} samples or beams of a prompt need at least as many KV blocks, but the budget "
             f"holds {num_blocks} blocks of {args.block_size} tokens")
    shape = (len(model["layers"]), num_blocks, args.block_size, model["n_kv_heads"], model["head_dim"])
    kv_cache = allocate_kv(shape, dtype, device)
    # A row of the block table for every sequence that can be running at once: each prompt's S samples
    # (B beams), and no more prompts than there are blocks, since each one holds at least one.
    num_rows = min(num_blocks, num_requests) * sequences_per_prompt
    manager = KVCacheManager(num_blocks, args.block_size, -(-args.max_seq_len // args.block_size), device, num_rows,
                             share_prefixes=args.prefix_sharing)
    return kv_cache, manager


def with_samples(requests, samples):
    """--samples S: each prompt's request S times in a row, ids 0..N*S-1. generate() forks all but the first."""
    return [Request(i * samples + s, r.prompt_ids, r.ref_length, list(r.tokens))
            for i, r in enumerate(requests) for s in range(samples)]


def pick_tokens(logits, batch, args):
    """Each request's next token from its row of logits (batch, vocab): the likeliest at --temperature 0,
    else a sample. A sample's random numbers come from a generator seeded by --seed, the prompt, which
    sample it is and the position, so neither the rest of the batch, nor sharing, nor preemption changes it."""
    if args.temperature == 0:
        return logits.argmax(-1).tolist()
    probs = torch.softmax(logits / args.temperature, dim=-1)  # (batch, vocab)
    # (A hash of ints is the same in every run, unlike a hash of text.)
    seeds = [hash((args.seed, r.id // args.samples, r.id % args.samples, len(r.tokens))) for r in batch]
    uniform = torch.stack([torch.rand(probs.shape[-1], device=probs.device,
                                      generator=torch.Generator(probs.device).manual_seed(seed)) for seed in seeds])
    # An exponential race: -log(uniform) / probs[i] is exponential with rate probs[i], and token i finishes
    # first with probability probs[i]. The winner barely depends on rounding in the logits.
    return (uniform.log() / probs).argmax(-1).tolist()


def best_beams(group, logits, score, width):
    """Beam search's choice for one prompt: the `width` best of its live beams followed by any token, and of
    its stopped beams as they are, by summed log-probability (summed in float64).
    logits: (live beams, vocab), in group order. Returns (score, beam, token or None if stopped), best first."""
    live = [b for b in group if not b.done]
    scores = torch.tensor([score[b.id] for b in live], dtype=torch.float64, device=logits.device)
    total = torch.log_softmax(logits.float(), dim=-1).double() + scores[:, None]  # (live beams, vocab)
    values, indices = total.flatten().topk(width)
    vocab = logits.shape[-1]
    extended = [(value, live[i // vocab], i % vocab) for value, i in zip(values.tolist(), indices.tolist())]
    stopped = [(score[b.id], b, None) for b in group if b.done]
    return sorted(extended + stopped, key=lambda c: -c[0])[:width]


def generate(model, requests, kv_cache, manager, args, stop_ids, device):
    stats = {"timeline": [], "decode_steps": 0, "peak_reserved_tokens": 0, "peak_used_tokens": 0,
             "reserved_at_peak_use": 0, "manager_seconds": 0.0, "preemptions": 0, "shared_blocks_peak": 0,
             "peak_unshared_tokens": 0, "prefix_hit_tokens": 0, "cow_copies": 0, "swapped_bytes": 0}
    # --samples S: a prompt's S requests come in a row. Only the first is prefilled; the others take their
    # first token from its logits and fork from it.
    siblings = {r.id: requests[i + 1:i + args.samples] for i, r in enumerate(requests)
                if i % args.samples == 0 and args.samples > 1}
    waiting = deque(requests[::args.samples])  # not started yet, or preempted and waiting to come back
    running = []               # in the order they were admitted (forks after their parent): newest preempted first
    joining, forks = [], []    # roots of new --samples/--beams groups, and (parent, child): they join at step's end
    swapped = {}               # --preempt swap: request id -> its K and V on the host, (n_layers, blocks, ...) each
    # --beams: the prompt's request (the root) id -> its beams, live and stopped; beam id -> its summed
    # log-probability; beam id -> its root. New beams get new ids.
    beams, score, root_of = {}, {}, {}
    next_id = len(requests)

    def make_copies():  # copy-on-write, in every layer at once
        dst, src = manager.take_copies()
        if dst:
            for cache in kv_cache:  # (n_layers, num_blocks, block_size, n_kv_heads, head_dim)
                cache[:, dst] = cache[:, src]
            stats["cow_copies"] += len(dst)

    def preempt(victim):
        """The newest request gives its blocks back and waits: to be recomputed from its tokens or, with
        --preempt swap, to have its K and V copied back from host memory. A beam search starts over, since
        its beams move in step together."""
        nonlocal running
        stats["preemptions"] += 1
        if victim.id in root_of:
            root = root_of[victim.id]
            for beam in beams.pop(root.id):
                if not beam.done:
                    manager.free(beam.id)
            running = [r for r in running if root_of.get(r.id) is not root]
            root.tokens, root.done = list(root.prompt_ids), False
            waiting.appendleft(root)
            return
        if args.preempt == "swap":
            make_copies()  # its last block may be a copy not made yet
            blocks = manager.blocks[victim.id][:manager.blocks_for(len(victim.tokens) - 1)]
            swapped[victim.id] = kv_cache[0][:, blocks].cpu(), kv_cache[1][:, blocks].cpu()
            stats["swapped_bytes"] += 2 * swapped[victim.id][0].nbytes
        manager.free(victim.id)
        running.pop()
        waiting.appendleft(victim)

    def extend_beams(root, logits):
        """One step of root's beam search (logits: (its live beams, vocab)). A beam's best winner extends it,
        its other winners fork from it, and a beam with none is dropped. Returns the dropped beams' ids."""
        nonlocal next_id
        live = [b for b in beams[root.id] if not b.done]
        kept, extended = [], set()
        for value, beam, token in best_beams(beams[root.id], logits, score, args.beams):
            if token is not None:
                if beam.id in extended:  # another winner from the same beam: a new beam forks from it
                    beam, parent = Request(next_id, beam.prompt_ids, beam.ref_length, beam.tokens[:-1]), beam
                    root_of[beam.id], next_id = root, next_id + 1
                    forks.append((parent, beam))
                extended.add(beam.id)
                append_token(beam, token, stop_ids, args.max_seq_len)
                score[beam.id] = value
            kept.append(beam)
        beams[root.id] = kept
        dropped = {b.id for b in live if b.id not in extended}
        for beam_id in dropped:
            manager.free(beam_id)
        return dropped

    while waiting or running:
        t0 = time.perf_counter()
        # 1. Room for this step's token. A request whose next token starts a new block gets one now, and a
        #    fork about to write into a block it shares gets a copy; when no block is free, preempt the newest.
        preempted = False
        for req_id in manager.blocks_due():
            while not manager.free_blocks and req_id in manager.blocks:
                preempt(running[-1])
                preempted = True
            if req_id in manager.blocks:
                manager.append_block(req_id)
        make_copies()
        # 2. Admit waiting requests, oldest first, while their tokens and the one this step writes fit, less
        #    the blocks of them the cache holds already; but not right after a preemption, which would only
        #    hand back the blocks just taken.
        admitted = []
        while waiting and not preempted:
            req = waiting[0]
            # The tokens its prefill (or swap-in) writes, and its decode token, unless it starts a --samples or
            # --beams group: that decodes from the next step on, with its forks.
            written = req.tokens[:-1] if req.id in swapped else req.tokens
            need = len(written) + (not (args.beams or req.id in siblings))
            hit = manager.cached_tokens(written)
            if not manager.can_allocate(need - hit):
                break
            waiting.popleft()
            req.cache_row = manager.allocate(req.id, need, written)
            stats["prefix_hit_tokens"] += hit
            admitted.append((req, hit))
        if not running and not admitted:
            fail(f"the KV budget of {manager.num_blocks} blocks of {manager.block_size} tokens cannot hold request "
                 f"{waiting[0].id}, " + (f"searching with {args.beams} beams" if args.beams else
                                         f"which needs {manager.blocks_for(len(waiting[0].tokens) + 1)}"))
        # A prefill reads only its own blocks, so its table comes straight from the manager's list: (1, blocks).
        tables = [torch.tensor([manager.blocks[r.id][:manager.blocks_for(len(r.tokens))]], dtype=torch.int32,
                               device=device) for r, _ in admitted]
        stats["manager_seconds"] += time.perf_counter() - t0

        # 3. Prefill each admitted request whole: its prompt (after a preemption, its prompt and what it had
        #    generated), less the blocks it found in the cache, goes through the model in one pass, filling its
        #    blocks and giving its next token. A request swapped out gets its K and V back instead.
        for (req, hit), table in zip(admitted, tables):
            if req.id in swapped:
                first = hit // manager.block_size
                for cache, saved in zip(kv_cache, swapped.pop(req.id)):
                    cache[:, manager.blocks[req.id][first:saved.shape[1]]] = saved[:, first:].to(device)
                    stats["swapped_bytes"] += saved[:, first:].nbytes
                running.append(req)
                continue
            starts_group = bool(args.beams) or req.id in siblings  # decodes from the next step, with its forks
            tokens = torch.tensor([req.tokens[hit:]], device=device)
            cache_seqlens = torch.tensor([hit], dtype=torch.int32, device=device)
            logits = forward(model, tokens, cache_seqlens, kv_cache, block_table=table)
            if args.beams:  # the best first tokens start the beams
                beams[req.id], score[req.id], root_of[req.id] = [req], 0.0, req
                extend_beams(req, logits)
            else:  # with --samples, each sample draws its own first token
                family = [req, *siblings.pop(req.id, [])]
                for r, token in zip(family, pick_tokens(logits.expand(len(family), -1), family, args)):
                    append_token(r, token, stop_ids, args.max_seq_len)
                forks += [(req, r) for r in family[1:] if not r.done]
            (joining if starts_group else running).append(req)

        # 4. One decode step for every running request, in one batch.
        batch = [r for r in running if not r.done]
        if batch:
            tokens, cache_seqlens, rows = batch_inputs(batch, device)
            width = manager.blocks_for(max(len(r.tokens) for r in batch))  # blocks of the longest request
            t0 = time.perf_counter()
            table = manager.batch_block_table(rows, width)  # (batch, width)
            stats["manager_seconds"] += time.perf_counter() - t0
            logits = forward(model, tokens, cache_seqlens, kv_cache, block_table=table)
            if args.beams:  # each prompt keeps its best beams
                row = {r.id: i for i, r in enumerate(batch)}
                dropped = set()
                for root in {root_of[r.id].id: root_of[r.id] for r in batch}.values():
                    dropped |= extend_beams(root, logits[[row[b.id] for b in beams[root.id] if not b.done]])
                running = [r for r in running if r.id not in dropped]
            else:
                for req, token in zip(batch, pick_tokens(logits, batch, args)):
                    append_token(req, token, stop_ids, args.max_seq_len)
            stats["decode_steps"] += 1
            # Tokens held: each request's but its newest, less those in shared blocks counted more than once
            # (all full blocks). Without sharing, the same requests would reserve `shared` blocks more.
            reserved = (manager.num_blocks - len(manager.free_blocks)) * manager.block_size
            saved = manager.shared * manager.block_size
            record_memory(stats, reserved, sum(len(r.tokens) - 1 for r in running + joining) - saved)
            stats["shared_blocks_peak"] = max(stats["shared_blocks_peak"], manager.shared)
            stats["peak_unshared_tokens"] = max(stats["peak_unshared_tokens"], reserved + saved)
            show_progress(stats, len(running), len(waiting))

        # 5. Forks join, sharing their parent's blocks, right after it: a prompt's sequences stay together,
        #    in admission order, so the newest prompt's are preempted first. Finished requests give all their
        #    blocks back at once (a shared one stays with its other holders), and the batch shrinks.
        if forks or joining:
            t0 = time.perf_counter()
            children = defaultdict(list)
            for parent, child in forks:
                child.cache_row = manager.fork(parent.id, child.id)
                children[parent.id].append(child)
            stats["manager_seconds"] += time.perf_counter() - t0
            running = [r for parent in running + joining for r in (parent, *children[parent.id])]
            joining, forks = [], []
        finished = [r for r in running if r.done]
        running = [r for r in running if not r.done]
        t0 = time.perf_counter()
        for req in finished:
            manager.free(req.id)
        manager.end_step()
        stats["manager_seconds"] += time.perf_counter() - t0
    for root_id, group in beams.items():  # every beam has stopped: each prompt's answer is its best
        root_of[root_id].tokens, root_of[root_id].done = list(max(group, key=lambda b: score[b.id]).tokens), True
    if len(manager.free_blocks) != manager.num_blocks:
        raise RuntimeError(f"{manager.num_blocks - len(manager.free_blocks)} KV blocks were never freed")
    stats.update(block_size=manager.block_size, num_blocks=manager.num_blocks)
    return stats


# ---------------------------------------------------------------------------------------------
# Shared by both scripts: batch inputs, progress and the report.

def batch_inputs(batch, device):
    """Each request's newest token (batch, 1), its cached token count (batch,) and its cache row (batch,)."""
    tokens = torch.tensor([[r.tokens[-1]] for r in batch], device=device)
    cache_seqlens = torch.tensor([len(r.tokens) - 1 for r in batch], dtype=torch.int32, device=device)
    rows = torch.tensor([r.cache_row for r in batch], dtype=torch.int32, device=device)
    return tokens, cache_seqlens, rows


def record_memory(stats, reserved_tokens, used_tokens):
    stats["timeline"].append((reserved_tokens, used_tokens))
    stats["peak_reserved_tokens"] = max(stats["peak_reserved_tokens"], reserved_tokens)
    if used_tokens > stats["peak_used_tokens"]:
        stats["peak_used_tokens"], stats["reserved_at_peak_use"] = used_tokens, reserved_tokens


def show_progress(stats, running, waiting):
    if sys.stderr.isatty() and stats["decode_steps"] % 16 == 0:
        print(f"\rstep {stats['decode_steps']}: {running} running, {waiting} waiting ", end="", file=sys.stderr)


def report(stats, name):
    gb = lambda tokens: f"{tokens * stats['kv_bytes_per_token'] / 1e9:.3g} GB"
    wasted = stats["reserved_at_peak_use"] - stats["peak_used_tokens"]
    percent = 100 * wasted / max(1, stats["reserved_at_peak_use"])
    lines = [
        f"=== {name} ===",
        f"requests:              {stats['requests']} ({stats['finished']} finished)",
        f"generated tokens:      {stats['generated_tokens']} in {stats['wall_seconds']:.2f} s "
        f"({stats['generated_tokens'] / stats['wall_seconds']:.1f} tokens/s, {stats['decode_steps']} decode steps)",
        f"attention kernel:      {stats['kernel']}",
        f"KV budget:             {stats['kv_budget_tokens']} tokens ({gb(stats['kv_budget_tokens'])})",
        f"peak KV reserved:      {stats['peak_reserved_tokens']} tokens ({gb(stats['peak_reserved_tokens'])})",
        f"peak KV holding tokens: {stats['peak_used_tokens']} tokens ({gb(stats['peak_used_tokens'])})",
        f"Fragmented Memory: {gb(wasted)} ({percent:.1f}% of the KV reserved when the most tokens were held)",
    ]
    if "block_size" in stats:
        lines += [f"block size:            {stats['block_size']} tokens",
                  f"blocks:                {stats['num_blocks']} total, {stats['peak_reserved_tokens'] // stats['block_size']} peak used",
                  f"preemptions:           {stats['preemptions']}"]
    if any(stats.get(key) for key in ("shared_blocks_peak", "prefix_hit_tokens", "swapped_bytes")):  # sharing options
        lines += [f"shared blocks:         {stats['shared_blocks_peak']} at the peak (peak KV reserved without sharing: "
                  f"{stats['peak_unshared_tokens']} tokens)",
                  f"prefix cache hits:     {stats['prefix_hit_tokens']} prompt tokens",
                  f"copy-on-write copies:  {stats['cow_copies']} blocks",
                  f"swapped:               {stats['swapped_bytes']} bytes (to host memory and back)"]
    per_step = 1e6 * stats["manager_seconds"] / max(1, stats["decode_steps"])
    lines.append(f"cache manager time:    {stats['manager_seconds']:.4f} s ({per_step:.1f} us per decode step)")
    print("\n".join(lines))


def main(argv=None):
    args = parse_args(argv)
    if not args.n.isdigit() or int(args.n) < 1:
        fail(f"N must be a positive integer, got {args.n!r}")
    if not 2 <= args.max_seq_len <= MAX_SEQ_LEN_LIMIT:
        fail(f"--max-seq-len must be from 2 to {MAX_SEQ_LEN_LIMIT} (Llama 3.1's context), got {args.max_seq_len}")
    if args.kv_budget_tokens is not None and args.kv_budget_tokens < 1:
        fail(f"--kv-budget-tokens must be positive, got {args.kv_budget_tokens}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    if not Path(args.ckpt_dir).is_dir():
        fail(f"checkpoint directory {args.ckpt_dir} not found (the README shows how to download or make one)")
    tokenizer = load_tokenizer(Path(args.ckpt_dir) / "tokenizer.model")
    prompts = load_prompts(args.prompts, int(args.n), tokenizer)
    requests = []
    for i, (text, ref_length) in enumerate(prompts):
        prompt_ids = encode_chat(tokenizer, text, args.system_prompt)
        if len(prompt_ids) >= args.max_seq_len:
            fail(f"prompt {i} has {len(prompt_ids)} tokens: no room to generate within "
                             f"--max-seq-len {args.max_seq_len}")
        requests.append(Request(i, prompt_ids, max(1, ref_length) if args.ref_lengths else None, list(prompt_ids)))
    stop_ids = {tokenizer.encode_single_token("<|eot_id|>"), tokenizer.encode_single_token("<|end_of_text|>")}

    model = load_model(args.ckpt_dir, device, dtype)
    if model["vocab_size"] < tokenizer.n_vocab:
        fail(f"the checkpoint's vocab_size {model['vocab_size']} is smaller than the tokenizer's {tokenizer.n_vocab}")
    model["rope_cos"], model["rope_sin"] = rope_tables(model, args.max_seq_len, device)
    model["attention"], model["kernel_name"] = pick_attention(device)
    budget_tokens = kv_budget_tokens(args, model, device, dtype)
    try:
        kv_cache, manager = make_kv_cache(model, budget_tokens, len(requests), args, device, dtype)
        requests = with_samples(requests, args.samples)
        start = time.perf_counter()
        stats = generate(model, requests, kv_cache, manager, args, stop_ids, device)
    except torch.cuda.OutOfMemoryError as e:
        fail(f"out of GPU memory: {str(e).splitlines()[0]}")
    if sys.stderr.isatty():
        print(file=sys.stderr)
    stats.update(requests=len(requests), finished=sum(r.done for r in requests),
                 generated_tokens=sum(len(r.generated_ids) for r in requests),
                 wall_seconds=time.perf_counter() - start, kv_budget_tokens=budget_tokens, kernel=model["kernel_name"],
                 kv_bytes_per_token=kv_bytes_per_token(model, dtype))
    timeline = {"reserved_tokens": [t[0] for t in stats["timeline"]], "used_tokens": [t[1] for t in stats.pop("timeline")]}
    stats["fragmented_bytes"] = (stats["reserved_at_peak_use"] - stats["peak_used_tokens"]) * stats["kv_bytes_per_token"]

    def response(req):
        ids = req.generated_ids
        return tokenizer.decode(ids[:-1] if ids and ids[-1] in stop_ids else ids)

    if not args.quiet:
        for req in requests:
            print(f"--- request {req.id}: {len(req.prompt_ids)} prompt tokens, {len(req.generated_ids)} generated ---")
            print(response(req))
    report(stats, Path(__file__).name)
    if args.json:
        out = {"stats": stats, "timeline": timeline, "requests": [{"prompt_ids": r.prompt_ids, "generated_ids": r.generated_ids,
                                             "text": response(r)} for r in requests]}
        Path(args.json).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
