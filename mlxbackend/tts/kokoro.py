"""Kokoro on MLX (mlx-audio 0.6.2's model): load a folder, resolve the voice and the language,
phonemize offline (mlxbackend/tts/espeak.py, or misaki where it is installed), and synthesize
segment by segment as PCM16.

What mlx-audio's `Model.generate` does for one segment is `model(phonemes, pack[len(phonemes) -
1], speed)`; this module calls exactly that, after `mx.random.seed(seed)` (Kokoro's decoder adds
random noise and a random phase to its harmonic source: seeding each segment makes the audio a
function of the request alone, the same streamed or not, whatever else runs between segments)."""

import importlib
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlxbackend.errors import Cancelled, EmptyOutput, InvalidInput, Precondition
from mlxbackend.options import number_option
from mlxbackend.tts import tts_family
from mlxbackend.tts.wav import pcm16

MAX_PHONEMES = 510  # Kokoro's context (512 positions) less its two boundary tokens
CHUNK_CHARS = 400  # mlx-audio's KokoroPipeline: text chunks of up to 400 characters
# Kokoro's language codes (mlx-audio's KokoroPipeline.LANG_CODES)
LANGUAGES = {
    "a": "American English",
    "b": "British English",
    "e": "Spanish",
    "f": "French",
    "h": "Hindi",
    "i": "Italian",
    "p": "Brazilian Portuguese",
    "j": "Japanese",
    "z": "Mandarin Chinese",
}
ESPEAK = {"a": "en-us", "b": "en-gb", "e": "es", "f": "fr-fr", "h": "hi", "i": "it", "p": "pt-br"}
# what LocalAI's TTSRequest.language may say (BCP 47 tags, names) → Kokoro's code
ALIASES = {
    "en": "a",
    "en-us": "a",
    "english": "a",
    "american": "a",
    "en-gb": "b",
    "en-uk": "b",
    "british": "b",
    "es": "e",
    "spanish": "e",
    "fr": "f",
    "fr-fr": "f",
    "french": "f",
    "hi": "h",
    "hindi": "h",
    "it": "i",
    "italian": "i",
    "pt": "p",
    "pt-br": "p",
    "portuguese": "p",
    "ja": "j",
    "japanese": "j",
    "zh": "z",
    "cmn": "z",
    "chinese": "z",
    "mandarin": "z",
}
MISAKI_EXTRAS = {"j": ("misaki.ja", "misaki[ja]"), "z": ("misaki.zh", "misaki[zh]")}
G2P_CHOICES = ("auto", "espeak", "misaki")
DEFAULT_VOICE = "af_heart"  # mlx-audio's and LocalAI's kokoro backend's default, when present
VOICE_PREFIX = re.compile(r"^([abefhijpz])[fm]_")  # Kokoro's voice names: af_heart, ef_dora, …


@dataclass
class Settings:
    """LoadModel Options (the model YAML): defaults for every request."""

    voice: str = ""  # "" = af_heart if <model>/voices has it, else its first voice
    lang_code: str = ""  # "" = from the voice's name (af_… → a), else a
    speed: float = 1.0
    seed: int = 0
    g2p: str = "auto"


@dataclass
class TtsModel:
    path: Path
    model: object  # mlx_audio.tts.models.kokoro.Model
    settings: Settings
    sample_rate: int
    packs: dict = field(default_factory=dict)  # voice file → its style pack (N, 1, 256)
    pipelines: dict = field(default_factory=dict)  # lang code → a quiet misaki KokoroPipeline
    family: str = "kokoro"

    @property
    def key(self) -> str:
        return str(self.path)

    def describe(self) -> str:
        return f"Kokoro {self.path} ({self.sample_rate} Hz, {len(self.voice_names())} voices)"

    def voice_names(self) -> list:
        folder = self.path / "voices"
        try:
            return sorted(
                p.stem for p in folder.glob("*.safetensors") if not p.name.startswith(".")
            )
        except OSError:
            return []


