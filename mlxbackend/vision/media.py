"""Decode the media of a request (PredictOptions.Images / Videos / Audios) into model inputs.

LocalAI sends base64 without a `data:` prefix; other clients send data URIs: both are taken.
Images become RGB PIL images (downscaled to Options `max_pixels`), videos frames sampled with
PyAV at Options `video_fps` (at most `video_max_frames`), audio float32 mono at 16 kHz (PyAV's
resampler). Anything that does not decode is INVALID_ARGUMENT naming the item."""

import base64
import binascii
import io
import math
import re
from dataclasses import dataclass, field

from mlxbackend.errors import InvalidInput

DEFAULT_LIMITS = {"image": 16, "video": 2, "audio": 4}  # per prompt, ModelOptions.Limit*PerPrompt
DEFAULT_VIDEO_FPS = 2.0
DEFAULT_VIDEO_MAX_FRAMES = 32
AUDIO_RATE = 16000
_DATA_URI = re.compile(r"^data:[^,;]*(;[^,]*)?,", re.IGNORECASE)


@dataclass
class Media:
    """A request's media as LocalAI sends them (base64 strings), in message order."""

    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)
    audios: list = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.images or self.videos or self.audios)

    def describe(self) -> str:
        parts = [
            f"{len(v)} {k}{'s' if len(v) > 1 else ''}"
            for k, v in (("image", self.images), ("video", self.videos), ("audio", self.audios))
            if v
        ]
        return ", ".join(parts)


@dataclass
class Video:
    """Frames (T, H, W, 3) uint8 and where they came from, as mlx-vlm's video_metadata wants."""

    frames: object
    fps: float
    total_frames: int
    indices: list


def check_limits(media: Media, limits: dict) -> None:
    """ModelOptions.LimitImagePerPrompt / LimitVideoPerPrompt / LimitAudioPerPrompt (0 = default)."""
    for kind, items in (("image", media.images), ("video", media.videos), ("audio", media.audios)):
        limit = int(limits.get(kind) or DEFAULT_LIMITS[kind])
        if len(items) > limit:
            raise InvalidInput(
                f"{len(items)} {kind}s in one prompt, more than the limit of {limit} "
                f"(ModelOptions Limit{kind.capitalize()}PerPrompt)"
            )


def decode_base64(item: str, what: str) -> bytes:
    """Bytes of a base64 string or a base64 data URI."""
    text = item.strip()
    match = _DATA_URI.match(text)
    if match:
        if ";base64" not in (match.group(1) or "").lower():
            raise InvalidInput(f"{what}: only base64 data URIs are accepted")
        text = text[match.end() :]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{what} is not valid base64") from None
    if not data:
        raise InvalidInput(f"{what} is empty")
    return data


def load_image(item: str, what: str, max_pixels: int = 0):
    """An RGB PIL image, downscaled (aspect kept) to at most max_pixels when set."""
    from PIL import Image, UnidentifiedImageError

    data = decode_base64(item, what)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidInput(f"{what} is not a readable image ({exc})") from None
    image = image.convert("RGB")
    if max_pixels and image.width * image.height > max_pixels:
        image = image.resize(fit(image.width, image.height, max_pixels), Image.Resampling.BICUBIC)
    return image


def fit(width: int, height: int, max_pixels: int) -> tuple:
    """(width, height) scaled down, aspect kept, to at most max_pixels."""
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, int(width * scale)), max(1, int(height * scale))


def load_video(item: str, what: str, fps: float, max_frames: int, max_pixels: int = 0) -> Video:
    """Frames sampled evenly in time at `fps` (at least 2, at most max_frames, an even count)."""
    import av
    import numpy as np

    data = decode_base64(item, what)
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise InvalidInput(f"{what} has no video stream")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 25)
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except InvalidInput:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        raise InvalidInput(f"{what} is not a readable video ({exc})") from None
    if not frames:
        raise InvalidInput(f"{what} has no frames")
    total = len(frames)
    want = min(max(2, round(total / rate * fps)), max_frames, total)
    want = max(want - want % 2, 1) if total > 1 else 1
    indices = np.linspace(0, total - 1, want).round().astype(int).tolist()
    picked = np.stack([frames[i] for i in indices])
    if len(indices) == 1:  # the temporal patch of Qwen-style towers needs two frames
        picked, indices = np.concatenate([picked, picked]), indices * 2
    if max_pixels and picked.shape[1] * picked.shape[2] > max_pixels:
        picked = _resize_frames(picked, max_pixels)
    return Video(picked, rate, total, indices)


def _resize_frames(frames, max_pixels: int):
    import numpy as np
    from PIL import Image

    size = fit(frames.shape[2], frames.shape[1], max_pixels)
    return np.stack([np.asarray(Image.fromarray(f).resize(size)) for f in frames])


def load_audio(item: str, what: str):
    """Float32 mono samples at 16 kHz from any container PyAV reads (wav, mp3, ogg, …)."""
    import av
    import numpy as np

    data = decode_base64(item, what)
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.audio:
                raise InvalidInput(f"{what} has no audio stream")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
            chunks = []
            for frame in container.decode(container.streams.audio[0]):
                chunks.extend(r.to_ndarray().reshape(-1) for r in resampler.resample(frame))
            chunks.extend(r.to_ndarray().reshape(-1) for r in resampler.resample(None))
    except InvalidInput:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        raise InvalidInput(f"{what} is not readable audio ({exc})") from None
    if not chunks:
        raise InvalidInput(f"{what} has no audio samples")
    return np.concatenate(chunks).astype(np.float32)
