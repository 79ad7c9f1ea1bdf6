"""A toy model that checks the KV cache, for driving the scripts' own generate() without a network.

Put toy_forward in place of a script's forward(). Its cache (kv_cache, one "layer", one number per token) holds
at position p of a request a hash of that request's whole prefix, tokens 0..p, as a real K or V depends on
everything before it. Each call reads every cached position of each row through the block table (or the row of
the contiguous cache), writes the new tokens' values, and scores the next token from all of it. So a request
that reads a block of another request, a block written in another context, a copy not made, a swap brought back
wrong, or a stale table entry continues differently from its own history; check_tokens() recomputes each
request's history from its tokens alone and finds where.

The logits rank three candidate tokens (0, -1, -2; the rest -inf), all derived from the history: greedy takes
the first, sampling at a temperature picks among them, and beam search has three continuations per beam.
"""
import torch

VOCAB = 97


def prefix_value(values, token):
    """The cache entry of a token: its own id and every entry before it (Python's hash of ints is not salted)."""
    return hash((tuple(values), token)) & (2**62 - 1)


def candidates(value):
    """The next tokens a history whose last entry is `value` allows, best first (distinct)."""
    ranked = [value % VOCAB, (value >> 17) % VOCAB, (value >> 37) % VOCAB]
    return list(dict.fromkeys(ranked))


def toy_model(num_blocks, block_size):
    """A paged toy cache: K and V, each (1 layer, num_blocks, block_size), filled with -1 (never a value)."""
    return torch.full((1, num_blocks, block_size), -1, dtype=torch.int64), torch.full((1, num_blocks, block_size), -1,
                                                                                         dtype=torch.int64)


def toy_forward(model, tokens, cache_seqlens, kv_cache, block_table=None, cache_batch_idx=None):
    """forward() for the toy model: same arguments and return shape as the scripts' forward."""
    k_cache, v_cache = kv_cache[0][0], kv_cache[1][0]  # (num_blocks, block_size) or (rows, max_seq_len)
    batch, seqlen = tokens.shape
    logits = torch.full((batch, VOCAB), -torch.inf)
    for b in range(batch):
        start = int(cache_seqlens[b])
        positions = torch.arange(start + seqlen)
        if block_table is not None:
            block_size = k_cache.shape[1]
            assert block_table.dtype == torch.int32 and block_table.shape[1] * block_size >= start + seqlen, \
                f"row {b}: a block table of {block_table.shape[1]} blocks cannot hold {start + seqlen} tokens"
            slots = (block_table[b].long()[positions // block_size], positions % block_size)
        else:
            slots = (cache_batch_idx[b].long().expand(start + seqlen), positions)
        values = k_cache[slots].tolist()
        assert values[:start] == v_cache[slots].tolist()[:start], f"row {b}: K and V disagree"
        assert -1 not in values[:start], f"row {b}: reads a cache slot never written"
        values = values[:start]
        for token in tokens[b].tolist():
            values.append(prefix_value(values, token))
        k_cache[slots[0][start:], slots[1][start:]] = torch.tensor(values[start:])
        v_cache[slots[0][start:], slots[1][start:]] = torch.tensor(values[start:])
        for rank, token in enumerate(candidates(values[-1])):
            logits[b, token] = -rank
    return logits


def history_values(tokens):
    """The cache entries a request's tokens should have: one per token."""
    values = []
    for token in tokens:
        values.append(prefix_value(values, token))
    return values


def check_tokens(prompt, tokens, greedy=True):
    """Each generated token follows from the request's own history: the first candidate if greedy, else any.
    Returns None, or a message naming the first position that does not."""
    if tokens[:len(prompt)] != list(prompt):
        return "the tokens do not start with the prompt"
    values = history_values(tokens[:-1])
    for p in range(len(prompt), len(tokens)):
        allowed = candidates(values[p - 1])
        if tokens[p] not in (allowed[:1] if greedy else allowed):
            return f"token {p} is {tokens[p]}, but the history allows {allowed[:1] if greedy else allowed}"
    return None
