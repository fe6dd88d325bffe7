"""A quantization request as plain, validated values.

`quantization_type` names
-------------------------

GGUF (llama.cpp) types, written as ONE file `<output_dir>/<model>-<type>.gguf` by llama.cpp's own
converter and quantizer (`converters.mlx_to_gguf`); LocalAI can import these (contract §12.6):

    f32, f16, bf16, q8_0                       written directly by convert_hf_to_gguf.py
    q4_0, q4_1, q5_0, q5_1, q2_k, q3_k_s, q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k,
    iq3_s, iq3_m, iq4_nl, iq4_xs, tq1_0, tq2_0, mxfp4_moe
                                               f16 first, then llama.cpp's quantizer
    aliases: q3_k, q4_k, q5_k (the _m variants), fp16, fp32; empty = q4_k_m (LocalAI's default)

MLX types (prefix `mlx-`), written as a model FOLDER `<output_dir>/<model>-<type>/` (mlx-lm
layout, loadable by this backend's LoadModel) plus a LocalAI model config
`<output_dir>/<name>.yaml` with `backend: mlx`; `output_file` is the folder:

    mlx-q4                                           the default 4-bit recipe (`quantize.recipe`):
                                                     llama.cpp's Q4_K_M layer choices (6 bits for
                                                     embeddings / output and sensitive v/down
                                                     layers) with searched scales, group 32; with
                                                     calibration_text the search is weighted by
                                                     activation statistics (llama.cpp's imatrix)
    mlx-q4-plain, mlx-q2, mlx-q3, mlx-q5, mlx-q6, mlx-q8
                                                     plain affine quantization, that many bits
                                                     (group 64, MLX's min/max scales)
    mlx-mxfp4, mlx-nvfp4, mlx-mxfp8                  microscaling float modes (groups 32/16/32)
    mlx-mixed_2_6, mlx-mixed_3_4, mlx-mixed_3_6, mlx-mixed_4_6
                                                     mlx-lm's mixed-bit recipes (like llama.cpp's _M)
    mlx-bf16, mlx-f16, mlx-f32                       no quantization, weights cast to that dtype
    mlx-awq, mlx-gptq, mlx-dwq, mlx-dynamic          data-aware affine quantization (mlx-lm's AWQ,
                                                     GPTQ, distilled DWQ, sensitivity-based mixed
                                                     bits); REQUIRE extra_options calibration_text
                                                     (see `quantize.calibrated`); 4 bits, group 64
                                                     unless `bits` / `group_size` say otherwise

`extra_options`
---------------

    group_size       MLX types: quantization group size (affine: 32, 64 or 128)
    pre_tokenizer    GGUF types: llama.cpp pre-tokenizer name for a BPE tokenizer the converter
                     does not recognise (e.g. gpt-2)
    name             MLX types: model name in the YAML (default: the output folder's name)
    model_path       folder that a relative `model` is looked up in (default $MLXB_MODELS_DIR)
    hf_token         token for downloading a Hugging Face model that is not cached
    threads          llama.cpp quantizer threads (0 = all cores)
    perplexity_text  a local text file: report the perplexity of the unquantized and quantized
                     model on it (extra_metrics perplexity / perplexity_base)

Data-aware MLX types (mlx-awq, mlx-gptq, mlx-dwq, mlx-dynamic) and mlx-q4 (whose search then
uses the blocks' activation statistics, extra_metrics imatrix 1); nothing is downloaded:

    calibration_text     REQUIRED for the data-aware types, optional for mlx-q4: a local text
                         file (missing option: INVALID_ARGUMENT; missing file: NOT_FOUND),
                         tokenized with the model's tokenizer into blocks
    calibration_samples  number of blocks N (default 32)
    calibration_seq_len  tokens per block L (default 256, at least 32); N and L are clamped to
                         what the text gives, at least 4 blocks of 32 tokens (else the job fails
                         saying how many tokens are needed; under 127 bytes: INVALID_ARGUMENT)
    bits                 bits of the quantized layers (default 4; GPTQ: 2, 4 or 8)
    seed                 which blocks are picked (default 123)
    embed_bits           AWQ: embedding / lm_head bits (default 4); GPTQ: bits of the non-Linear
                         layers, i.e. the embeddings (default 6)
    embed_group_size     their group size (AWQ default 32, GPTQ default group_size)
    high_bits            dynamic: bits of the sensitive layers (default: the next above bits)
    target_bpw           dynamic: target bits per weight (default halfway between the two)
    learning_rate        DWQ: Adam learning rate of the distillation (default 1e-6)

Inputs: an MLX or Hugging Face model folder (quantized or not), a `.gguf` file (imported into MLX
first), or a Hugging Face id (local cache first, then a download unless HF_HUB_OFFLINE)."""

