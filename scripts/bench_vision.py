#!/usr/bin/env python
"""Vision-language serving efficiency: image prompts through a backend process (spawn_server +
LoadModel, PredictStream as LocalAI sends it) against mlx-vlm's own `stream_generate` in this
process, on the same random Qwen2.5-VL folder, in one run. Raw and gRPC alternate (the order
flips each repeat, --pause idle seconds before each measurement) so load noise hits both;
medians of --repeats; "ratio" is the ratio of the medians (the figure the target is about),
"paired" the median of the per-repeat ratios. Four figures:

  1. decode:   gRPC decode tok/s ÷ raw decode tok/s, one stream, greedy, --tokens tokens with EOS
               blocked on both sides (IgnoreEOS / a logits processor). Decode rate = (tokens − 1) ÷
               (time of the last token − time of the first token), so TTFT is excluded: raw from
               the arrival times of stream_generate's per-token results, gRPC from the arrival
               times of PredictStream chunks at the client (GetMetrics' server-side rate is
               reported beside it). Target ≥ 0.97.
  2. TTFT:     image-prompt time to first token over gRPC ÷ raw, a new image every time (nothing
               cacheable: a fresh image and a salted system message). Clock from just before the
               call (gRPC: PredictStream with the base64 PNG; raw: PNG decode + stream_generate)
               to the first chunk with text (gRPC) / the first yielded result (raw). Target ≤ 1.05.
  3. batching: aggregate decode tok/s of --concurrency simultaneous PredictStreams, each with its
               own image ÷ the same for 1 stream: Σ(tokens − 1) ÷ (last token of any stream −
               first token of any stream), as `mlxbackend bench` measures text. Prefills that
               end before the first token fall outside that window, so the rate while all
               streams decode at once and an end-to-end rate (Σ tokens ÷ (last token − first
               request sent), image prefills included) are reported beside it. Target ≥ 3.
  4. repeat:   TTFT of a NEW conversation about an image the server has already seen (same
               bytes, a different question) ÷ TTFT of the first request about it. Two layouts:
               image first (where LocalAI puts Images: the prefix cache alone can skip the image)
               and question first (`question <__media__>`: only a vision-feature cache can skip
               the tower). Status counter deltas say what the server reused. Target ≤ 0.3.

Model: a random-weight Qwen2.5-VL in the test layout (tests/tiny_vlm.py pieces: tokenizer,
chat template, processor config) at --size small (text 512 × 8, vision 4 × 256, 64 image tokens,
~120 MB float32) or medium (text 768 × 10, vision 6 × 384, 144 image tokens, ~300 MB); the
processor resizes every image to a fixed pixel count, so each image costs the same. Random
weights decode junk, but a forward pass costs what it does on a trained model of that shape;
tokens that are no text on their own get zero embedding rows (see `silence_fragments`), so
every decoded token reaches the client as its own chunk.

  LD_PRELOAD=…/libopenblas.so.0 python scripts/bench_vision.py --size medium --json out.json
"""

import argparse
import base64
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# text: hidden × layers (MLP width, KV heads); vision: depth × hidden; side: pixels² per image
SIZES = {
    "small": dict(
        hidden=512, layers=8, intermediate=1536, kv_heads=2, vision_depth=4, vision_hidden=256,
        side=224,
    ),
    "medium": dict(
        hidden=768, layers=10, intermediate=1792, kv_heads=2, vision_depth=6, vision_hidden=384,
        side=336,
    ),
}  # fmt: skip
HEAD_DIM = 64
QUESTION = "What is in this picture?"
QUESTION_2 = "What colours are in it?"  # the new conversation's question (about as long)
REPEAT_TOKENS = 8  # measurement 4 only needs the first token


