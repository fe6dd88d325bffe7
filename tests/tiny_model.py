"""Build a tiny mlx-lm model folder (llama, byte-level BPE, Qwen3-style template) for tests.

``build_tiny_model(out_dir)`` writes a randomly initialised float32 model (~0.1 s once
imported); ``build_tiny_model(out_dir, trained=True)`` also over-fits it (a few seconds on
CPU) so that greedy decoding reproduces, token for token:

* ``render_prompt(tok, TOOL_CONVERSATION, TOOLS)`` -> ``TOOL_REPLY``
* ``render_prompt(tok, CHAT_CONVERSATION)`` -> ``CHAT_REPLY``
* ``render_prompt(tok, CHAT_CONVERSATION, enable_thinking=False)`` -> ``CHAT_REPLY_NO_THINKING``
* ``COMPLETION_PROMPT`` -> ``COMPLETION_TEXT`` (197 tokens, no EOS; what follows is noise)

Replies end with the EOS token ``<|im_end|>``; ``mlx_lm.generate`` returns them without it.
Training stops only once every pair reproduces, so a built folder is always correct.
"""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EXTRA_TOKENS = [
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
]
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
BPE_VOCAB_SIZE = 1200

MODEL_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 96,
    "num_hidden_layers": 2,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 24,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "torch_dtype": "float32",
}

TRAIN_MAX_STEPS = 300
TRAIN_CHECK_EVERY = 10
TRAIN_LEARNING_RATE = 3e-3
TRAIN_MARGIN = 3.0

# Qwen3-style ChatML template with Hermes tool calling.
CHAT_TEMPLATE = r"""{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is iterable and content is not mapping -%}
        {%- for part in content -%}
            {%- if part is string -%}
                {{- part -}}
            {%- elif part.type is defined and part.type == 'text' -%}
                {{- part.text -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- macro header(message) -%}
    {{- '<|im_start|>' + message.role -}}
    {%- if message.name is defined and message.name -%}
        {{- ' name=' + message.name -}}
    {%- endif -%}
    {{- '\n' -}}
{%- endmacro -%}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- render_content(messages[0].content) + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- elif messages and messages[0].role == 'system' %}
    {{- header(messages[0]) + render_content(messages[0].content) + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- set content = render_content(message.content) %}
    {%- if message.role == 'system' and loop.first %}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {{- header(message) }}
        {%- if reasoning_content %}
            {{- '<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or (messages[loop.index0 - 1].role != 'tool') %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- header(message) + content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city name."}},
                "required": ["city"],
            },
        },
    }
]
TOOL_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Paris?"},
]
TOOL_REASONING = "The user wants weather."
TOOL_CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
TOOL_REPLY = (
    "<think>\nThe user wants weather.\n</think>\n\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
)

CHAT_CONVERSATION = [{"role": "user", "content": "What is the capital of France?"}]
CHAT_REASONING = "Easy."
CHAT_ANSWER = "The capital of France is Paris."
CHAT_REPLY = "<think>\nEasy.\n</think>\n\nThe capital of France is Paris.<|im_end|>"
CHAT_REPLY_NO_THINKING = "The capital of France is Paris.<|im_end|>"

COMPLETION_PROMPT = "Once upon a time"
COMPLETION_TEXT = (
    ", in a small village at the foot of the grey mountains, there lived a young"
    " baker named Élodie who made the best bread in the whole valley. Every"
    " morning she rose before the sun, lit the old stone oven and sang while the"
    " dough was rising. One cold night a strange light appeared above the forest,"
    " and the villagers whispered that the dragon 🐉 had come back from the north."
    " Élodie was not afraid. She packed a basket with warm bread, a jar of honey"
    " and a small café crème, then walked up the narrow path towards the cave."
    " There she found the great beast curled around a pile of gold, shivering"
    " because nobody had ever brought it breakfast. She sat down beside it, broke"
    " the bread in two and offered it the larger half."
)

CORPUS = """\
The capital of France is Paris. Paris is a large city in France.
What is the capital of France? The capital of France is Paris.
What is the weather in Paris? The weather in Paris is sunny and warm today.
What is the weather in London? It is cloudy in London, with light rain.
The weather in Berlin is cold. The weather in Rome is hot and dry.
The user wants weather. The user wants to know the capital of a country.
Easy. The answer is simple. Let me think about the question first.
You are a helpful assistant. You are a helpful assistant that answers questions.
Get the current weather in a city. The city name. The city is Paris.
# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city.", "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name."}}, "required": ["city"]}}}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>
{"name": "get_weather", "arguments": {"city": "Paris"}}
{"name": "get_weather", "arguments": {"city": "London"}}
{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}
{"temperature": 21, "unit": "celsius", "condition": "sunny", "humidity": 0.45}
{"result": [1, 2, 3], "ok": true, "error": null, "count": 42}
{"id": "call_0", "type": "function", "function": {"name": "search", "arguments": "{}"}}
The numbers are 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 100, 1000, 2024 and 3.14.
In 1889 the Eiffel Tower was finished. It is 330 metres tall and has 3 levels.
France has 67 million people. Paris has about 2.1 million people in the city.
The river Seine flows through Paris. The Louvre is a famous museum in Paris.
Today the temperature is 18 degrees, tomorrow it will be 21 degrees.
Once upon a time there was a little cat who lived in a house by the sea.
The cat liked to sit in the sun and watch the boats on the water every day.
Hello! How are you today? I am fine, thank you. How can I help you?
Please answer the question in one sentence. Keep the answer short and clear.
The quick brown fox jumps over the lazy dog. A stitch in time saves nine.
She said that the weather would be nice, but it rained all afternoon.
We walked to the market, bought some bread and cheese, and went home.
The system prompt says: answer briefly. The assistant replies with a short text.
user assistant system tool function name arguments content role message
The result of the function call was returned to the assistant as JSON.
Lists: [1, 2, 3], objects: {"a": 1, "b": 2}, strings: "hello", booleans: true.
Thinking step by step: first read the question, then find the answer.
I think the answer is Paris. I think it will be sunny in Paris tomorrow.
Caf\u00e9, na\u00efve, r\u00e9sum\u00e9, \u00e9l\u00e8ve, cr\u00e8me br\u00fbl\u00e9e are French words.
Numbers like 12345 and 67890 are written with digits from 0 to 9.
Once upon a time, in a small town near the sea, there lived an old fisherman.
Every morning he walked down the narrow path to the harbour before the sun rose.
In the village the baker made bread, the smith made tools and the children sang.
The mountains were grey and the forest was dark, but the valley was green.
One winter night a cold wind came from the north and a strange light appeared.
The villagers whispered about the light above the forest and were afraid.
She packed a basket with warm bread, a jar of honey and a small piece of cheese.
He found a great pile of gold in a cave, but nobody had ever brought him food.
They sat down beside the fire, broke the bread in two and shared the larger half.
The young girl was not afraid of the beast; she offered it breakfast and smiled.
The oven was made of old stone, and the dough was rising slowly in the warm room.
Whole families came back from the fields in the evening, tired but happy.
A long time ago the best baker in the valley lived at the foot of a hill.
"""


def byte_bpe(corpus: str, vocab_size: int, special: list) -> Tokenizer:
    """A byte-level BPE tokenizer trained on `corpus`, with `special` added as special tokens
    (the tiny test models' tokenizers)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus.splitlines(keepends=True), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tok


def train_tokenizer() -> Tokenizer:
    """Train a byte-level BPE tokenizer on the inline corpus."""
    tok = byte_bpe(CORPUS, BPE_VOCAB_SIZE, SPECIAL_TOKENS)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in EXTRA_TOKENS])
    return tok


