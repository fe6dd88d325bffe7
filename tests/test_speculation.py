"""Prompt-lookup speculation (text/speculate.py, text/spec_batch.py): drafts from the request's own
prompt and reply, verified in batched forward passes, must not change a single token.

Two real servers hold the same model, one with Options prompt_lookup:false: replies are compared
token for token, solo and 8 at once, with stops, grammar, logprobs and seeded sampling, on the
tiny trained model and on SmolLM2; Status / GetMetrics show that drafts were verified and kept."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlxbackend.errors import InvalidInput
from mlxbackend.proto import backend_pb2 as pb
from mlxbackend.text.spec_batch import Ragged
from mlxbackend.text.speculate import DraftLength, NgramIndex, spec_config
from scripts.bench_spec import edit_request
from tests import tiny_model as tm
from tests.conftest import Server
from tests.test_batching import requests as batching_requests
from tests.test_batching import run_concurrently as concurrently


# -- units ----------------------------------------------------------------------------------------
def test_ngram_index_proposes_the_latest_continuation():
    idx = NgramIndex([1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 7, 1, 2], min_n=2, max_n=3)
    assert idx.propose(3) == [3, 5, 6]  # "1 2" last continued with 3 5 6 (the later occurrence)
    idx.extend([3])
    assert idx.propose(2) == [5, 6]  # "1 2 3" → 5 6 wins over "2 3" → the same here
    idx.extend([8])
    assert idx.propose(4) == []  # "3 8" never seen
    idx.extend([1, 2, 3])
    assert idx.propose(4) == [8, 1, 2, 3]  # the reply itself is searched too

    idx.extend([7])
    assert idx.propose(2) == []  # "3 7" never seen; single tokens only when asked:
    assert idx.propose(2, min_n=1) == [1, 2]


def test_free_slots_of_a_verification_pass_are_filled():
    """Rows with fewer drafts than the pass's longest take their match continued or, with none
    or while pausing, a single-token match; never past their token budget or the grammar."""
    from types import SimpleNamespace

    from mlxbackend.text.spec_batch import SpecGenerationBatch
    from mlxbackend.text.speculate import SeqSpec

    def spec(tokens):
        return SeqSpec(NgramIndex(tokens, 2, 3), DraftLength(8))

    specs = [spec([1, 2, 3, 4, 5, 1, 2]), spec([5, 6, 7, 8, 9, 0, 7]), spec([1, 4, 4, 6, 1]), None]
    cut = {2: 1}  # row 2's grammar keeps one draft
    batch = SimpleNamespace(
        specs=specs,
        max_tokens=[100, 100, 3, 100],
        _num_tokens=[0, 0, 0, 0],
        _cut=lambda i, s, pending, d: d[: cut.get(i, len(d))],
    )
    drafts = SpecGenerationBatch._fill(batch, [2, 7, 1, 9], [[3, 4, 5], [], [], []])
    assert drafts == [[3, 4, 5], [8, 9, 0], [4], []]
    assert SpecGenerationBatch._fill(batch, [2, 7, 1, 9], [[3], [], [], []])[0] == [3]
    assert SpecGenerationBatch._fill(batch, [0] * 4, [[], [], [], []]) == [[], [], [], []]


def test_draft_length_adapts_and_pauses():
    d = DraftLength(8, start=4)
    d.update(4, 4)
    assert d.wanted() == 8
    d.update(8, 2)
    assert d.wanted() == 3
    d.update(3, 0)  # nothing kept: one step without drafts, then again
    assert d.wanted() == 0 and d.wanted() == 1
    d.update(1, 0)
    assert [d.wanted() for _ in range(3)] == [0, 0, 1]  # the pause doubles
    assert (d.drafted, d.accepted) == (16, 6)


def test_spec_options_are_checked():
    assert spec_config({}).lookup is True
    c = spec_config({"prompt_lookup": False, "prompt_lookup_max": 4, "prompt_lookup_ngram": 5})
    assert (c.lookup, c.max_draft, c.max_ngram) == (False, 4, 5)
    for bad in ({"prompt_lookup_max": 0}, {"prompt_lookup_ngram": 1}, {"prompt_lookup": "maybe"}):
        with pytest.raises(InvalidInput):
            spec_config(bad)


@pytest.mark.parametrize("compact", [False, True])
def test_ragged_rows_keep_their_accepted_entries(compact):
    """A batch of three rows of different lengths takes 4 entries each, twice; rows keep 4, 1
    and 2, then 1, 3 and 0. Each row's KV must then equal that row alone with only its kept
    entries, its RoPE offset count them, and the next pass's mask show exactly those."""
    from mlx_lm.models.base import create_attention_mask
    from mlx_lm.models.cache import BatchKVCache, KVCache

    rng = np.random.default_rng(0)
    lengths, width, kept = [5, 2, 9], 4, [[4, 1, 2], [1, 3, 0]]
    singles, rows = [], []
    for n in lengths:
        k = mx.array(rng.normal(size=(1, 2, n + 2 * width, 8)).astype(np.float32))
        v = mx.array(rng.normal(size=(1, 2, n + 2 * width, 8)).astype(np.float32))
        c = KVCache()
        c.update_and_fetch(k[:, :, :n], v[:, :, :n])
        singles.append(c)
        rows.append((k, v))
    cache = [BatchKVCache.merge(singles)]
    ragged = Ragged()
    ragged.adopt(cache)
    written = list(lengths)
    expect = [list(range(n)) for n in lengths]
    for step in kept:
        new_k = mx.concatenate(
            [k[:, :, w : w + width] for (k, _), w in zip(rows, written, strict=True)]
        )
        new_v = mx.concatenate(
            [v[:, :, w : w + width] for (_, v), w in zip(rows, written, strict=True)]
        )
        cache[0].update_and_fetch(new_k, new_v)
        ragged.wrote(width)
        ragged.drop(cache, [width - a for a in step])
        for i, a in enumerate(step):
            expect[i] += list(range(written[i], written[i] + a))
            written[i] += width
        if compact:
            ragged.compact(cache)
    for i, (k, v) in enumerate(rows):
        got = ragged.extract(cache, i)[0]
        keep = mx.array(expect[i])
        np.testing.assert_array_equal(np.array(got.keys), np.array(k[:, :, keep]))
        np.testing.assert_array_equal(np.array(got.values), np.array(v[:, :, keep]))
    assert cache[0].offset.tolist() == [len(e) for e in expect]
    mask = create_attention_mask(mx.zeros((3, 1, 8)), cache[0])
    visible = np.array(mask).reshape(3, -1).sum(axis=1)
    assert list(visible) == [len(e) + 1 for e in expect]


