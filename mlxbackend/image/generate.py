"""One image: plan the request (validate, fill defaults, read the source image), then encode the
prompt, sample with flow-matching Euler one step at a time, and decode with the VAE.

The sampling follows DiffusionKit's `DiffusionPipeline.denoise_latents` + `sample_euler` (same
sigmas, noise and latent scaling: the same seed gives DiffusionKit's latents bit for bit) except:
- SD3 treats cfg ≤ 1 as no guidance (DiffusionKit batches the negative prompt only when cfg > 1
  but guides whenever cfg > 0, and crashes); FLUX never batches a negative prompt;
- CLIP features are padded to the MMDiT's token width, not a hard-coded 4096;
- FLUX pools CLIP-L without the text projection, as the reference FLUX does; FLUX-dev's guidance
  scale goes through its guidance embedder;
- the adaLN modulation of every step is computed up front (as sample_euler does), then detached
  from the MMDiT and its offloaded weights restored from memory (not by re-reading the
  checkpoint / hub); each step installs the request's own modulation for its duration, so the
  pipeline is whole between steps, where the engine may run other requests; each step reports
  progress and can be cancelled. tests/test_image_pipeline.py checks the latents against
  sample_euler's.
"""

import copy
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from mlxbackend import publish
from mlxbackend.errors import (
    Cancelled,
    InvalidInput,
    NotFound,
    OutOfMemory,
    Precondition,
    Unsupported,
)
from mlxbackend.image.compat import t5_encode
from mlxbackend.image.pipeline import free_text_encoders, load_text_encoders

DEFAULT_STRENGTH = 0.75
LATENT_FORMAT = {
    "sd3": (0.0609, 1.5305),
    "flux": (0.1159, 0.3611),
}  # (shift, scale) as in DiffusionKit
# EnableParameters key → Plan field
PARAMETERS = {
    "strength": "strength",
    "cfg_scale": "cfg",
    "guidance_scale": "cfg",
    "cfg": "cfg",
    "shift": "shift",
}


@dataclass
class ImageRequest:
    prompt: str
    negative_prompt: str = ""
    width: int = 0
    height: int = 0
    steps: int = 0
    seed: int = 0
    src: str = ""
    strength: float = 0.0
    ref_images: tuple = ()
    clip_skip: int = 0
    enable_parameters: str = ""


