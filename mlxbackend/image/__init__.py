"""Image capability: SD3 / SD3.5 / FLUX text-to-image and img2img with DiffusionKit's MLX models.

Kept light: mlx and DiffusionKit are imported inside the submodules' functions."""

from pathlib import Path


def diffusion_dir(model: str, model_file: str = "", model_path: str = "", pipeline_type: str = ""):
    """The local DiffusionKit folder LoadModel names, or None when it is not one. Never touches
    the network.

    Candidates, in order: ModelFile (a folder, or a checkpoint file inside one), an absolute Model,
    ModelPath/Model. A folder counts when it holds a known checkpoint file or a diffusionkit.json,
    or — when PipelineType names SD3 or FLUX — when it merely exists (loading then reports the
    missing files)."""
    from mlxbackend.image.pipeline import CHECKPOINTS, PIPELINE_TYPES, is_diffusion_dir

    named = (pipeline_type or "").strip().lower().replace("_", "") in PIPELINE_TYPES
    candidates = []
    if model_file:
        candidates.append(Path(model_file))
    if model and Path(model).is_absolute():
        candidates.append(Path(model))
    elif model and model_path:
        candidates.append(Path(model_path) / model)
    for path in candidates:
        try:
            if path.is_file() and path.name in CHECKPOINTS:
                path = path.parent
            if is_diffusion_dir(path) or (named and path.is_dir()):
                return path
        except OSError:
            continue
    return None
