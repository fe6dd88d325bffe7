"""TTS capability: the loaded TTS model (Kokoro or Soprano, tts/__init__.py's SERVED), and
requests run on the shared MLX worker.

A request is prepared (phonemized, or split) in one worker call, so errors surface before any
audio, then synthesized as one worker task whose steps are its text segments (Soprano's pause
between tokens too): other work runs between steps, a client that goes away stops it at the next
one, and a Free or LoadModel (host.py) ends it with ABORTED. The unary TTS collects the segments
and writes the WAV atomically; TTSStream hands each segment's PCM16 on as it is made."""

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxbackend.errors import Aborted, NotLoaded
from mlxbackend.tts import family_module, tts_family
from mlxbackend.tts.wav import check_dst, write_wav
from mlxbackend.worker import Worker


@dataclass
class Spoken:
    """What the unary TTS wrote."""

    dst: str
    sample_rate: int
    samples: int
    segments: int
    voice: str
    lang_code: str

    @property
    def seconds(self) -> float:
        return self.samples / self.sample_rate


def load_tts(path: Path, options: dict):
    """The family's model (worker thread: the config is read here, not on the event loop)."""
    return family_module(tts_family(path)).load_tts(path, options)


class TtsEngine:
    def __init__(self, worker: Worker, why_absent=lambda: ""):
        self.worker = worker
        self.current = None  # a family module's TtsModel
        self.why_absent = why_absent  # () -> why there is no TTS model (the host knows)

    # -- lifecycle (called by the host only) ----------------------------------------------------
    async def load(self, path: Path, options: dict):
        self.current = await self.worker.run(load_tts, Path(path), options)
        return self.current

    async def free(self, reason: str = "the TTS model was freed"):
        if self.current is not None:
            exc = Aborted(f"speech synthesis aborted: {reason}")
            await self.worker.release(self.current, exc, self.forget)

    def forget(self):
        self.current = None

    def model(self):
        tm = self.current
        if tm is None:
            why = self.why_absent()
            raise NotLoaded(why) if why else NotLoaded()
        return tm

    # -- requests ----------------------------------------------------------------------------
    async def prepare(self, text: str, voice: str = "", language: str = ""):
        """Validated request (the family's Speech: phonemized, or split); no audio yet."""
        tm = self.model()
        prepare = family_module(tm.family).prepare
        return await asyncio.wrap_future(
            self.worker.call_owned(tm, prepare, tm, text, voice, language)
        )

    async def chunks(self, speech):
        """PCM16 little-endian bytes, one chunk per segment, as each is synthesized."""
        synthesize = family_module(speech.tm.family).synthesize
        job = self.worker.start_job(lambda cancelled: synthesize(speech, cancelled), speech.tm)
        try:
            async for pcm in job:
                yield pcm.tobytes()
        finally:
            job.cancel()  # client gone or finished: stop before the next segment

    async def synthesize(self, text: str, voice: str, language: str, dst: str) -> Spoken:
        """The whole text as a WAV file at dst (written only once every segment is made)."""
        self.model()
        await asyncio.to_thread(check_dst, dst)
        speech = await self.prepare(text, voice, language)
        async with contextlib.aclosing(self.chunks(speech)) as chunks:  # cancelled: stop now
            parts = [np.frombuffer(b, dtype="<i2") async for b in chunks]
        await asyncio.to_thread(write_wav, dst, parts, speech.sample_rate)
        return Spoken(
            dst,
            speech.sample_rate,
            sum(len(p) for p in parts),
            len(parts),
            speech.voice,
            speech.lang_code,
        )
