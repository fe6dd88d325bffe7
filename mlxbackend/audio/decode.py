"""Any audio container → 16 kHz mono float32, through PyAV (FFmpeg's libraries ship inside the
`av` wheel; no system ffmpeg needed)."""

import os

import numpy as np

from mlxbackend.errors import InvalidInput, NotFound

SAMPLE_RATE = 16000


def load_audio(path: str, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode the first audio stream of `path`, downmixed and resampled. Raises NotFound for a
    missing file and InvalidInput for anything that is not decodable, non-empty audio."""
    if not path:
        raise InvalidInput("dst (the audio file's path) is required")
    if not os.path.exists(path):
        raise NotFound(f"audio file not found: {path}")
    if not os.path.isfile(path):
        raise InvalidInput(f"not a file: {path}")
    if os.path.getsize(path) == 0:
        raise InvalidInput(f"audio file is empty: {path}")
    import av

    chunks = []
    try:
        with av.open(path, "r") as container:
            if not container.streams.audio:
                raise InvalidInput(f"no audio stream in {path}")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except InvalidInput:
        raise
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise InvalidInput(f"cannot decode {os.path.basename(path)} as audio: {exc}") from exc
    audio = (
        np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    )
    if audio.size == 0:
        raise InvalidInput(f"no audio samples in {path} (zero-length audio)")
    if not np.isfinite(audio).all():
        raise InvalidInput(f"audio in {path} has non-finite samples")
    return audio
