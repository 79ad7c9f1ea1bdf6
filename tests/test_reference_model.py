"""The scripts' model against one that is not ours: Meta's reference Llama 3 (llama_models/llama3/model.py,
installed with the llama-models package; it needs fairscale and a one-process torch.distributed group).

Both load the same consolidated.00.pth (bf16 weights, computed in float32 on both sides), get a real chat
prompt of a few hundred tokens from sharegpt-filtered.json, and must agree on:
  * the logits: the scripts' forward() returns the last position's; Meta's Transformer.forward(tokens,
    start_pos) returns every position's. Prefill, chunked prefill (new tokens after cached ones) and decode
    steps through the KV cache are all compared, within MAX_LOGIT_DIFF;
  * the greedy tokens: N_GENERATE of them, decoded with the cache, must be the same.
for three checkpoints (see CONFIGS), llama3-naive.py and llama3-paged.py (see SCRIPTS), and both
cache layouts the kernel reads (contiguous rows at cache_batch_idx; a paged pool through a block table).

The last tests plant bugs in the scripts' model (in-process, with monkeypatch) and check that the same
comparison then fails by far more than MAX_LOGIT_DIFF: the oracle is sensitive to what it is meant to catch.
"""
import inspect
import json
import math
from pathlib import Path

import make_checkpoint
import pytest
import torch
import torch.nn.functional as F

try:
    import fairscale.nn.model_parallel.initialize as fs_init
    import llama_models.llama3.model as meta_model
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import Transformer
except ImportError as e:  # fail loudly: a skipped oracle checks nothing
    raise ImportError(f"{e}: Meta's reference model needs `pip install llama-models fairscale` "
                      f"(see tools/requirements.txt)") from None

from conftest import pin_cpu_path
from load_scripts import load_script

ROOT = Path(__file__).resolve().parent.parent

# Largest |script logit - Meta logit| allowed, float32 on CPU. Measured (torch 2.13, x86 CPU), over prefill and
# decode in both layouts: 2.1e-6 for "tiny", 9.7e-6 for "llama3-gqa4-untied" (its untied output layer gives
# logits 4x wider), 1.8e-6 for "mha-theta1e4";
# the scripts compute RoPE angles in float64 and Meta in float32, and the sums run in other orders. Planted bugs
# (wrong RoPE direction, pairing, scaling or theta; GQA mapping; RMSNorm eps; causal mask; softmax scale; ...)
# give at least 1e-2 and mostly 0.1 to 7. So the bound is ~10x the largest difference seen, 100x below the least bug.
MAX_LOGIT_DIFF = 1e-4
N_GENERATE = 20   # greedy tokens per prompt
BLOCK_SIZE = 16   # of the paged layout
SCRIPT_OF = {"contiguous": "naive", "paged": "paged"}  # each script's attention reads the layout it uses
MAX_SEQ_LEN = 512  # of the caches and RoPE tables (Meta's freqs_cis covers twice this)

# Three checkpoints. "tiny" is tools/make_checkpoint.py's preset as shipped: Llama 3.1-style scaled RoPE,
# grouped-query attention (4 query heads on 2 KV heads), tied output like Llama 3.2 1B/3B (and so, like theirs, RoPE
# scaled 32x). The other two are written here, in the same format, and differ from it in every way the model code
# branches or indexes on.
# Their seeds give greedy runs with no near-tie (top two logits at least 1e-4 apart at every step, 50x the
# largest logit difference) and few repeated tokens.
CONFIGS = {
    "tiny": None,
    # Llama 3 (3.0) style, as Llama-3-8B: unscaled RoPE, untied output.weight, ffn_dim_multiplier; 8 query
    # heads on 2 KV heads (groups of 4), head_dim 16; eps 1e-6; random norm weights (a mixed-up norm shows).
    "llama3-gqa4-untied": dict(tied=False, seed=2, params=dict(
        dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=128256, multiple_of=64,
        ffn_dim_multiplier=1.3, norm_eps=1e-6, rope_theta=500000.0, use_scaled_rope=False)),
    # Plain multi-head attention with no n_kv_heads in params.json (both sides default it to n_heads), scaled
    # RoPE at theta 10000 (faster rotations: wrong angles show sooner), head_dim 64, three layers.
    "mha-theta1e4": dict(tied=True, seed=5, drop_keys=("n_kv_heads",), params=dict(
        dim=128, n_layers=3, n_heads=2, n_kv_heads=2, vocab_size=128256, multiple_of=32,
        ffn_dim_multiplier=None, norm_eps=1e-5, rope_theta=10000.0, use_scaled_rope=True)),
}
# The rungs above llama3-paged.py (swap, prefix, samples, beams) are not run against the oracle: their load_model,
# rope_tables, forward, attention and attention_torch are llama3-paged.py's word for word, which tests/test_twins.py
# checks, so running them here would compare the same code again at a few seconds a script.
SCRIPTS = {"naive": "llama3-naive.py", "paged": "llama3-paged.py"}
LAYOUTS = ("contiguous", "paged")


