"""End to end on real weights: the bundled SmolLM2-135M-Instruct, served as `make run` does."""

import subprocess
import sys

import pytest

from mlxbackend.proto import backend_pb2 as pb
from tests.conftest import ROOT, Server

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def default_server(smollm2_dir):
    """`run.sh --addr … --model default` with the models dir holding the converted SmolLM2."""
    srv = Server(
        env={"MLXB_MODELS_DIR": str(smollm2_dir.parent)}, extra_args=["--model", "default"]
    )
    import time

    deadline = time.time() + 120
    while srv.stub.Status(pb.HealthMessage()).state != pb.StatusResponse.READY:
        assert time.time() < deadline, srv.output()
        time.sleep(0.2)
    yield srv
    srv.stop()


def ask(stub, **kw):
    return pb.PredictOptions(
        Messages=[pb.Message(role="user", content=QUESTION)],
        UseTokenizerTemplate=True,
        Temperature=0,
        Tokens=32,
        **kw,
    )


def test_paris_greedy(default_server):
    reply = default_server.stub.Predict(ask(default_server.stub))
    assert "Paris" in reply.message.decode()
    assert reply.chat_deltas[0].content == reply.message.decode().strip()
    streamed = list(default_server.stub.PredictStream(ask(default_server.stub)))
    assert b"".join(r.message for r in streamed) == reply.message
    assert streamed[-1].tokens == reply.tokens and streamed[-1].prompt_tokens == reply.prompt_tokens


def test_chat_cli_streams_paris(default_server):
    out = subprocess.run(
        [sys.executable, "-m", "mlxbackend", "chat", "--addr", default_server.addr, QUESTION],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_cli_chat_reports_errors(tmp_path):
    srv = Server()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "mlxbackend", "chat", "--addr", srv.addr, "hello"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert out.returncode == 1 and "FAILED_PRECONDITION" in out.stdout
    finally:
        srv.stop()
