"""Structured output (mlxbackend.text.grammar): JSON schemas and GBNF grammars enforced on the
tiny random model, whose unconstrained output is noise; every output must parse and validate."""

import json
import re
import threading
import time

import jsonschema
import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step, speculative_generate_step

from mlxbackend.errors import InvalidInput, Unsupported
from mlxbackend.text.grammar import llg_tokenizer, make_constraint
from mlxbackend.text.sampling import SamplingParams, make_sampler

MAX_TOKENS = 300
# greedy, then seeded sampling at temperature 1.0
RUNS = [(0.0, 0)] + [(1.0, seed) for seed in range(1, 6)]

SHORT = {"type": "string", "maxLength": 24}
SCHEMAS = {
    "flat": {
        "type": "object",
        "properties": {
            "name": SHORT,
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "age", "ok"],
        "additionalProperties": False,
    },
    "enum": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"enum": [1, 2, 3, None]},
        },
        "required": ["color", "size"],
        "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999}, "tag": SHORT},
            "required": ["id", "tag"],
            "additionalProperties": False,
        },
        "minItems": 2,
        "maxItems": 4,
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": SHORT,
                    "address": {
                        "type": "object",
                        "properties": {
                            "city": SHORT,
                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                        },
                        "required": ["city", "zip"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "address"],
                "additionalProperties": False,
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
        "additionalProperties": False,
    },
    "number_ranges": {
        "type": "object",
        "properties": {
            # multipleOf bounds the fraction digits (random weights repeat digits forever); binary
            # fractions, so that jsonschema's float check is exact
            "score": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.125},
            "temp": {
                "type": "number",
                "exclusiveMinimum": -50,
                "exclusiveMaximum": 50,
                "multipleOf": 0.5,
            },
            "count": {"type": "integer", "minimum": -5, "maximum": 5},
        },
        "required": ["score", "temp", "count"],
        "additionalProperties": False,
    },
}

# What llama.cpp's json_schema_to_grammar emits for
# {"type":"object","properties":{"name":{"type":"string"},"age":{"type":"integer"}},"required":["name","age"]}
LLAMACPP_NAME_AGE = r"""age-kv ::= "\"age\"" space ":" space integer
char ::= [^"\\\x7F\x00-\x1F] | [\\] (["\\bfnrt] | "u" [0-9a-fA-F]{4})
integer ::= ("-"? integral-part) space
integral-part ::= [0] | [1-9] [0-9]{0,15}
name-kv ::= "\"name\"" space ":" space string
root ::= "{" space name-kv "," space age-kv "}" space
space ::= | " " | "\n"{1,2} [ \t]{0,20}
string ::= "\"" char* "\"" space
"""
NAME_AGE_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}

# llama.cpp style for an enum, a bounded array of bounded strings and an integer range.
LLAMACPP_BOUNDED = r"""char ::= [^"\\\x7F\x00-\x1F] | [\\] (["\\bfnrt] | "u" [0-9a-fA-F]{4})
color ::= ("\"red\"" | "\"green\"" | "\"blue\"" | "\"gr\u00fcn\"") space
color-kv ::= "\"color\"" space ":" space color
root ::= "{" space color-kv "," space tags-kv "," space score-kv "}" space
score ::= ([0-9] | [1-9] [0-9] | "100") space
score-kv ::= "\"score\"" space ":" space score
space ::= | " " | "\n"{1,2} [ \t]{0,20}
tags ::= "[" space tags-item ("," space tags-item){0,2} "]" space
tags-item ::= "\"" char{0,12} "\"" space
tags-kv ::= "\"tags\"" space ":" space tags
"""
BOUNDED_SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue", "grün"]},
        "tags": {
            "type": "array",
            "items": {"type": "string", "maxLength": 12},
            "minItems": 1,
            "maxItems": 3,
        },
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["color", "tags", "score"],
    "additionalProperties": False,
}

# LocalAI's own JSON-schema → GBNF output for two functions (pkg/functions/grammars), with
# maybe-array: unsorted rules, multi-line groups, an unused rule, `space ::= " "?`.
LOCALAI_FUNCTIONS = r"""root-0-name ::= "\"create_event\""
freestring ::= (
		[^"\\] |
		"\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])
  )* space
root-0 ::= "{" space "\"arguments\"" space ":" space root-0-arguments "," space "\"name\"" space ":" space root-0-name "}" space
root-1-arguments ::= "{" space "\"query\"" space ":" space string "}" space
realvalue ::= root-0 | root-1
root ::= arr | realvalue
space ::= " "?
root-0-arguments ::= "{" space "\"date\"" space ":" space string "," space "\"time\"" space ":" space string "," space "\"title\"" space ":" space string "}" space
root-1 ::= "{" space "\"arguments\"" space ":" space root-1-arguments "," space "\"name\"" space ":" space root-1-name "}" space
string ::= "\"" (
	[^"\\] |
	"\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])
)* "\"" space
arr  ::=
  "[\n"  (
		realvalue
    (",\n"  realvalue)*
  )? "]"
root-1-name ::= "\"search\""
"""


