"""Fault injection: `Free` and `LoadModel` (of another model) arriving during each kind of long
work, against real server processes: a batch of generations, an image generation, a
transcription, an embedding batch, a fine-tune, a data-aware quantization and a distributed
generation.

Each in-flight call must end within a bound with CANCELLED, ABORTED, UNAVAILABLE or
FAILED_PRECONDITION and a message (never INTERNAL, never a hang); Health stays OK, Status shows
no BUSY left over, the next request works, no half-written output; jobs end `stopped` (Free;
a fine-tune with a resumable checkpoint, a quantization without output) or keep running
(LoadModel leaves jobs running, host.py's rule). A summary line (kind × fault → outcome) is
written to the terminal at the end of the module."""

import contextlib
import json
import threading
import time
from pathlib import Path

import grpc
import pytest

from mlxbackend.proto import backend_pb2 as pb
from tests import tiny_model as tm
from tests.conftest import Server

ALLOWED = {
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.FAILED_PRECONDITION,
}
BOUND_S = 30  # an in-flight call ends at most this long after the fault was sent
TERMINAL = ("completed", "failed", "stopped")
FAULTS = ["free", "load"]
OUTCOMES: list = []  # (kind, fault, outcome) for the summary line


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    """The summary line, written to the terminal even when output is captured (make test)."""
    yield
    from collections import Counter

    counts = Counter((k, f, o) for k, f, o in OUTCOMES)
    parts = [
        f"{k}×{f}→{o}" + (f" ({n})" if n > 1 else "") for (k, f, o), n in sorted(counts.items())
    ]
    line = f"fault injection: {len(OUTCOMES)} in-flight calls/jobs hit by a fault: " + ", ".join(
        parts
    )
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print("\n" + line, flush=True)


# -- helpers ---------------------------------------------------------------------------------
class InFlight:
    """One RPC run on a thread: a unary call, or a stream read to its end. Records its outcome."""

    def __init__(self, fn, stream=False):
        self.items, self.error, self.result = [], None, None
        self.first = threading.Event()
        self.done = threading.Event()

        def run():
            try:
                if stream:
                    for item in fn():
                        self.items.append(item)
                        self.first.set()
                else:
                    self.result = fn()
            except grpc.RpcError as exc:
                self.error = exc
            finally:
                self.first.set()
                self.done.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def wait_items(self, n: int, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while len(self.items) < n and not self.done.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.items) >= n, (len(self.items), self.error)

    def ended(self, since: float) -> str:
        """Wait for the end (bounded); assert a defined status; return the outcome name."""
        assert self.done.wait(BOUND_S), f"hang: the call did not end {BOUND_S} s after the fault"
        took = time.monotonic() - since
        assert took < BOUND_S
        if self.error is None:
            return "ok"  # finished before the fault reached it (allowed; the caller may require an error)
        code, details = self.error.code(), self.error.details()
        assert code in ALLOWED, (code, details)
        assert details and details.strip(), code
        return code.name


