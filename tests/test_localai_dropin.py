"""LocalAI drop-in: the Options keys LocalAI's mlx backend reads, llama.cpp's extra samplers
(typical, tail-free, Mirostat, XTC) and the request fields this backend refuses.

The samplers are checked against numpy transcriptions of llama.cpp's loops; the rest over gRPC
against a real server process with the trained tiny model."""

import json
import math
import shutil
import threading
from pathlib import Path

import grpc
import mlx.core as mx
import numpy as np
import pytest

from mlxbackend.proto import backend_pb2 as pb
from mlxbackend.text import samplers
from tests import tiny_model as tm
from tests.conftest import Server

# LocalAI sends these on every request (its YAML defaults): they must change nothing.
NEUTRAL = dict(TypicalP=1.0, TailFreeSamplingZ=1.0, Mirostat=0, MirostatETA=0.1, MirostatTAU=5.0)


def completion(**kw):
    kw.setdefault("Tokens", 30)
    return pb.PredictOptions(Prompt=tm.COMPLETION_PROMPT, **kw)


def sampled(**kw):
    return completion(Temperature=1.5, TopK=0, TopP=1.0, **kw)


# -- samplers against llama.cpp's loops ---------------------------------------------------------


def _probs(logits):
    p = np.exp(logits - logits.max())
    return p / p.sum()


def ref_typical(logits, typical_p):
    p = _probs(logits)
    entropy = -(p * np.log(p)).sum()
    order = np.argsort(np.abs(-np.log(p) - entropy), kind="stable")
    cum, last = 0.0, len(p)
    for i, idx in enumerate(order):
        cum += p[idx]
        if cum > typical_p:
            last = i + 1
            break
    return set(order[:last].tolist())


def ref_tail_free(logits, z):
    p = _probs(logits)
    order = np.argsort(-p, kind="stable")
    d1 = p[order][:-1] - p[order][1:]
    d2 = np.abs(d1[:-1] - d1[1:])
    d2 = d2 / d2.sum()
    cum, last = 0.0, len(p)
    for i, d in enumerate(d2):
        cum += d
        if cum > z and i >= 1:
            last = i
            break
    return set(order[:last].tolist())


def ref_mirostat(logits, mu, version, n_vocab):
    p = _probs(logits)
    order = np.argsort(-p, kind="stable")
    if version == 2:
        kept = [i for i in order if -math.log2(p[i]) <= mu]
        return set(kept or order[:1].tolist())
    sp = p[order]
    num = sum(
        math.log((i + 2) / (i + 1)) * math.log(sp[i] / sp[i + 1])
        for i in range(min(99, len(sp) - 1))
    )
    den = sum(math.log((i + 2) / (i + 1)) ** 2 for i in range(min(99, len(sp) - 1)))
    s_hat = num / den
    eps = s_hat - 1
    k = int(((eps * 2**mu) / (1 - n_vocab**-eps)) ** (1 / s_hat))
    return set(order[: max(1, min(k, len(sp)))].tolist())


def kept(logprobs) -> list:
    return [set(np.flatnonzero(np.isfinite(row)).tolist()) for row in np.array(logprobs)]


@pytest.fixture(scope="module")
def logits():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((4, 200)) * 2.5).astype(np.float32)


@pytest.mark.parametrize("typical_p", [0.05, 0.3, 0.7, 0.95])
def test_typical_matches_llama_cpp(logits, typical_p):
    ours = kept(samplers.apply_typical(mx.array(logits), typical_p))
    assert ours == [ref_typical(row.astype(np.float64), typical_p) for row in logits]


@pytest.mark.parametrize("z", [0.2, 0.5, 0.9, 0.99])
def test_tail_free_matches_llama_cpp(logits, z):
    ours = kept(samplers.apply_tail_free(mx.array(logits), z))
    assert ours == [ref_tail_free(row.astype(np.float64), z) for row in logits]


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("mu", [0.5, 3.0, 6.0, 10.0])
def test_mirostat_truncation_matches_llama_cpp(logits, version, mu):
    rows = samplers.mirostat_keep(mx.array(logits), mx.full((4,), mu), version)
    expected = [ref_mirostat(row.astype(np.float64), mu, version, 200) for row in logits]
    assert kept(rows) == expected
    assert np.allclose(np.exp(np.array(rows)).sum(axis=-1), 1.0, atol=1e-5)


def test_mirostat_moves_mu_towards_tau(logits):
    row = mx.array(logits[:1])
    token, mu = samplers.mirostat_step(row, mx.array([2.0]), 2, 5.0, 0.1, mx.random.key(0))
    kept_lp = np.array(samplers.mirostat_keep(row, mx.array([2.0]), 2))[0]
    observed = -kept_lp[token.item()] / math.log(2)
    assert mu.item() == pytest.approx(2.0 - 0.1 * (observed - 5.0), rel=1e-5)