# -- over gRPC --------------------------------------------------------------------------------------
def start(model_dir, lookup: bool, options=(), **fields) -> Server:
    srv = Server()
    reply = srv.stub.LoadModel(
        pb.ModelOptions(
            Model=model_dir.name,
            ModelPath=str(model_dir.parent),
            Options=[f"prompt_lookup:{str(lookup).lower()}", *options],
            **fields,
        ),
        timeout=300,
    )
    assert reply.success, reply.message
    return srv


@pytest.fixture(scope="module")
def tiny_pair(trained_dir):
    on, off = (
        start(trained_dir, True, ContextSize=8192),
        start(trained_dir, False, ContextSize=8192),
    )
    yield on, off
    on.stop()
    off.stop()


def served(srv) -> dict:
    return dict(srv.stub.Status(pb.HealthMessage(), timeout=10).memory.breakdown)


def same(got, want) -> bool:
    """Equal, except floats (logprobs) within 1e-3: a verification pass computes several
    positions in one matrix product, whose float32 rounding differs from one-token steps in the
    6th digit."""
    if isinstance(want, float):
        return isinstance(got, float) and abs(got - want) <= 1e-3
    if isinstance(want, (list, tuple)):
        return len(got) == len(want) and all(same(g, w) for g, w in zip(got, want, strict=True))
    if isinstance(want, dict):
        return got.keys() == want.keys() and all(same(got[k], want[k]) for k in want)
    return got == want