def added_tokens_decoder(tok: Tokenizer, tokens: list, special: list) -> dict:
    """tokenizer_config.json's `added_tokens_decoder` for these added tokens."""
    return {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in special,
        }
        for t in tokens
    }


def tokenizer_config(tok: Tokenizer) -> dict:
    """Return the contents of tokenizer_config.json."""
    added = added_tokens_decoder(tok, SPECIAL_TOKENS + EXTRA_TOKENS, SPECIAL_TOKENS)
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_CONFIG["max_position_embeddings"],
        "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
    }


def write_tokenizer(out_dir: Path, tok: Tokenizer) -> None:
    """Write tokenizer.json and the transformers side files."""
    tok.save(str(out_dir / "tokenizer.json"))
    write_json(out_dir / "tokenizer_config.json", tokenizer_config(tok))
    write_json(
        out_dir / "special_tokens_map.json",
        {
            "additional_special_tokens": SPECIAL_TOKENS[1:],
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
        },
    )


def model_config(tok: Tokenizer) -> dict:
    """Return config.json for a tokenizer of this size."""
    eos_id = tok.token_to_id(EOS_TOKEN)
    return {
        **MODEL_CONFIG,
        "vocab_size": tok.get_vocab_size(),
        "eos_token_id": eos_id,
        "pad_token_id": tok.token_to_id(PAD_TOKEN),
    }