def test_xtc_drops_all_top_choices_but_the_least_likely(logits):
    lp = mx.array(logits)
    probs = _probs(logits[0].astype(np.float64))
    above = np.flatnonzero(probs > 0.05)
    out = kept(
        samplers.apply_xtc(lp[:1], 1.0, 0.05, mx.array([], dtype=mx.int32), mx.random.key(0))
    )
    assert len(above) >= 2
    assert out[0] == set(range(200)) - set(above.tolist()) | {int(above[probs[above].argmin()])}
    special = mx.array([int(above[0])], dtype=mx.int32)  # EOS / newline are never dropped
    assert (
        int(above[0]) in kept(samplers.apply_xtc(lp[:1], 1.0, 0.05, special, mx.random.key(0)))[0]
    )
    assert kept(samplers.apply_xtc(lp[:1], 0.0, 0.05, special, mx.random.key(0)))[0] == set(
        range(200)
    )
    # the coin comes from the request's key: the same key, the same decisions
    draws = [kept(samplers.apply_xtc(lp, 0.5, 0.05, special, mx.random.key(k))) for k in range(8)]
    again = [kept(samplers.apply_xtc(lp, 0.5, 0.05, special, mx.random.key(k))) for k in range(8)]
    assert draws == again and len({str(d) for d in draws}) > 1


# -- over gRPC ----------------------------------------------------------------------------------


def load(srv, model_dir, options=(), **fields):
    return srv.stub.LoadModel(
        pb.ModelOptions(
            Model=model_dir.name, ModelPath=str(model_dir.parent), Options=list(options), **fields
        ),
        timeout=120,
    )


def text(srv, request) -> str:
    return srv.stub.Predict(request, timeout=120).message.decode()


def test_localai_neutral_values_change_nothing(trained_server):
    assert text(trained_server, completion(**NEUTRAL)) == text(trained_server, completion())
    assert text(trained_server, sampled(Seed=7, **NEUTRAL)) == text(trained_server, sampled(Seed=7))


def test_typical_tail_free_and_mirostat_are_applied(trained_server):
    greedy = text(trained_server, completion())
    # plain sampling at this temperature differs by seed (the tiny model's likeliest story comes
    # back for about half of the seeds)
    seeds = range(1, 9)
    free = {text(trained_server, sampled(Seed=s)) for s in seeds}
    assert len(free) >= 3
    # a tiny typical mass keeps one token per step: every seed gives the same reply
    typical = {text(trained_server, sampled(Seed=s, TypicalP=0.001)) for s in seeds}
    assert len(typical) == 1
    # Mirostat 2 with a near-zero target surprise keeps only the most likely token: greedy
    assert text(trained_server, sampled(Seed=5, Mirostat=2, MirostatTAU=0.001)) == greedy
    # seeded and reproducible; Mirostat 1 and tail-free too
    for fields in (
        dict(Mirostat=2, MirostatTAU=3.0),
        dict(Mirostat=1, MirostatTAU=3.0),
        dict(TailFreeSamplingZ=0.5),
        dict(TypicalP=0.5),
    ):
        a, b = (text(trained_server, sampled(Seed=11, **fields)) for _ in range(2))
        assert a == b, fields


