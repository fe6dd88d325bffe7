"""Quantized KV caches (mlxbackend/text/kv_quant.py): the batch operations on random stores,
SmolLM2 teacher-forced against its float KV (top-1 agreement) and the bytes kept at 8k tokens,
and over gRPC LocalAI's CacheTypeKey / CacheTypeValue: concurrent requests equal their solo runs,
the prefix cache and saved prompt caches, grammar and a draft model on top, bad types refused."""

import json
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from mlxbackend.proto import backend_pb2 as pb
from tests.conftest import ROOT, Server

GPL = Path("/usr/share/common-licenses/GPL-3")  # Debian's; else this repository's README
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village near the mountains, there lived",
    "1, 2, 3, 4,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at",
    "My favourite fruit is",
    "In 1969, the first",
]


def long_text() -> str:
    return (
        GPL.read_text() if GPL.exists() else (Path(__file__).parents[1] / "README.md").read_text()
    )


def stores_equal(a, b) -> bool:
    import mlx.core as mx

    return all(mx.array_equal(x, y).item() for x, y in zip(a, b, strict=True))


def test_batch_operations_keep_each_rows_store():
    """merge → extract, prefill with right padding → finalize, filter, extend: every row's
    quantized store equals its own single-sequence cache's, bit for bit."""
    import mlx.core as mx

    from mlxbackend.text.kv_quant import BatchQuantKVCache, KvType, QuantKVCache

    mx.random.seed(0)
    for kv in (KvType(8, 8), KvType(4, 8, 32), KvType(None, 4), KvType(8, 8, 64, rotate=False)):
        singles, data = [], []
        for n in (5, 9, 1):
            k, v = mx.random.normal((1, 2, n, 64)), mx.random.normal((1, 2, n, 64))
            c = QuantKVCache(kv)
            c.update_and_fetch(k, v)
            singles.append(c)
            data.append((k, v))
        batch = BatchQuantKVCache.merge(singles)
        for i, c in enumerate(singles):
            got = batch.extract(i)
            assert got.offset == c.offset
            assert stores_equal(got.state[0], c.state[0]) and stores_equal(got.state[1], c.state[1])
        # a right-padded prefill of two rows, rolled left by finalize
        pre = BatchQuantKVCache([0, 0], kv)
        k = mx.concatenate([data[0][0], mx.pad(data[2][0], [(0, 0), (0, 0), (0, 4), (0, 0)])])
        v = mx.concatenate([data[0][1], mx.pad(data[2][1], [(0, 0), (0, 0), (0, 4), (0, 0)])])
        pre.prepare(lengths=[5, 1], right_padding=[0, 4])
        pre.update_and_fetch(k, v)
        pre.finalize()
        for row, single in ((0, singles[0]), (1, singles[2])):
            got = pre.extract(row)
            assert got.offset == single.offset and stores_equal(got.state[0], single.state[0])
        # filter to one row, then extend with the other batch
        batch.filter([1])
        batch.extend(pre)
        for row, single in enumerate((singles[1], singles[0], singles[2])):
            got = batch.extract(row)
            assert got.offset == single.offset
            assert stores_equal(got.state[1], single.state[1])
        # one more decode step on the extended batch: each row's new entry is its own
        step_k, step_v = mx.random.normal((3, 2, 1, 64)), mx.random.normal((3, 2, 1, 64))
        batch.update_and_fetch(step_k, step_v)
        for row, single in enumerate((singles[1], singles[0], singles[2])):
            single.update_and_fetch(step_k[row : row + 1], step_v[row : row + 1])
            assert stores_equal(batch.extract(row).state[0], single.state[0])
        # fetched keys: quantized triples for mlx-lm's quantized attention when both sides
        # share a width unrotated, else float (rotated back)
        fetched = singles[0].update_and_fetch(step_k[:1], step_v[:1])[0]
        assert isinstance(fetched, tuple) == (kv.key_bits == kv.value_bits and not kv.rotate)
        if kv.rotate and kv.key_bits == 8:  # rotated 8-bit reads back within 1 % of the keys
            err = mx.abs(fetched[..., -1:, :] - step_k[:1]).max().item()
            assert err < 0.01 * mx.abs(step_k[:1]).max().item() * 4, err


