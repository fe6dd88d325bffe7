"""LocalAI `Options` ("key:value" strings) parsed to typed values."""


def parse_value(text: str):
    """Type a value the way LocalAI does: bool, int, float, else string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text.strip())
        except ValueError:
            pass
    return text.strip()


# Keys whose values are paths or names: kept as strings even where they look like a number or
# a bool ("store_path:1", "prompt_cache_dir:true"), so that path code never sees an int.
TEXT_KEYS = frozenset(
    {
        "store_path",
        "prompt_cache_dir",
        "hostfile",
        "coordinator",
        "model_path",
        "name",
        "eos_token",
        "rerank_instruction",
        "pre_tokenizer",
    }
)


def parse_options(entries) -> dict:
    """Split each entry at its first colon; entries without one are skipped."""
    options = {}
    for entry in entries:
        key, sep, value = entry.partition(":")
        if sep and key.strip():
            key = key.strip()
            options[key] = value.strip() if key in TEXT_KEYS else parse_value(value)
    return options


def key_values(pairs) -> dict:
    """CLI `--option key=value` pairs → {key: value} strings (extra_options)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--option expects key=value, got {pair!r}")
        out[key.strip()] = value.strip()
    return out
