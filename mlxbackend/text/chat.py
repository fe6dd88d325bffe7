"""Turn a request's Prompt or Messages (+ tools, thinking switches) into prompt tokens."""

import json
from dataclasses import dataclass, field

from mlxbackend.errors import InvalidInput, Precondition
from mlxbackend.text.tool_formats import forced_prefix, format_for

ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


@dataclass
class ChatMessage:
    role: str
    content: str = ""
    name: str = ""
    tool_call_id: str = ""
    reasoning_content: str = ""
    tool_calls: str = ""  # JSON string as LocalAI sends it


@dataclass
class PromptSpec:
    """The prompt-shaping part of a request."""

    prompt: str = ""
    use_template: bool = False
    messages: list = field(default_factory=list)
    tools: str = ""
    tool_choice: str = ""
    metadata: dict = field(default_factory=dict)
    media: object = None  # vision.media.Media: Images / Videos / Audios as sent, or None


@dataclass
class Prompt:
    """A rendered prompt: its tokens, the text and how the reply starts."""

    tokens: list
    text: str
    starts_in_reasoning: bool = False
    assistant_prefix: str = ""  # forced start of the reply (tool_choice), part of the output
    tools: list = field(default_factory=list)
    media: object = None  # vision.prompt.MediaInputs when the prompt holds images/video/audio


def parse_json(text: str, what: str):
    try:
        return json.loads(text)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from None


def parse_tools(text: str) -> list:
    if not text.strip():
        return []
    tools = parse_json(text, "Tools")
    if not isinstance(tools, list):
        raise InvalidInput("Tools must be a JSON array of OpenAI tool objects")
    for tool in tools:
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidInput(f"Tools: each tool needs a function name, got {tool!r:.200}")
    return tools


def parse_tool_choice(text: str):
    """'auto' | 'none' | 'required' | a function name (str) for a forced call."""
    text = text.strip()
    if not text:
        return "auto"
    try:
        choice = json.loads(text)
    except ValueError:
        choice = text  # tolerate an unquoted string
    if isinstance(choice, str):
        if choice in ("auto", "none", "required"):
            return choice
        raise InvalidInput(f"ToolChoice must be auto, none, required or a function, got {choice!r}")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") or choice.get("name")
        if isinstance(name, str) and name:
            return ("function", name)
    raise InvalidInput(f"ToolChoice not understood: {text[:200]}")


def _tool_name(tool: dict) -> str:
    return tool.get("function", tool).get("name")


def _decode_tool_calls(text: str) -> list:
    """LocalAI's tool_calls JSON string → list with arguments decoded to dicts (#10658)."""
    calls = parse_json(text, "assistant tool_calls")
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list):
        raise InvalidInput("assistant tool_calls must be a JSON array")
    out = []
    for call in calls:
        fn = dict(call.get("function") or {})
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                fn["arguments"] = json.loads(args) if args.strip() else {}
            except ValueError:
                fn["arguments"] = {"_raw": args}
        out.append({**call, "type": call.get("type", "function"), "function": fn})
    return out


def to_template_messages(messages: list, parts: dict | None = None) -> list:
    """Validate roles and shape messages the way HF chat templates expect them. `parts` maps a
    message index to its content as a list of HF content parts (media of vision models)."""
    out = []
    for i, msg in enumerate(messages):
        role = msg.role.strip().lower()
        if role not in ROLES:
            raise InvalidInput(
                f"message {i}: unknown role {msg.role!r} (expected one of {sorted(ROLES)})"
            )
        entry = {"role": "tool" if role == "function" else role, "content": msg.content}
        if parts and i in parts:
            entry["content"] = parts[i]
        if msg.name:
            entry["name"] = msg.name
        if msg.tool_call_id:
            entry["tool_call_id"] = msg.tool_call_id
        if msg.reasoning_content:
            entry["reasoning_content"] = msg.reasoning_content
        if msg.tool_calls.strip():
            entry["tool_calls"] = _decode_tool_calls(msg.tool_calls)
        out.append(entry)
    return out


def _as_bool(value):
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def template_kwargs(metadata: dict, defaults: dict) -> dict:
    """enable_thinking (true and false), reasoning_effort and chat_template_kwargs."""
    kwargs = {}
    base = defaults.get("chat_template_kwargs")
    if isinstance(base, str) and base.strip():
        base = parse_json(base, "option chat_template_kwargs")
    if isinstance(base, dict):
        kwargs.update(base)
    if "enable_thinking" in defaults:
        kwargs["enable_thinking"] = _as_bool(defaults["enable_thinking"])
    if "enable_thinking" in metadata:
        kwargs["enable_thinking"] = _as_bool(metadata["enable_thinking"])
    if metadata.get("reasoning_effort"):
        kwargs["reasoning_effort"] = metadata["reasoning_effort"]
    if metadata.get("chat_template_kwargs"):
        extra = parse_json(metadata["chat_template_kwargs"], "Metadata chat_template_kwargs")
        if not isinstance(extra, dict):
            raise InvalidInput("Metadata chat_template_kwargs must be a JSON object")
        kwargs.update(extra)
    return kwargs


