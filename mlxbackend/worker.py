"""The one thread that runs MLX work. Calls run in order; step-wise jobs are advanced
round-robin one step at a time, so several requests progress and cancellation is prompt.

Results cross into asyncio through `loop.call_soon_threadsafe`; the event loop never runs MLX."""

import asyncio
import queue
import threading
from concurrent.futures import Future

_DONE = object()


class Job:
    """A generator advanced by the worker; its events are read with `async for`."""

    def __init__(self, make_steps, loop: asyncio.AbstractEventLoop):
        self.make_steps = make_steps
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.steps = None

    def cancel(self):
        self.cancelled.set()

    def _put(self, item):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            self.cancelled.set()

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self.events.get()
        if item is _DONE:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item


class Worker:
    def __init__(self, name: str = "mlx-worker"):
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.active: list[Job] = []
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def call(self, fn, *args, **kwargs) -> Future:
        """Run fn on the worker thread, between job steps."""
        future: Future = Future()
        self.inbox.put((future, fn, args, kwargs))
        return future

    async def run(self, fn, *args, **kwargs):
        return await asyncio.wrap_future(self.call(fn, *args, **kwargs))

    def start_job(self, make_steps) -> Job:
        """make_steps(is_cancelled) is called on the worker and must return an iterator."""
        job = Job(make_steps, asyncio.get_running_loop())
        self.inbox.put(job)
        return job

    def busy(self) -> bool:
        return bool(self.active)

    def stop(self):
        for job in list(self.active):
            job.cancel()
        self.inbox.put(None)

    def _loop(self):
        while True:
            try:
                item = self.inbox.get(block=not self.active, timeout=None)
            except queue.Empty:
                item = _DONE
            if item is None:
                for job in self.active:
                    job._put(_DONE)
                return
            if item is not _DONE:
                self._take(item)
                del item  # hold no reference to finished work (models must be freeable)
                continue  # drain the inbox before the next round of steps
            self._round()

    def _round(self):
        """One decode step for every active job."""
        for job in list(self.active):
            self._advance(job)

    def _take(self, item):
        if isinstance(item, Job):
            try:
                item.steps = iter(item.make_steps(item.cancelled.is_set))
                self.active.append(item)
            except BaseException as exc:
                item._put(exc)
            return
        future, fn, args, kwargs = item
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)

    def _advance(self, job: Job):
        try:
            job._put(next(job.steps))
        except StopIteration:
            self.active.remove(job)
            job._put(_DONE)
        except BaseException as exc:
            self.active.remove(job)
            job._put(exc)
