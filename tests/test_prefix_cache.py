"""Prompt (prefix) cache: reuse across requests, identical outputs, bounded, can be disabled."""

import json

from mlxbackend.proto import backend_pb2 as pb
from tests import tiny_model as tm
from tests.conftest import Server


def turn(history, **kw):
    msgs = [pb.Message(role=m["role"], content=m["content"]) for m in history]
    return pb.PredictOptions(
        Messages=msgs,
        UseTokenizerTemplate=True,
        Tokens=80,
        Metadata={"enable_thinking": "false"},
        **kw,
    )


HISTORY = [
    {"role": "system", "content": "You are a helpful assistant. " * 20},
    {"role": "user", "content": "What is the capital of France?"},
]


def conversation(stub):
    """Two turns; returns replies and the prefilled prompt tokens of each (GetMetrics)."""
    first = stub.Predict(turn(HISTORY))
    prefilled_1 = stub.GetMetrics(pb.MetricsRequest()).prompt_tokens_processed
    follow = HISTORY + [
        {"role": "assistant", "content": first.chat_deltas[0].content},
        {"role": "user", "content": "And the weather in Paris?"},
    ]
    second = stub.Predict(turn(follow))
    prefilled_2 = stub.GetMetrics(pb.MetricsRequest()).prompt_tokens_processed
    again = stub.Predict(turn(follow))
    prefilled_3 = stub.GetMetrics(pb.MetricsRequest()).prompt_tokens_processed
    return [first, second, again], [prefilled_1, prefilled_2, prefilled_3]


def test_prefix_reuse_and_identical_outputs(trained_dir):
    cached_srv, plain_srv = Server(), Server()
    try:
        cached_srv.stub.LoadModel(pb.ModelOptions(Model=str(trained_dir)))
        plain_srv.stub.LoadModel(
            pb.ModelOptions(Model=str(trained_dir), Options=["prompt_cache:false"])
        )
        cached, prefilled = conversation(cached_srv.stub)
        plain, plain_prefilled = conversation(plain_srv.stub)
        assert [r.message for r in cached] == [r.message for r in plain]
        assert [r.prompt_tokens for r in cached] == [r.prompt_tokens for r in plain]  # full counts
        assert plain_prefilled == [r.prompt_tokens for r in plain]
        # turn 2 prefills only its new turn; the exact repeat re-feeds one token
        assert prefilled[0] == cached[0].prompt_tokens
        assert prefilled[1] < cached[1].prompt_tokens - cached[0].prompt_tokens + 10
        assert prefilled[2] == 1
        status = cached_srv.stub.Status(pb.HealthMessage())
        assert status.memory.breakdown["prompt_cache"] > 0
        assert status.memory.breakdown["prompt_cache_hit_permille"] == 666  # 2 of 3 requests
        assert 0 < status.memory.breakdown["request_to_prefill_us_last"] < 10_000_000
        assert plain_srv.stub.Status(pb.HealthMessage()).memory.breakdown["prompt_cache"] == 0
    finally:
        cached_srv.stop()
        plain_srv.stop()


def test_cache_bounded_in_bytes(trained_dir):
    srv = Server()
    try:
        srv.stub.LoadModel(
            pb.ModelOptions(Model=str(trained_dir), Options=["prompt_cache_bytes:200000"])
        )
        for i in range(12):
            srv.stub.Predict(
                pb.PredictOptions(Prompt=f"{i} " + tm.COMPLETION_PROMPT * 10, Tokens=40)
            )
        assert 0 < srv.stub.Status(pb.HealthMessage()).memory.breakdown["prompt_cache"] <= 200000
    finally:
        srv.stop()


def test_tool_conversation_cached_equals_uncached(trained_server):
    req = pb.PredictOptions(
        Messages=[pb.Message(role="user", content="What is the weather in Paris?")],
        UseTokenizerTemplate=True,
        Tools=json.dumps(tm.TOOLS),
        Tokens=100,
    )
    first = trained_server.stub.Predict(req)
    second = trained_server.stub.Predict(req)
    assert (
        first.message == second.message
        and second.chat_deltas[0].tool_calls[0].name == "get_weather"
    )


def test_persistent_cache_survives_restart(trained_dir, tmp_path):
    """The SSD tier (tests/test_ssd_cache.py has the rest): a restart reuses whole blocks."""
    options = [f"prompt_cache_dir:{tmp_path / 'kv'}", "prompt_cache_block:16"]
    request = turn(HISTORY)
    first = Server()
    try:
        first.stub.LoadModel(pb.ModelOptions(Model=str(trained_dir), Options=options))
        original = first.stub.Predict(request)
    finally:
        first.stop()  # SIGTERM: queued blocks are written on the way out
    assert list((tmp_path / "kv" / "blocks").glob("*.safetensors"))
    second = Server()
    try:
        second.stub.LoadModel(pb.ModelOptions(Model=str(trained_dir), Options=options))
        again = second.stub.Predict(request)
        assert again.message == original.message
        computed = second.stub.GetMetrics(pb.MetricsRequest()).prompt_tokens_processed
        assert 1 <= computed <= 16  # what follows the last whole block
        second.stub.Free(pb.HealthMessage())  # Free flushes too; nothing half-written is left
        assert not [p for p in (tmp_path / "kv").rglob(".*")]
    finally:
        second.stop()
