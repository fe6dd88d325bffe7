"""Quantization jobs over gRPC against a real server: an MLX type (loaded back with LoadModel),
two GGUF types (loaded in llama.cpp), a .gguf input, progress fan-out and order, stop, restart
recovery, bad inputs.

The tiny test model has a custom byte-level BPE vocabulary that llama.cpp's converter cannot
identify, so GGUF jobs pass extra_options pre_tokenizer=gpt-2 (see tests/test_mlx_to_gguf.py)."""

import json
import threading
import time
from pathlib import Path

import grpc
import llama_cpp
import pytest

from mlxbackend.client import chat_request
from mlxbackend.proto import backend_pb2 as pb
from tests.conftest import Server

ORDER = ["queued", "downloading", "converting", "quantizing", "completed"]
TERMINAL = ("completed", "failed", "stopped")
JOBS_DIR = "/tmp/mlxb-test-quantize-jobs"
PRE = {"pre_tokenizer": "gpt-2"}


@pytest.fixture(scope="module")
def qserver():
    srv = Server(env={"MLXB_JOBS_DIR": JOBS_DIR})
    yield srv
    srv.stop()


def start(srv, model, qtype, out, job_id, **options) -> str:
    reply = srv.stub.StartQuantization(
        pb.QuantizationRequest(
            model=str(model),
            quantization_type=qtype,
            output_dir=str(out),
            job_id=job_id,
            extra_options=options,
        )
    )
    assert reply.success and reply.job_id == job_id, reply.message
    return reply.job_id


def follow(srv, job_id, until=None) -> list:
    updates = []
    for u in srv.stub.QuantizationProgress(
        pb.QuantizationProgressRequest(job_id=job_id), timeout=240
    ):
        updates.append(u)
        if until is not None and until(u):
            break
    return updates


def check_order(updates):
    """Statuses only move forward, progress never goes back, the stream ends on a terminal status."""
    ranks = [ORDER.index(u.status) for u in updates]
    assert ranks == sorted(ranks), [u.status for u in updates]
    percents = [u.progress_percent for u in updates]
    assert percents == sorted(percents) and all(0 <= p <= 100 for p in percents), percents
    assert updates[-1].status in TERMINAL


def run_job(srv, model, qtype, out, job_id, **options):
    job_id = start(srv, model, qtype, out, job_id, **options)
    updates = follow(srv, job_id)
    assert updates[-1].status == "completed", updates[-1].message
    check_order(updates)
    return updates


@pytest.fixture(scope="module")
def mlx_job(qserver, trained_dir, tmp_path_factory):
    """mlx-q4 (group 32) of the trained tiny model, followed by two subscribers at once."""
    out = tmp_path_factory.mktemp("q") / "mlx"
    text = out.parent / "ppl.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    job_id = start(
        qserver, trained_dir, "mlx-q4", out, "q-mlx", group_size="32", perplexity_text=str(text)
    )
    second = {}
    t = threading.Thread(target=lambda: second.setdefault("u", follow(qserver, job_id)))
    t.start()
    updates = follow(qserver, job_id)
    t.join(120)
    return out, updates, second["u"]


def test_mlx_type_progress_and_load(qserver, mlx_job, trained_dir):
    out, updates, second = mlx_job
    for seen in (updates, second):
        check_order(seen)
        assert seen[-1].status == "completed", seen[-1].message
    assert second[-1] == updates[-1]  # every subscriber sees the final state
    final = updates[-1]
    folder = out / f"{trained_dir.name}-mlx-q4"
    assert final.output_file == str(folder) and final.progress_percent == 100
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    # the default recipe: 6 bits for the (tied) embeddings and the last layer's v/down
    assert config["quantization"]["model.embed_tokens"]["bits"] == 6
    assert config["quantization"]["model.layers.1.self_attn.v_proj"]["bits"] == 6
    assert config["quantization"]["model.layers.1.mlp.down_proj"]["bits"] == 6
    assert config["quantization"]["model.layers.0.self_attn.v_proj"]["bits"] == 4
    m = final.extra_metrics
    assert m["file_size_mb"] > 0 and m["compression_ratio"] > 3  # float32 -> 4-bit, every layer
    assert 1 < m["perplexity_base"] and 1 < m["perplexity"]
    yaml = (out / f"{folder.name}.yaml").read_text()
    assert "backend: mlx" in yaml and f"model: {folder}" in yaml
    assert sorted(p.name for p in out.iterdir()) == ["job.json", folder.name, f"{folder.name}.yaml"]
    assert json.loads((out / "job.json").read_text())["snapshot"]["status"] == "completed"
    # the result loads in this backend and generates
    assert qserver.stub.LoadModel(pb.ModelOptions(Model=str(folder), ContextSize=1024)).success
    reply = qserver.stub.Predict(chat_request("Hello", max_tokens=8))
    assert reply.tokens > 0 and reply.message
    # a later subscriber gets the final snapshot only
    assert follow(qserver, "q-mlx") == [final]


