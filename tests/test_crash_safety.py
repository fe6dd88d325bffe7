"""kill -9 in the middle of each kind of publish (fine-tune checkpoint + job.json, export,
quantization output, PNG, vector store, prompt cache): the next process loads the last complete
state, and nothing torn appears under a final name.

Deterministic: the backend that dies is started with MLXB_TEST_KILL_DURING_PUBLISH=<point>:<path
substring> (read only by mlxbackend/publish.py), which SIGKILLs it at that point of publishing
that path: `write` = the temp file (or the staging folder's largest file) holds half its data,
`swap` = the new folder has just been exchanged into place, the old one not yet removed."""

import errno
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import mlx.core as mx
import numpy as np
import pytest

from mlxbackend import publish
from mlxbackend.errors import NoSpace
from mlxbackend.proto import backend_pb2 as pb
from tests import publish_checks as checks
from tests.conftest import ROOT, Server
from tests.publish_checks import chat, digest, litter, write_dataset

KILL_ENV = "MLXB_TEST_KILL_DURING_PUBLISH"
TERMINAL = ("completed", "failed", "stopped")


def killed(srv: Server, call=None, timeout: float = 180):
    """Run `call` (which the kill interrupts), then check the server died of SIGKILL."""
    if call is not None:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.CANCELLED,
            grpc.StatusCode.UNKNOWN,
        ), e.value
    assert srv.proc.wait(timeout) == -signal.SIGKILL, srv.output()[-3000:]
    srv.stop()


def doomed(point: str, needle: str) -> Server:
    return Server(env={KILL_ENV: f"{point}:{needle}", "MLXB_JOBS_DIR": "/tmp/mlxb-test-crash-jobs"})


