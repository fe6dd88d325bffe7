"""Soak test: a seeded, bounded mix of requests against real backend processes, watching memory.

Two servers are started the way LocalAI starts them (run.sh --addr 127.0.0.1:PORT): one serving
SmolLM2-135M (the bundled GGUF, converted once into --models), one serving a tiny random BERT
embedding model (tests/tiny_encoder.py). For each concurrency level a fresh pair is started and
--requests requests are sent: Predict and PredictStream with random sampling parameters, seeds,
stop strings, logprobs, GBNF grammars and JSON schemas, streams cancelled at random points,
TokenizeString, Status, GetMetrics and Embedding. Request i is drawn from Random(seed, i), so a
run is reproducible whatever the thread interleaving.

Reported per level: requests by kind, errors (expected ones — CANCELLED of a stream we cancelled —
apart from unexpected ones), the server's RSS after warm-up and at the end (% change), the RSS
curve every --every requests with Status's memory breakdown, Status at the end (no request, slot
or KV reservation left over) and p50/p99 latency per kind. Exit status 1 on an unexpected error,
a leftover reservation or RSS growth >= --max-growth %.

    python scripts/soak.py --requests 1000 --concurrency 8,16 --seed 0 --json soak.json
"""

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlxbackend.client import spawn_server, stop_server  # noqa: E402
from mlxbackend.proto import backend_pb2 as pb  # noqa: E402

# Status breakdown keys that must be 0 once every request has ended (engine.TextEngine.memory).
IDLE_KEYS = ("kv_cache", "requests_in_flight", "kv_reserved", "batch_slots")

TOPICS = [
    "the water cycle",
    "how a bicycle gear works",
    "the history of Rome",
    "photosynthesis",
    "why the sky is blue",
    "binary search",
    "the French Revolution",
    "volcanoes",
    "sourdough bread",
    "black holes",
    "the immune system",
    "how compilers work",
    "the Great Wall of China",
    "jazz music",
    "climate and weather",
    "prime numbers",
    "the printing press",
    "coral reefs",
]
ASKS = [
    "Explain {t} in two sentences.",
    "Write a short poem about {t}.",
    "Give three facts about {t}.",
    "What is the most surprising thing about {t}?",
    "Summarize {t} for a child.",
    "List some questions a student might ask about {t}.",
]
SYSTEMS = [
    "",
    "You are a helpful assistant.",
    "You are a terse assistant. Answer briefly.",
    "You are a teacher who explains things simply and always gives an example.",
]
FILLER = (
    "Background notes: the following paragraph is context that the assistant may use. "
    "It repeats a few facts so that prompts have different lengths and prefixes. "
)
STOPS = ["\n\n", ".", "!", "\n", "The", " and", "?"]
SCHEMAS = [
    {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 40}}, "required": ["answer"]},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                      "age": {"type": "integer"}}, "required": ["name", "age"]},
    {"type": "array", "items": {"type": "integer"}, "maxItems": 4},
    {"type": "object", "properties": {"ok": {"type": "boolean"},
                                      "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}}}},
]  # fmt: skip
GRAMMARS = [
    'root ::= ("yes" | "no")',
    'root ::= "[" item ("," item){0,3} "]"\nitem ::= [0-9]{1,3}',
    'root ::= [a-z ]{1,30} "."',
]
EMBED_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France.",
    "Machine learning models turn text into vectors called embeddings.",
    "How do I bake bread at home without yeast?",
    "The weather today is sunny.",
]
# kind → weight in the mix
MIX = {
    "predict": 20,
    "stream": 20,
    "stream_cancel": 12,
    "predict_json": 8,
    "stream_grammar": 6,
    "tokenize": 8,
    "status": 6,
    "metrics": 6,
    "embedding": 14,
}


# -- the request mix ------------------------------------------------------------------------
def messages(rng: random.Random) -> list:
    out = []
    system = rng.choice(SYSTEMS)
    if system:
        out.append(pb.Message(role="system", content=system))
    if rng.random() < 0.3:
        out.append(pb.Message(role="user", content=FILLER * rng.randint(1, 12)))
        out.append(pb.Message(role="assistant", content="Understood."))
    for turn in range(rng.choice([1, 1, 1, 2, 3])):
        topic = rng.choice(TOPICS)
        out.append(pb.Message(role="user", content=rng.choice(ASKS).format(t=topic)))
        if turn < 2 and rng.random() < 0.5:
            out.append(pb.Message(role="assistant", content=f"Here is something about {topic}."))
    if out[-1].role != "user":
        out.append(pb.Message(role="user", content="Go on."))
    return out