@pytest.mark.parametrize("qtype", ["q8_0", "q4_k_m"])
def test_gguf_types(qserver, trained_dir, tmp_path, qtype):
    out = tmp_path / "out"
    updates = run_job(qserver, trained_dir, qtype, out, f"q-{qtype}", **PRE)
    statuses = {u.status for u in updates}
    assert "converting" in statuses or "quantizing" in statuses
    final = out / f"{trained_dir.name}-{qtype}.gguf"
    assert updates[-1].output_file == str(final)
    assert final.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in out.iterdir()) == [
        "job.json",
        final.name,
    ]  # one file, no leftovers
    assert updates[-1].extra_metrics["compression_ratio"] > 3
    llm = llama_cpp.Llama(model_path=str(final), n_ctx=256, n_threads=2, verbose=False)
    try:
        text = llm("Hello", max_tokens=8, temperature=0.0)["choices"][0]["text"]
        assert llm.n_vocab() > 1000 and isinstance(text, str)
        assert llm.metadata["general.file_type"] == {"q8_0": "7", "q4_k_m": "15"}[qtype]
    finally:
        llm.close()


def test_gguf_input_and_recovery(qserver, trained_dir, tmp_path):
    """A .gguf input is imported first (status downloading), then quantized to MLX; a fresh
    process answers for the finished job from disk."""
    gguf_out = tmp_path / "gguf"
    run_job(qserver, trained_dir, "f16", gguf_out, "q-f16", **PRE)
    gguf = gguf_out / f"{trained_dir.name}-f16.gguf"
    out = tmp_path / "from-gguf"
    job_id = start(qserver, gguf, "mlx-q8", out, "q-from-gguf", group_size="32")
    # subscribe at once: the import is slow enough to be seen
    updates = follow(qserver, job_id)
    check_order(updates)
    assert updates[-1].status == "completed", updates[-1].message
    assert "quantizing" in {u.status for u in updates}
    states = json.loads((out / "job.json").read_text())
    assert states["snapshot"]["status"] == "completed" and states["config"]["qtype"] == "mlx-q8"
    folder = out / f"{trained_dir.name}-f16-mlx-q8"
    assert updates[-1].output_file == str(folder) and (folder / "config.json").exists()
    assert sorted(p.name for p in out.iterdir()) == ["job.json", folder.name, f"{folder.name}.yaml"]
    assert not list(gguf.parent.glob(".mlx-cache"))  # imported inside the job's temp folder
    fresh = Server(env={"MLXB_JOBS_DIR": JOBS_DIR})
    try:
        again = follow(fresh, job_id)
        assert [u.status for u in again] == ["completed"] and again[0].output_file == str(folder)
    finally:
        fresh.stop()


