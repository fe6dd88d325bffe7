"""ExportModel: a trained adapter (a checkpoint or a job's output folder) → `lora` (adapter
folder), `merged_16bit` (fused, dequantized, HF-layout safetensors + tokenizer), `merged_4bit`
(fused, MLX 4-bit) or `gguf` (fused → llama.cpp's converter → optional llama.cpp quantization).
Fusing follows `mlx_lm.fuse`. Every output is built under a temporary name and renamed into
place; a LocalAI model YAML is written beside it."""

import json
import os
import shutil
from pathlib import Path

from converters.llama_cpp_tools import ToolsMissing
from converters.mlx_to_gguf import SUPPORTED_TYPES, check_tools, mlx_to_gguf
from mlxbackend import BACKEND_NAME, publish
from mlxbackend.errors import InvalidInput, NotFound, Precondition
from mlxbackend.text.models import load_model_dir, model_dir
from mlxbackend.train import checkpoints

FORMATS = ("lora", "merged_16bit", "merged_4bit", "gguf")
NOT_SUPPORTED = ("loha", "lokr", "diffusers")


def adapter_source(checkpoint_path: str) -> Path:
    """The folder holding the adapter: a checkpoint, or a job folder (its final adapter, else
    its latest checkpoint)."""
    if not checkpoint_path:
        raise InvalidInput(
            "checkpoint_path is required (a checkpoint folder or a job's output_dir)"
        )
    path = Path(checkpoint_path)
    if (path / checkpoints.ADAPTER_CONFIG).exists() and (path / checkpoints.ADAPTER_FILE).exists():
        return path
    latest = checkpoints.latest_checkpoint(path)
    if latest is None:
        raise NotFound(
            f"no trained adapter in {checkpoint_path} (no adapter_config.json + adapters.safetensors, "
            "no checkpoint-* folder)"
        )
    return latest


def base_model_dir(adapter_dir: Path, model: str, model_path: str = "") -> Path:
    """The base model: the request's `model`, else the folder recorded at training time."""

    config = json.loads((adapter_dir / checkpoints.ADAPTER_CONFIG).read_text())
    recorded = config.get("model", "")
    if model:
        try:
            return model_dir(model, "", model_path)
        except NotFound:
            if not recorded:
                raise
    if not recorded:
        raise InvalidInput("the adapter does not record its base model; pass `model`")
    return model_dir(recorded, "", model_path)


