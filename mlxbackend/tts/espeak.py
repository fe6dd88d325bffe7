"""Grapheme-to-phoneme with espeak-ng for Kokoro, offline and without phonemizer.

Kokoro's own pipeline (mlx-audio's KokoroPipeline, from the `kokoro` package) phonemizes with
`misaki`: misaki.en (a lexicon plus spaCy's en_core_web_sm, which is not on PyPI and which misaki
downloads on first use) for English, and misaki.espeak for the other espeak languages. misaki.espeak
runs espeak-ng through `phonemizer`, whose import pulls `segments` → `csvw` → rdflib, babel, ….
This module is that path without those packages: it drives the espeak-ng library and data that
the `espeakng-loader` wheel bundles (the same ones misaki uses) through ctypes, does what
phonemizer's EspeakBackend does for misaki's settings (punctuation preserved, stress kept, ties
marked, language-switch flags removed), then applies misaki's mappings from espeak's IPA to
Kokoro's phoneme set:

- other languages: misaki.espeak.EspeakG2P's (es, fr-fr, hi, it, pt-br, …);
- English: misaki.espeak.EspeakFallback's (the one misaki.en applies to words outside its
  lexicon), applied to whole sentences.

tests/test_tts.py checks the output equals misaki's own (with phonemizer) where they are
installed. espeak-ng keeps global state, so every call holds one lock."""

import ctypes
import re
import threading

# phonemizer's Punctuation defaults and espeak language-switch flags ("(en)", "(fr)")
MARKS = ';:,.!?¡¿—…"«»“”(){}[]'
_MARKS_RE = re.compile(rf"(\s*[{re.escape(MARKS)}]+\s*)+")
_FLAGS_RE = re.compile(r"\(.+?\)")
ESPEAK_TIE = "\u0361"  # what espeak-ng writes between the letters of one phoneme
TIE = "^"  # what misaki asks phonemizer to write instead

# misaki.espeak.EspeakG2P.e2m (version None)
E2M = sorted(
    {
        "a^ɪ": "I",
        "a^ʊ": "W",
        "d^z": "ʣ",
        "d^ʒ": "ʤ",
        "e^ɪ": "A",
        "o^ʊ": "O",
        "ə^ʊ": "Q",
        "s^s": "S",
        "t^s": "ʦ",
        "t^ʃ": "ʧ",
        "ɔ^ɪ": "Y",
    }.items()
)
# misaki.espeak.EspeakFallback.E2M (English)
EN_E2M = sorted(
    {
        "ʔˌn\u0329": "ʔn",
        "ʔn\u0329": "ʔn",
        "a^ɪ": "I",
        "a^ʊ": "W",
        "d^ʒ": "ʤ",
        "e^ɪ": "A",
        "e": "A",
        "t^ʃ": "ʧ",
        "ɔ^ɪ": "Y",
        "ə^l": "ᵊl",
        "ʲo": "jo",
        "ʲə": "jə",
        "ʲ": "",
        "ɚ": "əɹ",
        "r": "ɹ",
        "x": "k",
        "ç": "k",
        "ɐ": "ə",
        "ɬ": "l",
        "\u0303": "",
    }.items(),
    key=lambda kv: -len(kv[0]),
)


class EspeakError(RuntimeError):
    pass


class _Voice(ctypes.Structure):
    """The first fields of espeak_VOICE (speak_lib.h); only read through pointers."""

    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_char_p),
        ("identifier", ctypes.c_char_p),
    ]


class Espeak:
    """libespeak-ng from the espeakng-loader wheel, with its own data folder."""

    _instance = None
    _lock = threading.Lock()

    def __init__(self):
        try:
            import espeakng_loader
        except ImportError:
            raise EspeakError(
                "the espeakng-loader package (espeak-ng's library and data) is not installed: "
                "pip install espeakng-loader==0.2.4 (make install does)"
            ) from None
        try:
            lib = ctypes.cdll.LoadLibrary(espeakng_loader.get_library_path())
            data = espeakng_loader.get_data_path().encode()
        except (OSError, RuntimeError) as exc:
            raise EspeakError(f"cannot load espeak-ng from espeakng-loader: {exc}") from None
        # AUDIO_OUTPUT_SYNCHRONOUS, no buffer, the wheel's data, no options
        if lib.espeak_Initialize(0x02, 0, data, 0) <= 0:
            raise EspeakError("espeak-ng failed to initialize")
        lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        lib.espeak_TextToPhonemes.argtypes = [
            ctypes.POINTER(ctypes.c_char_p),
            ctypes.c_int,
            ctypes.c_int,
        ]
        self.lib = lib
        self.voices = {}  # language → voice identifier: the first voice of each (phonemizer's rule)
        listed = lib.espeak_ListVoices(None)
        i = 0
        while listed[i]:
            voice = listed[i].contents
            language = (voice.languages or b"\x00")[1:].decode(errors="replace")
            self.voices.setdefault(language, voice.identifier.decode(errors="replace"))
            i += 1
        self.current = None

    @classmethod
    def get(cls) -> "Espeak":
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def languages(self) -> list:
        return sorted(self.voices)

    def _set_language(self, language: str):
        if language == self.current:
            return
        identifier = self.voices.get(language)
        if identifier is None:
            raise EspeakError(f"espeak-ng has no voice for language {language!r}")
        if self.lib.espeak_SetVoiceByName(identifier.encode()) != 0:
            raise EspeakError(f"espeak-ng failed to load the voice {identifier}")
        self.current = language

    def _text_to_phonemes(self, text: str) -> str:
        """espeak_TextToPhonemes clause by clause: IPA, phonemes tied with U+0361."""
        ptr = ctypes.c_char_p(text.encode())
        pptr = ctypes.pointer(ptr)
        mode = 0x02 | 0x01 << 7 | ord(ESPEAK_TIE) << 8
        out = []
        while pptr.contents.value is not None:
            phonemes = self.lib.espeak_TextToPhonemes(pptr, 1, mode)  # 1: UTF-8 text
            if phonemes:
                out.append(phonemes.decode(errors="replace"))
        return " ".join(out)

    def phonemize(self, text: str, language: str, remove_flags: bool = True) -> str:
        """phonemizer's EspeakBackend(language, preserve_punctuation=True, with_stress=True,
        tie='^').phonemize([text])[0] (language_switch 'remove-flags' or 'keep-flags')."""
        chunks, marks = _preserve(text)
        with self._lock:
            self._set_language(language)
            done = [self._postprocess(self._text_to_phonemes(c), remove_flags) for c in chunks]
        out = _restore(done, marks)
        return out[0] if out else ""

    @staticmethod
    def _postprocess(line: str, remove_flags: bool) -> str:
        line = line.strip().replace("\n", " ").replace("  ", " ")
        line = re.sub(r"_+", "_", line)
        line = re.sub(r"_ ", " ", line)
        if remove_flags:
            line = _FLAGS_RE.sub("", line)
        if not line:
            return ""
        return "".join(word.strip().replace(ESPEAK_TIE, TIE) + " " for word in line.split(" "))