def sampling(rng: random.Random) -> dict:
    """Random sampling parameters, each sometimes left at its default."""
    kw = {"Temperature": rng.choice([0.0, 0.3, 0.7, 1.0, 1.3]), "Seed": rng.randint(0, 2**31 - 1)}
    if rng.random() < 0.6:
        kw["TopP"] = rng.uniform(0.5, 1.0)
    if rng.random() < 0.5:
        kw["TopK"] = rng.randint(1, 100)
    if rng.random() < 0.4:
        kw["MinP"] = rng.uniform(0.0, 0.2)
    if rng.random() < 0.3:
        kw["Penalty"] = rng.uniform(1.0, 1.3)  # repetition penalty
    if rng.random() < 0.3:
        kw["FrequencyPenalty"] = rng.uniform(0.0, 1.0)
    if rng.random() < 0.3:
        kw["PresencePenalty"] = rng.uniform(0.0, 1.0)
    if rng.random() < 0.3:
        kw["StopPrompts"] = rng.sample(STOPS, rng.randint(1, 2))
    if rng.random() < 0.3:
        kw["Logprobs"] = 1
        kw["TopLogprobs"] = rng.randint(0, 5)
    return kw


def text_request(rng: random.Random, max_tokens: int, **extra) -> pb.PredictOptions:
    kw = {**sampling(rng), **extra}
    return pb.PredictOptions(
        Messages=messages(rng), UseTokenizerTemplate=True, Tokens=rng.randint(4, max_tokens), **kw
    )


def plan(seed: int, i: int, max_tokens: int) -> tuple[str, object, int]:
    """(kind, request, cancel-after-n-chunks) for request number i."""
    rng = random.Random(seed * 1_000_003 + i)
    kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
    cancel_after = rng.randint(0, 6)
    if kind in ("predict", "stream", "stream_cancel"):
        return kind, text_request(rng, max_tokens), cancel_after
    if kind == "predict_json":
        schema = json.dumps(rng.choice(SCHEMAS))
        return kind, text_request(rng, max_tokens, Metadata={"json_schema": schema}), cancel_after
    if kind == "stream_grammar":
        return kind, text_request(rng, max_tokens, Grammar=rng.choice(GRAMMARS)), cancel_after
    if kind == "tokenize":
        return kind, pb.PredictOptions(Messages=messages(rng), UseTokenizerTemplate=True), 0
    if kind == "embedding":
        return (
            kind,
            pb.PredictOptions(Embeddings=" ".join(rng.sample(EMBED_TEXTS, rng.randint(1, 3)))),
            0,
        )
    return kind, None, 0


def send(stubs: dict, kind: str, request, cancel_after: int, timeout: float) -> str:
    """Run one request; returns "ok" or "cancelled" (a stream we cancelled), raises otherwise."""
    text, emb = stubs["text"], stubs["embed"]
    if kind in ("predict", "predict_json"):
        text.Predict(request, timeout=timeout)
    elif kind in ("stream", "stream_grammar"):
        for _ in text.PredictStream(request, timeout=timeout):
            pass
    elif kind == "stream_cancel":
        call = text.PredictStream(request, timeout=timeout)
        try:
            for n, _ in enumerate(call):
                if n >= cancel_after:
                    call.cancel()
                    return "cancelled"
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED:
                return "cancelled"
            raise
        return "ok"  # finished before the cancel point
    elif kind == "tokenize":
        text.TokenizeString(request, timeout=timeout)
    elif kind == "status":
        text.Status(pb.HealthMessage(), timeout=timeout)
    elif kind == "metrics":
        text.GetMetrics(pb.MetricsRequest(), timeout=timeout)
    elif kind == "embedding":
        if not emb.Embedding(request, timeout=timeout).embeddings:
            raise RuntimeError("empty embedding")
    return "ok"


def expected_error(kind: str, e: Exception) -> str | None:
    """A name for an error the mix may legitimately produce, or None (unexpected)."""
    if isinstance(e, grpc.RpcError):
        if e.code() == grpc.StatusCode.CANCELLED and kind == "stream_cancel":
            return "cancelled"
        if e.code() == grpc.StatusCode.INTERNAL and "produced no text" in (e.details() or ""):
            return "empty_output"  # a stop string or EOS before any text: reported as such
    return None


# -- servers --------------------------------------------------------------------------------
def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def spawn(log_path: Path, env: dict | None = None, timeout: float = 120.0):
    """A backend process as LocalAI starts it (client.spawn_server), its output in log_path."""
    try:
        return spawn_server(timeout=timeout, env=env, log=open(log_path, "w"))
    except RuntimeError:
        raise RuntimeError(f"backend did not start; see {log_path}") from None


def smollm2_folder(models: Path) -> Path:
    from mlxbackend.default_model import ensure_default_model

    return ensure_default_model(models)


