"""Text generation over gRPC against a real server process and the trained tiny model."""

import json
import threading
import time

import grpc
import pytest

from mlxbackend.proto import backend_pb2 as pb
from tests import tiny_model as tm


def messages(conversation):
    return [pb.Message(role=m["role"], content=m["content"]) for m in conversation]


def chat(conversation, **kw):
    kw.setdefault("Tokens", 200)
    return pb.PredictOptions(Messages=messages(conversation), UseTokenizerTemplate=True, **kw)


def completion(**kw):
    kw.setdefault("Tokens", 200)
    return pb.PredictOptions(Prompt=tm.COMPLETION_PROMPT, **kw)


def stream(stub, request, **kw):
    return list(stub.PredictStream(request, **kw))


def joined(replies):
    """Merge stream chunks as LocalAI does: concatenate text, content, reasoning, arguments."""
    text = b"".join(r.message for r in replies).decode()
    content = "".join(d.content for r in replies for d in r.chat_deltas)
    reasoning = "".join(d.reasoning_content for r in replies for d in r.chat_deltas)
    calls = {}
    for r in replies:
        for d in r.chat_deltas:
            for c in d.tool_calls:
                call = calls.setdefault(c.index, {"id": "", "name": "", "arguments": ""})
                call["id"] = c.id or call["id"]
                call["name"] = c.name or call["name"]
                call["arguments"] += c.arguments
    return text, content, reasoning, calls


def test_tool_call_non_streaming(trained_server):
    reply = trained_server.stub.Predict(
        chat(
            tm.TOOL_CONVERSATION,
            Tools=json.dumps(tm.TOOLS),
            ToolChoice='"auto"',
            Metadata={"enable_thinking": "true"},
        )
    )
    assert len(reply.chat_deltas) == 1
    delta = reply.chat_deltas[0]
    assert delta.reasoning_content == "The user wants weather."
    assert delta.content == ""
    assert len(delta.tool_calls) == 1
    call = delta.tool_calls[0]
    assert call.index == 0 and call.id.startswith("call_") and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert "<tool_call>" in reply.message.decode()  # message stays the raw text
    assert reply.tokens > 0 and reply.prompt_tokens > 0


def test_tool_call_streaming_deltas(trained_server):
    replies = stream(
        trained_server.stub,
        chat(
            tm.TOOL_CONVERSATION, Tools=json.dumps(tm.TOOLS), Metadata={"enable_thinking": "true"}
        ),
    )
    text, content, reasoning, calls = joined(replies)
    assert text == tm.TOOL_REPLY.removesuffix("<|im_end|>")
    assert reasoning == "The user wants weather." and content == ""
    assert list(calls) == [0] and calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    pieces = [c for r in replies for d in r.chat_deltas for c in d.tool_calls]
    assert pieces[0].name == "get_weather" and pieces[0].id  # index, id and name come first
    assert all(not p.name and not p.id for p in pieces[1:])  # then argument fragments only
    for r in replies:  # raw markup never classified as content or reasoning
        for d in r.chat_deltas:
            assert "<think>" not in d.content + d.reasoning_content
            assert "<tool_call>" not in d.content + d.reasoning_content
    assert replies[-1].tokens > 0
    assert replies[-1].prompt_tokens > 0 and replies[-1].timing_token_generation > 0


def test_thinking_on_and_off(trained_server):
    on = trained_server.stub.Predict(
        chat(tm.CHAT_CONVERSATION, Metadata={"enable_thinking": "true"})
    )
    assert on.chat_deltas[0].reasoning_content == "Easy."
    assert on.chat_deltas[0].content == "The capital of France is Paris."
    off = trained_server.stub.Predict(
        chat(tm.CHAT_CONVERSATION, Metadata={"enable_thinking": "false"})
    )
    assert off.chat_deltas[0].reasoning_content == ""
    assert off.chat_deltas[0].content == "The capital of France is Paris."
    kwargs = trained_server.stub.Predict(
        chat(
            tm.CHAT_CONVERSATION,
            Metadata={"chat_template_kwargs": json.dumps({"enable_thinking": False})},
        )
    )
    assert kwargs.chat_deltas[0].content == "The capital of France is Paris."
    assert kwargs.chat_deltas[0].reasoning_content == ""


def test_stream_equals_non_stream_greedy(trained_server):
    for request in (
        completion(Tokens=120),
        chat(tm.CHAT_CONVERSATION, Metadata={"enable_thinking": "true"}),
    ):
        whole = trained_server.stub.Predict(request)
        replies = stream(trained_server.stub, request)
        text, content, reasoning, _ = joined(replies)
        assert text == whole.message.decode()
        assert content == whole.chat_deltas[0].content
        assert reasoning == whole.chat_deltas[0].reasoning_content
        assert replies[-1].tokens == whole.tokens
        assert len(replies) > 2 and replies[0].message != replies[1].message


