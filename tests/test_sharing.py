"""Sharing KV blocks in llama3-paged.py: --samples, --beams, --system-prompt (prefix sharing) and --preempt swap.

End-to-end runs on the tiny random checkpoint check that sharing changes no token, only memory; in-process
runs of generate() check the cache itself against from-scratch recomputes: each sample's K and V after
the samples diverge, and beam search against a plain one that recomputes every beam with a fresh cache.
Every run here uses one thread: the tensors are tiny, and other work on the machine makes extra threads slow.
"""
import json
import re

import pytest
import torch

from conftest import run_script
from load_scripts import load_script

paged = load_script("paged")
N = 3
# The first 3 prompts (44, 27 and 72 tokens) stop at 160 tokens or at their reference length (71 for the second).
COMMON = ["--ref-lengths", "--max-seq-len", 160, "--quiet"]
SYSTEM = ("You are a careful assistant. Answer in plain words, say so when you are not sure, and keep every "
          "answer short unless the user asks for detail. Never invent a source.")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # for the scripts run as subprocesses
        yield
    torch.set_num_threads(threads)


def run_json(ckpt, tmp_path, *args, n=N):
    out = tmp_path / f"run-{len(list(tmp_path.iterdir()))}.json"
    result = run_script("llama3-paged.py", n, "--ckpt-dir", ckpt, "--json", out, *args)
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text()), result.stdout


def generated(run):
    return [r["generated_ids"] for r in run["requests"]]


@pytest.fixture(scope="module")
def greedy(tiny_ckpt, tmp_path_factory):
    return run_json(tiny_ckpt, tmp_path_factory.mktemp("greedy"), *COMMON)[0]


@pytest.fixture(scope="module")
def samples(tiny_ckpt, tmp_path_factory):
    return run_json(tiny_ckpt, tmp_path_factory.mktemp("samples"), *COMMON, "--samples", 3)


# ---------------------------------------------------------------------------------------------
# End to end.

def test_greedy_samples_equal_the_single_sample_output(greedy, samples):
    run, _ = samples
    assert len(run["requests"]) == 3 * N
    for i, g in enumerate(generated(greedy)):  # samples of a prompt are adjacent
        assert [r["generated_ids"] for r in run["requests"][3 * i:3 * i + 3]] == [g] * 3
        assert all(r["prompt_ids"] == greedy["requests"][i]["prompt_ids"] for r in run["requests"][3 * i:3 * i + 3])
    stats = run["stats"]
    # The prompts (44, 27, 72 tokens) end inside a block: 2 forks each copy it before their first write.
    assert stats["cow_copies"] == 2 * N
    assert stats["shared_blocks_peak"] > 0 and stats["peak_reserved_tokens"] < stats["peak_unshared_tokens"]
    assert stats["preemptions"] == stats["swapped_bytes"] == stats["prefix_hit_tokens"] == 0


def test_report_agrees_with_json_on_sharing(samples):
    run, stdout = samples
    stats = run["stats"]
    shared, unshared = map(int, re.search(r"^shared blocks:\s+(\d+) at the peak \(peak KV reserved without sharing: "
                                          r"(\d+) tokens\)", stdout, re.M).groups())
    assert (shared, unshared) == (stats["shared_blocks_peak"], stats["peak_unshared_tokens"])
    number = lambda label: int(re.search(rf"^{label}:\s+(\d+)", stdout, re.M).group(1))
    assert number("prefix cache hits") == stats["prefix_hit_tokens"]
    assert number("copy-on-write copies") == stats["cow_copies"]
    assert number("swapped") == stats["swapped_bytes"]
    assert number("requests") == stats["requests"] == stats["finished"] == 3 * N
    assert stats["peak_used_tokens"] == max(run["timeline"]["used_tokens"])
    # Sharing stores each shared block once: the tokens held never exceed the room reserved.
    assert all(u <= r for u, r in zip(run["timeline"]["used_tokens"], run["timeline"]["reserved_tokens"]))


def test_one_beam_is_greedy(greedy, tiny_ckpt, tmp_path):
    run, _ = run_json(tiny_ckpt, tmp_path, *COMMON, "--beams", 1)
    assert generated(run) == generated(greedy)


