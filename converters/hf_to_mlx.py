"""Convert a Hugging Face (or MLX) checkpoint folder into an MLX model folder.

A thin wrapper around ``mlx_lm.convert`` that adds an atomic output folder,
offline-friendly source resolution and the rope_theta fix: transformers 5.x
nests ``rope_theta`` under ``rope_parameters``, which mlx-lm's llama/qwen2
ignore (silently falling back to 10000), so it is copied to the top level.

Usage: ``python -m converters.hf_to_mlx SRC OUT [-q] [--q-bits 4] [--dtype float32]``
"""

import argparse
import json
import os
import sys
from pathlib import Path

from converters.gguf_to_mlx import DTYPES, atomic_output_dir
from mlxbackend import publish


def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_source(
    hf_path_or_dir, revision: str | None = None, offline: bool | None = None
) -> Path:
    """Return a local folder for a checkpoint path or Hugging Face repo id.

    A hub id is looked up in the local Hugging Face cache; it is downloaded
    only when not offline (``offline=None`` follows ``HF_HUB_OFFLINE``).
    """
    path = Path(hf_path_or_dir).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json; not a Hugging Face/MLX model folder")
        return path
    repo = str(hf_path_or_dir)
    looks_like_path = repo.startswith(("/", ".", "~")) or repo.count("/") != 1
    if looks_like_path:
        raise FileNotFoundError(f"no such model folder: {path.resolve()}")

    from huggingface_hub import constants, snapshot_download
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    offline = _env_offline() if offline is None else offline
    try:
        return Path(
            snapshot_download(
                repo,
                revision=revision,
                allow_patterns=DEFAULT_ALLOW_PATTERNS,
                local_files_only=offline,
            )
        )
    except Exception as e:
        tried = f"the local folder {path.resolve()} (does not exist), the Hugging Face cache {constants.HF_HUB_CACHE}"
        if offline:
            raise FileNotFoundError(
                f"{repo!r} is not available offline: tried {tried}; no download was attempted "
                "(offline / HF_HUB_OFFLINE=1). Download it on a connected machine or pass a local folder."
            ) from e
        raise FileNotFoundError(
            f"{repo!r} could not be fetched: tried {tried} and the Hugging Face Hub ({type(e).__name__}: {e})"
        ) from e


def fix_rope_config(folder) -> bool:
    """Copy ``rope_parameters`` to the top-level keys mlx-lm reads; return True if changed."""
    config_path = Path(folder) / "config.json"
    config = json.loads(config_path.read_text())
    changed = False
    for cfg in (config, config.get("text_config")):
        if not isinstance(cfg, dict) or not isinstance(cfg.get("rope_parameters"), dict):
            continue
        params = cfg["rope_parameters"]
        if "rope_theta" not in cfg and "rope_theta" in params:
            cfg["rope_theta"] = params["rope_theta"]
            changed = True
        rope_type = params.get("rope_type", params.get("type"))
        if rope_type not in (None, "default") and not cfg.get("rope_scaling"):
            cfg["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
            changed = True
    if changed:
        publish.write_text(config_path, json.dumps(config, indent=4))
    return changed


def convert_hf(
    hf_path_or_dir,
    out_dir,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    q_mode: str = "affine",
    dtype: str | None = None,
    dequantize: bool = False,
    trust_remote_code: bool = False,
    *,
    revision: str | None = None,
    offline: bool | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert (and optionally quantize or dequantize) a checkpoint with ``mlx_lm.convert``.

    The result is built beside ``out_dir`` and renamed into place, so a failed
    run leaves nothing under ``out_dir``; an existing ``out_dir`` raises
    ``FileExistsError`` unless ``overwrite``. Returns ``out_dir``.
    """
    from mlx_lm import convert

    out_dir = Path(out_dir)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    if quantize and dequantize:
        raise ValueError("choose either quantize or dequantize, not both")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True to replace it)")
    source = resolve_source(hf_path_or_dir, revision=revision, offline=offline)

    with atomic_output_dir(out_dir, overwrite) as tmp:
        tmp.rmdir()  # mlx_lm.convert insists on creating the folder itself
        convert(
            str(source),
            mlx_path=str(tmp),
            quantize=quantize,
            q_group_size=q_group_size if quantize else None,
            q_bits=q_bits if quantize else None,
            q_mode=q_mode,
            dtype=dtype,
            dequantize=dequantize,
            trust_remote_code=trust_remote_code,
        )
        fix_rope_config(tmp)
    return out_dir


def main(argv=None) -> int:
    """Command line: ``python -m converters.hf_to_mlx SRC OUT [options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m converters.hf_to_mlx",
        description="Convert a Hugging Face or MLX checkpoint into an MLX model folder.",
    )
    parser.add_argument("src", help="local model folder or Hugging Face repo id")
    parser.add_argument("out", help="output folder (must not exist unless --overwrite)")
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    parser.add_argument("--q-bits", type=int, default=4)
    parser.add_argument("--q-group-size", type=int, default=64)
    parser.add_argument("--q-mode", default="affine", choices=("affine", "mxfp4", "nvfp4", "mxfp8"))
    parser.add_argument("--dtype", choices=DTYPES, default=None)
    parser.add_argument(
        "--dequantize", action="store_true", help="dequantize a quantized checkpoint"
    )
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--revision", default=None)
    parser.add_argument(
        "--offline", action="store_true", help="never download (sets HF_HUB_OFFLINE=1)"
    )
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        out = convert_hf(
            args.src,
            args.out,
            quantize=args.quantize,
            q_bits=args.q_bits,
            q_group_size=args.q_group_size,
            q_mode=args.q_mode,
            dtype=args.dtype,
            dequantize=args.dequantize,
            trust_remote_code=args.trust_remote_code,
            revision=args.revision,
            offline=True if args.offline else None,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
