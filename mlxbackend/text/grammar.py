"""Structured output: GBNF/Lark grammars and JSON schemas enforced while sampling (llguidance).

`make_constraint(tokenizer, grammar=..., json_schema=...)` returns a per-request `Constraint`
whose `processor` is an mlx-lm logits processor: it advances an `LLMatcher` with the tokens
generated since its last call and sets every token the grammar forbids to -inf (once the
grammar is complete only EOS is left). The llguidance tokenizer is built once per tokenizer.
"""

import json
import re
import threading
import weakref

import mlx.core as mx
import numpy as np
from llguidance import LLMatcher
from llguidance.gbnf_to_lark import gbnf_to_lark, is_lark_syntax

from mlxbackend.errors import InvalidInput, Unsupported

# Whitespace between JSON tokens as llama.cpp's json_schema_to_grammar allows it (`space`): one
# space or a newline plus indentation. Unbounded whitespace lets small models loop on newlines.
# A schema's own "x-guidance" key overrides this.
JSON_DEFAULTS = {"whitespace_pattern": r"(?: |\n{1,2}[ \t]{0,20})?"}

# llguidance's GBNF converter mangles \uXXXX / \UXXXXXXXX escapes (emits "\ue9"); spell them out.
_UNICODE_ESCAPE = re.compile(r"\\(\\|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8})")

_lock = threading.Lock()
_tokenizers = weakref.WeakKeyDictionary()


def llg_tokenizer(tokenizer):
    """llguidance's tokenizer for an mlx-lm TokenizerWrapper, built once per tokenizer."""
    with _lock:
        llt = _tokenizers.get(tokenizer)
        if llt is None:
            import llguidance.hf

            try:
                llt = llguidance.hf.from_tokenizer(
                    tokenizer._tokenizer, eos_token=sorted(tokenizer.eos_token_ids)
                )
            except Exception as e:
                raise Unsupported(
                    f"grammars need a Hugging Face fast tokenizer llguidance can read: {e}"
                ) from None
            _tokenizers[tokenizer] = llt
        return llt


def _unicode_escapes(gbnf: str) -> str:
    def spell(m):
        if m.group(1) == "\\":
            return m.group(0)
        c = int(m.group(1)[1:], 16)
        if c < 0x80:
            return f"\\x{c:02x}"
        return m.group(0) if 0xD800 <= c < 0xE000 or c > 0x10FFFF else chr(c)

    return _UNICODE_ESCAPE.sub(spell, gbnf)


def compile_grammar(grammar: str = "", json_schema: str = "") -> str:
    """GBNF (llama.cpp) or Lark text, or a JSON schema → llguidance's grammar definition."""
    if grammar and json_schema:
        raise InvalidInput("give either a grammar or a JSON schema, not both")
    if json_schema:
        try:
            schema = json.loads(json_schema)
        except ValueError as e:
            raise InvalidInput(f"JSON schema is not valid JSON: {e}") from None
        if schema is True:
            schema = {}
        if not isinstance(schema, dict):
            raise InvalidInput(f"JSON schema must be an object, got {json_schema[:200]!r}")
        if isinstance(schema.get("schema"), dict) and "type" not in schema:
            schema = schema["schema"]  # OpenAI's response_format.json_schema wrapper
        try:
            return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
        except ValueError as e:
            raise InvalidInput(f"invalid JSON schema: {e}") from None
    try:
        lark = grammar if is_lark_syntax(grammar) else gbnf_to_lark(_unicode_escapes(grammar))
        return LLMatcher.grammar_from_lark(lark)
    except Exception as e:
        raise InvalidInput(f"invalid grammar: {e}") from None


