"""Speaker diarization beside the whisper model: an mlx-audio diarizer (Sortformer) named by the
whisper model's Options `diarization_model`, run on the same 16 kHz audio; each transcript
segment gets the speaker who talks most during it."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxbackend.errors import InvalidInput, Precondition

OPTION = "diarization_model"
MISSING = (
    f"diarize needs a diarization model: load the whisper model with Options {OPTION}:<folder> "
    "(an mlx-audio Sortformer, e.g. mlx-community/diar_streaming_sortformer_4spk-v2.1-fp16)"
)


@dataclass
class Turn:
    start: float  # seconds
    end: float
    speaker: int


def load_diarizer(path: Path):
    """Worker thread: mlx-audio's diarizer for an mlx-audio folder (config.json + weights)."""
    if not (path / "config.json").is_file():
        raise InvalidInput(f"Options {OPTION}: {path} is not an mlx-audio diarization folder")
    from mlx_audio.vad.utils import load

    try:
        return load(path, strict=True)
    except (ValueError, KeyError) as exc:
        raise InvalidInput(f"Options {OPTION}: {path} does not load ({exc})") from None


def speaker_turns(diarizer, audio: np.ndarray) -> list:
    """Who speaks when (worker thread)."""
    import mlx.core as mx

    out = diarizer.generate(mx.array(audio), sample_rate=16000)
    return [Turn(float(s.start), float(s.end), int(s.speaker)) for s in out.segments]


def speaker_of(start: float, end: float, turns: list) -> str:
    """The speaker with the most overlap with [start, end] ("SPEAKER_00" …), "" for nobody."""
    overlap = {}
    for t in turns:
        shared = min(end, t.end) - max(start, t.start)
        if shared > 0:
            overlap[t.speaker] = overlap.get(t.speaker, 0.0) + shared
    if not overlap:
        return ""
    best = max(sorted(overlap), key=lambda s: overlap[s])
    return f"SPEAKER_{best:02d}"


def require(diarizer) -> None:
    if diarizer is None:
        raise Precondition(MISSING)
