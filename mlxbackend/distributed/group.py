"""The host's side of a distributed group.

In the gRPC backend LocalAI talks to (the parent), LoadModel with a hostfile starts a private
child server on a loopback port that is rank 0 of the MLX group, loads the model through it and
then forwards text RPCs to it. The MLX group never lives in the parent: a collective blocked on a
dead peer cannot be interrupted, so the parent stays healthy, fails the request with UNAVAILABLE,
stops the child and reports the broken group in Status until the next LoadModel rebuilds it.

In the child (MLXB_DISTRIBUTED_ROLE=rank0) the same object loads rank 0's shard into the text
engine and answers Status with memory per rank."""

import asyncio
import functools
import inspect
import logging
import os
import socket
import sys
import time
from pathlib import Path

from mlxbackend.client import auth_metadata
from mlxbackend.distributed import GroupBroken, RemoteError
from mlxbackend.distributed import settings as group_settings
from mlxbackend.errors import InvalidInput
from mlxbackend.limits import MAX_MESSAGE
from mlxbackend.text.models import LoadSpec, model_dir, read_config

ROLE_ENV = "MLXB_DISTRIBUTED_ROLE"
log = logging.getLogger("mlxbackend.distributed")
START_TIMEOUT = 60.0  # s for the child server to answer Health
REBUILD = "call LoadModel to rebuild the group"


def forwarded(method):
    """Decorate a servicer RPC that a loaded distributed group serves (through the rank-0 child):
    the request message is forwarded as is."""
    name = method.__name__
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self, request, context):
            if self.host.distributed.routes:
                async for reply in self.host.distributed.stream(name, request):
                    yield reply
                return
            async for reply in method(self, request, context):
                yield reply

        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        if self.host.distributed.routes:
            return await self.host.distributed.call(name, request)
        return await method(self, request, context)

    return unary


