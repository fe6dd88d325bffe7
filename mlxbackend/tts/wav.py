"""What every TTS family (and music generation) shares: float audio → PCM16, and the WAV file written atomically."""

import wave
from pathlib import Path

import numpy as np

from mlxbackend import publish
from mlxbackend.errors import InvalidInput


def pcm16(audio: np.ndarray) -> np.ndarray:
    """float [-1, 1] → int16, as mlx_audio.audio_io.write does (clip, × 32767, truncate)."""
    return (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")


def check_dst(dst: str, rpc: str = "TTS") -> Path:
    """dst must name a file in an existing folder (checked before any synthesis)."""
    if not dst:
        raise InvalidInput(f"{rpc} needs dst, the path of the WAV file to write")
    target = Path(dst)
    if target.is_dir():
        raise InvalidInput(f"cannot write {dst}: it is a folder")
    if not target.parent.is_dir():
        raise InvalidInput(f"cannot write {dst}: the folder {target.parent} does not exist")
    return target


def write_wav(dst: str, chunks: list, sample_rate: int) -> None:
    """PCM16 WAV, mono or (chunks of shape (samples, channels)) interleaved, written atomically
    (publish.atomic_file): complete under its name, or the previous file untouched. A full disk
    raises NoSpace."""
    target = check_dst(dst)
    try:
        with publish.atomic_file(target) as f:
            with wave.open(f, "wb") as w:
                w.setnchannels(chunks[0].shape[1] if chunks and chunks[0].ndim == 2 else 1)
                w.setsampwidth(2)
                w.setframerate(sample_rate)
                for chunk in chunks:
                    w.writeframes(chunk.tobytes())
    except OSError as exc:
        raise InvalidInput(f"cannot write {dst}: {exc.strerror or exc}") from None
