"""Structured output over gRPC: Grammar (GBNF) and JSON schemas hold inside a continuous batch,
on the tiny random model that otherwise emits noise."""

import json
import threading

import grpc
import jsonschema
import pytest

from mlxbackend.proto import backend_pb2 as pb
from tests.conftest import Server
from tests.test_grammar import BOUNDED_SCHEMA, LLAMACPP_BOUNDED, SCHEMAS


@pytest.fixture(scope="module")
def random_server(tiny_dir):
    srv = Server()
    assert srv.stub.LoadModel(pb.ModelOptions(Model=str(tiny_dir))).success
    yield srv
    srv.stop()


def ask(**kw):
    return pb.PredictOptions(
        Messages=[pb.Message(role="user", content="Reply with JSON.")],
        UseTokenizerTemplate=True,
        **{"Tokens": 300, **kw},
    )


def cases():
    """(request, schema) pairs: JSON schemas via Metadata and a llama.cpp GBNF via Grammar,
    greedy and seeded sampling."""
    out = []
    for i, schema in enumerate(SCHEMAS.values()):
        for temp, seed in ((0.0, 0), (1.0, 10 + i), (1.0, 20 + i)):
            out.append(
                (
                    ask(Metadata={"json_schema": json.dumps(schema)}, Temperature=temp, Seed=seed),
                    schema,
                )
            )
    for temp, seed in ((0.0, 0), (1.0, 3), (1.0, 4)):
        out.append((ask(Grammar=LLAMACPP_BOUNDED, Temperature=temp, Seed=seed), BOUNDED_SCHEMA))
    return out


def test_all_outputs_valid_inside_a_batch(random_server):
    todo = cases()
    results = [None] * len(todo)

    def call(i):
        results[i] = random_server.stub.Predict(todo[i][0])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(todo))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (request, schema), reply in zip(todo, results, strict=True):
        text = reply.message.decode()
        jsonschema.validate(json.loads(text), schema)  # 100%: every output parses and validates
        assert reply.tokens < request.Tokens  # ended by EOS once the grammar was complete


def test_streamed_output_valid(random_server):
    schema = SCHEMAS[next(iter(SCHEMAS))]
    chunks = list(
        random_server.stub.PredictStream(
            ask(Metadata={"json_schema": json.dumps(schema)}, Temperature=1.0, Seed=5)
        )
    )
    jsonschema.validate(json.loads(b"".join(c.message for c in chunks)), schema)


def test_schema_from_options_is_default(tiny_dir):
    schema = SCHEMAS[next(iter(SCHEMAS))]
    srv = Server()
    try:
        srv.stub.LoadModel(
            pb.ModelOptions(Model=str(tiny_dir), Options=[f"json_schema:{json.dumps(schema)}"])
        )
        jsonschema.validate(json.loads(srv.stub.Predict(ask()).message), schema)
    finally:
        srv.stop()


@pytest.mark.parametrize(
    "fields",
    [
        dict(Grammar="root ::= (("),
        dict(Metadata={"json_schema": "{not json"}),
        dict(Grammar="root ::= root"),  # matches no text: refused, not an empty reply (INTERNAL)
    ],
)
def test_bad_grammar_invalid_argument(random_server, fields):
    with pytest.raises(grpc.RpcError) as err:
        random_server.stub.Predict(ask(**fields))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert random_server.healthy()


def test_grammar_overrides_ignore_eos(random_server):
    reply = random_server.stub.Predict(
        ask(Grammar='root ::= ("yes" | "no")', IgnoreEOS=True, Tokens=50)
    )
    assert reply.message.decode() in ("yes", "no")