def test_sampling_is_reproducible_and_survives_preemption_by_swap_and_by_recompute(tiny_ckpt, tmp_path):
    sample = ["--ref-lengths", "--max-seq-len", 120, "--quiet", "--samples", 2, "--temperature", 0.9, "--seed", 5,
              "--block-size", 8]
    free, _ = run_json(tiny_ckpt, tmp_path, *sample, n=2)
    outputs = generated(free)
    assert len({tuple(g) for g in outputs}) == 4, "samples at temperature 0.9 should differ"
    assert free["stats"]["preemptions"] == 0
    budget = ["--kv-budget-tokens", 240]  # 30 blocks for 4 samples of 98 to 120 tokens: preemption
    runs = {mode: run_json(tiny_ckpt, tmp_path, *sample, *budget, "--preempt", mode, n=2)[0]
            for mode in ("swap", "recompute")}
    for mode, run in runs.items():
        assert generated(run) == outputs, f"--preempt {mode} changed the samples"
        assert run["stats"]["preemptions"] > 0 and run["stats"]["peak_reserved_tokens"] <= 240
    assert runs["swap"]["stats"]["swapped_bytes"] > 0 and runs["recompute"]["stats"]["swapped_bytes"] == 0


def test_prefix_sharing_changes_no_token(tiny_ckpt, tmp_path):
    shared, _ = run_json(tiny_ckpt, tmp_path, *COMMON, "--system-prompt", SYSTEM, "--prefix-sharing")
    alone, _ = run_json(tiny_ckpt, tmp_path, *COMMON, "--system-prompt", SYSTEM)
    assert generated(shared) == generated(alone)
    prompts = [r["prompt_ids"] for r in shared["requests"]]
    tokenizer = paged.load_tokenizer(tiny_ckpt / "tokenizer.model")
    # Llama 3's chat format: the system turn right after <|begin_of_text|>, then the user's.
    before_user_text = paged.encode_chat(tokenizer, "", SYSTEM)[:-5]  # less <|eot_id|> and the assistant header
    assert tokenizer.decode(before_user_text) == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                                                  f"{SYSTEM}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n")
    assert all(p[:len(before_user_text)] == before_user_text for p in prompts) and len(before_user_text) > 32

    def common(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    # All three are admitted together: the first stores its blocks, the others share every full block
    # they have in common with an earlier one (never the block of their last token).
    block = 16
    expected = sum(max(min(common(p, q), len(p) - 1) // block * block for q in prompts[:i]) for i, p in enumerate(prompts) if i)
    assert shared["stats"]["prefix_hit_tokens"] == expected > 0
    assert alone["stats"]["prefix_hit_tokens"] == 0
    assert shared["stats"]["peak_reserved_tokens"] < alone["stats"]["peak_reserved_tokens"]


BAD_INPUTS = {
    "samples zero": (["--samples", "0"], "--samples must be positive, got 0"),
    "beams zero": (["--beams", "0"], "--beams must be positive, got 0"),
    "temperature negative": (["--temperature", "-1"], "--temperature must be a number >= 0, got -1.0"),
    "temperature nan": (["--temperature", "nan"], "--temperature must be a number >= 0"),
    "beams with samples": (["--beams", "2", "--samples", "2"], "use it without --samples and --temperature"),
    "beams with temperature": (["--beams", "2", "--temperature", "0.5"], "use it without --samples and --temperature"),
    "preempt unknown": (["--preempt", "drop"], "argument --preempt: invalid choice: 'drop'"),
    "samples not a number": (["--samples", "many"], "argument --samples: invalid int value: 'many'"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_gets_one_line_and_nonzero_exit(name):
    """fail() exits with its one-line message, which Python prints to stderr with exit status 1."""
    args, message = BAD_INPUTS[name]
    with pytest.raises(SystemExit) as exit:
        paged.parse_args(["1", *args])
    assert isinstance(exit.value.code, str) and "\n" not in exit.value.code
    assert exit.value.code.startswith("llama3-paged.py: error: ") and message in exit.value.code


def test_bad_input_as_a_user_sees_it(tiny_ckpt):
    result = run_script("llama3-paged.py", 1, "--ckpt-dir", tiny_ckpt, "--samples", 0)
    assert result.returncode == 1 and result.stderr == "llama3-paged.py: error: --samples must be positive, got 0\n"


@pytest.mark.parametrize("option", [["--samples", 11, "--temperature", 1], ["--beams", 11]])
def test_more_samples_or_beams_than_blocks_get_one_line(tiny_ckpt, option):
    # 10 blocks of 16 tokens: every sample or beam soon holds a block of its own, so 11 can never run.
    result = run_script("llama3-paged.py", 1, "--ckpt-dir", tiny_ckpt, "--kv-budget-tokens", 160, *option)
    assert result.returncode == 1 and result.stderr == ("llama3-paged.py: error: 11 samples or beams of a prompt "
                                                        "need at least as many KV blocks, but the budget holds 10 "
                                                        "blocks of 16 tokens\n")


# ---------------------------------------------------------------------------------------------
# In process: the cache against from-scratch recomputes.

@pytest.fixture(scope="module")
def model(tiny_ckpt):
    model = paged.load_model(tiny_ckpt, torch.device("cpu"), torch.float32)
    model["rope_cos"], model["rope_sin"] = paged.rope_tables(model, 128, "cpu")
    model["attention"], model["kernel_name"] = paged.pick_attention(torch.device("cpu"))
    return model


@pytest.fixture(scope="module")
def prompts(tiny_ckpt):
    tokenizer = paged.load_tokenizer(tiny_ckpt / "tokenizer.model")
    return [paged.encode_chat(tokenizer, text) for text in ("Why is the sky blue?", "Name three prime numbers.")]


def run_generate(model, requests, args, budget_tokens=4096, stop_ids=frozenset()):
    kv_cache, manager = paged.make_kv_cache(model, budget_tokens, len(requests), args, torch.device("cpu"), torch.float32)
    stats = paged.generate(model, requests, kv_cache, manager, args, set(stop_ids), torch.device("cpu"))
    return stats, kv_cache, manager


def prefill_from_scratch(model, tokens):
    """K and V of tokens from a fresh contiguous cache that holds nothing else, and the next token's
    log-probabilities (float64): each (n_layers, len(tokens), n_kv_heads, head_dim)."""
    shape = (len(model["layers"]), 1, len(tokens), model["n_kv_heads"], model["head_dim"])
    cache = (torch.zeros(shape), torch.zeros(shape))
    logits = paged.forward(model, torch.tensor([tokens]), torch.zeros(1, dtype=torch.int32), cache,
                           cache_batch_idx=torch.zeros(1, dtype=torch.int32))
    return cache[0][:, 0], cache[1][:, 0], torch.log_softmax(logits[0].float(), dim=-1).double()


def test_each_sample_caches_its_own_tokens(model, prompts):
    """After the samples diverge, each one's K and V, read through its own block table when it finishes,
    equal a from-scratch prefill of its own tokens; and they did share the prompt's blocks until then."""
    args = paged.parse_args(["1", "--samples", "3", "--temperature", "1.5", "--seed", "3", "--block-size", "5",
                             "--max-seq-len", "80"])
    requests = paged.with_samples([paged.Request(0, prompts[0], 24, list(prompts[0]))], 3)
    seen = {}

    def read_then_free(req_id):  # every sample's cache, just before it gives its blocks back
        req, blocks = requests[req_id], manager.blocks[req_id]
        cached = len(req.tokens) - 1
        seen[req_id] = (kv_cache[0][:, blocks].flatten(1, 2)[:, :cached], kv_cache[1][:, blocks].flatten(1, 2)[:, :cached])
        free(req_id)

    kv_cache, manager = paged.make_kv_cache(model, 4096, len(requests), args, torch.device("cpu"), torch.float32)
    free, manager.free = manager.free, read_then_free
    stats = paged.generate(model, requests, kv_cache, manager, args, set(), torch.device("cpu"))

    assert len({tuple(r.generated_ids) for r in requests}) == 3, "samples at temperature 1.5 should differ"
    # The prompt (16 tokens) ends inside its fourth block: the two forks copy it, and share the three before.
    assert stats["cow_copies"] == 2 and stats["shared_blocks_peak"] >= 2 * 3
    for req in requests:
        k, v, _ = prefill_from_scratch(model, req.tokens[:-1])
        torch.testing.assert_close(seen[req.id][0], k, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(seen[req.id][1], v, rtol=1e-4, atol=1e-5)


def test_samples_do_not_depend_on_the_batch_or_on_their_number(model, prompts):
    """A sample's randomness is its own: a prompt's first two samples are the same alone or beside a third
    sample and another prompt's samples."""
    def sample(prompt_list, count):
        args = paged.parse_args(["1", "--samples", str(count), "--temperature", "1.0", "--seed", "11",
                                 "--max-seq-len", "80"])
        requests = paged.with_samples([paged.Request(i, p, 12, list(p)) for i, p in enumerate(prompt_list)], count)
        run_generate(model, requests, args)
        return [r.generated_ids for r in requests]

    together = sample(prompts, 3)
    assert sample(prompts[:1], 2) == together[:2]


def plain_beam_search(model, prompt, width, done):
    """Beam search by summed log-probability with no cache at all: every beam recomputed from its tokens.
    A beam for which done(tokens) holds keeps its place and score, and stops growing."""
    beams = [(0.0, list(prompt))]
    while not all(done(tokens) for _, tokens in beams if len(tokens) > len(prompt)) or len(beams[0][1]) == len(prompt):
        candidates = []
        for score, tokens in beams:
            if len(tokens) > len(prompt) and done(tokens):
                candidates.append((score, tokens))
                continue
            values, ids = prefill_from_scratch(model, tokens)[2].topk(width)
            candidates += [(score + v, tokens + [t]) for v, t in zip(values.tolist(), ids.tolist())]
        beams = sorted(candidates, key=lambda c: -c[0])[:width]
    return max(beams, key=lambda b: b[0])[1]


@pytest.mark.parametrize("stop", ["length", "stop token"])
def test_beam_search_matches_a_search_that_recomputes_every_beam(model, prompts, stop):
    width, max_seq_len = 3, 64
    if stop == "length":
        length = 7
        done = lambda tokens, p: len(tokens) - len(p) >= length
        stop_ids, ref_length = set(), length
    else:
        # A stop token that some beams (not all) produce: the second-best first token.
        stop_ids = {prefill_from_scratch(model, prompts[0])[2].topk(2).indices[1].item()}
        done = lambda tokens, p: tokens[-1] in stop_ids or len(tokens) >= len(p) + 8
        ref_length, max_seq_len = None, len(prompts[0]) + 8
    args = paged.parse_args(["2", "--beams", str(width), "--block-size", "4", "--max-seq-len", str(max_seq_len)])
    requests = [paged.Request(i, p, ref_length, list(p)) for i, p in enumerate(prompts)]
    if stop != "length":
        requests = requests[:1]
    stats, _, manager = run_generate(model, requests, args, stop_ids=stop_ids)
    for req in requests:
        assert req.done
        assert req.tokens == plain_beam_search(model, req.prompt_ids, width, lambda t: done(t, req.prompt_ids))
    # The beams shared their blocks (the prompt's, and each other's history) and copied on write.
    assert stats["shared_blocks_peak"] > 0 and stats["cow_copies"] > 0
    assert stats["peak_reserved_tokens"] < stats["peak_unshared_tokens"]
    assert sorted(manager.free_blocks) == list(range(manager.num_blocks)) and manager.shared == 0


def test_beam_search_under_preemption_starts_over_and_gives_the_same_answer(model, prompts):
    """A preempted beam search (its beams move together) starts over from its prompt, after the older one."""
    args = paged.parse_args(["2", "--beams", "3", "--block-size", "4", "--max-seq-len", "64"])
    answers = []
    for budget in (4096, 48):  # 12 blocks: one prompt's 3 beams of 26 tokens fit (in 10), both don't
        requests = [paged.Request(i, p, 10, list(p)) for i, p in enumerate(prompts)]
        stats, _, _ = run_generate(model, requests, args, budget_tokens=budget)
        answers.append([r.tokens for r in requests])
        assert (stats["preemptions"] > 0) == (budget == 48)
    assert answers[0] == answers[1]
    requests = [paged.Request(i, p, 10, list(p)) for i, p in enumerate(prompts)]
    with pytest.raises(SystemExit, match="cannot hold request 0, searching with 3 beams"):
        run_generate(model, requests, args, budget_tokens=32)  # 8 blocks: one prompt's beams don't fit
