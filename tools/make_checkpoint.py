"""Write a random-weight Llama 3 checkpoint in Meta's original format.

The directory gets params.json, consolidated.00.pth and the genuine Llama 3
tokenizer.model (from the llama-models package), so the inference scripts load
it like a real download: the output is gibberish, but shapes, dtypes and
memory use are real.

Presets: `tiny` (~35 MB) is for tests and the CPU demo; `8b` has
Llama-3-8B's shape (~16 GB in bf16) and `1b` Llama-3.2-1B's (~2.5 GB), for memory checks on a GPU:
    python tools/make_checkpoint.py /tmp/ckpt-8b --preset 8b --device cuda
"""
import importlib.resources
import json
import math
import os
from pathlib import Path

import torch

from cli import ArgumentParser, fail

PRESETS = {
    # Tied embeddings like Llama 3.2 1B/3B: no output.weight, saving ~16M params (and RoPE scaled 32x, as theirs).
    "tiny": dict(tied=True, params=dict(
        dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32,
        ffn_dim_multiplier=None, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)),
    "8b": dict(tied=False, params=dict(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
        ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=False)),
    # Llama-3.2-1B's shape: 16 layers, FFN 8192, tied output, scaled RoPE; no output.weight makes the scripts
    # scale RoPE 32x, as Llama 3.2 1B was trained.
    "1b": dict(tied=True, params=dict(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
        ffn_dim_multiplier=1.5, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)),
}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def ffn_hidden_dim(p):
    """Meta's FFN size rule (Llama-3-8B: 4096 -> 14336)."""
    hidden = int(2 * (4 * p["dim"]) / 3)
    if p["ffn_dim_multiplier"]:
        hidden = int(p["ffn_dim_multiplier"] * hidden)
    return p["multiple_of"] * math.ceil(hidden / p["multiple_of"])


def tensor_shapes(preset):
    """Name -> shape of every tensor in the checkpoint; allocates nothing. preset: a name in PRESETS, or a
    dict like one of its values."""
    spec = PRESETS[preset] if isinstance(preset, str) else preset
    p, tied = spec["params"], spec["tied"]
    dim, head_dim, hidden = p["dim"], p["dim"] // p["n_heads"], ffn_hidden_dim(p)
    shapes = {"tok_embeddings.weight": (p["vocab_size"], dim)}
    for i in range(p["n_layers"]):
        shapes.update({
            f"layers.{i}.attention.wq.weight": (p["n_heads"] * head_dim, dim),
            f"layers.{i}.attention.wk.weight": (p["n_kv_heads"] * head_dim, dim),
            f"layers.{i}.attention.wv.weight": (p["n_kv_heads"] * head_dim, dim),
            f"layers.{i}.attention.wo.weight": (dim, p["n_heads"] * head_dim),
            f"layers.{i}.feed_forward.w1.weight": (hidden, dim),
            f"layers.{i}.feed_forward.w3.weight": (hidden, dim),
            f"layers.{i}.feed_forward.w2.weight": (dim, hidden),
            f"layers.{i}.attention_norm.weight": (dim,),
            f"layers.{i}.ffn_norm.weight": (dim,),
        })
    shapes["norm.weight"] = (dim,)
    if not tied:  # tied checkpoints leave it out; the loader reuses tok_embeddings
        shapes["output.weight"] = (p["vocab_size"], dim)
    return shapes


def param_count(preset):
    """Total parameters of a preset, computed from shapes alone."""
    return sum(math.prod(shape) for shape in tensor_shapes(preset).values())


def tokenizer_source():
    # files() only imports llama_models/__init__.py, which is light.
    try:
        return importlib.resources.files("llama_models") / "llama3" / "tokenizer.model"
    except ModuleNotFoundError:
        raise RuntimeError("llama-models is not installed: pip install llama-models") from None


def write_checkpoint(out_dir, preset="tiny", seed=0, device="cpu", dtype=torch.bfloat16, norm_std=0.0, tokenizer=None):
    """Write the checkpoint to out_dir and return the path of the .pth file. preset: a name in PRESETS, or a dict
    like one of its values. norm_std: RMSNorm weights 1 + norm_std * N(0, 1) instead of ones, so that a test
    can tell one norm from another. tokenizer: a tokenizer.model to copy (default: llama-models' own)."""
    # Check everything before generating anything: the 8b preset takes a while.
    if isinstance(preset, str) and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r} (use cpu or cuda)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but CUDA is not available")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir} exists and is not a directory")
    tokenizer = Path(tokenizer) if tokenizer else tokenizer_source()
    os.makedirs(out_dir, exist_ok=True)
    # One generator seeded once, so the same seed/preset/device gives the same weights.
    gen = torch.Generator(device=device).manual_seed(seed)
    state_dict = {}
    for name, shape in tensor_shapes(preset).items():
        if name.endswith("norm.weight"):
            w = torch.ones(shape, device=device)
            if norm_std:
                w += norm_std * torch.randn(shape, generator=gen, device=device)
        else:
            # Small embeddings, as in trained Llama models (std ~0.02). With std 1 the residual stream is
            # all embedding and a tied output layer just predicts the input token again, forever; with
            # 0.02 the layers dominate and the greedy output depends on the whole context.
            std = 0.02 if name == "tok_embeddings.weight" else shape[1] ** -0.5
            w = torch.randn(shape, generator=gen, device=device).mul_(std)
        # Cast on the device, then keep only the final-dtype copy in host memory.
        state_dict[name] = w.to(dtype).cpu()
        del w
    ckpt_path = os.path.join(out_dir, "consolidated.00.pth")
    torch.save(state_dict, ckpt_path)
    with open(os.path.join(out_dir, "params.json"), "w") as f:
        json.dump((PRESETS[preset] if isinstance(preset, str) else preset)["params"], f, indent=2)
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(tokenizer.read_bytes())
    return ckpt_path


def main():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--preset", default="tiny", help="tiny (default), 8b or 1b")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 (default) or float32")
    args = parser.parse_args()
    try:
        if args.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {args.dtype!r} (use bfloat16 or float32)")
        path = write_checkpoint(args.out_dir, args.preset, args.seed, args.device, DTYPES[args.dtype])
    except (ValueError, RuntimeError, OSError) as e:
        fail(str(e))
    size_mb = os.path.getsize(path) / 1e6
    print(f"wrote {args.out_dir} (preset {args.preset}, {param_count(args.preset):,} params, "
          f"consolidated.00.pth {size_mb:,.1f} MB)")


if __name__ == "__main__":
    main()
