"""Reasoning and tool-call formats per model family, on each family's real chat template.

For every family a tiny model is over-fitted (tests/tiny_model.py `build_chat_model`) so that
greedy decoding of the rendered conversation emits a scripted reply in the family's format;
a real server streams it: the joined ChatDeltas must be the right content, reasoning and tool
calls (id and name first, then argument fragments), and unary Predict must say the same.
Templates: tests/fixtures/templates (sources in SOURCES.md)."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from mlxbackend.proto import backend_pb2 as pb
from tests import tiny_model as tm
from tests.conftest import Server
from tests.test_generation import joined, messages

TEMPLATES = Path(__file__).parent / "fixtures" / "templates"
WEATHER = {"name": "get_weather", "arguments": {"city": "Paris"}}
ANSWER = "The capital of France is Paris."


@dataclass
class Case:
    conversation: list
    reply: str  # what the model emits, ending with an EOS token
    content: str = ""
    reasoning: str = ""
    calls: list = field(default_factory=list)
    tools: bool = True
    metadata: dict = field(default_factory=dict)
    ids: list = field(default_factory=list)  # the ids the model writes itself (Kimi K2)

    def kwargs(self) -> dict:
        return {k: v == "true" for k, v in self.metadata.items()}


@dataclass
class Family:
    template: str
    special: list
    eos: list
    cases: list
    bos: str | None = None
    parser: str = ""  # expected `Format.parser`


def tool_case(reply, reasoning="", content="", **kw) -> Case:
    return Case(tm.TOOL_CONVERSATION, reply, content, reasoning, [WEATHER], **kw)


def chat_case(reply, reasoning="", tools=False, **kw) -> Case:
    return Case(tm.CHAT_CONVERSATION, reply, ANSWER, reasoning, tools=tools, **kw)


QWEN_TOKENS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>"]
DS = ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "<｜tool▁calls▁begin｜>"]
DS += ["<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"]
DS_BOS, DS_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
MISTRAL = ["[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]"]
MISTRAL_V11 = MISTRAL + ["[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[ARGS]", "[CALL_ID]"]
HARMONY = ["<|start|>", "<|message|>", "<|end|>", "<|channel|>", "<|constrain|>"]
GEMMA = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>"]
FUNCTION_GEMMA = GEMMA + ["<start_function_declaration>", "<end_function_declaration>", "<escape>"]
FUNCTION_GEMMA += ["<start_function_call>", "<end_function_call>", "<end_function_response>"]
# Gemma 3 has no tool format: a call written the way Google's docs prompt for is plain content.
TOOL_CODE = '```tool_code\nget_weather(city="Paris")\n```'

FAMILIES = {
    "qwen3": Family(
        "Qwen-Qwen3-0.6B.jinja",
        QWEN_TOKENS,
        ["<|im_end|>"],
        [
            tool_case(
                "<think>\nThe user wants weather.\n</think>\n\n<tool_call>\n"
                '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
                reasoning="The user wants weather.",
            ),
            chat_case(f"<think>\nEasy.\n</think>\n\n{ANSWER}<|im_end|>", reasoning="Easy."),
        ],
        parser="mlx-lm:json_tools",
    ),
    "qwen3_coder": Family(
        "Qwen-Qwen3-Coder.jinja",
        QWEN_TOKENS,
        ["<|im_end|>"],
        [
            tool_case(
                "Let me check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
                "</parameter>\n</function>\n</tool_call><|im_end|>",
                content="Let me check.",
            )
        ],
        parser="mlx-lm:qwen3_coder",
    ),
    "llama3": Family(
        "meta-llama-Llama-3.3-70B-Instruct.jinja",
        ["<|start_header_id|>", "<|end_header_id|>", "<|python_tag|>"],
        ["<|eot_id|>", "<|eom_id|>"],
        [
            tool_case('{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'),
            chat_case(f"{ANSWER}<|eot_id|>", tools=True),
        ],
        bos="<|begin_of_text|>",
        parser="ours",
    ),
    "mistral_v3": Family(
        "mistralai-Mistral-Nemo-Instruct-2407.jinja",
        MISTRAL,
        ["</s>"],
        [
            tool_case(
                '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, '
                '"id": "a1b2c3d4e"}]</s>'
            ),
            chat_case(f"{ANSWER}</s>", tools=True),
        ],
        bos="<s>",
        parser="mlx-lm:mistral",
    ),
    "mistral_v11": Family(
        "mistralai-Mistral-Small-3.2-24B-Instruct-2506.jinja",
        MISTRAL_V11,
        ["</s>"],
        [tool_case('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}</s>')],
        bos="<s>",
        parser="mlx-lm:mistral",
    ),
    "magistral": Family(
        "unsloth-Magistral-Small-2509.jinja",
        MISTRAL_V11 + ["[THINK]", "[/THINK]"],
        ["</s>"],
        [
            tool_case(
                "[THINK]The user wants weather.[/THINK]"
                '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}</s>',
                reasoning="The user wants weather.",
            ),
            chat_case(f"[THINK]Easy.[/THINK]{ANSWER}</s>", reasoning="Easy."),
        ],
        bos="<s>",
        parser="mlx-lm:mistral",
    ),
    "gpt_oss": Family(
        "openai-gpt-oss-120b.jinja",
        HARMONY,
        ["<|return|>", "<|call|>"],
        [
            tool_case(
                "<|channel|>analysis<|message|>The user wants weather.<|end|><|start|>assistant"
                "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
                '{"city":"Paris"}<|call|>',
                reasoning="The user wants weather.",
            ),
            chat_case(
                "<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant"
                f"<|channel|>final<|message|>{ANSWER}<|return|>",
                reasoning="Easy.",
            ),
        ],
        parser="ours",
    ),
    "deepseek_r1": Family(
        "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
        DS,
        [DS_EOS],
        [
            tool_case(
                "The user wants weather.\n</think>\n\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>"
                'function<｜tool▁sep｜>get_weather\n```json\n{"city": "Paris"}\n```'
                f"<｜tool▁call▁end｜><｜tool▁calls▁end｜>{DS_EOS}",
                reasoning="The user wants weather.",
            ),
            chat_case(f"Easy.\n</think>\n\n{ANSWER}{DS_EOS}", reasoning="Easy."),
        ],
        bos=DS_BOS,
        parser="ours",
    ),
    "deepseek_v3": Family(
        "deepseek-ai-DeepSeek-V3.1.jinja",
        DS,
        [DS_EOS],
        [
            tool_case(
                "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
                f'{{"city": "Paris"}}<｜tool▁call▁end｜><｜tool▁calls▁end｜>{DS_EOS}',
                metadata={"enable_thinking": "false"},
            ),
            chat_case(
                f"Easy.</think>{ANSWER}{DS_EOS}",
                reasoning="Easy.",
                metadata={"enable_thinking": "true"},
            ),
        ],
        bos=DS_BOS,
        parser="ours",
    ),
    "glm45": Family(
        "zai-org-GLM-4.5.jinja",
        ["[gMASK]", "<sop>", "<|system|>", "<|assistant|>", "<think>", "</think>"]
        + ["<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"],
        ["<|endoftext|>", "<|user|>", "<|observation|>"],
        [
            tool_case(
                "\n<think>The user wants weather.</think>\n<tool_call>get_weather\n"
                "<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call><|observation|>",
                reasoning="The user wants weather.",
            ),
            chat_case(f"\n<think>Easy.</think>\n{ANSWER}<|user|>", reasoning="Easy."),
        ],
        parser="mlx-lm:glm47",
    ),
    "kimi_k2": Family(
        "moonshotai-Kimi-K2-Thinking.jinja",
        ["<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>", "<think>"]
        + ["</think>", "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"]
        + ["<|tool_call_begin|>", "<|tool_call_end|>", "<|tool_call_argument_begin|>"],
        ["<|im_end|>"],
        [
            tool_case(
                "<think>The user wants weather.</think><|tool_calls_section_begin|>"
                "<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
                '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>',
                reasoning="The user wants weather.",
                ids=["functions.get_weather:0"],
            ),
            chat_case(f"<think>Easy.</think>{ANSWER}<|im_end|>", reasoning="Easy."),
        ],
        parser="mlx-lm:kimi_k2",
    ),
    "function_gemma": Family(
        "google-functiongemma.jinja",
        FUNCTION_GEMMA,
        ["<end_of_turn>", "<start_function_response>"],
        [
            tool_case(
                "<start_function_call>call:get_weather{city:<escape>Paris<escape>}"
                "<end_function_call><start_function_response>"
            ),
            chat_case(f"{ANSWER}<end_of_turn>", tools=True),
        ],
        bos="<bos>",
        parser="mlx-lm:function_gemma",
    ),
    "gemma3": Family(
        "google-gemma-3-270m-it.jinja",
        GEMMA,
        ["<end_of_turn>", "<eos>"],
        [
            Case(tm.TOOL_CONVERSATION, f"{TOOL_CODE}<end_of_turn>", content=TOOL_CODE),
            chat_case(f"{ANSWER}<end_of_turn>", tools=True),
        ],
        bos="<bos>",
    ),
}


def build(family: Family, out_dir: Path) -> Path:
    template = (TEMPLATES / family.template).read_text()
    conversations = [
        (c.conversation, tm.TOOLS if c.tools else None, c.kwargs(), c.reply) for c in family.cases
    ]
    return tm.build_chat_model(
        out_dir, template, family.special, family.eos, conversations, bos=family.bos
    )


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_server(request, tmp_path_factory):
    """(family name, server with that family's trained tiny model loaded)."""
    name = request.param
    folder = build(FAMILIES[name], tmp_path_factory.mktemp("fmt") / name)
    srv = Server()
    reply = srv.stub.LoadModel(
        pb.ModelOptions(Model=folder.name, ModelPath=str(folder.parent), ContextSize=4096)
    )
    assert reply.success, reply.message
    yield name, folder, srv
    srv.stop()


def request_for(case: Case) -> pb.PredictOptions:
    return pb.PredictOptions(
        Messages=messages(case.conversation),
        UseTokenizerTemplate=True,
        Tools=json.dumps(tm.TOOLS) if case.tools else "",
        Metadata=case.metadata,
        Tokens=200,
    )


def test_family_format_is_detected(family_server):
    from mlx_lm.utils import load_tokenizer

    from mlxbackend.text.tool_formats import format_for

    name, folder, srv = family_server
    fmt = format_for(load_tokenizer(folder))
    assert fmt.parser == FAMILIES[name].parser
    meta = srv.stub.ModelMetadata(pb.ModelOptions(), timeout=10)  # what LocalAI reads
    assert meta.supports_thinking == (fmt.think is not None)


def test_stream_deltas_and_unary(family_server):
    name, _, srv = family_server
    for case in FAMILIES[name].cases:
        replies = list(srv.stub.PredictStream(request_for(case)))
        text, content, reasoning, calls = joined(replies)
        eos = next(e for e in FAMILIES[name].eos if case.reply.endswith(e))
        assert text == case.reply.removesuffix(eos), name  # the model says the scripted reply
        assert (content, reasoning) == (case.content, case.reasoning), name
        assert [c["name"] for c in calls.values()] == [c["name"] for c in case.calls], name
        for got, want in zip(calls.values(), case.calls, strict=True):
            assert got["id"] and json.loads(got["arguments"]) == want["arguments"], name
        pieces = [c for r in replies for d in r.chat_deltas for c in d.tool_calls]
        if pieces:
            assert pieces[0].name and pieces[0].id  # index, id and name come first
            assert all(not p.name and not p.id for p in pieces[1:])  # then arguments only
        whole = srv.stub.Predict(request_for(case))
        assert whole.message.decode() == text and len(whole.chat_deltas) == 1
        delta = whole.chat_deltas[0]
        assert (delta.content, delta.reasoning_content) == (content, reasoning), name
        assert [(c.name, json.loads(c.arguments)) for c in delta.tool_calls] == [
            (c["name"], c["arguments"]) for c in case.calls
        ], name
        assert all(c.id for c in delta.tool_calls)
        if case.ids:  # the model's own ids, streamed and unary
            assert [p.id for p in pieces if p.id] == case.ids == [c.id for c in delta.tool_calls]


@pytest.mark.parametrize("split", [1, 2, 3, 7])
def test_any_split_classifies_the_same(family_server, split):
    """Markers cut anywhere between text deltas (the server streams per token)."""
    from mlx_lm.utils import load_tokenizer

    from mlxbackend.text.chat import _opens_reasoning
    from mlxbackend.text.parse import OutputParser

    name, folder, _ = family_server
    tok = load_tokenizer(folder)
    for case in FAMILIES[name].cases:
        tools = tm.TOOLS if case.tools else None
        prompt = tok.apply_chat_template(
            case.conversation,
            tools=tools,
            tokenize=False,
            add_generation_prompt=True,
            **case.kwargs(),
        )
        parser = OutputParser(tok, tools or [], _opens_reasoning(tok, prompt))
        text = next(
            case.reply.removesuffix(e) for e in FAMILIES[name].eos if case.reply.endswith(e)
        )
        deltas = [parser.feed(text[i : i + split]) for i in range(0, len(text), split)]
        deltas.append(parser.finish())
        assert "".join(d.content for d in deltas) == case.content, name
        assert "".join(d.reasoning for d in deltas) == case.reasoning, name
        calls = [c for d in deltas for c in d.tool_calls]
        assert [c.name for c in calls if c.name] == [c["name"] for c in case.calls], name
        if case.calls:
            assert json.loads("".join(c.arguments for c in calls)) == case.calls[0]["arguments"]
            assert [json.loads(c.arguments) for c in parser.calls] == [WEATHER["arguments"]]


@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_tool_choice_starts_a_call_in_the_family_format(family_server, choice):
    """ToolChoice `required` / a named function: the reply starts inside a tool call written
    in the family's own format; a named one's first tool delta names the function."""
    from mlx_lm.utils import load_tokenizer

    from mlxbackend.text.tool_formats import forced_prefix, format_for

    name, folder, srv = family_server
    case = next((c for c in FAMILIES[name].cases if c.calls), None)
    fmt = format_for(load_tokenizer(folder))
    if case is None:  # no tool-call format (Gemma 3): a forced call is refused, not ignored
        request = request_for(FAMILIES[name].cases[0])
        request.ToolChoice = (
            '"required"'
            if choice == "required"
            else json.dumps({"type": "function", "function": {"name": "get_weather"}})
        )
        with pytest.raises(grpc.RpcError) as err:
            list(srv.stub.PredictStream(request))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert "ToolChoice" in err.value.details() and srv.healthy()
        return
    request = request_for(case)
    if choice == "required":
        request.ToolChoice = '"required"'
        text = b"".join(r.message for r in srv.stub.PredictStream(request)).decode()
        assert text.startswith(forced_prefix(fmt, None)) and forced_prefix(fmt, None), name
    else:
        request.ToolChoice = json.dumps({"type": "function", "function": {"name": "get_weather"}})
        replies = list(srv.stub.PredictStream(request))
        pieces = [c for r in replies for d in r.chat_deltas for c in d.tool_calls]
        text = b"".join(r.message for r in replies).decode()
        assert text.startswith(forced_prefix(fmt, "get_weather")), name
        assert pieces and pieces[0].name == "get_weather", (name, pieces)
