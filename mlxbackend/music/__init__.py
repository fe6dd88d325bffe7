"""Music generation (SoundGeneration) with mlx-audio's MiniMax Music 3: which LoadModel requests
name a music model, and the request as plain values. Kept free of MLX imports (the host imports
it at start-up)."""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from mlxbackend.errors import InvalidInput, NotFound
from mlxbackend.text.models import hub_snapshot, local_candidates

MUSIC_TYPES = ("music", "sound", "sound_generation", "sound-generation", "minimax_music3")
# mlx-audio's DETECTION_HINTS for MiniMax Music 3 (its package imports MLX, so they are copied)
MODEL_TYPES = (
    "minimax_music3",
    "minimax-music3",
    "minimaxmusic3modularpipeline",
    "minimaxmusic3forconditionalgeneration",
)
ARCHITECTURES = ("MiniMaxMusic3ModularPipeline", "MiniMaxMusic3ForConditionalGeneration")
SOURCE_INDEX = "modular_model_index.json"  # the official Diffusers tree, before mlx-audio's convert
HUB_FILES = ["*.json", "*.safetensors", "tokenizer/*"]


@dataclass
class SongRequest:
    """SoundGenerationRequest's fields; None = not set by the caller."""

    text: str = ""
    dst: str = ""
    duration: float | None = None
    temperature: float | None = None
    sample: bool | None = None
    src: str = ""
    src_divisor: int | None = None
    think: bool | None = None
    caption: str = ""
    lyrics: str | None = None
    bpm: int | None = None
    keyscale: str = ""
    language: str = ""
    timesignature: str = ""
    instrumental: bool | None = None


def music_family(path: Path) -> str:
    """ "minimax_music3" for an MLX MiniMax Music 3 folder (mlx-audio's layout), "source" for the
    official Diffusers tree (it needs mlx-audio's convert first), else ""."""
    path = Path(path)
    if (path / SOURCE_INDEX).is_file():
        return "source"
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    if not isinstance(config, dict):
        return ""
    if str(config.get("model_type") or "").lower() in MODEL_TYPES:
        return "minimax_music3"
    if any(a in ARCHITECTURES for a in config.get("architectures") or []):
        return "minimax_music3"
    return ""


def music_source(model: str, model_file: str = "", model_path: str = "", model_type: str = ""):
    """The music folder LoadModel names (recognised by its config, or any folder with Type
    music), or None when it is not a music model. With Type music, a Hugging Face id is looked
    up in the local cache (downloaded unless HF_HUB_OFFLINE is set)."""
    wanted = (model_type or "").strip().lower() in MUSIC_TYPES
    candidates = local_candidates(model, model_file, model_path)
    for path in candidates:
        try:
            if path.is_dir() and (wanted or music_family(path)):
                return path
            if path.is_file() and path.suffix == ".safetensors" and music_family(path.parent):
                return path.parent  # a weights file inside a music folder
        except OSError:
            continue
    if not wanted:
        return None
    tried = [str(p) for p in candidates]
    if model and not os.path.isabs(model) and model.count("/") == 1:
        found = hub_snapshot(model, tried, HUB_FILES)
        if found is not None:
            return found
    if not (model or model_file):
        raise InvalidInput("LoadModel needs Model (a music model folder) or ModelFile")
    raise NotFound(
        f"music model {model or model_file!r} not found; tried: {', '.join(tried) or 'nothing'}"
    )