def _call(name, args):
    return {
        "type": "object",
        "properties": {"arguments": args, "name": {"const": name}},
        "required": ["arguments", "name"],
        "additionalProperties": False,
    }


def _args(*names):
    return {
        "type": "object",
        "properties": {n: {"type": "string"} for n in names},
        "required": list(names),
        "additionalProperties": False,
    }


CALL = {
    "anyOf": [
        _call("create_event", _args("date", "time", "title")),
        _call("search", _args("query")),
    ]
}
FUNCTIONS_SCHEMA = {"anyOf": [CALL, {"type": "array", "items": CALL}]}


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    model, tokenizer = load(str(tiny_dir))
    return model, tokenizer


def prompt_ids(tokenizer, text="Reply with JSON:"):
    return tokenizer.encode(text)


def generate(
    model, tokenizer, constraint, temperature=0.0, seed=0, before=(), max_tokens=MAX_TOKENS
):
    """Sample with the constraint; returns (text without EOS, number of tokens, ended with EOS)."""
    prompt = prompt_ids(tokenizer)
    vocab = model.args.vocab_size
    sampler = make_sampler(SamplingParams(temperature=temperature, seed=seed), vocab)
    out = []
    for token, _ in generate_step(
        mx.array(prompt),
        model,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=[*before, constraint.processor],
    ):
        out.append(int(token))
        if out[-1] in tokenizer.eos_token_ids:
            break
    eos = bool(out) and out[-1] in tokenizer.eos_token_ids
    return tokenizer.decode(out[:-1] if eos else out), len(out), eos


def prefer_closing_quotes(tokenizer, boost=6.0):
    """A logits processor that makes the random model like tokens holding '"' (so strings end);
    the constraint runs after it and must still produce only valid output."""
    ids = [i for i in range(len(tokenizer._tokenizer)) if '"' in tokenizer.decode([i])]
    bias = mx.zeros((len(tokenizer._tokenizer),)).at[mx.array(ids)].add(boost)

    def processor(_tokens, logits):
        return logits + mx.pad(bias, (0, logits.shape[-1] - bias.shape[0]))

    return processor


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_outputs_validate(tiny, name):
    model, tokenizer = tiny
    schema = SCHEMAS[name]
    for temperature, seed in RUNS:
        c = make_constraint(
            tokenizer, json_schema=json.dumps(schema), prompt_len=len(prompt_ids(tokenizer))
        )
        text, n, eos = generate(model, tokenizer, c, temperature, seed)
        assert eos and n < MAX_TOKENS, (temperature, seed, n, text)
        jsonschema.validate(json.loads(text), schema)
        assert c.done and not c.error


def test_openai_wrapper_and_boolean_schema(tiny):
    model, tokenizer = tiny
    wrapped = {"name": "answer", "strict": True, "schema": SCHEMAS["enum"]}
    text, _, eos = generate(
        model, tokenizer, make_constraint(tokenizer, json_schema=json.dumps(wrapped))
    )
    assert eos
    jsonschema.validate(json.loads(text), SCHEMAS["enum"])
    assert make_constraint(tokenizer, json_schema="true") is not None


@pytest.mark.parametrize(
    "grammar,schema,boost",
    [
        (LLAMACPP_NAME_AGE, NAME_AGE_SCHEMA, True),
        (LLAMACPP_BOUNDED, BOUNDED_SCHEMA, False),
        (LOCALAI_FUNCTIONS, FUNCTIONS_SCHEMA, True),
    ],
    ids=["llamacpp_name_age", "llamacpp_bounded", "localai_functions"],
)
def test_gbnf_json_outputs_validate(tiny, grammar, schema, boost):
    """Unbounded strings never end on random weights, so two cases favour '"' before the mask."""
    model, tokenizer = tiny
    before = [prefer_closing_quotes(tokenizer)] if boost else []
    for temperature, seed in RUNS:
        c = make_constraint(tokenizer, grammar=grammar)
        text, n, eos = generate(model, tokenizer, c, temperature, seed, before=before)
        assert eos and n < MAX_TOKENS, (temperature, seed, n, text)
        # LocalAI's string rule admits raw control characters, which strict json.loads rejects
        jsonschema.validate(json.loads(text, strict=False), schema)


