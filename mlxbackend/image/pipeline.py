"""DiffusionKit SD3 / SD3.5 / FLUX pipelines assembled from ONE local folder (never the hub).

Folder layout — what `huggingface-cli download` of DiffusionKit's repos into one folder gives:

    <folder>/
      sd3_medium.safetensors           argmaxinc/mlx-stable-diffusion-3-medium (MMDiT + VAE), or
      sd3.5_large.safetensors          argmaxinc/mlx-stable-diffusion-3.5-large (MMDiT + VAE), or
      sd3.5_large_4bit_quantized.safetensors   …-3.5-large-4bit-quantized, or
      flux-schnell.safetensors         argmaxinc/mlx-FLUX.1-schnell (MMDiT), or
      flux-schnell-4bit-quantized.safetensors  argmaxinc/mlx-FLUX.1-schnell-4bit-quantized, or
      flux1-dev.safetensors            argmaxinc/mlx-FLUX.1-dev (MMDiT)
      ae.safetensors                   FLUX only: the VAE, from the same FLUX repo
      clip_l/config.json, clip_l/model.fp16.safetensors        argmaxinc/stable-diffusion (or model.safetensors)
      clip_g/config.json, clip_g/model.fp16.safetensors        SD3 only
      tokenizer_l/vocab.json, tokenizer_l/merges.txt
      tokenizer_g/vocab.json, tokenizer_g/merges.txt           SD3 only
      t5/t5xxl.safetensors                                     argmaxinc/stable-diffusion (FLUX: required;
                                                               SD3: used when present, unless t5:false)
      t5/config.json + t5/spiece.model (or t5/tokenizer.json)  google/t5-v1_1-xxl, copied into t5/
      diffusionkit.json                optional, see below

`diffusionkit.json` (optional) describes unusual or tiny checkpoints:
    {"family": "sd3" | "flux", "checkpoint": "file.safetensors", "vae": "ae.safetensors",
     "mmdit": {MMDiTConfig field overrides}, "vae_decoder": {...}, "vae_encoder": {...},
     "t5_max_length": N, "default_steps": N, "default_cfg": x, "shift": x, "default_size": px,
     "max_size": px, "guidance_embed": true | false, "quantized": true (a DiffusionKit 4-bit file)}
Without it the family and MMDiT config come from the checkpoint's file name (sd3_medium → SD3 2B,
sd3.5_large → SD3 8B, flux-schnell / flux1-dev → FLUX).

Weights are loaded strictly with DiffusionKit's own classes and state-dict adjustments; what
DiffusionKit fetches from the hub (configs, tokenizers, T5) is read from the folder instead."""

import gc
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from mlxbackend.errors import InvalidInput, NotFound, OutOfMemory
from mlxbackend.image.compat import import_diffusionkit

MANIFEST = "diffusionkit.json"

# checkpoint file name → (family, variant)
CHECKPOINTS = {
    "sd3_medium.safetensors": ("sd3", "sd3-medium"),
    "sd3.5_large.safetensors": ("sd3", "sd3.5-large"),
    "sd3.5_large_4bit_quantized.safetensors": ("sd3", "sd3.5-large-4bit"),
    "flux-schnell.safetensors": ("flux", "flux-schnell"),
    "flux-schnell-4bit-quantized.safetensors": ("flux", "flux-schnell-4bit"),
    "flux1-dev.safetensors": ("flux", "flux-dev"),
}

# DiffusionKit's per-model settings (model_io._CONFIG, T5_MAX_LENGTH, its CLI's sizes and shifts);
# steps/cfg: the usual defaults (SD3 28 steps, cfg 5; schnell 4 steps; dev 28 steps, guidance 3.5)
SD3 = dict(t5_max_length=512, steps=28, cfg=5.0, shift=3.0)
FLUX = dict(config="FLUX_SCHNELL", steps=4, cfg=0.0, shift=1.0, size=512)
VARIANTS = {
    "sd3-medium": dict(SD3, config="SD3_2b", size=512),
    "sd3.5-large": dict(SD3, config="SD3_8b", size=1024),
    "sd3.5-large-4bit": dict(SD3, config="SD3_8b", size=1024, quantized=True),
    "flux-schnell": dict(FLUX, t5_max_length=256),
    "flux-schnell-4bit": dict(FLUX, t5_max_length=256, quantized=True),
    "flux-dev": dict(
        FLUX, t5_max_length=512, steps=28, cfg=3.5
    ),  # DiffusionKit loads it with the schnell config
}
FAMILY_DEFAULT = {"sd3": "sd3-medium", "flux": "flux-schnell"}

