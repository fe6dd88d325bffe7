"""Per-family reply formats: reasoning and tool-call markers, a streaming header, a parser.

Where mlx-lm's TokenizerWrapper knows the family (it infers `tool_call_start`/`tool_call_end`
and a tool parser from the chat template, thinking markers from the vocabulary), its markers
and parser are used; we only add `HEADERS`, which find a call's name (and where JSON arguments
start) so a call streams before it is complete. Families mlx-lm 0.32 has no parser for are
described here (`OURS`): Llama 3.x JSON, gpt-oss harmony channels, DeepSeek R1 and V3.1; so are
thinking markers it does not infer (`VOCAB_THINK`: Magistral's `[THINK]`)."""

import json
import re
import secrets
import string
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace

# `{"name": "fn", "arguments": ` (or Llama's "parameters"): JSON arguments follow.
JSON_HEADER = re.compile(
    r'\{\s*"name"\s*:\s*"(?P<name>(?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*'
)


@dataclass(frozen=True)
class Header:
    """Where a call starts inside a tool region: group `name` (or `name2`); JSON arguments
    follow the match when `json_args`, else the parser supplies them when the region closes."""

    pattern: re.Pattern
    json_args: bool = True


@dataclass(frozen=True)
class Format:
    """How one family writes reasoning and tool calls in its replies."""

    name: str
    parser: str  # "mlx-lm:<module>" or "ours"
    think: tuple[str, str] | None = None  # (start, end) of a reasoning run
    tool_starts: tuple[str, ...] = ()
    tool_end: str = ""  # "" = the region runs to the end of the reply (EOS ends it)
    parse: Callable | None = None  # (region text, tools) -> dict or list of dicts
    header: Header | None = None
    leading_json: bool = False  # a reply that starts with {"name": ... is a call (Llama 3.x)
    drop: tuple[str, ...] = ()  # channel markup dropped from content (harmony)
    short_ids: bool = False  # 9-character alphanumeric ids (Mistral's templates require them)


# Our streaming headers for mlx-lm's parsers (mlx-lm parses only a complete region).
HEADERS = {
    "json_tools": Header(JSON_HEADER),
    "mistral": Header(
        re.compile(
            r'\{\s*"name"\s*:\s*"(?P<name>(?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*'
            r"|(?P<name2>[\w.\-]+)\s*(?:\[CALL_ID\]\s*\w+\s*)?\[ARGS\]\s*"
        )
    ),
    "kimi_k2": Header(
        re.compile(
            r"<\|tool_call_begin\|>\s*(?P<id>(?:functions\.)?(?P<name>[^\s:<]+)(?::\d+)?)\s*"
            r"<\|tool_call_argument_begin\|>\s*"
        )
    ),
    "qwen3_coder": Header(re.compile(r"<function=(?P<name>[^>\n]+)>"), json_args=False),
    "glm47": Header(re.compile(r"^\s*(?P<name>[^\s<]+?)(?:\s*<arg_key>|\n)"), json_args=False),
    "function_gemma": Header(re.compile(r"call:(?P<name>\w+)\{"), json_args=False),
}


def header_calls(header: Header) -> Callable:
    """A parser for regions whose calls are `header` + one JSON value each."""

    def parse(text: str, tools=None) -> list:
        decoder, calls, pos = json.JSONDecoder(), [], 0
        while (m := header.pattern.search(text, pos)) is not None:
            args, pos = decoder.raw_decode(text, m.end())
            calls.append({"name": call_name(m), "arguments": args, "id": m.groupdict().get("id")})
        if not calls:
            raise ValueError("no tool call")
        return calls

    return parse


def call_id(m: re.Match, short: bool) -> str:
    """The id the model wrote in a call's header (Kimi K2's `functions.NAME:0`, which its template
    renders back in the history), else a new one."""
    return m.groupdict().get("id") or new_id(short)


def call_name(m: re.Match) -> str:
    """The function name a header matched (JSON-unescaped when it came from a JSON string)."""
    name = m.group("name")
    if name is None:
        return m.group("name2")
    return json.loads(f'"{name}"') if "\\" in name else name


