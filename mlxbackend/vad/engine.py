"""VAD capability: the loaded Silero model, and requests run on the shared MLX worker."""

import asyncio
from pathlib import Path

from mlxbackend.errors import Aborted, NotLoaded
from mlxbackend.worker import Worker


class VadEngine:
    def __init__(self, worker: Worker, why_absent=lambda: ""):
        self.worker = worker
        self.current = None  # vad.silero.VadModel
        self.why_absent = why_absent  # () -> why there is no VAD model (the host knows)

    # -- lifecycle (called by the host only) ----------------------------------------------------
    async def load(self, path: Path, options: dict):
        from mlxbackend.vad.silero import load_vad

        self.current = await self.worker.run(load_vad, Path(path), options)
        return self.current

    async def free(self, reason: str = "the VAD model was freed"):
        if self.current is not None:
            await self.worker.release(self.current, Aborted(f"VAD aborted: {reason}"), self.forget)

    def forget(self):
        self.current = None

    # -- requests ----------------------------------------------------------------------------
    async def detect(self, samples) -> list:
        """Speech segments, (start, end) in seconds, of float32 samples at 16 kHz."""
        from mlxbackend.vad.silero import check_audio, speech_segments

        vm = self.current
        if vm is None:
            why = self.why_absent()
            raise NotLoaded(why) if why else NotLoaded()
        audio = await asyncio.to_thread(check_audio, samples)
        return await asyncio.wrap_future(self.worker.call_owned(vm, speech_segments, vm, audio))
