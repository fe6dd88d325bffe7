"""Warm prompts (Options warm_prompt[.name]): prefilled into the prefix cache at LoadModel, so the
first chat sharing the system prompt and tools computes only what is new, with the same reply
as a server without them; Status counts prompt tokens served from RAM and computed."""

import json

import grpc
import pytest

from mlxbackend.proto import backend_pb2 as pb
from tests import tiny_model as tm
from tests.conftest import Server

SYSTEM = {"role": "system", "content": "You are a careful assistant for bakers. " * 12}


def ask(srv, **kw):
    msgs = [SYSTEM, {"role": "user", "content": "What is the capital of France?"}]
    reply = srv.stub.Predict(
        pb.PredictOptions(
            Messages=[pb.Message(role=m["role"], content=m["content"]) for m in msgs],
            UseTokenizerTemplate=True,
            Tools=json.dumps(tm.TOOLS),
            Tokens=12,
            Temperature=0,
            Metadata={"enable_thinking": "false"},
            **kw,
        ),
        timeout=120,
    )
    prefilled = srv.stub.GetMetrics(pb.MetricsRequest()).prompt_tokens_processed
    return reply, prefilled


def test_warm_prompt_serves_the_first_chat(trained_dir, tmp_path):
    warm = tmp_path / "agent.json"
    warm.write_text(json.dumps({"messages": [SYSTEM], "tools": tm.TOOLS}))
    plain, warmed = Server(), Server()
    try:
        plain.stub.LoadModel(pb.ModelOptions(Model=str(trained_dir)), timeout=120)
        message = warmed.stub.LoadModel(
            pb.ModelOptions(
                Model=str(trained_dir),
                Options=[f"warm_prompt.agent:{warm}", "warm_prompt:Once upon a time"],
            ),
            timeout=120,
        ).message
        assert "2 warm prompts" in message, message
        status = warmed.stub.Status(pb.HealthMessage()).memory.breakdown
        assert status["warm_prompt_tokens"] > 100 and status["prompt_cache_entries"] == 2
        reference, computed_cold = ask(plain)
        reply, computed = ask(warmed)
        assert reply.message == reference.message and reply.prompt_tokens == reference.prompt_tokens
        assert computed_cold == reference.prompt_tokens
        assert computed < reference.prompt_tokens - 100, (computed, reference.prompt_tokens)
        served = warmed.stub.Status(pb.HealthMessage()).memory.breakdown
        assert served["prompt_tokens_total"] == reply.prompt_tokens
        assert served["prompt_tokens_computed"] == computed
        assert served["prompt_tokens_from_ram"] == reply.prompt_tokens - computed
        assert served["prompt_cache_hits"] == served["requests_finished"] == 1
        # a raw text warm prompt serves a raw prompt that starts with it
        warmed.stub.Predict(pb.PredictOptions(Prompt="Once upon a time there", Tokens=2))
        assert warmed.stub.GetMetrics(pb.MetricsRequest()).prompt_tokens_processed <= 3
    finally:
        plain.stop()
        warmed.stop()


def test_bad_warm_prompts(trained_dir, tmp_path, server):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"no messages": 1}')
    for option, words in (
        (f"warm_prompt:{tmp_path / 'missing.txt'}", "not found"),
        (f"warm_prompt.x:{bad_json}", "messages"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            server.stub.LoadModel(
                pb.ModelOptions(Model=str(trained_dir), Options=[option]), timeout=120
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in err.value.details(), err.value.details()
    assert server.healthy()
