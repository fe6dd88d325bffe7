"""Classify generated text incrementally into content, reasoning and tool calls.

The family's format (`tool_formats.format_for`) gives the markers: mlx-lm's TokenizerWrapper
infers them from the vocabulary and chat template (`<think>`, `<tool_call>`, `[TOOL_CALLS]`,
…) with its own tool parser; for families mlx-lm has no parser for (Llama 3.x JSON, gpt-oss
harmony, DeepSeek) ours. A call's id and name are sent as soon as its header is seen, then
its JSON arguments as they arrive; nothing already emitted is ever sent again."""

import json
import re
from dataclasses import dataclass, field

from mlxbackend.text.tool_formats import call_id, call_name, format_for, json_value_end, new_id

# What may still grow into `{"name":` at the start of a reply (Llama 3.x bare JSON calls).
LEADING_JSON = re.compile(r'\{\s*"name"\s*:')
LEADING_JSON_PREFIX = re.compile(r'\{\s*(?:"(?:n(?:a(?:m(?:e(?:"\s*)?)?)?)?)?)?')


@dataclass
class ToolCall:
    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class Delta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list = field(default_factory=list)

    def __bool__(self):
        return bool(self.content or self.reasoning or self.tool_calls)

    def extend(self, other: "Delta"):
        self.content += other.content
        self.reasoning += other.reasoning
        self.tool_calls.extend(other.tool_calls)


@dataclass
class OpenCall:
    """A call whose header was seen in the open tool region."""

    index: int
    id: str
    name: str
    args_start: int  # offset of its arguments in the region
    json_args: bool  # arguments stream; else the parser gives them at the region's end
    sent: int = 0  # characters of arguments sent
    done: bool = False  # arguments complete (or not streamed)