LLAMA3_HEADER = Header(JSON_HEADER)
HARMONY_HEADER = Header(
    re.compile(
        r"^\s*(?:functions\.)?(?P<name>[^\s<]+)\s*(?:<\|constrain\|>)?\s*(?:json)?\s*"
        r"<\|message\|>\s*"
    )
)
DEEPSEEK_R1_HEADER = Header(
    re.compile(r"<｜tool▁call▁begin｜>\s*\w*\s*<｜tool▁sep｜>\s*(?P<name>[^\n`]+?)\s*```json\s*")
)
DEEPSEEK_V3_HEADER = Header(
    re.compile(r"<｜tool▁call▁begin｜>\s*(?P<name>[^<]+?)\s*<｜tool▁sep｜>\s*")
)


def ours(name: str, header: Header, **fields) -> Format:
    """One of our formats: its calls are `header` + one JSON value each."""
    return Format(name, "ours", parse=header_calls(header), header=header, **fields)


DEEPSEEK_TOOLS = {"tool_starts": ("<｜tool▁calls▁begin｜>",), "tool_end": "<｜tool▁calls▁end｜>"}

# Families no mlx-lm 0.32 parser handles (their templates match none of
# `_infer_tool_parser`'s patterns), written here.
OURS = {
    # Llama 3.x: bare JSON {"name", "parameters"} (or after <|python_tag|>), ended by EOS
    # (<|eot_id|> / <|eom_id|>); several calls may be separated by ';'.
    "llama3_json": ours(
        "llama3_json", LLAMA3_HEADER, tool_starts=("<|python_tag|>",), leading_json=True
    ),
    # gpt-oss harmony: analysis channel = reasoning, final = content, commentary addressed to
    # functions.NAME = a tool call (its <|call|> is an EOS token, so EOS usually ends it).
    "harmony": ours(
        "harmony",
        HARMONY_HEADER,
        think=("<|channel|>analysis<|message|>", "<|end|>"),
        tool_starts=("<|channel|>commentary to=",),
        tool_end="<|call|>",
        drop=(
            "<|start|>assistant",
            "<|channel|>final<|message|>",
            "<|channel|>commentary<|message|>",
            "<|end|>",
            "<|return|>",
        ),
    ),
    # DeepSeek R1: function<｜tool▁sep｜>NAME\n```json\n{...}\n``` per call.
    "deepseek_r1": ours("deepseek_r1", DEEPSEEK_R1_HEADER, **DEEPSEEK_TOOLS),
    # DeepSeek V3.1: NAME<｜tool▁sep｜>{...} per call.
    "deepseek_v3": ours("deepseek_v3", DEEPSEEK_V3_HEADER, **DEEPSEEK_TOOLS),
}


def ours_for_template(template: str) -> Format | None:
    """One of `OURS`, recognised from the chat template's text."""
    if "<|channel|>" in template and "<|message|>" in template:
        return OURS["harmony"]
    if "<｜tool▁calls▁begin｜>" in template:
        return OURS["deepseek_r1"] if "```json" in template else OURS["deepseek_v3"]
    if "<|start_header_id|>" in template and '"parameters": ' in template:
        return OURS["llama3_json"]
    return None


# Reasoning markers mlx-lm 0.32 does not infer, used when both are tokens of the vocabulary:
# Magistral (Mistral tokenizer v13: Magistral Small 2509, Ministral 3 Reasoning) control tokens.
VOCAB_THINK = (("[THINK]", "[/THINK]"),)


def think_markers(tokenizer) -> tuple[str, str] | None:
    """(start, end) of a reasoning run: mlx-lm's when it inferred them, else `VOCAB_THINK`'s
    when the tokenizer has those tokens (added tokens are enough: control tokens are added)."""
    if getattr(tokenizer, "has_thinking", False):
        return tokenizer.think_start, tokenizer.think_end
    vocab_of = getattr(tokenizer, "get_added_vocab", None) or getattr(tokenizer, "get_vocab", None)
    vocab = vocab_of() if callable(vocab_of) else {}
    return next((pair for pair in VOCAB_THINK if pair[0] in vocab and pair[1] in vocab), None)


