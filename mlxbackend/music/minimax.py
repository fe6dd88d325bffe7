"""MiniMax Music 3 on MLX (mlx-audio 0.6.2's model): a description and lyrics → 44.1 kHz stereo.

mlx-audio's `Model.generate` runs two loops: the language model writes one frame of audio codes
per step (25 frames a second of music; a depth decoder fills each frame's codebooks), then a
flow-matching transformer turns the frames into latents chunk by chunk (200 frames; per Euler
step two transformer calls, for guidance) and the vocoder makes the waveform. This module runs
those loops with mlx-audio's own pieces (`ar_one_frame`, `denoise_chunk`, the encoders and the
vocoder) for two reasons: the worker pauses at every frame and before every transformer call
(other requests run there; a cancel or Free stops the song there), and the flow's noise is drawn
from the request's own key, split as MLX's global random state would be after
`mx.random.seed(seed + 7)`, so the audio equals mlx-audio's `generate` for the same inputs and
seed whatever runs beside it. The tokenizer is loaded once, at load (mlx-audio loads it on every
call), and runs off the worker."""

import math
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlxbackend.errors import Cancelled, EmptyOutput, InvalidInput
from mlxbackend.music import SongRequest, music_family
from mlxbackend.options import number_option
from mlxbackend.worker import pause

MAX_SECONDS = 360.0  # mlx-audio's limits
MAX_STEPS = 30
MAX_PROMPT_TOKENS = 5_000
INSTRUMENTAL = "[instrumental]"
# SoundGenerationRequest's musical fields, written into the description as the tags mlx-audio's
# clean_caption rewrites ("<|bpm 120|>" → "bpm is 120")
TAGS = (("bpm", "bpm"), ("keyscale", "key"), ("timesignature", "time_signature"))


@dataclass
class Settings:
    """LoadModel Options (the model YAML): defaults for every request."""

    steps: int = 30  # flow-matching Euler steps (mlx-audio's default and maximum)
    duration: float = 60.0  # seconds, when the request sets none (mlx-audio's default)
    seed: int | None = None  # None: a new random seed per request (the reply names it)


@dataclass
class MusicModel:
    path: Path
    model: object  # mlx_audio.music.models.minimax_music3.Model
    tokenizer: object  # transformers tokenizer from the folder's tokenizer/
    settings: Settings
    sample_rate: int
    family: str = "minimax_music3"
    tokenizing: threading.Lock = field(default_factory=threading.Lock)  # one encode at a time

    def describe(self) -> str:
        return f"MiniMax Music 3 {self.path} ({self.sample_rate} Hz stereo)"


@dataclass
class Song:
    """One request, validated and tokenized; nothing generated yet."""

    description: str
    lyrics: str
    duration: float
    steps: int
    seed: int
    token_ids: np.ndarray  # (1, N) int32: the assembled prompt


def settings_from(options: dict) -> Settings:
    s = Settings()
    s.steps = number_option(options, "steps", int, 1, MAX_STEPS, s.steps)
    s.duration = number_option(options, "duration", float, 0, MAX_SECONDS, s.duration)
    if s.duration <= 0:
        raise InvalidInput("option duration: must be more than 0 seconds")
    s.seed = number_option(options, "seed", int, 0, 2**31 - 1, None)
    return s


# -- loading (worker thread) --------------------------------------------------------------------
def load_music(path: Path, options: dict) -> MusicModel:
    """mlx-audio's music loader on a local folder, and the folder's tokenizer."""
    from mlx_audio.music import load_model
    from transformers import AutoTokenizer

    settings = settings_from(options)
    path = Path(path)
    family = music_family(path)
    if family == "source":
        raise InvalidInput(
            f"{path} is MiniMax Music 3's official Diffusers tree; convert it to MLX first "
            f"(python -m mlx_audio.convert --hf-path {path} --mlx-path OUT), or download "
            "mlx-community/MiniMax-Music3-4bit"
        )
    if family != "minimax_music3":
        raise InvalidInput(
            f"{path}: config.json names no music family this backend serves (MiniMax Music 3: "
            "model_type minimax_music3)"
        )
    if not (path / "tokenizer").is_dir():
        raise InvalidInput(
            f"{path} has no tokenizer/ folder (MiniMax Music 3's text tokenizer, which "
            "mlx-audio's convert copies beside the weights)"
        )
    try:
        model = load_model(path)
        tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"{path} is not a loadable MiniMax Music 3 folder: {exc}") from None
    return MusicModel(path, model, tokenizer, settings, int(model.sample_rate))


