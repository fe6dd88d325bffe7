"""The tiny test models: loadable, detected as thinking/tool-calling, trained replies exact."""

import json

import mlx.core as mx
import pytest
from mlx_lm import generate, load
from mlx_lm.tool_parsers import json_tools
from transformers import AutoTokenizer

from tests.tiny_model import (
    CHAT_ANSWER,
    CHAT_CONVERSATION,
    CHAT_REASONING,
    CHAT_REPLY,
    CHAT_REPLY_NO_THINKING,
    COMPLETION_PROMPT,
    COMPLETION_TEXT,
    EOS_TOKEN,
    EXTRA_TOKENS,
    SPECIAL_TOKENS,
    TOOL_CALL,
    TOOL_CONVERSATION,
    TOOL_REASONING,
    TOOL_REPLY,
    TOOLS,
    build_tiny_model,
    greedy_ids,
    greedy_text,
    render_prompt,
)

UNICODE_SAMPLES = [
    "Hello, world!",
    "café crème — naïve résumé",
    "dragon 🐉 and fire 🔥🔥",
    "東京は日本の首都です。",
    "Здравствуйте, мир",
    '{"city": "Paris", "temp": 21.5}',
    "tabs\tand\nnewlines\r\n  spaces  ",
    "<think>x</think> <tool_call>{}</tool_call><|im_end|>",
]


@pytest.fixture(scope="module")
def random_loaded(tiny_dir):
    return load(str(tiny_dir))


