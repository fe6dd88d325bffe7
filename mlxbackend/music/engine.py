"""Music capability: the loaded MiniMax Music 3 model, and SoundGeneration requests on the shared
MLX worker.

A request is planned (validated, tokenized) in a thread, generated as one worker task whose steps
are the song's frames and transformer calls (other work runs between them), and written to `dst`
atomically. A client that goes away stops it at the next step; a Free or LoadModel (host.py)
ends it with ABORTED there."""

import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path

from mlxbackend.errors import Aborted, NotLoaded
from mlxbackend.music import SongRequest
from mlxbackend.music.minimax import compose, load_music, plan_song
from mlxbackend.tts.wav import check_dst, pcm16, write_wav
from mlxbackend.worker import Worker


@dataclass
class Composed:
    """What SoundGeneration wrote."""

    dst: str
    sample_rate: int
    samples: int
    channels: int
    seed: int
    steps: int

    @property
    def seconds(self) -> float:
        return self.samples / self.sample_rate


class MusicEngine:
    def __init__(self, worker: Worker, why_absent=lambda: ""):
        self.worker = worker
        self.current = None  # minimax.MusicModel
        self.why_absent = why_absent  # () -> why there is no music model (the host knows)

    # -- lifecycle (called by the host only) ----------------------------------------------------
    async def load(self, path: Path, options: dict):
        self.current = await self.worker.run(load_music, Path(path), options)
        return self.current

    async def free(self, reason: str = "the music model was freed"):
        if self.current is not None:
            exc = Aborted(f"music generation aborted: {reason}")
            await self.worker.release(self.current, exc, self.forget)

    def forget(self):
        self.current = None

    def model(self):
        mm = self.current
        if mm is None:
            why = self.why_absent()
            raise NotLoaded(why) if why else NotLoaded()
        return mm

    # -- requests ----------------------------------------------------------------------------
    async def generate(self, req: SongRequest) -> Composed:
        """One song as a PCM16 stereo WAV at req.dst (written only once it is complete)."""
        mm = self.model()
        await asyncio.to_thread(check_dst, req.dst, "SoundGeneration")
        song = await asyncio.to_thread(plan_song, mm, req)
        samples = await self.worker.run_cancellable(mm, compose, mm, song, progress=log_progress)
        await asyncio.to_thread(write_wav, req.dst, [pcm16(samples)], mm.sample_rate)
        frames, channels = samples.shape
        return Composed(req.dst, mm.sample_rate, frames, channels, song.seed, song.steps)


def log_progress(phase: str, done: int, total: int) -> None:
    """The server's log: each tenth of a phase."""
    if done == total or done % max(1, total // 10) == 0:
        print(f"music: {phase} {done}/{total}", file=sys.stderr, flush=True)
