"""Bounded KV: Options max_kv_size (a rotating KV cache, LocalAI's MLX backends' key) solo and in
the continuous batch; ContextSize 0 → the largest context that fits in memory with the KV type."""

import threading

import grpc
import pytest

from mlxbackend.proto import backend_pb2 as pb
from tests.conftest import Server


def test_rotating_kv_cache(tiny_dir):
    """A window of 64 tokens: generation runs past it (the cache rotates), concurrent requests
    equal their solo runs, a prompt longer than the window is refused, reservations come back."""
    srv = Server()
    try:
        reply = srv.stub.LoadModel(
            pb.ModelOptions(Model=str(tiny_dir), Options=["max_kv_size:64"]), timeout=120
        )
        assert "rotating KV cache of 64 tokens" in reply.message, reply.message
        prompts = ["Hello", "The baker", "Once upon a time", "A dragon"]

        def ask(prompt):
            r = srv.stub.Predict(
                pb.PredictOptions(Prompt=prompt, Tokens=100, Temperature=0, IgnoreEOS=True),
                timeout=300,
            )
            return r.tokens, r.message

        solo = [ask(p) for p in prompts]
        assert all(tokens == 100 for tokens, _ in solo)  # 100 > 64: the window rotated
        from mlxbackend.text import memory
        from mlxbackend.text.models import read_config

        config = read_config(tiny_dir)
        window = memory.kv_bytes(config, 64, memory.dtype_bytes(config))
        stream = srv.stub.PredictStream(
            pb.PredictOptions(Prompt="Hello", Tokens=100, Temperature=0, IgnoreEOS=True),
            timeout=300,
        )
        live, seen = None, 0
        for reply in stream:
            seen += reply.tokens or 1
            if live is None and seen >= 90:  # 90 tokens in: the live KV is the window's
                live = srv.stub.Status(pb.HealthMessage()).memory.breakdown["kv_cache"]
        assert live is not None and 0 < live <= window, (live, window, seen)
        got = [None] * len(prompts)
        threads = [
            threading.Thread(target=lambda i=i: got.__setitem__(i, ask(prompts[i])))
            for i in range(len(prompts))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert got == solo
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.Predict(pb.PredictOptions(Prompt="word " * 200, Tokens=4), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_kv_size 64" in err.value.details()
        status = srv.stub.Status(pb.HealthMessage()).memory.breakdown
        assert status["max_kv_size"] == 64 and status["kv_reserved"] == 0
        for options, words in (
            (["max_kv_size:-5"], "max_kv_size"),
            (["max_kv_size:abc"], "max_kv_size"),
            (["max_kv_size:8"], "too small"),
        ):
            with pytest.raises(grpc.RpcError) as err:
                srv.stub.LoadModel(pb.ModelOptions(Model=str(tiny_dir), Options=options))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert words in err.value.details(), err.value.details()
        assert srv.healthy()
    finally:
        srv.stop()


def test_rotating_and_quantized_kv_are_refused_together(smollm2_dir, server):
    with pytest.raises(grpc.RpcError) as err:
        server.stub.LoadModel(
            pb.ModelOptions(
                Model=str(smollm2_dir), CacheTypeKey="q8_0", Options=["max_kv_size:128"]
            ),
            timeout=120,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "choose one" in err.value.details()


def test_context_size_zero_is_what_fits(tiny_dir, monkeypatch):
    """ContextSize 0: the model's own context when memory allows, else the most tokens whose KV
    fits after the weights (fewer with a float KV than with a quantized one); too little room
    is RESOURCE_EXHAUSTED."""
    from mlxbackend.errors import OutOfMemory
    from mlxbackend.text import memory
    from mlxbackend.text.kv_quant import KvType
    from mlxbackend.text.models import read_config

    config = read_config(tiny_dir)
    weights = memory.weights_bytes(tiny_dir)
    per_token = memory.kv_bytes(config, 1, memory.dtype_bytes(config))
    free = (weights + 1000 * per_token) / memory.HEADROOM + 1
    monkeypatch.setattr(memory, "available_bytes", lambda: int(free))
    assert memory.largest_context(tiny_dir, config, 100_000) == 1000
    assert memory.largest_context(tiny_dir, config, 512) == 512  # the model's own limit
    # 8-bit keys and values in groups of 32 take 1.25 of float32's 4 bytes, and the last 128
    # positions are kept in float besides (Options kv_window): (1000 - 128) * 4 / 1.25
    assert memory.largest_context(tiny_dir, config, 100_000, KvType(8, 8, 32)) == 2790
    assert memory.largest_context(tiny_dir, config, 100_000, KvType(8, 8, 32, window=0)) == 3200
    monkeypatch.setattr(memory, "available_bytes", lambda: weights)
    with pytest.raises(OutOfMemory, match="quantized KV cache"):
        memory.largest_context(tiny_dir, config, 100_000)
