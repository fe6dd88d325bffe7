"""A tiny RANDOM whisper model in MLX's folder format (config.json + weights.safetensors).

The vocabulary (51865, multilingual) and the audio context (1500 = 30 s) must match real whisper
so mlx-whisper's tokenizer and 30-second windows work; everything else is tiny. n_text_ctx 64
bounds every window's output to 32 tokens (mlx-whisper's sample_len = n_text_ctx // 2), so a
random model cannot run away."""

import json
from dataclasses import asdict
from pathlib import Path

DIMS = dict(
    n_mels=80,
    n_audio_ctx=1500,
    n_audio_state=64,
    n_audio_head=2,
    n_audio_layer=1,
    n_vocab=51865,
    n_text_ctx=64,
    n_text_state=64,
    n_text_head=2,
    n_text_layer=1,
)


def build_tiny_whisper(out: Path, seed: int = 0) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_whisper.whisper import ModelDimensions, Whisper

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    dims = ModelDimensions(**DIMS)
    model = Whisper(dims, mx.float32)
    weights = {k: v for k, v in tree_flatten(model.parameters()) if k != "alignment_heads"}
    mx.save_safetensors(str(out / "weights.safetensors"), weights)
    (out / "config.json").write_text(
        json.dumps({"model_type": "whisper", **asdict(dims)}, indent=2)
    )
    return out


def tone(seconds: float, rate: int = 16000, channels: int = 1):
    """A chirp with a little noise, float32 in [-1, 1], shape (channels, samples)."""
    import numpy as np

    t = np.arange(int(seconds * rate)) / rate
    freq = 200 + 600 * (t % 5) / 5
    wave = 0.4 * np.sin(2 * np.pi * np.cumsum(freq) / rate)
    wave += 0.02 * np.random.default_rng(0).standard_normal(len(t))
    return np.stack([wave] * channels).astype(np.float32)


def write_wav(path: Path, seconds: float, rate: int = 44100, channels: int = 2) -> Path:
    """16-bit PCM WAV through the standard library."""
    import wave

    import numpy as np

    pcm = (tone(seconds, rate, channels).T * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.ascontiguousarray(pcm).tobytes())
    return path


# container suffix -> (PyAV codec, sample format, rate)
CODECS = {
    "flac": ("flac", "s16", 44100),
    "ogg": ("libopus", "flt", 48000),
    "mp3": ("libmp3lame", "fltp", 44100),
    "m4a": ("aac", "fltp", 44100),
    "webm": ("libopus", "flt", 48000),
    "mp4": ("aac", "fltp", 44100),
}


def write_encoded(path: Path, seconds: float) -> Path:
    """Encode the tone with PyAV's bundled FFmpeg into the container named by path's suffix."""
    import av
    import numpy as np

    codec, fmt, rate = CODECS[path.suffix[1:]]
    samples = tone(seconds, rate, 1)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "mono"
        frame_size = stream.codec_context.frame_size or 1024
        for i in range(0, samples.shape[1], frame_size):
            chunk = samples[:, i : i + frame_size]
            if fmt == "s16":
                chunk = (chunk * 32767).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(chunk), format=fmt, layout="mono"
            )
            frame.sample_rate = rate
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path
