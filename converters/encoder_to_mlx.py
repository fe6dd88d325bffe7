"""Convert a Hugging Face BERT-family encoder folder (bert, roberta, xlm-roberta; an embedding
model or a cross-encoder) into an MLX encoder folder that ``mlxbackend.embed.bert`` loads.

The output holds the sanitized weights as ``model.safetensors`` in the chosen dtype,
``config.json`` (the HF fields plus an ``mlx_encoder`` marker), the tokenizer files and the
sentence-transformers files (modules.json, the module folders it names,
sentence_bert_config.json, config_sentence_transformers.json). Every weight is checked against
the model built from the config before anything is written; the folder is written beside the
target and renamed into place. A source with only ``pytorch_model.bin`` needs torch.

Usage: ``python -m converters.encoder_to_mlx SRC DST [--dtype float16] [--overwrite]``
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

from converters.gguf_to_mlx import DTYPES, atomic_output_dir
from converters.progress import step_bar
from mlxbackend.errors import InvalidInput

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "sentencepiece.bpe.model", "spiece.model",
)  # fmt: skip
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
ST_FOLDERS = ("1_Pooling", "2_Normalize")


def _module_folders(src: Path) -> list:
    """The module folders modules.json names (besides the usual ones), relative to src."""
    folders = set(ST_FOLDERS)
    modules_file = src / "modules.json"
    if modules_file.is_file():
        try:
            modules = json.loads(modules_file.read_text())
        except ValueError as e:
            raise ValueError(f"{modules_file} is not valid JSON: {e}") from e
        folders.update(m.get("path") for m in modules if isinstance(m, dict) and m.get("path"))
    return sorted(f for f in folders if (src / f).is_dir())


def convert_encoder(
    src, dst, dtype: str | None = "float32", overwrite: bool = False, progress=None
) -> Path:
    """Convert the HF (or MLX) encoder folder ``src`` into the MLX folder ``dst``; returns ``dst``.

    ``dtype``: float dtype of the written weights (``None`` keeps the source's).
    Raises ``FileExistsError``, ``FileNotFoundError``, ``ValueError`` or
    ``mlxbackend.errors.InvalidInput`` (unsupported config, missing/unexpected weights).
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxbackend.embed.bert import build_model, read_config, read_weights

    report = progress or (lambda done, total, name: None)
    steps = 4
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    if not src.is_dir():
        raise FileNotFoundError(f"no such encoder folder: {src}")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True to replace it)")

    report(0, steps, "reading config")
    config = read_config(src)
    report(1, steps, "reading weights")
    weights = read_weights(src)
    report(2, steps, "checking weights")
    target = getattr(mx, dtype) if dtype else None
    model = build_model(config, weights, target, where=str(src))
    flat = dict(tree_flatten(model.parameters()))
    stored = {
        str(v.dtype).rsplit(".", 1)[-1]
        for v in flat.values()
        if mx.issubdtype(v.dtype, mx.floating)
    }

    report(3, steps, "writing")
    out_config = dict(config)
    out_config["mlx_encoder"] = {"format": 1, "dtype": dtype or ",".join(sorted(stored))}
    with atomic_output_dir(dst, overwrite) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), flat, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
        for name in TOKENIZER_FILES + ST_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        for folder in _module_folders(src):
            shutil.copytree(src / folder, tmp / folder)
    report(4, steps, "done")
    return dst


def main(argv=None) -> int:
    """Command line: ``python -m converters.encoder_to_mlx SRC DST [--dtype] [--overwrite]``."""
    parser = argparse.ArgumentParser(
        prog="mlxbackend convert encoder",
        description="Convert a Hugging Face BERT/RoBERTa/XLM-RoBERTa encoder folder (embedding model "
        "or cross-encoder) into an MLX encoder folder.",
    )
    parser.add_argument("src", help="Hugging Face (or MLX) encoder folder")
    parser.add_argument("dst", help="output folder (must not exist unless --overwrite)")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float32",
        help="float dtype of the weights (default float32: the fast path on CPU; float16 for Metal)",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output folder"
    )
    args = parser.parse_args(argv)

    try:
        with step_bar("starting", 24) as report:
            out = convert_encoder(
                args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, progress=report
            )
    except (ValueError, FileExistsError, FileNotFoundError, InvalidInput) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
