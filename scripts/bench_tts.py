#!/usr/bin/env python
"""Text to speech through the backend vs mlx-audio's Kokoro called in-process.

One multi-sentence text (one sentence per line, so that each is its own segment, as mlx-audio's
Kokoro splits text on newlines), three sides alternating (their order rotates each repeat),
medians over --repeats after one warm-up call of the unary and raw sides; real-time factor
RTF = audio seconds ÷ wall seconds (higher is faster):
  * raw:    mlx-audio's own Kokoro in this process: its loader (mlx_audio.tts.utils.load_model),
            the voice pack from the folder, and for each segment the call its pipeline makes
            (KokoroPipeline.infer: model(phonemes, pack[len(phonemes) - 1], speed)) after
            mx.random.seed(seed), float → PCM16 as mlx_audio.audio_io.write does. G2P: mlx-audio's
            own (misaki.en) needs spaCy's en_core_web_sm, which is not on PyPI and cannot be
            fetched offline, so the raw side runs the same offline espeak-ng G2P the backend runs
            (mlxbackend.tts.kokoro.phonemize), inside the timed call;
  * grpc:   a backend process started as LocalAI does (spawn_server: run.sh --addr), LoadModel of
            the folder, the unary TTS RPC timed at the client (G2P, synthesis on the MLX worker,
            the WAV written atomically at dst);
  * stream: TTSStream on the same process: time to the first audio chunk (LocalAI can start
            playing then) and to the last.
The ratio RTF grpc ÷ RTF raw is the cost of serving (target ≥ 0.95); the gRPC WAV's samples must
equal the raw side's, and the stream's chunks the WAV's frames.

Default model: a tiny RANDOM Kokoro (tests/tiny_kokoro.py: Kokoro's fixed decoder, shrunk text
side) built in a temp dir. Its audio is noise and its RTF says nothing about real speech; the
ratio and the streaming figures are what it is for. --model DIR for a real Kokoro folder.

  LD_PRELOAD=…/libopenblas.so.0 python scripts/bench_tts.py --repeats 3 --json out.json
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import wave
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXT = "Hi there.\nGood day.\nBye now!"  # short: the tiny model takes ~10 s per segment here


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a Kokoro folder (default: a tiny random Kokoro, built)")
    ap.add_argument("--voice", default="", help="voice (default: the backend's default choice)")
    ap.add_argument("--language", default="en")
    ap.add_argument("--text", default=TEXT, help="text to speak (newlines separate segments)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    import mlx.core as mx
    import numpy as np
    from mlx_audio.tts.models.kokoro.pipeline import KokoroPipeline
    from mlx_audio.tts.utils import load_model

    from mlxbackend.bench import machine
    from mlxbackend.client import spawn_server, stop_server
    from mlxbackend.proto import backend_pb2 as pb
    from mlxbackend.tts import kokoro as ours

    tmp = Path(tempfile.mkdtemp(prefix="mlxb-bench-tts-"))
    proc = None
    try:
        if args.model:
            folder, kind = Path(args.model).resolve(), "Kokoro folder"
        else:
            from tests.tiny_kokoro import build_tiny_kokoro

            folder = build_tiny_kokoro(tmp / "Kokoro-tiny-random")
            kind = "tiny RANDOM Kokoro (58.6 M parameters; audio is noise, RTF meaningless)"

        # -- raw side: mlx-audio's loader and call; phonemes by the backend's offline G2P ----------
        t = time.perf_counter()
        model = load_model(folder, strict=True)
        load_raw = time.perf_counter() - t
        tm = ours.TtsModel(folder, model, ours.Settings(), int(model.sample_rate))
        voice = args.voice or ours.default_voice(tm)
        voice_file = ours.voice_files(tm, voice)  # resolves a name / a file / a comma list
        packs = [mx.load(str(f))["voice"] for f in voice_file]
        pack = packs[0] if len(packs) == 1 else mx.mean(mx.stack(packs), axis=0)
        code = ours.request_language(tm, args.language, voice)
        limit = min(ours.MAX_PHONEMES, int(model.context_length) - 2, int(pack.shape[0]))
        speed, seed, rate = 1.0, 0, int(model.sample_rate)

        def run_raw():
            t = time.perf_counter()
            out = []
            for _, ps in ours.phonemize(tm, args.text, code, limit):
                mx.random.seed(seed)
                audio = np.array(KokoroPipeline.infer(model, ps, pack, speed).audio[0])
                out.append((np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16))
            return time.perf_counter() - t, np.concatenate(out)

        # -- the backend process --------------------------------------------------------------------
        log = open(tmp / "server.log", "w+")
        proc, stub = spawn_server(timeout=120, log=log)
        t = time.perf_counter()
        reply = stub.LoadModel(pb.ModelOptions(Model=str(folder)), timeout=600)
        load_grpc = time.perf_counter() - t
        if not reply.success:
            raise SystemExit(f"LoadModel failed: {reply.message}")
        dst = tmp / "speech.wav"
        request = pb.TTSRequest(text=args.text, dst=str(dst), voice=voice, language=args.language)
        stream_request = pb.TTSRequest(text=args.text, voice=voice, language=args.language)

        def run_grpc():
            t = time.perf_counter()
            done = stub.TTS(request, timeout=1800)
            wall = time.perf_counter() - t
            if not done.success:
                raise SystemExit(f"TTS failed: {done.message}")
            with wave.open(str(dst), "rb") as w:
                return wall, np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")

        stream_first = []  # seconds to the first audio chunk, per timed stream

        def run_stream():
            t = time.perf_counter()
            first, chunks, header = None, [], None
            for r in stub.TTSStream(stream_request, timeout=1800):
                if r.audio:
                    if first is None:
                        first = time.perf_counter() - t
                    chunks.append(r.audio)
                elif header is None:
                    header = json.loads(r.message)
            wall = time.perf_counter() - t
            assert header == {"sample_rate": rate}, header
            run_stream.first, run_stream.chunks = first, len(chunks)
            return wall, np.frombuffer(b"".join(chunks), dtype="<i2")

        # G2P alone (part of both sides' timed calls), after a first call that starts espeak-ng
        ours.phonemize(tm, args.text, code, limit)
        t = time.perf_counter()
        segments = ours.phonemize(tm, args.text, code, limit)
        g2p_s = time.perf_counter() - t

        print(f"machine: {machine()}")
        print(
            f"model: {folder} ({kind}) | voice {voice}, lang_code {code} | {len(segments)} "
            f"segments | repeats {args.repeats} | load: raw {load_raw:.1f} s, gRPC LoadModel "
            f"{load_grpc:.1f} s",
            flush=True,
        )
        sides = [("grpc", run_grpc), ("raw", run_raw), ("stream", run_stream)]
        samples, times = {}, {name: [] for name, _ in sides}
        for name, fn in sides[:2]:  # warm-up: first-call costs (caches, espeak); the stream
            wall, samples[name] = fn()  # runs on the process the unary call has warmed
            print(f"  warm-up {name:6s} {wall:7.2f} s", flush=True)
        for i in range(args.repeats):
            order = sides[i % 3 :] + sides[: i % 3]
            line = []
            for name, fn in order:
                wall, samples[name] = fn()
                times[name].append(wall)
                extra = ""
                if name == "stream":
                    stream_first.append(run_stream.first)
                    extra = f" (first chunk {run_stream.first:.2f} s)"
                line.append(f"{name} {wall:.2f} s{extra}")
            print(f"  repeat {i + 1}: " + ", ".join(line), flush=True)
        proc_to_stop, proc = proc, None
        stop_server(proc_to_stop)
        log.close()

        audio_s = len(samples["grpc"]) / rate
        med = {k: statistics.median(v) for k, v in times.items()}
        rtf = {k: audio_s / v for k, v in med.items()}
        first = statistics.median(stream_first)
        same_raw = np.array_equal(samples["grpc"], samples["raw"])
        same_stream = np.array_equal(samples["stream"], samples["grpc"])
        ratio = rtf["grpc"] / rtf["raw"]

        print()
        print(
            f"| side | s per run (median of {args.repeats}) | audio s | RTF (audio ÷ wall) "
            "| ÷ raw RTF |"
        )
        print("|---|---|---|---|---|")
        rows = [
            ("raw: mlx-audio's Kokoro in-process (+ the same espeak-ng G2P)", "raw"),
            ("gRPC `TTS` (unary, WAV written at dst)", "grpc"),
            ("gRPC `TTSStream` (to the last chunk)", "stream"),
        ]
        for label, k in rows:
            print(
                f"| {label} | {med[k]:.2f} | {audio_s:.2f} | {rtf[k]:.3f} "
                f"| {rtf[k] / rtf['raw']:.3f} |"
            )
        print()
        print(
            "| text | segments | first chunk, `TTSStream` (median) | unary `TTS` total (median) "
            "| first chunk ÷ unary |"
        )
        print("|---|---|---|---|---|")
        print(
            f"| {len(args.text.splitlines())} lines, {len(args.text)} characters | "
            f"{run_stream.chunks} | {first:.2f} s | {med['grpc']:.2f} s | {first / med['grpc']:.2f} |"
        )
        print()
        print(
            f"RTF gRPC ÷ raw: {ratio:.3f} (target ≥ 0.95) | G2P {g2p_s * 1000:.1f} ms of each call "
            f"| gRPC samples == raw: {same_raw} | stream chunks == WAV: {same_stream}"
        )
        result = {
            "machine": machine(),
            "model": str(folder) if args.model else "tiny random Kokoro (tests/tiny_kokoro.py)",
            "voice": voice,
            "lang_code": code,
            "text": args.text,
            "segments": len(segments),
            "repeats": args.repeats,
            "audio_seconds": round(audio_s, 3),
            "median_s": {k: round(v, 3) for k, v in med.items()},
            "times_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "rtf": {k: round(v, 4) for k, v in rtf.items()},
            "ratio_grpc_over_raw": round(ratio, 3),
            "ratio_stream_over_raw": round(rtf["stream"] / rtf["raw"], 3),
            "stream_first_chunk_s": round(first, 3),
            "stream_first_chunk_runs_s": [round(x, 3) for x in stream_first],
            "first_chunk_over_unary": round(first / med["grpc"], 3),
            "g2p_ms": round(g2p_s * 1000, 2),
            "load_s": {"raw": round(load_raw, 2), "grpc": round(load_grpc, 2)},
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "same_samples_grpc_raw": same_raw,
            "same_samples_stream_grpc": same_stream,
        }
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return 0 if same_raw and same_stream else 1
    finally:
        if proc is not None:
            stop_server(proc)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