def encoder_folder(root: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.tiny_encoder import build_tiny_bert

    folder = root / "tiny-bert-embed"
    if not (folder / "config.json").exists():
        build_tiny_bert(folder, st=dict(pooling="mean", normalize=True, max_seq_length=64))
    return folder


def breakdown(stub) -> dict:
    s = stub.Status(pb.HealthMessage(), timeout=30)
    return {
        "state": pb.StatusResponse.State.Name(s.state),
        "total": s.memory.total,
        **dict(s.memory.breakdown),
    }


# -- one level ------------------------------------------------------------------------------
def percentile(values: list, q: float) -> float:
    if not values:
        return 0.0
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def run_level(args, concurrency: int, folders: dict, workdir: Path) -> dict:
    env = dict(kv.split("=", 1) for kv in args.env)
    text_proc, text_stub = spawn(workdir / f"text-c{concurrency}.log", env)
    emb_proc, emb_stub = spawn(workdir / f"embed-c{concurrency}.log", env)
    stubs = {"text": text_stub, "embed": emb_stub}
    try:
        sm = folders["text"]
        reply = text_stub.LoadModel(pb.ModelOptions(
            Model=sm.name, ModelPath=str(sm.parent), ContextSize=args.context, Options=args.option,
        ), timeout=300)  # fmt: skip
        assert reply.success, reply.message
        enc = folders["embed"]
        reply = emb_stub.LoadModel(
            pb.ModelOptions(Model=enc.name, ModelPath=str(enc.parent), Embeddings=True), timeout=300
        )
        assert reply.success, reply.message
        return drive(args, concurrency, stubs, text_proc.pid, emb_proc.pid)
    finally:
        stop_server(text_proc)
        stop_server(emb_proc)


def drive(args, concurrency: int, stubs: dict, text_pid: int, emb_pid: int) -> dict:
    lock = threading.Lock()
    counter = iter(range(args.requests))
    done = [0]
    kinds, outcomes, errors = Counter(), Counter(), []
    latency = defaultdict(list)
    curve = []  # (requests done, seconds, text RSS, embed RSS, Status breakdown)
    start = time.monotonic()
    deadline = start + args.time_limit
    warm = max(1, int(args.warmup * args.requests)) if args.warmup < 1 else int(args.warmup)
    checkpoints = sorted({warm, *range(args.every, args.requests + 1, args.every), args.requests})

    def checkpoint(n: int):
        curve.append({
            "requests": n, "seconds": round(time.monotonic() - start, 1), "rss": rss_bytes(text_pid),
            "embed_rss": rss_bytes(emb_pid), "status": breakdown(stubs["text"]),
        })  # fmt: skip

    def worker():
        while time.monotonic() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            kind, request, cancel_after = plan(args.seed, i, args.max_tokens)
            t0 = time.monotonic()
            try:
                outcome = send(stubs, kind, request, cancel_after, args.timeout)
            except Exception as e:  # noqa: BLE001 - every failure is counted and classified
                outcome = expected_error(kind, e)
                if outcome is None:
                    outcome = "error"
                    code = e.code().name if isinstance(e, grpc.RpcError) else type(e).__name__
                    details = e.details() if isinstance(e, grpc.RpcError) else str(e)
                    with lock:
                        errors.append(
                            {"i": i, "kind": kind, "code": code, "details": (details or "")[:300]}
                        )
            elapsed = time.monotonic() - t0
            with lock:
                kinds[kind] += 1
                outcomes[outcome] += 1
                latency[kind].append(elapsed)
                done[0] += 1
                n = done[0]
            if n in checkpoints:
                checkpoint(n)  # sampled from this worker while the others keep the load on
            if args.progress and n % args.every == 0:
                last = curve[-1] if curve else {}
                print(
                    f"  c{concurrency}: {n}/{args.requests} rss {last.get('rss', 0) / 2**20:.0f} MiB "
                    f"{time.monotonic() - start:.0f}s",
                    file=sys.stderr,
                    flush=True,
                )

    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    seconds = time.monotonic() - start
    idle_start = time.monotonic()  # the server ends cancelled sequences at its next step: poll
    while True:
        final = breakdown(stubs["text"])
        if not any(final.get(k, 0) for k in IDLE_KEYS) or time.monotonic() - idle_start > 15:
            break
        time.sleep(0.2)
    idle_after = time.monotonic() - idle_start
    checkpoint(done[0])  # the end point: once the server is idle
    at_warm = next((c for c in curve if c["requests"] >= warm), curve[0])
    end = curve[-1]
    growth = 100.0 * (end["rss"] - at_warm["rss"]) / at_warm["rss"]
    leftover = {k: final.get(k, 0) for k in IDLE_KEYS if final.get(k, 0)}
    missing = [k for k in IDLE_KEYS if k not in final]
    return {
        "concurrency": concurrency, "requests": done[0], "planned": args.requests, "seconds": round(seconds, 1),
        "kinds": dict(kinds), "outcomes": dict(outcomes), "unexpected_errors": errors,
        "warmup_requests": at_warm["requests"], "rss_after_warmup": at_warm["rss"], "rss_end": end["rss"],
        "rss_growth_pct": round(growth, 2), "rss_peak": max(c["rss"] for c in curve),
        "embed_rss_after_warmup": at_warm["embed_rss"], "embed_rss_end": end["embed_rss"],
        "idle_after_s": round(idle_after, 2), "curve": curve, "status_end": final, "status_leftover": leftover, "status_missing_keys": missing,
        "latency_ms": {k: {"n": len(v), "p50": round(1000 * percentile(v, 50), 1),
                           "p99": round(1000 * percentile(v, 99), 1)} for k, v in sorted(latency.items())},
    }  # fmt: skip


def verdict(level: dict, max_growth: float) -> list:
    """Reasons this level failed (empty = passed)."""
    out = []
    if level["unexpected_errors"]:
        out.append(f"{len(level['unexpected_errors'])} unexpected errors")
    if level["rss_growth_pct"] >= max_growth:
        out.append(f"RSS grew {level['rss_growth_pct']:.1f}% (limit {max_growth}%)")
    if level["status_leftover"]:
        out.append(f"Status shows leftovers {level['status_leftover']}")
    if level["status_missing_keys"]:
        out.append(f"Status lacks {level['status_missing_keys']}")
    if level["requests"] < level["planned"]:
        out.append(f"only {level['requests']} of {level['planned']} requests within --time-limit")
    return out


def summary(level: dict) -> str:
    mib = 2**20
    lines = [
        f"concurrency {level['concurrency']}: {level['requests']} requests in {level['seconds']} s; "
        f"kinds {level['kinds']}; outcomes {level['outcomes']}",
        f"  RSS after warm-up ({level['warmup_requests']} requests) {level['rss_after_warmup'] / mib:.0f} MiB, "
        f"end {level['rss_end'] / mib:.0f} MiB ({level['rss_growth_pct']:+.1f}%), peak {level['rss_peak'] / mib:.0f} MiB; "
        f"embedding server {level['embed_rss_after_warmup'] / mib:.0f} → {level['embed_rss_end'] / mib:.0f} MiB",
        "  curve: " + ", ".join(f"{c['requests']}:{c['rss'] / mib:.0f}" for c in level["curve"]),
        "  Status at end: " + ", ".join(f"{k}={v}" for k, v in level["status_end"].items()),
        "  latency ms p50/p99: "
        + ", ".join(f"{k} {v['p50']:.0f}/{v['p99']:.0f}" for k, v in level["latency_ms"].items()),
    ]
    for e in level["unexpected_errors"][:10]:
        lines.append(f"  ERROR #{e['i']} {e['kind']}: {e['code']} {e['details']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000, help="requests per concurrency level")
    p.add_argument(
        "--concurrency", default="8,16", help="comma-separated levels, a fresh server pair each"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the full report here")
    p.add_argument("--models", default=os.environ.get("MLXB_MODELS_DIR", str(ROOT / "models")),
                   help="folder holding (or receiving) the converted SmolLM2")  # fmt: skip
    p.add_argument(
        "--max-tokens", type=int, default=32, help="each text request asks for 4..N tokens"
    )
    p.add_argument("--context", type=int, default=2048, help="ContextSize for SmolLM2")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        help="LoadModel Options entry key:value (repeatable)",
    )
    p.add_argument("--warmup", type=float, default=0.2,
                   help="requests counted as warm-up: a fraction of --requests (<1) or a count")  # fmt: skip
    p.add_argument("--every", type=int, default=100, help="RSS/Status checkpoint every N requests")
    p.add_argument(
        "--max-growth", type=float, default=5.0, help="fail at this RSS growth (%%) after warm-up"
    )
    p.add_argument("--timeout", type=float, default=300.0, help="per-request deadline, seconds")
    p.add_argument("--time-limit", type=float, default=3600.0, help="per-level bound, seconds")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the servers (repeatable), e.g. MALLOC_ARENA_MAX=8 "
                        "(run.sh's malloc settings give way to these)")  # fmt: skip
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="mlxb-soak-") as tmp:
        workdir = Path(tmp)
        folders = {"text": smollm2_folder(Path(args.models)), "embed": encoder_folder(workdir)}
        report = {"seed": args.seed, "requests_per_level": args.requests, "max_tokens": args.max_tokens,
                  "options": args.option, "levels": []}  # fmt: skip
        failed = False
        for c in [int(x) for x in args.concurrency.split(",") if x.strip()]:
            level = run_level(args, c, folders, workdir)
            level["failures"] = verdict(level, args.max_growth)
            report["levels"].append(level)
            print(summary(level))
            print("  verdict: " + ("; ".join(level["failures"]) or "pass"), flush=True)
            failed = failed or bool(level["failures"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
