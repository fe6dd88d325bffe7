"""Silero VAD on MLX: load the weights (the `silero-vad` package's files, converted on load, or
an mlx-audio folder) and find speech segments with mlx-audio's implementation."""

import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from converters.silero_vad import is_package_file, onnx_branches, to_mlx_audio
from mlxbackend.errors import InvalidInput, Precondition
from mlxbackend.vad import ONNX, SIBLING

SAMPLE_RATE = 16000  # LocalAI's VADRequest.audio: float32 mono at 16 kHz
# Options keys (model YAML) → mlx-audio's get_speech_timestamps arguments, with their types
SETTINGS = {
    "threshold": float,
    "min_speech_duration_ms": int,
    "min_silence_duration_ms": int,
    "speech_pad_ms": int,
}


@dataclass
class VadModel:
    path: Path
    model: object  # mlx_audio.vad.models.silero_vad.Model
    settings: dict  # Options that override the model config's defaults

    @property
    def key(self) -> str:
        return str(self.path)


def settings_from(options: dict) -> dict:
    """The VAD Options present, checked (INVALID_ARGUMENT naming a bad one)."""
    out = {}
    for key, kind in SETTINGS.items():
        if key not in options:
            continue
        try:
            value = kind(options[key])
        except (TypeError, ValueError):
            raise InvalidInput(f"option {key}: expected a number, got {options[key]!r}") from None
        if not math.isfinite(value) or value < 0 or (key == "threshold" and value > 1):
            raise InvalidInput(f"option {key}: {value} is out of range")
        out[key] = value
    return out


def load_vad(path: Path, options: dict) -> VadModel:
    """Worker thread. A folder with config.json (mlx-audio layout) loads as is; the silero-vad
    package's silero_vad.onnx (its reference model) or silero_vad_16k.safetensors, or a folder
    holding them, is converted in memory; its .jit (TorchScript) uses the .onnx beside it."""
    settings = settings_from(options)
    if path.is_dir() and (path / "config.json").exists():
        from mlx_audio.vad.utils import load

        return VadModel(path, load(path, strict=True), settings)
    source = weights_file(path)
    if source.suffix == ".onnx":
        branches = _onnx_branches(source)
        weights = {}
        for branch, tensors in branches.items():
            weights.update(to_mlx_audio({k: mx.array(v) for k, v in tensors.items()}, branch))
    else:
        weights = to_mlx_audio(mx.load(str(source)))
    from mlx_audio.vad.models.silero_vad.config import ModelConfig
    from mlx_audio.vad.models.silero_vad.silero_vad import Model

    model = Model(ModelConfig())
    model.load_weights(list(weights.items()), strict=False)  # a 16 kHz-only file: no 8 kHz branch
    mx.eval(model.parameters())
    return VadModel(path, model, settings)


def weights_file(path: Path) -> Path:
    """The file to read for what LoadModel named (INVALID_ARGUMENT when there is none)."""
    if path.is_dir():
        for name in (ONNX, SIBLING):
            if (path / name).is_file():
                return path / name
        raise InvalidInput(f"{path} holds no Silero VAD weights ({ONNX} or {SIBLING})")
    if path.suffix == ".jit":
        if not path.with_name(ONNX).is_file():
            raise InvalidInput(
                f"{path.name}: reading TorchScript needs torch, which this backend does not "
                f"install; point LoadModel at the {ONNX} (the same model) the silero-vad package "
                "ships beside it"
            )
        return path.with_name(ONNX)
    if path.suffix == ".safetensors" and not is_package_file(path):
        raise InvalidInput(f"{path} is not Silero VAD weights (silero_vad_16k.safetensors)")
    return path


def _onnx_branches(path: Path) -> dict:
    try:
        branches = onnx_branches(path)
    except ImportError:
        raise Precondition(
            f"{path.name}: reading ONNX needs the onnx package (make run installs it; or "
            f"pip install onnx), or point LoadModel at {SIBLING}"
        ) from None
    except Exception as exc:  # noqa: BLE001 — a damaged or foreign .onnx file
        raise InvalidInput(f"{path.name} is not a readable Silero VAD ONNX file ({exc})") from None
    if "vad_16k" not in branches:
        raise InvalidInput(f"{path.name} holds no Silero VAD 16 kHz model")
    return branches


def check_audio(samples) -> np.ndarray:
    """VADRequest.audio as float32; empty or non-finite audio is INVALID_ARGUMENT."""
    audio = np.asarray(samples, dtype=np.float32)
    if audio.size == 0:
        raise InvalidInput("VADRequest.audio is empty (float32 samples at 16 kHz expected)")
    if not np.isfinite(audio).all():
        bad = int((~np.isfinite(audio)).sum())
        raise InvalidInput(f"VADRequest.audio has {bad} NaN or infinite samples")
    return audio


def speech_segments(vm: VadModel, audio: np.ndarray) -> list:
    """(start, end) seconds of each speech segment (worker thread)."""
    stamps = vm.model.get_speech_timestamps(
        mx.array(audio), sample_rate=SAMPLE_RATE, return_seconds=False, **vm.settings
    )
    return [(s["start"] / SAMPLE_RATE, s["end"] / SAMPLE_RATE) for s in stamps]