class Constraint:
    """One request's grammar state; use `processor` (or the object) as an mlx-lm logits processor.

    `error` is set if a sampled token broke the grammar (then only EOS is allowed)."""

    def __init__(self, matcher, llt, prompt_len=None, first_mask=None):
        self.matcher = matcher
        self.first_mask = first_mask  # the bitmask before any token (computed at the check)
        self.vocab = llt.vocab_size
        self.eos = sorted(llt.eos_tokens)
        self.base = prompt_len  # entries of `tokens` before the first generated one
        self.started = False
        self.seen = []  # generated tokens the matcher has consumed
        self.counted = []  # per seen token: recorded by the matcher (not once it had stopped)
        self.error = ""

    def _sync(self, tokens):
        if not self.started:
            self.started = True
            if self.base is None or self.base > tokens.size:
                self.base = tokens.size  # everything in the first call is prompt
        new = tokens[self.base :].tolist()
        if new[: len(self.seen)] != self.seen:  # history rewound (speculative decoding)
            pairs = enumerate(zip(self.seen, new, strict=False))
            keep = next((i for i, (a, b) in pairs if a != b), len(new))
            self.matcher.rollback(sum(self.counted[keep:]))
            del self.seen[keep:], self.counted[keep:]
        for t in new[len(self.seen) :]:
            counted = not self.matcher.is_stopped()
            if not self.matcher.consume_token(t):
                self.error = self.error or f"grammar rejected token {t}: {self.matcher.get_error()}"
                break
            self.seen.append(t)
            self.counted.append(counted)

    def processor(self, tokens, logits):
        """mlx-lm LogitsProcessor: `tokens` so far (prompt included), `logits` [1, vocab]."""
        history = np.asarray(tokens)  # waits for the last token only; cheaper than MLX slicing
        mx.async_eval(logits)  # the forward pass runs while the mask is computed
        self._sync(history)
        width = logits.shape[-1]
        allowed = np.zeros(width, np.bool_)  # padded embedding rows stay masked
        if self.error or self.matcher.is_error():
            self.error = self.error or self.matcher.get_error()
            allowed[[e for e in self.eos if e < width]] = True  # end the reply
        else:
            fresh = self.first_mask is not None and not self.seen
            mask = np.frombuffer(
                self.first_mask if fresh else self.matcher.compute_bitmask(), np.uint8
            )
            n = min(width, self.vocab)
            allowed[:n] = np.unpackbits(mask, bitorder="little")[:n]
        return mx.where(mx.array(allowed), logits, -mx.inf)

    __call__ = processor

    def valid_drafts(self, tokens, drafts: list) -> int:
        """How many leading `drafts` the grammar allows after `tokens` (prompt and reply so far):
        speculative drafts are cut there before verification."""
        self._sync(np.asarray(tokens))
        if self.error or self.matcher.is_error() or not drafts:
            return 0
        return self.matcher.validate_tokens(drafts)

    @property
    def done(self) -> bool:
        """The grammar is complete (only EOS may follow)."""
        return self.matcher.is_stopped()


def make_constraint(
    tokenizer, grammar: str = "", json_schema: str = "", prompt_len: int | None = None
):
    """A `Constraint` for `grammar` (GBNF or Lark) or `json_schema`, or None when both are empty.

    `prompt_len`: how many leading entries of the processor's `tokens` are prompt (default: all
    of those in its first call). Raises InvalidInput for a bad grammar or schema, Unsupported
    for a tokenizer llguidance cannot read."""
    if not grammar.strip() and not json_schema.strip():
        return None
    text = compile_grammar(grammar.strip(), json_schema.strip())
    llt = llg_tokenizer(tokenizer)
    matcher = LLMatcher(llt, text, log_level=0)
    kind = "JSON schema" if json_schema.strip() else "grammar"
    if matcher.is_error():
        raise InvalidInput(f"invalid {kind}: {matcher.get_error()}")
    first_mask = matcher.compute_bitmask()
    if matcher.is_error():  # e.g. `root ::= root`: no token, not even EOS, may start a reply
        raise InvalidInput(f"the {kind} matches no text: nothing can start a reply")
    return Constraint(matcher, llt, prompt_len, first_mask)