def fused_model(base_dir: Path, adapter_dir: Path, dequantize: bool):
    """Base + adapter, fused (mlx_lm.fuse): (model, tokenizer, config)."""
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import dequantize_model

    model, tokenizer, config = load_model_dir(base_dir)
    load_adapters(model, str(adapter_dir))
    fused = [
        (n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules() if hasattr(m, "fuse")
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    return model, tokenizer, config


def save_merged(dst: Path, base_dir: Path, adapter_dir: Path, fmt: str, options: dict):
    import mlx.core as mx
    from mlx_lm.utils import quantize_model, save

    model, tokenizer, config = fused_model(base_dir, adapter_dir, dequantize=True)
    if fmt == "merged_4bit":
        group = int(options.get("group_size", 64))
        model, config = quantize_model(model, config, group_size=group, bits=4)
    else:
        dtype = options.get("dtype", "float16")
        if dtype not in ("float16", "bfloat16", "float32"):
            raise InvalidInput("extra_options dtype must be float16, bfloat16 or float32")
        model.set_dtype(getattr(mx, dtype))
        config["torch_dtype"] = dtype
    save(dst, base_dir, model, tokenizer, config, donate_model=False)


def write_yaml(
    output_path: Path, name: str, model: str, lora_adapter: str = "", backend: str = BACKEND_NAME
):
    """A LocalAI model config beside the export: `<parent>/<name>.yaml`."""
    lines = [f"name: {name}", f"backend: {backend}", "parameters:", f"  model: {model}"]
    if lora_adapter:
        lines.append(f"lora_adapter: {lora_adapter}")
    lines += [
        "template:",
        "  use_tokenizer_template: true",
        "known_usecases:",
        "  - chat",
        "  - completion",
    ]
    if backend == "llama-cpp":
        lines += ["options:", "  - use_jinja:true"]
    path = output_path.parent / f"{name}.yaml"
    publish.write_text(path, "\n".join(lines) + "\n")
    return path


def export_model(
    checkpoint_path: str,
    output_path: str,
    fmt: str,
    quantization_method: str = "",
    model: str = "",
    options: dict | None = None,
    progress=None,
    on_worker=None,
) -> str:
    """Run one export; returns a message naming what was written. `on_worker(fn, *args)` runs
    the MLX parts on the server's MLX thread (the llama.cpp converter then runs in the calling
    thread, leaving the worker free); without it everything runs in the caller."""
    on_worker = on_worker or (lambda fn, *args: fn(*args))
    options = dict(options or {})
    fmt = (fmt or "lora").lower()
    if fmt in NOT_SUPPORTED:
        raise InvalidInput(
            f"export_format {fmt!r} is not supported by the MLX backend; supported: {', '.join(FORMATS)}"
        )
    if fmt not in FORMATS:
        raise InvalidInput(f"unknown export_format {fmt!r}; supported: {', '.join(FORMATS)}")
    if not output_path:
        raise InvalidInput("output_path is required")
    qtype = (quantization_method or "").lower()
    if fmt == "gguf":
        qtype = qtype or "f16"
        if qtype not in SUPPORTED_TYPES:
            raise InvalidInput(
                f"unknown GGUF quantization_method {quantization_method!r}; supported: {', '.join(SUPPORTED_TYPES)}"
            )

        try:  # not in the serving install (`make run`): say which command adds them
            check_tools(qtype)
        except ToolsMissing as e:
            raise Precondition(str(e)) from None
    adapter_dir = adapter_source(checkpoint_path)
    models_dir = options.get("model_path", os.environ.get("MLXB_MODELS_DIR", ""))
    base_dir = on_worker(base_model_dir, adapter_dir, model, models_dir)  # may import a .gguf
    out = Path(output_path).absolute()
    if (
        out.exists()
        and any(out.iterdir())
        and options.get("overwrite", "").lower() not in ("1", "true", "yes")
    ):
        raise InvalidInput(
            f"output_path {out} exists and is not empty (extra_options overwrite=true replaces it)"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(out.parent, os.W_OK | os.X_OK):
            raise PermissionError(13, "permission denied")
    except OSError as exc:
        raise InvalidInput(f"output_path {out} is not writable: {exc.strerror or exc}") from None
    name = options.get("name") or out.name
    with publish.atomic_folder(out) as tmp:  # replaces an existing `out` only once complete
        if fmt == "lora":
            for f in (checkpoints.ADAPTER_FILE, checkpoints.ADAPTER_CONFIG):
                shutil.copy2(adapter_dir / f, tmp / f)
            config = json.loads((tmp / checkpoints.ADAPTER_CONFIG).read_text())
            config["model"] = str(base_dir)
            (tmp / checkpoints.ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
            yaml_args = dict(model=str(base_dir), lora_adapter=str(out))
            written = out
        elif fmt in ("merged_16bit", "merged_4bit"):
            on_worker(save_merged, tmp, base_dir, adapter_dir, fmt, options)
            yaml_args = dict(model=str(out))
            written = out
        else:
            hf_dir = tmp / "merged"
            merged_options = dict(options, dtype=options.get("dtype", "float16"))
            on_worker(save_merged, hf_dir, base_dir, adapter_dir, "merged_16bit", merged_options)
            gguf_name = f"{name}-{qtype}.gguf"
            mlx_to_gguf(
                hf_dir,
                tmp / gguf_name,
                qtype,
                progress=progress,
                pre_tokenizer=options.get("pre_tokenizer") or None,
            )
            shutil.rmtree(hf_dir)
            yaml_args = dict(model=str(out / gguf_name), backend="llama-cpp")
            written = out / gguf_name
    yaml_path = write_yaml(out, name, **yaml_args)
    return f"exported {fmt} to {written} (LocalAI config {yaml_path})"