def test_stop_mid_job(qserver, trained_dir, tmp_path):
    out = tmp_path / "stop"
    job_id = start(qserver, trained_dir, "q4_k_m", out, "q-stop", **PRE)
    seen = follow(
        qserver,
        job_id,
        until=lambda u: u.status in ("converting", "quantizing") or u.status in TERMINAL,
    )
    assert seen[-1].status in ("converting", "quantizing"), seen[-1]
    t0 = time.time()
    reply = qserver.stub.StopQuantization(pb.QuantizationStopRequest(job_id=job_id))
    assert reply.success
    rest = follow(qserver, job_id)
    # well under a second on a quiet machine, 6.2 s once in a CI run while other jobs loaded
    # the machine: the status says the job was stopped; the bound only catches a hang
    assert rest[-1].status == "stopped" and time.time() - t0 < 15, rest[-1]
    assert not rest[-1].output_file
    assert sorted(p.name for p in out.iterdir()) == ["job.json"]  # no output, temp files removed
    leftover = [
        p
        for p in Path("/proc").glob("[0-9]*/cmdline")
        if b".quantize-q-stop" in (p.read_bytes() if p.exists() else b"")
    ]
    assert not leftover  # llama.cpp's converter/quantizer were killed
    # stopping a finished job is harmless
    assert (
        "already stopped"
        in qserver.stub.StopQuantization(pb.QuantizationStopRequest(job_id=job_id)).message
    )


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_bad_inputs(qserver, trained_dir, tmp_path):
    s = qserver.stub

    def req(**kw):
        fields = dict(
            model=str(trained_dir),
            quantization_type="q8_0",
            output_dir=str(tmp_path / "o"),
            job_id="bad",
        )
        fields.update(kw)
        return lambda: s.StartQuantization(pb.QuantizationRequest(**fields))

    code, details = code_of(req(quantization_type="q9_z"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "q4_k_m" in details and "mlx-q4" in details
    code, _ = code_of(req(quantization_type="mlx-q4", extra_options={"group_size": "48"}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = code_of(req(model=str(tmp_path / "no-such-model")))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = code_of(req(model="nobody/no-such-model-xyz"))
    assert code == grpc.StatusCode.NOT_FOUND
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _ = code_of(req(output_dir=str(blocker / "sub")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # an architecture llama.cpp cannot convert fails fast for GGUF types
    odd = tmp_path / "odd"
    odd.mkdir()
    for f in trained_dir.iterdir():
        (odd / f.name).write_bytes(f.read_bytes())
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchForCausalLM"]}))
    code, details = code_of(req(model=str(odd)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "NoSuchForCausalLM" in details
    code, _ = code_of(
        lambda: list(s.QuantizationProgress(pb.QuantizationProgressRequest(job_id="nope")))
    )
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = code_of(lambda: s.StopQuantization(pb.QuantizationStopRequest(job_id="nope")))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = code_of(
        lambda: list(s.QuantizationProgress(pb.QuantizationProgressRequest(job_id="")))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = code_of(lambda: s.StopQuantization(pb.QuantizationStopRequest(job_id="")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert qserver.healthy()


def test_cli_quantize(tiny_dir, tmp_path):
    """`mlxbackend quantize` runs a job through its own backend and shows the result."""
    import subprocess
    import sys

    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlxbackend",
            "quantize",
            str(tiny_dir),
            "--type",
            "mlx-q4",
            "--output",
            str(tmp_path),
            "--option",
            "group_size=32",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "completed" in run.stdout and "compression_ratio" in run.stdout
    assert (tmp_path / f"{tiny_dir.name}-mlx-q4" / "config.json").exists()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlxbackend",
            "quantize",
            str(tiny_dir),
            "--type",
            "q9_z",
            "--output",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1 and "INVALID_ARGUMENT" in run.stdout


def test_base_perplexity_is_measured_once_per_unchanged_model(trained_dir, tmp_path, monkeypatch):
    """Jobs from one base share its perplexity; a changed weight file or text measures again."""
    import os
    import shutil

    from mlxbackend.quantize import perplexity

    model = tmp_path / "base"
    shutil.copytree(trained_dir, model)
    measured = []
    real = perplexity.mlx_perplexity
    monkeypatch.setattr(perplexity, "mlx_perplexity", lambda d, t: measured.append(d) or real(d, t))
    text = "The quick brown fox jumps over the lazy dog. " * 5
    first = perplexity.base_perplexity(model, text)
    assert perplexity.base_perplexity(model, text) == first and len(measured) == 1
    assert first == real(model, text)
    weights = next(model.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    perplexity.base_perplexity(model, text)
    perplexity.base_perplexity(model, text + "Again.")
    assert len(measured) == 3