def wait_busy(srv, call: InFlight, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert not call.done.is_set(), f"the call ended before the fault: {call.error}"
        if srv.stub.Status(pb.HealthMessage(), timeout=10).state == pb.StatusResponse.BUSY:
            return
        time.sleep(0.05)
    raise AssertionError("the work never showed BUSY")


def settled(srv, timeout: float = 20):
    """Health OK and Status without a leftover BUSY (the work ended)."""
    assert srv.healthy()
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = srv.stub.Status(pb.HealthMessage(), timeout=10).state
        if state != pb.StatusResponse.BUSY:
            return state
        time.sleep(0.1)
    raise AssertionError(f"Status still BUSY {timeout} s after the work ended: {state}")


def load(srv, path: Path, timeout=180, **kw):
    reply = srv.stub.LoadModel(
        pb.ModelOptions(Model=path.name, ModelPath=str(path.parent), **kw), timeout=timeout
    )
    assert reply.success, reply.message
    return reply


def inject(srv, fault: str, other: Path, **kw) -> float:
    """Send the fault; return when it was sent. `other` is the model LoadModel loads."""
    t0 = time.monotonic()
    if fault == "free":
        assert srv.stub.Free(pb.HealthMessage(), timeout=BOUND_S).success
    else:
        load(srv, other, timeout=BOUND_S + 60, **kw)
    return t0


def predict_works(srv, tokens=8):
    reply = srv.stub.Predict(
        pb.PredictOptions(Prompt=tm.COMPLETION_PROMPT, Tokens=tokens), timeout=60
    )
    assert reply.tokens > 0 and reply.message


def long_predict():
    return pb.PredictOptions(Prompt=tm.COMPLETION_PROMPT, Tokens=4000, IgnoreEOS=True)


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    """One server for every slot kind and the jobs (cases share it: each leaves it healthy)."""
    s = Server(env={"MLXB_JOBS_DIR": str(tmp_path_factory.mktemp("fault-jobs"))})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    pytest.importorskip("diffusionkit")
    from tests.tiny_diffusion import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("diffusion") / "tiny-sd3")


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    pytest.importorskip("mlx_whisper")
    from tests.tiny_whisper import build_tiny_whisper, write_wav

    root = tmp_path_factory.mktemp("whisper")
    long, short = (
        write_wav(root / "long.wav", 150.0, rate=16000, channels=1),
        write_wav(root / "short.wav", 3.0),
    )
    return build_tiny_whisper(root / "whisper-tiny-random"), long, short


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    from tests.tiny_encoder import build_tiny_bert

    return build_tiny_bert(
        tmp_path_factory.mktemp("enc") / "bert", st=dict(pooling="mean", normalize=True)
    )


# -- slot work: each in-flight call ends with a defined status ---------------------------------
@pytest.mark.parametrize("fault", FAULTS)
def test_generation_batch(srv, trained_dir, tiny_dir, fault):
    """A continuous batch of long generations (streams and a unary call)."""
    load(srv, trained_dir, ContextSize=8192)
    streams = [
        InFlight(lambda: srv.stub.PredictStream(long_predict(), timeout=300), stream=True)
        for _ in range(3)
    ]
    unary = InFlight(lambda: srv.stub.Predict(long_predict(), timeout=300))
    for s in streams:
        s.wait_items(5)
    wait_busy(srv, unary)
    t0 = inject(srv, fault, tiny_dir, ContextSize=2048)
    for call in [*streams, unary]:
        outcome = call.ended(t0)
        assert outcome != "ok", "a 4000-token generation finished before the fault"
        OUTCOMES.append(("generation", fault, outcome))
    settled(srv)
    if fault == "free":
        load(srv, trained_dir, ContextSize=8192)
    predict_works(srv)


@pytest.mark.parametrize("fault", FAULTS)
def test_image_generation(srv, sd3_dir, trained_dir, tmp_path, fault):
    """A long denoising loop: no PNG at dst after the abort, nothing left in its folder."""
    load(srv, sd3_dir, CFGScale=5.0)
    dst = tmp_path / "out.png"
    dst.write_bytes(b"")  # LocalAI pre-creates the file
    call = InFlight(
        lambda: srv.stub.GenerateImage(
            pb.GenerateImageRequest(
                dst=str(dst), positive_prompt="a red cube", width=64, height=64, step=1000, seed=1
            ),
            timeout=600,
        )
    )
    wait_busy(srv, call)
    time.sleep(0.5)  # a few denoising steps in
    t0 = inject(srv, fault, trained_dir, ContextSize=2048)
    outcome = call.ended(t0)
    assert outcome != "ok", "1000 denoising steps finished before the fault"
    OUTCOMES.append(("image", fault, outcome))
    assert dst.stat().st_size == 0, "a PNG was written by an aborted generation"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"], list(tmp_path.iterdir())
    settled(srv)
    if fault == "free":
        load(srv, sd3_dir, CFGScale=5.0)
        after = tmp_path / "after.png"
        after.write_bytes(b"")
        reply = srv.stub.GenerateImage(
            pb.GenerateImageRequest(
                dst=str(after), positive_prompt="a red cube", width=64, height=64, step=2, seed=1
            ),
            timeout=120,
        )
        assert reply.success and after.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        predict_works(srv)


