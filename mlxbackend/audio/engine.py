"""Transcription capability: the loaded whisper model, and requests run on the shared MLX worker.

Audio is decoded (PyAV) off the event loop in a plain thread; the whisper run itself is one
task on the MLX worker whose steps are its 30-s windows, so other work runs between windows. Its
segments reach the caller window by window through the request's Job while it runs; a cancelled
request stops at the next window; a Free or LoadModel (host.py) ends it with ABORTED."""

import asyncio
from pathlib import Path

from mlxbackend.audio import diarize as diarize_mod
from mlxbackend.audio.decode import load_audio
from mlxbackend.audio.whisper import (
    Options,
    Progress,
    Segment,
    Transcript,
    is_whisper_dir,
    language_code,
    load_whisper,
    transcribe,
)
from mlxbackend.errors import Aborted, InvalidInput, NotLoaded
from mlxbackend.worker import DONE, Job, Worker


class AudioEngine:
    def __init__(self, worker: Worker):
        self.worker = worker
        self.current = None  # WhisperModel
        self.diarizer = None  # an mlx-audio diarizer beside it (Options diarization_model)

    # -- lifecycle (called by the host only) ----------------------------------------------------
    async def load(self, path: Path, options: dict | None = None, model_path: str = ""):
        """The whisper folder, and the diarizer Options diarization_model names (relative to
        ModelPath, as LocalAI's model paths are)."""
        if not is_whisper_dir(path):
            raise InvalidInput(
                f"{path} is not an MLX whisper folder (config.json with n_mels, n_audio_ctx, …)"
            )
        wm = await self.worker.run(load_whisper, Path(path))
        where = str((options or {}).get(diarize_mod.OPTION, "") or "")
        if where:
            folder = (
                Path(model_path) / where
                if model_path and not Path(where).is_absolute()
                else Path(where)
            )
            self.diarizer = await self.worker.run(diarize_mod.load_diarizer, folder)
        self.current = wm
        return wm

    async def free(self, reason: str = "the whisper model was freed"):
        """End transcriptions in flight (ABORTED at their next window), then drop the model."""
        if self.current is None:
            self.diarizer = None
            return
        exc = Aborted(f"transcription aborted: {reason}")
        await self.worker.release(self.current, exc, self.forget)

    def forget(self):
        import importlib

        self.current = self.diarizer = None
        holder = importlib.import_module("mlx_whisper.transcribe").ModelHolder
        holder.model = holder.model_path = None  # mlx-whisper's own reference

    def model(self):
        if self.current is None:
            raise NotLoaded(
                "no whisper model loaded: call LoadModel with a whisper model folder first"
            )
        return self.current

    # -- requests ----------------------------------------------------------------------------
    async def prepare(self, dst: str, language: str = "", diarize: bool = False, granularities=()):
        """Validate and decode (off the event loop): (model, samples, language code, words?)."""
        wm = self.model()
        if diarize:
            diarize_mod.require(self.diarizer)
        bad = [g for g in granularities if g not in ("segment", "word")]
        if bad:
            raise InvalidInput(
                f"unknown timestamp_granularities {bad}; use 'segment' and/or 'word'"
            )
        code = language_code(language)
        audio = await asyncio.to_thread(load_audio, dst)
        return wm, audio, code, "word" in granularities

    def start(self, wm, audio, opts: Options, diarize: bool = False) -> Job:
        """Run the transcription on the worker; the job yields Segment and Progress events and
        ends with one Transcript. With diarize, the diarizer runs first and every segment carries
        its speaker as it is sent."""

        job = Job(asyncio.get_running_loop())
        diarizer = self.diarizer

        def run():
            try:
                emit = job.put
                if diarize:
                    turns = diarize_mod.speaker_turns(diarizer, audio)

                    def emit(event):
                        if isinstance(event, Segment):
                            event.speaker = diarize_mod.speaker_of(event.start, event.end, turns)
                        job.put(event)

                job.put(transcribe(wm, audio, opts, emit, job.cancelled.is_set))
            except BaseException as exc:
                job.put(exc)
            job.put(DONE)

        self.worker.call_owned(wm, run)
        return job

    async def events(self, dst: str, opts: Options, diarize=False, granularities=()):
        """Segment / Progress events as decoding proceeds, then the Transcript."""
        wm, audio, code, words = await self.prepare(dst, opts.language, diarize, granularities)
        opts.language, opts.words = code, words or opts.words
        job = self.start(wm, audio, opts, diarize)
        try:
            async for event in job:
                yield event
        finally:
            job.cancel()  # client gone or finished: stop at the next window

    async def transcribe(
        self, dst: str, opts: Options, diarize=False, granularities=()
    ) -> Transcript:
        final = None
        async for event in self.events(dst, opts, diarize, granularities):
            if isinstance(event, Transcript):
                final = event
        return final


__all__ = ["AudioEngine", "Options", "Progress", "Segment", "Transcript"]
