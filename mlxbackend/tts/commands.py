"""`mlxbackend tts "text" -o out.wav --model DIR`: speak a text with a Kokoro or Soprano folder,
locally (no server), with the same code the TTS RPC runs."""

import sys

from mlxbackend.client import failure_text
from mlxbackend.errors import BackendError


def add_parser(sub):
    p = sub.add_parser(
        "tts",
        help="speak a text into a WAV file with a Kokoro or Soprano folder (local, no server)",
    )
    p.add_argument(
        "text", help="the text to speak ('-' reads it from stdin); newlines split segments"
    )
    p.add_argument("-o", "--output", required=True, help="WAV file to write (PCM16 mono)")
    p.add_argument(
        "--model",
        required=True,
        help="Kokoro folder (config.json, *.safetensors, voices/) or Soprano folder (config.json, "
        "model.safetensors, tokenizer)",
    )
    p.add_argument(
        "--voice",
        default="",
        help="Kokoro: a voice in <model>/voices (af_heart …), a .safetensors file, or several "
        "joined by commas (mixed); default: Options voice, else the folder's first voice. "
        "Soprano has one voice",
    )
    p.add_argument(
        "--language",
        default="",
        help="en, en-gb, es, fr, hi, it, pt-br (or a Kokoro lang code); Soprano: English",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        help="LoadModel option key:value (Kokoro: voice, lang_code, speed, seed, g2p; Soprano: "
        "temperature, top_p, max_tokens, seed)",
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="append each segment to the file as soon as it is made (as TTSStream sends it); "
        "without it the file appears complete at the end",
    )
    p.set_defaults(func=cmd_tts)


def cmd_tts(args):
    import time
    import wave
    from pathlib import Path

    from rich.console import Console

    from mlxbackend.errors import NotFound
    from mlxbackend.options import parse_options
    from mlxbackend.tts import family_module, tts_family
    from mlxbackend.tts.wav import check_dst, write_wav

    err = Console(stderr=True, highlight=False)
    text = sys.stdin.read() if args.text == "-" else args.text
    model = Path(args.model).resolve()
    start = time.perf_counter()
    try:
        if not model.exists():
            raise NotFound(f"model not found: {args.model}")
        check_dst(args.output)
        family = family_module(tts_family(model))
        with err.status("loading model"):
            tm = family.load_tts(model, parse_options(args.option))
        speech = family.prepare(tm, text, args.voice, args.language)
        synthesize = family.synthesize
        samples = 0
        if args.stream:
            with wave.open(args.output, "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(speech.sample_rate)
                for i, pcm in enumerate(synthesize(speech), 1):
                    w.writeframes(pcm.tobytes())
                    samples += len(pcm)
                    err.print(
                        f"[dim]segment {i}/{len(speech.segments)}: "
                        f"{len(pcm) / speech.sample_rate:.2f} s[/dim]"
                    )
        else:
            with err.status(f"speaking {len(speech.segments)} segments"):
                parts = list(synthesize(speech))
            write_wav(args.output, parts, speech.sample_rate)
            samples = sum(len(p) for p in parts)
    except BackendError as exc:
        err.print(failure_text(exc), style="red", markup=False)
        return 1
    seconds = samples / speech.sample_rate
    err.print(
        f"[dim]wrote {args.output}: {seconds:.2f} s at {speech.sample_rate} Hz, voice "
        f"{speech.voice}, lang_code {speech.lang_code}, {len(speech.segments)} segments in "
        f"{time.perf_counter() - start:.1f} s[/dim]"
    )
    return 0