@pytest.mark.parametrize("fault", FAULTS)
def test_transcription(srv, whisper, trained_dir, fault):
    """Long audio (five 30-s windows), streamed and unary."""
    model, audio, short = whisper
    load(srv, model)
    stream = InFlight(
        lambda: srv.stub.AudioTranscriptionStream(
            pb.TranscriptRequest(dst=str(audio), language="en", stream=True), timeout=300
        ),
        stream=True,
    )
    unary = InFlight(
        lambda: srv.stub.AudioTranscription(
            pb.TranscriptRequest(dst=str(audio), language="en"), timeout=300
        )
    )
    stream.wait_items(1)
    t0 = inject(srv, fault, trained_dir, ContextSize=2048)
    for call in (stream, unary):
        outcome = call.ended(t0)
        assert outcome != "ok", "150 s of audio were transcribed before the fault"
        OUTCOMES.append(("transcription", fault, outcome))
    assert not any(i.HasField("final_result") for i in stream.items)
    settled(srv)
    if fault == "free":
        load(srv, model)
        done = srv.stub.AudioTranscription(
            pb.TranscriptRequest(dst=str(short), language="en"), timeout=120
        )
        assert abs(done.duration - 3.0) < 0.1
    else:
        predict_works(srv)


@pytest.mark.parametrize("fault", FAULTS)
def test_embedding_batch(srv, encoder_dir, trained_dir, fault):
    """Many concurrent Embedding requests batched by the engine: each ends with a vector or a
    defined status; none hangs."""
    load(srv, encoder_dir)
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 50)
    calls = [
        InFlight(
            lambda i=i: srv.stub.Embedding(pb.PredictOptions(Embeddings=f"{i} {text}"), timeout=120)
        )
        for i in range(48)
    ]
    while not any(
        c.done.is_set() for c in calls
    ):  # the first batch answered: later ones are in flight
        time.sleep(0.005)
    t0 = inject(srv, fault, trained_dir, ContextSize=2048)
    outcomes = [c.ended(t0) for c in calls]
    for c, o in zip(calls, outcomes, strict=True):
        if o == "ok":
            assert len(c.result.embeddings) > 0
        OUTCOMES.append(("embedding", fault, o))
    settled(srv)
    if fault == "free":
        load(srv, encoder_dir)
        assert (
            len(srv.stub.Embedding(pb.PredictOptions(Embeddings="hello"), timeout=60).embeddings)
            > 0
        )
    else:
        predict_works(srv)


# -- jobs: Free stops them (fine-tune: a resumable checkpoint), LoadModel leaves them running ----
def ft_request(model, data, out, **kw) -> pb.FineTuneRequest:
    fields = dict(
        model=str(model),
        dataset_source=str(data),
        output_dir=str(out),
        learning_rate=2e-3,
        max_steps=100000,
        save_steps=100000,
        batch_size=4,
        adapter_rank=8,
        adapter_alpha=16,
    )
    fields.update(kw)
    return pb.FineTuneRequest(**fields)


def ft_follow(srv, job_id, until=None, timeout=240) -> list:
    updates = []
    for u in srv.stub.FineTuneProgress(pb.FineTuneProgressRequest(job_id=job_id), timeout=timeout):
        updates.append(u)
        if until is not None and until(u):
            break
    return updates


