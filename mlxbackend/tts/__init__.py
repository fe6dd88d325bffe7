"""Text to speech (mlx-audio's Kokoro and Soprano): which LoadModel requests name a TTS model,
and which module serves each family. Kept free of MLX imports (the host imports it at start-up).

A family module has `load_tts(path, options) -> TtsModel` (with .family, .path, .sample_rate,
.describe()), `prepare(tm, text, voice, language) -> Speech` (validated, nothing synthesized
yet; .segments, .sample_rate, .voice, .lang_code) and `synthesize(speech, is_cancelled)`, which
yields PCM16 per segment on the worker thread."""

import importlib
import json
import os
from pathlib import Path

from mlxbackend.errors import InvalidInput, NotFound, Unsupported
from mlxbackend.text.models import hub_snapshot, local_candidates

TTS_TYPES = ("tts", "kokoro", "soprano", "text-to-speech")
SERVED = {"kokoro": "mlxbackend.tts.kokoro", "soprano": "mlxbackend.tts.soprano"}
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
    "voxcpm",
    "voxtral_tts",
    "vibevoice",
    "vibevoice_streaming",
    "indextts",
)


def tts_family(path: Path) -> str:
    """The mlx-audio TTS family of a folder (a key of SERVED, one of OTHER_FAMILIES), or ""."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    if not isinstance(config, dict):
        return ""
    model_type = str(config.get("model_type") or "").lower()
    if model_type == "kokoro" or ("istftnet" in config and "plbert" in config):
        return "kokoro"
    if model_type == "soprano" or "SopranoForCausalLM" in (config.get("architectures") or []):
        return "soprano"
    return model_type if model_type in OTHER_FAMILIES else ""


def family_module(family: str):
    """The module serving a family; UNIMPLEMENTED for the mlx-audio families not served yet."""
    if family in SERVED:
        return importlib.import_module(SERVED[family])
    served = ", ".join(SERVED)
    if family:
        raise Unsupported(
            f"the mlx-audio TTS family {family!r} is not served yet (served: {served})"
        )
    raise InvalidInput(
        "config.json names no mlx-audio TTS family this backend serves (Kokoro: a config with "
        f"istftnet and plbert, or model_type kokoro; Soprano: model_type soprano); served: {served}"
    )


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
    if not repo_id:
        raise InvalidInput("LoadModel needs Model (a TTS model folder) or ModelFile")
    if not os.path.isabs(repo_id) and repo_id.count("/") == 1:
        found = hub_snapshot(repo_id, tried, ["*.json", "*.safetensors", "voices/*"])
        if found is not None:
            return found
    raise NotFound(f"TTS model {repo_id!r} not found; tried: {', '.join(tried) or 'nothing'}")