@pytest.mark.parametrize(
    "grammar,pattern",
    [
        ('root ::= ("yes" | "no")', r"yes|no"),
        (
            'root ::= num (" + " num){1,3}\nnum ::= [1-9] [0-9]{0,2}',
            r"[1-9][0-9]{0,2}( \+ [1-9][0-9]{0,2}){1,3}",
        ),
        ('start: "a" | "b" "c"', r"a|bc"),  # Lark is accepted too
        (r'root ::= "gr\u00fcn" | "\U0001F600" | [\x41-\x43]', r"grün|😀|[A-C]"),
    ],
    ids=["yes_no", "sum", "lark", "escapes"],
)
def test_non_json_grammar(tiny, grammar, pattern):
    model, tokenizer = tiny
    for temperature, seed in RUNS:
        text, n, eos = generate(
            model, tokenizer, make_constraint(tokenizer, grammar=grammar), temperature, seed
        )
        assert eos and re.fullmatch(pattern, text), (temperature, seed, text)


@pytest.mark.parametrize(
    "grammar",
    [
        'root ::= ("yes" | ',
        "root ::= missing",
        'main ::= "a"',
        'root ::= "a" | "\\q"',
        "start: foo",
    ],
)
def test_invalid_grammar(tiny, grammar):
    with pytest.raises(InvalidInput, match="invalid grammar"):
        make_constraint(tiny[1], grammar=grammar)


@pytest.mark.parametrize(
    "grammar", ["root ::= root", "root ::= [^\\x00-\\U0010FFFF]", 'root ::= a\na ::= a "x"']
)
def test_grammar_matching_no_text(tiny, grammar):
    """Grammars no reply can satisfy are refused before generation, not answered empty."""
    with pytest.raises(InvalidInput, match="matches no text"):
        make_constraint(tiny[1], grammar=grammar)
    c = make_constraint(tiny[1], grammar='root ::= "a" root')  # endless, yet it starts: allowed
    assert c is not None and not c.error


@pytest.mark.parametrize(
    "schema",
    [
        "{not json",
        "[1, 2]",
        '{"type": "foo"}',
        '{"type": "string", "pattern": "(("}',
        '{"$ref": "#/$defs/missing"}',
        '{"type": "string", "format": "no-such-format"}',
    ],
)
def test_invalid_schema(tiny, schema):
    with pytest.raises(InvalidInput, match="JSON schema"):
        make_constraint(tiny[1], json_schema=schema)


def test_empty_and_both(tiny):
    tokenizer = tiny[1]
    assert make_constraint(tokenizer) is None
    assert make_constraint(tokenizer, grammar="  ", json_schema="") is None
    with pytest.raises(InvalidInput, match="not both"):
        make_constraint(tokenizer, grammar='root ::= "a"', json_schema='{"type": "integer"}')


def test_unsupported_tokenizer():
    class NotHF:
        _tokenizer = object()
        eos_token_ids = {0}

    with pytest.raises(Unsupported):
        make_constraint(NotHF(), grammar='root ::= "a"')


def allowed(logits):
    return [i for i, ok in enumerate(mx.isfinite(logits[0]).tolist()) if ok]


def test_mask_padded_vocab_prompt_and_eos(tiny):
    """Padded logit columns are masked; the prompt is never consumed, tokens never twice; a
    complete grammar leaves only EOS."""
    tokenizer = tiny[1]
    eos = sorted(tokenizer.eos_token_ids)
    prompt = prompt_ids(tokenizer)
    vocab = len(tokenizer._tokenizer)
    logits = mx.full((1, vocab + 27), 5.0)  # padded embedding rows
    yes = tokenizer.encode("yes", add_special_tokens=False)

    for prompt_len in (None, len(prompt)):
        c = make_constraint(tokenizer, grammar='root ::= "yes" | "no"', prompt_len=prompt_len)
        first = allowed(c.processor(mx.array(prompt), logits))
        assert yes[0] in first and all(i < vocab for i in first) and not set(first) & set(eos)
        seen = mx.array(prompt + yes)
        c.processor(seen, logits)
        assert allowed(c.processor(seen, logits)) == eos  # same tokens again: nothing re-consumed
        assert c.done and not c.error and c.seen == yes

    # first called after tokens were generated: those beyond prompt_len are caught up
    c = make_constraint(tokenizer, grammar='root ::= "yes" | "no"', prompt_len=len(prompt))
    assert allowed(c.processor(mx.array(prompt + yes), logits)) == eos and c.done


def test_rollback_when_history_changes(tiny):
    """Speculative decoding rewinds the processor's history; the matcher follows it."""
    tokenizer = tiny[1]
    prompt = prompt_ids(tokenizer)
    logits = mx.zeros((1, len(tokenizer._tokenizer)))
    c = make_constraint(tokenizer, grammar='root ::= "yes" | "no"')
    c.processor(mx.array(prompt), logits)
    yes, no = (tokenizer.encode(w, add_special_tokens=False) for w in ("yes", "no"))
    c.processor(mx.array(prompt + yes), logits)
    assert c.done
    c.processor(mx.array(prompt + no), logits)
    assert c.done and c.seen == no and not c.error
    c.processor(mx.array(prompt), logits)
    assert c.seen == [] and not c.done
    # tokens after the grammar stopped (a drafted EOS, EOS) are not in llguidance's history
    eos = sorted(tokenizer.eos_token_ids)[0]
    c.processor(mx.array(prompt + yes + [eos, eos]), logits)
    assert allowed(c.processor(mx.array(prompt + yes), logits)) == sorted(tokenizer.eos_token_ids)
    assert c.done and not c.error
    c.processor(mx.array(prompt + no), logits)
    assert c.seen == no and c.done and not c.error


