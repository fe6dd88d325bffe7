#!/usr/bin/env python
"""Text to speech through the backend vs mlx-audio's own model called in-process (Kokoro, or
Soprano with --family soprano).

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
            (mlxbackend.tts.kokoro.phonemize), inside the timed call.
            Soprano: mlx-audio's loader, then Model.generate(text, max_tokens, temperature,
            top_p) after mx.random.seed(seed), PCM16 likewise;
  * grpc:   a backend process started as LocalAI does (spawn_server: run.sh --addr), LoadModel of
            the folder, the unary TTS RPC timed at the client (G2P, synthesis on the MLX worker,
            the WAV written atomically at dst);
  * stream: TTSStream on the same process: time to the first audio chunk (LocalAI can start
            playing then) and to the last.
The ratio RTF grpc ÷ RTF raw is the cost of serving (target ≥ 0.95); the gRPC WAV's samples must
equal the raw side's, and the stream's chunks the WAV's frames.

Default model: a tiny RANDOM Kokoro (tests/tiny_kokoro.py: Kokoro's fixed decoder, shrunk text
side), or with --family soprano a RANDOM Soprano with Soprano-80M's shapes (tests/tiny_soprano.py),
built in a temp dir. Their audio is noise and its RTF says nothing about real speech; the ratio and
the streaming figures are what it is for (a random Soprano rarely samples its stop token, so each
sentence runs to --max-tokens). --model DIR for a real folder.

  LD_PRELOAD=…/libopenblas.so.0 python scripts/bench_tts.py --repeats 3 --json out.json
  LD_PRELOAD=…/libopenblas.so.0 python scripts/bench_tts.py --family soprano --repeats 3
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
SOPRANO_TEXT = (  # three sentences of ≥ 30 characters: mlx-audio's Soprano speaks each on its own
    "The quick brown fox jumps over the lazy dog. Speech comes out sentence by sentence here. "
    "Hello there, how are you on this fine day?"
)


def raw_kokoro(args, folder: Path) -> dict:
    """mlx-audio's Kokoro in-process, and what the gRPC side is asked for."""
    import mlx.core as mx
    import numpy as np
    from mlx_audio.tts.models.kokoro.pipeline import KokoroPipeline
    from mlx_audio.tts.utils import load_model

    from mlxbackend.tts import kokoro as ours

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
    speed, seed = 1.0, 0

    def run_raw():
        t = time.perf_counter()
        out = []
        for _, ps in ours.phonemize(tm, args.text, code, limit):
            mx.random.seed(seed)
            audio = np.array(KokoroPipeline.infer(model, ps, pack, speed).audio[0])
            out.append((np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16))
        return time.perf_counter() - t, np.concatenate(out)

    # G2P alone (part of both sides' timed calls), after a first call that starts espeak-ng
    ours.phonemize(tm, args.text, code, limit)
    t = time.perf_counter()
    segments = ours.phonemize(tm, args.text, code, limit)
    g2p_s = time.perf_counter() - t
    return {
        "run": run_raw,
        "load_s": load_raw,
        "rate": int(model.sample_rate),
        "voice": voice,
        "lang_code": code,
        "segments": len(segments),
        "options": [],
        "note": f"G2P {g2p_s * 1000:.1f} ms of each call",
        "g2p_ms": round(g2p_s * 1000, 2),
    }