def test_smollm2_teacher_forced_agreement_and_bytes(smollm2_dir):
    """SmolLM2 over 2048 tokens of prose, teacher-forced: the top-1 token at every position
    against the float KV's, issue 18's ≥ 99 % at 8 bits and ≥ 95 % at 4 bits, fed in passes of
    256 tokens (a prefill) and, at 4 bits, one token per pass as decoding reads the cache (over
    the first 1024); the float window (kv_window, default 128) is what lifts 4 bits from ~84 %
    (README, "Quantized KV cache"); without it 4 bits stay below 90 %. And the bytes a cache
    keeps at 8192 tokens against the float32 KV's (≤ 0.3 at 8 bits, ≤ 0.18 at 4 bits)."""
    from mlx_lm import load

    from mlxbackend.text.kv_quant import KvType
    from scripts.bench_kv import kv_bytes_ratio, top1

    model, tokenizer = load(str(smollm2_dir))
    tokens = tokenizer.encode(long_text())[:2048]
    assert len(tokens) == 2048
    reference = top1(model, tokens, None, 256)
    figures = {}
    for kv, least_agreement, most_bytes in (
        (KvType(8, 8), 0.99, 0.3),
        (KvType(4, 4), 0.95, 0.18),
        (KvType(4, 4, window=0), 0.0, 0.18),
    ):
        agreement = float(np.mean(top1(model, tokens, kv, 256) == reference))
        ratio = kv_bytes_ratio(model, kv)
        figures[kv.label()] = (agreement, ratio)
        assert agreement >= least_agreement, figures
        assert ratio <= most_bytes, figures
    assert figures[KvType(4, 4, window=0).label()][0] < 0.9, figures  # the window does it
    decoding = top1(model, tokens[:1024], None, 1)
    agreement = float(np.mean(top1(model, tokens[:1024], KvType(4, 4), 1) == decoding))
    figures["4-bit, one token per pass"] = agreement
    assert agreement >= 0.95, figures
    print("teacher-forced top-1 agreement, KV bytes at 8k ÷ float32:", figures)


@pytest.fixture(scope="module")
def q8_server(smollm2_dir):
    srv = Server()
    reply = srv.stub.LoadModel(
        pb.ModelOptions(Model=str(smollm2_dir), CacheTypeKey="q8_0", CacheTypeValue="q8_0"),
        timeout=300,
    )
    assert "KV cache K 8-bit, V 8-bit, group 64, rotated, last 128 in float" in reply.message
    assert srv.stub.Status(pb.HealthMessage()).memory.breakdown["kv_window"] == 128
    yield srv
    srv.stop()


def predict(srv, prompt, **kw):
    options = dict(Prompt=prompt, Tokens=16, Temperature=0, **kw)
    return srv.stub.Predict(pb.PredictOptions(**options), timeout=300).message.decode()


def long_prompts() -> list:
    """PROMPTS after 1,500-3,600 characters of text (~300-730 tokens, each length different): at
    these lengths OpenBLAS rounds a padded row's attention differently from the row alone."""
    text = long_text()
    return [f"{text[: 1500 + 300 * i]}\n\n{p}" for i, p in enumerate(PROMPTS)]


def scored(srv, prompt) -> list:
    """A greedy reply's 16 tokens as (id, top-1 minus top-2 logprob)."""
    reply = srv.stub.Predict(
        pb.PredictOptions(
            Prompt=prompt, Tokens=16, Temperature=0, Logprobs=1, TopLogprobs=2, IgnoreEOS=True
        ),
        timeout=300,
    )
    content = json.loads(reply.logprobs)["content"]
    return [
        (c["id"], c["top_logprobs"][0]["logprob"] - c["top_logprobs"][1]["logprob"])
        for c in content
    ]


def first_difference(a: list, b: list) -> int | None:
    ids_a, ids_b = [t for t, _ in a], [t for t, _ in b]
    if ids_a == ids_b:
        return None
    return next(i for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=True)) if x != y)