def reply_of(stub, req):
    r = stub.Predict(req, timeout=600)
    delta = r.chat_deltas[0] if r.chat_deltas else pb.ChatDelta()
    return (
        r.message,
        r.tokens,
        json.loads(r.logprobs) if r.logprobs else None,
        delta.content,
        delta.reasoning_content,
        [(c.name, c.arguments) for c in delta.tool_calls],
    )


GRAMMAR = 'root ::= "Once upon a time" [a-z ,.]+'


def tiny_requests():
    """test_batching's eight (tools, thinking, stops, logprobs, IgnoreEOS) plus a grammar and a
    long repetitive completion (IgnoreEOS: the tiny model loops, which prompt lookup drafts)."""
    return batching_requests() + [
        pb.PredictOptions(Prompt=tm.COMPLETION_PROMPT, Tokens=80, Grammar=GRAMMAR),
        pb.PredictOptions(
            Prompt=tm.COMPLETION_PROMPT, Tokens=150, IgnoreEOS=True, Logprobs=1, TopLogprobs=3
        ),
    ]


def test_tiny_greedy_identical_solo_and_batched(tiny_pair):
    on, off = tiny_pair
    before = served(on)
    want = [reply_of(off.stub, r) for r in tiny_requests()]
    assert same([reply_of(on.stub, r) for r in tiny_requests()], want)
    assert same(concurrently(lambda r: reply_of(on.stub, r), tiny_requests()), want)
    streamed = concurrently(
        lambda r: b"".join(c.message for c in on.stub.PredictStream(r, timeout=600)),
        tiny_requests(),
    )
    assert streamed == [w[0] for w in want]
    after = served(on)
    drafted = after["spec_drafted_tokens"] - before["spec_drafted_tokens"]
    accepted = after["spec_accepted_tokens"] - before["spec_accepted_tokens"]
    assert drafted > 50 and accepted > 25, (drafted, accepted)
    assert served(off)["spec_drafted_tokens"] == 0


def test_tiny_seeded_sampling_reproducible_and_unchanged(tiny_pair):
    on, off = tiny_pair
    reqs = [
        pb.PredictOptions(
            Prompt=tm.COMPLETION_PROMPT, Tokens=60, IgnoreEOS=True, Temperature=t, Seed=s, TopK=k
        )
        for s, t, k in ((1, 0.7, 0), (2, 1.0, 20), (3, 0.3, 0), (4, 1.3, 5))
    ]
    first = [reply_of(on.stub, r) for r in reqs]
    assert [reply_of(on.stub, r) for r in reqs] == first
    assert concurrently(lambda r: reply_of(on.stub, r), reqs) == first
    assert [reply_of(off.stub, r) for r in reqs] == first
    metrics = json.loads(on.stub.GetMetrics(pb.MetricsRequest()).prompt_json_for_slot)
    assert set(metrics) == {"drafted_tokens", "accepted_tokens"}


@pytest.fixture()
def eager(trained_dir):
    """Prompt lookup from single-token matches: drafts after almost any sampled token."""
    srv = start(trained_dir, True, ["prompt_lookup_min_ngram:1"], ContextSize=8192)
    yield srv
    srv.stop()


