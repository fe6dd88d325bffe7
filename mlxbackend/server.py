"""The gRPC process: binds first, then loads heavy libraries; auth, parent watch, signals.

Handlers are registered from the service descriptor with raw-bytes requests, so malformed
messages get INVALID_ARGUMENT and every capability error maps to one status code."""

import asyncio
import hmac
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import grpc

from mlxbackend.default_model import ensure_default_model
from mlxbackend.errors import status_of
from mlxbackend.host import LoadRequest
from mlxbackend.limits import MAX_MESSAGE
from mlxbackend.proto import backend_pb2 as pb
from mlxbackend.servicer import PENDING, Servicer

log = logging.getLogger("mlxbackend")
SERVICE = pb.DESCRIPTOR.services_by_name["Backend"]


def _token_ok(context) -> bool:
    expected = os.environ.get("LOCALAI_GRPC_AUTH_TOKEN", "")
    if not expected:
        return True
    got = dict(context.invocation_metadata()).get("authorization", "")
    return hmac.compare_digest(got.encode(), f"Bearer {expected}".encode())


def _parse(request_cls, raw: bytes):
    try:
        return request_cls.FromString(raw), None
    except Exception as exc:  # google.protobuf.message.DecodeError and friends
        return None, f"malformed {request_cls.__name__} message: {exc}"


def _wrap(servicer, method):
    """A raw-bytes handler around servicer.<name> with auth and error mapping."""

    name, request_cls = method.name, pb.DESCRIPTOR.message_types_by_name[method.input_type.name]
    request_cls = getattr(pb, request_cls.name)
    impl = getattr(servicer, name, None)
    if impl is None and name in PENDING:

        def impl(request, context, _name=name):  # noqa: E306
            servicer.unimplemented(_name)

    async def prologue(raw, context):
        if not _token_ok(context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid token")
        request, error = _parse(request_cls, raw)
        if error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
        return request

    async def fail(context, exc):
        code_name, message = status_of(exc)
        code = getattr(grpc.StatusCode, code_name)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("%s failed", name)
        else:
            log.info("%s: %s: %s", name, code.name, message)
        await context.abort(code, message)

    if method.server_streaming:

        async def stream_handler(raw, context):
            request = await prologue(raw, context)
            try:
                if not _is_async_gen(impl):
                    impl(request, context)  # an RPC still pending: raises Unsupported
                async for reply in impl(request, context):
                    yield reply
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await fail(context, exc)

        return grpc.unary_stream_rpc_method_handler(stream_handler, response_serializer=_serialize)

    async def unary_handler(raw, context):
        request = await prologue(raw, context)
        try:
            result = impl(request, context)
            return await result if asyncio.iscoroutine(result) else result
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await fail(context, exc)

    return grpc.unary_unary_rpc_method_handler(unary_handler, response_serializer=_serialize)


def _is_async_gen(fn) -> bool:
    import inspect

    return inspect.isasyncgenfunction(fn)


def _serialize(message) -> bytes:
    return message.SerializeToString()


def add_servicer(server, servicer):
    handlers = {m.name: _wrap(servicer, m) for m in SERVICE.methods}
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)]
    )


def _watch_interval() -> float:
    raw = os.environ.get("LOCALAI_BACKEND_PARENT_WATCH_INTERVAL", "2s").strip().lower()
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for suffix in ("ms", "s", "m", "h"):
        if raw.endswith(suffix):
            try:
                return max(float(raw[: -len(suffix)]) * units[suffix], 0.05)
            except ValueError:
                return 2.0
    try:
        return max(float(raw), 0.05)
    except ValueError:
        return 2.0


def start_parent_watch():
    """Exit when LocalAI dies (covers SIGKILL of the parent); off with ..._PARENT_WATCH=false."""
    if os.environ.get("LOCALAI_BACKEND_PARENT_WATCH", "true").strip().lower() in (
        "false",
        "0",
        "no",
        "off",
    ):
        return None
    parent = os.getppid()
    if parent == 1:
        return None  # already orphaned at start: nothing to watch
    interval = _watch_interval()

    def watch():
        while True:
            time.sleep(interval)
            now = os.getppid()
            if now != parent or now == 1:
                print(
                    "mlxbackend: parent process exited; shutting down", file=sys.stderr, flush=True
                )
                os._exit(1)

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread


async def serve(addr: str, model: str = "", options=()):
    """Bind addr, answer Health at once, then (optionally) preload a model."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.so_reuseport", 0),
        ]
    )

    servicer = Servicer()
    add_servicer(server, servicer)
    if server.add_insecure_port(addr) == 0:
        raise SystemExit(f"mlxbackend: cannot bind {addr}")
    await server.start()
    print(f"mlxbackend: listening on {addr}", file=sys.stderr, flush=True)
    start_parent_watch()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    if model:
        asyncio.ensure_future(_preload(servicer, model, options))
    await stop.wait()
    print("mlxbackend: shutting down", file=sys.stderr, flush=True)
    await servicer.host.shutdown()
    await server.stop(grace=3)
    servicer.host.worker.thread.join(timeout=5)


async def _preload(servicer, model: str, options):
    """--model: load at start-up, as LocalAI's LoadModel would ('default' = bundled SmolLM2)."""

    try:
        if model == "default":
            models_dir = Path(os.environ.get("MLXB_MODELS_DIR", "models"))
            model = str(
                await servicer.host.worker.run(ensure_default_model, models_dir)
            )  # MLX work: on the worker
        message = await servicer.host.load(
            LoadRequest(model=os.path.abspath(model), options=list(options))
        )
        print(f"mlxbackend: {message}", file=sys.stderr, flush=True)
    except Exception as exc:
        print(f"mlxbackend: preload of {model} failed: {exc}", file=sys.stderr, flush=True)