def test_sampler_fields_inside_the_batch_equal_solo(trained_server):
    requests = [
        sampled(Seed=3, Mirostat=2, MirostatTAU=3.0),
        sampled(Seed=4, Mirostat=1, MirostatTAU=3.0),
        sampled(Seed=5, TypicalP=0.6),
        sampled(Seed=6, TailFreeSamplingZ=0.6),
    ]
    solo = [text(trained_server, r) for r in requests]
    together = [None] * len(requests)

    def call(i):
        together[i] = text(trained_server, requests[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == solo


@pytest.mark.parametrize(
    "fields, words",
    [
        (dict(Mirostat=3), "Mirostat must be 0"),
        (dict(TypicalP=-0.5), "TypicalP"),
        (dict(TailFreeSamplingZ=-1.0), "TailFreeSamplingZ"),
        (dict(MirostatTAU=-1.0, Mirostat=2), "MirostatTAU"),
        (dict(NegativePrompt="ugly"), "NegativePrompt"),
        (dict(RopeFreqBase=50000.0), "RopeFreqBase"),
    ],
)
def test_fields_we_cannot_honour_are_refused(trained_server, fields, words):
    with pytest.raises(grpc.RpcError) as err:
        trained_server.stub.Predict(completion(Temperature=0.7, **fields), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.value.details(), err.value.details()
    assert trained_server.healthy()


def test_sampling_options_act_as_defaults(trained_dir, trained_server):
    greedy = text(trained_server, completion())
    srv = Server()
    try:
        reply = load(srv, trained_dir, ["top_k:1", "max_tokens:6", "temp:1.5"])
        assert reply.success, reply.message
        final = list(srv.stub.PredictStream(completion(Tokens=0), timeout=60))[-1]
        assert final.tokens == 6  # max_tokens when the request says 0
        # Temperature 0 and TopK 0 are "unset": Options temp 1.5 with top_k 1 samples greedily
        assert text(srv, completion(Seed=99)) == greedy
        assert text(srv, completion(Temperature=1.5, Seed=98)) == greedy
        # a request's own TopK wins over the Options one
        assert text(srv, completion(Temperature=1.5, TopK=50, Seed=98)) != greedy
    finally:
        srv.stop()
    srv = Server()
    try:
        assert load(srv, trained_dir, ["seed:7"]).success
        # Options seed fills a request's Seed 0
        assert text(srv, sampled(Seed=0)) == text(srv, sampled(Seed=7))
    finally:
        srv.stop()


def test_xtc_options(trained_dir, trained_server):
    srv = Server()
    try:
        assert load(srv, trained_dir, ["xtc_probability:1", "xtc_threshold:0.01"]).success
        with_xtc = [text(srv, sampled(Seed=s, Tokens=40)) for s in (1, 1, 2)]
        assert with_xtc[0] == with_xtc[1]  # the coin is the request's: seeded
        assert with_xtc[0] != text(trained_server, sampled(Seed=1, Tokens=40))
        stub = srv.stub
        assert stub.LoadModel(
            pb.ModelOptions(Model=str(trained_dir), Options=["xtc_threshold:0.7"]), timeout=120
        ).success
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(sampled(Seed=1), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "xtc_threshold" in err.value.details()
    finally:
        srv.stop()


def test_max_cache_entries_and_eos_token_options(trained_dir):
    eos, expected = eos_option(trained_dir)
    srv = Server()
    try:
        assert load(srv, trained_dir, ["max_cache_entries:1", eos]).success
        breakdown = srv.stub.Status(pb.HealthMessage(), timeout=10).memory.breakdown
        assert breakdown["prompt_cache_max_entries"] == 1
        final = list(srv.stub.PredictStream(completion(Tokens=100), timeout=60))
        assert b"".join(r.message for r in final).decode() == expected
    finally:
        srv.stop()


def custom_code_copy(model: Path, folder: Path) -> Path:
    """A copy of `model` whose tokenizer class exists only in the folder's own code."""
    shutil.copytree(model, folder)
    (folder / "custom_tokenizer.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "custom_tokenizer.CustomTokenizer"]}
    config["tokenizer_class"] = "CustomTokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def eos_option(model: Path) -> tuple[str, str]:
    """Options eos_token naming a token inside the tiny completion, and the text it stops at."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    ids = tok.encode(tm.COMPLETION_TEXT, add_special_tokens=False)
    stop_at = next(i for i in range(4, len(ids)) if ids.index(ids[i]) == i)  # first occurrence
    return f"eos_token:{tok.convert_ids_to_tokens(ids[stop_at])}", tok.decode(ids[:stop_at])


def test_trust_remote_code(trained_dir, tmp_path):
    """A tokenizer with custom code loads only with TrustRemoteCode or Options trust_remote_code."""
    folder = custom_code_copy(trained_dir, tmp_path / "custom-code")
    srv = Server()
    try:
        with pytest.raises(grpc.RpcError) as err:
            load(srv, folder)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "trust_remote_code" in err.value.details(), err.value.details()
        assert srv.healthy()
        assert load(srv, folder, ["trust_remote_code:true"]).success
        assert text(srv, completion(Tokens=5))
        assert load(srv, folder, TrustRemoteCode=True).success
    finally:
        srv.stop()


def test_rope_overrides_and_grammar_triggers(trained_dir):
    srv = Server()
    try:
        with pytest.raises(grpc.RpcError) as err:
            load(srv, trained_dir, RopeFreqBase=500000.0)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "RopeFreqBase" in err.value.details()
        triggers = [pb.GrammarTrigger(word="<tool_call>")]
        assert load(srv, trained_dir, GrammarTriggers=triggers).success
        assert text(srv, completion(Tokens=5))  # no grammar: the triggers do not matter
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.Predict(completion(Grammar='root ::= "yes"'), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "GrammarTriggers" in err.value.details()
        assert srv.healthy()
    finally:
        srv.stop()