def test_sampled_tokens_keep_the_models_distribution(eager, trained_dir):
    """At temperature 2 with TopK 3, over 600 seeds: the reply's first token comes from the prefill, its
    second from the batch's first (plain) step, its third from a verification pass where that
    request drafted (GetMetrics says it did; drafts come from the prompt, whose end repeats its
    start). Each such third token is checked against the model's own distribution after the
    reply's first two (mlx-lm, in this process; the top 3 renormalized) by the randomized probability integral
    transform: u = F(t - 1) + V p(t), V uniform, is uniform on [0, 1] exactly when t ~ p;
    Kolmogorov-Smirnov, p > 0.001."""
    from mlx_lm import load
    from scipy.stats import kstest

    temperature = 2.0
    on = eager
    model, tokenizer = load(str(trained_dir))
    text = tm.COMPLETION_TEXT
    prompt = text[:100] + " " + text[: text.index(" foot")]  # ends at a word: the reply repeats
    ids = tokenizer.encode(prompt)
    cdfs: dict = {}

    def cdf_after(prefix: tuple) -> np.ndarray:
        if prefix not in cdfs:
            logits = model(mx.array(ids + list(prefix))[None])[0, -1].astype(mx.float32)
            probs = np.array(mx.softmax(logits / temperature), dtype=np.float64)
            probs[np.argsort(-probs)[3:]] = 0.0
            probs /= probs.sum()
            cdfs[prefix] = np.concatenate([[0.0], np.cumsum(probs)])
        return cdfs[prefix]

    before = served(on)
    rng = np.random.default_rng(0)
    u = []
    for seed in range(600):
        r = on.stub.Predict(
            pb.PredictOptions(
                Prompt=prompt, Tokens=4, Temperature=temperature, TopK=3, Seed=seed,
                IgnoreEOS=True, Logprobs=1,
            )
        )  # fmt: skip
        got = [e["id"] for e in json.loads(r.logprobs)["content"]]
        if json.loads(on.stub.GetMetrics(pb.MetricsRequest()).prompt_json_for_slot)[
            "drafted_tokens"
        ]:
            cdf = cdf_after(tuple(got[:2]))
            u.append(cdf[got[2]] + rng.uniform() * (cdf[got[2] + 1] - cdf[got[2]]))
    after = served(on)
    assert len(u) >= 100, len(u)
    assert after["spec_accepted_tokens"] - before["spec_accepted_tokens"] >= 20, after
    assert kstest(u, "uniform").pvalue > 1e-3


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_dir):
    on, off = start(smollm2_dir, True), start(smollm2_dir, False)
    yield on, off
    on.stop()
    off.stop()


def smollm2_requests():
    schema = json.dumps(
        {"type": "object", "properties": {"file": {"type": "string"}}, "required": ["file"]}
    )
    reqs = [edit_request(i, 80) for i in range(8)]
    reqs[1].StopPrompts.append("def summary")
    reqs[2].Logprobs, reqs[2].TopLogprobs = 1, 2
    reqs[3].Metadata["json_schema"] = schema
    reqs[4].Temperature, reqs[4].Seed = 0.8, 7
    return reqs


def test_smollm2_edit_identical_solo_and_batched(smollm2_pair):
    on, off = smollm2_pair
    want = [reply_of(off.stub, r) for r in smollm2_requests()[:4]]
    before = served(on)
    assert same([reply_of(on.stub, r) for r in smollm2_requests()[:4]], want)
    want += concurrently(lambda r: reply_of(off.stub, r), smollm2_requests()[4:])
    assert same(concurrently(lambda r: reply_of(on.stub, r), smollm2_requests()), want)
    after = served(on)
    accepted = after["spec_accepted_tokens"] - before["spec_accepted_tokens"]
    assert accepted > 300, accepted
    assert want[1][0].endswith(b"def ") is False and b"def summary" not in want[1][0]


# -- DraftModel inside the batch ------------------------------------------------------------------
@pytest.fixture(scope="module")
def random_draft(tmp_path_factory):
    """A draft with other random weights (same tokenizer): most drafts are rejected, rows accept
    different numbers of tokens, every rewind path runs."""
    return tm.build_tiny_model(tmp_path_factory.mktemp("draft") / "tiny-draft", seed=1)


@pytest.mark.parametrize("draft_kind", ["itself", "random"])
def test_draft_model_in_batch_identical(tiny_pair, trained_dir, random_draft, draft_kind):
    _, off = tiny_pair
    draft = trained_dir if draft_kind == "itself" else random_draft
    srv = start(trained_dir, False, DraftModel=str(draft), ContextSize=8192)
    try:
        before = served(srv)
        reqs = tiny_requests()
        want = [reply_of(off.stub, r) for r in reqs]
        assert same([reply_of(srv.stub, r) for r in reqs], want)
        assert same(concurrently(lambda r: reply_of(srv.stub, r), reqs), want)
        seeded = [
            pb.PredictOptions(
                Prompt=tm.COMPLETION_PROMPT, Tokens=40, Temperature=0.9, Seed=s, IgnoreEOS=True
            )
            for s in range(4)
        ]
        assert same(
            concurrently(lambda r: reply_of(srv.stub, r), seeded),
            [reply_of(off.stub, r) for r in seeded],
        )
        after = served(srv)
        drafted = after["spec_drafted_tokens"] - before["spec_drafted_tokens"]
        accepted = after["spec_accepted_tokens"] - before["spec_accepted_tokens"]
        assert drafted > 50, drafted
        if draft_kind == "itself":
            assert accepted > 0.8 * drafted, (accepted, drafted)
        else:
            assert accepted < 0.5 * drafted, (accepted, drafted)
    finally:
        srv.stop()


