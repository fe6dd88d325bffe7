"""Classify generated text incrementally into content, reasoning and tool calls.

Markers (`<think>`, `</think>`, `<tool_call>`, …) come from mlx-lm's TokenizerWrapper, which
infers them from the vocabulary and chat template; the final parse of a tool call uses the
tokenizer's own mlx-lm tool parser. Nothing already emitted is ever sent again."""

import json
import re
import uuid
from dataclasses import dataclass, field

# `{"name": "fn", "arguments": ` at the start of a JSON tool call: lets arguments stream.
JSON_CALL_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


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


class OutputParser:
    """Feed raw text deltas; each call returns the newly classified Delta."""

    def __init__(self, tokenizer, tools: list, starts_in_reasoning: bool = False):
        self.tools = tools
        self.think = (
            (tokenizer.think_start, tokenizer.think_end)
            if getattr(tokenizer, "has_thinking", False)
            else None
        )
        parse_tools = bool(tools) and getattr(tokenizer, "has_tool_calling", False)
        self.tool_markers = (
            (tokenizer.tool_call_start, tokenizer.tool_call_end) if parse_tools else None
        )
        self.tool_parser = tokenizer.tool_parser if parse_tools else None
        self.state = "reasoning" if starts_in_reasoning and self.think else "content"
        self.buf = ""
        self.ws = ""  # whitespace held in content until something visible follows
        self.lstrip = True  # strip leading whitespace of the next reasoning/content run
        self.calls: list[ToolCall] = []  # final, fully parsed calls
        self.call_body = ""
        self.call: ToolCall | None = None
        self.args_start = -1
        self.args_sent = 0

    def _markers(self):
        if self.state == "content":
            marks = []
            if self.think:
                marks += list(self.think)  # a stray </think> is swallowed, never leaked
            if self.tool_markers:
                marks.append(self.tool_markers[0])
            return marks
        if self.state == "reasoning":
            return [self.think[1]]
        return [self.tool_markers[1]]

    def feed(self, text: str) -> Delta:
        out = Delta()
        self.buf += text
        while self.buf:
            marks = self._markers()
            hits = [(self.buf.find(m), m) for m in marks]
            hits = [(i, m) for i, m in hits if i >= 0]
            if hits:
                i, mark = min(hits)
                self._emit(self.buf[:i], out, final=True)
                self.buf = self.buf[i + len(mark) :]
                self._transition(mark, out)
                continue
            hold = _partial_suffix(self.buf, marks)
            self._emit(self.buf[: len(self.buf) - hold], out, final=False)
            self.buf = self.buf[len(self.buf) - hold :]
            break
        return out

    def finish(self) -> Delta:
        """End of generation: flush held text, close an unterminated tool call."""
        out = Delta()
        rest, self.buf = self.buf, ""
        if self.state == "tool":
            self._emit(rest, out, final=True)
            self._close_call(out, truncated=True)
        else:
            self._emit(rest, out, final=True)
        return out

    def _transition(self, mark: str, out: Delta):
        self.ws = ""  # whitespace before a marker is dropped
        if self.state == "content" and self.think and mark == self.think[0]:
            self.state, self.lstrip = "reasoning", True
        elif self.state == "content" and self.tool_markers and mark == self.tool_markers[0]:
            self.state = "tool"
            self.call = ToolCall(index=len(self.calls))
            self.call_body, self.args_start, self.args_sent = "", -1, 0
        elif self.state == "reasoning":
            self.state, self.lstrip = "content", True
        elif self.state == "tool":
            self._close_call(out, truncated=False)
            self.state, self.lstrip = "content", True
        # a stray closing </think> in content: dropped

    def _emit(self, text: str, out: Delta, final: bool):
        if not text:
            return
        if self.state == "tool":
            self.call_body += text
            self._stream_call(out)
            return
        if self.lstrip:
            text = text.lstrip()
            if not text:
                return
            self.lstrip = False
        text = self.ws + text
        stripped = text.rstrip()
        self.ws = text[len(stripped) :]
        if self.state == "reasoning":
            out.reasoning += stripped
        else:
            out.content += stripped

    def _stream_call(self, out: Delta):
        """Send id+name as soon as they are known, then argument fragments (JSON calls only)."""
        call = self.call
        if self.args_start < 0:
            m = JSON_CALL_HEADER.match(self.call_body)
            if not m:
                return
            call.id, call.name = _new_id(), json.loads(f'"{m.group(1)}"')
            self.args_start = m.end()
            out.tool_calls.append(ToolCall(call.index, call.id, call.name, ""))
        region = self.call_body[self.args_start :]
        end = region.rfind("}")  # hold back what may be the closing brace of the call object
        if end > self.args_sent:
            out.tool_calls.append(ToolCall(call.index, arguments=region[self.args_sent : end]))
            self.args_sent = end

    def _close_call(self, out: Delta, truncated: bool):
        call, body = self.call, self.call_body
        parsed = _parse_call(self.tool_parser, body, self.tools)
        if parsed is None and self.args_start < 0:
            # not a tool call after all: give the text back as content
            self.state = "content"
            self._emit(self.tool_markers[0] + body, out, final=True)
            return
        if parsed is not None:
            name, arguments = parsed
        else:
            name, arguments = call.name, body[self.args_start :].rstrip().removesuffix("}").rstrip()
        if self.args_start < 0:
            call.id, call.name = _new_id(), name
            out.tool_calls.append(ToolCall(call.index, call.id, name, arguments))
        else:
            region = body[self.args_start :].rstrip()
            streamed_total = region.removesuffix("}").rstrip()
            if len(streamed_total) > self.args_sent:
                out.tool_calls.append(
                    ToolCall(call.index, arguments=streamed_total[self.args_sent :])
                )
        self.calls.append(ToolCall(call.index, call.id, call.name or name, arguments))
        self.call = None


def _parse_call(tool_parser, body: str, tools):
    """(name, arguments JSON) from the model's tool-call text, or None if it does not parse."""
    try:
        parsed = tool_parser(body, tools)
    except Exception:
        return None
    if isinstance(parsed, list):
        parsed = parsed[0] if parsed else None
    if not isinstance(parsed, dict) or not parsed.get("name"):
        return None
    args = parsed.get("arguments", {})
    return parsed["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def _partial_suffix(buf: str, marks) -> int:
    """Length of the longest suffix of buf that is a proper prefix of a marker."""
    longest = max((len(m) for m in marks), default=0)
    for n in range(min(len(buf), longest - 1), 0, -1):
        if any(m.startswith(buf[-n:]) for m in marks):
            return n
    return 0


def _new_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]
