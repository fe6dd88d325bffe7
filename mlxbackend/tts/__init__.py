"""Text to speech (mlx-audio's Kokoro): which LoadModel requests name a TTS model. Kept free of
MLX imports (the host imports it at start-up)."""

import json
import os
from pathlib import Path

from mlxbackend.errors import InvalidInput, NotFound
from mlxbackend.text.models import local_candidates

TTS_TYPES = ("tts", "kokoro", "text-to-speech")
# mlx-audio TTS families whose config model_type cannot be mistaken for a text LLM's (mlx-audio
# also has e.g. "llama" (Orpheus) and "qwen3"): detected so that LoadModel says they are not
# served yet instead of loading them as LLMs.
OTHER_FAMILIES = (
    "qwen3_tts",
    "kitten_tts",
    "kitten",
    "csm",
    "sesame",
    "marvis",
    "dia",
    "bark",
    "chatterbox",
    "chatterbox_turbo",
    "spark",
    "outetts",
    "melotts",
    "pocket_tts",
    "soprano",
    "voxcpm",
    "voxtral_tts",
    "vibevoice",
    "vibevoice_streaming",
    "indextts",
)


def tts_family(path: Path) -> str:
    """The mlx-audio TTS family of a folder ("kokoro", one of OTHER_FAMILIES), or ""."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    if not isinstance(config, dict):
        return ""
    model_type = str(config.get("model_type") or "").lower()
    if model_type == "kokoro" or ("istftnet" in config and "plbert" in config):
        return "kokoro"
    return model_type if model_type in OTHER_FAMILIES else ""


def tts_source(model: str, model_file: str = "", model_path: str = "", model_type: str = ""):
    """The TTS folder LoadModel names (a folder whose config.json names an mlx-audio TTS
    family), or None when it is not a TTS model. With Type tts, any folder (loading reports what
    is wrong with it) or a Hugging Face id found in the local cache (downloaded unless
    HF_HUB_OFFLINE is set)."""
    wanted = (model_type or "").strip().lower() in TTS_TYPES
    for path in local_candidates(model, model_file, model_path):
        try:
            if path.is_dir() and (wanted or tts_family(path)):
                return path
            if path.is_file() and path.suffix == ".safetensors" and tts_family(path.parent):
                return path.parent  # the weights file inside a Kokoro folder
        except OSError:
            continue
    if not wanted:
        return None
    return _from_hub(model, local_candidates(model, model_file, model_path))


def _from_hub(repo_id: str, tried: list):
    """A Kokoro snapshot (config, weights and voices) from the HF cache, else downloaded."""
    tried = [str(p) for p in tried]
    if not repo_id or os.path.isabs(repo_id) or repo_id.count("/") != 1:
        if not repo_id:
            raise InvalidInput("LoadModel needs Model (a TTS model folder) or ModelFile")
        raise NotFound(f"TTS model {repo_id!r} not found; tried: {', '.join(tried) or 'nothing'}")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "voices/*"]
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns))
    except Exception:
        tried.append(f"HF cache for {repo_id}")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        tried.append(f"download of {repo_id} (skipped: HF_HUB_OFFLINE is set)")
    else:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=10))
        except Exception as exc:
            tried.append(f"download of {repo_id} ({type(exc).__name__})")
    raise NotFound(f"TTS model {repo_id!r} not found; tried: {', '.join(tried)}")
