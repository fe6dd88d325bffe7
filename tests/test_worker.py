"""worker.py's one scheduling rule, tested in process (no MLX needed)."""

import asyncio
import threading
import traceback

import pytest

from mlxbackend.errors import Aborted
from mlxbackend.worker import Worker, pause


class Recorder:
    """Logs what runs on the worker, and fails if a task starts while another is mid-step."""

    def __init__(self):
        self.log: list = []
        self.running = 0
        self.nested = False

    def enter(self, what: str):
        if self.running:
            self.nested = True
        self.running += 1
        self.log.append(what)

    def leave(self):
        self.running -= 1

    def call(self, name: str):
        self.enter(name)
        self.leave()
        return name

    def stepper(self, name: str, steps: int, started: threading.Event | None = None):
        for i in range(steps):
            self.enter(f"{name}{i}")
            if started is not None:
                started.set()
            self.leave()
            pause()
        return name


def test_calls_run_in_arrival_order():
    w, rec = Worker(), Recorder()
    futures = [w.call(rec.call, f"c{i}") for i in range(50)]
    assert [f.result(5) for f in futures] == [f"c{i}" for i in range(50)]
    assert rec.log == [f"c{i}" for i in range(50)] and not rec.nested
    w.stop()


def test_calls_run_between_steps_never_inside_one():
    w, rec = Worker(), Recorder()
    gate = threading.Event()
    hold = w.call(gate.wait)  # queue the next items behind this one, so they arrive together
    a = w.call(rec.stepper, "a", 3)
    b = w.call(rec.stepper, "b", 3)
    gate.set()
    hold.result(5)
    a.result(5), b.result(5)
    # turn 1 starts a and b (each runs its first step); later turns resume each once
    assert rec.log == ["a0", "b0", "a1", "b1", "a2", "b2"], rec.log
    done = threading.Event()

    def until_done():
        n = 0
        while not done.is_set():
            rec.enter(f"s{n}")
            rec.leave()
            n += 1
            pause()
        return n

    long = w.call(until_done)
    calls = [w.call(rec.call, f"c{i}") for i in range(5)]
    w.call(done.set)
    for f in calls:
        f.result(5)
    steps = long.result(
        10
    )  # the long task only ends after the last call ran: they ran between its steps
    assert steps >= 1
    assert [x for x in rec.log if x.startswith("c")] == [
        f"c{i}" for i in range(5)
    ]  # in arrival order
    assert not rec.nested
    w.stop()


def test_pause_outside_a_task_is_a_no_op():
    pause()  # e.g. a capability function called directly by the CLI


def test_abort_owned_raises_at_the_pause_point():
    w = Worker()
    owner, other = object(), object()
    cleaned = []

    def endless(tag):
        try:
            while True:
                pause()
        finally:
            cleaned.append(tag)

    started = [w.call_owned(owner, endless, "mine"), w.call_owned(other, endless, "other")]
    w.call(lambda: None).result(5)
    assert w.busy()
    w.call(w.abort_owned, owner, Aborted("model freed")).result(5)
    with pytest.raises(Aborted, match="model freed"):
        started[0].result(5)
    assert cleaned == ["mine"] and not started[1].done()
    with pytest.raises(RuntimeError, match="worker thread"):
        w.abort_owned(other, Aborted("x"))  # only from inside a task
    w.stop()
    w.thread.join(5)
    assert cleaned == ["mine", "other"]  # shutdown ends paused tasks too


def test_stepper_and_job_tasks():
    async def main():
        w = Worker()

        def events(is_cancelled):
            yield from range(3)

        got = [e async for e in w.start_job(events)]
        assert got == [0, 1, 2]

        def failing(is_cancelled):
            yield "first"
            raise ValueError("boom")

        job = w.start_job(failing)
        assert await job.__anext__() == "first"
        with pytest.raises(ValueError, match="boom"):
            await job.__anext__()

        class Stepper:
            def __init__(self):
                self.n, self.aborted = 0, None

            def step(self):
                self.n += 1
                return self.n < 4

            def abort(self, exc=None):
                self.aborted = exc

        s = Stepper()
        await asyncio.wrap_future(w.add(s))
        assert s.n == 4 and s.aborted is None

        owner, t = object(), Stepper()
        t.step = lambda: True  # never ends by itself
        w.add(t, owner=owner)
        await w.run(lambda: None)
        await w.run(w.abort_owned, owner, Aborted("freed"))
        assert isinstance(t.aborted, Aborted)
        w.stop()

    asyncio.run(main())


def test_a_free_during_an_image_runs_between_steps_not_inside_one(tmp_path):
    """The issue's example: Free while an image generates must not run free_pipeline inside the
    step callback. Here free_pipeline records the Python stack it runs on."""
    pytest.importorskip("diffusionkit")
    from mlxbackend.image import engine as image_engine
    from mlxbackend.image import pipeline
    from mlxbackend.image.generate import ImageRequest
    from tests.tiny_diffusion import build_tiny_sd3

    folder = build_tiny_sd3(tmp_path / "sd3")
    stacks = []
    real_free = image_engine.free_pipeline

    def recording_free(pipe):
        stacks.append([f.name for f in traceback.extract_stack()])
        return real_free(pipe)

    async def main():
        eng = image_engine.ImageEngine(Worker())
        await eng.load(folder, pipeline.LoadSettings())
        steps = []

        def note_step(*_):
            steps.append(1)

        task = asyncio.ensure_future(
            eng.generate(
                ImageRequest(prompt="a cat", width=64, height=64, steps=40),
                str(tmp_path / "out.png"),
            )
        )
        while len(eng.worker.paused) == 0:
            await asyncio.sleep(0.01)
        image_engine.free_pipeline = recording_free
        try:
            await eng.free("the model was freed (Free)")
        finally:
            image_engine.free_pipeline = real_free
        with pytest.raises(Aborted, match="freed"):
            await task
        assert not (tmp_path / "out.png").exists()
        eng.worker.stop()

    asyncio.run(main())
    assert len(stacks) == 1
    assert not {"sample", "euler_step", "on_step", "generate"} & set(stacks[0]), stacks[0]
