"""Continuous batching: concurrent requests share decode steps and still get their solo output."""

import json
import threading
import time

import grpc
import pytest

from mlxbackend.proto import backend_pb2 as pb
from tests import tiny_model as tm
from tests.conftest import Server


def chat(conversation, **kw):
    msgs = [pb.Message(role=m["role"], content=m["content"]) for m in conversation]
    return pb.PredictOptions(Messages=msgs, UseTokenizerTemplate=True, **{"Tokens": 200, **kw})


def requests():
    """Eight different greedy requests: tools, thinking on/off, completions of several lengths."""
    tools = json.dumps(tm.TOOLS)
    return [
        chat(tm.TOOL_CONVERSATION, Tools=tools, Metadata={"enable_thinking": "true"}),
        chat(tm.CHAT_CONVERSATION, Metadata={"enable_thinking": "true"}),
        chat(tm.CHAT_CONVERSATION, Metadata={"enable_thinking": "false"}),
        pb.PredictOptions(Prompt=tm.COMPLETION_PROMPT, Tokens=197),
        pb.PredictOptions(Prompt=tm.COMPLETION_PROMPT, Tokens=60, StopPrompts=["dragon"]),
        pb.PredictOptions(Prompt=tm.COMPLETION_PROMPT, Tokens=33, Logprobs=2, TopLogprobs=2),
        chat(tm.TOOL_CONVERSATION, Tools=tools, Metadata={"enable_thinking": "true"}, Tokens=15),
        pb.PredictOptions(Prompt=tm.COMPLETION_PROMPT, Tokens=120, IgnoreEOS=True),
    ]


def summary(reply):
    delta = reply.chat_deltas[0]
    return (
        reply.message,
        reply.tokens,
        delta.content,
        delta.reasoning_content,
        [(c.name, c.arguments) for c in delta.tool_calls],
    )


def run_concurrently(fn, items):
    results = [None] * len(items)

    def call(i):
        results[i] = fn(items[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_greedy_equals_solo(trained_server):
    stub = trained_server.stub
    solo = [summary(stub.Predict(r)) for r in requests()]
    together = run_concurrently(lambda r: summary(stub.Predict(r)), requests())
    assert together == solo
    streamed = run_concurrently(
        lambda r: b"".join(x.message for x in stub.PredictStream(r)), requests()
    )
    assert streamed == [s[0] for s in solo]


def test_queue_overflow_resource_exhausted(trained_dir):
    srv = Server()
    try:
        srv.stub.LoadModel(
            pb.ModelOptions(Model=str(trained_dir), ContextSize=20000, Options=["max_queue:2"])
        )
        long = pb.PredictOptions(Prompt=tm.COMPLETION_PROMPT, IgnoreEOS=True, Tokens=5000)
        streams = [srv.stub.PredictStream(long) for _ in range(2)]
        for s in streams:
            next(s)
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.Predict(pb.PredictOptions(Prompt="hi", Tokens=3))
        assert (
            err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            and "max_queue" in err.value.details()
        )
        for s in streams:
            s.cancel()
        deadline = time.time() + 5
        while True:  # capacity comes back once the cancelled requests are gone
            try:
                srv.stub.Predict(pb.PredictOptions(Prompt="hi", Tokens=3))
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.time() < deadline
                time.sleep(0.05)
        assert srv.healthy()
    finally:
        srv.stop()


def test_hundred_cancelled_streams_leave_nothing_running(trained_dir):
    srv = Server()
    try:
        srv.stub.LoadModel(pb.ModelOptions(Model=str(trained_dir), ContextSize=20000))
        long = pb.PredictOptions(Prompt=tm.COMPLETION_PROMPT, IgnoreEOS=True, Tokens=10000)

        def cancel_midway(_):
            call = srv.stub.PredictStream(long)
            for i, _ in enumerate(call):
                if i == 2:
                    call.cancel()
                    break

        run_concurrently(cancel_midway, list(range(20)))  # warm up allocator and caches
        _wait_idle(srv)
        rss_before = srv.rss()
        for _ in range(4):
            run_concurrently(cancel_midway, list(range(25)))
        _wait_idle(srv)
        status = srv.stub.Status(pb.HealthMessage())
        assert status.memory.breakdown["kv_cache"] == 0
        growth = srv.rss() - rss_before
        print(f"RSS growth after 100 cancelled streams: {growth >> 20} MiB")
        assert growth < 64 << 20
        after = srv.stub.Predict(
            pb.PredictOptions(Prompt=tm.COMPLETION_PROMPT, Tokens=20)
        ).message.decode()
        assert len(after) > 20 and tm.COMPLETION_TEXT.startswith(after)  # still serving correctly
    finally:
        srv.stop()


def _wait_idle(srv, timeout=10):
    deadline = time.time() + timeout
    while srv.stub.Status(pb.HealthMessage()).state != pb.StatusResponse.READY:
        assert time.time() < deadline, "work kept running after every stream was cancelled"
        time.sleep(0.05)


def test_request_that_cannot_fit_is_refused_alone(trained_dir):
    """KV reservations: a request whose worst-case KV exceeds what is left fails on its own
    (RESOURCE_EXHAUSTED) while the running one continues and small ones are still served."""
    srv = Server()
    try:
        # tiny model: 768 bytes of KV per token; room for one 2000-token request
        srv.stub.LoadModel(
            pb.ModelOptions(
                Model=str(trained_dir), ContextSize=20000, Options=["max_kv_bytes:2000000"]
            )
        )
        long = pb.PredictOptions(Prompt=tm.COMPLETION_PROMPT, IgnoreEOS=True, Tokens=2000)
        running = srv.stub.PredictStream(long)
        next(running)
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.Predict(long)
        assert (
            err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "MiB" in err.value.details()
        )
        small = srv.stub.Predict(pb.PredictOptions(Prompt=tm.COMPLETION_PROMPT, Tokens=20))
        assert tm.COMPLETION_TEXT.startswith(small.message.decode())
        rest = list(running)
        assert rest[-1].tokens == 2000  # the running request was not disturbed
        assert srv.stub.Predict(long).tokens == 2000  # its reservation was given back
    finally:
        srv.stop()


def test_prompts_prefilled_in_many_chunks(trained_dir, trained_server):
    """prefill_chunk:8: every prompt pauses between chunks before its first token, with no batch
    running yet or beside others (a batch left empty during a prefill closed under it once, and
    the request never finished); outputs equal the default server's."""
    srv = Server()
    try:
        srv.stub.LoadModel(pb.ModelOptions(Model=str(trained_dir), Options=["prefill_chunk:8"]))
        want = [summary(trained_server.stub.Predict(r, timeout=120)) for r in requests()]
        assert [summary(srv.stub.Predict(r, timeout=120)) for r in requests()] == want
        got = run_concurrently(lambda r: summary(srv.stub.Predict(r, timeout=120)), requests())
        assert got == want
    finally:
        srv.stop()