# ---------------------------------------------------------------------------------------------
# Setup: checkpoints, the scripts, Meta's model in a one-process model-parallel group.

def write_checkpoint(out_dir, spec, seed):
    """A random-weight checkpoint in Meta's format, written by tools/make_checkpoint.py from spec, with norm weights
    around 1 but each different (so that swapping two norms shows), less the params.json keys in drop_keys."""
    make_checkpoint.write_checkpoint(str(out_dir), preset=spec, seed=seed, norm_std=0.2)
    params = json.loads((out_dir / "params.json").read_text())
    (out_dir / "params.json").write_text(json.dumps({k: v for k, v in params.items() if k not in spec.get("drop_keys", ())}))


@pytest.fixture(scope="session")
def checkpoints(tiny_ckpt, tmp_path_factory):
    """Config name -> checkpoint directory, written on first use."""
    made = {"tiny": Path(tiny_ckpt)}

    def get(name):
        if name not in made:
            out = tmp_path_factory.mktemp(name)
            write_checkpoint(out, CONFIGS[name], CONFIGS[name]["seed"])
            made[name] = out
        return made[name]
    return get


@pytest.fixture(scope="session")
def model_parallel(tmp_path_factory):
    """torch.distributed (gloo, world size 1) and fairscale's model-parallel groups of size 1, which Meta's
    layers ask for their shard. Set up once; left alone if something else in this process already did it,
    and torn down at the end only if set up here."""
    import torch.distributed as dist
    made_pg = made_mp = False
    if not dist.is_initialized():
        init = (tmp_path_factory.mktemp("dist") / "rendezvous").as_uri()  # a file, not a TCP port
        dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
        made_pg = True
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(1)
        made_mp = True
    assert fs_init.get_model_parallel_world_size() == 1
    yield
    if made_mp:
        fs_init.destroy_model_parallel()
    if made_pg:
        dist.destroy_process_group()


@pytest.fixture(autouse=True, scope="module")
def cpu_path():
    """float32 on the CPU on any machine: the comparison is of the model code, which is the same on a GPU."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        pin_cpu_path(monkeypatch, *(load_script(name) for name in SCRIPTS))
        yield


@pytest.fixture(scope="session")
def prompts(tiny_ckpt):
    """Two real chat prompts from sharegpt-filtered.json, as the scripts encode them: a long one (a couple of
    hundred tokens: RoPE at larger positions, and the scaled frequencies, matter) and a shorter one."""
    mod = load_script("paged")
    tokenizer = mod.load_tokenizer(Path(tiny_ckpt) / "tokenizer.model")
    encoded = [mod.encode_chat(tokenizer, text) for text, _ in mod.load_prompts(ROOT / "sharegpt-filtered.json", 40, tokenizer)]
    long = next(ids for ids in encoded if 200 <= len(ids) <= 400)
    short = next(ids for ids in encoded if 64 < len(ids) <= 150)
    return long, short


def meta_apply_scaling(scale_factor):
    """Meta's apply_scaling, its own code, with the factor it hard-codes (8) replaced by scale_factor."""
    source = inspect.getsource(meta_model.apply_scaling)
    assert source.count("scale_factor = 8\n") == 1, "Meta's apply_scaling no longer hard-codes 8: see how it scales"
    namespace = dict(vars(meta_model))
    exec(source.replace("scale_factor = 8\n", f"scale_factor = {scale_factor}\n"), namespace)
    return namespace["apply_scaling"]


