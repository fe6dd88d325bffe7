"""Warm prompts: texts named in Options, prefilled into the prefix cache at LoadModel, so that the
first request sharing one (an agent's system prompt and tools, a long document) starts from its
KV instead of computing it.

Options `warm_prompt` or `warm_prompt.<name>` (any number): a file (absolute, or relative to
ModelPath) or the text itself. A `.json` file holds {"messages": [...], "tools": [...]}: it is
rendered with the model's chat template without a generation prompt, which makes it a prefix of
the prompts of chats that begin with those messages and tools. Any other file, or a text, is
used as it is (it must then be the start of the rendered prompts to be reused)."""

import json
from dataclasses import dataclass
from pathlib import Path

from mlxbackend.errors import InvalidInput
from mlxbackend.text.models import TextModel
from mlxbackend.worker import pause

PATH_LIKE = (".txt", ".json", ".md", ".jinja")


@dataclass
class Warmed:
    prompts: int = 0
    tokens: int = 0


def warm_sources(options: dict, model_path: str = "") -> list:
    """(name, text or (messages, tools)) of each warm prompt the Options name, checked."""
    out = []
    for key in sorted(k for k in options if k == "warm_prompt" or k.startswith("warm_prompt.")):
        value = str(options[key])
        path = Path(value)
        if not path.is_absolute() and model_path:
            path = Path(model_path) / value
        looks_like_path = value.endswith(PATH_LIKE) or "/" in value
        if looks_like_path and not path.is_file():
            raise InvalidInput(f"Options {key}: file {value} not found")
        if not looks_like_path:
            out.append((key, value))
            continue
        text = path.read_text()
        if path.suffix == ".json":
            try:
                data = json.loads(text)
                messages, tools = data["messages"], data.get("tools")
            except (ValueError, KeyError, TypeError) as exc:
                raise InvalidInput(
                    f'Options {key}: {value} must be JSON {{"messages": [...], "tools": [...]}}: '
                    f"{exc}"
                ) from None
            out.append((key, (messages, tools)))
        else:
            out.append((key, text))
    return out


def tokens_of(tm: TextModel, source) -> list:
    """The token ids a warm prompt stands for."""
    if isinstance(source, str):
        return tm.tokenizer.encode(source, add_special_tokens=False)
    messages, tools = source
    try:
        rendered = tm.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=False, tokenize=False
        )
    except Exception as exc:  # noqa: BLE001 — the template's own error, whatever it is
        raise InvalidInput(f"warm prompt: the chat template failed on it: {exc}") from None
    return tm.tokenizer.encode(rendered, add_special_tokens=False)


def prefill_all(tm: TextModel, sources: list) -> Warmed:
    """Worker thread: prefill each warm prompt in chunks (pausing between them) and keep its KV
    in the prefix cache."""

    from mlxbackend.text import prefix_cache
    from mlxbackend.text.generate import prefill, prefill_chunk
    from mlxbackend.text.kv_quant import make_cache

    done = Warmed()
    if prefix_cache.cache_for(tm) is None:
        if sources:
            raise InvalidInput("warm prompts need the prefix cache (Options prompt_cache:false)")
        return done
    chunk = prefill_chunk(tm)
    for name, source in sources:
        tokens = tokens_of(tm, source)
        if not tokens:
            raise InvalidInput(f"Options {name}: the warm prompt is empty")
        if len(tokens) >= tm.context_size or (tm.max_kv_size and len(tokens) > tm.max_kv_size):
            raise InvalidInput(
                f"Options {name}: the warm prompt is {len(tokens)} tokens, which does not fit "
                f"the context ({tm.context_size}) or max_kv_size"
            )
        hit = prefix_cache.fetch(tm, tokens)  # after a restart: the SSD tier's blocks
        cache = hit.cache or make_cache(tm.model, tm.kv, tm.max_kv_size)
        prefill(tm.model, cache, tokens[len(hit.cached) :], chunk, pause)
        prefix_cache.store(tm, tokens, cache)
        done.prompts += 1
        done.tokens += len(tokens)
    return done