@pytest.fixture(scope="module")
def ft_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ftdata")
    (folder / "train.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "prompt": f"Tell me the secret {i % 4}.",
                    "completion": "The secret word is banana.",
                }
            )
            + "\n"
            for i in range(16)
        )
    )
    return folder


@pytest.mark.parametrize("fault", FAULTS)
def test_fine_tune(srv, tiny_dir, trained_dir, ft_data, tmp_path, fault):
    load(srv, trained_dir, ContextSize=2048)  # a served model too: the job loads its own
    out = tmp_path / "out"
    job = srv.stub.StartFineTune(ft_request(tiny_dir, ft_data, out, job_id=f"fault-ft-{fault}"))
    assert job.success, job.message
    seen = ft_follow(
        srv,
        job.job_id,
        until=lambda u: (u.status == "training" and u.current_step >= 3) or u.status in TERMINAL,
    )
    assert seen[-1].status == "training", seen[-1]
    t0 = inject(srv, fault, tiny_dir, ContextSize=2048)
    if fault == "load":  # the job keeps training through the LoadModel; then a plain stop
        step = seen[-1].current_step
        more = ft_follow(
            srv, job.job_id, until=lambda u: u.current_step >= step + 3 or u.status in TERMINAL
        )
        assert more[-1].status == "training", more[-1]
        OUTCOMES.append(("fine-tune", fault, "kept running"))
        predict_works(srv)
        t0 = time.monotonic()
        assert srv.stub.StopFineTune(
            pb.FineTuneStopRequest(job_id=job.job_id, save_checkpoint=True)
        ).success
    rest = ft_follow(srv, job.job_id, timeout=BOUND_S)
    assert time.monotonic() - t0 < BOUND_S
    final = rest[-1]
    assert final.status == "stopped", final.message
    if fault == "free":
        OUTCOMES.append(("fine-tune", fault, "stopped"))
    assert json.loads((out / "job.json").read_text())["snapshot"]["status"] == "stopped"
    ckpts = srv.stub.ListCheckpoints(pb.ListCheckpointsRequest(output_dir=str(out))).checkpoints
    assert ckpts and final.checkpoint_path in [c.path for c in ckpts], (
        final.checkpoint_path,
        ckpts,
    )
    last = max(c.step for c in ckpts)
    assert last >= 3
    settled(srv)
    # resuming from the checkpoint starts (and goes past its step)
    again = srv.stub.StartFineTune(
        ft_request(
            tiny_dir,
            ft_data,
            out,
            job_id=f"fault-ft-{fault}-resume",
            resume_from_checkpoint=final.checkpoint_path,
        )
    )
    assert again.success, again.message
    on = ft_follow(
        srv,
        again.job_id,
        until=lambda u: (u.status == "training" and u.current_step > last) or u.status in TERMINAL,
    )
    assert on[-1].status == "training" and on[-1].current_step > last, on[-1]
    assert srv.stub.StopFineTune(pb.FineTuneStopRequest(job_id=again.job_id)).success
    assert ft_follow(srv, again.job_id, timeout=BOUND_S)[-1].status == "stopped"
    if fault == "free":
        load(srv, trained_dir, ContextSize=2048)
    predict_works(srv)


def q_follow(srv, job_id, until=None, timeout=240) -> list:
    updates = []
    for u in srv.stub.QuantizationProgress(
        pb.QuantizationProgressRequest(job_id=job_id), timeout=timeout
    ):
        updates.append(u)
        if until is not None and until(u):
            break
    return updates