# -- requests -----------------------------------------------------------------------------------
def plan_song(mm: MusicModel, req: SongRequest) -> Song:
    """Validate a request and tokenize its prompt (a thread: no MLX here)."""
    from mlx_audio.music.models.minimax_music3.prompt import assemble_prompt

    refuse_unsupported(req)
    description = describe(req)
    lyrics = song_lyrics(req)
    duration = mm.settings.duration if req.duration is None else float(req.duration)
    if not math.isfinite(duration) or not 0 < duration <= MAX_SECONDS:
        raise InvalidInput(f"duration {req.duration}: must be more than 0 and at most 360 seconds")
    with mm.tokenizing:  # requests plan in threads; a fast tokenizer is not re-entrant
        ids = mm.tokenizer(assemble_prompt(description, lyrics), return_tensors="np")["input_ids"]
    if ids.shape[1] > MAX_PROMPT_TOKENS:
        raise InvalidInput(
            f"the description and lyrics make {ids.shape[1]} prompt tokens; "
            f"MiniMax Music 3 takes at most {MAX_PROMPT_TOKENS}"
        )
    s = mm.settings
    seed = s.seed if s.seed is not None else random.randrange(2**31)
    return Song(description, lyrics, duration, s.steps, seed, ids.astype(np.int32))


def refuse_unsupported(req: SongRequest) -> None:
    """The request fields MiniMax Music 3 cannot honour: INVALID_ARGUMENT naming each."""
    if req.temperature is not None and req.temperature != 1.0:
        raise InvalidInput(
            f"temperature {req.temperature}: MiniMax Music 3 samples its codes at a fixed "
            "temperature (top-k 50); leave temperature unset"
        )
    if req.sample is False:
        raise InvalidInput("sample false: MiniMax Music 3 always samples (top-k 50)")
    if req.src or req.src_divisor:
        raise InvalidInput("src: MiniMax Music 3 generates from text only, not from audio")
    if req.think:
        raise InvalidInput("think: MiniMax Music 3 has no thinking step")


def describe(req: SongRequest) -> str:
    """The music description: caption, then text (either may be empty), then the musical fields
    as caption tags."""
    parts = [p.strip() for p in (req.caption, req.text) if p and p.strip()]
    if len(parts) == 2 and parts[0] == parts[1]:
        parts = parts[:1]
    if not parts:
        raise InvalidInput("SoundGeneration needs text (or caption): a description of the music")
    if req.bpm is not None and not 0 < req.bpm < 1000:
        raise InvalidInput(f"bpm {req.bpm}: expected beats per minute, 1 to 999")
    for name, tag in TAGS:
        value = getattr(req, name)
        if value not in (None, ""):
            parts.append(f"<|{tag} {str(value).strip()}|>")
    if req.language and req.language.strip():
        parts.append(f"<|language {req.language.strip()}|>")
    return "\n".join(parts)


def song_lyrics(req: SongRequest) -> str:
    lyrics = (req.lyrics or "").strip()
    if req.instrumental and lyrics and lyrics.lower() != INSTRUMENTAL:
        raise InvalidInput("instrumental is set and lyrics are given: send one or the other")
    return lyrics or INSTRUMENTAL


# -- generation (worker thread) -----------------------------------------------------------------
def compose(
    mm: MusicModel, song: Song, is_cancelled=lambda: False, progress=lambda *_: None
) -> np.ndarray:
    """The song as float32 samples (samples, 2) in [-1, 1]; pauses at every frame and
    transformer call. progress(phase, done, total) after each: phase "frames" (the language
    model, one per frame) then "flow" (the transformer calls of every chunk)."""
    import mlx.core as mx

    frames = frame_hiddens(mm, song, is_cancelled, progress)
    audio = flow(mm, frames, song, is_cancelled, progress)
    waveform = mx.clip(audio[0].transpose(1, 0).astype(mx.float32), -1.0, 1.0)
    samples = np.array(waveform)
    mx.clear_cache()
    if samples.size == 0 or not np.isfinite(samples).all():
        raise EmptyOutput("MiniMax Music 3 produced no finite audio")
    return samples


def text_pair(mm: MusicModel, token_ids: np.ndarray):
    """The prompt and its unconditional twin (inner tokens → the CFG token), as mlx-audio's
    _encode_official_text_pair builds them."""
    import mlx.core as mx

    conditional = mx.array(token_ids)
    unconditional = conditional
    if unconditional.shape[1] > 3:
        middle = mx.full(
            (1, unconditional.shape[1] - 3), mm.model.config.audio_cfg_token_id, dtype=mx.int32
        )
        unconditional = mx.concatenate(
            [unconditional[:, :1], middle, unconditional[:, -2:]], axis=1
        )
    return mx.concatenate([conditional, unconditional], axis=0)


