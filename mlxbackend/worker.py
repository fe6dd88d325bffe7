"""The one thread that runs MLX work, and its one scheduling rule.

THE RULE. Everything the worker runs is a *task*: a function started by `call` (or `add` /
`start_job`, which wrap a stepper or an event generator in one). A task runs on the worker thread
until it returns or calls `pause()`; a pause ends its *step*, and the task resumes in a later turn.
Each turn of the worker:

1. starts, in arrival order, every task that was waiting when the turn began (each runs to its
   first pause or to its end), then
2. resumes every task that was paused before the turn began, once each, in the order they paused.

So calls run in the order they arrived; a long task (a continuous batch, a solo generation, an
image's denoising loop, a transcription's windows, a library loop with a progress hook) lets
everything else through at each of its pauses; and no task ever runs inside another: `pause()`
returns to the worker's loop, it never runs waiting work itself. Tasks are greenlets (one C
stack each, all on this thread), so MLX only ever runs on the worker thread, one task at a time.

A paused task can be ended from the worker thread with `abort_owned(owner, exc)`: `exc` is raised
at its pause point (the host uses this when a model is freed or replaced).

Results cross into asyncio through `loop.call_soon_threadsafe`; the event loop never runs MLX."""

import asyncio
import gc
import queue
import threading
from concurrent.futures import Future

from greenlet import getcurrent, greenlet

DONE = object()


def pause() -> None:
    """End the current step of the running task; it resumes in a later turn. A no-op outside a
    worker task (a function called directly, e.g. by the CLI or a test)."""
    current = getcurrent()
    if isinstance(current, Task.Greenlet):
        current.parent.switch()


