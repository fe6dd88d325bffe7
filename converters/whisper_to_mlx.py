"""Convert a whisper checkpoint into an MLX whisper folder that mlx-whisper (and our backend) loads.

Sources:

* a Hugging Face transformers whisper folder (``config.json`` with ``model_type: whisper`` and
  ``model*.safetensors`` or ``pytorch_model*.bin``): parameter names are mapped to mlx-whisper's
  (the same mapping as mlx-examples' ``whisper/convert.py``), conv kernels are transposed to MLX's
  (out, kernel, in) layout and ``alignment_heads`` is copied from ``generation_config.json``;
* an OpenAI whisper ``.pt`` checkpoint (``dims`` + ``model_state_dict``; needs torch);
* an existing MLX whisper folder (``config.json`` with the ModelDimensions fields plus
  ``weights.safetensors`` or ``weights.npz``): re-saved in another dtype, quantized or
  dequantized;
* a Hugging Face repo id, looked up in the local cache (downloaded only when not offline).

The output folder (``config.json`` = ModelDimensions + ``model_type`` [+ ``quantization``],
``weights.safetensors``) is written beside the target and renamed into place.

Usage: ``python -m converters.whisper_to_mlx SRC OUT [--dtype float16] [-q --q-bits 4]``
"""

import argparse
import json
import os
import re
import sys
from pathlib import Path

from converters.gguf_to_mlx import DTYPES, atomic_output_dir
from converters.progress import step_bar

DIM_NAMES = (
    "n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer",
    "n_vocab", "n_text_ctx", "n_text_state", "n_text_head", "n_text_layer",
)  # fmt: skip
Q_BITS = (2, 3, 4, 5, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)
HF_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.npz", "*.txt", "*.tiktoken"]

# HF transformers block names → mlx-whisper's (the tail after "<encoder|decoder>.layers.N.")
_HF_BLOCK = [
    (r"^self_attn_layer_norm\.", "attn_ln."),
    (r"^encoder_attn_layer_norm\.", "cross_attn_ln."),
    (r"^final_layer_norm\.", "mlp_ln."),
    (r"^self_attn\.", "attn."),
    (r"^encoder_attn\.", "cross_attn."),
    (r"\.q_proj\.", ".query."),
    (r"\.k_proj\.", ".key."),
    (r"\.v_proj\.", ".value."),
    (r"\.out_proj\.", ".out."),
    (r"^fc1\.", "mlp1."),
    (r"^fc2\.", "mlp2."),
]
_HF_TOP = {
    "encoder.conv1.weight": "encoder.conv1.weight",
    "encoder.conv1.bias": "encoder.conv1.bias",
    "encoder.conv2.weight": "encoder.conv2.weight",
    "encoder.conv2.bias": "encoder.conv2.bias",
    "encoder.layer_norm.weight": "encoder.ln_post.weight",
    "encoder.layer_norm.bias": "encoder.ln_post.bias",
    "decoder.layer_norm.weight": "decoder.ln.weight",
    "decoder.layer_norm.bias": "decoder.ln.bias",
    "decoder.embed_tokens.weight": "decoder.token_embedding.weight",
    "decoder.embed_positions.weight": "decoder.positional_embedding",
}
ENCODER_POSITIONS = "encoder.positional_embedding"  # fixed sinusoids; mlx-whisper recomputes them
OUTPUT_PROJECTION = "proj_out.weight"  # tied to the token embedding in whisper


def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------- sources


def resolve_source(src, offline: bool | None = None) -> Path:
    """A local file/folder, or a Hugging Face repo id found in the cache (downloaded when online)."""
    path = Path(src).expanduser()
    if path.exists():
        return path
    repo = str(src)
    if repo.startswith(("/", ".", "~")) or repo.count("/") != 1:
        raise FileNotFoundError(f"no such whisper checkpoint: {path.resolve()}")
    from huggingface_hub import constants, snapshot_download

    offline = _env_offline() if offline is None else offline
    try:
        folder = Path(
            snapshot_download(repo, allow_patterns=HF_ALLOW_PATTERNS, local_files_only=offline)
        )
        if not offline and not _has_weights(folder):  # an old repo with only pytorch_model.bin
            folder = Path(
                snapshot_download(repo, allow_patterns=HF_ALLOW_PATTERNS + ["pytorch_model*.bin"])
            )
        return folder
    except Exception as e:
        tried = f"the local path {path.resolve()} (does not exist) and the Hugging Face cache {constants.HF_HUB_CACHE}"
        if offline:
            raise FileNotFoundError(
                f"{repo!r} is not available offline: tried {tried}; no download was attempted "
                "(offline / HF_HUB_OFFLINE=1). Download it on a connected machine or pass a local folder."
            ) from e
        raise FileNotFoundError(
            f"{repo!r} could not be fetched: tried {tried} and the Hub ({type(e).__name__}: {e})"
        ) from e