def longest_token(tokenizer) -> int:
    """Characters in the tokenizer's longest vocabulary entry (cached on the tokenizer)."""
    cached = getattr(tokenizer, "_mlxb_longest_token", None)
    if cached is None:
        cached = max((len(t) for t in tokenizer.get_vocab()), default=1)
        try:
            tokenizer._mlxb_longest_token = cached
        except AttributeError:
            pass
    return cached


def char_budget(tokenizer, max_tokens: int) -> int:
    """Characters past which a text surely has more than max_tokens tokens (no token covers more
    than the longest vocabulary entry; twice that for normalizers that drop characters). Texts
    are cut (or refused) here before tokenizing: a 45 MB input took minutes of worker time."""
    return 2 * longest_token(tokenizer) * max_tokens + 64


def check_length(tokenizer, spec: PromptSpec, context_size: int) -> None:
    """Refuse, before tokenizing, a prompt whose text alone surely exceeds the context (a 6 MB
    prompt took 45 s of tokenizing only to be refused by the token count)."""
    if context_size <= 0:
        return
    chars = (
        len(spec.prompt)
        + len(spec.tools or "")
        + sum(
            len(m.content or "") + len(m.reasoning_content or "") + len(m.tool_calls or "")
            for m in spec.messages
        )
    )
    if chars > char_budget(tokenizer, context_size):
        raise InvalidInput(
            f"prompt is {chars} characters, more than the context size {context_size} tokens can hold; "
            "shorten it or raise ContextSize"
        )


def encode_text(tokenizer, text: str) -> list:
    """Encode a raw prompt, adding BOS only when the text does not already start with it."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = bos is None or not text.startswith(bos)
    return list(tokenizer.encode(text, add_special_tokens=add_special))


def render(
    tokenizer, spec: PromptSpec, defaults: dict | None = None, parts: dict | None = None
) -> Prompt:
    """Build the prompt the model sees: raw Prompt, or Messages through the chat template
    (`parts`: per-message content parts with media, see `to_template_messages`)."""
    defaults = defaults or {}
    tools = parse_tools(spec.tools)
    choice = parse_tool_choice(spec.tool_choice)
    if spec.prompt or not (spec.use_template and spec.messages):
        if not spec.prompt:
            raise InvalidInput("empty prompt: send Prompt, or Messages with UseTokenizerTemplate")
        return Prompt(encode_text(tokenizer, spec.prompt), spec.prompt, tools=tools)
    if not getattr(tokenizer, "has_chat_template", False):
        raise Precondition("this model has no chat template: send a Go-templated Prompt instead")
    messages = to_template_messages(spec.messages, parts)
    if choice == "none":
        tools = []
    elif isinstance(choice, tuple):
        tools = [t for t in tools if _tool_name(t) == choice[1]]
        if not tools:
            raise InvalidInput(f"ToolChoice names function {choice[1]!r}, which is not in Tools")
    kwargs = template_kwargs(spec.metadata, defaults)
    try:
        text = tokenizer.apply_chat_template(
            messages, tools=tools or None, add_generation_prompt=True, tokenize=False, **kwargs
        )
    except Exception as exc:  # jinja errors, raise_exception() in the template
        raise InvalidInput(f"chat template failed: {exc}") from None
    prefix = _forced_prefix(tokenizer, tools, choice)
    starts_in_reasoning = _opens_reasoning(tokenizer, text)
    tokens = list(tokenizer.encode(text + prefix, add_special_tokens=False))
    return Prompt(tokens, text, starts_in_reasoning and not prefix, prefix, tools)


def _opens_reasoning(tokenizer, text: str) -> bool:
    """True when the generation prompt leaves a thinking block open (e.g. ends with <think>)."""
    if (markers := format_for(tokenizer).think) is None:
        return False
    start, end = markers
    tail = text.rstrip()
    return tail.rfind(start) > tail.rfind(end) if start in tail else False


def _forced_prefix(tokenizer, tools: list, choice) -> str:
    """tool_choice required / a named function: start the reply inside a tool call, in the
    family's own format (text/tool_formats.py)."""
    if not tools or choice in ("auto", "none"):
        return ""
    fmt = format_for(tokenizer)
    prefix = forced_prefix(fmt, choice[1] if isinstance(choice, tuple) else None)
    if not prefix:
        raise InvalidInput(
            f"ToolChoice {choice if isinstance(choice, str) else choice[1]!r} needs a tool-call "
            f"format to start the reply in, and this model's chat template has none we can force "
            f"({fmt.name}); send ToolChoice auto and parse the reply, or use a grammar"
        )
    return prefix
