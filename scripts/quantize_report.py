#!/usr/bin/env python
"""Quality/size report for quantized SmolLM2-135M-Instruct, measured through a backend server.

Starts a backend (run.sh --addr, as LocalAI does), runs one quantization job per type over gRPC
(StartQuantization + QuantizationProgress) with extra_options perplexity_text set to a held-out
English text (HELD_OUT below: plain prose written for this report, not used by any training code
in this repository), and prints a markdown table of file_size_mb, compression_ratio,
perplexity_base (the unquantized input), perplexity (the output), its change vs the base and the
job's wall time. With --ask, each output also answers "What is the capital of France?" greedily
(MLX: LoadModel + Predict; GGUF: llama-cpp-python create_chat_completion).

Types are quantization_type names, optionally with a group size: `mlx-q6:g32`. By default, when
mlx-q6 (group 64) misses the +5 % target, mlx-q6:g32 is measured as well (--no-retry-g32 to skip).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 HF_HUB_OFFLINE=1 \\
    MLXB_MODELS_DIR=models .venv/bin/python scripts/quantize_report.py --ask --json /tmp/q.json

Perplexity caveats: MLX outputs are scored by the same MLX code as the base; GGUF outputs are
scored by llama.cpp (its own tokenizer call and kernels), so their +% mixes in backend differences.
The SmolLM2 "unquantized" base is itself the bundled Q4_1 GGUF dequantized to float32."""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_TYPES = ["mlx-q8", "mlx-q6", "mlx-q4", "mlx-q4-plain", "mlx-q4-plain:g32", "q8_0", "q4_k_m"]
TARGET = 5.0  # % perplexity increase allowed for 8- and 6-bit
QUESTION = "What is the capital of France?"
TERMINAL = ("completed", "failed", "stopped")

HELD_OUT = """\
The harbour master kept a small notebook in the pocket of his coat, and in it he wrote down every
ship that entered or left the bay. Most of the entries were short: a name, a time, the state of the
tide and a word or two about the weather. On quiet days there were only three or four lines, but in
the autumn, when the fishing boats came home and the grain ships left for the south, a single page
was rarely enough. He had kept the notebooks for almost thirty years, and they filled two shelves in
the office above the customs house.

Nobody had asked him to keep them. The official register was typed by a clerk each evening and sent
to the city once a month. The notebooks were something else. When a young captain asked whether the
channel near the northern rocks was safe at low water, the harbour master would take down a volume
from twelve or fifteen years before and read out what had happened on a similar morning. He believed
that the sea repeated itself more often than people admitted, and that a careful record was worth
more than a clever guess.

In the winter the town became very still. The hotels along the front closed their shutters, the
ice cream stall was covered with a grey canvas, and the only regular visitors were the men who came
to repair the sea wall. They worked in pairs, mixing mortar in wheelbarrows and fitting new stones
where the waves had pulled the old ones loose. Children walked past them on the way to school and
sometimes stopped to watch, because it was difficult to believe that such a heavy wall could be
damaged by water at all.

The school itself stood at the top of the hill, next to the chapel and the old signal station. Its
windows looked out over the roofs of the town towards the open sea, and on clear days the pupils
could see the line of the far coast, pale blue and almost flat. The teacher, a patient woman who had
grown up on a farm inland, used the view in her lessons. She asked the children to estimate the
distance to the horizon, to explain why the far coast sometimes vanished in the afternoon, and to
describe the colour of the water in words that nobody else in the class had used.

Spring arrived slowly. First the gulls became louder, then the days grew long enough that the lamps
on the pier were lit after supper instead of before it. The bakery began to sell buns with currants
again, and the ferry to the islands returned to its summer timetable of three crossings a day. The
harbour master wrote more and more in his notebook, and the clerk in the office below complained,
as he did every year, that the typewriter ribbon was worn out before the end of April.

One morning in May a sailing boat came into the bay that nobody recognised. It was painted dark
green, with a white stripe along the hull, and it was sailed by an elderly couple who had travelled
from a port more than four hundred miles away. They tied up at the visitors' pontoon, walked slowly
up the steps to the office and asked whether they might stay for a week. The harbour master found
them a berth, recommended the fish restaurant behind the market and, before they left the office,
wrote their names carefully in the notebook, together with the time, the tide and the weather.

A week later they sailed away on a calm evening, and the town returned to its ordinary routine. The
repairs on the sea wall were finished, the school closed for the holidays, and the first visitors of
the summer arrived by train with suitcases, folding chairs and bright umbrellas. In the office above
the customs house a new volume was started, its first page still clean, waiting for the next ship.
"""


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def parse_type(spec: str) -> tuple[str, dict, str]:
    """'mlx-q6:g32' -> ('mlx-q6', {'group_size': '32'}, 'mlx-q6 (g32)')."""
    qtype, _, rest = spec.partition(":")
    options = {}
    label = qtype
    if rest:
        if not rest.startswith("g") or not rest[1:].isdigit():
            raise SystemExit(f"bad type spec {spec!r} (expected TYPE or TYPE:gN)")
        options["group_size"] = rest[1:]
        label = f"{qtype} (g{rest[1:]})"
    elif qtype == "mlx-q4":
        label = "mlx-q4 (recipe, g32)"
    elif qtype.startswith("mlx-q"):
        label = f"{qtype} (g64)"
    return qtype, options, label