PIPELINE_TYPES = {
    "sd3": "sd3",
    "sd3.5": "sd3",
    "stablediffusion3": "sd3",
    "stablediffusion3pipeline": "sd3",
    "stablediffusion3img2imgpipeline": "sd3",
    "flux": "flux",
    "flux-schnell": "flux",
    "flux-dev": "flux",
    "fluxpipeline": "flux",
    "fluximg2imgpipeline": "flux",
}
SCHEDULERS = ("", "euler", "flow_match_euler", "flowmatcheulerdiscretescheduler", "k_euler")
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "f32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}

CLIP_WEIGHTS = ("model.fp16.safetensors", "model.safetensors")
T5_WEIGHTS = "t5/t5xxl.safetensors"


def pipeline_family(pipeline_type: str) -> str:
    """ "sd3" / "flux" for a LocalAI PipelineType naming one, "" for none; InvalidInput otherwise."""
    name = (pipeline_type or "").strip().lower().replace("_", "")
    if not name:
        return ""
    if name not in PIPELINE_TYPES:
        raise InvalidInput(
            f"pipeline type {pipeline_type!r} is not supported: DiffusionKit runs SD3 / SD3.5 "
            "(StableDiffusion3Pipeline, sd3) and FLUX (FluxPipeline, flux)"
        )
    return PIPELINE_TYPES[name]


# -- settings -------------------------------------------------------------------------------------
def _number(value, name, kind=float):
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidInput(f"option {name} must be a number, got {value!r}")
    try:
        number = kind(value)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise InvalidInput(f"option {name} must be {what}, got {value!r}") from None
    if kind is int and isinstance(value, float) and value != number:
        raise InvalidInput(f"option {name} must be an integer, got {value!r}")
    return number


def _flag(value, name):
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    raise InvalidInput(f"option {name} must be true or false, got {value!r}")


@dataclass
class LoadSettings:
    """How LoadModel asked for the pipeline (ModelOptions fields + Options)."""

    pipeline_type: str = ""
    scheduler: str = ""
    cfg_scale: float = 0.0  # 0 = the family's default
    clip_skip: int = 0
    low_memory: bool = (
        False  # text encoders loaded per request and freed after use (LocalAI's LowVRAM)
    )
    dtype: str = ""  # "" = float32 on CPU, float16 (SD3) / bfloat16 (FLUX) on a GPU
    shift: float = 0.0  # 0 = the model's default
    t5: bool | None = None  # SD3: use T5 when t5/ weights exist, unless False
    steps: int = 0  # default denoising steps (0 = the model's)
    strength: float = 0.0  # default img2img strength (0 = 0.75)

    @classmethod
    def from_options(cls, options: dict, **fields_):
        """Options (parsed "key:value" strings) first, then non-empty ModelOptions fields; validated."""
        options = dict(options or {})
        values = {}
        if "scheduler" in options or "scheduler_type" in options:
            values["scheduler"] = str(options.get("scheduler", options.get("scheduler_type")))
        for key in ("cfg_scale", "guidance_scale"):
            if key in options:
                values["cfg_scale"] = _number(options[key], key)
        for key, name, kind in (
            ("clip_skip", "clip_skip", int),
            ("shift", "shift", float),
            ("steps", "steps", int),
            ("strength", "strength", float),
        ):
            if key in options:
                values[name] = _number(options[key], key, kind)
        for key in ("low_memory", "low_vram", "lowvram"):
            if key in options:
                values["low_memory"] = _flag(options[key], key)
        if "t5" in options:
            values["t5"] = _flag(options["t5"], "t5")
        if "dtype" in options:
            values["dtype"] = str(options["dtype"])
        for name, value in fields_.items():
            if name not in {f.name for f in fields(cls)}:
                raise TypeError(f"unknown LoadSettings field {name}")
            if value not in (None, "", 0, 0.0, False):
                values[name] = value
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self):
        if (self.scheduler or "").strip().lower() not in SCHEDULERS:
            raise InvalidInput(
                f"scheduler {self.scheduler!r} is not supported: DiffusionKit samples with flow-matching "
                "Euler only (use euler, flow_match_euler, FlowMatchEulerDiscreteScheduler or k_euler, "
                "or leave it empty)"
            )
        if self.cfg_scale < 0 or self.cfg_scale > 100:
            raise InvalidInput(f"cfg_scale must be between 0 and 100, got {self.cfg_scale}")
        if self.clip_skip < 0:
            raise InvalidInput(f"clip_skip must be ≥ 0, got {self.clip_skip}")
        if self.shift < 0:
            raise InvalidInput(f"shift must be > 0 (0 = the model's default), got {self.shift}")
        if not 0 <= self.steps <= 1000:
            raise InvalidInput(
                f"steps must be between 1 and 1000 (0 = the model's default), got {self.steps}"
            )
        if not 0 <= self.strength <= 1:
            raise InvalidInput(f"strength must be in (0, 1] (0 = 0.75), got {self.strength}")
        if (self.dtype or "").strip().lower() not in ("", *DTYPES):
            raise InvalidInput(
                f"dtype {self.dtype!r} is not supported: use float32, float16 or bfloat16"
            )
        pipeline_family(self.pipeline_type)


