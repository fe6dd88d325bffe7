"""LocalAI registration files for an installed backend folder (scripts/install.sh calls this).

- `metadata.json`: what LocalAI's `ListSystemBackends` reads from each backend folder
  (`core/gallery.BackendMetadata`: name, alias, meta_backend_for, gallery_url, installed_at).
- `gallery.yaml`: a backend gallery in LocalAI's `backend/index.yaml` shape: a meta entry whose
  `capabilities` map `metal` (Apple Silicon, what LocalAI reports on darwin/arm64) and `default`
  to concrete entries, whose `uri` is the installed folder (LocalAI copies a directory URI).
- with `--drop-in`: sibling folders `mlx-vlm/` and `mlx-distributed/` (each a `run.sh` that
  execs this backend, plus metadata), so model YAMLs written for LocalAI's three MLX backends
  run here unchanged; the folder itself gets the alias `mlx`.

Usage: ``python -m mlxbackend.gallery TARGET [--drop-in]``
"""

import argparse
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import yaml

from mlxbackend import publish

# LocalAI's core/gallery types, by their JSON/YAML names.
METADATA_KEYS = frozenset({"alias", "meta_backend_for", "name", "gallery_url", "installed_at"})
ENTRY_KEYS = frozenset(
    {"url", "name", "description", "license", "urls", "icon", "tags", "files", "size"}
    | {"gallery", "installed", "alias", "uri", "capabilities", "mirrors"}
)
META_NAME = "mlxbackend"
DROP_IN_NAMES = ("mlx-vlm", "mlx-distributed")  # with the folder's alias "mlx": LocalAI's three
DESCRIPTION = (
    "Apple-Silicon-native LocalAI backend on MLX: text (mlx-lm, continuous batching, prefix "
    "cache, structured output, LoRA, speculation), vision/video/audio input (mlx-vlm), "
    "transcription, TTS, VAD, images, embeddings, fine-tuning and quantization jobs, "
    "GGUF import, distributed inference across Macs."
)
TAGS = [
    "text-to-text", "LLM", "MLX", "multimodal", "speech-to-text", "text-to-speech",
    "image-generation", "embeddings", "fine-tuning", "quantization",
]  # fmt: skip


def now() -> str:
    """RFC 3339, as LocalAI writes installed_at."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def backend_metadata(name: str, alias: str = "") -> dict:
    meta = {"name": name, "installed_at": now()}
    if alias and alias != name:
        meta["alias"] = alias
    return meta


def gallery_entries(target: Path) -> list:
    """The gallery index: one meta entry and its concrete entries (Metal, and CPU elsewhere)."""
    common = {
        "description": DESCRIPTION,
        "license": "MIT",
        "urls": ["https://github.com/ml-explore/mlx", "https://localai.io"],
        "tags": TAGS,
    }
    return [
        {
            "name": META_NAME,
            "alias": "mlx",
            **common,
            "capabilities": {"metal": f"metal-{META_NAME}", "default": f"cpu-{META_NAME}"},
        },
        {"name": f"metal-{META_NAME}", "alias": "mlx", "uri": str(target), **common},
        {"name": f"cpu-{META_NAME}", "alias": "mlx", "uri": str(target), **common},
    ]


def alias_folder(backends: Path, name: str, target: Path) -> Path:
    """A sibling backend folder `name` whose run.sh execs the installed backend's run.sh."""
    folder = backends / name
    folder.mkdir(parents=True, exist_ok=True)
    run = folder / "run.sh"
    publish.write_text(run, f'#!/usr/bin/env bash\nexec "{target}/run.sh" "$@"\n')
    os.chmod(run, 0o755)
    publish.write_json(folder / "metadata.json", backend_metadata(name))
    return folder


def write_all(target: Path, drop_in: bool = False) -> list:
    """metadata.json and gallery.yaml in `target` (+ drop-in folders beside it); returns paths."""
    target = target.resolve()
    alias = "mlx" if drop_in or target.name == "mlx" else ""
    written = [target / "metadata.json", target / "gallery.yaml"]
    publish.write_json(written[0], backend_metadata(target.name, alias))
    publish.write_text(
        written[1], yaml.safe_dump(gallery_entries(target), sort_keys=False, width=100)
    )
    if drop_in:
        written += [alias_folder(target.parent, n, target) for n in DROP_IN_NAMES]
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlxbackend.gallery", description=__doc__)
    parser.add_argument("target", type=Path, help="the installed backend folder (run.sh, venv)")
    parser.add_argument(
        "--drop-in", action="store_true", help="also answer as mlx, mlx-vlm, mlx-distributed"
    )
    args = parser.parse_args(argv)
    if not (args.target / "run.sh").exists():
        print(f"{args.target} has no run.sh: not a backend folder", file=sys.stderr)
        return 2
    for path in write_all(args.target, args.drop_in):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