def test_float_window_in_a_batch_is_each_rows_own():
    """The float window (Options kv_window): after merge, decode steps, filter, extend with a
    prefilled batch, extract and a trim, every row's fetched keys and values equal its own
    single-sequence cache's, bit for bit; the window is float (exact), older positions are
    dequantized; the window takes its bytes only."""
    import mlx.core as mx

    from mlxbackend.text.kv_quant import BatchQuantKVCache, KvType, QuantKVCache

    mx.random.seed(1)
    kv = KvType(4, 4, window=6)

    def kv_pair(rows: int, n: int) -> tuple:
        return mx.random.normal((rows, 2, n, 64)), mx.random.normal((rows, 2, n, 64))

    singles, prompts = [], []
    for n in (12, 3, 0):
        c = QuantKVCache(kv)
        if n:
            prompts.append(kv_pair(1, n))
            assert mx.array_equal(c.update_and_fetch(*prompts[-1])[0], prompts[-1][0])  # float
        singles.append(c)
    # a one-token pass: it and the 6 positions before it float, the older 6 dequantized
    keys = QuantKVCache.merge(singles[:1]).update_and_fetch(*kv_pair(1, 1))[0]
    assert mx.array_equal(keys[..., 6:12, :], prompts[0][0][..., 6:, :])
    error = mx.abs(keys[..., :6, :] - prompts[0][0][..., :6, :]).max().item()
    assert 0 < error < 1.5, error
    batch = BatchQuantKVCache.merge(singles)

    def step(batch, singles) -> None:
        k, v = kv_pair(len(singles), 1)
        keys, values = batch.update_and_fetch(k, v)
        pads = batch.left_padding.tolist()
        for row, single in enumerate(singles):
            alone = single.update_and_fetch(k[row : row + 1], v[row : row + 1])
            p = pads[row]
            assert mx.array_equal(keys[row : row + 1, :, p:], alone[0]), row
            assert mx.array_equal(values[row : row + 1, :, p:], alone[1]), row

    for _ in range(8):
        step(batch, singles)
    batch.filter([0, 2])
    singles = [singles[0], singles[2]]
    step(batch, singles)
    other_singles = []
    for n in (20, 2):
        c = QuantKVCache(kv)
        c.update_and_fetch(*kv_pair(1, n))
        other_singles.append(c)
    batch.extend(BatchQuantKVCache.merge(other_singles))
    singles += other_singles
    for _ in range(3):
        step(batch, singles)
    for row, single in enumerate(singles):
        got = batch.extract(row)
        assert got.offset == single.offset
        assert all(mx.array_equal(a, b) for a, b in zip(got.recent, single.recent, strict=True))
    # a trim (a rejected draft) shortens the window: those positions come dequantized, alike
    batch.trim(2)
    for single in singles:
        single.trim(2)
    step(batch, singles)
    # bytes: the stores plus `window` float positions
    c = QuantKVCache(kv)
    c.update_and_fetch(*kv_pair(1, 64))
    stores = sum(a.nbytes for a in (*c.keys, *c.values))
    assert c.nbytes == stores + 2 * 2 * 6 * 64 * 4


