"""LocalAI `Options` ("key:value" strings) parsed to typed values."""

import math

from mlxbackend.errors import InvalidInput


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


def number_option(options: dict, key: str, kind=float, low=None, high=None, default=None):
    """options[key] as an int or float within [low, high], else default when absent; a bad value
    is INVALID_ARGUMENT naming the option."""
    if key not in options:
        return default
    try:
        value = kind(options[key])
    except (TypeError, ValueError):
        noun = "an integer" if kind is int else "a number"
        raise InvalidInput(f"option {key}: expected {noun}, got {options[key]!r}") from None
    if not math.isfinite(value) or (low is not None and value < low):
        raise InvalidInput(f"option {key}: {value} is out of range (at least {low})")
    if high is not None and value > high:
        raise InvalidInput(f"option {key}: {value} is out of range (at most {high})")
    return value


def flag_option(options: dict, key: str, default=None):
    """options[key] as a bool (true/false, 1/0, on/off), else default when absent; anything
    else is INVALID_ARGUMENT naming the option."""
    if key not in options:
        return default
    value = options[key]
    if isinstance(value, str):
        value = {"on": True, "off": False, "yes": True, "no": False}.get(value.lower(), value)
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise InvalidInput(f"option {key}: expected true or false, got {value!r}")