class Child:
    """The rank-0 server process, a gRPC stub to it, and what its stderr says (its log goes on to
    ours; marker lines give its phase and, when it ends itself, the reason)."""

    def __init__(self, proc, addr: str):
        import grpc

        from mlxbackend.proto import backend_pb2_grpc as pb_grpc

        self.proc, self.addr = proc, addr
        self.channel = grpc.aio.insecure_channel(
            addr,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.max_receive_message_length", MAX_MESSAGE),
            ],
        )
        self.stub = pb_grpc.BackendStub(self.channel)
        self.stopping = False
        self.phase, self.since = "", time.monotonic()
        self.reason = ""  # why rank 0 ended itself (its watchdog), if it did
        self.if_silent = ""  # the reason to give if its faulthandler dead-man's switch fires
        self._stopped = None
        self.reader = asyncio.ensure_future(self._read(proc.stderr))

    @classmethod
    async def start(cls, env: dict) -> "Child":
        import grpc

        from mlxbackend.proto import backend_pb2 as pb

        addr = f"127.0.0.1:{free_port()}"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mlxbackend",
            "serve",
            "--addr",
            addr,
            env=env,
            stderr=asyncio.subprocess.PIPE,
            limit=1 << 20,
        )
        child = cls(proc, addr)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.returncode is not None:
                raise GroupBroken(f"the rank-0 process exited at start (code {proc.returncode})")
            try:
                await child.stub.Health(pb.HealthMessage(), timeout=1, metadata=auth())
                return child
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    await child.stop()
                    raise GroupBroken(
                        f"the rank-0 process did not answer within {START_TIMEOUT:.0f} s"
                    ) from None
                await asyncio.sleep(0.1)

    async def _read(self, stream):
        from mlxbackend.distributed.rank0 import IF_SILENT, PHASE, REASON, SILENT_HEADER

        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the buffer: pass it on in pieces
                raw = await stream.read(1 << 16)
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith(PHASE):
                self.phase, self.since = line[len(PHASE) :].strip(), time.monotonic()
                continue
            if line.startswith(IF_SILENT):
                self.if_silent = line[len(IF_SILENT) :].strip()
                continue
            if line.startswith(REASON):
                self.reason = line[len(REASON) :].strip()
                line = f"mlxbackend rank 0: {self.reason}"
            elif line.startswith(SILENT_HEADER) and self.if_silent and not self.reason:
                self.reason = (
                    self.if_silent
                )  # faulthandler's dead-man's switch fired; its stack dump follows
                print(f"mlxbackend rank 0: {self.reason}", file=sys.stderr, flush=True)
            print(line, file=sys.stderr, flush=True)

    async def load(self, request, settings):
        """The child's LoadModel, under the init and load deadlines (rank 0 cannot keep them: the
        ring backend holds the GIL while it waits for a missing rank)."""
        call = asyncio.ensure_future(self.stub.LoadModel(request, metadata=auth()))
        try:
            while True:
                done, _ = await asyncio.wait([call], timeout=0.25)
                if done:
                    return call.result()
                waited = time.monotonic() - self.since
                if self.phase == "forming" and waited > settings.init_timeout:
                    raise GroupBroken(settings.not_formed())
                if self.phase == "loading" and waited > settings.load_timeout:
                    raise GroupBroken(
                        f"loading the distributed model took longer than {settings.load_timeout:g} s "
                        "(distributed_load_timeout)"
                    )
        finally:
            call.cancel()

    async def ended(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the process to end and its last words to be read."""
        try:
            await asyncio.wait_for(asyncio.shield(self.reader), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def stop(self, grace: float = 5.0):
        """SIGTERM, SIGKILL after `grace` s. Idempotent; returns an awaitable that a cancelled
        caller does not cancel."""
        if self._stopped is None:
            self.stopping = True
            self._stopped = asyncio.ensure_future(self._stop(grace))
        return asyncio.shield(self._stopped)

    async def _stop(self, grace: float):
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        try:
            await asyncio.wait_for(self.channel.close(), 2)
        except Exception:
            pass
        await self.ended(2)


class DistributedGroup:
    def __init__(self, host):
        self.host = host  # host.ModelHost: its worker and text engine serve rank 0's shard
        self.role = os.environ.get(ROLE_ENV, "parent")
        self.child: Child | None = None  # parent: the running rank-0 server
        self.error = ""  # parent: why the group is broken ("" = fine)
        self.memory: dict = {}  # parent: the last per-rank breakdown the child reported
        self.settings = None
        self.loading = False
        self.model = None  # child: the DistributedModel
        self.pinger = None

    # -- routing -----------------------------------------------------------------------------
    def wanted(self, options: dict) -> bool:
        return group_settings.wanted(options)

    @property
    def routes(self) -> bool:
        """Parent: text RPCs go to the group (or fail with the reason it broke)."""
        return self.role == "parent" and (self.child is not None or bool(self.error))

    @property
    def engaged(self) -> bool:
        """Status is the group's: a group is loading, loaded or broken."""
        return self.loading or self.routes or (self.role == "rank0" and self.model is not None)

    # -- LoadModel / Free --------------------------------------------------------------------
    async def load(self, request, options: dict):
        from mlxbackend.proto import backend_pb2 as pb

        settings = await asyncio.to_thread(validate, request, options)
        if self.role == "rank0":
            return await self._load_rank0(request, options, settings)
        await self.free()  # the host has emptied its slot already
        self.loading = True
        root = str(Path(__file__).resolve().parents[2])
        env = {
            **os.environ,
            **settings.rank_env(0),
            ROLE_ENV: "rank0",
            "LOCALAI_BACKEND_PARENT_WATCH": "true",
            "LOCALAI_BACKEND_PARENT_WATCH_INTERVAL": "500ms",
            "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p),
        }
        child = None
        try:
            child = await Child.start(env)
            reply = await child.load(request, settings)
        except Exception as exc:
            if child is not None:
                await child.stop(grace=2)
            raise remote_error(exc) from None
        finally:
            self.loading = False
        if not reply.success:
            await child.stop()
            raise RemoteError("INTERNAL", reply.message)
        self.child, self.error, self.settings = child, "", settings
        asyncio.ensure_future(self._monitor(child))
        await self.status()  # first per-rank memory
        return pb.Result(success=True, message=reply.message)

    async def _load_rank0(self, request, options: dict, settings):
        from mlxbackend.distributed import rank0
        from mlxbackend.proto import backend_pb2 as pb

        spec = LoadSpec(
            model=request.Model,
            model_file=request.ModelFile,
            model_path=request.ModelPath,
            context_size=request.ContextSize,
            trust_remote_code=request.TrustRemoteCode,
            options=options,
        )
        self.loading = True
        try:
            tm = await self.host.worker.run(rank0.load, spec, settings)
        finally:
            self.loading = False
        self.host.text.install(tm)
        self.model, self.settings = tm.model, settings
        self.pinger = asyncio.ensure_future(rank0.pinger(self.host.worker, tm.model, settings))
        shard = tm.model.shard
        return pb.Result(
            success=True,
            message=(
                f"MLX model loaded successfully: {tm.path} (distributed, {settings.mode} over {settings.size} ranks "
                f"via {settings.backend}; rank 0 holds {shard.describe()})"
            ),
        )

    async def free(self):
        """Free: end the group (workers go back to waiting), forget a broken one."""
        if self.role == "rank0":
            model, self.model = self.model, None
            if model is not None:
                await self.host.worker.run(model.shutdown)
            return
        child, self.child, self.error, self.memory = self.child, None, "", {}
        if child is not None:
            try:
                await child.stub.Free(group_pb().HealthMessage(), timeout=10, metadata=auth())
            except (Exception, asyncio.CancelledError) as exc:
                if ours(exc):
                    raise
            await child.stop()

    # -- requests ----------------------------------------------------------------------------
    async def call(self, name: str, request):
        child = self._child()
        try:
            return await getattr(child.stub, name)(request, metadata=auth())
        except (Exception, asyncio.CancelledError) as exc:
            if ours(exc):
                raise
            raise await self._failed(child, exc) from None

    async def stream(self, name: str, request):
        child = self._child()
        call = getattr(child.stub, name)(request, metadata=auth())
        try:
            async for reply in call:
                yield reply
        except (Exception, asyncio.CancelledError) as exc:
            call.cancel()
            if ours(exc):
                raise
            raise await self._failed(child, exc) from None

    def _child(self) -> Child:
        if self.child is None:
            raise GroupBroken(f"{self.error or 'distributed group broken'}; {REBUILD}")
        return self.child

    async def _failed(self, child: Child, exc: BaseException) -> Exception:
        """An error from the child: its own status code, or a broken group (UNAVAILABLE)."""
        import grpc

        if isinstance(exc, asyncio.CancelledError):
            # not our task's cancellation: grpc.aio cancels the calls of a channel we closed, which
            # _monitor does when the child ends (a race with the call's own UNAVAILABLE)
            details = "the connection to the rank-0 process was closed"
        elif not isinstance(exc, grpc.aio.AioRpcError):
            return exc
        elif exc.code() != grpc.StatusCode.UNAVAILABLE:
            return RemoteError(exc.code().name, exc.details() or "")
        else:
            details = exc.details() or ""
        if (
            "distributed group broken" not in details
        ):  # the child is gone: give it a moment to leave its reason
            await child.ended(1.0)
        reason = child.reason or (details if "distributed group broken" in details else "")
        if not reason:
            code = child.proc.returncode
            reason = (
                f"the rank-0 process exited (code {code})"
                if code is not None
                else f"the rank-0 process failed ({details})"
            )
            reason = f"distributed group broken: {reason}"
        reason = reason.split("; " + REBUILD)[0]
        self._broken(child, reason)
        return GroupBroken(f"{reason}; {REBUILD}")

    def _broken(self, child: Child, reason: str):
        if self.child is child:
            log.warning("%s", reason)
            self.child, self.error = None, reason
            self.memory["group_broken"] = 1
        child.stop(grace=2)  # in the background: the caller reports the error at once

    async def _monitor(self, child: Child):
        """Notice a rank-0 process that ends on its own (watchdog, group lost while idle)."""
        code = await child.proc.wait()
        await child.ended(1.0)
        if not child.stopping and self.child is child:
            reason = (
                child.reason or f"distributed group broken: the rank-0 process exited (code {code})"
            )
            self._broken(child, reason)

    # -- Status ------------------------------------------------------------------------------
    async def status(self):
        pb = group_pb()
        if self.role == "rank0":
            return self._rank0_status()
        if self.loading:
            return pb.StatusResponse(state=pb.StatusResponse.BUSY)
        if self.child is not None:
            try:
                reply = await self.child.stub.Status(pb.HealthMessage(), timeout=3, metadata=auth())
                self.memory = dict(reply.memory.breakdown)
                if reply.state != pb.StatusResponse.ERROR:
                    return reply
                self._broken(
                    self.child,
                    self.child.reason
                    or "distributed group broken: a rank died or became unreachable",
                )
            except (Exception, asyncio.CancelledError) as exc:
                if ours(exc):
                    raise
                log.info(
                    "Status of the rank-0 process failed: %s",
                    exc.details() if hasattr(exc, "details") else exc,
                )
                if self.child is not None:  # busy or slow: report the last numbers
                    return _memory_status(pb.StatusResponse.BUSY, self.memory)
        return _memory_status(pb.StatusResponse.ERROR, {**self.memory, "group_broken": 1})

    def _rank0_status(self):
        pb = group_pb()
        model = self.model
        if model is None:
            return pb.StatusResponse(
                state=pb.StatusResponse.BUSY if self.loading else pb.StatusResponse.UNINITIALIZED
            )
        breakdown = {**model.rank_memory(), "ranks": model.channel.size}
        if model.broken:
            state = pb.StatusResponse.ERROR
        else:
            state = pb.StatusResponse.BUSY if self.host.worker.busy() else pb.StatusResponse.READY
        return _memory_status(state, breakdown)


def ours(exc: BaseException) -> bool:
    """A cancellation aimed at this task (our client went away) — not the CancelledError that
    grpc.aio raises in every call on a channel we closed because the child ended (_monitor), which
    must become an error status: re-raised, it would leave the client waiting for its deadline."""
    return isinstance(exc, asyncio.CancelledError) and asyncio.current_task().cancelling() > 0


def _memory_status(state, breakdown: dict):
    pb = group_pb()
    total = sum(v for k, v in breakdown.items() if k.endswith("_active"))
    return pb.StatusResponse(
        state=state, memory=pb.MemoryUsageData(total=total, breakdown=breakdown)
    )


def validate(request, options: dict):
    """Everything that can be checked before a process starts (runs in a thread)."""
    from mlxbackend.distributed.shard import check_tensor, split_layers

    settings = group_settings.from_options(options)
    if request.LoraAdapter or request.LoraAdapters or request.DraftModel:
        raise InvalidInput("LoRA adapters and draft models are not supported in distributed mode")
    path = model_dir(request.Model, request.ModelFile, request.ModelPath)
    config = read_config(path)
    text = config.get("text_config", config)
    if settings.mode == "tensor":
        check_tensor(config, settings.size)
        from mlx_lm.utils import _get_classes

        try:
            model_class, _ = _get_classes(config)
        except Exception as exc:
            raise InvalidInput(
                f"unsupported model type {config.get('model_type')!r}: {exc}"
            ) from None
        if not hasattr(model_class, "shard"):
            raise InvalidInput(
                f"model type {config.get('model_type')!r} has no tensor-parallel sharding in mlx-lm; "
                "use distributed_mode:pipeline"
            )
    elif isinstance(text.get("num_hidden_layers"), int):
        split_layers(text["num_hidden_layers"], settings.size, settings.split)
    return settings


def remote_error(exc: BaseException) -> Exception:
    import grpc

    if isinstance(exc, grpc.aio.AioRpcError):
        return RemoteError(exc.code().name, exc.details() or "")
    return exc


def auth():
    return auth_metadata()


def group_pb():
    from mlxbackend.proto import backend_pb2 as pb

    return pb


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