class Reference:
    """Meta's Transformer on one checkpoint, in float32, and its greedy runs (cached per prompt)."""

    def __init__(self, ckpt_dir):
        params = json.loads((ckpt_dir / "params.json").read_text())
        weights = torch.load(ckpt_dir / "consolidated.00.pth", map_location="cpu", weights_only=True)
        weights = {name: w.float() for name, w in weights.items()}
        # Llama 3.2 1B and 3B (the tied checkpoints) were trained with RoPE scaled 32x, as their config.json says
        # and Meta's maintainers confirmed (meta-llama/llama-models issue #166), but Meta's apply_scaling hard-codes
        # 8: for a tied checkpoint the table Meta's model builds at construction uses its formula with 32.
        scale_factor = 8 if "output.weight" in weights else 32
        # Meta's model always has an output layer; a tied checkpoint's is the embedding matrix.
        weights.setdefault("output.weight", weights["tok_embeddings.weight"])
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setattr(meta_model, "apply_scaling", meta_apply_scaling(scale_factor))
            self.model = Transformer(ModelArgs(**params, max_batch_size=1, max_seq_len=MAX_SEQ_LEN))
        self.model.load_state_dict(weights, strict=True)
        assert all(p.dtype == torch.float32 for p in self.model.parameters())
        self.runs = {}

    def greedy(self, ids):
        """(logits of every prompt position (len, vocab), logits before each generated token (N_GENERATE,
        vocab), the N_GENERATE greedy tokens). Decodes one token at a time with Meta's own KV cache."""
        key = tuple(ids)
        if key not in self.runs:
            prompt_logits = self.model.forward(torch.tensor([ids]), 0)[0]
            steps, tokens = [prompt_logits[-1]], []
            for i in range(N_GENERATE):
                tokens.append(int(steps[-1].argmax()))
                if i + 1 < N_GENERATE:
                    steps.append(self.model.forward(torch.tensor([[tokens[-1]]]), len(ids) + i)[0, -1])
            self.runs[key] = prompt_logits, torch.stack(steps), tokens
        return self.runs[key]


@pytest.fixture(scope="session")
def reference(model_parallel, checkpoints):
    made = {}

    def get(config):
        if config not in made:
            made[config] = Reference(checkpoints(config))
        return made[config]
    return get


@pytest.fixture(scope="session")
def script_model(checkpoints):
    """(script, config) -> (module, model dict with RoPE tables), through the script's own loader."""
    made = {}

    def get(script, config):
        if (script, config) not in made:
            mod = load_script(script)
            assert mod.DEVICE.type == "cpu" and mod.DTYPE == torch.float32
            model = mod.load_model(checkpoints(config))
            model["rope_cos"], model["rope_sin"] = mod.rope_tables(model, MAX_SEQ_LEN)
            made[script, config] = mod, model
        return made[script, config]
    return get


# ---------------------------------------------------------------------------------------------
# The scripts' side: a cache in either layout, filled with garbage where nothing was written.