# -- the loaded pipeline --------------------------------------------------------------------------
@dataclass
class Pipeline:
    family: str  # "sd3" | "flux"
    path: Path
    settings: LoadSettings
    default_steps: int
    default_cfg: float
    max_size: int  # pixels, each side
    default_size: int = 512
    variant: str = ""
    shift: float = 1.0
    dtype: object = None  # mx.Dtype of weights and activations
    files: dict = field(default_factory=dict)  # component → Path
    clip_configs: dict = field(default_factory=dict)  # "clip_l"/"clip_g" → HF config.json
    t5_config: dict = field(default_factory=dict)
    t5_max_length: int = 256
    token_dim: int = 4096  # MMDiT token_level_text_embed_dim
    clip_layers: int = 0  # fewest layers among the CLIP encoders (bounds clip_skip)
    mmdit: object = None
    modulation: list = field(
        default_factory=list
    )  # adaLN weights, restored after every sampling run
    guidance_in: object = None  # FLUX-dev guidance embedder, or None
    vae_decoder: object = None
    vae_encoder: object = None
    clip_l: object = None
    clip_g: object = None
    t5: object = None
    tokenizer_l: object = None
    tokenizer_g: object = None
    t5_tokenizer: object = None

    @property
    def use_t5(self) -> bool:
        return "t5" in self.files

    @property
    def latent_channels(self) -> int:
        return self.mmdit.config.vae_latent_dim

    def clip_skip_limit(self) -> int:
        """The largest clip_skip the CLIP encoders allow (hidden_states[-(clip_skip + 2)])."""
        return max(self.clip_layers - 2, 0)


def read_manifest(path: Path) -> dict:
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return {}
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{manifest} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"{manifest} must hold a JSON object")
    return data


def find_checkpoint(path: Path, manifest: dict | None = None):
    """The MMDiT checkpoint file in `path` (named by diffusionkit.json or a known file name), or None."""
    manifest = read_manifest(path) if manifest is None else manifest
    if manifest.get("checkpoint"):
        return Path(path) / manifest["checkpoint"]
    for name in CHECKPOINTS:
        if (Path(path) / name).is_file():
            return Path(path) / name
    return None


def is_diffusion_dir(path) -> bool:
    """A folder holding a DiffusionKit checkpoint (known file name) or a diffusionkit.json."""
    path = Path(path)
    try:
        return path.is_dir() and (
            (path / MANIFEST).is_file() or any((path / n).is_file() for n in CHECKPOINTS)
        )
    except OSError:
        return False


def _expected(family: str) -> str:
    names = [n for n, (f, _) in CHECKPOINTS.items() if not family or f == family]
    return " or ".join(names)