import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from converters.mlx_to_gguf import SUPPORTED_TYPES, normalize_qtype
from mlxbackend.errors import InvalidInput
from mlxbackend.quantize import calibrated
from mlxbackend.quantize.calibrated import calibration_settings, settings

DEFAULT_TYPE = "q4_k_m"
MLX_PREFIX = "mlx-"
AFFINE_BITS = {"q2": 2, "q3": 3, "q4_plain": 4, "q5": 5, "q6": 6, "q8": 8}
DEFAULT_RECIPE = "q4"  # mlx-q4: quantize.recipe (Q4_K_M-like bits, searched scales)
RECIPE_GROUP = 32
FLOAT_MODES = ("mxfp4", "nvfp4", "mxfp8")
RECIPES = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")
DTYPES = {
    "bf16": "bfloat16",
    "f16": "float16",
    "fp16": "float16",
    "f32": "float32",
    "fp32": "float32",
}
AFFINE_GROUPS = (32, 64, 128)
CALIBRATED = calibrated.METHODS  # data-aware: need local calibration text
OPTIONS = (
    "group_size",
    "pre_tokenizer",
    "name",
    "model_path",
    "hf_token",
    "threads",
    "perplexity_text",
    *calibrated.OPTIONS,
)


def mlx_types() -> list:
    return (
        [MLX_PREFIX + DEFAULT_RECIPE]
        + [MLX_PREFIX + k.replace("_", "-") for k in AFFINE_BITS]
        + [MLX_PREFIX + m for m in FLOAT_MODES]
        + [MLX_PREFIX + r for r in RECIPES]
        + [MLX_PREFIX + d for d in ("bf16", "f16", "f32")]
        + [MLX_PREFIX + c for c in CALIBRATED]
    )


@dataclass
class QuantConfig:
    job_id: str
    model: str
    output_dir: str
    qtype: str  # canonical: a GGUF type, or "mlx-…"
    family: str  # "gguf" | "mlx"
    # MLX only
    mode: str = "affine"
    bits: int | None = None
    group_size: int | None = None
    recipe: str | None = None
    dtype: str | None = None  # float-only output (no quantization)
    method: str | None = None  # data-aware: awq | gptq | dwq | dynamic (see quantize.calibrated)
    options: dict = field(default_factory=dict)

    def opt(self, key: str, default=""):
        return self.options.get(key, default) or default

    @property
    def imatrix(self) -> bool:
        """mlx-q4 given calibration_text: its search weighted by activation statistics."""
        return self.recipe == "k_m" and bool(self.options.get(calibrated.TEXT_OPTION))

    @property
    def quantize(self) -> bool:
        return self.family == "mlx" and self.dtype is None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["options"] = {k: ("***" if k == "hf_token" else v) for k, v in d["options"].items()}
        return d