def test_bad_speculation_options_refused_over_grpc(trained_dir):
    """Malformed speculation Options are INVALID_ARGUMENT at LoadModel, naming the option; the
    server stays healthy and loads the model with good ones after."""
    import grpc

    srv = Server()
    try:
        for bad in ("prompt_lookup_max:0", "prompt_lookup:maybe", "spec_step_tokens:-1"):
            with pytest.raises(grpc.RpcError) as err:
                srv.stub.LoadModel(
                    pb.ModelOptions(
                        Model=trained_dir.name, ModelPath=str(trained_dir.parent), Options=[bad]
                    ),
                    timeout=120,
                )
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
            assert bad.split(":")[0] in err.value.details(), err.value.details()
            assert srv.healthy()
        reply = srv.stub.LoadModel(
            pb.ModelOptions(Model=trained_dir.name, ModelPath=str(trained_dir.parent)), timeout=120
        )
        assert reply.success and "prompt-lookup" in reply.message, reply.message
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def lora_pair(trained_dir, tmp_path_factory):
    """On and off servers holding the tiny model with two hot-swappable LoRA adapters; the
    speculating one drafts from single tokens up (prompt_lookup_min_ngram 1) so every request
    drafts."""
    from tests.test_server import make_adapter

    root = tmp_path_factory.mktemp("spec-adapters")
    for i, name in enumerate(("a1", "a2"), start=1):
        make_adapter(trained_dir, root / name, seed=i)
    adapters = [f"lora.{n}:{root / n}" for n in ("a1", "a2")]
    on = start(trained_dir, True, [*adapters, "prompt_lookup_min_ngram:1"], ContextSize=8192)
    off = start(trained_dir, False, adapters, ContextSize=8192)
    yield on, off
    on.stop()
    off.stop()


def lora_request(adapter, tokens=300):
    return pb.PredictOptions(
        Prompt=tm.COMPLETION_PROMPT,
        Tokens=tokens,
        IgnoreEOS=True,
        Metadata={"lora": adapter} if adapter else {},
    )


def test_lora_hot_swap_and_cancellation_while_speculating(lora_pair):
    """Requests for the base model and two adapters, 9 at once (one batch per adapter), with a
    streamed request cancelled mid-reply in the base model's batch: every reply equals plain
    decoding's, drafts were verified in each case, and the server keeps serving."""
    import threading

    on, off = lora_pair
    names = [None, "a1", "a2"] * 3
    want = [reply_of(off.stub, lora_request(n)) for n in names]
    assert len({w[0] for w in want}) == 3

    before = served(on)
    assert same([reply_of(on.stub, lora_request(n)) for n in names[:3]], want[:3])
    solo = served(on)
    assert solo["spec_accepted_tokens"] - before["spec_accepted_tokens"] > 20, solo

    chunks = []

    def cancelled():
        stream = on.stub.PredictStream(lora_request(None, 4000), timeout=600)
        for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 20:
                stream.cancel()
                return

    canceller = threading.Thread(target=cancelled)
    canceller.start()
    got = concurrently(lambda n: reply_of(on.stub, lora_request(n)), names)
    canceller.join()
    assert same(got, want)
    assert len(chunks) == 20
    after = served(on)
    assert after["spec_accepted_tokens"] - solo["spec_accepted_tokens"] > 60, after
    assert on.healthy()
    assert same(reply_of(on.stub, lora_request("a2")), want[2])