class Cache:
    """KV cache for `rows` requests of up to MAX_SEQ_LEN tokens, in the layout the kernel reads.

    Contiguous: request r lives in cache row rows_of[r] (out of order, with a spare row).
    Paged: request r's blocks are a shuffled pick from the pool; the block table's entries past a request's
    own blocks point at other requests' blocks, as a zero-filled table does in the scripts.
    Every cache entry starts as large random numbers, so reading anything unwritten or another request's
    tokens changes the logits."""

    def __init__(self, model, layout, n_requests, seed=0):
        gen = torch.Generator().manual_seed(seed)
        n_layers, kv_shape = len(model["layers"]), (model["n_kv_heads"], model["head_dim"])
        self.layout = layout
        if layout == "contiguous":
            shape = (n_layers, n_requests + 1, MAX_SEQ_LEN, *kv_shape)
            self.rows = torch.randperm(n_requests + 1, generator=gen)[:n_requests].int()
        else:
            width = MAX_SEQ_LEN // BLOCK_SIZE
            num_blocks = n_requests * width + 3
            shape = (n_layers, num_blocks, BLOCK_SIZE, *kv_shape)
            blocks = torch.randperm(num_blocks, generator=gen)[:n_requests * width].view(n_requests, width)
            self.block_table = blocks.int()
        self.k = 100 * torch.randn(shape, generator=gen)
        self.v = 100 * torch.randn(shape, generator=gen)

    def forward(self, mod, model, tokens, cache_seqlens, requests):
        """The script's forward() for `requests` (indices), with cache_seqlens tokens each already cached."""
        requests = torch.tensor(requests)
        tokens, cache_seqlens = torch.as_tensor(tokens), torch.tensor(cache_seqlens, dtype=torch.int32)
        with torch.inference_mode():
            if self.layout == "contiguous":
                return mod.forward(model, tokens, cache_seqlens, (self.k, self.v), cache_batch_idx=self.rows[requests])
            # As the scripts do: a table only as wide as the longest request needs, so trailing entries of a
            # shorter request point at blocks that are not its own.
            width = -(-(int(cache_seqlens.max()) + tokens.shape[1]) // BLOCK_SIZE)
            table = self.block_table[requests, :width]
            return mod.forward(model, tokens, cache_seqlens, (self.k, self.v), block_table=table)


def script_greedy(mod, model, layout, prompt_list):
    """Prefill each prompt alone (as the scripts do), then decode all of them together for N_GENERATE - 1
    steps, greedily. Returns per prompt: (logits before each generated token (N_GENERATE, vocab), tokens)."""
    cache = Cache(model, layout, len(prompt_list))
    logits = [[cache.forward(mod, model, [ids], [0], [r])[0]] for r, ids in enumerate(prompt_list)]
    tokens = [[int(step[0].argmax())] for step in logits]
    for i in range(1, N_GENERATE):
        step = cache.forward(mod, model, [[t[-1]] for t in tokens], [len(ids) + i - 1 for ids in prompt_list],
                             list(range(len(prompt_list))))
        for r in range(len(prompt_list)):
            logits[r].append(step[r])
            tokens[r].append(int(step[r].argmax()))
    return [(torch.stack(lg), t) for lg, t in zip(logits, tokens)]


def compare(mod, model, ref, layout, prompt_list):
    """The largest logit difference over all prompts and steps, and whether every greedy token agreed."""
    worst, same_tokens = 0.0, True
    for ids, (logits, tokens) in zip(prompt_list, script_greedy(mod, model, layout, prompt_list)):
        _, ref_logits, ref_tokens = ref.greedy(ids)
        worst = max(worst, (logits - ref_logits).abs().max().item())
        same_tokens &= tokens == ref_tokens
    return worst, same_tokens


# ---------------------------------------------------------------------------------------------
# The comparisons.

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", CONFIGS)
def test_prefill_and_greedy_decode_match_meta(config, layout, reference, script_model, prompts):
    """Two prompts, each prefilled alone, then decoded together (different lengths in one batch): every
    step's logits within MAX_LOGIT_DIFF of Meta's for the same prompt alone, and the same greedy tokens."""
    mod, model = script_model(SCRIPT_OF[layout], config)
    ref = reference(config)
    results = script_greedy(mod, model, layout, list(prompts))
    for ids, (logits, tokens) in zip(prompts, results):
        _, ref_logits, ref_tokens = ref.greedy(ids)
        diff = (logits - ref_logits).abs().amax(-1)  # per step
        assert diff[0] <= MAX_LOGIT_DIFF, f"prefill of {len(ids)} tokens: max |logit diff| {diff[0]:.3g}"
        assert diff.max() <= MAX_LOGIT_DIFF, f"decode: max |logit diff| per step {diff.tolist()}"
        if tokens != ref_tokens:
            step = next(i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b)
            top2 = ref_logits[step].topk(2).values
            pytest.fail(f"greedy token {step} differs: {tokens[step]} here, {ref_tokens[step]} in Meta's "
                        f"(whose top two logits there are {top2[0] - top2[1]:.3g} apart)")
    assert len(set(results[0][1])) > 1, "a greedy run that repeats one token tests little: pick another seed"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", CONFIGS)
def test_chunked_prefill_matches_every_position(config, layout, reference, script_model, prompts):
    """The long prompt fed in chunks of 1 to 64 tokens after what is cached (the causal mask aligned to the
    cache's end, blocks filled across their boundaries): the logits at each chunk's end equal those at the
    same position of Meta's one-pass prefill."""
    mod, model = script_model(SCRIPT_OF[layout], config)
    ids = prompts[0]
    ref_logits = reference(config).greedy(ids)[0]
    cache = Cache(model, layout, 1, seed=1)
    sizes = [1] * 10 + [2, 3, 5, 7, 15, 16, 17, 31, 33, 64]
    start, diffs = 0, {}
    for size in sizes + [len(ids)]:
        chunk = ids[start:start + size]
        if not chunk:
            break
        logits = cache.forward(mod, model, [chunk], [start], [0])[0]
        start += len(chunk)
        diffs[start - 1] = (logits - ref_logits[start - 1]).abs().max().item()
    assert start == len(ids)
    assert max(diffs.values()) <= MAX_LOGIT_DIFF, f"max |logit diff| at position: {diffs}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_matches_meta(script, reference, script_model, prompts):
    """Each script's own load_model, rope_tables and forward (they are meant to be identical), with the attention
    for its own cache layout: one prompt."""
    mod, model = script_model(script, "tiny")
    layout = "contiguous" if script == "naive" else "paged"
    worst, same_tokens = compare(mod, model, reference("tiny"), layout, [prompts[0]])
    assert worst <= MAX_LOGIT_DIFF and same_tokens, f"max |logit diff| {worst:.3g}, same tokens: {same_tokens}"


# ---------------------------------------------------------------------------------------------
# RoPE's scale factor, which params.json does not give: 32 for Llama 3.2 1B and 3B (their config.json says so), the
# only Llama 3 models with a tied output layer; 8 for Llama 3.1 and the rest. Meta's apply_scaling hard-codes 8, so
# here the oracle is the published formula, written out below.

# name -> (tools/make_checkpoint.py preset it is made from, small, with these params changed; the factor it was
# trained with)
ROPE_CHECKPOINTS = {"llama-3.2-1b": ("1b", {}, 32),
                    "llama-3.1-8b": ("8b", {"use_scaled_rope": True}, 8)}  # Llama 3 8B's shape, scaled RoPE


def published_rope_frequencies(head_dim, theta, factor):
    """Llama 3.1's RoPE frequencies as published (low_freq_factor 1, high_freq_factor 4, original context 8192
    tokens), one at a time in float64: wavelengths under 8192 / 4 kept, over 8192 / 1 slowed `factor` times,
    linearly blended in 1 / wavelength between."""
    freqs = []
    for i in range(0, head_dim, 2):
        freq = theta ** (-i / head_dim)
        wavelength = 2 * math.pi / freq
        if wavelength < 8192 / 4:
            freqs.append(freq)
        elif wavelength > 8192 / 1:
            freqs.append(freq / factor)
        else:
            smooth = (8192 / wavelength - 1) / (4 - 1)
            freqs.append((1 - smooth) * freq / factor + smooth * freq)
    return torch.tensor(freqs, dtype=torch.float64)


@pytest.fixture(scope="module")
def rope_checkpoints(tmp_path_factory):
    """name -> (checkpoint directory, head_dim, rope_theta): one layer and a small vocabulary, the preset's head_dim,
    rope_theta, tied or untied output and use_scaled_rope (as changed in ROPE_CHECKPOINTS)."""
    made = {}
    for name, (preset, changes, _) in ROPE_CHECKPOINTS.items():
        spec = make_checkpoint.PRESETS[preset]
        head_dim = spec["params"]["dim"] // spec["params"]["n_heads"]
        params = dict(spec["params"], **changes, dim=2 * head_dim, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=256,
                      multiple_of=32, ffn_dim_multiplier=None)
        out = tmp_path_factory.mktemp(name)
        make_checkpoint.write_checkpoint(str(out), preset=dict(spec, params=params))
        made[name] = out, head_dim, params["rope_theta"]
    return made


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("checkpoint", ROPE_CHECKPOINTS)
def test_rope_scale_factor_follows_the_checkpoint(checkpoint, script, rope_checkpoints):
    """Every script, through its own load_model and rope_tables, rotates a Llama 3.2 1B-like checkpoint (tied
    output) with the factor 32 and a Llama 3.1-like one (untied) with 8: cos and sin of every angle to 8192
    tokens, against the published formula with that factor."""
    ckpt_dir, head_dim, theta = rope_checkpoints[checkpoint]
    factor = ROPE_CHECKPOINTS[checkpoint][2]
    mod = load_script(script)
    cos, sin = mod.rope_tables(mod.load_model(ckpt_dir), 8192)
    off = {}  # factor -> largest |cos or sin difference| from the formula with that factor
    for f in (8, 32):
        angles = torch.outer(torch.arange(8192, dtype=torch.float64), published_rope_frequencies(head_dim, theta, f))
        off[f] = max((cos.double() - angles.cos()).abs().max().item(), (sin.double() - angles.sin()).abs().max().item())
    assert off[factor] < 1e-6, f"{checkpoint}: tables off the factor-{factor} formula's by {off}"
    assert min(off.values()) < 0.1 < max(off.values()), f"the two factors' tables should differ plainly: {off}"


# ---------------------------------------------------------------------------------------------
# Planted bugs: each must move the logits far past MAX_LOGIT_DIFF, so the tests above would fail.

def rope_reversed(mod):
    """Rotate the other way (the sign of sin flipped)."""
    apply_rope = mod.apply_rope
    return "apply_rope", lambda x, cos, sin: apply_rope(x, cos, -sin)


def rope_halves(mod):
    """Pair dimension i with i + head_dim/2 (Hugging Face's layout) instead of 2i with 2i + 1 (Meta's)."""
    def apply_rope(x, cos, sin):
        first, second = x.float().chunk(2, dim=-1)
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1).type_as(x)
    return "apply_rope", apply_rope