def test_completion_reproduces_and_no_multibyte_split(trained_server):
    replies = stream(trained_server.stub, completion(Tokens=197))
    for r in replies:
        r.message.decode("utf-8")  # every chunk is whole UTF-8
    text = joined(replies)[0]
    assert text == tm.COMPLETION_TEXT


@pytest.mark.parametrize("stop", ["dragon", " the dragon", "n", "é"])
def test_stop_text_never_leaks(trained_server, stop):
    request = completion(Tokens=197, StopPrompts=[stop, "never-appears-xyz"])
    expected = tm.COMPLETION_TEXT[: tm.COMPLETION_TEXT.index(stop)]
    whole = trained_server.stub.Predict(request).message.decode()
    streamed = joined(stream(trained_server.stub, request))[0]
    assert whole == expected.strip() or whole == expected
    assert streamed == whole
    assert stop not in whole


def test_logprobs_per_token(trained_server):
    reply = trained_server.stub.Predict(completion(Tokens=12, Logprobs=3, TopLogprobs=3))
    data = json.loads(reply.logprobs)
    assert len(data["content"]) == reply.tokens == 12
    for item in data["content"]:
        assert (
            item["logprob"] <= 0 and isinstance(item["id"], int) and isinstance(item["bytes"], list)
        )
        assert len(item["top_logprobs"]) == 3
        assert item["top_logprobs"][0]["logprob"] >= item["top_logprobs"][-1]["logprob"]
        assert (
            item["top_logprobs"][0]["id"] == item["id"]
        )  # greedy: the chosen token is the top one
    assert "".join(i["token"] for i in data["content"]) == reply.message.decode()
    final = stream(trained_server.stub, completion(Tokens=12, Logprobs=2, TopLogprobs=2))[-1]
    assert len(json.loads(final.logprobs)["content"]) == 12


def test_seed_reproducible_under_concurrency(trained_server):
    def sampled(seed):
        return completion(Tokens=40, Temperature=1.5, TopK=0, TopP=1.0, Seed=seed)

    solo = trained_server.stub.Predict(sampled(7)).message
    results = {}

    def call(key, seed):
        results[key] = trained_server.stub.Predict(sampled(seed)).message

    threads = [
        threading.Thread(target=call, args=(i, 7 if i % 2 == 0 else 100 + i)) for i in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[i] == solo for i in range(0, 6, 2))
    assert any(results[i] != solo for i in range(1, 6, 2))


def test_sampling_parameters_change_output(trained_server):
    greedy = trained_server.stub.Predict(completion(Tokens=30)).message
    biased_token = trained_server.stub.TokenizeString(pb.PredictOptions(Prompt=" zebra")).tokens[-1]
    biased = trained_server.stub.Predict(
        completion(
            Tokens=30, Logprobs=1, TopLogprobs=1, LogitBias=json.dumps({str(biased_token): 100})
        )
    )
    assert biased.message != greedy
    assert [e["id"] for e in json.loads(biased.logprobs)["content"]] == [biased_token] * 30
    penalised = trained_server.stub.Predict(completion(Tokens=60, Penalty=50.0, Repeat=64)).message
    assert penalised != trained_server.stub.Predict(completion(Tokens=60)).message


def test_health_answers_during_long_generation_and_cancel_stops(trained_server):
    stub = trained_server.stub
    call = stub.PredictStream(completion(Tokens=6000, IgnoreEOS=True))
    got = 0
    for _ in call:
        got += 1
        if got == 3:
            break
    latencies = []
    for _ in range(10):
        t = time.perf_counter()
        assert stub.Health(pb.HealthMessage(), timeout=5).message == b"OK"
        latencies.append(time.perf_counter() - t)
        time.sleep(0.05)
    assert max(latencies) < 1.0
    assert stub.Status(pb.HealthMessage()).state == pb.StatusResponse.BUSY
    call.cancel()
    deadline = time.time() + 5
    while stub.Status(pb.HealthMessage()).state != pb.StatusResponse.READY:
        assert time.time() < deadline, "generation kept running after cancel"
        time.sleep(0.05)


def test_ignore_eos_and_token_limit(trained_server):
    normal = trained_server.stub.Predict(
        chat(tm.CHAT_CONVERSATION, Metadata={"enable_thinking": "false"})
    )
    forced = trained_server.stub.Predict(
        chat(tm.CHAT_CONVERSATION, Metadata={"enable_thinking": "false"}, IgnoreEOS=True, Tokens=40)
    )
    assert normal.tokens < 40 and forced.tokens == 40
    assert forced.message.decode().startswith(normal.message.decode())


def test_tokenize(trained_server):
    plain = trained_server.stub.TokenizeString(pb.PredictOptions(Prompt="Hello Paris"))
    assert plain.length == len(plain.tokens) > 0
    templ = trained_server.stub.TokenizeString(chat(tm.CHAT_CONVERSATION))
    whole = trained_server.stub.Predict(chat(tm.CHAT_CONVERSATION, Tokens=1))
    assert templ.length == whole.prompt_tokens