def describe(path: Path, settings: LoadSettings) -> Pipeline:
    """Family, variant, defaults and the files to load; cheap (no weights read). Raises NotFound
    listing every missing file, InvalidInput on conflicting or malformed descriptions."""
    path = Path(path)
    if not path.is_dir():
        raise NotFound(f"{path} is not a folder")
    manifest = read_manifest(path)
    wanted = pipeline_family(settings.pipeline_type)
    family = str(manifest.get("family", "") or "").lower()
    if family and family not in FAMILY_DEFAULT:
        raise InvalidInput(f"{path / MANIFEST}: family must be sd3 or flux, got {family!r}")
    if family and wanted and family != wanted:
        raise InvalidInput(
            f"{path} holds a {family} model but the pipeline type {settings.pipeline_type!r} asks for {wanted}"
        )
    checkpoint = find_checkpoint(path, manifest)
    if checkpoint is None or not checkpoint.is_file():
        name = checkpoint.name if checkpoint is not None else _expected(family or wanted)
        raise NotFound(f"{path} has no DiffusionKit checkpoint: expected {name}")
    named_family, variant = CHECKPOINTS.get(checkpoint.name, ("", ""))
    for given in (family, wanted):
        if given and named_family and given != named_family:
            raise InvalidInput(
                f"{checkpoint.name} is a {named_family} checkpoint, but {given} was asked for"
            )
    family = family or wanted or named_family
    if not family:
        raise InvalidInput(
            f"{path / MANIFEST} must name the family (sd3 or flux) for {checkpoint.name}"
        )
    variant = variant or FAMILY_DEFAULT[family]
    spec = VARIANTS[variant]

    files = {"checkpoint": checkpoint}
    if manifest.get("vae"):
        files["vae"] = path / manifest["vae"]
    else:  # SD3 checkpoints hold the VAE; FLUX's comes as ae.safetensors
        files["vae"] = path / "ae.safetensors" if family == "flux" else checkpoint
    encoders = ["l"] + (["g"] if family == "sd3" else [])
    for e in encoders:
        weights = next(
            (path / f"clip_{e}" / n for n in CLIP_WEIGHTS if (path / f"clip_{e}" / n).is_file()),
            None,
        )
        files[f"clip_{e}"] = weights or path / f"clip_{e}" / CLIP_WEIGHTS[0]
        files[f"clip_{e}_config"] = path / f"clip_{e}" / "config.json"
        files[f"tokenizer_{e}_vocab"] = path / f"tokenizer_{e}" / "vocab.json"
        files[f"tokenizer_{e}_merges"] = path / f"tokenizer_{e}" / "merges.txt"
    use_t5 = (
        family == "flux"
        or settings.t5 is True
        or (settings.t5 is None and (path / T5_WEIGHTS).is_file())
    )
    if use_t5:
        files["t5"] = path / T5_WEIGHTS
        files["t5_config"] = path / "t5" / "config.json"
        tokenizer = [
            path / "t5" / n
            for n in ("tokenizer.json", "spiece.model")
            if (path / "t5" / n).is_file()
        ]
        files["t5_tokenizer"] = tokenizer[0] if tokenizer else path / "t5" / "tokenizer.json"
    missing = [str(p.relative_to(path)) for p in dict.fromkeys(files.values()) if not p.is_file()]
    if missing:
        if "t5/tokenizer.json" in missing:
            missing[missing.index("t5/tokenizer.json")] = "t5/spiece.model (or t5/tokenizer.json)"
        raise NotFound(
            f"{path} is missing {', '.join(missing)} (see the DiffusionKit folder layout in the README)"
        )

    def number(key, default, kind=float):
        value = manifest.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidInput(f"{path / MANIFEST}: {key} must be a number, got {value!r}")
        return kind(value)

    shift = settings.shift or number("shift", spec["shift"])
    default_size = number("default_size", spec["size"], int)
    pipe = Pipeline(
        family=family,
        path=path,
        settings=settings,
        variant=variant,
        default_steps=settings.steps or number("default_steps", spec["steps"], int),
        default_cfg=settings.cfg_scale or number("default_cfg", spec["cfg"]),
        max_size=number("max_size", 0, int),
        default_size=default_size,
        shift=shift,
        files=files,
        t5_max_length=number("t5_max_length", spec["t5_max_length"], int),
    )
    if shift <= 0:
        raise InvalidInput(f"shift must be > 0, got {shift}")
    return pipe


# -- loading --------------------------------------------------------------------------------------
def _dtype(name: str, family: str):
    import mlx.core as mx

    name = DTYPES.get((name or "").strip().lower(), "")
    if not name:
        on_gpu = mx.default_device().type == mx.DeviceType.gpu
        name = ("float16" if family == "sd3" else "bfloat16") if on_gpu else "float32"
    return getattr(mx, name)


def _read(file: Path) -> dict:
    import mlx.core as mx

    try:
        return mx.load(str(file))
    except (OSError, RuntimeError, ValueError) as exc:
        raise InvalidInput(f"cannot read {file}: {exc}") from None


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot read {file}: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"{file} must hold a JSON object")
    return data


def load_strict(model, weights: dict, file: Path, what: str):
    """All of the model's parameters from `weights`, no more, no fewer, same shapes."""
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        lines = str(exc).splitlines()
        detail = " ".join(lines[:6]) + (f" … ({len(lines) - 6} more)" if len(lines) > 6 else "")
        raise InvalidInput(
            f"{file.name} does not hold {what} weights in DiffusionKit's layout: {detail}"
        ) from None
    return model


def _cast(weights: dict, dtype) -> dict:
    import mlx.core as mx

    return {k: v if v.dtype == mx.uint32 else v.astype(dtype) for k, v in weights.items()}


