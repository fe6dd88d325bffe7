#!/usr/bin/env python
"""Voice activity detection speed: our Silero VAD (MLX) vs the silero-vad package's reference.

One run, the sides alternating (their order rotates each repeat), medians over --repeats:
  * ours:      load_vad(silero_vad.onnx) + speech_segments(…) in this process — the MLX path the
               server runs for the VAD RPC;
  * reference: the silero-vad package's get_speech_timestamps on its TorchScript model
               (load_silero_vad(), torch on CPU, torch.set_num_threads(os.cpu_count()), or
               --torch-threads N);
  * gRPC:      a backend process started as LocalAI does (spawn_server: run.sh --addr), LoadModel
               of the package's silero_vad.onnx, the VAD RPC timed on the client: serializing and
               sending the float32 samples (the request message is built once), detection,
               the reply.
Speed ratio = reference seconds ÷ ours (> 1: ours is faster); × real time = audio seconds ÷
processing seconds; the fastest run is shown too (on a shared machine torch's thread
pool is slowed much more by other jobs than one thread is). The segments of ours and of gRPC must agree with the reference's (same count,
every boundary within 30 ms).

Audio: espeak-ng sentences separated by 0.3–2.5 s gaps of silence, faint noise or a loud noise
burst, built at 16 kHz, cut to --seconds (default 60).

  LD_PRELOAD=…/libopenblas.so.0 python scripts/bench_vad.py --repeats 5 --json out.json
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RATE = 16000
TOLERANCE_S = 0.030
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Voice activity detection finds where people speak.",
    "Silence and noise are not speech.",
    "Please send the report before the meeting on Thursday.",
    "It is raining again, so take an umbrella.",
    "Turn left at the second traffic light.",
    "The train to Boston leaves at seven fifteen.",
    "Could you repeat that a little more slowly?",
    "Numbers like three hundred and forty two are spoken too.",
    "Thank you, that will be all for today.",
]


def silero_data() -> Path:
    import silero_vad

    return Path(silero_vad.__file__).parent / "data"


def build_audio(seconds: float, folder: Path, seed: int = 0):
    """~`seconds` of float32 16 kHz audio: espeak-ng sentences with gaps; (audio, sentences)."""
    import numpy as np

    from mlxbackend.audio.decode import load_audio

    espeak = shutil.which("espeak-ng")
    if not espeak:
        raise SystemExit("espeak-ng is not installed (apt-get install -y espeak-ng)")
    rng = np.random.default_rng(seed)
    spoken = {}
    for i, text in enumerate(SENTENCES):
        path = folder / f"s{i}.wav"
        subprocess.run([espeak, "-v", "en-us", "-s", "150", "-w", str(path), text], check=True)
        spoken[text] = load_audio(str(path)).astype(np.float32)
    parts, total, count = [np.zeros(RATE // 2, np.float32)], RATE // 2, 0
    target = int(seconds * RATE)
    while total < target:
        speech = spoken[SENTENCES[count % len(SENTENCES)]]
        gap_len = int(rng.uniform(0.3, 2.5) * RATE)
        kind = count % 3
        if kind == 0:
            gap = np.zeros(gap_len, np.float32)
        else:
            gap = rng.normal(0, 0.003, gap_len).astype(np.float32)  # faint noise
            if kind == 2 and gap_len > RATE // 2:  # a loud noise burst of 0.25 s
                gap[RATE // 8 : RATE // 8 + RATE // 4] += rng.normal(0, 0.05, RATE // 4).astype(
                    np.float32
                )
        parts += [speech, gap]
        total += len(speech) + gap_len
        count += 1
    audio = np.concatenate(parts)[:target]
    return np.ascontiguousarray(audio, dtype=np.float32), count


def agree(ours: list, ref: list) -> tuple:
    """(same count and every boundary within 30 ms, largest boundary difference in s)."""
    if len(ours) != len(ref):
        return False, float("inf")
    worst = max(
        (max(abs(a - c), abs(b - d)) for (a, b), (c, d) in zip(ours, ref, strict=True)), default=0.0
    )
    return worst <= TOLERANCE_S, worst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="audio length")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--torch-threads", type=int, default=0, help="reference's torch threads (0 = CPU count)"
    )
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    import torch
    from silero_vad import get_speech_timestamps, load_silero_vad

    from mlxbackend.bench import machine
    from mlxbackend.client import spawn_server, stop_server
    from mlxbackend.proto import backend_pb2 as pb
    from mlxbackend.vad.silero import load_vad, speech_segments

    threads = args.torch_threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    onnx = silero_data() / "silero_vad.onnx"
    tmp = Path(tempfile.mkdtemp(prefix="mlxb-bench-vad-"))
    try:
        audio, sentences = build_audio(args.seconds, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = len(audio) / RATE
    print(f"machine: {machine()}")
    print(
        f"audio: {seconds:.1f} s, {sentences} espeak-ng sentences with gaps | repeats "
        f"{args.repeats} | torch {torch.__version__}, {torch.get_num_threads()} threads "
        f"(torch.set_num_threads({threads}))",
        flush=True,
    )

    t = time.perf_counter()
    vm = load_vad(onnx, {})
    load_ours = time.perf_counter() - t
    t = time.perf_counter()
    jit = load_silero_vad()
    load_ref = time.perf_counter() - t
    waveform = torch.from_numpy(audio)

    def run_ours():
        return speech_segments(vm, audio)

    def run_ref():
        stamps = get_speech_timestamps(waveform, jit, sampling_rate=RATE)
        return [(s["start"] / RATE, s["end"] / RATE) for s in stamps]

    proc, stub = spawn_server(timeout=120)
    try:
        t = time.perf_counter()
        reply = stub.LoadModel(pb.ModelOptions(Model=str(onnx)), timeout=300)
        load_grpc = time.perf_counter() - t
        if not reply.success:
            raise SystemExit(f"LoadModel failed: {reply.message}")
        request = pb.VADRequest(audio=audio.tolist())

        def run_grpc():
            answer = stub.VAD(request, timeout=600)
            return [(s.start, s.end) for s in answer.segments]

        sides = [("ours", run_ours), ("reference", run_ref), ("grpc", run_grpc)]
        found = {name: fn() for name, fn in sides}  # warm-up (first-call costs)
        times = {name: [] for name, _ in sides}
        for i in range(args.repeats):
            order = sides[i % 3 :] + sides[: i % 3]
            line = []
            for name, fn in order:
                t = time.perf_counter()
                found[name] = fn()
                wall = time.perf_counter() - t
                times[name].append(wall)
                line.append(f"{name} {wall:.3f} s")
            print(f"  repeat {i + 1}: " + ", ".join(line), flush=True)
    finally:
        stop_server(proc)

    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    xrt = {k: seconds / v for k, v in med.items()}
    ok_ours, worst_ours = agree(found["ours"], found["reference"])
    ok_grpc, worst_grpc = agree(found["grpc"], found["reference"])
    speed = med["reference"] / med["ours"]
    speed_grpc = med["reference"] / med["grpc"]

    rows = [
        (
            f"reference: silero-vad get_speech_timestamps, TorchScript, torch CPU "
            f"({threads} thread{'s' if threads > 1 else ''})",
            med["reference"],
            best["reference"],
            xrt["reference"],
            1.0,
        ),
        (
            "ours in-process: speech_segments on the load_vad model (MLX CPU)",
            med["ours"],
            best["ours"],
            xrt["ours"],
            speed,
        ),
        (
            f"ours over gRPC: VAD RPC, {seconds:.0f} s of float32 samples sent",
            med["grpc"],
            best["grpc"],
            xrt["grpc"],
            speed_grpc,
        ),
    ]
    print()
    print(
        f"| side | s per run (median of {args.repeats}) | fastest s | × real time (median) "
        "| speed ÷ the reference's (median) |"
    )
    print("|---|---|---|---|---|")
    for name, sec, fastest, rt, ratio in rows:
        print(f"| {name} | {sec:.3f} | {fastest:.3f} | {rt:.1f} | {ratio:.2f} |")
    print()
    print(
        f"VAD speed ÷ the reference's: {speed:.2f} in-process, {speed_grpc:.2f} over gRPC "
        f"(gRPC ÷ in-process time {med['grpc'] / med['ours']:.2f}); fastest runs: "
        f"{best['reference'] / best['ours']:.2f} in-process"
    )
    print(
        f"load: ours {load_ours:.2f} s (ONNX converted), reference {load_ref:.2f} s, "
        f"gRPC LoadModel {load_grpc:.2f} s"
    )
    print(
        f"segments: reference {len(found['reference'])}, ours {len(found['ours'])} "
        f"(agree: {ok_ours}, largest boundary difference {worst_ours * 1000:.1f} ms), "
        f"gRPC {len(found['grpc'])} (agree: {ok_grpc}, {worst_grpc * 1000:.1f} ms)"
    )
    result = {
        "machine": machine(),
        "audio_seconds": round(seconds, 3),
        "sentences": sentences,
        "repeats": args.repeats,
        "torch_threads": threads,
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "fastest_s": {k: round(v, 4) for k, v in best.items()},
        "times_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "x_real_time": {k: round(v, 1) for k, v in xrt.items()},
        "speed_over_reference": round(speed, 3),
        "speed_over_reference_grpc": round(speed_grpc, 3),
        "speed_over_reference_fastest": round(best["reference"] / best["ours"], 3),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "load_s": {
            "ours": round(load_ours, 3),
            "reference": round(load_ref, 3),
            "grpc": round(load_grpc, 3),
        },
        "segments": {k: len(v) for k, v in found.items()},
        "agree": {"ours": ok_ours, "grpc": ok_grpc},
        "max_boundary_diff_ms": {  # null: the segment counts differ
            k: round(v * 1000, 1) if v != float("inf") else None
            for k, v in (("ours", worst_ours), ("grpc", worst_grpc))
        },
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok_ours and ok_grpc else 1


if __name__ == "__main__":
    sys.exit(main())