def start_server(jobs_dir: Path):
    """A backend process launched as LocalAI does (output in server.log); returns (process, stub)."""
    from mlxbackend.client import spawn_server

    return spawn_server(
        env={"MLXB_JOBS_DIR": str(jobs_dir)}, log=open(jobs_dir / "server.log", "w")
    )


def quantize(stub, model: Path, qtype: str, out: Path, job_id: str, options: dict):
    from mlxbackend.proto import backend_pb2 as pb

    t0 = time.perf_counter()
    reply = stub.StartQuantization(
        pb.QuantizationRequest(
            model=str(model),
            quantization_type=qtype,
            output_dir=str(out),
            job_id=job_id,
            extra_options=options,
        )
    )
    if not reply.success:
        raise RuntimeError(f"{qtype}: {reply.message}")
    last = None
    for last in stub.QuantizationProgress(
        pb.QuantizationProgressRequest(job_id=job_id), timeout=1800
    ):
        if last.status in TERMINAL:
            break
    return last, time.perf_counter() - t0


def ask_mlx(stub, folder: str) -> str:
    from mlxbackend.client import chat_request
    from mlxbackend.proto import backend_pb2 as pb

    loaded = stub.LoadModel(pb.ModelOptions(Model=folder, ContextSize=1024))
    if not loaded.success:
        return f"<LoadModel failed: {loaded.message}>"
    return stub.Predict(
        chat_request(QUESTION, max_tokens=24, temperature=0.0), timeout=300
    ).message.decode()


def ask_gguf(path: str) -> str:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=2, verbose=False)
    try:
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=24,
            temperature=0.0,
            top_k=1,
            seed=0,
        )
        return out["choices"][0]["message"]["content"]
    finally:
        llm.close()


def measure(stub, model: Path, spec: str, workdir: Path, text: Path, ask: bool) -> dict:
    qtype, options, label = parse_type(spec)
    job_id = "report-" + spec.replace(":", "-")
    log(f"[{label}] quantizing ...")
    final, wall = quantize(
        stub, model, qtype, workdir / job_id, job_id, {**options, "perplexity_text": str(text)}
    )
    row = {
        "type": label,
        "quantization_type": qtype,
        "options": options,
        "status": final.status,
        "wall_s": round(wall, 1),
    }
    if final.status != "completed":
        row["message"] = final.message
        log(f"[{label}] {final.status}: {final.message}")
        return row
    m = dict(final.extra_metrics)
    row.update(
        output_file=final.output_file,
        **{
            k: m.get(k)
            for k in ("file_size_mb", "compression_ratio", "perplexity_base", "perplexity")
        },
    )
    row["size_16bit_mb"] = (
        round(size_16bit_mb(final.output_file), 1)
        if qtype.startswith("mlx-")
        else m.get("file_size_mb")
    )
    if m.get("perplexity_base") and m.get("perplexity"):
        row["ppl_delta_pct"] = round(100 * (m["perplexity"] / m["perplexity_base"] - 1), 2)
    if ask:
        row["answer"] = (
            ask_mlx(stub, final.output_file)
            if qtype.startswith("mlx-")
            else ask_gguf(final.output_file)
        ).strip()
        row["paris"] = "Paris" in row["answer"]
    log(f"[{label}] {json.dumps({k: v for k, v in row.items() if k != 'output_file'})}")
    return row


