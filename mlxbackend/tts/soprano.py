"""Soprano on MLX (mlx-audio 0.6.2's model): a Qwen3 language model whose hidden states a Vocos
decoder turns into 32 kHz speech. Load a folder, split the text as mlx-audio does, and generate
sentence by sentence as PCM16.

What mlx-audio's `Model.generate` does per sentence is its `stream_generate` loop (prefill, then
sample a token and run it, keeping each step's last hidden state, until the stop token or
max_tokens), then `decoder(hidden)` trimmed to the tokens made. This module runs that loop
itself for one reason: the worker pauses between tokens (other requests run there), and
mlx-audio's sampler draws from MLX's global random state, which those requests may reseed. Here
the request carries its own key, split exactly as the global state would be
(`key, sub = split(key)` per draw), so a request's audio equals mlx-audio's `generate` after
`mx.random.seed(seed)`, streamed or not, whatever runs beside it."""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxbackend.errors import Cancelled, EmptyOutput, InvalidInput
from mlxbackend.options import number_option
from mlxbackend.tts.wav import pcm16
from mlxbackend.worker import pause

# mlx-audio's _preprocess_text wraps each sentence in these markers
PROMPT_START, PROMPT_END = "[STOP][TEXT]", "[START]"
ENGLISH = ("", "a", "en", "en-us", "en-gb", "english")  # Soprano speaks English only
DECODER_FIELDS = (  # mlx-audio's DecoderConfig fields, which its loader reads from the path name
    "decoder_num_layers",
    "decoder_dim",
    "decoder_intermediate_dim",
    "hop_length",
    "n_fft",
    "upscale",
    "input_kernel",
    "dw_kernel",
    "token_size",
    "receptive_field",
)


@dataclass
class Settings:
    """LoadModel Options (the model YAML): defaults for every request."""

    temperature: float = 0.3  # mlx-audio's Soprano defaults
    top_p: float = 0.95
    max_tokens: int = 512  # per sentence (a token is 2048 samples, 64 ms at 32 kHz)
    seed: int = 0


@dataclass
class TtsModel:
    path: Path
    model: object  # mlx_audio.tts.models.soprano.Model
    settings: Settings
    sample_rate: int
    family: str = "soprano"

    @property
    def key(self) -> str:
        return str(self.path)

    def describe(self) -> str:
        return f"Soprano {self.path} ({self.sample_rate} Hz, one voice)"


@dataclass
class Speech:
    """One request, ready to synthesize: its sentence prompts, in order."""

    tm: TtsModel
    segments: list  # "[STOP][TEXT]sentence[START]" prompts, as mlx-audio builds them
    voice: str
    lang_code: str
    settings: Settings

    @property
    def sample_rate(self) -> int:
        return self.tm.sample_rate


def settings_from(options: dict) -> Settings:
    s = Settings()
    s.temperature = number_option(options, "temperature", float, 0, 10, s.temperature)
    s.top_p = number_option(options, "top_p", float, 0, 1, s.top_p)
    s.max_tokens = number_option(options, "max_tokens", int, 1, 100_000, s.max_tokens)
    s.seed = number_option(options, "seed", int, default=s.seed)
    speed = number_option(options, "speed", float, default=1.0)
    if speed != 1.0:
        raise InvalidInput("option speed: Soprano has no speed control (leave it at 1)")
    if str(options.get("voice", "")).strip():
        raise InvalidInput("option voice: Soprano speaks in one built-in voice (leave it unset)")
    return s


# -- loading (worker thread) --------------------------------------------------------------------
def decoder_sizes(path: Path, config: dict, weights: dict) -> dict:
    """The decoder's sizes: from config.json where it says them (Soprano-80M's flat fields),
    else from the shapes of the folder's weights. mlx-audio guesses them from the folder's name
    ("soprano-1.1" or not), which a renamed folder gets wrong."""
    sizes = {k: config[k] for k in DECODER_FIELDS if k in config}
    if "decoder_dim" in sizes:
        return sizes
    embed = weights.get("decoder.decoder.embed.weight")  # (dim, kernel, hidden) in MLX layout
    pw1 = weights.get("decoder.decoder.convnext.0.pwconv1.weight")  # (intermediate, dim)
    if embed is None or pw1 is None:
        raise InvalidInput(f"{path}: no Soprano decoder weights (decoder.decoder.embed.weight)")
    embed, pw1 = embed.shape, pw1.shape
    layers = {n.split(".")[3] for n in weights if n.startswith("decoder.decoder.convnext.")}
    return {
        **sizes,
        "decoder_dim": embed[0],
        "input_kernel": embed[1],
        "decoder_intermediate_dim": pw1[0],
        "decoder_num_layers": len(layers),
    }