def _module_at(root, dotted: str):
    for part in dotted.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def mmdit_config(pipe: Pipeline, manifest: dict, weights: dict):
    """The variant's MMDiTConfig with diffusionkit.json overrides; the SD3 positional-embedding
    size follows the checkpoint."""
    from diffusionkit.mlx import config as dkc

    base = getattr(dkc, VARIANTS[pipe.variant]["config"])
    overrides = dict(manifest.get("mmdit") or {})
    known = {f.name for f in fields(dkc.MMDiTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise InvalidInput(f"{pipe.path / MANIFEST}: unknown MMDiT config fields {unknown}")
    if isinstance(overrides.get("pos_embed_type"), str):
        try:
            overrides["pos_embed_type"] = dkc.PositionalEncoding[overrides["pos_embed_type"]]
        except KeyError:
            names = [p.name for p in dkc.PositionalEncoding]
            raise InvalidInput(
                f"{pipe.path / MANIFEST}: pos_embed_type must be one of {names}"
            ) from None
    if overrides.get("rope_axes_dim") is not None:
        overrides["rope_axes_dim"] = tuple(overrides["rope_axes_dim"])
    overrides.pop("dtype", None)
    overrides.pop("float16_dtype", None)
    pos = weights.get("x_pos_embedder.pos_embed.weight")
    if pos is not None and "max_latent_resolution" not in overrides:
        overrides["max_latent_resolution"] = int(round(pos.shape[0] ** 0.5))
    try:
        # low_memory_mode passes memory_efficient_threshold to mx.fast.scaled_dot_product_attention,
        # which current mlx rejects; guidance is embedded by generate.py (see load_mmdit)
        return replace(
            base,
            **overrides,
            low_memory_mode=False,
            guidance_embed=False,
            dtype=pipe.dtype,
            float16_dtype=pipe.dtype,
        )
    except TypeError as exc:
        raise InvalidInput(f"{pipe.path / MANIFEST}: bad MMDiT config: {exc}") from None


def load_mmdit(pipe: Pipeline, manifest: dict, raw: dict):
    """MMDiT (+ FLUX-dev guidance embedder) from the checkpoint, strictly; keeps the adaLN weights
    in `pipe.modulation` so they can be restored after DiffusionKit's sampling offloads them."""
    import mlx.core as mx
    import mlx.nn as nn
    from diffusionkit.mlx import mmdit as dkm
    from diffusionkit.mlx import model_io
    from mlx.utils import tree_flatten

    file = pipe.files["checkpoint"]
    quantized = VARIANTS[pipe.variant].get("quantized", False) or bool(
        manifest.get("quantized", False)
    )
    prefix = "model.diffusion_model."
    try:
        if pipe.family == "sd3":
            weights = (
                {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)}
                if quantized
                else model_io.mmdit_state_dict_adjustments(raw, prefix=prefix)
            )
        elif quantized:
            weights = dict(raw)
        else:
            base = mmdit_config(pipe, manifest, {})
            weights = model_io.flux_state_dict_adjustments(
                dict(raw), prefix="", hidden_size=base.hidden_size, mlp_ratio=base.mlp_ratio
            )
    except (KeyError, ValueError) as exc:
        raise InvalidInput(
            f"{file.name} is not a DiffusionKit {pipe.family} checkpoint (missing {exc})"
        ) from None
    config = mmdit_config(pipe, manifest, weights)
    model = dkm.MMDiT(config)
    if quantized:
        predicate = (lambda _, m: isinstance(m, nn.Linear)) if pipe.family == "sd3" else None
        nn.quantize(model, class_predicate=predicate)
    # FLUX's qkv projections carry a key bias (the k_proj of DiffusionKit's Attention has none, and
    # mlx's strict update would reject it): give those layers a bias so it is loaded, not dropped
    for key in weights:
        if key.endswith("attn.k_proj.bias"):
            layer = _module_at(model, key[: -len(".bias")])
            layer.bias = mx.zeros((weights[key].shape[0],))
    guidance = {
        k[len("guidance_in.") :]: v for k, v in weights.items() if k.startswith("guidance_in.")
    }
    weights = {k: v for k, v in weights.items() if not k.startswith("guidance_in.")}
    wants_guidance = manifest.get("guidance_embed")
    guidance_in = None
    if guidance and wants_guidance is not False:
        guidance_in = load_strict(
            dkm.MLPEmbedder(config.frequency_embed_dim, config.hidden_size),
            _cast(guidance, pipe.dtype),
            file,
            "guidance embedder",
        )
    elif wants_guidance:
        raise InvalidInput(
            f"{file.name} has no guidance_in weights, but {MANIFEST} sets guidance_embed"
        )
    load_strict(model, _cast(weights, pipe.dtype), file, f"{pipe.family} MMDiT")
    pipe.modulation = [(k, v) for k, v in tree_flatten(model.parameters()) if "adaLN" in k]
    pipe.mmdit, pipe.guidance_in = model, guidance_in
    pipe.token_dim = config.token_level_text_embed_dim
    if not pipe.max_size:  # SD3: the learned positional embedding's extent; FLUX (RoPE): 2048 px
        learned = config.pos_embed_type.name == "LearnedInputEmbedding"
        pipe.max_size = 8 * config.max_latent_resolution if learned else 2048


def _vae_prefix(raw: dict, side: str) -> str:
    sd3 = f"first_stage_model.{side}."
    return sd3 if any(k.startswith(sd3) for k in raw) else f"{side}."


def load_vae(pipe: Pipeline, manifest: dict, raw: dict):
    """VAE decoder and encoder (img2img) from the checkpoint / ae.safetensors, strictly."""
    from diffusionkit.mlx import config as dkc
    from diffusionkit.mlx import model_io
    from diffusionkit.mlx.vae import VAEDecoder, VAEEncoder

    file = pipe.files["vae"]
    quantized = VARIANTS[pipe.variant].get("quantized", False) and pipe.family == "sd3"
    for side, cls, config_cls, adjust in (
        ("decoder", VAEDecoder, dkc.VAEDecoderConfig, model_io.vae_decoder_state_dict_adjustments),
        ("encoder", VAEEncoder, dkc.VAEEncoderConfig, model_io.vae_encoder_state_dict_adjustments),
    ):
        try:
            config = replace(config_cls(), **(manifest.get(f"vae_{side}") or {}))
        except TypeError as exc:
            raise InvalidInput(f"{pipe.path / MANIFEST}: bad vae_{side} config: {exc}") from None
        prefix = _vae_prefix(raw, side)
        try:
            weights = (
                {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)}
                if quantized
                else adjust(raw, prefix=prefix)
            )
        except KeyError as exc:
            raise InvalidInput(f"{file.name} holds no VAE {side} (missing {exc})") from None
        model = cls(
            in_channels=config.in_channels,
            out_channels=config.out_channels,
            block_out_channels=list(config.block_out_channels),
            layers_per_block=config.layers_per_block,
            resnet_groups=config.resnet_groups,
        )
        load_strict(model, _cast(weights, pipe.dtype), file, f"VAE {side}")
        setattr(pipe, f"vae_{side}", model)