def test_rows_apart_attend_as_one_row():
    """kv_quant.rows_apart: a batch's one-token attention over left-padded keys equals, row by
    row and to the last bit, each row's attention alone over its own keys."""
    import mlx.core as mx
    from mlx_lm.models.base import create_causal_mask

    from mlxbackend.text.kv_quant import rows_apart

    mx.random.seed(3)
    pads, length = [0, 5, 9], 40
    q = mx.random.normal((3, 4, 1, 64))
    k, v = mx.random.normal((3, 4, length, 64)), mx.random.normal((3, 4, length, 64))
    mask = create_causal_mask(1, offset=length - 1, left_padding=mx.array(pads))
    sdpa = mx.fast.scaled_dot_product_attention
    with rows_apart():
        batched = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
    assert mx.fast.scaled_dot_product_attention is sdpa  # put back
    for b, p in enumerate(pads):
        alone = sdpa(
            q[b : b + 1],
            k[b : b + 1, :, p:],
            v[b : b + 1, :, p:],
            scale=0.125,
            mask=mx.ones((1, 1, 1, length - p), dtype=mx.bool_),
        )
        assert mx.array_equal(batched[b : b + 1], alone)
    # mlx-lm's quantized attention (kv_rotate:false) on the quantized triples
    from mlx_lm.models import base

    qk, qv = mx.quantize(k, group_size=64, bits=8), mx.quantize(v, group_size=64, bits=8)
    quantized = base.quantized_scaled_dot_product_attention
    with rows_apart():
        batched = base.quantized_scaled_dot_product_attention(
            q, qk, qv, scale=0.125, mask=mask, group_size=64, bits=8
        )
    assert base.quantized_scaled_dot_product_attention is quantized
    for b, p in enumerate(pads):
        alone = quantized(
            q[b : b + 1],
            tuple(a[b : b + 1, :, p:] for a in qk),
            tuple(a[b : b + 1, :, p:] for a in qv),
            scale=0.125,
            mask=mx.ones((1, 1, 1, length - p), dtype=mx.bool_),
            group_size=64,
            bits=8,
        )
        assert mx.array_equal(batched[b : b + 1], alone)