def parse_type(name: str, options: dict) -> dict:
    """The canonical type and its settings; InvalidInput listing the families when unknown."""
    raw = (name or "").strip()
    low = raw.lower()
    if not low:
        return {"qtype": DEFAULT_TYPE, "family": "gguf"}
    if low.startswith(MLX_PREFIX) or low.startswith("mlx_"):
        kind = low[4:].replace("-", "_")
        spec: dict = {"family": "mlx"}
        if kind == DEFAULT_RECIPE:
            spec.update(bits=4, mode="affine", recipe="k_m", group_size=RECIPE_GROUP)
        elif kind in AFFINE_BITS:
            spec.update(bits=AFFINE_BITS[kind], mode="affine")
        elif kind in FLOAT_MODES:
            spec.update(mode=kind)
        elif kind in RECIPES:
            spec.update(recipe=kind, mode="affine")
        elif kind in CALIBRATED:
            spec.update(method=kind, mode="affine")
        elif kind in DTYPES:
            spec.update(dtype=DTYPES[kind])
            kind = {"fp16": "f16", "fp32": "f32"}.get(kind, kind)
        else:
            raise InvalidInput(_unknown(raw))
        spec["qtype"] = MLX_PREFIX + kind
        if options.get("group_size"):
            try:
                group = int(options["group_size"])
            except ValueError:
                raise InvalidInput(
                    f"extra_options group_size must be an integer, got {options['group_size']!r}"
                ) from None
            if spec.get("dtype"):
                raise InvalidInput(
                    f"group_size does not apply to {spec['qtype']} (no quantization)"
                )
            if spec.get("mode") == "affine" and group not in AFFINE_GROUPS:
                raise InvalidInput(
                    f"group_size for affine quantization must be one of {AFFINE_GROUPS}, got {group}"
                )
            if (
                spec.get("mode") in FLOAT_MODES
                and group != {"mxfp4": 32, "nvfp4": 16, "mxfp8": 32}[spec["mode"]]
            ):
                raise InvalidInput(
                    f"{spec['mode']} has a fixed group size of "
                    f"{ {'mxfp4': 32, 'nvfp4': 16, 'mxfp8': 32}[spec['mode']] }; got {group}"
                )
            spec["group_size"] = group
        return spec

    try:
        return {"qtype": normalize_qtype(low), "family": "gguf"}
    except ValueError:
        raise InvalidInput(_unknown(raw)) from None


def _unknown(name: str) -> str:
    return (
        f"unknown quantization_type {name!r}. Families: GGUF (one .gguf file): "
        f"{', '.join(SUPPORTED_TYPES)} (empty = {DEFAULT_TYPE}); MLX (a model folder): {', '.join(mlx_types())}"
    )


def quantization_config(
    model: str = "",
    quantization_type: str = "",
    output_dir: str = "",
    job_id: str = "",
    extra_options=None,
) -> QuantConfig:
    """Validate the request's fields (no file system access but the output_dir check later)."""
    options = {k: str(v) for k, v in dict(extra_options or {}).items()}
    if not model:
        raise InvalidInput("model is required (a model folder, a .gguf file or a Hugging Face id)")
    if not output_dir:
        raise InvalidInput("output_dir is required")
    spec = parse_type(quantization_type, options)
    if options.get("threads"):
        try:
            int(options["threads"])
        except ValueError:
            raise InvalidInput(
                f"extra_options threads must be an integer, got {options['threads']!r}"
            ) from None
    cfg = QuantConfig(
        job_id=job_id or str(uuid.uuid4()),
        model=model,
        output_dir=str(Path(output_dir).expanduser().absolute()),
        options=options,
        **spec,
    )
    if cfg.method:
        settings(cfg.method, options)  # InvalidInput / NotFound now, not in the job
    elif cfg.imatrix:
        calibration_settings(DEFAULT_RECIPE, options)  # mlx-q4's imatrix: same checks
    text = options.get("perplexity_text")
    if text and not Path(text).is_file():
        raise InvalidInput(f"extra_options perplexity_text {text!r} is not a file")
    return cfg


def base_name(model: str) -> str:
    """The output's stem: a folder's / file's name (without .gguf), or an HF id's last part."""
    name = Path(model.rstrip("/")).name or "model"
    if name.lower().endswith(".gguf"):
        name = name[:-5]
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "model"


def output_path(cfg: QuantConfig) -> Path:
    stem = f"{base_name(cfg.model)}-{cfg.qtype}"
    return Path(cfg.output_dir) / (f"{stem}.gguf" if cfg.family == "gguf" else stem)


def models_dir(cfg: QuantConfig) -> str:
    return cfg.opt("model_path") or os.environ.get("MLXB_MODELS_DIR", "")
