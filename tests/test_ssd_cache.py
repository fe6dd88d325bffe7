"""The prefix cache's SSD tier (Options prompt_cache_dir, text/ssd_cache.py): blocks written as
requests finish, reused after `kill -9` with the same output as a cold prefill, a shared prefix
stored once, bounded in bytes with LRU eviction, and an unwritable directory reported while
serving goes on."""

import copy
import time
from pathlib import Path

import grpc
import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache

from mlxbackend.proto import backend_pb2 as pb
from mlxbackend.text import ssd_cache
from mlxbackend.text.kv_quant import KvType, QuantKVCache
from tests.conftest import Server
from tests.publish_checks import litter

BLOCK = 16
SYSTEM = "You are a helpful assistant who answers in short sentences. " * 6


def request(*turns: str, tokens: int = 24) -> pb.PredictOptions:
    roles = ["system"] + ["user", "assistant"] * len(turns)
    return pb.PredictOptions(
        Messages=[
            pb.Message(role=r, content=c) for r, c in zip(roles, (SYSTEM, *turns), strict=False)
        ],
        UseTokenizerTemplate=True,
        Tokens=tokens,
        Temperature=0,
        Metadata={"enable_thinking": "false"},
    )


def status(stub) -> dict:
    return dict(stub.Status(pb.HealthMessage()).memory.breakdown)