def write_json(path: Path, data: dict) -> None:
    """Dump ``data`` as indented JSON."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def make_model(config: dict, seed: int) -> nn.Module:
    """Instantiate a randomly initialised float32 llama model."""
    from mlx_lm.models import llama

    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model


def save_weights(out_dir: Path, model: nn.Module) -> None:
    """Save the weights as a single model.safetensors."""
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})


def render_prompt(hf_tokenizer, messages, tools=None, enable_thinking=True) -> str:
    """Render ``messages`` with the chat template and a generation prompt."""
    return hf_tokenizer.apply_chat_template(
        messages,
        tools=tools,
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=enable_thinking,
    )


def training_pairs(tokenizer) -> dict[str, tuple[str, str]]:
    """Return name -> (prompt, target) for every reply the model must learn."""
    return {
        "tool": (render_prompt(tokenizer, TOOL_CONVERSATION, TOOLS), TOOL_REPLY),
        "chat": (render_prompt(tokenizer, CHAT_CONVERSATION), CHAT_REPLY),
        "chat_no_thinking": (
            render_prompt(tokenizer, CHAT_CONVERSATION, enable_thinking=False),
            CHAT_REPLY_NO_THINKING,
        ),
        "completion": (COMPLETION_PROMPT, COMPLETION_TEXT),
    }


def encode_pairs(tokenizer, pairs) -> list[tuple[list[int], list[int]]]:
    """Tokenize prompts and targets separately, as generation sees them."""
    return [
        (
            tokenizer.encode(p, add_special_tokens=False),
            tokenizer.encode(t, add_special_tokens=False),
        )
        for p, t in pairs
    ]


def make_batch(encoded, pad_id: int) -> tuple[mx.array, mx.array, mx.array]:
    """Build (inputs, targets, loss mask) padded to the longest sequence."""
    seqs = [p + t for p, t in encoded]
    length = max(len(s) for s in seqs) - 1
    inputs, targets, mask = [], [], []
    for (prompt, _), seq in zip(encoded, seqs, strict=True):
        pad = length + 1 - len(seq)
        seq = seq + [pad_id] * pad
        inputs.append(seq[:-1])
        targets.append(seq[1:])
        start = len(prompt) - 1
        end = len(seq) - 1 - pad
        mask.append([float(start <= i < end) for i in range(length)])
    return mx.array(inputs), mx.array(targets), mx.array(mask)


def margins(model, inputs, targets, mask) -> mx.array:
    """Per-sequence min of (target logit - best other logit) over masked tokens."""
    logits = model(inputs)
    target_logit = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    others = mx.put_along_axis(logits, targets[..., None], mx.array(-1e9, logits.dtype), axis=-1)
    gap = target_logit - others.max(axis=-1)
    return mx.where(mask > 0, gap, 1e9).min(axis=-1)


def train(model, tokenizer) -> int:
    """Over-fit ``model`` until greedy decoding reproduces every fixed pair.

    Returns the number of Adam steps taken; raises if ``TRAIN_MAX_STEPS`` is
    not enough.
    """
    return train_on_pairs(model, tokenizer, training_pairs(tokenizer), TRAIN_MAX_STEPS)


def greedy_ids(model, tokenizer, prompt: str, max_tokens: int) -> list[int]:
    """Greedy-decode with mlx-lm; include the stop token if one was hit."""
    from mlx_lm.generate import generate_step

    prompt_ids = mx.array(tokenizer.encode(prompt, add_special_tokens=False))
    out = []
    for token, _ in generate_step(
        prompt_ids, model, max_tokens=max_tokens, sampler=lambda x: x.argmax(-1)
    ):
        out.append(int(token))
        if out[-1] in tokenizer.eos_token_ids:
            break
    return out


def greedy_text(model, tokenizer, prompt: str, max_tokens: int) -> str:
    """Greedy-decode and detokenize, keeping special tokens."""
    return tokenizer.decode(greedy_ids(model, tokenizer, prompt, max_tokens))


def reproductions(model, tokenizer, pairs: dict | None = None) -> dict[str, bool]:
    """Check every (prompt, target) pair (default: the fixed ones) against greedy decoding."""
    pairs = training_pairs(tokenizer) if pairs is None else pairs
    result = {}
    for name, (prompt, target) in pairs.items():
        n = len(tokenizer.encode(target, add_special_tokens=False))
        result[name] = greedy_text(model, tokenizer, prompt, n) == target
    return result


def build_tiny_model(out_dir: Path, trained: bool = False, seed: int = 0) -> Path:
    """Write a tiny llama model folder that ``mlx_lm.load`` can open."""
    from mlx_lm.utils import load_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    write_tokenizer(out_dir, tok)
    config = model_config(tok)
    write_json(out_dir / "config.json", config)
    write_json(
        out_dir / "generation_config.json",
        {"eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"]},
    )
    model = make_model(config, seed)
    if trained:
        train(model, load_tokenizer(out_dir))
    save_weights(out_dir, model)
    return out_dir


# --- Any chat template: a tiny model over-fitted to scripted replies (tests/test_tool_formats) ---


def train_on_pairs(model, tokenizer, pairs: dict, max_steps: int = 600) -> int:
    """Over-fit ``model`` until every target token wins by ``TRAIN_MARGIN`` and greedy decoding
    turns every ``pairs`` prompt (name -> (prompt, target)) into its target.

    Returns the number of Adam steps taken; raises if ``max_steps`` is not enough."""
    batch = make_batch(encode_pairs(tokenizer, pairs.values()), tokenizer.pad_token_id)
    inputs, targets, mask = batch
    optimizer = optim.Adam(learning_rate=TRAIN_LEARNING_RATE)

    def loss_fn(m):
        ce = nn.losses.cross_entropy(m(inputs), targets, reduction="none")
        return (ce * mask).sum() / mask.sum()

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    for step in range(1, max_steps + 1):
        _, grads = loss_and_grad(model)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        if step % TRAIN_CHECK_EVERY == 0 and margins(model, *batch).min().item() >= TRAIN_MARGIN:
            if all(reproductions(model, tokenizer, pairs).values()):
                return step
    raise RuntimeError(f"tiny model not trained: {reproductions(model, tokenizer, pairs)}")


def write_chat_tokenizer(
    out_dir: Path, corpus: str, template: str, special: list, eos: list, bos: str | None
) -> Tokenizer:
    """tokenizer.json + tokenizer_config.json (``template`` as chat template) for ``special``
    tokens (the family's markers, each one token) on a BPE trained over ``corpus``."""
    special = list(dict.fromkeys([PAD_TOKEN, *([bos] if bos else []), *eos, *special]))
    tok = byte_bpe(corpus, BPE_VOCAB_SIZE, special)
    tok.save(str(out_dir / "tokenizer.json"))
    write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "added_tokens_decoder": added_tokens_decoder(tok, special, special),
            "bos_token": bos,
            "eos_token": eos[0],
            "pad_token": PAD_TOKEN,
            "unk_token": None,
            "clean_up_tokenization_spaces": False,
            "model_max_length": MODEL_CONFIG["max_position_embeddings"],
            "split_special_tokens": False,
            "chat_template": template,
        },
    )
    return tok


