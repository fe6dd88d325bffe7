"""`mlxbackend bench`: raw mlx-lm in-process vs our gRPC server, side by side on one model.

Decode tokens/s and time-to-first-token, medians of N repeats, alternating the engines so that
machine noise hits both; optionally llama.cpp (llama-cpp-python) on the bundled GGUF."""

import os
import platform
import statistics
import time
from pathlib import Path

from mlxbackend.client import spawn_server, stop_server
from mlxbackend.default_model import bundled_gguf, ensure_default_model

# run.sh's glibc malloc settings (issue 15): a raw side measured in-process runs under them too
# (`same_malloc`), or the comparison includes their cost (5-10 % of prefill and TTS here)
RUN_SH_MALLOC = {
    "MALLOC_ARENA_MAX": "2",
    "MALLOC_MMAP_THRESHOLD_": "131072",
    "MALLOC_TRIM_THRESHOLD_": "131072",
}


def same_malloc() -> None:
    """Re-run this process under RUN_SH_MALLOC (glibc reads them at start) unless it already is."""
    import sys

    if RUN_SH_MALLOC.items() - os.environ.items():
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **RUN_SH_MALLOC})


def model_folder(model: str) -> Path:
    """A benchmark's --model: "default" (the bundled SmolLM2, converted once) or a folder."""
    if model == "default":
        return ensure_default_model(Path(os.environ.get("MLXB_MODELS_DIR", "models"))).resolve()
    return Path(model).resolve()


PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _prompt(salt) -> str:
    """A prompt no earlier run has seen, so the prefix cache cannot shorten the prefill."""
    return f"[{salt}] {PROMPT}"


def _chat_tokens(tokenizer, salt):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": _prompt(salt)}], add_generation_prompt=True, tokenize=True
    )


def raw_mlx(model, tokenizer, n_tokens, salt=0):
    """One run of mlx-lm's stream_generate; EOS blocked so every run decodes n_tokens."""
    import mlx.core as mx
    from mlx_lm.generate import stream_generate

    eos = mx.array(sorted(tokenizer.eos_token_ids))
    block = [lambda _, logits: logits.at[:, eos].add(-mx.inf)]
    start = time.perf_counter()
    first = last = None
    count = 0
    for response in stream_generate(
        model,
        tokenizer,
        _chat_tokens(tokenizer, salt),
        max_tokens=n_tokens,
        logits_processors=block,
    ):
        last = time.perf_counter()
        if first is None and response.text:  # first visible text, as for the server
            first = last
        count += 1
    return (first - start) * 1000, (count - 1) / (last - first)


def grpc_run(stub, n_tokens, salt=0):
    """One PredictStream as LocalAI sends it; times measured at the client."""
    request = _request(n_tokens, salt)
    start = time.perf_counter()
    first = last = None
    tokens = 0
    for reply in stub.PredictStream(request):
        last = time.perf_counter()
        if first is None and reply.message:
            first = last
        tokens = reply.tokens or tokens
    return (first - start) * 1000, (tokens - 1) / (last - first)


