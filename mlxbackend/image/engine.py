"""Image generation requests on the shared MLX worker.

A request is planned (validated, defaults filled, the source image read) off the event loop,
generated as one worker task whose steps are the denoising steps (other work runs between them),
and written to `dst` atomically. A client that goes away stops the run before the next step; a
Free or LoadModel (host.py) ends it with ABORTED at its next step."""

import asyncio
import logging
import sys
from dataclasses import dataclass

from mlxbackend.errors import Aborted, InvalidInput, NotLoaded
from mlxbackend.image.generate import generate, plan_request, write_png
from mlxbackend.image.pipeline import free_pipeline, load_pipeline
from mlxbackend.worker import Worker, pause

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

    # -- lifecycle (called by the host only) ----------------------------------------------------
    async def load(self, path, settings):
        self.current = await self.worker.run(load_pipeline, path, settings)
        return self.current

    async def free(self, reason: str = "the image model was freed"):
        """End generations in flight (ABORTED at their next step), then drop the pipeline."""
        if self.current is None:
            return

        pipe, self.current = self.current, None

        def drop():
            self.worker.abort_owned(pipe, Aborted(f"image generation aborted: {reason}"))
            free_pipeline(pipe)

        await self.worker.run(drop)

    def model(self):
        if self.current is None:
            raise NotLoaded(
                "no image model loaded: call LoadModel with a DiffusionKit (SD3 / FLUX) folder first"
            )
        return self.current

    # -- requests ----------------------------------------------------------------------------
    async def generate(self, req, dst: str) -> Generated:
        """Plan, generate and write one PNG to dst."""

        if not dst:
            raise InvalidInput("GenerateImage needs dst, the path of the PNG to write")
        pipe = self.model()
        plan = await asyncio.to_thread(plan_request, pipe, req)
        times = []

        def on_step(done: int, total: int, seconds: float):
            times.append(seconds)
            print(f"image: step {done}/{total} ({seconds:.2f} s)", file=sys.stderr, flush=True)
            pause()  # one denoising step is one step of the worker task

        image = await self.worker.run_cancellable(pipe, generate, pipe, plan, on_step)
        await asyncio.to_thread(write_png, image, dst)
        per_step = sum(times) / len(times) if times else 0.0
        return Generated(dst, image.width, image.height, len(times), plan.seed, per_step)
