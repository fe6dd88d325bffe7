"""The short soak: scripts/soak.py's mixed load (~120 requests at concurrency 8) on real SmolLM2 and a
tiny encoder, each in a backend process started as LocalAI does. `make soak` runs the long one."""

import importlib.util
import json

import pytest

from tests.conftest import ROOT

MiB = 2**20


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", ROOT / "scripts" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prefix_cache_entry_does_not_pin_its_batch():
    """An entry taken out of a continuous batch owns its memory once stored: before, the lazy
    slice `BatchKVCache.extract` returns kept the whole batch's KV buffer alive (4x here)."""
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache

    from mlxbackend.text import prefix_cache
    from mlxbackend.text.models import TextModel

    tm = TextModel(model=None, tokenizer=None, config={}, path=ROOT, context_size=4096)
    batch = BatchKVCache([0, 3, 0, 1])
    keys = mx.ones((4, 3, 1000, 64))
    batch.update_and_fetch(keys, keys)
    mx.eval(batch.keys, batch.values)
    del keys
    before = mx.get_active_memory()
    prefix_cache.store(tm, list(range(997)), [batch.extract(1)])
    del batch
    mx.clear_cache()
    held = before - mx.get_active_memory()  # what dropping the batch gave back
    entry = tm.prompt_cache.nbytes
    assert entry == 2 * 3 * 997 * 64 * 4
    assert held >= 2 * 4 * 3 * 1024 * 64 * 4 - entry - 4096, (
        held,
        entry,
    )  # all but the entry freed


@pytest.fixture(scope="module")
def report(smollm2_dir, tmp_path_factory):
    soak = load_soak()
    out = tmp_path_factory.mktemp("soak") / "soak.json"
    code = soak.main([
        "--requests", "120", "--concurrency", "8", "--seed", "7", "--max-tokens", "16",
        "--warmup", "90", "--every", "30", "--time-limit", "600", "--json", str(out),
        "--models", str(smollm2_dir.parent),
    ])  # fmt: skip
    level = json.loads(out.read_text())["levels"][0]
    return code, level


def test_no_unexpected_errors_every_kind_sent(report):
    code, level = report
    assert level["unexpected_errors"] == [], level["unexpected_errors"]
    assert level["requests"] == 120
    soak = load_soak()
    assert set(level["kinds"]) == set(soak.MIX), level["kinds"]  # the seed covers every kind
    assert level["outcomes"].get("cancelled", 0) > 0  # streams were cancelled mid-way
    assert code == 0, level["failures"]


def test_status_clean_after_the_load(report):
    _, level = report
    end = level["status_end"]
    for key in ("requests_in_flight", "kv_reserved", "batch_slots", "kv_cache"):
        assert end[key] == 0, (key, end)
    assert 0 < end["prompt_cache_entries"] <= end["prompt_cache_max_entries"]
    assert end["prompt_cache"] <= end["prompt_cache_budget"]
    assert end["mlx_cache"] <= end["mlx_cache_limit"]


def test_memory_accounted_and_flat(report):
    """MLX memory beyond the weights and the prefix cache stays small: before the prefix cache
    materialized the entries it took from a batch, each pinned the whole batch's KV buffer and
    `other` reached ~2.6 GB against 0.5 GB of weights."""
    _, level = report
    end = level["status_end"]
    assert end["other"] < 128 * MiB, end
    late = [c["rss"] for c in level["curve"] if c["requests"] >= 90]  # after the budgets filled
    assert len(late) >= 2
    growth = 100 * (late[-1] - late[0]) / late[0]
    assert growth < 5, [c["rss"] // MiB for c in level["curve"]]
