"""Image capability: SD3 / SD3.5 / FLUX text-to-image and img2img with DiffusionKit's MLX models.

Kept light: mlx and DiffusionKit are imported inside the submodules' functions."""

from mlxbackend.image.pipeline import CHECKPOINTS, PIPELINE_TYPES, is_diffusion_dir
from mlxbackend.text.models import local_candidates


def diffusion_dir(model: str, model_file: str = "", model_path: str = "", pipeline_type: str = ""):
    """The local DiffusionKit folder LoadModel names, or None when it is not one. Never touches
    the network.

    Candidates, in order: ModelFile (a folder, or a checkpoint file inside one), an absolute Model,
    ModelPath/Model. A folder counts when it holds a known checkpoint file or a diffusionkit.json,
    or — when PipelineType names SD3 or FLUX — when it merely exists (loading then reports the
    missing files)."""

    named = (pipeline_type or "").strip().lower().replace("_", "") in PIPELINE_TYPES
    for path in local_candidates(model, model_file, model_path):
        try:
            if path.is_file() and path.name in CHECKPOINTS:
                path = path.parent
            if is_diffusion_dir(path) or (named and path.is_dir()):
                return path
        except OSError:
            continue
    return None