@dataclass
class Speech:
    """One request, ready to synthesize: its segments (graphemes, phonemes) and style pack."""

    tm: TtsModel
    segments: list
    pack: object  # mx.array (N, 1, 256)
    voice: str
    lang_code: str
    speed: float
    seed: int

    @property
    def sample_rate(self) -> int:
        return self.tm.sample_rate


# -- settings ---------------------------------------------------------------------------------
def language_code(value: str) -> str:
    """A LocalAI language string (en, en-US, es, fr-fr, pt_BR, …) or a Kokoro code → the code."""
    text = str(value).strip().lower().replace("_", "-")
    if text in LANGUAGES:
        return text
    if text in ALIASES:
        return ALIASES[text]
    base = text.split("-")[0]
    if base in ALIASES:
        return ALIASES[base]
    known = ", ".join(f"{code} ({name})" for code, name in LANGUAGES.items())
    raise InvalidInput(
        f"language {value!r} is not one Kokoro speaks; use a code or tag: {known}; or en, en-gb, "
        "es, fr, hi, it, pt-br, ja, zh"
    )


def settings_from(options: dict) -> Settings:
    s = Settings()
    if "voice" in options:
        s.voice = str(options["voice"]).strip()
    if str(options.get("lang_code", "")).strip():
        s.lang_code = language_code(str(options["lang_code"]))
    s.speed = number_option(options, "speed", float, 0.1, 10, s.speed)
    s.seed = number_option(options, "seed", int, default=s.seed)
    if "g2p" in options:
        s.g2p = str(options["g2p"]).strip().lower()
        if s.g2p not in G2P_CHOICES:
            raise InvalidInput(f"option g2p: {s.g2p!r} is not one of {', '.join(G2P_CHOICES)}")
    return s


# -- loading (worker thread) --------------------------------------------------------------------
def load_tts(path: Path, options: dict) -> TtsModel:
    settings = settings_from(options)
    path = Path(path)
    if not path.is_dir():
        raise InvalidInput(f"{path} is not a TTS model folder (config.json, weights, voices/)")
    if tts_family(path) != "kokoro":
        raise InvalidInput(f"{path}/config.json is not a Kokoro config (istftnet and plbert)")
    from mlx_audio.tts.utils import load_model

    try:
        model = load_model(path, strict=True, model_type="kokoro")
    except (FileNotFoundError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"{path} is not a loadable Kokoro folder: {exc}") from None
    tm = TtsModel(path, model, settings, int(model.sample_rate))
    if settings.voice:
        voice_pack(tm, settings.voice)  # a bad default voice fails LoadModel, not each request
    return tm


# -- voices ------------------------------------------------------------------------------------
def voice_files(tm: TtsModel, spec: str) -> list:
    """The voice files a voice names: a name in <model>/voices, a .safetensors path (absolute or
    relative to the model folder), or several of those separated by commas (averaged, as
    mlx-audio does). Never downloaded: an unknown name is INVALID_ARGUMENT listing the folder."""
    files = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part.endswith(".safetensors"):
            path = Path(part)
            if not path.is_absolute() and (tm.path / part).is_file():
                path = tm.path / part
            if not path.is_file():
                raise InvalidInput(f"voice file {part} not found")
        else:
            path = tm.path / "voices" / f"{part}.safetensors"
            if "/" in part or "\\" in part or not path.is_file():
                names = tm.voice_names()
                listed = ", ".join(names) if names else "no voices"
                raise InvalidInput(
                    f"unknown voice {part!r}: {tm.path / 'voices'} has {listed} (voices are "
                    "never downloaded: put <name>.safetensors there, or name a .safetensors file)"
                )
        files.append(path)
    if not files:
        raise InvalidInput(f"voice {spec!r} names no voice")
    return files