def frame_hiddens(mm: MusicModel, song: Song, is_cancelled, progress):
    """mlx-audio's generate_frame_hiddens, a pause per frame: (1, frames, fused hidden)."""
    import mlx.core as mx
    from mlx_audio.music.models.minimax_music3.ar import ar_one_frame, qwen3_hidden

    model, config = mm.model, mm.model.config
    lm, depth = model.language_model, model.rvq_depth_decoder
    max_frames = max(1, int(song.duration * config.frame_rate))
    key = mx.random.key(song.seed)
    hidden, cache = qwen3_hidden(lm, lm.model.embed_tokens(text_pair(mm, song.token_ids)))
    last_hidden = hidden[:, -1]
    frames = []
    for index in range(max_frames + 1):
        _step(is_cancelled)
        key, subkey = mx.random.split(key)
        result = ar_one_frame(lm, depth, config, last_hidden, cache, subkey, emit_frame=index > 0)
        last_hidden, cache = result.last_hidden, result.cache
        if result.ended:
            break
        mx.eval(last_hidden, result.frame_hidden)
        if index > 0:
            frames.append(result.frame_hidden)
            progress("frames", len(frames), max_frames)
            if len(frames) >= max_frames:
                break
    if not frames:
        # the model's own choice for this description and seed, not a fault: another seed or
        # description is the remedy (mlx-audio raises ValueError here)
        raise InvalidInput(
            f"MiniMax Music 3 ended the song before its first frame (seed {song.seed}): "
            "try another seed or description"
        )
    return mx.stack(frames, axis=1)


def flow(mm: MusicModel, frames, song: Song, is_cancelled, progress):
    """mlx-audio's _run_flow with the request's own noise key: (1, 2, samples)."""
    import mlx.core as mx
    from mlx_audio.music.models.minimax_music3.config import (
        CHUNK_FRAMES,
        DIT_CFG_SCALE,
        OVERLAP_LATENT_LENGTH,
    )
    from mlx_audio.music.models.minimax_music3.euler import denoise_chunk
    from mlx_audio.music.models.minimax_music3.minimax_music3 import (
        _chunk_starts,
        _crop_waveform,
    )

    model = mm.model
    starts = _chunk_starts(frames.shape[1])
    key = mx.random.key(song.seed + 7)  # mlx-audio: mx.random.seed(seed + 7), then normal()
    calls = len(starts) * song.steps * (1 if DIT_CFG_SCALE == 1.0 else 2)
    transformer = _pausing(model.transformer, is_cancelled, lambda n: progress("flow", n, calls))
    waves, previous_latent, previous_condition = [], None, None
    for start in starts:
        end = min(start + CHUNK_FRAMES, frames.shape[1])
        condition = model.condition_encoder(frames[:, start:end])
        key, subkey = mx.random.split(key)
        noise = mx.random.normal(
            (1, model.config.dit_in_channels, condition.shape[1]), key=subkey
        ).astype(condition.dtype)
        latents, condition = denoise_chunk(
            transformer,
            noise,
            condition,
            num_inference_steps=song.steps,
            guidance_scale=DIT_CFG_SCALE,
            previous_latent=previous_latent,
            previous_condition=previous_condition,
        )
        carry_start = max(0, latents.shape[-1] - 2 * OVERLAP_LATENT_LENGTH)
        carry_end = max(carry_start, latents.shape[-1] - OVERLAP_LATENT_LENGTH)
        previous_latent = latents[..., carry_start:carry_end]
        previous_condition = condition[:, carry_start:carry_end]
        _step(is_cancelled)
        waves.append(model.vocoder(latents))
        mx.eval(waves[-1], previous_latent, previous_condition)
    return mx.concatenate(
        [_crop_waveform(wave, i, len(waves)) for i, wave in enumerate(waves)], axis=-1
    )


def _step(is_cancelled) -> None:
    """A pause point: stop here if the request was cancelled, else let other work run."""
    if is_cancelled():
        raise Cancelled("music generation cancelled")
    pause()


def _pausing(transformer, is_cancelled, made):
    """The flow transformer with a pause point before each call (denoise_chunk calls it), and
    made(calls so far) after it."""
    count = 0

    def call(*args):
        nonlocal count
        _step(is_cancelled)
        out = transformer(*args)
        count += 1
        made(count)
        return out

    return call
