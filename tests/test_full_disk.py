"""Full disk: every kind of publish (fine-tune checkpoint, export, quantization output, PNG, vector
store, prompt cache) into a tiny tmpfs that the test fills up. Each ends with a clear error
(RESOURCE_EXHAUSTED, or the job `failed` with "no space left on device"), nothing half-written
under a final name, no temp file left behind, and the previous state still loadable.

Needs root (it mounts a tmpfs): skipped otherwise. The tmpfs starts large enough for the first
write; `shrink` then remounts it to what is used plus one page, so the next write runs out of
space part-way through."""

import json
import os
import subprocess
from pathlib import Path

import grpc
import mlx.core as mx
import pytest

from mlxbackend.proto import backend_pb2 as pb
from tests import publish_checks as checks
from tests.conftest import Server
from tests.publish_checks import chat, digest, write_dataset

PAGE = 4096
NO_SPACE = "no space left on device"
TERMINAL = ("completed", "failed", "stopped")


# -- the tiny file system ----------------------------------------------------------------------


@pytest.fixture()
def small_fs(tmp_path):
    """A fresh 64 MiB tmpfs (shrunk by `shrink`), unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def shrink(mnt: Path, leave: int = PAGE):
    """Remount `mnt` to its current use plus `leave` bytes: the next sizeable write fails.

    A job may still be writing: tmpfs refuses a size below what is used by then ("bad option"),
    so measure again and retry."""
    for _ in range(50):
        st = os.statvfs(mnt)
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        r = subprocess.run(
            ["mount", "-o", f"remount,size={used + leave}", str(mnt)],
            capture_output=True,
            text=True,
        )
        if r.returncode == 0:
            break
    else:
        raise AssertionError(f"cannot shrink {mnt}: {r.stderr.strip()}")
    free = os.statvfs(mnt).f_bavail * st.f_frsize
    assert free <= leave + PAGE, free


def litter(root: Path) -> list:
    return checks.litter(root, also=(".quantize-",))


# -- shared servers and inputs -------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv():
    server = Server(env={"MLXB_JOBS_DIR": "/tmp/mlxb-test-full-disk-jobs"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"))


def finetune(srv, model, data, out, job_id, **kw) -> str:
    request = checks.finetune_request(model, data, out, job_id, **{"max_steps": 4, **kw})
    reply = srv.stub.StartFineTune(request)
    assert reply.success, reply.message
    return reply.job_id


def ft_updates(srv, job_id, until=None) -> list:
    out = []
    for u in srv.stub.FineTuneProgress(pb.FineTuneProgressRequest(job_id=job_id), timeout=300):
        out.append(u)
        if until is not None and until(u):
            break
    return out


@pytest.fixture(scope="module")
def adapter(srv, tiny_dir, dataset, tmp_path_factory) -> Path:
    """A finished LoRA job's output folder (on the normal disk), the source of the exports."""
    out = tmp_path_factory.mktemp("ft") / "out"
    job = finetune(srv, tiny_dir, dataset, out, "full-disk-adapter")
    last = ft_updates(srv, job)[-1]
    assert last.status == "completed", last.message
    return out


def assert_checkpoint_loads(folder: Path):
    assert json.loads((folder / "trainer_state.json").read_text())["step"] > 0
    assert json.loads((folder / "adapter_config.json").read_text())
    assert mx.load(str(folder / "adapters.safetensors")) and mx.load(
        str(folder / "optimizer.safetensors")
    )


# -- the tests ---------------------------------------------------------------------------------


def test_checkpoint(srv, small_fs, tiny_dir, dataset):
    """Checkpoints every 2 steps; the disk fills after the first: the job fails naming the disk,
    every listed checkpoint is complete and loads, nothing else is left."""
    out = small_fs / "ft"
    job = finetune(srv, tiny_dir, dataset, out, "full-disk-ckpt", max_steps=400, save_steps=2)
    try:
        first = ft_updates(
            srv, job, until=lambda u: bool(u.checkpoint_path) or u.status in TERMINAL
        )
        assert first[-1].checkpoint_path.endswith("checkpoint-2"), first[-1]
        shrink(small_fs)
        last = ft_updates(srv, job)[-1]
    finally:  # a failed check must not leave the job running into the next test
        srv.stub.StopFineTune(pb.FineTuneStopRequest(job_id=job))
        ft_updates(srv, job)  # until it has ended
    assert last.status == "failed" and NO_SPACE in last.message.lower(), last
    assert last.current_step < 400
    listed = srv.stub.ListCheckpoints(pb.ListCheckpointsRequest(output_dir=str(out))).checkpoints
    steps = [c.step for c in listed]
    assert steps and steps == list(range(2, 2 * len(steps) + 1, 2)), steps
    for c in listed:
        assert_checkpoint_loads(Path(c.path))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == [
        f"checkpoint-{s}" for s in steps
    ]
    assert not litter(small_fs)