def voice_pack(tm: TtsModel, spec: str):
    """The style pack (N, 1, 256) of a voice (averaged over several); cached per file."""
    import mlx.core as mx

    width = 2 * int(tm.model.config.style_dim)
    packs = []
    for path in voice_files(tm, spec):
        key = str(path.resolve())
        if key not in tm.packs:
            try:
                tensors = mx.load(str(path))
            except Exception as exc:  # noqa: BLE001 — any unreadable file
                raise InvalidInput(f"voice file {path} cannot be read: {exc}") from None
            pack = tensors.get("voice", next(iter(tensors.values())) if len(tensors) == 1 else None)
            if pack is None:
                raise InvalidInput(f"voice file {path} has no 'voice' tensor")
            if pack.ndim == 2:
                pack = pack[:, None, :]
            if pack.ndim != 3 or pack.shape[1] != 1 or pack.shape[2] != width or pack.shape[0] < 1:
                raise InvalidInput(
                    f"voice file {path}: shape {tuple(pack.shape)}, expected (N, 1, {width})"
                )
            tm.packs[key] = pack
        packs.append(tm.packs[key])
    if len(packs) == 1:
        return packs[0]
    if len({tuple(p.shape) for p in packs}) != 1:
        raise InvalidInput(f"voices {spec!r} have different shapes; they cannot be mixed")
    return mx.mean(mx.stack(packs), axis=0)


def default_voice(tm: TtsModel) -> str:
    if tm.settings.voice:
        return tm.settings.voice
    names = tm.voice_names()
    if not names:
        raise InvalidInput(
            f"no voice named and {tm.path / 'voices'} holds none: set TTSRequest.voice (a "
            ".safetensors voice file) or put voices there"
        )
    return DEFAULT_VOICE if DEFAULT_VOICE in names else names[0]


def request_language(tm: TtsModel, language: str, voice: str) -> str:
    """TTSRequest.language, else Options lang_code, else the voice name's prefix, else a."""
    if str(language or "").strip():
        return language_code(language)
    if tm.settings.lang_code:
        return tm.settings.lang_code
    first = Path(voice.split(",")[0].strip()).stem.lower()
    match = VOICE_PREFIX.match(first)
    return match.group(1) if match else "a"


# -- G2P -----------------------------------------------------------------------------------
def misaki_english() -> bool:
    """misaki.en works offline only with spaCy's en_core_web_sm already installed (misaki
    downloads it otherwise; it is not on PyPI)."""
    return all(importlib.util.find_spec(m) for m in ("misaki", "spacy", "en_core_web_sm"))


def uses_misaki(tm: TtsModel, code: str) -> bool:
    return (
        code in MISAKI_EXTRAS
        or tm.settings.g2p == "misaki"
        or (tm.settings.g2p == "auto" and code in "ab" and misaki_english())
    )


def phonemize(tm: TtsModel, text: str, code: str, limit: int) -> list:
    """Segments (graphemes, phonemes ≤ limit) of text: one per line (mlx-audio splits on
    newlines), each cut into chunks of ≤ 400 characters at sentence ends (mlx-audio's rule),
    cut further where the phonemes would pass the limit."""
    if uses_misaki(tm, code):
        return _misaki_segments(tm, text, code, limit)
    from mlxbackend.tts import espeak

    if code in "ab":

        def to_phonemes(chunk):
            return espeak.g2p_english(chunk, british=code == "b")
    else:

        def to_phonemes(chunk):
            return espeak.g2p(chunk, ESPEAK[code])

    try:
        out = []
        for piece in re.split(r"\n+", text.strip()):
            if piece.strip():
                for chunk in _chunks(piece):
                    out.extend(_fit(chunk, to_phonemes, limit))
        return out
    except espeak.EspeakError as exc:
        raise Precondition(f"espeak-ng G2P for {LANGUAGES[code]}: {exc}") from None


def _chunks(text: str) -> list:
    """mlx-audio KokoroPipeline's chunking for espeak languages (≤ 400 characters, at . ! ?)."""
    sentences = re.split(r"([.!?]+)", text)
    chunks, current = [], ""
    for i in range(0, len(sentences), 2):
        sentence = sentences[i] + (sentences[i + 1] if i + 1 < len(sentences) else "")
        if len(current) + len(sentence) <= CHUNK_CHARS:
            current += sentence
        else:
            if current:
                chunks.append(current.strip())
            current = sentence
    if current:
        chunks.append(current.strip())
    return [c for c in chunks if c.strip()]


