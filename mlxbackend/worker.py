"""The one thread that runs MLX work. Calls run in order between steps; steppers (a solo
generation, a continuous batch) are advanced round-robin, one step each per round, so every
request progresses and cancellation is seen within a step.

Results cross into asyncio through `loop.call_soon_threadsafe`; the event loop never runs MLX."""

import asyncio
import queue
import threading
import time
from concurrent.futures import Future

DONE = object()


class Job:
    """One request's event channel, read with `async for` on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def cancel(self):
        self.cancelled.set()

    def put(self, item):
        """Called from the worker: an event, an exception, or DONE."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            self.cancelled.set()

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self.events.get()
        if item is DONE:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item


class GeneratorStepper:
    """Advances one generator per step, forwarding what it yields to its job."""

    def __init__(self, job: Job, steps):
        self.job = job
        self.steps = steps

    def step(self) -> bool:
        try:
            self.job.put(next(self.steps))
            return True
        except StopIteration:
            self.job.put(DONE)
        except BaseException as exc:
            self.job.put(exc)
        return False

    def abort(self):
        self.job.put(DONE)


class Worker:
    def __init__(self, name: str = "mlx-worker"):
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.active: list = []  # steppers: step() -> keep going?, abort()
        self._serving = False
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def call(self, fn, *args, **kwargs) -> Future:
        """Run fn on the worker thread, between steps."""
        future: Future = Future()
        self.inbox.put((future, fn, args, kwargs))
        return future

    async def run(self, fn, *args, **kwargs):
        return await asyncio.wrap_future(self.call(fn, *args, **kwargs))

    def add(self, stepper):
        """Worker thread only: start advancing a stepper."""
        self.active.append(stepper)

    def start_job(self, make_steps) -> Job:
        """make_steps(is_cancelled) runs on the worker and returns an iterator of events."""
        job = Job(asyncio.get_running_loop())

        def attach():
            try:
                self.add(GeneratorStepper(job, iter(make_steps(job.cancelled.is_set))))
            except BaseException as exc:
                job.put(exc)

        self.call(attach)
        return job

    def serve_pending(self, budget: float):
        """Worker thread, from inside a long call (a quantization method that loops in a library):
        run waiting calls and stepper rounds for about `budget` seconds, so other requests keep
        moving. Never nested; a stop request is left for the main loop."""
        if threading.current_thread() is not self.thread or self._serving:
            return
        self._serving = True
        try:
            deadline = time.monotonic() + max(0.05, budget)
            while time.monotonic() < deadline:
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    item = False
                if item is None:  # stop: put it back for the main loop
                    self.inbox.put(None)
                    return
                if item:
                    self._call(*item)
                    del item
                elif self.active:
                    self._round()
                else:
                    return
        finally:
            self._serving = False

    def busy(self) -> bool:
        return bool(self.active)

    def stop(self):
        self.inbox.put(None)

    def _loop(self):
        while True:
            try:
                item = self.inbox.get(block=not self.active)
            except queue.Empty:
                self._round()
                continue
            if item is None:
                for stepper in self.active:
                    stepper.abort()
                self.active.clear()
                return
            self._call(*item)
            del item  # hold no reference to finished work (models must be freeable)

    @staticmethod
    def _call(future, fn, args, kwargs):
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)

    def _round(self):
        """One step for every active stepper; finished ones are dropped."""
        self.active = [s for s in list(self.active) if s.step()]