def test_speculative_decoding(tiny, tiny_dir, tmp_path_factory):
    """A draft model with other random weights: drafts get rejected and rolled back."""
    from tests.tiny_model import build_tiny_model

    model, tokenizer = tiny
    draft, _ = load(str(build_tiny_model(tmp_path_factory.mktemp("draft") / "tiny-draft", seed=1)))
    schema = SCHEMAS["flat"]
    for temperature, seed in RUNS[:3]:
        c = make_constraint(tokenizer, json_schema=json.dumps(schema))
        sampler = make_sampler(
            SamplingParams(temperature=temperature, seed=seed), model.args.vocab_size
        )
        out, drafted = [], []
        for token, _, from_draft in speculative_generate_step(
            mx.array(prompt_ids(tokenizer)),
            model,
            draft,
            num_draft_tokens=3,
            max_tokens=MAX_TOKENS,
            sampler=sampler,
            logits_processors=[c.processor],
        ):
            out.append(int(token))
            drafted.append(from_draft)
            if out[-1] in tokenizer.eos_token_ids:
                break
        assert out[-1] in tokenizer.eos_token_ids, tokenizer.decode(out)
        jsonschema.validate(json.loads(tokenizer.decode(out[:-1])), schema)
        assert any(drafted) and not all(drafted)


def test_threads(tiny):
    """The llguidance tokenizer is built once; constraints built in other threads work here."""
    tokenizer = tiny[1]
    tokenizers, constraints = [], []

    def build():
        tokenizers.append(llg_tokenizer(tokenizer))
        constraints.append(make_constraint(tokenizer, grammar='root ::= "yes" | "no"'))

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(tokenizers) == 4 and all(r is tokenizers[0] for r in tokenizers)
    prompt = prompt_ids(tokenizer)
    logits = mx.zeros((1, len(tokenizer._tokenizer)))
    yes = tokenizer.encode("yes", add_special_tokens=False)
    for c in constraints:
        c.processor(mx.array(prompt), logits)
        assert allowed(c.processor(mx.array(prompt + yes), logits)) == sorted(
            tokenizer.eos_token_ids
        )


def test_overhead(tiny):
    """Per-token cost of the constraint vs unconstrained decoding (printed, not asserted)."""
    model, tokenizer = tiny
    prompt = mx.array(prompt_ids(tokenizer))
    n = 200
    schema = json.dumps({"type": "string"})  # greedy random weights never close it
    own = []

    def timed(c):
        def processor(tokens, logits):
            mx.eval(tokens, logits)  # time the constraint alone, not the forward pass
            start = time.perf_counter()
            out = c.processor(tokens, logits)
            own.append(time.perf_counter() - start)
            return out

        return processor

    def per_token(processors):
        it = generate_step(prompt, model, max_tokens=n, logits_processors=processors)
        next(it)
        start = time.perf_counter()
        count = sum(1 for _ in it)
        return (time.perf_counter() - start) / count

    best = {"plain": 1e9, "noop": 1e9, "constrained": 1e9}
    for _ in range(5):
        best["plain"] = min(best["plain"], per_token(None))
        best["noop"] = min(best["noop"], per_token([lambda _t, logits: logits]))
        c = make_constraint(tokenizer, json_schema=schema)
        best["constrained"] = min(best["constrained"], per_token([c.processor]))
        assert not c.error and len(c.seen) >= n // 2
    c = make_constraint(tokenizer, json_schema=schema)
    per_token([timed(c)])
    start = time.perf_counter()
    for _ in range(20):
        make_constraint(tokenizer, json_schema=json.dumps(SCHEMAS["nested"]))
    build = (time.perf_counter() - start) / 20
    own.sort()
    print(
        f"\ntiny model, vocab {len(tokenizer._tokenizer)}, best of 5: plain {best['plain'] * 1e3:.2f} "
        f"ms/token, no-op processor {best['noop'] * 1e3:.2f}, constrained "
        f"{best['constrained'] * 1e3:.2f} (+{(best['constrained'] - best['noop']) * 1e3:.2f}); "
        f"processor itself median {own[len(own) // 2] * 1e6:.0f} us; make_constraint {build * 1e3:.2f} ms"
    )
