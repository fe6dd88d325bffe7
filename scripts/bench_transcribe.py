#!/usr/bin/env python
"""Transcription speed through the backend vs mlx-whisper called directly.

Both sides, alternating, several rounds, medians; real-time factor RTF = audio seconds / wall
seconds (higher is faster):
  * grpc: AudioTranscription on a backend process (spawn_server + LoadModel of the folder),
    audio sent as a WAV file path (so it includes PyAV decoding and the gRPC round trip);
  * raw:  mlx_whisper.transcribe(array, path_or_hf_repo=folder, fp16=False, …) in this process
    with the exact decode options the backend uses (temperature 0 → whisper's fallback ladder
    (0.0, 0.2, …, 1.0), as the backend maps it; language, no prompt, no word timestamps).
By default the raw side runs the model as the backend loads it (float32 weights on CPU);
--naive-raw lets mlx-whisper load the folder itself. The ratio grpc/raw is the overhead of serving (target ≥ 0.95). The two texts must match.

Default model: a random whisper-tiny-sized float32 folder (4+4 layers, 384 wide, vocab 51865)
built in a temp dir; its junk output is bounded by --text-ctx (mlx-whisper decodes at most
n_text_ctx // 2 tokens per 30-s window), the same on both sides. --model DIR for real weights
(an MLX whisper folder, e.g. mlx-community/whisper-tiny). Audio: espeak-ng speech when installed,
otherwise a generated chirp.

  LD_PRELOAD=…/libopenblas.so.0 python scripts/bench_transcribe.py --seconds 45 --rounds 3 --json out.json
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

TINY = dict(
    n_mels=80,
    n_audio_ctx=1500,
    n_audio_state=384,
    n_audio_head=6,
    n_audio_layer=4,
    n_vocab=51865,
    n_text_ctx=448,
    n_text_state=384,
    n_text_head=6,
    n_text_layer=4,
)
SPEECH = (
    "The quick brown fox jumps over the lazy dog. Today the weather is sunny and warm. "
    "I would like a cup of coffee, please. "
)


def build_random_whisper(out: Path, text_ctx: int, seed: int = 0) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_whisper.whisper import ModelDimensions, Whisper

    out.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    dims = {**TINY, "n_text_ctx": text_ctx}
    model = Whisper(ModelDimensions(**dims), mx.float32)
    weights = {k: v for k, v in tree_flatten(model.parameters()) if k != "alignment_heads"}
    mx.save_safetensors(str(out / "weights.safetensors"), weights)
    (out / "config.json").write_text(json.dumps({"model_type": "whisper", **dims}, indent=2))
    return out


def make_audio(path: Path, seconds: float) -> str:
    """A 16 kHz mono WAV of about `seconds`: espeak-ng speech if present, else a chirp."""
    import numpy as np

    from mlxbackend.tts.wav import pcm16, write_wav

    rate = 16000
    espeak = shutil.which("espeak-ng")
    if espeak:
        raw = path.with_suffix(".espeak.wav")
        subprocess.run(
            [espeak, "-v", "en-us", "-s", "130", "-w", str(raw), SPEECH * 12], check=True
        )
        from mlxbackend.audio.decode import load_audio

        speech = load_audio(str(raw))
        reps = int(np.ceil(seconds * rate / len(speech)))
        samples, kind = np.tile(speech, reps)[: int(seconds * rate)], "espeak-ng speech"
    else:
        t = np.arange(int(seconds * rate)) / rate
        freq = 200 + 600 * (t % 5) / 5
        samples = 0.4 * np.sin(2 * np.pi * np.cumsum(freq) / rate)
        samples += 0.02 * np.random.default_rng(0).standard_normal(len(t))
        kind = "chirp"
    write_wav(str(path), [pcm16(samples)], rate)
    return kind


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="an MLX whisper folder (default: random whisper-tiny-sized)")
    ap.add_argument(
        "--text-ctx",
        type=int,
        default=64,
        help="random model only: n_text_ctx, bounds each window to n_text_ctx//2 tokens",
    )
    ap.add_argument("--seconds", type=float, default=45.0, help="audio length (30-60 s)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--language", default="en")
    ap.add_argument(
        "--naive-raw",
        action="store_true",
        help="raw side: let mlx-whisper load the folder itself (keeps float16 weights on CPU: slow)",
    )
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    import mlx_whisper

    from mlxbackend.audio.decode import load_audio
    from mlxbackend.audio.whisper import temperatures
    from mlxbackend.client import spawn_server, stop_server
    from mlxbackend.proto import backend_pb2 as pb

    tmp = Path(tempfile.mkdtemp(prefix="mlxb-bench-transcribe-"))
    try:
        folder = (
            Path(args.model).resolve()
            if args.model
            else build_random_whisper(tmp / "whisper-tiny-random", args.text_ctx)
        )
        wav = tmp / "audio.wav"
        kind = make_audio(wav, args.seconds)
        audio = load_audio(str(wav))
        seconds = len(audio) / 16000
        raw_kwargs = dict(
            path_or_hf_repo=str(folder),
            fp16=False,
            temperature=temperatures(0.0),
            language=args.language,
            task="transcribe",
            initial_prompt=None,
            word_timestamps=False,
            verbose=None,
        )
        if not args.naive_raw:
            # the same model the backend runs: weights cast to the compute dtype (float32 on CPU);
            # mlx-whisper alone would keep a float16 folder's weights as float16 under fp16=False
            import importlib

            from mlxbackend.audio.whisper import load_whisper

            holder = importlib.import_module("mlx_whisper.transcribe").ModelHolder
            holder.model, holder.model_path = load_whisper(folder).model, str(folder)
        request = pb.TranscriptRequest(dst=str(wav), language=args.language, temperature=0.0)

        proc, stub = spawn_server()
        try:
            reply = stub.LoadModel(pb.ModelOptions(Model=str(folder)), timeout=300)
            if not reply.success:
                raise SystemExit(f"LoadModel failed: {reply.message}")

            def run_grpc():
                t = time.perf_counter()
                text = stub.AudioTranscription(request, timeout=1800).text
                return time.perf_counter() - t, text

            def run_raw():
                t = time.perf_counter()
                text = mlx_whisper.transcribe(audio, **raw_kwargs)["text"]
                return time.perf_counter() - t, text

            print(
                f"model {folder} | audio {seconds:.1f} s of {kind} | rounds {args.rounds}",
                flush=True,
            )
            _, grpc_text = run_grpc()  # warm-up both (model load, compile, caches)
            _, raw_text = run_raw()
            times = {"grpc": [], "raw": []}
            for i in range(args.rounds):
                order = (
                    (("grpc", run_grpc), ("raw", run_raw))
                    if i % 2 == 0
                    else (("raw", run_raw), ("grpc", run_grpc))
                )
                for name, fn in order:
                    wall, text = fn()
                    times[name].append(wall)
                    if name == "grpc":
                        grpc_text = text
                    else:
                        raw_text = text
                    print(
                        f"  round {i + 1} {name:4s} {wall:7.2f} s  RTF {seconds / wall:6.2f}",
                        flush=True,
                    )
        finally:
            stop_server(proc)

        med = {k: statistics.median(v) for k, v in times.items()}
        rtf = {k: seconds / v for k, v in med.items()}
        same = grpc_text == raw_text
        result = {
            "model": "random whisper-tiny-sized float32" if not args.model else str(folder),
            "text_ctx": None if args.model else args.text_ctx,
            "audio": kind,
            "audio_seconds": round(seconds, 2),
            "rounds": args.rounds,
            "naive_raw": args.naive_raw,
            "cpu_count": os.cpu_count(),
            "median_wall_s": {k: round(v, 3) for k, v in med.items()},
            "rtf": {k: round(v, 3) for k, v in rtf.items()},
            "ratio_grpc_over_raw": round(rtf["grpc"] / rtf["raw"], 3),
            "same_text": same,
            "text_chars": len(grpc_text),
            "text_head": grpc_text[:120],
        }
        print(
            f"RTF grpc {rtf['grpc']:.2f} | raw {rtf['raw']:.2f} | ratio {result['ratio_grpc_over_raw']:.3f} "
            f"| same text: {same}"
        )
        if not same:
            print(f"  grpc: {grpc_text[:200]!r}\n  raw:  {raw_text[:200]!r}")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return 0 if same else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