@pytest.mark.parametrize(
    "fault,method,samples", [("free", "mlx-gptq", "400"), ("load", "mlx-awq", "96")]
)
def test_quantization(srv, trained_dir, tiny_dir, tmp_path, fault, method, samples):
    """A data-aware quantization inside the library's loop (per-block progress)."""
    text = tmp_path / "calib.txt"
    text.write_text(tm.CORPUS * 40)
    out = tmp_path / "q"
    load(srv, trained_dir, ContextSize=2048)
    job_id = f"fault-q-{fault}"
    reply = srv.stub.StartQuantization(
        pb.QuantizationRequest(
            model=str(trained_dir),
            quantization_type=method,
            output_dir=str(out),
            job_id=job_id,
            extra_options={
                "calibration_text": str(text),
                "group_size": "32",
                "calibration_samples": samples,
                "calibration_seq_len": "64",
            },
        )
    )
    assert reply.success, reply.message
    seen = q_follow(
        srv,
        job_id,
        until=lambda u: (
            (u.status == "quantizing" and u.progress_percent > 50)  # the library loop
            or u.status in TERMINAL
        ),
    )
    assert seen[-1].status == "quantizing", seen[-1]
    print(f"quantization {fault}: fault at {seen[-1].progress_percent:.1f}%: {seen[-1].message}")
    t0 = inject(srv, fault, tiny_dir, ContextSize=2048)
    if fault == "load":
        before = seen[-1].progress_percent
        more = q_follow(
            srv, job_id, until=lambda u: u.progress_percent > before or u.status in TERMINAL
        )
        assert more[-1].status in ("quantizing", "completed"), more[-1]
        print(
            f"quantization {fault}: then {more[-1].status} {more[-1].progress_percent:.1f}%: {more[-1].message}"
        )
        OUTCOMES.append(("quantization", fault, "kept running"))
        predict_works(srv)
        t0 = time.monotonic()
        assert srv.stub.StopQuantization(pb.QuantizationStopRequest(job_id=job_id)).success
    rest = q_follow(srv, job_id, timeout=BOUND_S)
    assert time.monotonic() - t0 < BOUND_S
    final = rest[-1]
    if fault == "free":
        assert final.status == "stopped", final.message
        OUTCOMES.append(("quantization", fault, "stopped"))
    assert final.status in ("stopped", "completed"), final.message
    assert json.loads((out / "job.json").read_text())["snapshot"]["status"] == final.status
    if final.status == "stopped":
        assert sorted(p.name for p in out.iterdir()) == ["job.json"]  # no partial output
    settled(srv)
    if fault == "free":
        load(srv, trained_dir, ContextSize=2048)
    predict_works(srv)


# -- a distributed generation: calls fail UNAVAILABLE (or ABORTED) ------------------------------
@pytest.fixture(scope="module")
def group(tmp_path_factory):
    from tests.test_distributed import Worker, write_hostfile

    hostfile = write_hostfile(tmp_path_factory.mktemp("dist"))
    worker = Worker(hostfile)
    s = Server()
    yield {"srv": s, "worker": worker, "hostfile": hostfile}
    s.stop()
    worker.stop()


@pytest.mark.parametrize("fault", FAULTS)
def test_distributed_generation(group, trained_dir, tiny_dir, fault):
    s, hostfile = group["srv"], group["hostfile"]
    load(s, trained_dir, ContextSize=8192, Options=[f"hostfile:{hostfile}"])
    streams = [
        InFlight(lambda: s.stub.PredictStream(long_predict(), timeout=300), stream=True)
        for _ in range(2)
    ]
    for st in streams:
        st.wait_items(10)
    t0 = inject(s, fault, tiny_dir, ContextSize=2048)
    for st in streams:
        outcome = st.ended(t0)
        assert outcome != "ok", "a 4000-token distributed generation finished before the fault"
        OUTCOMES.append(("distributed", fault, outcome))
    settled(s)
    if fault == "free":
        assert (
            s.stub.Status(pb.HealthMessage(), timeout=10).state == pb.StatusResponse.UNINITIALIZED
        )
        # the group rebuilds and serves again (the worker rejoins by itself)
        load(s, trained_dir, ContextSize=8192, Options=[f"hostfile:{hostfile}"])
    predict_works(s)  # the rebuilt group, or the single-process model that replaced it