def clip_model(config: dict, file: Path, dtype):
    """DiffusionKit's CLIPTextModel from an HF CLIPTextModel(WithProjection) config + weights."""
    from diffusionkit.mlx.clip import CLIPTextModel
    from diffusionkit.mlx.config import CLIPTextModelConfig
    from diffusionkit.mlx.model_io import map_clip_text_encoder_weights

    with_projection = "WithProjection" in (config.get("architectures") or [""])[0]
    try:
        model = CLIPTextModel(
            CLIPTextModelConfig(
                num_layers=config["num_hidden_layers"],
                model_dims=config["hidden_size"],
                num_heads=config["num_attention_heads"],
                max_length=config["max_position_embeddings"],
                vocab_size=config["vocab_size"],
                projection_dim=config["projection_dim"] if with_projection else None,
                hidden_act=config.get("hidden_act", "quick_gelu"),
            )
        )
    except KeyError as exc:
        raise InvalidInput(f"{file.parent / 'config.json'} lacks {exc}") from None
    weights = {}
    for key, value in _read(file).items():
        if not key.endswith("position_ids"):
            weights.update(map_clip_text_encoder_weights(key, value))
    return load_strict(model, _cast(weights, dtype), file, "CLIP text encoder")


def t5_model(config: dict, file: Path, dtype):
    """DiffusionKit's SD3T5Encoder from t5/config.json + t5xxl.safetensors (HF T5EncoderModel layout)."""
    from types import SimpleNamespace

    from diffusionkit.mlx.model_io import t5_encoder_state_dict_adjustments
    from diffusionkit.mlx.t5 import SD3T5Encoder

    defaults = dict(
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="relu",
        d_ff=None,
    )
    try:
        model = SD3T5Encoder(SimpleNamespace(**{**defaults, **config}), low_memory_mode=False)
    except (AttributeError, ValueError) as exc:
        raise InvalidInput(
            f"{file.parent / 'config.json'} is not a T5 encoder config: {exc}"
        ) from None
    raw = {k: v for k, v in _read(file).items() if not k.startswith(("decoder.", "lm_head."))}
    if "shared.weight" in raw:
        raw.setdefault("encoder.embed_tokens.weight", raw["shared.weight"])
    elif "encoder.embed_tokens.weight" in raw:
        raw["shared.weight"] = raw["encoder.embed_tokens.weight"]
    try:
        weights = t5_encoder_state_dict_adjustments(raw, prefix="")
    except KeyError as exc:
        raise InvalidInput(f"{file.name} is not a T5 encoder checkpoint (missing {exc})") from None
    return load_strict(model, _cast(weights, dtype), file, "T5 encoder")