def test_status_metrics_metadata(trained_server):
    import time

    trained_server.stub.Predict(completion(Tokens=20))
    # the reply can arrive before the worker's next turn retires the finished batch (BUSY until
    # then, a few ms): READY must follow, not precede, the reply
    deadline = time.monotonic() + 5
    while (status := trained_server.stub.Status(pb.HealthMessage())).state != (
        pb.StatusResponse.READY
    ) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert status.state == pb.StatusResponse.READY
    assert (
        status.memory.breakdown["weights"] > 0
        and status.memory.total >= status.memory.breakdown["weights"]
    )
    metrics = trained_server.stub.GetMetrics(pb.MetricsRequest())
    assert (
        metrics.tokens_generated == 20
        and metrics.tokens_per_second > 0
        and metrics.prompt_tokens_processed > 0
    )
    meta = trained_server.stub.ModelMetadata(pb.ModelOptions())
    assert meta.supports_thinking and "<|im_start|>assistant" in meta.rendered_template
    assert (
        meta.tool_format.section_start == "<tool_call>"
        and meta.tool_format.reasoning_end == "</think>"
    )


def test_tool_choice_none_and_named(trained_server):
    tools = json.dumps(tm.TOOLS)
    none = trained_server.stub.Predict(chat(tm.TOOL_CONVERSATION, Tools=tools, ToolChoice='"none"'))
    assert not none.chat_deltas[0].tool_calls
    forced = trained_server.stub.Predict(
        chat(
            tm.CHAT_CONVERSATION,
            Tools=tools,
            Metadata={"enable_thinking": "false"},
            ToolChoice=json.dumps({"type": "function", "function": {"name": "get_weather"}}),
        )
    )
    calls = forced.chat_deltas[0].tool_calls
    assert len(calls) == 1 and calls[0].name == "get_weather"


def test_multi_turn_tool_history_renders(trained_server):
    history = [
        pb.Message(role="user", content="What is the weather in Paris?"),
        pb.Message(
            role="assistant",
            content="",
            reasoning_content="The user wants weather.",
            tool_calls=json.dumps(
                [
                    {
                        "index": 0,
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ]
            ),
        ),
        pb.Message(role="tool", content="sunny", name="get_weather", tool_call_id="call_1"),
    ]
    req = pb.PredictOptions(
        Messages=history, UseTokenizerTemplate=True, Tools=json.dumps(tm.TOOLS), Tokens=5
    )
    assert trained_server.stub.TokenizeString(req).length > 20
    trained_server.stub.Predict(req)


BAD = [
    ("invalid tools json", dict(Tools="[{not json"), grpc.StatusCode.INVALID_ARGUMENT),
    ("unknown role", dict(roles=["wizard"]), grpc.StatusCode.INVALID_ARGUMENT),
    ("negative tokens", dict(Tokens=-5), grpc.StatusCode.INVALID_ARGUMENT),
    ("bad logit bias", dict(LogitBias="{1:"), grpc.StatusCode.INVALID_ARGUMENT),
    ("bad tool choice", dict(ToolChoice='"sometimes"'), grpc.StatusCode.INVALID_ARGUMENT),
    ("empty prompt", dict(empty=True), grpc.StatusCode.INVALID_ARGUMENT),
]


@pytest.mark.parametrize("name,fields,code", BAD, ids=[b[0] for b in BAD])
def test_bad_input_clear_error(trained_server, name, fields, code):
    fields = dict(fields)
    roles = fields.pop("roles", ["user"])
    if fields.pop("empty", False):
        request = pb.PredictOptions(Tokens=5)
    else:
        request = pb.PredictOptions(
            Messages=[pb.Message(role=r, content="hi") for r in roles],
            UseTokenizerTemplate=True,
            **{"Tokens": 5, **fields},
        )
    for rpc in (trained_server.stub.Predict, lambda r: list(trained_server.stub.PredictStream(r))):
        with pytest.raises(grpc.RpcError) as err:
            rpc(request)
        assert err.value.code() == code, err.value.details()
        assert err.value.details()
    assert trained_server.healthy()


def test_prompt_longer_than_context(tiny_dir, server):
    assert server.stub.LoadModel(pb.ModelOptions(Model=str(tiny_dir), ContextSize=64)).success
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Predict(pb.PredictOptions(Prompt="Paris is lovely. " * 100, Tokens=5))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "context" in err.value.details()
    ok = server.stub.Predict(
        pb.PredictOptions(Prompt="Paris", IgnoreEOS=True)
    )  # 0 = up to the context end
    assert ok.tokens == 64 - server.stub.TokenizeString(pb.PredictOptions(Prompt="Paris")).length
    assert server.healthy()
