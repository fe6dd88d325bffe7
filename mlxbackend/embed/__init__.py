"""Embeddings and reranking: encoder models (BERT family, bert.py) and decoder LLMs (decoder.py),
batched across concurrent requests on the MLX worker (engine.py)."""

from mlxbackend.errors import BackendError
from mlxbackend.text.models import resolve_model_path


def encoder_dir(model: str, model_file: str = "", model_path: str = ""):
    """The encoder folder (BERT family) LoadModel names, or None when it is something else."""
    from mlxbackend.embed.bert import is_encoder_dir

    try:
        path = resolve_model_path(model, model_file, model_path)
    except BackendError:
        return None  # the text loader reports what was tried
    return path if path.is_dir() and is_encoder_dir(path) else None
