"""Data-aware MLX quantization (mlx-awq, mlx-gptq, mlx-dwq, mlx-dynamic) with LOCAL calibration
text over gRPC: AWQ end to end (progress, output layout, LoadModel + Predict), the other three
complete and load, stop mid-method, and the request errors (no calibration text, missing file,
too little text, bad bits); mlx-q4 with calibration text (the imatrix-weighted search) against
mlx-q4 without. The tiny model's hidden size is 96, hence group_size 32."""

import json
import time

import grpc
import mlx.core as mx
import pytest
from mlx_lm import load

from mlxbackend.client import chat_request
from mlxbackend.proto import backend_pb2 as pb
from mlxbackend.quantize import recipe
from tests.conftest import Server
from tests.test_quantize import TERMINAL, check_order, code_of, follow, start
from tests.tiny_model import CORPUS

JOBS_DIR = "/tmp/mlxb-test-quantize-calibrated-jobs"
SMALL = {"group_size": "32", "calibration_samples": "8", "calibration_seq_len": "64"}
HELD_OUT = (  # not in CORPUS: the weighted errors are measured on other activations
    "A lighthouse keeper counted the ships that passed each night and wrote their names in a "
    "blue book. In winter the harbour froze, the ferries stopped, and the town waited for the "
    "spring tides to carry the ice out to sea. Her brother repaired nets on the quay and sold "
    "smoked fish to travellers who came by the coast road, asking about the weather."
)


@pytest.fixture(scope="module")
def qserver():
    srv = Server(env={"MLXB_JOBS_DIR": JOBS_DIR})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calibration.txt"
    path.write_text(CORPUS * 2)
    return path


def run_ok(srv, model, qtype, out, job_id, **options):
    t0 = time.time()
    job_id = start(srv, model, qtype, out, job_id, **options)
    updates = follow(srv, job_id)
    assert updates[-1].status == "completed", updates[-1].message
    check_order(updates)
    return updates, time.time() - t0


def test_awq_end_to_end(qserver, trained_dir, calib, tmp_path):
    out = tmp_path / "awq"
    updates, took = run_ok(
        qserver, trained_dir, "mlx-awq", out, "c-awq", calibration_text=str(calib), **SMALL
    )
    quantizing = [u for u in updates if u.status == "quantizing"]
    assert len({u.progress_percent for u in quantizing}) >= 3  # per block, not one jump
    assert any("calibration blocks of 64 tokens" in u.message for u in quantizing)
    folder = out / f"{trained_dir.name}-mlx-awq"
    assert updates[-1].output_file == str(folder) and updates[-1].progress_percent == 100
    assert sorted(p.name for p in out.iterdir()) == ["job.json", folder.name, f"{folder.name}.yaml"]
    q = json.loads((folder / "config.json").read_text())["quantization"]
    assert q["model.layers.0.mlp.down_proj"] == {
        "group_size": 32,
        "bits": 4,
    }  # update_config's entries
    assert q["model.embed_tokens"] == {"group_size": 32, "bits": 4}
    assert updates[-1].extra_metrics["compression_ratio"] > 3
    assert "backend: mlx" in (out / f"{folder.name}.yaml").read_text()
    assert qserver.stub.LoadModel(pb.ModelOptions(Model=str(folder), ContextSize=1024)).success
    reply = qserver.stub.Predict(chat_request("Hello", max_tokens=8))
    assert reply.tokens > 0 and reply.message
    assert took < 60


@pytest.mark.parametrize("method", ["gptq", "dwq", "dynamic"])
def test_other_methods(qserver, trained_dir, calib, tmp_path, method):
    out = tmp_path / method
    extra = {"bits": "8"} if method == "gptq" else {}
    updates, took = run_ok(
        qserver,
        trained_dir,
        f"mlx-{method}",
        out,
        f"c-{method}",
        calibration_text=str(calib),
        **SMALL,
        **extra,
    )
    folder = out / f"{trained_dir.name}-mlx-{method}"
    config = json.loads((folder / "config.json").read_text())
    q = config["quantization"]
    assert q["group_size"] == 32 and q["bits"] == (8 if method == "gptq" else 4)
    if method == "gptq":
        assert q["model.embed_tokens"] == {"bits": 6, "group_size": 32}  # the fallback layers
    if method == "dynamic":  # the most sensitive layers get 5 bits
        assert any(isinstance(v, dict) and v.get("bits") == 5 for v in q.values())
    assert qserver.stub.LoadModel(pb.ModelOptions(Model=str(folder), ContextSize=1024)).success
    assert qserver.stub.Predict(chat_request("Hello", max_tokens=4)).tokens > 0
    assert took < 60


def test_stop_during_method(qserver, trained_dir, tmp_path):
    """A long DWQ run (many blocks) stops at its next training batch, with no output."""
    text = tmp_path / "long.txt"
    text.write_text(CORPUS * 40)
    out = tmp_path / "stop"
    job_id = start(
        qserver,
        trained_dir,
        "mlx-dwq",
        out,
        "c-stop",
        calibration_text=str(text),
        group_size="32",
        calibration_samples="400",
        calibration_seq_len="64",
    )
    seen = follow(
        qserver,
        job_id,
        until=lambda u: (
            (u.status == "quantizing" and u.progress_percent > 50) or u.status in TERMINAL
        ),
    )
    assert seen[-1].status == "quantizing", seen[-1]
    t0 = time.time()
    assert qserver.stub.StopQuantization(pb.QuantizationStopRequest(job_id=job_id)).success
    rest = follow(qserver, job_id)
    assert rest[-1].status == "stopped" and time.time() - t0 < 10, rest[-1]
    assert sorted(p.name for p in out.iterdir()) == ["job.json"]
    assert qserver.healthy()


