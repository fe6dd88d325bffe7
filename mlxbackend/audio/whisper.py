"""Whisper through mlx-whisper 0.4.3: loading an MLX whisper folder and transcribing with
segments reported window by window. Worker thread only (MLX)."""

import contextvars
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlxbackend.errors import Cancelled, InvalidInput
from mlxbackend.worker import pause

SAMPLE_RATE = 16000
DIM_KEYS = ("n_mels", "n_audio_ctx", "n_audio_state", "n_text_ctx", "n_vocab")
FALLBACK = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # whisper's usual temperature fallback


def is_whisper_dir(path) -> bool:
    """An MLX whisper folder: config.json with whisper's ModelDimensions."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and all(k in config for k in DIM_KEYS)


@dataclass
class WhisperModel:
    path: Path
    model: object
    fp16: bool

    @property
    def key(self) -> str:
        return str(self.path)


def load_whisper(path: Path) -> WhisperModel:
    """float32 on CPU (fp16=False), float16 on Metal; weights cast to match (mlx-whisper's
    decoder refuses audio features of another dtype)."""
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_whisper.load_models import load_model

    if not (path / "weights.safetensors").exists() and not (path / "weights.npz").exists():
        raise InvalidInput(f"{path} has no weights.safetensors or weights.npz")
    fp16 = mx.default_device().type == mx.DeviceType.gpu
    dtype = mx.float16 if fp16 else mx.float32
    model = load_model(str(path), dtype=dtype)
    model.update(
        tree_map(
            lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a,
            model.parameters(),
        )
    )
    mx.eval(model.parameters())
    return WhisperModel(path, model, fp16)


@dataclass
class Options:
    language: str = ""  # empty: detect
    translate: bool = False
    prompt: str = ""
    temperature: float = 0.0
    words: bool = False  # word timestamps (segment times refined)
    sample_len: int = 0  # max tokens per window (0: the model's default)


@dataclass
class Segment:
    id: int
    start: float  # seconds
    end: float
    text: str
    tokens: list = field(default_factory=list)
    speaker: str = ""  # with diarize: "SPEAKER_00" … (audio/diarize.py)


@dataclass
class Progress:
    done: float  # seconds of audio decoded
    total: float


@dataclass
class Transcript:
    text: str
    language: str
    duration: float
    segments: list


def language_code(language: str) -> str:
    """'' (detect), a code ('en') or a name ('english') → the code; InvalidInput otherwise."""
    from mlx_whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

    lang = (language or "").strip().lower()
    if not lang or lang == "auto":
        return ""
    if lang in LANGUAGES:
        return lang
    if lang in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[lang]
    base = lang.replace("_", "-").split("-")[0]  # en-US, pt_BR
    if base in LANGUAGES:
        return base
    raise InvalidInput(
        f"unknown language {language!r}; use an ISO 639-1 code such as 'en' or a name such as 'english'"
    )


def temperatures(t: float) -> tuple:
    """0 → whisper's fallback ladder; t > 0 → t, then up in 0.2 steps to 1.0."""
    if t is None or t <= 0:
        return FALLBACK
    steps = [round(t, 4)]
    while steps[-1] + 0.2 <= 1.0 + 1e-6:
        steps.append(round(steps[-1] + 0.2, 4))
    return tuple(steps)


CURRENT_HOOK: contextvars.ContextVar = contextvars.ContextVar("mlxb_whisper_hook", default=None)


class _Dispatch:
    """Stands in for the `tqdm` module inside mlx_whisper.transcribe, installed once: its bar is
    the current task's _WindowHook (each worker task has its own context), so transcriptions
    whose windows interleave on the worker never share a bar."""

    def tqdm(self, total=None, **kwargs):
        hook = CURRENT_HOOK.get()
        if hook is None:
            import tqdm

            return tqdm.tqdm(total=total, **kwargs)
        return hook.tqdm(total=total, **kwargs)


class _WindowHook:
    """Stands in for the `tqdm` module inside mlx_whisper.transcribe. Its progress bar's
    update() runs once per decoded 30-s window, right after the window's segments were
    appended to transcribe's `all_segments`: read them from the caller's frame."""

    def __init__(self, on_window):
        self.on_window = on_window

    def tqdm(self, total=None, **_):
        hook = self

        class Bar:
            def __init__(self):
                self.n = 0

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def update(self, n=1):
                self.n += n
                frame = sys._getframe(1)
                segments = frame.f_locals.get("all_segments")
                language = (frame.f_locals.get("decode_options") or {}).get("language", "")
                hook.on_window(segments, self.n, total, language)

        return Bar()


def transcribe(
    wm: WhisperModel, audio: np.ndarray, opts: Options, emit, is_cancelled
) -> Transcript:
    """Run mlx_whisper.transcribe on a 16 kHz float32 array. emit(event) gets a Segment for every
    non-empty segment as its window is decoded, and Progress after each window. Cancellation is
    seen between windows. Segment times are clamped to be monotone and within the audio."""
    import importlib

    from mlx_whisper.audio import HOP_LENGTH

    # the package re-exports the function under the submodule's name: fetch the module itself
    mwt = importlib.import_module("mlx_whisper.transcribe")

    duration = len(audio) / SAMPLE_RATE
    sent: list[Segment] = []
    seen = [0]
    last = [0.0]

    def forward(raw_segments):
        for s in raw_segments:
            text = s.get("text", "")
            if not text:
                continue  # mlx-whisper clears instantaneous / blank segments
            start = min(max(float(s["start"]), last[0], 0.0), duration)
            end = min(max(float(s["end"]), start), duration)
            last[0] = start
            seg = Segment(len(sent), start, end, text, [int(t) for t in s.get("tokens", [])])
            sent.append(seg)
            emit(seg)

    def on_window(segments, frames, total_frames, language):
        if segments is not None:
            forward(segments[seen[0] :])
            seen[0] = len(segments)
        if total_frames:
            emit(Progress(min(frames, total_frames) * HOP_LENGTH / SAMPLE_RATE, duration))
        if is_cancelled():
            raise Cancelled("transcription cancelled")
        pause()  # one window is one step of the worker task

    if is_cancelled():
        raise Cancelled("transcription cancelled")
    decode = {"fp16": wm.fp16, "task": "translate" if opts.translate else "transcribe"}
    if opts.language:
        decode["language"] = opts.language
    if opts.sample_len > 0:
        decode["sample_len"] = opts.sample_len
    # mlx-whisper keeps one model per path whatever the dtype: hand it ours.
    mwt.ModelHolder.model, mwt.ModelHolder.model_path = wm.model, wm.key
    if not isinstance(mwt.tqdm, _Dispatch):
        mwt.tqdm = _Dispatch()
    token = CURRENT_HOOK.set(_WindowHook(on_window))
    try:
        result = mwt.transcribe(
            audio,
            path_or_hf_repo=wm.key,
            verbose=None,
            temperature=temperatures(opts.temperature),
            initial_prompt=opts.prompt or None,
            word_timestamps=opts.words,
            **decode,
        )
    finally:
        CURRENT_HOOK.reset(token)
    forward(result["segments"][seen[0] :])  # anything the hook did not see
    return Transcript("".join(s.text for s in sent), result.get("language") or "", duration, sent)