class ClipTokenizer:
    """DiffusionKit's CLIP BPE tokenizer, fed byte-level symbols (like HF's CLIPTokenizer) so any
    character has a token; ASCII text tokenizes exactly as DiffusionKit does."""

    def __init__(self, vocab_file: Path, merges_file: Path, pad_with_eos: bool):
        from diffusionkit.mlx.tokenizer import Tokenizer

        try:
            vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
            merges = (
                merges_file.read_text(encoding="utf-8").strip().split("\n")[1 : 49152 - 256 - 2 + 1]
            )
        except (OSError, ValueError) as exc:
            raise InvalidInput(
                f"cannot read the CLIP tokenizer in {vocab_file.parent}: {exc}"
            ) from None
        ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
        self.inner = Tokenizer(ranks, vocab, pad_with_eos)
        missing = [t for t in (self.inner.bos, self.inner.eos) if t not in vocab]
        if missing:
            raise InvalidInput(f"{vocab_file} lacks {missing}")
        self.bytes = _bytes_to_unicode()
        self.max_length = self.inner.max_length
        self.pad_token = self.inner.eos_token if pad_with_eos else 0

    def tokenize(self, text: str) -> list:
        import regex

        clean = regex.sub(r"\s+", " ", text.lower()).strip()
        words = [
            "".join(self.bytes[b] for b in w.encode("utf-8"))
            for w in regex.findall(self.inner.pat, clean)
        ]
        ids = [
            self.inner.vocab[p] for w in words for p in self.inner.bpe(w) if p in self.inner.vocab
        ]
        ids = ids[: self.max_length - 2]
        return [self.inner.bos_token, *ids, self.inner.eos_token]


def _bytes_to_unicode() -> dict:
    """GPT-2 / CLIP byte → printable character table."""
    bs = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


class T5Tokens:
    """T5 token ids from t5/tokenizer.json (tokenizers) or t5/spiece.model (sentencepiece): the
    prompt's pieces then </s>, truncated to max_length — like DiffusionKit's T5Tokenizer."""

    def __init__(self, file: Path, max_length: int):
        self.max_length = max_length
        self.pad_token = 0
        try:
            if file.name == "tokenizer.json":
                from tokenizers import Tokenizer

                tok = Tokenizer.from_file(str(file))
                self.eos = tok.token_to_id("</s>")
                self.encode = lambda text: tok.encode(text).ids
            else:
                import sentencepiece

                sp = sentencepiece.SentencePieceProcessor(model_file=str(file))
                self.eos = sp.eos_id()
                self.encode = sp.encode
        except Exception as exc:  # tokenizers/sentencepiece raise their own exception types
            raise InvalidInput(f"cannot read the T5 tokenizer {file}: {exc}") from None
        if self.eos is None or self.eos < 0:
            raise InvalidInput(f"the T5 tokenizer {file} has no </s> token")

    def tokenize(self, text: str) -> list:
        ids = list(self.encode(text))
        if not ids or ids[-1] != self.eos:
            ids.append(self.eos)
        return ids if len(ids) <= self.max_length else ids[: self.max_length - 1] + [self.eos]


def load_text_encoders(pipe: Pipeline):
    """CLIP-L (+ CLIP-G for SD3) and T5 when used; lazily per request in low-memory mode."""
    if pipe.clip_l is None:
        pipe.clip_l = clip_model(pipe.clip_configs["clip_l"], pipe.files["clip_l"], pipe.dtype)
    if pipe.family == "sd3" and pipe.clip_g is None:
        pipe.clip_g = clip_model(pipe.clip_configs["clip_g"], pipe.files["clip_g"], pipe.dtype)
    if pipe.use_t5 and pipe.t5 is None:
        pipe.t5 = t5_model(pipe.t5_config, pipe.files["t5"], pipe.dtype)


def free_text_encoders(pipe: Pipeline):
    import mlx.core as mx

    pipe.clip_l = pipe.clip_g = pipe.t5 = None
    gc.collect()
    mx.clear_cache()