@pytest.fixture(scope="module")
def trained_loaded(trained_dir):
    return load(str(trained_dir))


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_config_and_weights(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 2
    assert config["num_attention_heads"] == 4
    assert config["num_key_value_heads"] == 2
    assert config["rope_theta"] == 10000
    assert config["max_position_embeddings"] == 2048
    assert config["tie_word_embeddings"] is True
    weights = mx.load(str(tiny_dir / "model.safetensors"))
    assert all(w.dtype == mx.float32 for w in weights.values())
    assert "lm_head.weight" not in weights
    assert weights["model.embed_tokens.weight"].shape[0] == config["vocab_size"]


def test_loads_with_mlx_lm(tiny_dir, random_loaded):
    model, tokenizer = random_loaded
    config = json.loads((tiny_dir / "config.json").read_text())
    assert len(tokenizer) == config["vocab_size"]
    assert 1000 <= len(tokenizer) <= 2000
    logits = model(mx.array([encode(tokenizer, "Hello")]))
    assert logits.shape[-1] == config["vocab_size"]


def test_wrapper_detects_thinking_and_tools(random_loaded):
    _, tokenizer = random_loaded
    assert tokenizer.has_thinking
    assert tokenizer.think_start == "<think>"
    assert tokenizer.think_end == "</think>"
    assert tokenizer.has_tool_calling
    assert tokenizer.tool_call_start == "<tool_call>"
    assert tokenizer.tool_call_end == "</tool_call>"
    assert tokenizer.tool_parser is json_tools.parse_tool_call
    assert tokenizer.eos_token_ids == {tokenizer.convert_tokens_to_ids(EOS_TOKEN)}


def test_autotokenizer_offline(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    assert tokenizer.eos_token == EOS_TOKEN
    assert tokenizer.bos_token is None
    assert tokenizer.pad_token == "<|endoftext|>"
    assert "tool_call.name" in tokenizer.chat_template
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id


@pytest.mark.parametrize("token", SPECIAL_TOKENS + EXTRA_TOKENS)
def test_marker_tokens_are_single_ids(random_loaded, token):
    _, tokenizer = random_loaded
    ids = encode(tokenizer, f"a{token}b")
    assert len(ids) == 3
    assert tokenizer.convert_ids_to_tokens(ids[1]) == token


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_unicode_round_trip(random_loaded, text):
    _, tokenizer = random_loaded
    ids = encode(tokenizer, text)
    assert tokenizer.decode(ids) == text
    detokenizer = tokenizer.detokenizer
    for token in ids:
        detokenizer.add_token(token)
    detokenizer.finalize()
    assert detokenizer.text == text


def test_template_generation_prompt(random_loaded):
    _, tokenizer = random_loaded
    thinking = render_prompt(tokenizer, CHAT_CONVERSATION)
    assert thinking == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" + (
        "<|im_start|>assistant\n"
    )
    no_thinking = render_prompt(tokenizer, CHAT_CONVERSATION, enable_thinking=False)
    assert no_thinking == thinking + "<think>\n\n</think>\n\n"
    # The wrapper turns thinking on by default, like Qwen3.
    assert (
        tokenizer.apply_chat_template(CHAT_CONVERSATION, tokenize=False, add_generation_prompt=True)
        == thinking
    )


def test_template_tools_block(random_loaded):
    _, tokenizer = random_loaded
    prompt = render_prompt(tokenizer, TOOL_CONVERSATION, TOOLS)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools")
    assert "<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>" in prompt
    assert "within <tool_call></tool_call> XML tags" in prompt
    assert prompt.endswith(
        "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("wrap", [True, False])
def test_template_renders_replies_like_the_training_targets(random_loaded, wrap):
    _, tokenizer = random_loaded
    call = {"type": "function", "function": TOOL_CALL} if wrap else TOOL_CALL
    tool_turn = {
        "role": "assistant",
        "content": "",
        "reasoning_content": TOOL_REASONING,
        "tool_calls": [call],
    }
    chat_turn = {"role": "assistant", "content": CHAT_ANSWER, "reasoning_content": CHAT_REASONING}
    for messages, tools, reply in [
        (TOOL_CONVERSATION, TOOLS, TOOL_REPLY),
        (CHAT_CONVERSATION, None, CHAT_REPLY),
    ]:
        turn = tool_turn if tools else chat_turn
        full = tokenizer.apply_chat_template(messages + [turn], tools=tools, tokenize=False)
        assert full == render_prompt(tokenizer, messages, tools) + reply + "\n"


def test_template_tool_results_names_and_unknown_roles(random_loaded):
    _, tokenizer = random_loaded
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}], "name": "bob"},
        {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "tool", "content": "sunny"},
        {"role": "critic", "content": "ok"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert "<|im_start|>user name=bob\nHi<|im_end|>\n" in text
    assert (
        '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response>\n'
        "<tool_response>\nsunny\n</tool_response><|im_end|>\n"
    ) in text
    assert text.endswith("<|im_start|>critic\nok<|im_end|>\n")


def test_constants_are_consistent(random_loaded):
    _, tokenizer = random_loaded
    assert CHAT_REPLY == f"<think>\n{CHAT_REASONING}\n</think>\n\n{CHAT_ANSWER}{EOS_TOKEN}"
    assert CHAT_REPLY_NO_THINKING == CHAT_ANSWER + EOS_TOKEN
    body = TOOL_REPLY.split("<tool_call>")[1].split("</tool_call>")[0]
    assert tokenizer.tool_parser(body) == TOOL_CALL


def test_completion_text_properties(random_loaded):
    _, tokenizer = random_loaded
    ids = encode(tokenizer, COMPLETION_TEXT)
    assert len(ids) >= 150
    assert EOS_TOKEN not in COMPLETION_TEXT
    assert not COMPLETION_TEXT.startswith(" ")
    head = tokenizer.decode(ids[:20])
    assert " the dragon" not in head
    assert " the dragon" in COMPLETION_TEXT[len(head) :]
    assert len(encode(tokenizer, " dragon")) > 1
    assert "é" in COMPLETION_TEXT and "🐉" in COMPLETION_TEXT
    assert len(encode(tokenizer, "🐉")) > 1
    assert encode(tokenizer, COMPLETION_PROMPT + COMPLETION_TEXT) == (
        encode(tokenizer, COMPLETION_PROMPT) + ids
    )


def test_random_build_is_deterministic(tmp_path, tiny_dir):
    again = build_tiny_model(tmp_path / "again")
    other = build_tiny_model(tmp_path / "other", seed=1)
    for name in ["model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"]:
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes()
    assert (other / "model.safetensors").read_bytes() != (
        tiny_dir / "model.safetensors"
    ).read_bytes()


def test_trained_wrapper_flags(trained_loaded):
    _, tokenizer = trained_loaded
    assert tokenizer.has_thinking and tokenizer.has_tool_calling


def test_trained_tool_reply(trained_loaded):
    model, tokenizer = trained_loaded
    prompt = render_prompt(tokenizer, TOOL_CONVERSATION, TOOLS)
    assert greedy_text(model, tokenizer, prompt, 100) == TOOL_REPLY


@pytest.mark.parametrize(
    "enable_thinking, reply", [(True, CHAT_REPLY), (False, CHAT_REPLY_NO_THINKING)]
)
def test_trained_chat_reply(trained_loaded, enable_thinking, reply):
    model, tokenizer = trained_loaded
    prompt = render_prompt(tokenizer, CHAT_CONVERSATION, enable_thinking=enable_thinking)
    assert greedy_text(model, tokenizer, prompt, 100) == reply


def test_trained_replies_via_mlx_lm_generate(trained_loaded):
    model, tokenizer = trained_loaded
    prompt = tokenizer.apply_chat_template(
        TOOL_CONVERSATION, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    assert generate(model, tokenizer, prompt, max_tokens=100) == TOOL_REPLY[: -len(EOS_TOKEN)]
    prompt = render_prompt(tokenizer, CHAT_CONVERSATION, enable_thinking=False)
    assert generate(model, tokenizer, prompt, max_tokens=100) == CHAT_ANSWER


def test_trained_completion(trained_loaded):
    model, tokenizer = trained_loaded
    n = len(encode(tokenizer, COMPLETION_TEXT))
    assert greedy_text(model, tokenizer, COMPLETION_PROMPT, n) == COMPLETION_TEXT
    assert generate(model, tokenizer, COMPLETION_PROMPT, max_tokens=n) == COMPLETION_TEXT


def test_trained_completion_runs_on_without_eos(trained_loaded):
    model, tokenizer = trained_loaded
    n = len(encode(tokenizer, COMPLETION_TEXT))
    ids = greedy_ids(model, tokenizer, COMPLETION_PROMPT, n + 200)
    assert len(ids) == n + 200
    assert not set(ids) & tokenizer.eos_token_ids