@pytest.fixture(scope="module")
def srv():
    """The survivor: prepares the previous state and loads what is left after each kill."""
    server = Server(env={"MLXB_JOBS_DIR": "/tmp/mlxb-test-crash-jobs"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"))


def finetune_request(model, data, out, job_id, **kw) -> pb.FineTuneRequest:
    return checks.finetune_request(
        model, data, out, job_id, **{"max_steps": 6, "save_steps": 2, **kw}
    )


def last_update(srv, job_id) -> pb.FineTuneProgressUpdate:
    updates = list(
        srv.stub.FineTuneProgress(pb.FineTuneProgressRequest(job_id=job_id), timeout=300)
    )
    return updates[-1]


def test_checkpoint_and_job_json(srv, tiny_dir, dataset, tmp_path):
    """Killed half-way through writing checkpoint-4: the next process lists checkpoint-2 only,
    job.json parses, and the job resumes from checkpoint-2 to the end."""
    out = tmp_path / "ft"
    doomed_srv = doomed("write", "checkpoint-4")
    reply = doomed_srv.stub.StartFineTune(finetune_request(tiny_dir, dataset, out, "crash-ckpt"))
    assert reply.success, reply.message
    killed(doomed_srv)
    assert [
        p for p in out.iterdir() if p.name.startswith(".checkpoint-4.tmp-")
    ]  # the torn staging folder
    listed = srv.stub.ListCheckpoints(pb.ListCheckpointsRequest(output_dir=str(out))).checkpoints
    assert [c.step for c in listed] == [2]
    assert mx.load(str(out / "checkpoint-2" / "adapters.safetensors"))
    assert mx.load(str(out / "checkpoint-2" / "optimizer.safetensors"))
    assert not litter(out)  # listing recovered: a dead writer's staging folder is removed
    state = json.loads((out / "job.json").read_text())
    assert state["snapshot"]["job_id"] == "crash-ckpt"
    resumed = srv.stub.StartFineTune(
        finetune_request(
            tiny_dir, dataset, out, "crash-ckpt-resume", resume_from_checkpoint="latest"
        )
    )
    assert resumed.success, resumed.message
    last = last_update(srv, "crash-ckpt-resume")
    assert last.status == "completed", last.message
    steps = [
        c.step
        for c in srv.stub.ListCheckpoints(
            pb.ListCheckpointsRequest(output_dir=str(out))
        ).checkpoints
    ]
    assert steps == [2, 4, 6]


@pytest.fixture(scope="module")
def adapter(srv, tiny_dir, dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ft") / "out"
    assert srv.stub.StartFineTune(
        finetune_request(tiny_dir, dataset, out, "crash-adapter", max_steps=2)
    ).success
    assert last_update(srv, "crash-adapter").status == "completed"
    return out


def test_export_replacing_a_folder(srv, adapter, tiny_dir, tmp_path):
    """Killed right after the new export is swapped in over the old one: the final name holds a
    complete export that loads; a next export cleans up the old one's leftovers."""
    dst = tmp_path / "crash-export"
    request = pb.ExportModelRequest(
        checkpoint_path=str(adapter),
        output_path=str(dst),
        export_format="lora",
        extra_options={"overwrite": "true"},
    )
    assert srv.stub.ExportModel(request).success
    before = digest(dst)
    (dst / "marker").write_text("the old export")  # tells the old folder from the new one
    doomed_srv = doomed("swap", "crash-export")
    killed(doomed_srv, lambda: doomed_srv.stub.ExportModel(request, timeout=120))
    assert not (dst / "marker").exists() and digest(dst) == before  # the new one, complete
    assert srv.stub.LoadModel(pb.ModelOptions(Model=str(tiny_dir), LoraAdapter=str(dst))).success
    assert srv.stub.ExportModel(request).success
    assert not litter(tmp_path)


def test_quantization_output(srv, trained_dir, tmp_path):
    """Killed half-way through placing a quantized folder over a previous one: the previous one is
    still there, complete, and loads; job.json parses."""
    out = tmp_path / "q"

    def start(server, job_id):
        return server.stub.StartQuantization(
            pb.QuantizationRequest(
                model=str(trained_dir),
                quantization_type="mlx-q4",
                output_dir=str(out),
                job_id=job_id,
                extra_options={"group_size": "32"},
            )
        )

    assert start(srv, "crash-q1").success
    done = list(
        srv.stub.QuantizationProgress(
            pb.QuantizationProgressRequest(job_id="crash-q1"), timeout=240
        )
    )[-1]
    assert done.status == "completed", done.message
    folder = Path(done.output_file)
    before = digest(folder)
    doomed_srv = doomed("write", folder.name)
    assert start(doomed_srv, "crash-q2").success
    killed(doomed_srv)
    assert digest(folder) == before
    assert json.loads((out / "job.json").read_text())["snapshot"]["job_id"] in (
        "crash-q1",
        "crash-q2",
    )
    assert srv.stub.LoadModel(pb.ModelOptions(Model=str(folder))).success
    assert srv.stub.Predict(pb.PredictOptions(Prompt="Hello", Tokens=4)).message is not None


def test_png(tmp_path):
    """Killed half-way through writing a PNG over a previous one: the previous one is intact."""
    pytest.importorskip(
        "diffusionkit", reason="DiffusionKit is installed by `make install` (--no-deps)"
    )
    from PIL import Image

    from tests.tiny_diffusion import build_tiny_sd3

    sd3 = build_tiny_sd3(tmp_path / "tiny-sd3")
    dst = tmp_path / "crash.png"
    previous = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(previous, format="PNG")
    dst.write_bytes(previous.getvalue())
    doomed_srv = doomed("write", "crash.png")
    assert doomed_srv.stub.LoadModel(
        pb.ModelOptions(Model=sd3.name, ModelPath=str(sd3.parent))
    ).success
    request = pb.GenerateImageRequest(
        dst=str(dst), positive_prompt="a red cube", width=64, height=64, step=2, seed=1
    )
    killed(doomed_srv, lambda: doomed_srv.stub.GenerateImage(request, timeout=300))
    assert dst.read_bytes() == previous.getvalue()
    with Image.open(dst) as img:
        img.verify()


def store_load(server, folder: Path):
    reply = server.stub.LoadModel(
        pb.ModelOptions(
            Model="docs",
            ModelPath=str(folder),
            Type="store",
            Options=["store_path:store.safetensors"],
        )
    )
    assert reply.success, reply.message


def test_store(srv, tmp_path):
    """Killed half-way through persisting a StoresSet: the next load has the previous keys."""
    keys = [pb.StoresKey(Floats=[1.0, 0.0, float(i)]) for i in range(3)]
    store_load(srv, tmp_path)
    assert srv.stub.StoresSet(
        pb.StoresSetOptions(Keys=keys, Values=[pb.StoresValue(Bytes=b"v%d" % i) for i in range(3)])
    ).success
    before = digest(tmp_path / "store.safetensors")
    doomed_srv = doomed("write", "store.safetensors")
    store_load(doomed_srv, tmp_path)
    new = pb.StoresSetOptions(
        Keys=[pb.StoresKey(Floats=[0.0, 1.0, 9.0])], Values=[pb.StoresValue(Bytes=b"new" * 1000)]
    )
    killed(doomed_srv, lambda: doomed_srv.stub.StoresSet(new, timeout=60))
    assert digest(tmp_path / "store.safetensors") == before
    assert litter(tmp_path)  # the dead writer's half temp file ...
    store_load(srv, tmp_path)
    assert not litter(tmp_path)  # ... removed by the next load
    found = srv.stub.StoresFind(pb.StoresFindOptions(Key=keys[0], TopK=10))
    assert sorted(v.Bytes for v in found.Values) == [b"v0", b"v1", b"v2"]
    got = srv.stub.StoresGet(pb.StoresGetOptions(Keys=keys))
    assert np.allclose([list(k.Floats) for k in got.Keys], [list(k.Floats) for k in keys])


def test_prompt_cache(srv, trained_dir, tmp_path):
    """Killed half-way through writing an SSD-tier block: the next process keeps every block
    written before, removes the torn one's temp file and reuses the blocks."""
    kv = tmp_path / "crash-kv"
    load = pb.ModelOptions(
        Model=str(trained_dir), Options=[f"prompt_cache_dir:{kv}", "prompt_cache_block:16"]
    )
    first = chat("What is the capital of France? " * 8)
    assert srv.stub.LoadModel(load).success
    srv.stub.Predict(first)
    assert srv.stub.Free(pb.HealthMessage()).success  # Free waits for the queued blocks
    saved = {p.name: digest(p) for p in (kv / "blocks").glob("*.safetensors")}
    assert saved
    doomed_srv = doomed("write", "crash-kv/blocks")
    assert doomed_srv.stub.LoadModel(load).success
    try:  # the block is written as the request finishes: the reply may get out first
        doomed_srv.stub.Predict(chat("A long story, please. " * 8), timeout=120)
    except grpc.RpcError:
        pass
    killed(doomed_srv)
    assert {p.name: digest(p) for p in (kv / "blocks").glob("*.safetensors")} == saved
    assert litter(kv)  # the torn block's temp file ...
    assert srv.stub.LoadModel(load).success
    assert not litter(kv)  # ... removed by the next load
    srv.stub.Predict(first)
    breakdown = srv.stub.Status(pb.HealthMessage()).memory.breakdown
    assert breakdown["prompt_tokens_from_ssd"] > 0
    assert srv.stub.GetMetrics(pb.MetricsRequest()).prompt_tokens_processed <= 16


# -- the helper itself, in a plain subprocess -----------------------------------------------------

WRITER = """
import sys
from pathlib import Path
from mlxbackend import publish
if sys.argv[2] == "no-exchange":
    publish.exchange = lambda a, b: False  # a file system without an atomic exchange
final = Path(sys.argv[1])
if sys.argv[3] == "folder":
    with publish.atomic_folder(final) as tmp:
        (tmp / "v").write_text("new" * 1000)
else:
    publish.write_text(final, "new" * 1000)
"""


def write_and_die(final: Path, point: str, exchange: str, kind: str):
    env = {**os.environ, KILL_ENV: f"{point}:{final.name}"}
    r = subprocess.run(
        [sys.executable, "-c", WRITER, str(final), exchange, kind], env=env, cwd=ROOT
    )
    assert r.returncode == -signal.SIGKILL


@pytest.mark.parametrize("point", ["write", "swap"])
def test_file_publish_killed(tmp_path, point):
    final = tmp_path / "state.json"
    final.write_text("old")
    write_and_die(final, point, "exchange", "file")
    assert final.read_text() == "old" and litter(tmp_path)
    publish.recover(final)
    assert final.read_text() == "old" and not litter(tmp_path)


@pytest.mark.parametrize("exchange", ["exchange", "no-exchange"])
@pytest.mark.parametrize("point", ["write", "swap"])
def test_folder_publish_killed(tmp_path, point, exchange):
    """Killed before the rename: the old folder; killed at the swap: the new one (atomic
    exchange) or nothing under the final name until recover() puts the old one back."""
    final = tmp_path / "out"
    final.mkdir()
    (final / "v").write_text("old")
    write_and_die(final, point, exchange, "folder")
    if point == "swap" and exchange == "no-exchange":
        assert not final.exists()  # between the two renames
    publish.recover(final)
    want = "new" * 1000 if point == "swap" and exchange == "exchange" else "old"
    assert (final / "v").read_text() == want and not litter(tmp_path)


def test_interrupt_and_full_disk_clean_up(tmp_path):
    final = tmp_path / "f.bin"
    with pytest.raises(KeyboardInterrupt):
        with publish.atomic_file(final) as f:
            f.write(b"x" * 100)
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        with publish.atomic_folder(tmp_path / "d") as tmp:
            (tmp / "x").write_bytes(b"x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(NoSpace, match=f"no space left on device writing {final}"):
        with publish.atomic_file(final) as f:
            raise full
    assert list(tmp_path.iterdir()) == []