def _fit(chunk: str, to_phonemes, limit: int) -> list:
    ps = to_phonemes(chunk)
    if not ps:
        return []
    if len(ps) <= limit:
        return [(chunk, ps)]
    parts = _split(chunk)
    if len(parts) < 2:  # one enormous word: cut, as mlx-audio does
        return [(chunk, ps[:limit])]
    return [seg for part in parts for seg in _fit(part, to_phonemes, limit)]


def _split(text: str) -> list:
    """Two or more pieces of text: at sentence ends, else clause marks, else halfway by words."""
    for pattern in (r"(?<=[.!?…])\s+", r"(?<=[,;:—])\s*"):
        parts = [p for p in re.split(pattern, text) if p.strip()]
        if len(parts) > 1:
            return parts
    words = text.split()
    if len(words) < 2:
        return [text]
    half = len(words) // 2
    return [" ".join(words[:half]), " ".join(words[half:])]


def _misaki_segments(tm: TtsModel, text: str, code: str, limit: int) -> list:
    if code in "ab" and not misaki_english():
        raise Precondition(
            f"g2p:misaki for {LANGUAGES[code]} needs misaki's English extra and spaCy's "
            "en_core_web_sm installed (misaki would download it; it is not on PyPI); the default "
            "espeak-ng G2P (g2p:espeak) works offline"
        )
    if code in MISAKI_EXTRAS:
        module, extra = MISAKI_EXTRAS[code]
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 — ImportError, or a dictionary it lacks
            raise Precondition(
                f"{LANGUAGES[code]} (lang_code {code}) needs {extra} (misaki's G2P for it), "
                f"which is not usable here: {exc}"
            ) from None
    pipeline = tm.pipelines.get(code)
    if pipeline is None:
        from mlx_audio.tts.models.kokoro.pipeline import KokoroPipeline

        try:
            pipeline = KokoroPipeline(
                lang_code=code, model=False, repo_id=tm.model.REPO_ID, model_path=tm.path
            )
        except Exception as exc:  # noqa: BLE001 — misaki's own set-up
            raise Precondition(f"misaki G2P for {LANGUAGES[code]} failed to start: {exc}") from None
        tm.pipelines[code] = pipeline
    # model=False: a quiet pipeline, phonemes only (no voice is read, nothing is downloaded)
    return [
        (r.graphemes, r.phonemes[:limit])
        for r in pipeline(text, voice="-", speed=1, split_pattern=r"\n+")
        if r.phonemes
    ]


# -- requests (worker thread) -------------------------------------------------------------------
def prepare(tm: TtsModel, text: str, voice: str = "", language: str = "") -> Speech:
    """Validate a request and phonemize it (no audio yet)."""
    if not str(text or "").strip():
        raise InvalidInput("text is empty: nothing to speak")
    voice = str(voice or "").strip() or default_voice(tm)
    pack = voice_pack(tm, voice)
    code = request_language(tm, language, voice)
    limit = min(MAX_PHONEMES, int(tm.model.context_length) - 2, int(pack.shape[0]))
    segments = phonemize(tm, text, code, limit)
    if not segments:
        raise InvalidInput(f"nothing to speak in {text[:80]!r}: it gives no phonemes")
    return Speech(tm, segments, pack, voice, code, tm.settings.speed, tm.settings.seed)


def synthesize(speech: Speech, is_cancelled=lambda: False):
    """PCM16 samples (np.int16, mono) of each segment in turn, as mlx-audio's Kokoro makes them."""
    import mlx.core as mx

    model, pack = speech.tm.model, speech.pack
    for graphemes, ps in speech.segments:
        if is_cancelled():
            raise Cancelled("speech synthesis cancelled")
        mx.random.seed(speech.seed)
        out = model(ps, pack[len(ps) - 1], speech.speed, return_output=True)
        audio = np.array(out.audio[0], dtype=np.float32)
        mx.clear_cache()
        if audio.size == 0 or not np.isfinite(audio).all():
            raise EmptyOutput(
                f"Kokoro produced no finite audio for {graphemes[:80]!r} (voice {speech.voice})"
            )
        yield pcm16(audio)