def settled(stub, timeout: float = 60) -> dict:
    """Status once the writer has no block queued."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = status(stub)
        if s.get("prompt_cache_ssd_queued", 0) == 0:
            return s
        time.sleep(0.05)
    raise AssertionError(f"blocks still queued after {timeout} s: {s}")


def load(srv: Server, model: Path, *options: str) -> str:
    reply = srv.stub.LoadModel(pb.ModelOptions(Model=str(model), Options=list(options)))
    assert reply.success, reply.message
    return reply.message


def test_blocks_survive_kill9_and_give_the_cold_output(trained_dir, tmp_path):
    kv = tmp_path / "kv"
    options = (f"prompt_cache_dir:{kv}", f"prompt_cache_block:{BLOCK}")
    first = Server()
    try:
        assert "SSD prompt cache 0 blocks" in load(first, trained_dir, *options)
        turn1 = first.stub.Predict(request("What is the capital of France?"))
        written = settled(first.stub)
        # prompt and reply tokens, in whole blocks and a tail, written as the request finished
        blocks = written["prompt_cache_ssd_blocks"]
        assert turn1.prompt_tokens // BLOCK <= blocks <= (turn1.prompt_tokens + 23) // BLOCK + 1
        assert written["prompt_cache_ssd_bytes"] == sum(
            p.stat().st_size for p in (kv / "blocks").glob("*.safetensors")
        )
        first.proc.kill()  # no Free, no SIGTERM: only what was written as it went
        first.proc.wait(30)
    finally:
        first.stop()
    turn2 = request("What is the capital of France?", turn1.message.decode(), "And of Spain?")
    second, cold = Server(), Server()
    try:
        message = load(second, trained_dir, *options)
        assert f"SSD prompt cache {written['prompt_cache_ssd_blocks']} blocks" in message
        warm_reply = second.stub.Predict(turn2)
        load(cold, trained_dir, "prompt_cache:false")
        cold_reply = cold.stub.Predict(turn2)
        assert warm_reply.message == cold_reply.message
        s = status(second.stub)
        assert s["prompt_tokens_from_ssd"] >= turn1.prompt_tokens - BLOCK
        computed = second.stub.GetMetrics(pb.MetricsRequest()).prompt_tokens_processed
        assert computed == warm_reply.prompt_tokens - s["prompt_tokens_from_ssd"]
        assert computed < warm_reply.prompt_tokens - turn1.prompt_tokens + 2 * BLOCK
        assert not litter(kv)
    finally:
        second.stop()
        cold.stop()


def test_lru_bound_in_bytes(trained_dir, tmp_path):
    kv = tmp_path / "kv"
    srv = Server()
    try:
        load(srv, trained_dir, f"prompt_cache_dir:{kv}", f"prompt_cache_block:{BLOCK}")
        srv.stub.Predict(request("Name a colour."))
        one = settled(srv.stub)
        block_bytes = one["prompt_cache_ssd_bytes"] // one["prompt_cache_ssd_blocks"]
        budget = 6 * block_bytes
        srv.stub.Free(pb.HealthMessage())
        load(
            srv,
            trained_dir,
            f"prompt_cache_dir:{kv}",
            f"prompt_cache_block:{BLOCK}",
            f"prompt_cache_disk_bytes:{budget}",
        )
        for i in range(4):
            srv.stub.Predict(request(f"Conversation {i}: name a city on a river."))
        s = settled(srv.stub)
        on_disk = list((kv / "blocks").glob("*.safetensors"))
        assert 0 < s["prompt_cache_ssd_bytes"] <= budget and s["prompt_cache_ssd_evictions"] > 0
        assert len(on_disk) == s["prompt_cache_ssd_blocks"]
        assert sum(p.stat().st_size for p in on_disk) == s["prompt_cache_ssd_bytes"]
    finally:
        srv.stop()


def test_an_unwritable_directory_turns_the_tier_off(trained_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    srv = Server()
    try:
        message = load(srv, trained_dir, f"prompt_cache_dir:{blocker / 'kv'}")
        assert "SSD prompt cache off: cannot write" in message
        assert srv.stub.Predict(request("Say hello.")).message
        s = status(srv.stub)
        assert s["prompt_cache_ssd_off.unwritable"] == 1 and s["prompt_cache_ssd_blocks"] == 0
        assert "SSD prompt cache off" in srv.output()
    finally:
        srv.stop()


@pytest.mark.parametrize("option", ["prompt_cache_block:0", "prompt_cache_disk_bytes:lots"])
def test_bad_tier_options_are_invalid_argument(trained_dir, tmp_path, server, option):
    with pytest.raises(grpc.RpcError) as err:
        server.stub.LoadModel(
            pb.ModelOptions(
                Model=str(trained_dir), Options=[f"prompt_cache_dir:{tmp_path}", option]
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert option.split(":")[0] in err.value.details()
    assert server.healthy()


# -- the module on caches built here ----------------------------------------------------------


def filled(cache_type, tokens: int) -> list:
    """Two layers of KV holding `tokens` positions of random keys and values."""
    layers = [cache_type() for _ in range(2)]
    for layer in layers:
        layer.update_and_fetch(
            mx.random.normal((1, 2, tokens, 64)), mx.random.normal((1, 2, tokens, 64))
        )
    return layers


@pytest.mark.parametrize(
    "cache_type", [KVCache, lambda: QuantKVCache(KvType(8, 4, 64))], ids=["float", "q8-q4"]
)
def test_a_shared_prefix_is_stored_once(tmp_path, cache_type):
    tier = ssd_cache.open_tier(tmp_path, {"prompt_cache_block": BLOCK})
    shared = list(range(3 * BLOCK))
    a, b = shared + [1] * (2 * BLOCK), shared + [2] * (2 * BLOCK)
    cache_a = filled(cache_type, len(a))
    assert ssd_cache.save(tier, "root", a, cache_a) == 5
    ssd_cache.flush(tier)
    assert ssd_cache.save(tier, "root", b, filled(cache_type, len(b))) == 2  # only its own
    ssd_cache.flush(tier)
    assert tier.writes == 7 and len(list((tmp_path / "blocks").iterdir())) == 7
    assert ssd_cache.lookup(tier, "other model", a, len(a)).tokens == 0
    stored = ssd_cache.lookup(tier, "root", a + [9], len(a))
    assert len(stored.names) == 5 and not stored.tail
    back = [cache_type() for _ in range(2)]
    assert ssd_cache.load(tier, stored, back) == len(a)
    assert_holds(back, cache_a, len(a))


@pytest.mark.parametrize(
    "cache_type", [KVCache, lambda: QuantKVCache(KvType(8, 4, 64))], ids=["float", "q8-q4"]
)
def test_a_tail_and_blocks_after_ram(tmp_path, cache_type):
    """A sequence's last partial block is stored as a tail: a prompt extending the sequence gets
    every token of it back, one that parts inside the tail the tail's tokens up to there. With
    the first block in RAM only the files after it are read. After a restart the tail's tokens
    come from its metadata."""
    from mlx_lm.models.cache import trim_prompt_cache

    tier = ssd_cache.open_tier(tmp_path, {"prompt_cache_block": BLOCK})
    seq = list(range(3 * BLOCK + 5))
    cache = filled(cache_type, len(seq))
    assert ssd_cache.save(tier, "root", seq, cache) == 4  # three blocks and the tail
    ssd_cache.flush(tier)
    stored = ssd_cache.lookup(tier, "root", seq + [7, 8], len(seq) + 1)
    assert (len(stored.names), stored.tail_tokens, stored.tokens) == (3, 5, len(seq))
    back = [cache_type() for _ in range(2)]
    assert ssd_cache.load(tier, stored, back) == len(seq)
    assert_holds(back, cache, len(seq))
    parted = seq[:-2] + [999, 7]
    assert ssd_cache.lookup(tier, "root", parted, len(parted)).tokens == len(seq) - 2
    assert ssd_cache.lookup(tier, "root", seq, len(seq) - 1).tokens == len(seq) - 1  # limit
    assert ssd_cache.lookup(tier, "other", seq + [7], len(seq)).tokens == 0
    torn = tier.folder / f"{stored.names[-1]}-{'0' * 40}{ssd_cache.SUFFIX}"
    torn.write_bytes(b"not safetensors")  # a damaged tail under the same block: never matches
    again = ssd_cache.open_tier(tmp_path, {"prompt_cache_block": BLOCK})  # a new process
    partly = ssd_cache.lookup(again, "root", parted, len(parted))
    assert (len(partly.names), partly.tail_tokens) == (3, 3)
    back = [cache_type() for _ in range(2)]
    assert ssd_cache.load(again, partly, back) == len(seq) - 2
    assert_holds(back, cache, len(seq) - 2)
    # the first block from RAM (a trimmed copy of the cache), the rest from disk
    ram = copy.deepcopy(cache)  # as mlx-lm's LRUPromptCache hands out an entry
    trim_prompt_cache(ram, len(seq) - BLOCK)
    (tier.folder / (stored.names[0] + ssd_cache.SUFFIX)).unlink()  # not read
    assert ssd_cache.load(tier, stored, ram, start=BLOCK) == len(seq)
    assert_holds(ram, cache, len(seq))
    assert ssd_cache.load(tier, stored, [cache_type() for _ in range(2)]) == 0


def assert_holds(got: list, want: list, n: int) -> None:
    """Each layer of `got` holds exactly `want`'s first n positions."""
    for g, w in zip(got, want, strict=True):
        assert g.offset == n
        for u, v in zip(positions(g, n), positions(w, n), strict=True):
            assert mx.array_equal(u, v)


def positions(layer, n: int) -> list:
    """A layer's stored arrays for its first n positions."""
    if isinstance(layer, QuantKVCache):
        keys, values = layer._upto(n)
        return [*keys, *values]
    return [layer.keys[..., :n, :], layer.values[..., :n, :]]