def build_qwen25_vl(out: Path, size: str, seed: int = 0) -> tuple:
    """A random Qwen2.5-VL folder (tests/tiny_vlm.py's builder) with bigger dims; every image
    becomes side × side pixels ((side/28)² tokens); returns (folder, description)."""
    from tests import tiny_vlm as tv

    d = SIZES[size]
    hidden, vhidden, depth = d["hidden"], d["vision_hidden"], d["vision_depth"]
    tv.build_qwen25_vl(
        out, seed, hidden=hidden, layers=d["layers"], intermediate=d["intermediate"],
        heads=hidden // HEAD_DIM, kv_heads=d["kv_heads"],
        mrope_section=(8, 12, 12),  # Qwen2.5-VL's [16, 24, 24] for head_dim 128, scaled
        vision_depth=depth, vision_hidden=vhidden, vision_heads=vhidden // HEAD_DIM,
        vision_intermediate=4 * vhidden, window_size=112,
        fullatt_blocks=range(depth // 2 - 1, depth, depth // 2),  # full attention every depth/2
        pixels=(d["side"] ** 2, d["side"] ** 2),
    )  # fmt: skip
    tok, _ = tv.make_tokenizer(tv.QWEN_VISION_TOKENS)
    silence_fragments(out / "model.safetensors", tok)
    mb = (out / "model.safetensors").stat().st_size / 1e6
    tokens = (d["side"] // 28) ** 2
    text = (
        f"random Qwen2.5-VL ({size}): text {hidden} × {d['layers']} layers, vision "
        f"{vhidden} × {depth} blocks, {tokens} image tokens ({d['side']}² px), vocab "
        f"{tok.get_vocab_size()}, {mb:.0f} MB float32"
    )
    return out, text


def silence_fragments(weights: Path, tok) -> None:
    """Zero the (tied) embedding rows of tokens that are no text on their own (byte fragments of
    UTF-8 characters, a lone space) and of special tokens: their logit is then 0, never the greedy maximum, so
    every generated token is visible text and the server streams it as its own chunk (a random
    model otherwise often loops on a fragment, which the streaming detokenizer holds back to the
    end, and chunk timing would see one chunk)."""
    import mlx.core as mx

    special = set(tok.get_added_tokens_decoder())
    texts = [tok.decode([i], skip_special_tokens=False) for i in range(tok.get_vocab_size())]
    # a lone space is held back one token by mlx-lm's BPE streaming detokenizer
    drop = [i for i, t in enumerate(texts) if i in special or "\ufffd" in t or t == " "]
    tensors = mx.load(str(weights))
    key = "language_model.model.embed_tokens.weight"
    rows = mx.ones((tensors[key].shape[0], 1), dtype=tensors[key].dtype)
    rows[mx.array(drop)] = 0
    tensors[key] = tensors[key] * rows
    mx.save_safetensors(str(weights), tensors, metadata={"format": "mlx"})


def png(seed: int, side: int) -> bytes:
    """A random-noise RGB PNG, different for every seed."""
    import numpy as np
    from PIL import Image

    pixels = (np.random.RandomState(seed).rand(side, side, 3) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


class Raw:
    """mlx-vlm's own load + stream_generate on the folder, in this process."""

    def __init__(self, folder: Path):
        import mlx.core as mx
        from mlx_vlm.utils import load

        self.model, self.processor = load(str(folder))
        tok = self.processor.tokenizer
        eos = mx.array(sorted(tok.stopping_criteria.eos_token_ids))
        # the server's IgnoreEOS processor (text/sampling.py): every run decodes max_tokens
        self.block = [lambda _, logits: logits.at[:, eos].add(-mx.inf)]

    def prompt(self, question: str, system: str = "") -> str:
        """The chat template on HF content parts, the image first (where the server puts it)."""
        messages = [{"role": "system", "content": system}] if system else []
        content = [{"type": "image"}, {"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        return self.processor.tokenizer.apply_chat_template(
            messages,
            chat_template=getattr(self.processor, "chat_template", None) or None,
            add_generation_prompt=True,
            tokenize=False,
        )

    def run(self, image: bytes, question: str, system: str, n_tokens: int) -> dict:
        from mlx_vlm.generate import stream_generate
        from PIL import Image

        prompt = self.prompt(question, system)
        times, text, final = [], "", None
        start = time.perf_counter()
        pil = Image.open(io.BytesIO(image)).convert("RGB")  # the server decodes its PNG too
        for r in stream_generate(
            self.model,
            self.processor,
            prompt,
            image=[pil],
            max_tokens=n_tokens,
            temperature=0.0,
            logits_processors=self.block,
        ):
            text += r.text
            if r.finish_reason is not None:  # the closing result repeats the last token
                final = r
                break
            times.append(time.perf_counter())
        return {
            "ttft_ms": (times[0] - start) * 1000,
            "decode_tps": (len(times) - 1) / (times[-1] - times[0]),
            "tokens": len(times),
            "prompt_tokens": final.prompt_tokens if final else None,
            "text": text,
        }


def request(image: bytes, question: str, n_tokens: int, system: str = ""):
    from mlxbackend.proto import backend_pb2 as pb

    messages = [pb.Message(role="system", content=system)] if system else []
    messages.append(pb.Message(role="user", content=question))
    return pb.PredictOptions(
        Messages=messages,
        UseTokenizerTemplate=True,
        Images=[base64.b64encode(image).decode()],
        Tokens=n_tokens,
        IgnoreEOS=True,
        Temperature=0,
    )


def stream(stub, req) -> dict:
    """One PredictStream; chunk arrival times at the client."""
    start = time.perf_counter()
    arrivals, text, tokens, prompt_tokens = [], b"", 0, 0
    last = start
    for reply in stub.PredictStream(req, timeout=1800):
        last = time.perf_counter()
        if reply.message:
            arrivals.append(last)
        text += reply.message
        if reply.tokens:  # the closing chunk carries the totals
            tokens, prompt_tokens = reply.tokens, reply.prompt_tokens
    if len(arrivals) < tokens // 2:
        raise RuntimeError(
            f"{tokens} tokens came in {len(arrivals)} chunks: chunk timing cannot see the decode"
        )
    first = arrivals[0]
    return {
        "start": start,
        "first": first,
        "last": last,
        "arrivals": arrivals,
        "ttft_ms": (first - start) * 1000,
        "decode_tps": (tokens - 1) / (last - first) if last > first else 0.0,
        "tokens": tokens,
        "prompt_tokens": prompt_tokens,
        "text": text.decode(errors="replace"),
    }


def concurrent(stub, images: list, n_tokens: int, salt: str) -> dict:
    """len(images) simultaneous streams: aggregate decode tok/s over the whole span (first token
    of any stream to the last of any), and over the window where all of them decode."""
    results = [None] * len(images)
    errors = []

    def one(k):
        try:
            results[k] = stream(stub, request(images[k], QUESTION, n_tokens, f"{salt}-{k}"))
        except Exception as exc:  # noqa: BLE001 — reported after the join
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    first = min(r["first"] for r in results)
    last = max(r["last"] for r in results)
    if last <= first:
        raise RuntimeError("all text arrived in one chunk: chunk timing cannot see the decode")
    agg = sum(r["tokens"] - 1 for r in results) / (last - first)
    # all streams decoding: from the last stream's first token to the first stream's last token
    lo, hi = max(r["first"] for r in results), min(r["last"] for r in results)
    steady = None
    if len(results) > 1 and hi > lo:
        chunks = sum(sum(lo < t <= hi for t in r["arrivals"]) for r in results)
        steady = chunks / (hi - lo)
    start = min(r["start"] for r in results)
    return {
        "aggregate_tps": agg,
        # the whole job, image prefills included: Σ tokens ÷ (last token − first request sent)
        "end_to_end_tps": sum(r["tokens"] for r in results) / (last - start),
        "all_decoding_tps": steady,
        "all_decoding_s": max(0.0, hi - lo),
        "span_s": last - first,
        "ttft_ms": [r["ttft_ms"] for r in results],
        "tokens": [r["tokens"] for r in results],
    }


def counters(stub) -> dict:
    """Status breakdown entries about media reuse (counters, and the vision cache's bytes where
    the server has one)."""
    from mlxbackend.proto import backend_pb2 as pb

    breakdown = dict(stub.Status(pb.HealthMessage(), timeout=30).memory.breakdown)
    keys = ("media", "vision", "feature")
    return {k: int(v) for k, v in breakdown.items() if any(s in k for s in keys)}


def repeated_image(stub, image: bytes, question_first: bool) -> dict:
    """Cold TTFT (first request about `image`), then the warm TTFT of a new conversation about
    the same bytes with another question; the server's counter deltas for the warm one."""
    from mlxbackend.vision.prompt import MARKER

    def ask(question):
        text = f"{question} {MARKER}" if question_first else question
        return stream(stub, request(image, text, REPEAT_TOKENS))

    cold = ask(QUESTION)
    before = counters(stub)
    warm = ask(QUESTION_2)
    after = counters(stub)
    delta = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    return {
        "cold_ms": cold["ttft_ms"],
        "warm_ms": warm["ttft_ms"],
        "ratio": warm["ttft_ms"] / cold["ttft_ms"],
        "status_delta": delta,
    }


def machine() -> dict:
    import mlx.core as mx

    from mlxbackend.bench import machine as describe

    try:
        from importlib.metadata import version

        vlm = version("mlx-vlm")
    except Exception:  # noqa: BLE001
        vlm = "?"
    return {
        "machine": describe(),  # system, CPU model, cores
        "mlx_device": str(mx.default_device()),
        "mlx": mx.__version__,
        "mlx_vlm": vlm,
        "python": platform.python_version(),
        "openblas_preloaded": "openblas" in os.environ.get("LD_PRELOAD", ""),
    }


def pairs(ratios) -> dict:
    """The per-repeat ratios (each pair measured back to back) and their median."""
    ratios = [round(r, 4) for r in ratios]
    return {"median_paired_ratio": med(ratios), "paired_ratios": ratios}


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="", help="a Qwen-style VLM folder (default: built here)")
    ap.add_argument("--size", choices=sorted(SIZES), default="small", help="the built model")
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded per request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument(
        "--pause",
        type=float,
        default=1.0,
        help="seconds idle before each measurement, so the other process's BLAS threads have stopped spinning",
    )
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    from mlxbackend.client import spawn_server, stop_server
    from mlxbackend.proto import backend_pb2 as pb

    host = machine()
    load_start = os.getloadavg()
    tmp = tempfile.TemporaryDirectory(prefix="mlxb-bench-vision-")
    if args.model:
        folder, described = Path(args.model).resolve(), args.model
        side = 448
    else:
        folder, described = build_qwen25_vl(Path(tmp.name) / f"qwen25-vl-{args.size}", args.size)
        side = SIZES[args.size]["side"]
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    log(f"model: {described}")
    seeds = iter(range(1000, 10**6))  # every image is new
    salt = str(time.time_ns())

    raw = Raw(folder)
    proc, stub = spawn_server()
    try:
        reply = stub.LoadModel(pb.ModelOptions(Model=str(folder)), timeout=600)
        if not reply.success:
            raise SystemExit(f"LoadModel failed: {reply.message}")

        def grpc_once(image, system):
            out = stream(stub, request(image, QUESTION, args.tokens, system))
            metrics = stub.GetMetrics(pb.MetricsRequest(), timeout=30)
            out["server_decode_tps"] = metrics.tokens_per_second
            return out

        # warm-up both sides (first-call allocations, lazy imports, BatchGenerator creation)
        raw.run(png(next(seeds), side), QUESTION, f"warm {salt}", 8)
        grpc_once(png(next(seeds), side), f"warm {salt}")
        concurrent(stub, [png(next(seeds), side) for _ in range(2)], 8, f"warm {salt}")

        # 1 + 2: one stream, a fresh image each repeat (the same one for both sides)
        single = {"raw": [], "grpc": []}
        same_text, prompt_tokens = [], set()
        for i in range(args.repeats):
            image, system = png(next(seeds), side), f"Session {salt}-{i}."
            order = ("raw", "grpc") if i % 2 == 0 else ("grpc", "raw")
            texts = {}
            for name in order:
                time.sleep(args.pause)
                if name == "raw":
                    r = raw.run(image, QUESTION, system, args.tokens)
                else:
                    r = grpc_once(image, system)
                single[name].append({k: v for k, v in r.items() if k != "arrivals"})
                texts[name] = r["text"]
                prompt_tokens.add(r["prompt_tokens"])
                log(
                    f"repeat {i + 1} {name:4s}: TTFT {r['ttft_ms']:7.1f} ms, decode "
                    f"{r['decode_tps']:6.2f} tok/s ({r['tokens']} tokens, {r['prompt_tokens']} "
                    "prompt tokens)"
                )
            same_text.append(texts["raw"] == texts["grpc"])

        # 3: aggregate decode, --concurrency streams vs 1, each stream its own new image
        conc = {1: [], args.concurrency: []}
        for i in range(args.repeats):
            for n in (1, args.concurrency) if i % 2 == 0 else (args.concurrency, 1):
                time.sleep(args.pause)
                images = [png(next(seeds), side) for _ in range(n)]
                c = concurrent(stub, images, args.tokens, f"c{n} {salt}-{i}")
                conc[n].append(c)
                steady = c["all_decoding_tps"]
                log(
                    f"repeat {i + 1} {n} stream(s): aggregate {c['aggregate_tps']:6.2f} tok/s "
                    f"over {c['span_s']:.1f} s, TTFT {min(c['ttft_ms']):.0f}–"
                    f"{max(c['ttft_ms']):.0f} ms"
                    + (
                        f", all decoding {steady:6.2f} tok/s over {c['all_decoding_s']:.1f} s"
                        if steady
                        else ""
                    )
                )

        # 4: the same image in a new conversation, image-first and question-first layouts
        repeat = {"image_first": [], "question_first": []}
        for i in range(args.repeats):
            for layout in ("image_first", "question_first"):
                time.sleep(args.pause)
                r = repeated_image(stub, png(next(seeds), side), layout == "question_first")
                repeat[layout].append(r)
                log(
                    f"repeat {i + 1} {layout}: cold {r['cold_ms']:.1f} ms, new conversation "
                    f"{r['warm_ms']:.1f} ms, ratio {r['ratio']:.3f}, Status Δ {r['status_delta']}"
                )
        final_counters = counters(stub)
    finally:
        stop_server(proc)
        tmp.cleanup()

    def mid(side_, key):
        return med(r[key] for r in single[side_])

    raw_tps, grpc_tps = mid("raw", "decode_tps"), mid("grpc", "decode_tps")
    raw_ttft, grpc_ttft = mid("raw", "ttft_ms"), mid("grpc", "ttft_ms")
    paired = list(zip(single["raw"], single["grpc"], strict=True))
    one = med(c["aggregate_tps"] for c in conc[1])
    many = med(c["aggregate_tps"] for c in conc[args.concurrency])
    many_steady = med(c["all_decoding_tps"] for c in conc[args.concurrency])
    result = {
        "machine": {**host, "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "model": described,
        "size": None if args.model else args.size,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "concurrency": args.concurrency,
        "prompt_tokens": sorted(p for p in prompt_tokens if p),
        "decode": {
            "raw_tps": raw_tps,
            "grpc_tps": grpc_tps,
            "grpc_server_side_tps": mid("grpc", "server_decode_tps"),
            "ratio": grpc_tps / raw_tps,
            **pairs(g["decode_tps"] / r["decode_tps"] for r, g in paired),
            "target": ">= 0.97",
        },
        "ttft": {
            "raw_ms": raw_ttft,
            "grpc_ms": grpc_ttft,
            "ratio": grpc_ttft / raw_ttft,
            **pairs(g["ttft_ms"] / r["ttft_ms"] for r, g in paired),
            "target": "<= 1.05",
        },
        "same_text": same_text,
        "batching": {
            "one_stream_tps": one,
            "aggregate_tps": many,
            "ratio": many / one,
            "all_decoding_tps": many_steady,
            "all_decoding_ratio": many_steady / one if many_steady else None,
            **pairs(
                m["aggregate_tps"] / o["aggregate_tps"]
                for o, m in zip(conc[1], conc[args.concurrency], strict=True)
            ),
            "end_to_end_one_tps": med(c["end_to_end_tps"] for c in conc[1]),
            "end_to_end_tps": med(c["end_to_end_tps"] for c in conc[args.concurrency]),
            "min_ttft_ms": med(min(c["ttft_ms"]) for c in conc[args.concurrency]),
            "max_ttft_ms": med(max(c["ttft_ms"]) for c in conc[args.concurrency]),
            "target": ">= 3",
        },
        "repeated_image": {
            layout: {
                "cold_ms": med(r["cold_ms"] for r in rs),
                "warm_ms": med(r["warm_ms"] for r in rs),
                "ratio": med(r["warm_ms"] for r in rs) / med(r["cold_ms"] for r in rs),
                **pairs(r["ratio"] for r in rs),
                "status_delta": rs[-1]["status_delta"],
                "target": "<= 0.3",
            }
            for layout, rs in repeat.items()
        },
        "final_status": final_counters,
        "samples": {
            "single": single,
            "concurrent": {str(n): v for n, v in conc.items()},
            "repeated_image": repeat,
        },
    }
    print_table(result, args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def print_table(res: dict, args) -> None:
    """The README table: ratio = ratio of the medians (the target's figure); paired = median of
    the per-repeat ratios (each pair measured back to back) and their range, which shows the
    machine's noise."""
    m = res["machine"]
    print(
        f"machine: {m['machine']}, MLX {m['mlx']} "
        f"{m['mlx_device']}, mlx-vlm {m['mlx_vlm']}, OpenBLAS preloaded: "
        f"{m['openblas_preloaded']}; load average {m['loadavg_start'][0]:.2f} at start, "
        f"{m['loadavg_end'][0]:.2f} at end"
    )
    print(f"model: {res['model']}; prompt {res['prompt_tokens']} tokens")
    print(
        f"{res['tokens']} tokens greedy (EOS blocked), medians of {res['repeats']} repeats, "
        f"raw and gRPC alternating; greedy texts equal: {sum(res['same_text'])}/"
        f"{len(res['same_text'])}"
    )

    def ok(ratio, target):
        op, value = target.split()
        return "yes" if (ratio >= float(value) if op == ">=" else ratio <= float(value)) else "NO"

    def row(name, base, measured, fig, digits=3):
        ratio = f"{fig['ratio']:.{digits}f}"
        each = fig["paired_ratios"]
        paired = f"{fig['median_paired_ratio']:.{digits}f} ({min(each):.2f}–{max(each):.2f})"
        return (name, base, measured, ratio, paired, fig["target"], ok(fig["ratio"], fig["target"]))

    d, t, b = res["decode"], res["ttft"], res["batching"]
    n = args.concurrency
    rows = [
        ("measurement", "baseline", "measured", "ratio", "paired (min–max)", "target", "met"),
        row(
            "1 decode tok/s, 1 stream: raw mlx-vlm | gRPC",
            f"{d['raw_tps']:.2f}",
            f"{d['grpc_tps']:.2f}",
            d,
        ),
        (
            "  (gRPC decode tok/s server-side, GetMetrics)",
            "",
            f"{d['grpc_server_side_tps']:.2f}",
            f"{d['grpc_server_side_tps'] / d['raw_tps']:.3f}",
            "",
            "",
            "",
        ),
        row(
            "2 image TTFT ms, new image: raw | gRPC", f"{t['raw_ms']:.0f}", f"{t['grpc_ms']:.0f}", t
        ),
        row(
            f"3 aggregate decode tok/s, gRPC: 1 | {n} streams",
            f"{b['one_stream_tps']:.2f}",
            f"{b['aggregate_tps']:.2f}",
            b,
            2,
        ),
    ]
    if b["all_decoding_tps"]:
        rows.append(
            (
                f"  (while all {n} streams decode)",
                "",
                f"{b['all_decoding_tps']:.2f}",
                f"{b['all_decoding_ratio']:.2f}",
                "",
                "",
                "",
            )
        )
    for layout, r in res["repeated_image"].items():
        rows.append(
            row(
                f"4 same image, new chat, {layout.replace('_', ' ')}: cold | TTFT ms",
                f"{r['cold_ms']:.0f}",
                f"{r['warm_ms']:.0f}",
                r,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(7)]
    for k, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        ]
        print("  ".join(cells).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))
    print(
        f"{n} streams: TTFT of the first stream to start {b['min_ttft_ms']:.0f} ms, of the last "
        f"{b['max_ttft_ms']:.0f} ms; end to end (request sent → last token, prefills included) "
        f"{b['end_to_end_one_tps']:.2f} tok/s for 1 stream, {b['end_to_end_tps']:.2f} for {n} "
        f"(× {b['end_to_end_tps'] / b['end_to_end_one_tps']:.2f})"
    )
    for layout, r in res["repeated_image"].items():
        print(f"Status change on the repeat ({layout.replace('_', ' ')}): {r['status_delta']}")


if __name__ == "__main__":
    sys.exit(main())