def size_16bit_mb(folder: str) -> float:
    """An MLX folder's size with its float tensors (scales, biases, norms) in 16 bits, as a Mac
    stores them (here they stay float32, the fast CPU layout); packed weights as they are."""
    total = 0
    for f in Path(folder).glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for d in info["shape"]:
                count *= d
            total += count * (2 if info["dtype"].startswith(("F", "BF")) else 4)
    return total / 2**20  # MiB, as the job's file_size_mb


def bits_of(row) -> int | None:
    q = row["quantization_type"]
    return {"mlx-q8": 8, "q8_0": 8, "mlx-q6": 6, "q6_k": 6}.get(q)


def table(rows: list, base_ppl, ask: bool) -> str:
    head = ["type", "size MB", "16-bit scales MB", "ratio", "ppl base", "ppl", "+% vs base"]
    head += ["target", "wall s"]
    if ask:
        head.append("capital answer (greedy)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["status"] != "completed":
            lines.append(f"| {r['type']} | {r['status']}: {r.get('message', '')} |")
            continue
        delta = r.get("ppl_delta_pct")
        target = (
            "" if bits_of(r) is None or delta is None else ("ok" if delta <= TARGET else "MISS")
        )
        cells = [
            r["type"],
            f"{r['file_size_mb']:.1f}",
            f"{r['size_16bit_mb']:.1f}",
            f"{r['compression_ratio']:.2f}",
            f"{r.get('perplexity_base') or 0:.3f}",
            f"{r.get('perplexity') or 0:.3f}",
            "" if delta is None else f"{delta:+.2f}",
            target,
            f"{r['wall_s']:.0f}",
        ]
        if ask:
            answer = r.get("answer", "").replace("\n", " ").replace("|", "/")
            cells.append(("**Paris** " if r.get("paris") else "") + f"`{answer[:60]}`")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", help="model folder (default: SmolLM2 in $MLXB_MODELS_DIR, converted if needed)"
    )
    ap.add_argument(
        "--types",
        default=",".join(DEFAULT_TYPES),
        help="comma-separated quantization types, TYPE or TYPE:gN (default: %(default)s)",
    )
    ap.add_argument(
        "--no-retry-g32", action="store_true", help="do not add mlx-q6:g32 when mlx-q6 misses +5%%"
    )
    ap.add_argument("--text", help="held-out text file (default: the built-in prose)")
    ap.add_argument(
        "--ask", action="store_true", help="also ask each output the capital of France (greedy)"
    )
    ap.add_argument("--workdir", help="where outputs go (default: a temporary folder, removed)")
    ap.add_argument("--json", help="write the rows as JSON to this file")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from mlxbackend.default_model import ensure_default_model

    if args.model:
        model = Path(args.model).resolve()
    else:
        model = ensure_default_model(
            Path(os.environ.get("MLXB_MODELS_DIR") or ROOT / "models").resolve()
        )
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="mlxb-qreport-")
    workdir = Path(args.workdir or tmp.name).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    text = Path(args.text).resolve() if args.text else workdir / "held_out.txt"
    if not args.text:
        text.write_text(HELD_OUT)
    specs = [s.strip() for s in args.types.split(",") if s.strip()]

    t0 = time.perf_counter()
    proc, stub = start_server(workdir)
    rows = []
    try:
        for spec in specs:
            rows.append(measure(stub, model, spec, workdir, text, args.ask))
            r = rows[-1]
            if (
                spec == "mlx-q6"
                and not args.no_retry_g32
                and "mlx-q6:g32" not in specs
                and r.get("ppl_delta_pct") is not None
                and r["ppl_delta_pct"] > TARGET
            ):
                log("mlx-q6 (g64) misses the +5% target; trying group_size 32")
                rows.append(measure(stub, model, "mlx-q6:g32", workdir, text, args.ask))
    finally:
        from mlxbackend.client import stop_server

        stop_server(proc)
        if tmp is not None:
            tmp.cleanup()
    base = next((r["perplexity_base"] for r in rows if r.get("perplexity_base")), None)
    result = {
        "model": str(model),
        "held_out_chars": len(text.read_text()) if args.text else len(HELD_OUT),
        "target_pct": TARGET,
        "perplexity_base": base,
        "total_s": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    print(
        f"model: {model}  held-out text: {result['held_out_chars']} chars  "
        f"base perplexity (float32): {base}  total {result['total_s']} s\n"
    )
    print(table(rows, base, args.ask))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if all(r["status"] == "completed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