def test_request_errors(qserver, trained_dir, calib, tmp_path):
    def req(qtype="mlx-gptq", **options):
        return lambda: qserver.stub.StartQuantization(
            pb.QuantizationRequest(
                model=str(trained_dir),
                quantization_type=qtype,
                output_dir=str(tmp_path / "o"),
                job_id="c-bad",
                extra_options={"group_size": "32", **options},
            )
        )

    for method in ("awq", "gptq", "dwq", "dynamic"):
        code, details = code_of(req(f"mlx-{method}"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "calibration_text" in details, details
        assert "download" in details.lower()
    code, details = code_of(req(calibration_text=str(tmp_path / "nope.txt")))
    assert code == grpc.StatusCode.NOT_FOUND and "nope.txt" in details
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("too short")
    code, details = code_of(req(calibration_text=str(tiny)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "128 tokens" in details
    code, details = code_of(req(calibration_text=str(calib), bits="3"))  # GPTQ: 2, 4 or 8
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "bits" in details
    code, _ = code_of(req("mlx-awq", calibration_text=str(calib), group_size="48"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # enough bytes to pass the request check, too few tokens: the job fails saying how many
    short = tmp_path / "short.txt"
    short.write_text("The capital of France is Paris. " * 5)
    job_id = start(
        qserver,
        trained_dir,
        "mlx-awq",
        tmp_path / "short",
        "c-short",
        calibration_text=str(short),
        group_size="32",
    )
    final = follow(qserver, job_id)[-1]
    assert final.status == "failed" and "at least 128" in final.message, final.message
    # AWQ with a group size that does not divide the hidden size fails with a hint
    job_id = start(
        qserver,
        trained_dir,
        "mlx-awq",
        tmp_path / "g64",
        "c-g64",
        calibration_text=str(calib),
        calibration_samples="4",
        calibration_seq_len="32",
    )
    final = follow(qserver, job_id)[-1]
    assert final.status == "failed" and "group_size 32" in final.message, final.message
    assert qserver.healthy()


def held_out_statistics(float_dir) -> tuple:
    """The float model's layers (path → module) and each Linear's inputs' mean squares on
    HELD_OUT (path → per-channel E[x²])."""
    model, tokenizer = load(str(float_dir))
    wrapped = recipe.attach_stats(model)
    recipe.collect_stats(model, wrapped, mx.array(tokenizer.encode(HELD_OUT))[None])
    h = recipe.detach_stats(model, wrapped)
    return dict(model.named_modules()), h


def weighted_error(layer, w: mx.array, h: mx.array) -> float:
    """sum_j h_j * sum_rows (w - dequantized)²: the squared output error a layer's inputs with
    per-channel mean squares h see (their cross terms left out)."""
    d = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
    return float((((w - d) ** 2) * h).sum())


def test_mlx_q4_with_calibration_text_is_imatrix_weighted(qserver, trained_dir, calib, tmp_path):
    """mlx-q4 + calibration_text runs data-aware (extra_metrics imatrix 1, every Linear
    weighted), its weights differ from plain mlx-q4's and lower the held-out activation-weighted
    error; without it (imatrix 0) every layer is the unweighted search of the float weights."""
    plain, took_plain = run_ok(
        qserver, trained_dir, "mlx-q4", tmp_path / "p", "q4-p", group_size="32"
    )
    aware, took = run_ok(
        qserver, trained_dir, "mlx-q4", tmp_path / "i", "q4-i", calibration_text=str(calib), **SMALL
    )
    m = aware[-1].extra_metrics
    assert m["imatrix"] == 1 and m["imatrix_layers"] == 14 and m["calibration_tokens"] == 8 * 64
    assert plain[-1].extra_metrics["imatrix"] == 0
    assert "imatrix_layers" not in plain[-1].extra_metrics
    assert any("activation statistics 8/8" in u.message for u in aware)
    floats, h = held_out_statistics(trained_dir)
    q_plain, q_aware = (
        dict(load(str(tmp_path / d / f"{trained_dir.name}-mlx-q4"))[0].named_modules())
        for d in ("p", "i")
    )
    before, after = {}, {}
    for path in h:  # the 14 Linears (the tied embeddings get no statistics)
        w = floats[path].weight
        want = recipe.quantize_searched(w, q_plain[path].bits, 32)
        got = (q_plain[path].weight, q_plain[path].scales, q_plain[path].biases)
        assert all(mx.array_equal(a, b) for a, b in zip(got, want, strict=True)), path
        assert not mx.array_equal(q_aware[path].scales, q_plain[path].scales), path
        before[path] = weighted_error(q_plain[path], w, h[path])
        after[path] = weighted_error(q_aware[path], w, h[path])
    print(
        f"\nheld-out weighted error: plain {sum(before.values()):.4g}, imatrix {sum(after.values()):.4g}"
    )
    assert sum(after.values()) < 0.95 * sum(before.values())  # measured: 0.89, 14/14 lower
    assert sum(after[p] < before[p] for p in h) >= 0.75 * len(h)
    code, details = code_of(
        lambda: qserver.stub.StartQuantization(
            pb.QuantizationRequest(
                model=str(trained_dir),
                quantization_type="mlx-q4",
                output_dir=str(tmp_path / "o"),
                extra_options={"calibration_text": str(tmp_path / "nope.txt")},
            )
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND and "nope.txt" in details
    assert took_plain + took < 60