def gqa_modulo(mod):
    """Query head h reads KV head h % n_kv_heads instead of h // (n_heads / n_kv_heads)."""
    attention = mod.attention

    def wrong(q, k_cache, v_cache, k, v, **kwargs):
        n_heads, n_kv = q.shape[2], k.shape[2]
        group = n_heads // n_kv
        # Feed the real kernel query (i % group) * n_kv + i // group at slot i: slot i reads KV head
        # i // group, which is that query's head index modulo n_kv.
        perm = torch.tensor([(i % group) * n_kv + i // group for i in range(n_heads)])
        out = attention(q[:, :, perm], k_cache, v_cache, k, v, **kwargs)
        return out[:, :, perm.argsort()]
    return "attention", wrong


def rms_eps_outside(mod):
    """x / (rms(x) + eps) instead of x / sqrt(mean(x^2) + eps)."""
    def rms_norm(x, weight, eps):
        x32 = x.float()
        return (x32 / (x32.pow(2).mean(-1, keepdim=True).sqrt() + eps)).type_as(x) * weight
    return "rms_norm", rms_norm


def rms_no_eps(mod):
    """eps left out."""
    rms_norm = mod.rms_norm
    return "rms_norm", lambda x, weight, eps: rms_norm(x, weight, 0.0)


PLANTS = {"rope-reversed": rope_reversed, "rope-halves": rope_halves, "gqa-modulo": gqa_modulo,
          "rms-eps-outside-sqrt": rms_eps_outside, "rms-no-eps": rms_no_eps}
# Model-level plants: (config, change to the model dict before the RoPE tables are made).
MODEL_PLANTS = {
    "rope-scaling-dropped": ("tiny", lambda model: model.update(use_scaled_rope=False)),
    "rope-scaling-added": ("llama3-gqa4-untied", lambda model: model.update(use_scaled_rope=True)),
    # The same output weights, but no longer the embedding tensor itself: rope_tables then takes 8 for 32.
    "rope-scale-8-when-tied": ("tiny", lambda model: model.update(output=model["output"].clone())),
    "rope-theta-1e4": ("tiny", lambda model: model.update(rope_theta=10000.0)),
    "output-tied-wrongly": ("llama3-gqa4-untied", lambda model: model.update(output=model["tok_embeddings"])),
    "norms-swapped": ("llama3-gqa4-untied", lambda model: [layer.update(attention_norm=layer["ffn_norm"],
                                                                         ffn_norm=layer["attention_norm"])
                                                            for layer in model["layers"]]),
}


@pytest.mark.parametrize("plant", PLANTS)
def test_oracle_catches_planted_bug(plant, monkeypatch, reference, script_model, prompts):
    config = "llama3-gqa4-untied" if plant == "gqa-modulo" else "tiny"  # groups of 4 make the mix-up plain
    mod, model = script_model("paged", config)
    monkeypatch.setattr(mod, *PLANTS[plant](mod))
    worst, _ = compare(mod, model, reference(config), "paged", [prompts[0]])
    assert worst > 100 * MAX_LOGIT_DIFF, f"{plant}: max |logit diff| only {worst:.3g}"


@pytest.mark.parametrize("plant", MODEL_PLANTS)
def test_oracle_catches_planted_model_bug(plant, reference, checkpoints, prompts):
    config, change = MODEL_PLANTS[plant]
    mod = load_script("naive")
    model = mod.load_model(checkpoints(config))  # a fresh copy: the shared one stays correct
    change(model)
    model["rope_cos"], model["rope_sin"] = mod.rope_tables(model, MAX_SEQ_LEN)
    worst, _ = compare(mod, model, reference(config), "contiguous", [prompts[0]])
    assert worst > 100 * MAX_LOGIT_DIFF, f"{plant}: max |logit diff| only {worst:.3g}"
