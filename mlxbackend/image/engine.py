"""Image generation requests on the shared MLX worker.

A request is planned (validated, defaults filled, the source image read) off the event loop,
generated on the worker — which serves other waiting work between denoising steps — and
written to `dst` atomically. A client that goes away stops the run before the next step."""

import asyncio
import logging
import sys
import threading
from dataclasses import dataclass

from mlxbackend.errors import InvalidInput, NotLoaded
from mlxbackend.worker import Worker

log = logging.getLogger("mlxbackend.image")


@dataclass
class Generated:
    """What was written: the file and the settings actually used."""

    dst: str
    width: int
    height: int
    steps: int
    seed: int
    seconds_per_step: float


class ImageEngine:
    def __init__(self, worker: Worker):
        self.worker = worker
        self.current = None  # pipeline.Pipeline

    # -- lifecycle ---------------------------------------------------------------------------
    async def load(self, path, settings):
        from mlxbackend.image.pipeline import load_pipeline

        await self.free()
        self.current = await self.worker.run(load_pipeline, path, settings)
        return self.current

    async def free(self):
        if self.current is None:
            return
        from mlxbackend.image.pipeline import free_pipeline

        pipe, self.current = self.current, None
        await self.worker.run(free_pipeline, pipe)

    def model(self):
        if self.current is None:
            raise NotLoaded("no image model loaded: call LoadModel with a DiffusionKit (SD3 / FLUX) folder first")
        return self.current

    # -- requests ----------------------------------------------------------------------------
    async def generate(self, req, dst: str) -> Generated:
        """Plan, generate and write one PNG to dst."""
        from mlxbackend.image.generate import generate, plan_request, write_png

        if not dst:
            raise InvalidInput("GenerateImage needs dst, the path of the PNG to write")
        pipe = self.model()
        plan = await asyncio.to_thread(plan_request, pipe, req)
        cancelled = threading.Event()
        times = []

        def on_step(done: int, total: int, seconds: float):
            times.append(seconds)
            print(f"image: step {done}/{total} ({seconds:.2f} s)", file=sys.stderr, flush=True)
            self.worker.serve_pending(0.0)  # other requests move between denoising steps

        future = self.worker.call(generate, pipe, plan, on_step, cancelled.is_set)
        try:
            image = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            cancelled.set()  # the worker stops before the next step
            raise
        await asyncio.to_thread(write_png, image, dst)
        per_step = sum(times) / len(times) if times else 0.0
        return Generated(dst, image.width, image.height, len(times), plan.seed, per_step)