def check_text_shapes(pipe: Pipeline):
    """The text encoders' widths must fit the MMDiT (caught at load, not mid-request)."""
    config = pipe.mmdit.config
    clips = [pipe.clip_configs[k] for k in ("clip_l", "clip_g") if k in pipe.clip_configs]
    try:
        hidden = sum(c["hidden_size"] for c in clips)
        projected = (
            pipe.family == "sd3"
        )  # FLUX pools CLIP-L without its projection (generate.encode_text)
        pooled = sum(
            c["projection_dim"]
            if projected and "WithProjection" in (c.get("architectures") or [""])[0]
            else c["hidden_size"]
            for c in clips
        )
        pipe.clip_layers = min(c["num_hidden_layers"] for c in clips)
    except (KeyError, TypeError) as exc:
        raise InvalidInput(f"a CLIP config.json in {pipe.path} lacks {exc}") from None
    if pooled != config.pooled_text_embed_dim:
        raise InvalidInput(
            f"the CLIP pooled width {pooled} does not match the MMDiT's pooled_text_embed_dim "
            f"{config.pooled_text_embed_dim}"
        )
    if pipe.family == "sd3" and hidden > pipe.token_dim:
        raise InvalidInput(
            f"the CLIP features ({hidden}) are wider than the MMDiT's token_level_text_embed_dim {pipe.token_dim}"
        )
    if pipe.use_t5 and pipe.t5_config.get("d_model") != pipe.token_dim:
        raise InvalidInput(
            f"T5 d_model {pipe.t5_config.get('d_model')} does not match the MMDiT's "
            f"token_level_text_embed_dim {pipe.token_dim}"
        )


def load_pipeline(path, settings: LoadSettings) -> Pipeline:
    """Load everything (MLX thread). Text encoders wait for the first request in low-memory mode."""

    settings = settings or LoadSettings()
    settings.validate()
    pipe = describe(Path(path), settings)
    manifest = read_manifest(pipe.path)
    import_diffusionkit()
    pipe.dtype = _dtype(settings.dtype, pipe.family)
    try:
        raw = _read(pipe.files["checkpoint"])
        load_mmdit(pipe, manifest, raw)
        same = pipe.files["vae"] == pipe.files["checkpoint"]
        load_vae(pipe, manifest, raw if same else _read(pipe.files["vae"]))
        del raw
        for e in ("l", "g") if pipe.family == "sd3" else ("l",):
            pipe.clip_configs[f"clip_{e}"] = _read_json(pipe.files[f"clip_{e}_config"])
            tokenizer = ClipTokenizer(
                pipe.files[f"tokenizer_{e}_vocab"],
                pipe.files[f"tokenizer_{e}_merges"],
                pad_with_eos=e == "l",
            )
            setattr(pipe, f"tokenizer_{e}", tokenizer)
        if pipe.use_t5:
            pipe.t5_config = _read_json(pipe.files["t5_config"])
            pipe.t5_tokenizer = T5Tokens(pipe.files["t5_tokenizer"], pipe.t5_max_length)
        check_text_shapes(pipe)
        if pipe.clip_skip_limit() < settings.clip_skip:
            raise InvalidInput(
                f"clip_skip {settings.clip_skip} is too large: the CLIP encoders have {pipe.clip_layers} layers"
            )
        if not settings.low_memory:
            load_text_encoders(pipe)
        _materialize(pipe)
    except RuntimeError as exc:
        free_pipeline(pipe)
        if "memory" in str(exc).lower() or "malloc" in str(exc).lower():
            raise OutOfMemory(f"not enough memory to load {pipe.path.name}: {exc}") from None
        raise
    except BaseException:
        free_pipeline(pipe)
        raise
    return pipe


def _materialize(pipe: Pipeline):
    """Read the weights now (mx.load is lazy), so load errors and load time land in LoadModel."""
    import mlx.core as mx

    for name in ("mmdit", "guidance_in", "vae_decoder", "vae_encoder", "clip_l", "clip_g", "t5"):
        model = getattr(pipe, name)
        if model is not None:
            mx.eval(model.parameters())


def free_pipeline(pipe) -> None:
    """Drop every model reference and give MLX's cached buffers back."""
    import mlx.core as mx

    if pipe is None:
        return
    for name in (
        "mmdit",
        "guidance_in",
        "vae_decoder",
        "vae_encoder",
        "clip_l",
        "clip_g",
        "t5",
        "tokenizer_l",
        "tokenizer_g",
        "t5_tokenizer",
    ):
        setattr(pipe, name, None)
    pipe.modulation = []
    gc.collect()
    mx.clear_cache()
