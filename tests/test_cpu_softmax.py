"""Options cpu_softmax:numpy (text/cpu_softmax.py): attention with the softmax in NumPy equals
MLX's for every mask kind, steps aside where it cannot act, acts only inside the prefills of a
model that enabled it, keeps SmolLM2's predictions, and is set through LoadModel of a real
server."""

import grpc
import mlx.core as mx
import numpy as np
import pytest

from mlxbackend.errors import InvalidInput
from mlxbackend.proto import backend_pb2 as pb
from mlxbackend.text import cpu_softmax
from mlxbackend.text.cpu_softmax import mlx_attention, numpy_softmax_attention
from tests.conftest import Server

MLX_ATTENTION = mlx_attention()


def masks(batch: int, heads: int, length: int, keys: int) -> list:
    edge = mx.ones((batch, 1, length, keys), dtype=mx.bool_)
    edge[..., 0, :] = False  # a row that sees no key (left padding)
    return [
        None,
        "causal",
        mx.random.uniform(shape=(length, keys)) > 0.3,
        mx.random.uniform(shape=(batch, 1, length, keys)) > 0.3,
        mx.random.uniform(shape=(batch, heads, length, keys)) > 0.3,
        mx.random.normal((batch, 1, length, keys)),
        mx.random.normal((heads, length, keys)),
        edge,
    ]


@pytest.mark.parametrize(
    "batch, heads, kv_heads, length, keys", [(1, 9, 3, 7, 20), (2, 4, 4, 5, 5), (2, 8, 2, 6, 11)]
)
def test_equals_mlx_attention(batch, heads, kv_heads, length, keys):
    mx.random.seed(length)
    q = mx.random.normal((batch, heads, length, 16))
    k = mx.random.normal((batch, kv_heads, keys, 16))
    v = mx.random.normal((batch, kv_heads, keys, 16))
    for mask in masks(batch, heads, length, keys):
        want = MLX_ATTENTION(q, k, v, scale=0.25, mask=mask)
        got = numpy_softmax_attention(q, k, v, scale=0.25, mask=mask)
        assert got.shape == want.shape and mx.abs(got - want).max().item() < 1e-5, mask


def test_steps_aside_where_it_cannot_act():
    q, k, v = (mx.random.normal((1, 4, 6, 8)) for _ in range(3))
    want = MLX_ATTENTION(q, k, v, scale=0.3, mask="causal")

    def attend(q):
        return numpy_softmax_attention(q, k, v, scale=0.3, mask="causal")

    assert mx.allclose(mx.compile(attend)(q), want, atol=1e-6)  # traced: MLX's
    half = [x.astype(mx.float16) for x in (q, k, v)]  # other dtypes and one query: MLX's
    assert numpy_softmax_attention(*half, scale=0.3).dtype == mx.float16
    one = numpy_softmax_attention(q[:, :, :1], k, v, scale=0.3)
    assert mx.allclose(one, MLX_ATTENTION(q[:, :, :1], k, v, scale=0.3))


def test_enable_and_scope():
    """Only a model that enabled it gets it, only inside `scope`; a bad value is refused."""

    class Model:  # any object weak references can hold
        pass

    on, off = Model(), Model()
    assert cpu_softmax.enable(on, {"cpu_softmax": "numpy"})
    assert not cpu_softmax.enable(off, {})
    with pytest.raises(InvalidInput, match="cpu_softmax"):
        cpu_softmax.enable(off, {"cpu_softmax": "fast"})
    with cpu_softmax.scope(off):
        assert mx.fast.scaled_dot_product_attention is MLX_ATTENTION
    with cpu_softmax.scope(on):
        assert mx.fast.scaled_dot_product_attention is numpy_softmax_attention
    assert mx.fast.scaled_dot_product_attention is MLX_ATTENTION
    with pytest.raises(RuntimeError), cpu_softmax.scope(on):
        raise RuntimeError("a failed forward pass")
    assert mx.fast.scaled_dot_product_attention is MLX_ATTENTION
    assert not cpu_softmax.enable(on, {"cpu_softmax": "mlx"})
    with cpu_softmax.scope(on):
        assert mx.fast.scaled_dot_product_attention is MLX_ATTENTION


def test_smollm2_teacher_forced(smollm2_dir):
    """1,024 tokens of text in chunks of 256: the top-1 token at every position is MLX's."""
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    from tests.test_kv_quant import long_text

    model, tokenizer = load(str(smollm2_dir))
    tokens = tokenizer.encode(long_text())[:1024]

    def run():
        cache, out = make_prompt_cache(model), []
        for start in range(0, len(tokens), 256):
            out.append(model(mx.array(tokens[start : start + 256])[None], cache=cache)[0])
        return mx.concatenate(out)

    want = run()
    mx.fast.scaled_dot_product_attention = numpy_softmax_attention
    try:
        got = run()
    finally:
        mx.fast.scaled_dot_product_attention = MLX_ATTENTION
    assert float(mx.abs(got - want).max()) < 1e-2
    assert np.array_equal(np.array(got.argmax(-1)), np.array(want.argmax(-1)))


def test_server_option(smollm2_dir):
    srv = Server()
    try:
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.LoadModel(
                pb.ModelOptions(Model=str(smollm2_dir), Options=["cpu_softmax:fast"]), timeout=300
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        ask = pb.PredictOptions(Prompt="The capital of France is", Tokens=12, Temperature=0)
        plain = srv.stub.LoadModel(pb.ModelOptions(Model=str(smollm2_dir)), timeout=300)
        assert plain.success and "cpu_softmax" not in plain.message
        want = srv.stub.Predict(ask, timeout=120).message
        reply = srv.stub.LoadModel(
            pb.ModelOptions(Model=str(smollm2_dir), Options=["cpu_softmax:numpy"]), timeout=300
        )
        assert "attention softmax in NumPy (cpu_softmax)" in reply.message, reply.message
        assert srv.stub.Predict(ask, timeout=120).message == want
        assert srv.healthy()
    finally:
        srv.stop()