def grpc_concurrent(stub, n_tokens, concurrency):
    """Aggregate decode tokens/s of `concurrency` simultaneous streams (first to last token)."""
    import threading

    spans = []

    def one(k):
        first = last = None
        tokens = 0
        for reply in stub.PredictStream(
            _request(n_tokens, f"c{concurrency}-{k}-{time.perf_counter_ns()}")
        ):
            last = time.perf_counter()
            if first is None and reply.message:
                first = last
            tokens = reply.tokens or tokens
        spans.append((first, last, tokens))

    threads = [threading.Thread(target=one, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start, end = min(s[0] for s in spans), max(s[1] for s in spans)
    return sum(s[2] - 1 for s in spans) / (end - start)


def _request(n_tokens, salt):
    from mlxbackend.proto import backend_pb2 as pb

    return pb.PredictOptions(
        Messages=[pb.Message(role="user", content=_prompt(salt))],
        UseTokenizerTemplate=True,
        Tokens=n_tokens,
        IgnoreEOS=True,
        Temperature=0,
    )


HISTORY = " ".join(
    f"Note {i}: the lighthouse on the northern cape was repainted in spring, and the keeper logged "
    f"ships, storms and birds in a leather book."
    for i in range(40)
)


def multi_turn(stub):
    """TTFT of turn 1 (~1k tokens of fresh history) and of turn 2 (same history + one turn)."""
    from mlxbackend.proto import backend_pb2 as pb

    def ttft(messages):
        request = pb.PredictOptions(
            Messages=[pb.Message(role=r, content=c) for r, c in messages],
            UseTokenizerTemplate=True,
            Tokens=16,
            Temperature=0,
        )
        start = time.perf_counter()
        first, text = None, b""
        for reply in stub.PredictStream(request):
            if first is None and reply.message:
                first = time.perf_counter()
            text += reply.message
        return (first - start) * 1000, text.decode()

    salt = str(time.perf_counter_ns())  # a fresh prefix: turn 1 is a cold prefill
    turn1 = [("system", salt + " " + HISTORY), ("user", "Summarise the notes in one sentence.")]
    t1, answer = ttft(turn1)
    t2, _ = ttft(turn1 + [("assistant", answer), ("user", "Which season was it painted?")])
    return t1, t2


def llamacpp_run(llm, n_tokens, salt=0):
    messages = [{"role": "user", "content": _prompt(salt)}]
    llm.reset()  # no prefix reuse between repeats: a cold prefill like the others
    start = time.perf_counter()
    first = last = None
    count = 0
    for chunk in llm.create_chat_completion(
        messages, max_tokens=n_tokens, temperature=0, stream=True
    ):
        last = time.perf_counter()
        if first is None and chunk["choices"][0]["delta"].get("content"):
            first = last
        count += 1
    return (first - start) * 1000, (count - 2) / (last - first)  # role chunk + final chunk


def _serve(model_dir: Path):
    from mlxbackend.proto import backend_pb2 as pb

    proc, stub = spawn_server()
    assert stub.LoadModel(pb.ModelOptions(Model=str(model_dir))).success
    return proc, stub


def main(args):
    from rich.console import Console
    from rich.table import Table

    console = Console()
    model_dir = model_folder(args.model)
    from mlx_lm.utils import load

    model, tokenizer = load(str(model_dir))
    proc, stub = _serve(model_dir)
    results = {"raw mlx-lm": [], "gRPC server": [], "llama.cpp": []}
    try:
        raw_mlx(model, tokenizer, 8, "warm"), grpc_run(stub, 8, "warm")
        for i in range(args.repeats):
            console.print(f"repeat {i + 1}/{args.repeats}")
            results["raw mlx-lm"].append(raw_mlx(model, tokenizer, args.tokens, i))
            results["gRPC server"].append(grpc_run(stub, args.tokens, i))
        console.print("multi-turn")
        turns = [multi_turn(stub) for _ in range(args.repeats)]
        concurrency = {}
        for n in [int(c) for c in args.concurrency.split(",") if c]:
            console.print(f"concurrency {n}")
            concurrency[n] = statistics.median(
                grpc_concurrent(stub, args.tokens, n) for _ in range(args.repeats)
            )
    finally:
        stop_server(proc)
    if args.llamacpp:
        # after the MLX runs: llama.cpp's idle OpenMP workers keep spinning on the cores for a while
        try:
            from llama_cpp import Llama

            llm = Llama(str(bundled_gguf()), n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
            llamacpp_run(llm, 8, "warm")
            results["llama.cpp"] = [llamacpp_run(llm, args.tokens, i) for i in range(args.repeats)]
        except ImportError:
            console.print("[yellow]llama-cpp-python not installed: skipping llama.cpp[/yellow]")
    table = Table(
        title=f"{model_dir.name}, {args.tokens} tokens, median of {args.repeats} ({machine()})"
    )
    for col in ("engine", "TTFT ms", "decode tok/s"):
        table.add_column(col)
    med = {
        k: (statistics.median(t for t, _ in v), statistics.median(d for _, d in v))
        for k, v in results.items()
        if v
    }
    for name, (ttft, tps) in med.items():
        table.add_row(name, f"{ttft:.1f}", f"{tps:.1f}")
    console.print(table)
    if concurrency:
        agg = Table(title="aggregate decode tok/s through the gRPC server (continuous batching)")
        agg.add_column("concurrent streams")
        agg.add_column("aggregate tok/s")
        agg.add_column("÷ 1 stream")
        for n, tps in concurrency.items():
            agg.add_row(str(n), f"{tps:.1f}", f"{tps / concurrency[min(concurrency)]:.2f}")
        console.print(agg)
    t1, t2 = statistics.median(t for t, _ in turns), statistics.median(t for _, t in turns)
    console.print(
        f"multi-turn TTFT: turn 1 {t1:.0f} ms (~1k tokens), turn 2 {t2:.0f} ms, ratio {t2 / t1:.3f}"
    )
    raw, ours = med["raw mlx-lm"], med["gRPC server"]
    console.print(
        f"gRPC decode ÷ raw = {ours[1] / raw[1]:.3f}; TTFT overhead = {ours[0] - raw[0]:+.1f} ms"
    )


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores"