def _preserve(line: str):
    """phonemizer's Punctuation._preserve_line for one line: the text between punctuation runs
    (empty pieces dropped) and each run with its position (B)egin, (I)nside, (E)nd, (A)ll."""
    matches = list(_MARKS_RE.finditer(line))
    if not matches:
        return ([line] if line else []), []
    if len(matches) == 1 and matches[0].group() == line:
        return [], [(line, "A")]
    marks = []
    for n, match in enumerate(matches):
        position = "I"
        if n == 0 and line.startswith(match.group()):
            position = "B"
        elif n == len(matches) - 1 and line.endswith(match.group()):
            position = "E"
        marks.append((match.group(), position))
    pieces = []
    for mark, _ in marks:
        prefix, _, line = line.partition(mark)
        pieces.append(prefix)
    pieces.append(line)
    return [p for p in pieces if p], marks


def _restore(text: list, marks: list) -> list:
    """phonemizer's Punctuation.restore (word separator ' ', strip False) for one line."""
    out = []
    text = list(text)
    marks = list(marks)
    while text or marks:
        if not marks:
            out.extend(t if t.endswith(" ") else t + " " for t in text)
            text = []
        elif not text:
            out.append("".join(m for m, _ in marks))
            marks = []
        else:
            mark, position = marks.pop(0)
            if text[0].endswith(" "):
                text[0] = text[0][:-1]
            if position == "B":
                text[0] = mark + text[0]
            elif position == "E":
                out.append(text[0] + mark + ("" if mark.endswith(" ") else " "))
                text = text[1:]
            elif position == "A":
                out.append(mark + ("" if mark.endswith(" ") else " "))
            elif len(text) == 1:
                text[0] = text[0] + mark
            else:
                text = [text[0] + mark + text[1], *text[2:]]
    return out


def g2p(text: str, language: str) -> str:
    """misaki.espeak.EspeakG2P(language)(text)[0]: Kokoro phonemes for an espeak language."""
    text = text.replace("«", "“").replace("»", "”").replace("(", "«").replace(")", "»")
    ps = Espeak.get().phonemize(text, language).strip()
    for old, new in E2M:
        ps = ps.replace(old, new)
    ps = ps.replace("^", "").replace("-", "")
    return ps.replace("«", "(").replace("»", ")")


def g2p_english(text: str, british: bool = False) -> str:
    """misaki.espeak.EspeakFallback's mapping on a whole text: Kokoro's English phoneme set
    (the one misaki.en's lexicon uses) from espeak-ng's en-us / en-gb."""
    text = text.replace("«", "“").replace("»", "”").replace("(", "«").replace(")", "»")
    ps = Espeak.get().phonemize(text, "en-gb" if british else "en-us").strip()
    for old, new in EN_E2M:
        ps = ps.replace(old, new)
    ps = re.sub(r"(\S)\u0329", r"ᵊ\1", ps).replace(chr(809), "")
    if british:
        ps = ps.replace("e^ə", "ɛː").replace("iə", "ɪə").replace("ə^ʊ", "Q")
    else:
        ps = ps.replace("o^ʊ", "O").replace("ɜːɹ", "ɜɹ").replace("ɜː", "ɜɹ")
        ps = ps.replace("ɪə", "iə").replace("ː", "")
    ps = ps.replace("o", "ɔ")  # espeak < 1.52
    ps = ps.replace("ɾ", "T").replace("ʔ", "t")
    ps = ps.replace("^", "").replace("-", "")
    return ps.replace("«", "(").replace("»", ")")