def raw_soprano(args, folder: Path) -> dict:
    """mlx-audio's Soprano in-process: generate() after mx.random.seed(seed)."""
    import mlx.core as mx
    import numpy as np
    from mlx_audio.tts.utils import load_model

    t = time.perf_counter()
    model = load_model(folder, strict=True)
    load_raw = time.perf_counter() - t
    seed, temperature, top_p = 0, 0.3, 0.95

    def run_raw():
        t = time.perf_counter()
        mx.random.seed(seed)
        out = [
            np.array(r.audio)
            for r in model.generate(
                args.text, temperature=temperature, top_p=top_p, max_tokens=args.max_tokens
            )
        ]
        audio = (np.clip(np.concatenate(out), -1.0, 1.0) * 32767).astype(np.int16)
        return time.perf_counter() - t, audio

    sentences = sum(len(model._preprocess_text([line])) for line in args.text.split("\n"))
    return {
        "run": run_raw,
        "load_s": load_raw,
        "rate": int(model.sample_rate),
        "voice": "",
        "lang_code": "en",
        "segments": sentences,
        "options": [f"max_tokens:{args.max_tokens}", f"seed:{seed}"],
        "note": f"temperature {temperature}, top_p {top_p}, max_tokens {args.max_tokens}",
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=("kokoro", "soprano"), default="kokoro")
    ap.add_argument("--model", help="a model folder (default: a random one of --family, built)")
    ap.add_argument("--voice", default="", help="voice (default: the backend's default choice)")
    ap.add_argument("--language", default="en")
    ap.add_argument("--text", help="text to speak (newlines separate segments)")
    ap.add_argument("--max-tokens", type=int, default=96, help="Soprano: tokens per sentence")
    ap.add_argument(
        "--same-malloc",
        action="store_true",
        help="run the raw side under the glibc malloc settings run.sh gives the server "
        "(MALLOC_ARENA_MAX=2, 128 KiB mmap/trim thresholds): the ratio is then the cost of "
        "serving alone, without the allocator's",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.same_malloc:
        from mlxbackend.bench import same_malloc

        same_malloc()
    args.text = args.text or (SOPRANO_TEXT if args.family == "soprano" else TEXT)

    import numpy as np

    from mlxbackend.bench import machine
    from mlxbackend.client import spawn_server, stop_server
    from mlxbackend.proto import backend_pb2 as pb

    tmp = Path(tempfile.mkdtemp(prefix="mlxb-bench-tts-"))
    proc = None
    try:
        if args.model:
            folder, kind = Path(args.model).resolve(), f"{args.family} folder"
        elif args.family == "soprano":
            from tests.tiny_soprano import SOPRANO_80M, build_tiny_soprano

            folder = build_tiny_soprano(tmp / "Soprano-random", sizes=SOPRANO_80M)
            kind = "RANDOM Soprano with Soprano-80M's shapes; audio is noise, RTF meaningless"
        else:
            from tests.tiny_kokoro import build_tiny_kokoro

            folder = build_tiny_kokoro(tmp / "Kokoro-tiny-random")
            kind = "tiny RANDOM Kokoro (58.6 M parameters; audio is noise, RTF meaningless)"
        raw = (raw_soprano if args.family == "soprano" else raw_kokoro)(args, folder)
        run_raw, rate, voice = raw["run"], raw["rate"], raw["voice"]

        # -- the backend process --------------------------------------------------------------------
        log = open(tmp / "server.log", "w+")
        proc, stub = spawn_server(timeout=120, log=log)
        t = time.perf_counter()
        reply = stub.LoadModel(
            pb.ModelOptions(Model=str(folder), Options=raw["options"]), timeout=600
        )
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

        print(f"machine: {machine()}")
        print(
            f"model: {folder} ({kind}) | voice {voice or '-'}, lang_code {raw['lang_code']} | "
            f"{raw['segments']} segments | repeats {args.repeats} | load: raw "
            f"{raw['load_s']:.1f} s, gRPC LoadModel {load_grpc:.1f} s",
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
            (
                "raw: mlx-audio's Soprano in-process (generate)"
                if args.family == "soprano"
                else "raw: mlx-audio's Kokoro in-process (+ the same espeak-ng G2P)",
                "raw",
            ),
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
            f"RTF gRPC ÷ raw: {ratio:.3f} (target ≥ 0.95) | {raw['note']} "
            f"| gRPC samples == raw: {same_raw} | stream chunks == WAV: {same_stream}"
        )
        result = {
            "machine": machine(),
            "family": args.family,
            "model": str(folder) if args.model else kind,
            "voice": voice,
            "lang_code": raw["lang_code"],
            "text": args.text,
            "segments": raw["segments"],
            "settings": raw["note"],
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
            "load_s": {"raw": round(raw["load_s"], 2), "grpc": round(load_grpc, 2)},
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "raw_side_malloc": "run.sh's" if args.same_malloc else "glibc defaults",
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
