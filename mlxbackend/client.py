"""A small gRPC client for the CLI (chat, bench) and tests."""

import os

import grpc

from mlxbackend.errors import BackendError
from mlxbackend.proto import backend_pb2 as pb
from mlxbackend.proto import backend_pb2_grpc as pb_grpc

DEFAULT_ADDR = os.environ.get("MLXB_ADDR", "127.0.0.1:50051")


def connect(addr: str = DEFAULT_ADDR) -> pb_grpc.BackendStub:
    channel = grpc.insecure_channel(
        addr,
        options=[
            ("grpc.max_send_message_length", 50 * 1024 * 1024),
            ("grpc.max_receive_message_length", 50 * 1024 * 1024),
        ],
    )
    return pb_grpc.BackendStub(channel)


def auth_metadata():
    token = os.environ.get("LOCALAI_GRPC_AUTH_TOKEN", "")
    return [("authorization", f"Bearer {token}")] if token else None


def failure_text(exc: Exception) -> str:
    """One line for a CLI: a local BackendError as "Type: message", a running backend's gRPC error
    as its details."""

    if isinstance(exc, BackendError):
        return f"{type(exc).__name__}: {exc}"
    details = getattr(exc, "details", None)
    return str(details() if callable(details) else exc)


def local_or_remote(args, err) -> bool:
    """--model DIR (run here) and --addr HOST:PORT (a running backend) exclude each other; False
    (and a message) unless exactly one is given."""
    if bool(args.model) != bool(args.addr):
        return True
    err.print(
        "[red]give exactly one of --model DIR (local) or --addr HOST:PORT (a running backend)[/red]"
    )
    return False


def chat_request(
    text: str, max_tokens: int = 256, temperature: float = 0.0, **extra
) -> pb.PredictOptions:
    """A chat request the way LocalAI sends it with use_tokenizer_template: true."""
    return pb.PredictOptions(
        Messages=[pb.Message(role="user", content=text)],
        UseTokenizerTemplate=True,
        Tokens=max_tokens,
        Temperature=temperature,
        TopP=0.95,
        **extra,
    )


def spawn_server(timeout: float = 60.0, env: dict | None = None, log=None):
    """Start a backend process the way LocalAI does (run.sh --addr on a free port), in its own
    process group (a Ctrl-C in the caller does not reach it); returns (process, stub) once
    Health answers. `log`: an open file for its output (default: stdout kept, stderr dropped)."""
    import os
    import socket
    import subprocess
    import time
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_sh = Path(__file__).with_name("run.sh")
    proc = subprocess.Popen(
        [str(run_sh), "--addr", f"127.0.0.1:{port}"],
        env={**os.environ, **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
        start_new_session=True,
    )
    stub = connect(f"127.0.0.1:{port}")
    deadline = time.monotonic() + timeout
    while True:
        try:
            stub.Health(pb.HealthMessage(), timeout=1)
            return proc, stub
        except grpc.RpcError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_server(proc)
                raise RuntimeError("the backend process did not start") from None
            time.sleep(0.1)


def stop_server(proc, timeout: float = 15.0):
    """SIGTERM the backend's process group (LocalAI's stop), SIGKILL after `timeout` s."""
    import os
    import signal
    import subprocess

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
