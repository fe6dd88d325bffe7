"""Voice activity detection (Silero VAD through mlx-audio): which LoadModel requests name a VAD
model. Kept free of MLX imports (the host imports it at start-up)."""

import json
from pathlib import Path

from converters.silero_vad import is_package_file
from mlxbackend.text.models import local_candidates, resolve_model_path

VAD_TYPES = ("vad", "silero", "silero-vad", "silero_vad")
# the `silero-vad` package's files: its reference model (what its ONNX and TorchScript runtimes
# run) and its tinygrad export
ONNX = "silero_vad.onnx"
SIBLING = "silero_vad_16k.safetensors"


def vad_source(model: str, model_file: str = "", model_path: str = "", model_type: str = ""):
    """The VAD weights LoadModel names (a Silero .safetensors / .onnx / .jit file, a folder
    holding one, or an mlx-audio silero_vad folder), or None when it is not a VAD model."""
    wanted = (model_type or "").strip().lower() in VAD_TYPES
    for path in local_candidates(model, model_file, model_path):
        try:
            if path.is_file() and _is_vad_file(path, wanted):
                return path
            if path.is_dir() and _is_vad_dir(path):
                return path
        except OSError:
            continue
    if wanted:
        return resolve_model_path(model, model_file, model_path)
    return None


def _is_vad_file(path: Path, wanted: bool) -> bool:
    if path.suffix == ".safetensors":
        return is_package_file(path)
    return path.suffix in (".onnx", ".jit") and (wanted or path.name.startswith("silero_vad"))


def _is_vad_dir(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
        if isinstance(config, dict) and config.get("model_type") in ("silero_vad", "silero"):
            return True
    except (OSError, ValueError):
        pass
    if (path / ONNX).is_file():
        return True
    return (path / SIBLING).is_file() and is_package_file(path / SIBLING)
