"""Audio capability: whisper transcription (mlx-whisper), audio decoding (PyAV).

Kept light: heavy imports happen inside the submodules' functions."""

from pathlib import Path


def whisper_dir(model: str, model_file: str = "", model_path: str = "", model_type: str = ""):
    """The whisper folder LoadModel names, or None when it is not a whisper model.

    A whisper model is a folder whose config.json holds whisper's ModelDimensions, or anything
    loaded with ModelOptions.Type == "whisper" (then resolved like text models, HF id included)."""
    from mlxbackend.audio.whisper import is_whisper_dir

    if (model_type or "").strip().lower() == "whisper":
        from mlxbackend.text.models import resolve_model_path

        return resolve_model_path(model, model_file, model_path)
    candidates = []
    if model_file:
        candidates.append(Path(model_file))
    if model and Path(model).is_absolute():
        candidates.append(Path(model))
    elif model and model_path:
        candidates.append(Path(model_path) / model)
    for path in candidates:
        try:
            if path.is_dir() and is_whisper_dir(path):
                return path
        except OSError:
            continue
    return None
