"""Audio capability: whisper transcription (mlx-whisper), audio decoding (PyAV).

Kept light: heavy imports happen inside the submodules' functions."""

from mlxbackend.audio.whisper import is_whisper_dir
from mlxbackend.text.models import local_candidates, resolve_model_path


def whisper_dir(model: str, model_file: str = "", model_path: str = "", model_type: str = ""):
    """The whisper folder LoadModel names, or None when it is not a whisper model.

    A whisper model is a folder whose config.json holds whisper's ModelDimensions, or anything
    loaded with ModelOptions.Type == "whisper" (then resolved like text models, HF id included)."""

    if (model_type or "").strip().lower() == "whisper":
        return resolve_model_path(model, model_file, model_path)
    for path in local_candidates(model, model_file, model_path):
        try:
            if path.is_dir() and is_whisper_dir(path):
                return path
        except OSError:
            continue
    return None