def test_export(srv, small_fs, adapter, tiny_dir):
    """A second export over the first one does not fit: RESOURCE_EXHAUSTED, the first intact."""
    dst = small_fs / "exported"
    first = srv.stub.ExportModel(
        pb.ExportModelRequest(
            checkpoint_path=str(adapter), output_path=str(dst), export_format="lora"
        )
    )
    assert first.success, first.message
    before = digest(dst)
    shrink(small_fs)
    with pytest.raises(grpc.RpcError) as e:
        srv.stub.ExportModel(
            pb.ExportModelRequest(
                checkpoint_path=str(adapter),
                output_path=str(dst),
                export_format="lora",
                extra_options={"overwrite": "true"},
            )
        )
    assert (
        e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        and NO_SPACE in e.value.details().lower()
    ), e.value.details()
    assert str(dst) in e.value.details()
    assert digest(dst) == before and not litter(small_fs)
    assert srv.stub.LoadModel(pb.ModelOptions(Model=str(tiny_dir), LoraAdapter=str(dst))).success


def quantize(srv, model, out, job_id) -> list:
    reply = srv.stub.StartQuantization(
        pb.QuantizationRequest(
            model=str(model),
            quantization_type="mlx-q4",
            output_dir=str(out),
            job_id=job_id,
            extra_options={"group_size": "32"},
        )
    )
    assert reply.success, reply.message
    return list(
        srv.stub.QuantizationProgress(pb.QuantizationProgressRequest(job_id=job_id), timeout=240)
    )


def test_quantization_output(srv, small_fs, trained_dir):
    """A second quantization to the same output does not fit: `failed` with the disk named, the
    first output intact and loadable, the job's work folder gone."""
    out = small_fs / "q"
    done = quantize(srv, trained_dir, out, "full-disk-q1")[-1]
    assert done.status == "completed", done.message
    folder = Path(done.output_file)
    before = digest(folder)
    shrink(small_fs)
    failed = quantize(srv, trained_dir, out, "full-disk-q2")[-1]
    assert failed.status == "failed" and NO_SPACE in failed.message.lower(), failed
    assert digest(folder) == before and not litter(small_fs)
    assert srv.stub.LoadModel(pb.ModelOptions(Model=str(folder))).success


def test_png(srv, small_fs, tmp_path_factory):
    """GenerateImage into a full disk: RESOURCE_EXHAUSTED; the PNG already there is untouched."""
    pytest.importorskip(
        "diffusionkit", reason="DiffusionKit is installed by `make install` (--no-deps)"
    )
    from PIL import Image

    from tests.tiny_diffusion import build_tiny_sd3

    sd3 = build_tiny_sd3(tmp_path_factory.mktemp("diffusion") / "tiny-sd3")
    assert srv.stub.LoadModel(pb.ModelOptions(Model=sd3.name, ModelPath=str(sd3.parent))).success
    dst = small_fs / "out.png"
    dst.write_bytes(b"")  # LocalAI pre-creates the file
    request = pb.GenerateImageRequest(
        dst=str(dst), positive_prompt="a red cube", width=64, height=64, step=2, seed=1
    )
    assert srv.stub.GenerateImage(request, timeout=300).success
    before = digest(dst)
    shrink(small_fs)
    request.seed = 2
    with pytest.raises(grpc.RpcError) as e:
        srv.stub.GenerateImage(request, timeout=300)
    assert (
        e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        and NO_SPACE in e.value.details().lower()
    ), e.value.details()
    assert digest(dst) == before and not litter(small_fs)
    with Image.open(dst) as img:
        img.verify()


def store_load(srv, folder: Path):
    reply = srv.stub.LoadModel(
        pb.ModelOptions(
            Model="docs",
            ModelPath=str(folder),
            Type="store",
            Options=["store_path:store.safetensors"],
        )
    )
    assert reply.success, reply.message


