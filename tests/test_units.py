"""Unit tests of the pure pieces: options, stop hold-back, output classification, prompts."""

import json
from types import SimpleNamespace

import pytest

from mlxbackend.errors import InvalidInput
from mlxbackend.options import parse_options
from mlxbackend.text import chat
from mlxbackend.text.parse import OutputParser
from mlxbackend.text.stops import StopMatcher


def test_options_typed():
    opts = parse_options(["a:true", "b:3", "c:0.5", "d:some:thing", "novalue", "e:False"])
    assert opts == {"a": True, "b": 3, "c": 0.5, "d": "some:thing", "e": False}


def feed_all(matcher, pieces):
    out = [matcher.feed(p) for p in pieces]
    return out, matcher.flush()


def test_stop_spanning_pieces_is_held_back():
    m = StopMatcher(["STOP"])
    out, tail = feed_all(m, ["Hello S", "T", "O", "P and more"])
    assert out == ["Hello ", "", "", ""] and m.stopped and tail == ""


def test_stop_false_alarm_released():
    m = StopMatcher(["STOP"])
    out, tail = feed_all(m, ["a ST", "ART", " end S"])
    assert "".join(out) + tail == "a START end S" and not m.stopped


def test_stop_earliest_of_many():
    m = StopMatcher(["world", "lo w"])
    assert m.feed("hello world") == "hel" and m.stopped


def tokenizer(thinking=True, tools=True):
    from mlx_lm.tool_parsers import json_tools

    return SimpleNamespace(
        has_thinking=thinking,
        think_start="<think>",
        think_end="</think>",
        has_tool_calling=tools,
        tool_call_start="<tool_call>",
        tool_call_end="</tool_call>",
        tool_parser=json_tools.parse_tool_call,
    )


TOOLS = [{"type": "function", "function": {"name": "get_weather"}}]
REPLY = '<think>\nLet me see.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def run_parser(text, pieces, **kw):
    p = OutputParser(tokenizer(), TOOLS, **kw)
    deltas = [p.feed(piece) for piece in pieces(text)] + [p.finish()]
    return p, deltas


@pytest.mark.parametrize("split", [1, 2, 3, 7, 1000])
def test_parser_any_split(split):
    p, deltas = run_parser(REPLY, lambda t: [t[i : i + split] for i in range(0, len(t), split)])
    reasoning = "".join(d.reasoning for d in deltas)
    content = "".join(d.content for d in deltas)
    calls = [c for d in deltas for c in d.tool_calls]
    assert reasoning == "Let me see." and content == ""
    assert calls[0].name == "get_weather" and calls[0].id
    assert json.loads("".join(c.arguments for c in calls)) == {"city": "Paris"}
    assert len(p.calls) == 1 and json.loads(p.calls[0].arguments) == {"city": "Paris"}


def test_parser_starts_in_reasoning_and_plain_content():
    p, deltas = run_parser(
        "hmm</think>\n\nAnswer <b>bold</b>", lambda t: list(t), starts_in_reasoning=True
    )
    assert "".join(d.reasoning for d in deltas) == "hmm"
    assert "".join(d.content for d in deltas) == "Answer <b>bold</b>"


def test_parser_without_tools_leaves_markup_as_content():
    p = OutputParser(tokenizer(), [])
    d = p.feed('<tool_call>{"name": "x", "arguments": {}}</tool_call>')
    d.extend(p.finish())
    assert "<tool_call>" in d.content and not d.tool_calls


def test_parser_bad_tool_json_falls_back_to_content():
    p = OutputParser(tokenizer(), TOOLS)
    d = p.feed("<tool_call>not json</tool_call> ok")
    d.extend(p.finish())
    assert not p.calls and "not json" in d.content


def test_parser_unterminated_call_is_closed():
    p = OutputParser(tokenizer(), TOOLS)
    d = p.feed('<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}')
    d.extend(p.finish())
    assert len(p.calls) == 1 and json.loads("".join(c.arguments for c in d.tool_calls)) == {
        "city": "Rome"
    }


def test_tool_choice_and_tools_validation():
    assert chat.parse_tool_choice('"required"') == "required"
    assert chat.parse_tool_choice("auto") == "auto"
    assert chat.parse_tool_choice('{"type":"function","function":{"name":"f"}}') == (
        "function",
        "f",
    )
    with pytest.raises(InvalidInput):
        chat.parse_tool_choice('"maybe"')
    with pytest.raises(InvalidInput):
        chat.parse_tools('{"not": "a list"}')
    with pytest.raises(InvalidInput):
        chat.parse_tools("[{bad")


def test_messages_decode_tool_call_arguments():
    msgs = chat.to_template_messages(
        [
            chat.ChatMessage(
                "assistant",
                tool_calls=json.dumps(
                    [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"a": 1}'},
                        }
                    ]
                ),
            ),
            chat.ChatMessage("tool", content="42", tool_call_id="c1", name="f"),
        ]
    )
    assert msgs[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert msgs[1] == {"role": "tool", "content": "42", "name": "f", "tool_call_id": "c1"}
    with pytest.raises(InvalidInput, match="unknown role"):
        chat.to_template_messages([chat.ChatMessage("wizard", "hi")])


def test_template_kwargs_merge():
    kw = chat.template_kwargs(
        {"enable_thinking": "false", "chat_template_kwargs": '{"x": 1}', "reasoning_effort": "low"},
        {"enable_thinking": True},
    )
    assert kw == {"enable_thinking": False, "x": 1, "reasoning_effort": "low"}


def test_template_kwargs_from_options_string():
    kw = chat.template_kwargs({}, {"chat_template_kwargs": '{"enable_thinking": false}'})
    assert kw == {"enable_thinking": False}
    assert chat.template_kwargs({"enable_thinking": "true"}, {"enable_thinking": False}) == {
        "enable_thinking": True
    }
