#!/usr/bin/env python
"""KV-cache benchmarks on SmolLM2-135M-Instruct, in one process with mlx-lm (issue 18).

decode      ms per generated token at --context tokens for each KV type (float, q8_0 / q4_0
            rotated, q8_0 keys with q4_0 values, and kv_rotate:false with mlx-lm's quantized
            attention), in interleaved rounds (side by side), the cache trimmed back after each;
            also each type's prefill time.
agreement   teacher-forced top-1 agreement of each quantized KV type with the float KV over
            --context tokens of prose, per Options kv_window and per --chunk (tokens per forward
            pass: 1 is what decoding sees, 256 a prefill), and the bytes kept at 8k ÷ float32.
turn-floor  what an agent turn costs raw mlx-lm at best: --new tokens prefilled over a cached
            --history of N tokens, against a cold prefill of the same N + new tokens (chunks of
            512, as the server's default prefill_chunk); the ratio bounds every server built on
            mlx-lm on this machine. With --cpu-softmax, the rows alternate MLX's attention
            and Options cpu_softmax:numpy's (text/cpu_softmax.py), side by side.

LD_PRELOAD=…/libopenblas.so.0 python scripts/bench_kv.py decode [--context 2048]
LD_PRELOAD=…/libopenblas.so.0 python scripts/bench_kv.py agreement [--context 2048] [--chunk 1 256] [--window 0 128]
LD_PRELOAD=…/libopenblas.so.0 python scripts/bench_kv.py turn-floor [--history 3900 6700] [--cpu-softmax]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlxbackend.text.generate import DEFAULT_PREFILL_CHUNK as CHUNK  # noqa: E402


def text_tokens(tokenizer, n: int) -> list:
    """n tokens of English prose (the GPL-3 text the KV tests use)."""
    from tests.test_kv_quant import long_text

    ids = tokenizer.encode(long_text() * 8)
    assert len(ids) >= n, f"only {len(ids)} tokens of text"
    return ids[:n]


def prefill(model, cache, tokens: list):
    import mlx.core as mx

    from mlxbackend.text import cpu_softmax

    for start in range(0, len(tokens), CHUNK):
        with cpu_softmax.scope(model):  # Options cpu_softmax, as the server's prefill
            logits = model(mx.array(tokens[start : start + CHUNK])[None], cache=cache)
        mx.eval(logits, [c.state for c in cache])
    return logits


def decode(model, tokenizer, context: int, steps: int, rounds: int) -> None:
    import mlx.core as mx

    from mlxbackend.text.kv_quant import KvType, make_cache

    types = {
        "float": None,
        "q8_0, rotated": KvType(8, 8),
        "q4_0, rotated": KvType(4, 4),
        "q4_0, rotated, kv_window:0": KvType(4, 4, window=0),
        "K q8_0, V q4_0, rotated": KvType(8, 4),
        "q8_0, kv_rotate:false (quantized attention)": KvType(8, 8, rotate=False),
        "q4_0, kv_rotate:false (quantized attention)": KvType(4, 4, rotate=False),
    }
    tokens = text_tokens(tokenizer, context)
    caches, last, prefill_s = {}, {}, {}
    for name, kv in types.items():
        cache = make_cache(model, kv)
        started = time.perf_counter()
        logits = prefill(model, cache, tokens)
        prefill_s[name] = time.perf_counter() - started
        caches[name], last[name] = cache, mx.argmax(logits[0, -1]).reshape(1, 1)
    times = {name: [] for name in types}
    for _ in range(rounds):
        for name in types:
            cache, y = caches[name], last[name]
            mx.eval(model(y, cache=cache))  # the first step after a trim grows nothing new
            started = time.perf_counter()
            for _ in range(steps):
                y = mx.argmax(model(y, cache=cache)[0, -1]).reshape(1, 1)
                mx.eval(y)
            times[name].append((time.perf_counter() - started) / steps * 1000)
            for c in cache:
                c.trim(steps + 1)
    base = statistics.median(times["float"])
    print(f"| KV type | prefill {context} s | ms / token at {context} | float ÷ this |")
    print("|---|---|---|---|")
    for name, ms in times.items():
        med = statistics.median(ms)
        print(f"| {name} | {prefill_s[name]:.1f} | {med:.0f} | {base / med:.2f} |")


def turn_floor(
    model, tokenizer, histories: list, new: int, repeats: int, softmaxes=("mlx",)
) -> None:
    from mlx_lm.models.cache import make_prompt_cache

    from mlxbackend.text import cpu_softmax

    print(
        "| softmax | history | new | cold prefill s | new tokens over the cached history s | ratio |"
    )
    print("|---|---|---|---|---|---|")
    for history in histories:
        tokens = text_tokens(tokenizer, history + new)
        colds, warms, cached = {}, {}, {}
        for softmax in softmaxes:
            cpu_softmax.enable(model, {"cpu_softmax": softmax})
            cached[softmax] = make_prompt_cache(model)
            prefill(model, cached[softmax], tokens[:history])
            colds[softmax], warms[softmax] = [], []
        for _ in range(repeats):  # alternating, so all see the same machine
            for softmax in softmaxes:
                cpu_softmax.enable(model, {"cpu_softmax": softmax})
                started = time.perf_counter()
                prefill(model, make_prompt_cache(model), tokens)
                colds[softmax].append(time.perf_counter() - started)
                started = time.perf_counter()
                prefill(model, cached[softmax], tokens[history:])
                warms[softmax].append(time.perf_counter() - started)
                for c in cached[softmax]:
                    c.trim(new)
        for softmax in softmaxes:
            cold, warm = statistics.median(colds[softmax]), statistics.median(warms[softmax])
            print(
                f"| {softmax} | {history} | {new} | {cold:.1f} | {warm:.2f} | {warm / cold:.3f} |",
                flush=True,
            )
    cpu_softmax.enable(model, {})


def top1(model, tokens: list, kv, chunk: int):
    """Teacher-forced top-1 token at every position, fed `chunk` tokens per forward pass."""
    import mlx.core as mx
    import numpy as np

    from mlxbackend.text.kv_quant import make_cache

    cache, out = make_cache(model, kv), []
    for start in range(0, len(tokens), chunk):
        logits = model(mx.array(tokens[start : start + chunk])[None], cache=cache)
        best = mx.argmax(logits[0], axis=-1)
        mx.eval(best)
        out.append(best)
    return np.array(mx.concatenate(out))


def kv_bytes_ratio(model, kv, context: int = 8192) -> float:
    """Bytes one cache keeps at `context` tokens ÷ the float32 KV's."""
    import mlx.core as mx

    from mlxbackend.text.kv_quant import make_cache

    heads, head_dim = (
        model.args.num_key_value_heads,
        model.args.hidden_size // model.args.num_attention_heads,
    )
    sizes = []
    for kind in (None, kv):
        cache = make_cache(model, kind)[0]
        for _ in range(context // 512):
            k = mx.random.normal((1, heads, 512, head_dim)).astype(mx.float32)
            cache.update_and_fetch(k, k)
        sizes.append(cache.nbytes)
    return sizes[1] / sizes[0]


def agreement(model, tokenizer, context: int, chunks: list, windows: list) -> None:
    """Top-1 agreement with the float KV, teacher-forced over `context` tokens of prose, for each
    KV type and float window, each fed in passes of each chunk size (1 = as decoding sees it)."""
    import numpy as np

    from mlxbackend.text.kv_quant import KvType

    tokens = text_tokens(tokenizer, context)
    types = {"q8_0": (8, 8), "q4_0": (4, 4), "K q8_0, V q4_0": (8, 4)}
    print("| KV type | kv_window | passes of | top-1 agreement | bytes ÷ float32 at 8k |")
    print("|---|---|---|---|---|")
    for chunk in chunks:
        reference = top1(model, tokens, None, chunk)
        for name, (k, v) in types.items():
            for window in windows:
                kv = KvType(k, v, window=window)
                same = float(np.mean(top1(model, tokens, kv, chunk) == reference))
                ratio = kv_bytes_ratio(model, kv)
                print(f"| {name} | {window} | {chunk} | {same:.1%} | {ratio:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["decode", "turn-floor", "agreement"])
    parser.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--history", type=int, nargs="+", default=[3900, 6700])
    parser.add_argument("--new", type=int, default=370)
    parser.add_argument("--chunk", type=int, nargs="+", default=[1, 256], help="agreement")
    parser.add_argument("--window", type=int, nargs="+", default=[0, 128], help="agreement")
    parser.add_argument(
        "--cpu-softmax", action="store_true", help="turn-floor: also with cpu_softmax:numpy"
    )
    args = parser.parse_args()
    from mlx_lm import load

    model, tokenizer = load(args.model)
    if args.what == "decode":
        decode(model, tokenizer, args.context, args.steps, args.rounds)
    elif args.what == "agreement":
        agreement(model, tokenizer, args.context, args.chunk, args.window)
    else:
        softmaxes = ("mlx", "numpy") if args.cpu_softmax else ("mlx",)
        turn_floor(model, tokenizer, args.history, args.new, args.rounds, softmaxes)


if __name__ == "__main__":
    main()