def format_for(tokenizer) -> Format:
    """The reply format of this (mlx-lm wrapped) tokenizer: mlx-lm's markers and parser when
    it has them, else ours when the chat template is one we know, else thinking only. Worked
    out once per tokenizer (it reads the added vocabulary)."""
    try:
        return _FORMATS[tokenizer]
    except (KeyError, TypeError):  # TypeError: an object weak references cannot hold
        pass
    fmt = _format_of(tokenizer)
    try:
        _FORMATS[tokenizer] = fmt
    except TypeError:
        pass
    return fmt


_FORMATS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _format_of(tokenizer) -> Format:
    think = think_markers(tokenizer)
    parser = getattr(tokenizer, "tool_parser", None)
    if getattr(tokenizer, "has_tool_calling", False) and parser is not None:
        module = getattr(parser, "__module__", "").rsplit(".", 1)[-1]
        return Format(
            module,
            f"mlx-lm:{module}",
            think=think,
            tool_starts=(tokenizer.tool_call_start,),
            tool_end=tokenizer.tool_call_end or "",
            parse=parser,
            header=HEADERS.get(module),
            short_ids=module == "mistral",
        )
    template = getattr(tokenizer, "chat_template", None)
    ours = ours_for_template(template) if isinstance(template, str) else None
    if ours is not None:
        return replace(ours, think=ours.think or think)
    return Format("none", "", think=think)


# ToolChoice `required` / a named function: the reply starts inside a call. Per format: the
# prefix without a name, and with one ({start} = the format's first tool start marker).
FORCED = {
    "json_tools": ("{start}", '{start}\n{{"name": "{name}", "arguments": '),
    "qwen3_coder": ("{start}", "{start}\n<function={name}>\n"),
    "glm47": ("{start}", "{start}{name}\n"),
    "kimi_k2": (
        "{start}",
        "{start}<|tool_call_begin|>functions.{name}:0<|tool_call_argument_begin|>",
    ),
    "mistral": ("{start}", "{start}"),
    "function_gemma": ("{start}", "{start}call:{name}{{"),
    "llama3_json": ('{{"name": "', '{{"name": "{name}", "parameters": '),
    "harmony": ("{start}functions.", "{start}functions.{name} <|constrain|>json<|message|>"),
    "deepseek_r1": (
        "{start}<｜tool▁call▁begin｜>function<｜tool▁sep｜>",
        "{start}<｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n",
    ),
    "deepseek_v3": (
        "{start}<｜tool▁call▁begin｜>",
        "{start}<｜tool▁call▁begin｜>{name}<｜tool▁sep｜>",
    ),
}


def forced_prefix(fmt: Format, name: str | None) -> str:
    """The text a reply forced into a tool call starts with ("" when the format has none)."""
    if fmt.name not in FORCED or not (fmt.tool_starts or fmt.leading_json):
        return ""
    required, named = FORCED[fmt.name]
    start = fmt.tool_starts[0] if fmt.tool_starts else ""
    return (named if name else required).format(start=start, name=name or "")


def new_id(short: bool = False) -> str:
    """A tool call id: `call_<hex>`, or 9 alphanumerics where the template demands it."""
    if short:
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    return "call_" + uuid.uuid4().hex[:24]


def json_value_end(text: str, start: int) -> int | None:
    """Index just past the JSON object/array starting at `start` (after whitespace), or None
    while it is incomplete."""
    i, n = start, len(text)
    while i < n and text[i].isspace():
        i += 1
    if i >= n:
        return None
    if text[i] not in "{[":
        try:
            return json.JSONDecoder().raw_decode(text, i)[1]
        except json.JSONDecodeError:
            return None
    depth, in_str, esc = 0, False, False
    for j in range(i, n):
        c = text[j]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
    return None