class OutputParser:
    """Feed raw text deltas; each call returns the newly classified Delta."""

    def __init__(self, tokenizer, tools: list, starts_in_reasoning: bool = False):
        self.tools = tools
        self.fmt = format_for(tokenizer)
        self.think = self.fmt.think
        parse_tools = bool(tools) and self.fmt.parse is not None
        self.tool_starts = self.fmt.tool_starts if parse_tools else ()
        self.leading_json = parse_tools and self.fmt.leading_json
        self.state = "reasoning" if starts_in_reasoning and self.think else "content"
        self.buf = ""
        self.ws = ""  # whitespace held in content until something visible follows
        self.lstrip = True  # strip leading whitespace of the next reasoning/content run
        self.fresh = True  # nothing classified yet
        self.calls: list[ToolCall] = []  # final, fully parsed calls
        self.next_index = 0
        self.region = ""  # text of the open tool region
        self.region_mark = ""  # the marker that opened it
        self.open: list[OpenCall] = []
        self.scan = 0  # where the next call header may start in the region

    def _markers(self) -> list:
        if self.state == "content":
            marks = list(self.think or ()) + list(self.tool_starts) + list(self.fmt.drop)
            return marks  # a stray reasoning end is swallowed, never leaked
        if self.state == "reasoning":
            return [self.think[1]]
        return [self.fmt.tool_end] if self.fmt.tool_end else []

    def feed(self, text: str) -> Delta:
        out = Delta()
        self.buf += text
        while self.buf:
            if self.state == "content" and self.leading_json and self.fresh:
                if self._leading_call():
                    break  # may still become a call: hold
                if self.state == "tool":
                    continue
            marks = self._markers()
            hits = [(self.buf.find(m), -len(m), m) for m in marks]
            hits = [h for h in hits if h[0] >= 0]
            if hits:
                i, _, mark = min(hits)
                self._emit(self.buf[:i], out)
                self.buf = self.buf[i + len(mark) :]
                self._transition(mark, out)
                continue
            hold = _partial_suffix(self.buf, marks)
            self._emit(self.buf[: len(self.buf) - hold], out)
            self.buf = self.buf[len(self.buf) - hold :]
            break
        return out

    def finish(self) -> Delta:
        """End of generation: flush held text, close an unterminated tool call."""
        out = Delta()
        rest, self.buf = self.buf, ""
        self._emit(rest, out)
        if self.state == "tool":
            self._close_region(out)
        return out

    def _leading_call(self) -> bool:
        """Llama 3.x: a reply that starts with `{"name":` is a call. True = hold the text."""
        text = self.buf.lstrip()
        if not text or LEADING_JSON_PREFIX.fullmatch(text):
            return True
        self.fresh = False
        if LEADING_JSON.match(text):
            self.buf = text
            self._open_region("")
        return False

    def _transition(self, mark: str, out: Delta):
        self.ws = ""  # whitespace before a marker is dropped
        if self.state == "content":
            if self.think and mark == self.think[0]:
                self.state, self.lstrip = "reasoning", True
            elif mark in self.tool_starts:
                self._open_region(mark)
            # channel markup or a stray reasoning end: dropped
        elif self.state == "reasoning":
            self.state, self.lstrip = "content", True
        else:
            self._close_region(out)
            if self.state == "tool":
                self.state = "content"
            self.lstrip = True

    def _open_region(self, mark: str):
        self.state, self.fresh = "tool", False
        self.region, self.region_mark, self.open, self.scan = "", mark, [], 0

    def _emit(self, text: str, out: Delta):
        if not text:
            return
        if self.state == "tool":
            self.region += text
            self._stream_region(out)
            return
        if self.lstrip:
            text = text.lstrip()
            if not text:
                return
            self.lstrip = False
        self.fresh = False
        text = self.ws + text
        stripped = text.rstrip()
        self.ws = text[len(stripped) :]
        if self.state == "reasoning":
            out.reasoning += stripped
        else:
            out.content += stripped

    def _stream_region(self, out: Delta):
        """Send id+name once a call's header is seen, then its JSON arguments as they come."""
        header = self.fmt.header
        if header is None:
            return
        while True:
            call = self.open[-1] if self.open and not self.open[-1].done else None
            if call is None:
                m = header.pattern.search(self.region, self.scan)
                if m is None:
                    return
                call = OpenCall(
                    self.next_index,
                    call_id(m, self.fmt.short_ids),
                    call_name(m),
                    m.end(),
                    header.json_args,
                    done=not header.json_args,
                )
                self.next_index += 1
                self.open.append(call)
                self.scan = m.end()
                out.tool_calls.append(ToolCall(call.index, call.id, call.name, ""))
                continue
            end = json_value_end(self.region, call.args_start)
            upto = len(self.region) if end is None else end
            if upto > call.args_start + call.sent:
                piece = self.region[call.args_start + call.sent : upto]
                out.tool_calls.append(ToolCall(call.index, arguments=piece))
                call.sent += len(piece)
            if end is None:
                return
            call.done, self.scan = True, end

    def _close_region(self, out: Delta):
        """The region ended: parse it; complete streamed calls, emit unstreamed ones."""
        region, opened = self.region, self.open
        self.region, self.open = "", []
        parsed = _parse_calls(self.fmt.parse, region, self.tools)
        if not parsed and not opened:
            # not a tool call after all: give the text back as content
            self.state = "content"
            self._emit(self.region_mark + region, out)
            return
        for i, call in enumerate(opened):
            args = parsed[i][1] if i < len(parsed) else None
            if not call.json_args:
                if args:
                    out.tool_calls.append(ToolCall(call.index, arguments=args))
                args = args or ""
            elif args is None:
                args = region[call.args_start : call.args_start + call.sent].strip()
            self.calls.append(ToolCall(call.index, call.id, call.name, args))
        for name, args, model_id in parsed[len(opened) :]:
            call = ToolCall(self.next_index, model_id or new_id(self.fmt.short_ids), name, args)
            self.next_index += 1
            out.tool_calls.append(call)
            self.calls.append(ToolCall(call.index, call.id, name, args))


def _parse_calls(parse, region: str, tools) -> list:
    """[(name, arguments JSON, the model's own id or "")] from the region's text; [] if it does
    not parse."""
    try:
        parsed = parse(region, tools)
    except Exception:
        return []
    items = parsed if isinstance(parsed, list) else [parsed]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not item.get("name"):
            return []
        args = item.get("arguments", {})
        calls.append(
            (
                item["name"],
                args if isinstance(args, str) else json.dumps(args, ensure_ascii=False),
                item["id"] if isinstance(item.get("id"), str) else "",
            )
        )
    return calls


def _partial_suffix(buf: str, marks) -> int:
    """Length of the longest suffix of buf that is a proper prefix of a marker."""
    longest = max((len(m) for m in marks), default=0)
    for n in range(min(len(buf), longest - 1), 0, -1):
        if any(m.startswith(buf[-n:]) for m in marks):
            return n
    return 0