class Job:
    """One request's event channel, read with `async for` on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def cancel(self):
        self.cancelled.set()

    def abort(self, exc: BaseException):
        """Event loop: end the reader now with exc; the worker sees `cancelled` at its next step."""
        self.cancelled.set()
        self.events.put_nowait(exc)

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


class Task:
    """One function run as a greenlet on the worker thread; its result goes to `future`."""

    class Greenlet(greenlet):
        """Marks greenlets that are worker tasks (what `pause()` looks for)."""

    def __init__(self, future: Future, fn, args: tuple, kwargs: dict, owner=None):
        self.future, self.fn, self.args, self.kwargs, self.owner = future, fn, args, kwargs, owner
        self.glet = None  # created on the worker thread, whose loop greenlet becomes its parent

    def start(self) -> bool:
        """Run to the first pause or the end; True if paused."""
        if not self.future.set_running_or_notify_cancel():
            return False
        self.glet = Task.Greenlet(self._main)
        self.glet.switch()
        return not self.glet.dead

    def resume(self, exc: BaseException | None = None) -> bool:
        """Run the next step (or raise exc at the pause point); True if paused again."""
        if exc is None:
            self.glet.switch()
        else:
            self.glet.throw(exc)
        return not self.glet.dead

    def _main(self):
        fn, args, kwargs = self.fn, self.args, self.kwargs
        self.fn = self.args = self.kwargs = None  # hold no reference to finished work
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self.future.set_exception(exc)
        else:
            self.future.set_result(result)


class Worker:
    def __init__(self, name: str = "mlx-worker"):
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.paused: list[Task] = []
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    # -- starting work (any thread) ----------------------------------------------------------
    def call(self, fn, *args, **kwargs) -> Future:
        """Run fn as a task on the worker; its result (or exception) goes to the Future."""
        return self.call_owned(None, fn, *args, **kwargs)

    def call_owned(self, owner, fn, *args, **kwargs) -> Future:
        """As `call`, tagged with `owner` (a model) for `abort_owned`."""
        future: Future = Future()
        self.inbox.put(Task(future, fn, args, kwargs, owner))
        return future

    async def run(self, fn, *args, **kwargs):
        return await asyncio.wrap_future(self.call(fn, *args, **kwargs))

    async def run_cancellable(self, owner, fn, *args, **kwargs):
        """fn(*args, is_cancelled=..., **kwargs) as a task owned by `owner` (Free / LoadModel end
        it at a pause). When the awaiting caller is cancelled (its client left, its deadline
        passed) is_cancelled() turns True, and fn stops at its next check."""
        cancelled = threading.Event()
        future = self.call_owned(owner, fn, *args, is_cancelled=cancelled.is_set, **kwargs)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def release(self, owner, exc: BaseException, forget) -> None:
        """Free / LoadModel of a model: end owner's paused tasks with exc, call forget() (drop
        the references), then collect and return MLX's buffer cache, all on the worker."""

        def drop():
            import mlx.core as mx

            self.abort_owned(owner, exc)
            forget()
            gc.collect()
            mx.clear_cache()

        await self.run(drop)

    def add(self, stepper, owner=None) -> Future:
        """Drive a stepper (`step() -> keep going?`, `abort(exc)`) as a task, one step per turn."""
        return self.call_owned(owner, drive, stepper)

    def start_job(self, make_steps, owner=None) -> Job:
        """make_steps(is_cancelled) runs on the worker and returns an iterator of events; each
        event is one step. The returned Job yields the events, then ends."""
        job = Job(asyncio.get_running_loop())
        self.call_owned(owner, forward_events, job, make_steps)
        return job

    # -- worker thread only ------------------------------------------------------------------
    def abort_owned(self, owner, exc: BaseException):
        """Raise exc at the pause point of every paused task of `owner` (they end now)."""
        if threading.current_thread() is not self.thread:
            raise RuntimeError("abort_owned runs on the worker thread (inside a call)")
        mine = [t for t in self.paused if t.owner is owner and owner is not None]
        self.paused = [t for t in self.paused if t not in mine]
        here = getcurrent()
        for task in mine:
            task.glet.parent = here  # it ends (or pauses) back into this call, not the loop
            while task.resume(exc):  # a task that catches exc and pauses again gets it again
                pass

    # -- state (any thread) -------------------------------------------------------------------
    def busy(self) -> bool:
        return bool(self.paused)

    def stop(self):
        self.inbox.put(None)

    # -- the loop ----------------------------------------------------------------------------
    def _loop(self):
        while True:
            try:
                first = self.inbox.get(block=not self.paused)
            except queue.Empty:
                first = False
            arrived = [first] if first is not False else []
            for _ in range(self.inbox.qsize()):  # what waits now; later arrivals: next turn
                try:
                    arrived.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            earlier = list(self.paused)
            if not self._start(arrived):
                self._shutdown(self.paused)
                return
            del arrived  # hold no reference to finished work (models must be freeable)
            self._resume(earlier)
            del earlier

    def _start(self, arrived: list) -> bool:
        """Start each arrived task; False at the stop marker."""
        for task in arrived:
            if task is None:
                return False
            if task.start():
                self.paused.append(task)
        return True

    def _resume(self, earlier: list):
        for task in earlier:
            if task in self.paused and not task.resume():  # (abort_owned may have ended it)
                self.paused.remove(task)

    def _shutdown(self, tasks: list):
        from greenlet import GreenletExit

        for task in tasks:
            try:
                while task.resume(GreenletExit()):
                    pass
            except Exception:  # noqa: BLE001 — shutting down: nothing is listening
                pass
        self.paused = []


def drive(stepper) -> None:
    """Task body: one `step()` per turn until it returns False. An exception raised at the pause
    (abort_owned, shutdown) is passed to `stepper.abort(exc)` and ends the task."""
    try:
        while stepper.step():
            pause()
    except BaseException as exc:
        stepper.abort(exc if isinstance(exc, Exception) else None)  # GreenletExit: shutdown
        raise


def forward_events(job: Job, make_steps) -> None:
    """Task body: put each event of make_steps(is_cancelled) into job, one per turn, then DONE;
    an exception (the generator's, or one raised at the pause) goes to the job instead."""
    try:
        for event in make_steps(job.cancelled.is_set):
            job.put(event)
            pause()
        job.put(DONE)
    except BaseException as exc:  # noqa: BLE001 — the job's reader raises it
        job.put(exc)