def test_store_persist(srv, small_fs):
    """StoresSet on a full disk: RESOURCE_EXHAUSTED, the store (in memory and on disk) unchanged."""
    store_load(srv, small_fs)
    keys = [pb.StoresKey(Floats=[1.0, 0.0, float(i)]) for i in range(3)]
    assert srv.stub.StoresSet(
        pb.StoresSetOptions(Keys=keys, Values=[pb.StoresValue(Bytes=b"v%d" % i) for i in range(3)])
    ).success
    before = digest(small_fs / "store.safetensors")
    shrink(small_fs)
    big = pb.StoresSetOptions(
        Keys=[pb.StoresKey(Floats=[0.0, 1.0, 9.0])],
        Values=[pb.StoresValue(Bytes=os.urandom(64 << 10))],
    )
    with pytest.raises(grpc.RpcError) as e:
        srv.stub.StoresSet(big)
    assert (
        e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        and NO_SPACE in e.value.details().lower()
    ), e.value.details()
    assert digest(small_fs / "store.safetensors") == before and not litter(small_fs)
    assert len(srv.stub.StoresFind(pb.StoresFindOptions(Key=keys[0], TopK=10)).Keys) == 3
    fresh = Server()  # a new process loads the previous store
    try:
        store_load(fresh, small_fs)
        found = fresh.stub.StoresFind(pb.StoresFindOptions(Key=keys[0], TopK=10))
        assert sorted(v.Bytes for v in found.Values) == [b"v0", b"v1", b"v2"]
    finally:
        fresh.stop()


def test_prompt_cache_write(srv, small_fs, trained_dir):
    """Whole-entry persistence (a rotating KV cache, which the SSD tier does not store): Free
    saves the prompt cache; on a full disk it logs the error, still frees, and the entries saved
    before still restore in a new process."""
    from mlx_lm.models.cache import load_prompt_cache

    kv = small_fs / "kv"
    load = pb.ModelOptions(
        Model=str(trained_dir), Options=[f"prompt_cache_dir:{kv}", "max_kv_size:512"]
    )
    first = chat("What is the capital of France? " * 8)
    assert srv.stub.LoadModel(load).success
    srv.stub.Predict(first)
    assert srv.stub.Free(pb.HealthMessage()).success
    saved = {p.name: digest(p) for p in kv.glob("*.safetensors")}
    assert saved
    assert srv.stub.LoadModel(load).success
    srv.stub.Predict(chat("Tell me a long story about a dragon. " * 8))
    shrink(small_fs)
    assert srv.stub.Free(pb.HealthMessage()).success  # freeing must not fail for the cache
    assert NO_SPACE in srv.output() and "prompt cache not saved" in srv.output()
    assert {p.name: digest(p) for p in kv.glob("*.safetensors")} == saved and not litter(small_fs)
    for name in saved:
        load_prompt_cache(str(kv / name))
    fresh = Server()
    try:
        assert fresh.stub.LoadModel(load).success
        fresh.stub.Predict(first)
        assert (
            fresh.stub.GetMetrics(pb.MetricsRequest()).prompt_tokens_processed == 1
        )  # restored hit
    finally:
        fresh.stop()


def test_prompt_cache_ssd_tier(srv, small_fs, trained_dir):
    """The SSD tier on a disk with no room for one block and none of its own to evict: it turns
    off (Status says why), requests are still served, nothing half-written is left."""
    kv = small_fs / "kv"
    load = pb.ModelOptions(
        Model=str(trained_dir), Options=[f"prompt_cache_dir:{kv}", "prompt_cache_block:16"]
    )  # a block: 16 tokens × 768 bytes of KV, 3 pages
    st = os.statvfs(small_fs)
    with open(small_fs / "filler", "wb") as f:
        f.write(b"\0" * (st.f_bavail * st.f_frsize - PAGE))
    reply = srv.stub.LoadModel(load)
    assert reply.success and "SSD prompt cache 0 blocks" in reply.message, reply.message
    for text in ("What is the capital of France? " * 8, "Tell me about dragons. " * 8):
        assert srv.stub.Predict(chat(text)).message
    breakdown = srv.stub.Status(pb.HealthMessage()).memory.breakdown
    assert breakdown["prompt_cache_ssd_off.no_space"] == 1, dict(breakdown)
    assert breakdown["prompt_cache_ssd_blocks"] == 0
    assert "SSD prompt cache off" in srv.output() and NO_SPACE in srv.output().lower()
    assert srv.stub.Free(pb.HealthMessage()).success
    assert not litter(small_fs) and not list((kv / "blocks").glob("*.safetensors"))