def _has_weights(folder: Path) -> bool:
    return (
        any(folder.glob("*.safetensors"))
        or any(folder.glob("*.npz"))
        or any(folder.glob("pytorch_model*.bin"))
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def detect_kind(path: Path) -> str:
    """'openai' (a .pt file), 'mlx' (an MLX whisper folder) or 'hf' (a transformers folder)."""
    if path.is_file():
        if path.suffix in (".pt", ".pth"):
            return "openai"
        raise ValueError(
            f"{path} is not a whisper checkpoint (expected a folder or an OpenAI .pt file)"
        )
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{path} has no config.json; not a whisper model folder")
    config = _read_json(config_path)
    if all(k in config for k in DIM_NAMES):
        return "mlx"
    if config.get("model_type") == "whisper" or "num_mel_bins" in config:
        return "hf"
    raise ValueError(
        f"{path} is not a whisper model (config.json model_type={config.get('model_type')!r}; "
        "expected a transformers whisper folder, an MLX whisper folder or an OpenAI .pt checkpoint)"
    )


def _torch_to_mx(t):
    import mlx.core as mx
    import torch

    t = t.detach().cpu()
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.dtype == torch.bfloat16:
        return mx.array(t.float().numpy()).astype(mx.bfloat16)
    return mx.array(t.numpy())


def _load_torch(path: Path):
    try:
        import torch
    except ImportError as e:
        raise ValueError(f"reading {path.name} needs torch, which is not installed") from e
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read {path} with torch.load: {type(e).__name__}: {e}") from e


def _hf_dims(config: dict) -> dict:
    def need(key):
        if key not in config:
            raise ValueError(f"whisper config.json lacks {key!r}")
        return int(config[key])

    if config.get("scale_embedding"):
        raise ValueError("scale_embedding=true is not supported by mlx-whisper")
    act = config.get("activation_function", "gelu")
    if act != "gelu":
        raise ValueError(f"activation_function {act!r} is not supported by mlx-whisper (only gelu)")
    d_model = need("d_model")
    for key in ("encoder_ffn_dim", "decoder_ffn_dim"):
        if key in config and int(config[key]) != 4 * d_model:
            raise ValueError(f"{key}={config[key]} but mlx-whisper needs 4*d_model={4 * d_model}")
    return dict(
        n_mels=need("num_mel_bins"),
        n_audio_ctx=need("max_source_positions"),
        n_audio_state=d_model,
        n_audio_head=need("encoder_attention_heads"),
        n_audio_layer=need("encoder_layers"),
        n_vocab=need("vocab_size"),
        n_text_ctx=need("max_target_positions"),
        n_text_state=d_model,
        n_text_head=need("decoder_attention_heads"),
        n_text_layer=need("decoder_layers"),
    )


def hf_key(key: str) -> str:
    """A transformers whisper parameter name → mlx-whisper's (ValueError if unknown)."""
    k = key[len("model.") :] if key.startswith("model.") else key
    if k == OUTPUT_PROJECTION:
        return k
    if k == "encoder.embed_positions.weight":
        return ENCODER_POSITIONS
    if k in _HF_TOP:
        return _HF_TOP[k]
    m = re.match(r"^(encoder|decoder)\.layers\.(\d+)\.(.+)$", k)
    if m:
        side, n, rest = m.groups()
        for pattern, repl in _HF_BLOCK:
            rest = re.sub(pattern, repl, rest)
        return f"{side}.blocks.{n}.{rest}"
    raise ValueError(f"unexpected parameter {key!r} in the transformers checkpoint")


def _load_hf(folder: Path):
    import mlx.core as mx

    config = _read_json(folder / "config.json")
    dims = _hf_dims(config)
    files = sorted(folder.glob("model*.safetensors"))
    raw = {}
    if files:
        for f in files:
            raw.update(mx.load(str(f)))
    else:
        bins = sorted(folder.glob("pytorch_model*.bin"))
        if not bins:
            raise ValueError(f"{folder} has no model*.safetensors or pytorch_model*.bin weights")
        for f in bins:
            state = _load_torch(f)
            raw.update({k: _torch_to_mx(v) for k, v in state.items()})
    weights = {}
    for k, v in raw.items():
        weights[hf_key(k)] = v
    tied = config.get("tie_word_embeddings", True)
    alignment = None
    gen = folder / "generation_config.json"
    if gen.is_file():
        heads = _read_json(gen).get("alignment_heads")
        if heads:
            alignment = mx.array(heads, dtype=mx.int32).reshape(-1, 2)
    return dims, _torch_conv_layout(weights), alignment, tied


def _load_openai(path: Path):
    ckpt = _load_torch(path)
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise ValueError(
            f"{path} is not an OpenAI whisper checkpoint (expected the keys 'dims' and 'model_state_dict')"
        )
    dims = {k: int(ckpt["dims"][k]) for k in DIM_NAMES if k in ckpt["dims"]}
    if len(dims) != len(DIM_NAMES):
        raise ValueError(f"{path}: dims lacks {sorted(set(DIM_NAMES) - set(dims))}")
    weights = {}
    for k, v in ckpt["model_state_dict"].items():
        if k == "alignment_heads":
            continue
        k = k.replace(".mlp.0.", ".mlp1.").replace(".mlp.2.", ".mlp2.")
        weights[k] = _torch_to_mx(v)
    return dims, _torch_conv_layout(weights), None, True


def _load_mlx(folder: Path):
    import mlx.core as mx

    config = _read_json(folder / "config.json")
    dims = {k: int(config[k]) for k in DIM_NAMES}
    wf = folder / "weights.safetensors"
    if not wf.exists():
        wf = folder / "weights.npz"
    if not wf.exists():
        raise ValueError(f"{folder} has no weights.safetensors or weights.npz")
    weights = dict(mx.load(str(wf)))
    alignment = weights.pop("alignment_heads", None)
    quant = config.get("quantization")
    if quant:
        for scales_key in [k for k in weights if k.endswith(".scales")]:
            prefix = scales_key[: -len(".scales")]
            q = quant[prefix] if isinstance(quant.get(prefix), dict) else quant
            weights[f"{prefix}.weight"] = mx.dequantize(
                weights[f"{prefix}.weight"], weights.pop(scales_key), weights.pop(f"{prefix}.biases", None),
                group_size=q.get("group_size", 64), bits=q.get("bits", 4),
                mode=q.get("mode", "affine"),
            )  # fmt: skip
    return dims, weights, alignment, True


# --------------------------------------------------------------------------- conversion


def _torch_conv_layout(weights: dict) -> dict:
    """torch Conv1d kernels (out, in, k) → MLX's (out, k, in)."""
    for name in ("encoder.conv1.weight", "encoder.conv2.weight"):
        if name in weights and weights[name].ndim == 3:
            weights[name] = weights[name].swapaxes(1, 2)
    return weights


def _check_and_fix(dims: dict, weights: dict, tied: bool) -> dict:
    """Check the fixed sinusoids and the tied output projection, then
    compare every name and shape with mlx-whisper's Whisper(dims)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_whisper.whisper import ModelDimensions, Whisper, sinusoids

    weights = dict(weights)
    pos = weights.pop(ENCODER_POSITIONS, None)
    if pos is not None:
        expect = sinusoids(dims["n_audio_ctx"], dims["n_audio_state"])
        if pos.shape != expect.shape:
            raise ValueError(
                f"encoder positional embedding has shape {pos.shape}, expected {expect.shape}"
            )
        diff = mx.abs(pos.astype(mx.float32) - expect).max().item()
        if diff > 2e-2:
            raise ValueError(
                f"the encoder positional embedding is not whisper's sinusoids (max diff {diff:.3g}); "
                "mlx-whisper cannot represent learned encoder positions"
            )

    proj = weights.pop(OUTPUT_PROJECTION, None)
    emb = weights.get("decoder.token_embedding.weight")
    if proj is not None and emb is not None:
        same = (
            proj.shape == emb.shape
            and mx.allclose(proj.astype(mx.float32), emb.astype(mx.float32)).item()
        )
        if not same:
            raise ValueError(
                "the output projection (proj_out) is not tied to the token embedding; mlx-whisper needs them tied"
            )
    elif proj is not None or not tied:
        raise ValueError(
            "the output projection is not tied to the token embedding; mlx-whisper needs them tied"
        )

    try:
        model = Whisper(ModelDimensions(**dims), mx.float32)
    except (TypeError, ValueError, AssertionError) as e:
        raise ValueError(f"invalid whisper dimensions {dims}: {e}") from e
    expected = {k: v.shape for k, v in tree_flatten(model.parameters()) if k != "alignment_heads"}
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise ValueError(
            "the checkpoint does not match mlx-whisper's Whisper"
            + (
                f"; missing: {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}"
                if missing
                else ""
            )
            + (
                f"; unexpected: {', '.join(extra[:8])}{' …' if len(extra) > 8 else ''}"
                if extra
                else ""
            )
        )
    for k, shape in expected.items():
        if tuple(weights[k].shape) != tuple(shape):
            raise ValueError(
                f"{k} has shape {tuple(weights[k].shape)}, mlx-whisper expects {tuple(shape)}"
            )
    return weights


def convert_whisper(
    src,
    out,
    dtype: str | None = "float32",
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    *,
    overwrite: bool = False,
    offline: bool | None = None,
    progress=None,
) -> Path:
    """Convert ``src`` (see the module docstring) into the MLX whisper folder ``out``.

    ``dtype`` is the float dtype of the written weights (``None``: keep the source's);
    ``quantize`` applies MLX affine quantization to the linear and embedding layers.
    Returns ``out``. Raises ``FileNotFoundError``, ``FileExistsError`` or ``ValueError``.
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_whisper.whisper import ModelDimensions, Whisper

    report = progress or (lambda done, total, name: None)
    steps = 5
    out = Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    if quantize and (q_bits not in Q_BITS or q_group_size not in Q_GROUP_SIZES):
        raise ValueError(f"quantization needs bits in {Q_BITS} and group size in {Q_GROUP_SIZES}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True to replace it)")

    report(0, steps, "resolving source")
    source = resolve_source(src, offline=offline)
    kind = detect_kind(source)
    report(1, steps, f"reading {kind} checkpoint")
    loader = {"hf": _load_hf, "openai": _load_openai, "mlx": _load_mlx}[kind]
    dims, weights, alignment, tied = loader(source)

    report(2, steps, "mapping weights")
    weights = _check_and_fix(dims, weights, tied)
    target = getattr(mx, dtype) if dtype else None
    if target is not None:
        weights = {
            k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()
        }

    model = Whisper(ModelDimensions(**dims), target or mx.float32)
    model.load_weights(list(weights.items()), strict=False)
    if alignment is not None:
        alignment = alignment.astype(mx.int32).reshape(-1, 2)
        bad = (
            (alignment[:, 0] >= dims["n_text_layer"])
            | (alignment[:, 1] >= dims["n_text_head"])
            | (alignment < 0).any(axis=1)
        )
        if bad.any().item():
            raise ValueError(
                f"alignment_heads {alignment.tolist()} do not fit {dims['n_text_layer']} layers × {dims['n_text_head']} heads"
            )
        model.alignment_heads = alignment

    config = {"model_type": "whisper", **dims}
    if quantize:
        report(3, steps, f"quantizing ({q_bits}-bit, group {q_group_size})")
        nn.quantize(
            model, group_size=q_group_size, bits=q_bits,
            class_predicate=lambda p, m: isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.shape[-1] % q_group_size == 0,
        )  # fmt: skip
        config["quantization"] = {"group_size": q_group_size, "bits": q_bits}
    else:
        report(3, steps, "casting" if dtype else "keeping dtype")
    flat = dict(tree_flatten(model.parameters()))
    mx.eval(flat)

    report(4, steps, "writing")
    with atomic_output_dir(out, overwrite) as tmp:
        mx.save_safetensors(str(tmp / "weights.safetensors"), flat, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    report(5, steps, "done")
    return out


def main(argv=None) -> int:
    """Command line: ``python -m converters.whisper_to_mlx SRC OUT [options]``."""
    parser = argparse.ArgumentParser(
        prog="mlxbackend convert whisper",
        description="Convert a whisper checkpoint (transformers folder, OpenAI .pt, MLX whisper folder "
        "or cached Hugging Face id) into an MLX whisper folder.",
    )
    parser.add_argument(
        "src", help="transformers/MLX whisper folder, OpenAI .pt file or Hugging Face repo id"
    )
    parser.add_argument("out", help="output folder (must not exist unless --overwrite)")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float32",
        help="float dtype of the weights (default float32: the fast path on CPU; float16 for Metal)",
    )  # fmt: skip
    parser.add_argument(
        "-q", "--quantize", action="store_true", help="affine-quantize linear/embedding layers"
    )
    parser.add_argument("--q-bits", type=int, default=4, choices=Q_BITS)
    parser.add_argument("--q-group-size", type=int, default=64, choices=Q_GROUP_SIZES)
    parser.add_argument(
        "--offline", action="store_true", help="never download (sets HF_HUB_OFFLINE=1)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output folder"
    )
    args = parser.parse_args(argv)
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"

    try:
        with step_bar("starting", 36) as report:
            out = convert_whisper(
                args.src, args.out, dtype=args.dtype, quantize=args.quantize, q_bits=args.q_bits,
                q_group_size=args.q_group_size, overwrite=args.overwrite,
                offline=True if args.offline else None, progress=report,
            )  # fmt: skip
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