def load_tts(path: Path, options: dict) -> TtsModel:
    """mlx-audio's loader, step for step (config, model, sanitize, quantization, weights,
    tokenizer), with the decoder sized from the folder's own contents."""
    import mlx.core as mx
    from mlx_audio.tts.models.soprano import soprano
    from mlx_audio.utils import apply_quantization, load_weights

    settings = settings_from(options)
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
        weights = load_weights(path)  # read once: sized from, then loaded
        sizes = decoder_sizes(path, config, weights)
        model_config = soprano.ModelConfig.from_dict(
            {"model_type": "soprano", **config, "model_path": None}
        )
        for key, value in sizes.items():
            setattr(model_config.decoder_config, key, int(value))
        model = soprano.Model(model_config)
        weights = model.sanitize(weights)
        apply_quantization(model, config, weights, getattr(model, "model_quant_predicate", None))
        model.load_weights(list(weights.items()), strict=True)
        mx.eval(model.parameters())
        model.eval()
        model.post_load_hook(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"{path} is not a loadable Soprano folder: {exc}") from None
    return TtsModel(path, model, settings, int(model.sample_rate))


# -- requests (worker thread) -------------------------------------------------------------------
def prepare(tm: TtsModel, text: str, voice: str = "", language: str = "") -> Speech:
    """Validate a request and split it into sentence prompts (no audio yet): lines as
    mlx-audio's generate splits them, sentences as its _preprocess_text does."""
    if not str(text or "").strip():
        raise InvalidInput("text is empty: nothing to speak")
    if str(voice or "").strip():
        raise InvalidInput(
            f"voice {voice!r}: Soprano speaks in one built-in voice (leave voice empty)"
        )
    lang = str(language or "").strip().lower().replace("_", "-")
    if lang not in ENGLISH and not lang.startswith("en-"):
        raise InvalidInput(f"language {language!r}: Soprano speaks English only")
    text = text.replace("\\n", "\n").replace("\\t", "\t")
    prompts = [
        prompt
        for line in text.split("\n")
        if line.strip()
        for prompt, _, _ in tm.model._preprocess_text([line])
    ]
    said = (p.removeprefix(PROMPT_START).removesuffix(PROMPT_END) for p in prompts)
    if not any(re.search(r"\w", s) for s in said):  # the markers themselves are words
        raise InvalidInput(f"nothing to speak in {text[:80]!r}")
    return Speech(tm, prompts, "soprano", "en", tm.settings)


def synthesize(speech: Speech, is_cancelled=lambda: False):
    """PCM16 samples (np.int16, mono) of each sentence in turn; pauses between tokens."""
    import mlx.core as mx

    tm, s = speech.tm, speech.settings
    key = mx.random.key(s.seed)
    token_size = tm.model.config.decoder_config.token_size
    for prompt in speech.segments:
        hidden, key = _hidden_states(tm, prompt, s, key, is_cancelled)
        count = hidden.shape[1]
        audio = tm.model.decoder(hidden)
        length = count * token_size - token_size
        audio = audio[0, -length:] if length > 0 else audio[0]
        audio = np.array(audio, dtype=np.float32)
        mx.clear_cache()
        if audio.size == 0 or not np.isfinite(audio).all():
            raise EmptyOutput(f"Soprano produced no finite audio for {prompt[:80]!r}")
        yield pcm16(audio)


def _hidden_states(tm: TtsModel, prompt: str, s: Settings, key, is_cancelled) -> tuple:
    """mlx-audio's stream_generate for one prompt: every step's last hidden state (1, N, C),
    and the key after the draws made."""
    import mlx.core as mx
    from mlx_audio.lm.models.cache import KVCache

    model = tm.model
    stops = {model._stop_token_id, model.tokenizer.eos_token_id} - {None}
    cache = [KVCache() for _ in range(model.config.num_hidden_layers)]
    logits, hidden = model._forward_with_hidden_states(model._tokenize(prompt)[None], cache)
    mx.eval(logits, hidden)
    states = [hidden[:, -1:, :]]
    for _ in range(s.max_tokens):
        if is_cancelled():
            raise Cancelled("speech synthesis cancelled")
        pause()  # other requests run here
        token, key = _sample(logits[:, -1, :], s, key)
        if int(token[0, 0]) in stops:
            break
        logits, hidden = model._forward_with_hidden_states(token, cache)
        mx.eval(logits, hidden)
        states.append(hidden[:, -1:, :])
    return mx.concatenate(states, axis=1), key


def _sample(logits, s: Settings, key) -> tuple:
    """mlx-audio's make_sampler(temperature, top_p) on raw logits (as Soprano calls it), with the
    request's key instead of the global random state."""
    import mlx.core as mx
    from mlx_audio.lm.sample_utils import apply_top_p

    if s.temperature == 0:
        return mx.argmax(logits, axis=-1, keepdims=True), key
    if 0 < s.top_p < 1:
        logits = apply_top_p(logits, s.top_p)
    key, sub = mx.random.split(key)
    return mx.random.categorical(logits * (1 / s.temperature), key=sub)[:, None], key