@pytest.mark.parametrize("types", [("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "q4_0")])
def test_concurrent_requests_equal_their_solo_runs(smollm2_dir, types):
    """8 requests at once with a quantized KV (one type per run), each against the same request
    run alone with the same KV type: the same 16 tokens with the same logprobs, to the last bit.
    The prompts are 300-730 tokens long, each a different length, so the batch pads its rows.
    Over padded keys OpenBLAS rounds a row's attention ~1e-7 differently from the row alone, and
    the quantizer turns that into whole quantization steps (logits 0.18 apart after 12 steps at
    8 bits); the batch attends row by row (kv_quant.rows_apart), and without that this test
    fails. The prompt cache is off, so that both runs compute every prompt token the same way.
    Status counts the quantized widths."""
    srv = Server()
    prompts = long_prompts()
    try:
        reply = srv.stub.LoadModel(
            pb.ModelOptions(
                Model=str(smollm2_dir),
                CacheTypeKey=types[0],
                CacheTypeValue=types[1],
                Options=["prompt_cache:false"],
            ),
            timeout=300,
        )
        assert "KV cache" in reply.message
        solo = [scored(srv, p) for p in prompts]
        got = [None] * len(prompts)

        def run(i):
            got[i] = scored(srv, prompts[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        parted = {i: first_difference(solo[i], got[i]) for i in range(len(PROMPTS))}
        assert not any(at is not None for at in parted.values()), parted
        assert got == solo  # the logprobs too, to the last bit
        status = srv.stub.Status(pb.HealthMessage()).memory.breakdown
        bits = {"q8_0": 8, "q4_0": 4}
        assert (status["kv_key_bits"], status["kv_value_bits"]) == (bits[types[0]], bits[types[1]])
    finally:
        srv.stop()


def test_prefix_cache_grammar_and_draft_on_quantized_kv(q8_server, smollm2_dir, tmp_path):
    """A second turn reuses the first's quantized KV; a JSON schema still holds; a draft model
    (SmolLM2 drafting for itself) gives the plain greedy reply."""
    srv = q8_server
    first = "The capital of France is Paris. The capital of Germany is"
    predict(srv, first)
    reply = srv.stub.Predict(
        pb.PredictOptions(Prompt=first + " Berlin. The capital of Italy is", Tokens=4),
        timeout=300,
    )
    prefilled = srv.stub.GetMetrics(pb.MetricsRequest(), timeout=30).prompt_tokens_processed
    assert reply.message and 0 < prefilled < reply.prompt_tokens - 10, (prefilled, reply)
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    out = srv.stub.Predict(
        pb.PredictOptions(
            Prompt="Name a city as JSON:", Tokens=40, Metadata={"json_schema": json.dumps(schema)}
        ),
        timeout=300,
    ).message.decode()
    assert "city" in json.loads(out)
    plain = predict(srv, PROMPTS[0])
    draft = Server()
    try:
        draft.stub.LoadModel(
            pb.ModelOptions(
                Model=str(smollm2_dir),
                DraftModel=str(smollm2_dir),
                CacheTypeKey="q8_0",
                CacheTypeValue="q8_0",
            ),
            timeout=300,
        )
        assert predict(draft, PROMPTS[0]) == plain
    finally:
        draft.stop()


def test_saved_prompt_cache_round_trip(tmp_path):
    """save_prompt_cache / load_prompt_cache (prompt_cache_dir) keep a QuantKVCache as it was."""
    import mlx.core as mx
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    from mlxbackend.text.kv_quant import KvType, QuantKVCache

    cache = QuantKVCache(KvType(8, 4, 32, rotate=False))
    cache.update_and_fetch(mx.random.normal((1, 2, 7, 64)), mx.random.normal((1, 2, 7, 64)))
    save_prompt_cache(str(tmp_path / "c.safetensors"), [cache])
    (back,) = load_prompt_cache(str(tmp_path / "c.safetensors"))
    assert isinstance(back, QuantKVCache) and back.kv == cache.kv and back.offset == 7
    assert stores_equal(back.state[0], cache.state[0]) and stores_equal(
        back.state[1], cache.state[1]
    )


def test_bad_cache_types(q8_server, tiny_dir, smollm2_dir):
    srv = q8_server
    cases = [
        (dict(Model=str(smollm2_dir), CacheTypeKey="q9_9"), "q9_9"),
        (dict(Model=str(smollm2_dir), Options=["kv_bits:7"]), "kv_bits"),
        (dict(Model=str(smollm2_dir), Options=["kv_group_size:48"]), "kv_group_size"),
        (dict(Model=str(smollm2_dir), CacheTypeKey="q4_0", Options=["kv_window:-1"]), "kv_window"),
        (dict(Model=str(tiny_dir), CacheTypeKey="q8_0"), "head dimension"),  # 24: no group fits
    ]
    for fields, words in cases:
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.LoadModel(pb.ModelOptions(**fields), timeout=120)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
        assert words in err.value.details(), err.value.details()
        assert srv.healthy()
    # f16 / empty keep the float KV
    reply = srv.stub.LoadModel(
        pb.ModelOptions(Model=str(smollm2_dir), CacheTypeKey="f16", CacheTypeValue="f16")
    )
    assert "KV cache" not in reply.message
    status = srv.stub.Status(pb.HealthMessage()).memory.breakdown
    assert status["kv_key_bits"] == 0 and status["kv_value_bits"] == 0


def test_bench_kv_short_runs(smollm2_dir):
    """scripts/bench_kv.py (README "Quantized KV cache", "Agent sessions"), shortened: the three
    benchmarks run and print one row per KV type / history / window."""
    bench = [sys.executable, str(ROOT / "scripts" / "bench_kv.py")]
    common = ["--model", str(smollm2_dir), "--rounds", "1"]
    decode = subprocess.run(
        [*bench, "decode", *common, "--context", "64", "--steps", "2"],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout  # fmt: skip
    rows = [line for line in decode.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 8 and "q4_0, rotated, kv_window:0" in decode, decode
    agreement = subprocess.run(
        [*bench, "agreement", "--model", str(smollm2_dir), "--context", "64", "--chunk", "16",
         "--window", "0", "16"],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout  # fmt: skip
    rows = [line for line in agreement.splitlines() if line.startswith("| q")]
    assert len(rows) == 4 and "| q4_0 | 16 | 16 |" in agreement, agreement
    floor = subprocess.run(
        [*bench, "turn-floor", *common, "--history", "96", "--new", "16", "--cpu-softmax"],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout  # fmt: skip
    assert floor.splitlines()[-2].startswith("| mlx | 96 | 16 |"), floor
    assert floor.splitlines()[-1].startswith("| numpy | 96 | 16 |"), floor