@dataclass
class Plan:
    """A validated request with every default filled in."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int  # schedule length; img2img runs the last denoise_steps of it
    seed: int  # the one used (drawn when the request's was ≤ 0)
    cfg: (
        float  # SD3: guidance scale (≤ 1 = none); FLUX-dev: embedded guidance; FLUX-schnell: unused
    )
    shift: float
    strength: float = 1.0  # 1.0 = text-to-image
    src: object = None  # numpy uint8 (height, width, 3) for img2img, else None
    clip_skip: int = 0

    @property
    def denoise_steps(self) -> int:
        if self.src is None:
            return self.steps
        return max(1, min(self.steps, int(self.steps * self.strength)))

    @property
    def guided(self) -> bool:
        return self.cfg > 1


def parse_parameters(text: str) -> dict:
    """EnableParameters: "key:value" / "key=value" entries, comma-separated. Bare names
    (diffusers-style flags such as "negative_prompt,num_inference_steps") are accepted and ignored."""
    values = {}
    for entry in (text or "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        cut = min((i for i in (entry.find(":"), entry.find("=")) if i >= 0), default=-1)
        if cut < 0:
            continue
        key, value = entry[:cut].strip().lower(), entry[cut + 1 :].strip()
        if key not in PARAMETERS:
            raise InvalidInput(
                f"EnableParameters: unknown parameter {key!r} (known: {', '.join(PARAMETERS)})"
            )
        try:
            values[PARAMETERS[key]] = float(value)
        except ValueError:
            raise InvalidInput(f"EnableParameters: {key} must be a number, got {value!r}") from None
    return values


def _size_error(name: str, value: int, pipe) -> str:
    low, high = value // 16 * 16, (value + 15) // 16 * 16
    near = " or ".join(str(v) for v in dict.fromkeys((low, high)) if 16 <= v <= pipe.max_size)
    return f"{name} {value} is not a multiple of 16" + (f" (nearest valid: {near})" if near else "")


def _check_size(name: str, value: int, pipe):
    if value <= 0:
        raise InvalidInput(f"{name} must be > 0, got {value}")
    if value % 16:
        raise InvalidInput(_size_error(name, value, pipe))
    if value > pipe.max_size:
        raise InvalidInput(
            f"{name} {value} is above this model's maximum of {pipe.max_size} pixels"
        )


def read_source(src: str):
    """The img2img source as a PIL RGB image; JSON (LocalAI's inpainting) is refused."""
    from PIL import Image, UnidentifiedImageError

    path = Path(src)
    if not path.is_file():
        raise NotFound(f"source image {src} does not exist")
    try:
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
    except OSError as exc:
        raise InvalidInput(f"cannot read source image {src}: {exc.strerror}") from None
    if path.suffix.lower() == ".json" or head.startswith(b"{"):
        raise Unsupported("inpainting is not supported by DiffusionKit's SD3/FLUX pipelines")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise InvalidInput(f"source image {src} is not a readable image: {exc}") from None


def plan_request(pipe, req: ImageRequest) -> Plan:
    """Validate and default a request; cheap, no MLX (runs off the MLX thread)."""
    import numpy as np

    if not (req.prompt or "").strip():
        raise InvalidInput("the prompt is empty")
    if req.ref_images:
        raise Unsupported(
            "reference images are not supported: no DiffusionKit model (SD3 / FLUX) takes them"
        )
    params = parse_parameters(req.enable_parameters)
    settings = pipe.settings
    if not 0 <= req.steps <= 1000:
        raise InvalidInput(
            f"steps must be between 1 and 1000 (0 = the model's default {pipe.default_steps}), got {req.steps}"
        )
    steps = req.steps or pipe.default_steps
    strength = params.get("strength", req.strength or settings.strength or DEFAULT_STRENGTH)
    if not 0 < strength <= 1:
        raise InvalidInput(f"strength must be in (0, 1], got {strength}")
    cfg = params.get("cfg", settings.cfg_scale or pipe.default_cfg)
    if not 0 <= cfg <= 100:
        raise InvalidInput(f"cfg_scale must be between 0 and 100, got {cfg}")
    shift = params.get("shift", pipe.shift)
    if shift <= 0:
        raise InvalidInput(f"shift must be > 0, got {shift}")
    clip_skip = req.clip_skip or settings.clip_skip
    if not 0 <= clip_skip <= pipe.clip_skip_limit():
        limit = pipe.clip_skip_limit()
        raise InvalidInput(
            f"clip_skip must be between 0 and {limit} for this model, got {clip_skip}"
        )
    if req.width < 0 or req.height < 0:
        raise InvalidInput(
            f"width and height must be > 0 (0 = default), got {req.width}x{req.height}"
        )

    source = read_source(req.src) if req.src else None
    if source is not None:
        width = req.width or max(16, source.width // 16 * 16)
        height = req.height or max(16, source.height // 16 * 16)
    else:
        width, height = req.width or pipe.default_size, req.height or pipe.default_size
    _check_size("width", width, pipe)
    _check_size("height", height, pipe)
    src = None
    if source is not None:
        from PIL import Image

        if source.size != (width, height):
            source = source.resize((width, height), Image.LANCZOS)
        src = np.asarray(source, dtype=np.uint8)
    seed = req.seed if req.seed > 0 else secrets.randbelow(2**31 - 1) + 1
    if seed >= 2**32:
        raise InvalidInput(f"seed must be below 2**32, got {seed}")
    return Plan(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt or "",
        width=width,
        height=height,
        steps=steps,
        seed=seed,
        cfg=cfg,
        shift=shift,
        strength=strength if src is not None else 1.0,
        src=src,
        clip_skip=clip_skip,
    )


# -- MLX thread -----------------------------------------------------------------------------------
def _padded(tokenizer, texts: list):
    """Token ids, each text padded to the tokenizer's max_length (DiffusionKit's _tokenize)."""
    import mlx.core as mx

    rows = []
    for text in texts:
        ids = tokenizer.tokenize(text)
        rows.append(ids + [tokenizer.pad_token] * (tokenizer.max_length - len(ids)))
    return mx.array(rows)


def encode_text(pipe, plan: Plan):
    """(token-level conditioning, pooled conditioning) for the prompt [and the negative prompt when
    SD3 guides]; batch 2 only when guidance is on."""
    import mlx.core as mx

    load_text_encoders(pipe)
    try:
        if pipe.family == "flux":
            tokens = _padded(pipe.tokenizer_l, [plan.prompt])
            # FLUX was trained on CLIP-L's pooled output WITHOUT the text projection (BFL's and
            # diffusers' CLIPTextModel pooler_output); DiffusionKit applies the projection
            pooled = pipe.clip_l(tokens).last_hidden_state[mx.arange(1), tokens.argmax(-1)]
            cond = t5_encode(pipe.t5, _padded(pipe.t5_tokenizer, [plan.prompt]))
        else:
            texts = [plan.prompt, plan.negative_prompt] if plan.guided else [plan.prompt]
            layer = -(plan.clip_skip + 2)  # penultimate layer by default, as in SD3
            out_l = pipe.clip_l(_padded(pipe.tokenizer_l, texts))
            out_g = pipe.clip_g(_padded(pipe.tokenizer_g, texts))
            cond = mx.concatenate([out_l.hidden_states[layer], out_g.hidden_states[layer]], axis=-1)
            pooled = mx.concatenate([out_l.pooled_output, out_g.pooled_output], axis=-1)
            # pad the CLIP features to the MMDiT's token width (DiffusionKit hard-codes 4096)
            cond = mx.pad(cond, [(0, 0), (0, 0), (0, pipe.token_dim - cond.shape[-1])])
            t5 = (
                t5_encode(pipe.t5, _padded(pipe.t5_tokenizer, texts))
                if pipe.use_t5
                else mx.zeros_like(cond)
            )
            cond = mx.concatenate([cond, t5.astype(cond.dtype)], axis=1)
        mx.eval(cond, pooled)
    finally:
        if pipe.settings.low_memory:
            free_text_encoders(pipe)
    return cond.astype(pipe.dtype), pooled.astype(pipe.dtype)


def sampler_for(pipe, shift: float):
    from diffusionkit.mlx.sampler import FluxSampler, ModelSamplingDiscreteFlow

    return (FluxSampler if pipe.family == "flux" else ModelSamplingDiscreteFlow)(shift=shift)


def sigmas_for(sampler, steps: int, flux: bool):
    """DiffusionKit's get_sigmas: `steps` intervals from sigma_max down to 0."""
    import mlx.core as mx

    start = sampler.timestep(sampler.sigma_max).item()
    end = sampler.timestep(sampler.sigma_min).item()
    timesteps = mx.linspace(start, end, steps + 1 if flux else steps)
    sigmas = [sampler.sigma(t) for t in timesteps]
    if not flux:
        sigmas.append(mx.array(0.0))
    return mx.stack(sigmas).astype(mx.float32)


def initial_latent(pipe, plan: Plan, sigma0, sampler):
    """Noise (numpy RandomState(seed), as DiffusionKit's get_noise draws it) scaled to sigma0, mixed
    with the encoded source image for img2img."""
    import mlx.core as mx
    import numpy as np

    rng = np.random.RandomState(plan.seed)
    shape = (
        1,
        pipe.latent_channels,
        plan.height // 8,
        plan.width // 8,
    )  # drawn NCHW, like DiffusionKit
    noise = mx.array(rng.standard_normal(shape).astype(np.float32)).transpose(0, 2, 3, 1)
    if plan.src is None:
        return noise
    image = mx.array(plan.src.astype(np.float32) / 255 * 2 - 1)[None]
    mean, logvar = pipe.vae_encoder(image.astype(pipe.dtype)).astype(mx.float32).split(2, axis=-1)
    std = mx.exp(0.5 * mx.clip(logvar, -30.0, 20.0))
    sample = mean + std * mx.array(rng.standard_normal(mean.shape).astype(np.float32))
    shift, scale = LATENT_FORMAT[pipe.family]
    return sampler.noise_scaling(sigma0, noise, (sample - shift) * scale)


def _with_guidance(y_embedder, guidance_in, t_embedder, scale: float):
    """FLUX-dev: the embedded guidance scale added to the pooled-text embedding, which is where the
    reference FLUX adds it (vec = time_in(t) + guidance_in(g) + vector_in(y)); DiffusionKit's own
    guidance_embed path feeds it through the wrong input and cannot run."""
    import mlx.core as mx
    import mlx.nn as nn

    class WithGuidance(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = y_embedder
            self.extra = guidance_in(t_embedder.timestep_embedding(mx.array([scale * 1000.0])))

        def __call__(self, pooled):
            return self.inner(pooled) + self.extra

    return WithGuidance()


def _denoised(pipe, sampler, x, timestep, sigma, cond, cfg: float):
    import mlx.core as mx

    x_in = mx.concatenate([x, x]) if cfg else x
    out = pipe.mmdit(
        latent_image_embeddings=x_in.astype(pipe.dtype),
        token_level_text_embeddings=mx.expand_dims(cond, 2),
        timestep=mx.broadcast_to(timestep, [len(x_in)]),
    )
    denoised = sampler.calculate_denoised(sigma, out, x_in)
    if not cfg:
        return denoised
    positive, negative = denoised.split(2)
    return negative + cfg * (positive - negative)


def modulation_for(pipe, pooled, timesteps, guidance) -> list:
    """Every step's adaLN modulation, computed up front as DiffusionKit's sample_euler does, then
    detached from the MMDiT as (module, {timestep: params}) pairs that a step installs while it
    runs. The MMDiT keeps its weights, so another request can run its own steps in between."""
    mmdit = pipe.mmdit
    y_embedder = mmdit.y_embedder
    try:
        if guidance is not None:
            mmdit.y_embedder = _with_guidance(
                y_embedder, pipe.guidance_in, mmdit.t_embedder, guidance
            )
        mmdit.cache_modulation_params(pooled, timesteps)  # offloads the adaLN weights
        return [
            (m, m._modulation_params)
            for _, m in mmdit.named_modules()
            if hasattr(m, "_modulation_params")
        ]
    finally:
        mmdit.y_embedder = y_embedder
        mmdit.load_weights(
            pipe.modulation, strict=False
        )  # not load_mmdit(): no checkpoint/hub re-read
        mmdit.clear_modulation_params_cache()
        mmdit.pop("to_offload", None)  # the offloaded layers, listed again among the parameters


def euler_step(pipe, sampler, x, timesteps, sigmas, i: int, cond, cfg: float, modulation: list):
    """One Euler step (DiffusionKit's sample_euler body) with this request's modulation installed
    for the step only."""
    import mlx.core as mx

    try:
        for module, params in modulation:
            module._modulation_params = params
        denoised = _denoised(pipe, sampler, x, timesteps[i], sigmas[i], cond, cfg)
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        mx.eval(x)
    finally:
        for module, _ in modulation:
            module.pop(
                "_modulation_params", None
            )  # an mlx Module is a dict: the attribute is an item
    return x


def sample(pipe, plan: Plan, cond, pooled, on_step=None, is_cancelled=None):
    """Euler steps over the flow-matching sigmas; one on_step(done, total, seconds) per step (the
    first step's seconds include the modulation pass, so the seconds add up to the whole loop)."""
    flux = pipe.family == "flux"
    sampler = sampler_for(pipe, plan.shift)
    sigmas = sigmas_for(sampler, plan.steps, flux)[plan.steps - plan.denoise_steps :]
    x = initial_latent(pipe, plan, sigmas[0], sampler)
    cfg = plan.cfg if plan.guided and not flux else 0.0
    guidance = plan.cfg if flux and pipe.guidance_in is not None else None
    timesteps = sampler.timestep(sigmas).astype(pipe.dtype)
    total = len(sigmas) - 1
    start = time.perf_counter()
    modulation = modulation_for(pipe, pooled, timesteps[:total], guidance)
    for i in range(total):
        if is_cancelled is not None and is_cancelled():
            raise Cancelled(f"image generation cancelled before step {i + 1}/{total}")
        x = euler_step(pipe, sampler, x, timesteps, sigmas, i, cond, cfg, modulation)
        if on_step is not None:
            on_step(i + 1, total, time.perf_counter() - start)
        start = time.perf_counter()
    return x


def decode(pipe, latent):
    """uint8 RGB array (height, width, 3) from the final latent."""
    import mlx.core as mx
    import numpy as np

    shift, scale = LATENT_FORMAT[pipe.family]
    image = pipe.vae_decoder((latent / scale + shift).astype(pipe.dtype)).astype(mx.float32)
    image = (mx.clip(image / 2 + 0.5, 0, 1) * 255).astype(mx.uint8)
    return np.array(image[0])


def generate(pipe, plan: Plan, on_step=None, is_cancelled=None):
    """The image for a plan (MLX thread), as a PIL RGB image of exactly plan.width × plan.height."""
    from PIL import Image

    if pipe.mmdit is None:
        raise Precondition("the image model has been unloaded")
    pipe = copy.copy(pipe)  # this run's models, even if the pipeline is freed between steps
    try:
        cond, pooled = encode_text(pipe, plan)
        latent = sample(pipe, plan, cond, pooled, on_step, is_cancelled)
        if is_cancelled is not None and is_cancelled():
            raise Cancelled("image generation cancelled before decoding")
        pixels = decode(pipe, latent)
    except RuntimeError as exc:
        text = str(exc).lower()
        if "memory" in text or "malloc" in text:
            raise OutOfMemory(
                f"not enough memory for a {plan.width}x{plan.height} image: {exc}"
            ) from None
        raise
    return Image.fromarray(pixels, "RGB")


def write_png(image, dst: str) -> None:
    """Write `image` to dst atomically (publish.atomic_file); a full disk raises NoSpace."""
    target = Path(dst)
    folder = target.parent
    if not folder.is_dir():
        raise InvalidInput(f"cannot write {dst}: the folder {folder} does not exist")
    try:
        with publish.atomic_file(target) as f:
            image.save(f, format="PNG")
    except OSError as exc:
        raise InvalidInput(f"cannot write {dst}: {exc.strerror or exc}") from None