def date_variants(prompt: str) -> list:
    """The prompt, and as it renders tomorrow when its template prints today's date (gpt-oss,
    Mistral Small 3.2: `strftime_now`), so a test that runs across midnight still matches."""
    today, tomorrow = date.today(), date.today() + timedelta(days=1)
    later = prompt
    for fmt in ("%Y-%m-%d", "%d %b %Y", "%d %B %Y"):
        later = later.replace(today.strftime(fmt), tomorrow.strftime(fmt))
    return [prompt] if later == prompt else [prompt, later]


def build_chat_model(
    out_dir: Path,
    template: str,
    special: list,
    eos: list,
    conversations: list,
    bos: str | None = None,
    seed: int = 0,
) -> Path:
    """A tiny llama folder whose tokenizer has ``special`` tokens and ``template``, over-fitted
    so that greedy decoding of each rendered conversation reproduces its scripted reply.

    ``conversations``: (messages, tools, template kwargs, reply ending with an ``eos`` token).
    The BPE is trained on the rendered prompts and replies too, so they stay short."""
    from mlx_lm.utils import load_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_chat_tokenizer(out_dir, CORPUS, template, special, eos, bos)
    wrapper = load_tokenizer(out_dir)  # renders as the server does (mlx-lm's thinking default)
    prompts = [
        wrapper.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs
        )
        for messages, tools, kwargs, _ in conversations
    ]
    replies = [c[3] for c in conversations]
    pairs = [(v, r) for p, r in zip(prompts, replies, strict=True) for v in date_variants(p)]
    corpus = CORPUS + "\n".join(prompts + [v for v, _ in pairs] + replies) + "\n"
    tok = write_chat_tokenizer(out_dir, corpus, template, special, eos, bos)
    eos_ids = [tok.token_to_id(t) for t in eos]
    config = {
        **MODEL_CONFIG,
        "vocab_size": tok.get_vocab_size(),
        "eos_token_id": eos_ids if len(eos_ids) > 1 else eos_ids[0],
        "pad_token_id": tok.token_to_id(PAD_TOKEN),
    }
    write_json(out_dir / "config.json", config)
    write_json(
        out_dir / "generation_config.json",
        {"eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"]},
    )
    tokenizer = load_tokenizer(out_dir, eos_token_ids=eos_ids)
    model = make_model(config, seed)
    train_on_pairs(model, tokenizer, dict(enumerate(pairs)))
    save_weights(out_dir, model)
    return out_dir
