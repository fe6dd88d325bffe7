"""Process contract: launch forms, auth, signals, parent watch, LoadModel resolution, Free,
adapters and draft models at load, reloading under load."""

import json
import os
import signal
import subprocess
import threading
import time

import grpc
import pytest

from mlxbackend.proto import backend_pb2 as pb
from tests import tiny_model as tm
from tests.conftest import Server


def test_addr_equals_form_and_job_process_load(tiny_dir):
    srv = Server(addr_form="equals")
    try:
        reply = srv.stub.LoadModel(pb.ModelOptions(Model="mlx"))
        assert reply.success
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.Predict(pb.PredictOptions(Prompt="hi"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "model not loaded" in err.value.details()
    finally:
        srv.stop()


def test_every_rpc_answers(server):
    """No RPC crashes or hangs: each answers OK or a status naming what is missing."""
    from mlxbackend.proto import backend_pb2_grpc  # noqa: F401
    from mlxbackend.server import SERVICE

    channel = grpc.insecure_channel(server.addr)
    for method in SERVICE.methods:
        request_cls = getattr(pb, method.input_type.name)
        path = f"/backend.Backend/{method.name}"
        kind = channel.unary_stream if method.server_streaming else channel.unary_unary
        call = kind(
            path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=lambda b: b,
        )
        try:
            result = call(request_cls(), timeout=10)
            if method.server_streaming:
                list(result)
        except grpc.RpcError as exc:
            assert exc.code() in (
                grpc.StatusCode.UNIMPLEMENTED,
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.INVALID_ARGUMENT,
            ), (method.name, exc.code(), exc.details())
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                assert "missing capability" in exc.details()
    assert server.healthy()


def test_garbage_bytes_rejected(server):
    channel = grpc.insecure_channel(server.addr)
    predict = channel.unary_unary(
        "/backend.Backend/Predict", request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.RpcError) as err:
        predict(b"\xff\xff\xff\xff\x0f", timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert server.healthy()


def test_missing_model_not_found(server, tmp_path):
    with pytest.raises(grpc.RpcError) as err:
        server.stub.LoadModel(
            pb.ModelOptions(
                Model="nope/absent-model",
                ModelFile=str(tmp_path / "absent"),
                ModelPath=str(tmp_path),
            )
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    details = err.value.details()
    assert (
        str(tmp_path / "absent") in details
        and "HF cache" in details
        and "nope/absent-model" in details
    )
    assert server.healthy()


def test_auth_token():
    srv = Server(env={"LOCALAI_GRPC_AUTH_TOKEN": "s3cret"})
    try:
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.Status(pb.HealthMessage())
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.Status(pb.HealthMessage(), metadata=[("authorization", "Bearer wrong")])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = srv.stub.Health(pb.HealthMessage(), metadata=[("authorization", "Bearer s3cret")])
        assert ok.message == b"OK"
    finally:
        srv.stop()


def test_sigterm_during_generation_exits_cleanly(trained_dir):
    srv = Server()
    srv.stub.LoadModel(pb.ModelOptions(Model=str(trained_dir), ContextSize=20000))
    stream = srv.stub.PredictStream(pb.PredictOptions(Prompt=tm.COMPLETION_PROMPT, IgnoreEOS=True))
    next(iter(stream))
    start = time.time()
    os.killpg(srv.proc.pid, signal.SIGTERM)
    assert srv.proc.wait(15) == 0
    assert time.time() - start < 10
    srv.log.close()


def test_parent_death_exits(tmp_path):
    """LocalAI SIGKILLed: its child notices the new parent and exits."""
    srv = Server(parent_cmd=lambda cmd: ["bash", "-c", " ".join(cmd) + " & wait"])
    try:
        child = int(subprocess.check_output(["pgrep", "-P", str(srv.proc.pid)]).split()[0])
        os.kill(
            srv.proc.pid, signal.SIGKILL
        )  # bash (the "parent") dies, the server does not get a signal
        deadline = time.time() + 5
        while time.time() < deadline and os.path.exists(f"/proc/{child}") and not _zombie(child):
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{child}") or _zombie(child), "server outlived its parent"
    finally:
        srv.stop()


def _zombie(pid):
    try:
        return open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    except OSError:
        return True


def greedy(stub, n=40):
    return stub.Predict(pb.PredictOptions(Prompt=tm.COMPLETION_PROMPT, Tokens=n)).message


def make_adapter(model_dir, out_dir, seed=1):
    """A random LoRA adapter in mlx-lm's format (adapter_config.json + adapters.safetensors)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    model, _ = load(str(model_dir))
    model.freeze()
    params = {"rank": 4, "dropout": 0.0, "scale": 20.0}
    linear_to_lora_layers(model, 2, params)
    mx.random.seed(seed)
    weights = {
        k: mx.random.normal(v.shape) * 0.5 for k, v in tree_flatten(model.trainable_parameters())
    }
    out_dir.mkdir(parents=True)
    mx.save_safetensors(str(out_dir / "adapters.safetensors"), weights)
    (out_dir / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": params})
    )


def test_lora_adapters_at_load(trained_dir, tmp_path):
    make_adapter(trained_dir, tmp_path / "adapters" / "a1")
    srv = Server()
    try:
        models = str(trained_dir.parent)
        srv.stub.LoadModel(pb.ModelOptions(Model=trained_dir.name, ModelPath=models))
        base = greedy(srv.stub)
        # LoraAdapter arrives relative to the models dir; join with ModelPath
        rel = os.path.relpath(tmp_path / "adapters" / "a1", models)
        assert srv.stub.LoadModel(
            pb.ModelOptions(Model=trained_dir.name, ModelPath=models, LoraAdapter=rel)
        ).success
        adapted = greedy(srv.stub)
        assert adapted != base
        srv.stub.LoadModel(
            pb.ModelOptions(
                Model=trained_dir.name, ModelPath=models, LoraAdapters=[rel], LoraScales=[0.0]
            )
        )
        assert greedy(srv.stub) == base  # scale 0 = the base model
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.LoadModel(
                pb.ModelOptions(
                    Model=trained_dir.name, ModelPath=models, LoraAdapter="missing/adapter"
                )
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        srv.stop()


def test_draft_model_same_greedy_output(trained_dir):
    srv = Server()
    try:
        srv.stub.LoadModel(pb.ModelOptions(Model=str(trained_dir)))
        plain = greedy(srv.stub, 150)
        chat_req = pb.PredictOptions(
            Messages=[
                pb.Message(role="user", content=m["content"])
                for m in tm.TOOL_CONVERSATION
                if m["role"] == "user"
            ],
            UseTokenizerTemplate=True,
            Tools=json.dumps(tm.TOOLS),
            Tokens=100,
        )
        plain_chat = srv.stub.Predict(chat_req)
        srv.stub.LoadModel(pb.ModelOptions(Model=str(trained_dir), DraftModel=str(trained_dir)))
        assert greedy(srv.stub, 150) == plain
        drafted = srv.stub.Predict(pb.PredictOptions(**{**_fields(chat_req), "NDraft": 4}))
        assert drafted.message == plain_chat.message
        assert (
            drafted.chat_deltas[0].tool_calls[0].name
            == plain_chat.chat_deltas[0].tool_calls[0].name
        )
        # concurrent requests: the first alone speculates, the others join the batch; same text
        got = {}

        def call(i):
            got[i] = greedy(srv.stub, 150)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(v == plain for v in got.values())
    finally:
        srv.stop()


def _fields(msg):
    return {f.name: v for f, v in msg.ListFields()}


def test_reload_while_request_in_flight(trained_dir, tiny_dir):
    """The host's rule: LoadModel empties the slot first; the request in flight on the replaced
    model ends ABORTED naming the LoadModel, and the next request runs on the new model."""
    srv = Server()
    try:
        srv.stub.LoadModel(pb.ModelOptions(Model=str(trained_dir)))
        result = {}

        def long_request():
            try:
                for _ in srv.stub.PredictStream(
                    pb.PredictOptions(Prompt=tm.COMPLETION_PROMPT, Tokens=2000, IgnoreEOS=True)
                ):
                    result["started"] = True
            except grpc.RpcError as exc:
                result["error"] = exc

        t = threading.Thread(target=long_request)
        t.start()
        deadline = time.time() + 20
        while "started" not in result and time.time() < deadline:
            time.sleep(0.01)
        assert "tiny-random" in srv.stub.LoadModel(pb.ModelOptions(Model=str(tiny_dir))).message
        t.join(20)
        assert not t.is_alive()
        err = result["error"]
        assert err.code() == grpc.StatusCode.ABORTED, err
        assert "replaced by LoadModel" in err.details() and "tiny-random" in err.details()
        assert srv.stub.Predict(pb.PredictOptions(Prompt="Hello", Tokens=4)).tokens > 0
        assert srv.stub.Status(pb.HealthMessage()).state == pb.StatusResponse.READY
    finally:
        srv.stop()


def test_free_returns_memory(smollm2_dir):
    srv = Server()
    try:
        srv.stub.LoadModel(pb.ModelOptions(Model=str(smollm2_dir)))
        srv.stub.Predict(pb.PredictOptions(Prompt="Hello", Tokens=4))
        weights = srv.stub.Status(pb.HealthMessage()).memory.breakdown["weights"]
        loaded = srv.rss()
        assert srv.stub.Free(pb.HealthMessage()).success
        time.sleep(0.5)
        freed = srv.rss()
        print(
            f"weights {weights >> 20} MiB; RSS loaded {loaded >> 20} MiB, after Free {freed >> 20} MiB"
        )
        assert weights > 400 << 20  # 135M float32 parameters
        assert loaded - freed > 0.85 * weights  # the weights really went back to the OS
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.Predict(pb.PredictOptions(Prompt="hi"))
        assert (
            err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            and "model not loaded" in err.value.details()
        )
        assert srv.stub.Status(pb.HealthMessage()).state == pb.StatusResponse.UNINITIALIZED
    finally:
        srv.stop()


def test_options_are_defaults_request_wins(trained_dir):
    srv = Server()
    try:
        srv.stub.LoadModel(
            pb.ModelOptions(Model=str(trained_dir), Options=["enable_thinking:false", "junk"])
        )
        req = pb.PredictOptions(
            Messages=[pb.Message(role="user", content=tm.CHAT_CONVERSATION[0]["content"])],
            UseTokenizerTemplate=True,
            Tokens=60,
        )
        off = srv.stub.Predict(req).chat_deltas[0]
        assert off.reasoning_content == "" and off.content == tm.CHAT_ANSWER
        req.Metadata["enable_thinking"] = "true"
        on = srv.stub.Predict(req).chat_deltas[0]
        assert on.reasoning_content == tm.CHAT_REASONING and on.content == tm.CHAT_ANSWER
    finally:
        srv.stop()


def test_load_gguf_file_directly(tmp_path):
    """A YAML pointing at a .gguf: imported once into <models>/.mlx-cache, then served."""
    import shutil

    from mlxbackend.default_model import bundled_gguf

    shutil.copy(bundled_gguf(), tmp_path / "smol.gguf")
    srv = Server()
    try:
        reply = srv.stub.LoadModel(
            pb.ModelOptions(
                Model="smol.gguf", ModelPath=str(tmp_path), ModelFile=str(tmp_path / "smol.gguf")
            )
        )
        assert reply.success and (tmp_path / ".mlx-cache" / "smol" / "config.json").exists()
        answer = srv.stub.Predict(
            pb.PredictOptions(
                Messages=[pb.Message(role="user", content="What is the capital of France?")],
                UseTokenizerTemplate=True,
                Tokens=20,
            )
        )
        assert "Paris" in answer.message.decode()
    finally:
        srv.stop()


def test_model_that_cannot_fit_is_refused(trained_dir, server):
    with pytest.raises(grpc.RpcError) as err:
        server.stub.LoadModel(pb.ModelOptions(Model=str(trained_dir), ContextSize=2_000_000_000))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "ContextSize" in err.value.details() and "GiB" in err.value.details()
    assert server.healthy()
    assert server.stub.LoadModel(pb.ModelOptions(Model=str(trained_dir), ContextSize=4096)).success


def test_wired_memory_limit(tiny_dir, server):
    """Options wired_limit_bytes: checked at LoadModel; Status reports the limit in force and
    whether Metal is there (without it nothing is wired: 0, whatever the Options say)."""
    for bad in ("-1", "lots", "1.5"):
        with pytest.raises(grpc.RpcError) as err:
            server.stub.LoadModel(
                pb.ModelOptions(Model=str(tiny_dir), Options=[f"wired_limit_bytes:{bad}"])
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "wired_limit_bytes" in err.value.details()
    assert server.healthy()
    server.stub.LoadModel(pb.ModelOptions(Model=str(tiny_dir), Options=["wired_limit_bytes:0"]))
    status = server.stub.Status(pb.HealthMessage()).memory.breakdown
    import mlx.core as mx

    metal = mx.metal.is_available()
    assert status["metal"] == int(metal) and status["wired_limit"] == 0
    server.stub.LoadModel(pb.ModelOptions(Model=str(tiny_dir)))
    status = server.stub.Status(pb.HealthMessage()).memory.breakdown
    most = mx.device_info().get("max_recommended_working_set_size", 0) if metal else 0
    assert status["wired_limit"] == most  # mlx-lm's choice on a Mac; 0 here


def test_media_are_refused_not_dropped(trained_dir):
    """Media sent to a text-only model: INVALID_ARGUMENT naming the model and what was sent."""
    srv = Server()
    try:
        srv.stub.LoadModel(pb.ModelOptions(Model=str(trained_dir)))
        for field in ("Images", "Videos", "Audios"):
            with pytest.raises(grpc.RpcError) as err:
                srv.stub.Predict(
                    pb.PredictOptions(Prompt="What is this?", Tokens=4, **{field: ["aGVsbG8="]})
                )
            details = err.value.details()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details
            assert trained_dir.name in details and f"1 {field.lower()[:-1]}" in details
        assert srv.stub.Predict(pb.PredictOptions(Prompt="Hello", Tokens=4)).tokens > 0
    finally:
        srv.stop()
