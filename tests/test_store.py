"""VectorStore: set/get/delete/find against a plain numpy reference, persistence, bad input."""

import errno
import os
import random

import mlx.core as mx
import numpy as np
import pytest

from mlxbackend import publish
from mlxbackend import store as store_module
from mlxbackend.errors import (
    BackendError,
    InvalidInput,
    NoSpace,
    NotFound,
    OutOfMemory,
    Precondition,
)
from mlxbackend.store import MAX_TOP_K, VectorStore


class Reference:
    """The semantics in the plainest numpy: a dict from key bytes to (key, value)."""

    def __init__(self):
        self.entries: dict[bytes, tuple[np.ndarray, bytes]] = {}

    def set(self, keys, values):
        for k, v in zip(keys, values, strict=True):
            k = np.asarray(k, np.float32)
            self.entries[k.tobytes()] = (k, v)

    def get(self, keys):
        return [self.entries[np.asarray(k, np.float32).tobytes()][1] for k in keys]

    def delete(self, keys):
        ids = {np.asarray(k, np.float32).tobytes() for k in keys}
        for kid in ids:
            del self.entries[kid]
        return len(ids)

    def similarity(self, keys, query):
        keys = np.asarray(keys, np.float64)
        query = np.asarray(query, np.float64)
        norms = np.linalg.norm(keys, axis=1) * np.linalg.norm(query)
        return keys @ query / np.where(norms > 0, norms, 1)

    def find(self, query, top_k):
        if not self.entries:
            return [], np.zeros(0)
        keys = np.stack([k for k, _ in self.entries.values()])
        values = [v for _, v in self.entries.values()]
        sims = self.similarity(keys, query)
        order = np.argsort(-sims, kind="stable")[:top_k]
        return [values[i] for i in order], sims[order]


def check_find(store, ref, query, top_k):
    """Same similarities (1e-5) and the same entries in the same order, except exact ties."""
    keys, values, sims = store.find(query, top_k)
    want_values, want_sims = ref.find(query, top_k)
    assert sims.dtype == np.float32 and keys.dtype == np.float32
    assert len(values) == len(want_values) == len(keys) == len(sims) == min(top_k, len(ref.entries))
    np.testing.assert_allclose(sims, want_sims, atol=1e-5)
    assert np.all(np.diff(sims) <= 1e-6), "most similar first"
    assert len({k.tobytes() for k in keys}) == len(keys)  # distinct entries
    for key, value, sim in zip(keys, values, sims, strict=True):
        assert ref.entries[key.tobytes()][1] == value  # the returned key holds the returned value
        assert abs(ref.similarity(key[None], query)[0] - sim) < 1e-5  # and has that similarity
    tied = np.abs(np.diff(want_sims)) < 1e-5
    for i, want in enumerate(want_values):
        if not (i > 0 and tied[i - 1]) and not (i < len(tied) and tied[i]):
            assert values[i] == want


def check_contents(store, ref):
    assert len(store) == len(ref.entries)
    if ref.entries:
        keys = [k for k, _ in ref.entries.values()]
        got_keys, got_values = store.get(keys)
        np.testing.assert_array_equal(got_keys, np.stack(keys))
        assert got_values == [v for _, v in ref.entries.values()]


@pytest.mark.parametrize("seed", range(4))
def test_random_operations_match_reference(seed):
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    dim = 8
    pool = rng.normal(size=(60, dim)).astype(np.float32)  # keys repeat, so upserts and deletes hit
    store, ref = VectorStore(), Reference()
    for step in range(120):
        op = pick.choice(["set", "set", "delete", "get", "find", "find"])
        if op == "set":
            rows = [pick.randrange(len(pool)) for _ in range(pick.randint(1, 12))]
            keys = pool[rows] if pick.random() < 0.5 else pool[rows].tolist()
            values = [f"v{step}-{i}".encode() * pick.randint(0, 3) for i in range(len(rows))]
            store.set(keys, values)
            ref.set(pool[rows], values)
        elif op == "delete" and ref.entries:
            stored = [k for k, _ in ref.entries.values()]
            keys = pick.sample(stored, pick.randint(1, min(5, len(stored))))
            keys += keys[:1]  # a key named twice is removed once
            if pick.random() < 0.3:
                unknown = rng.normal(size=dim).astype(np.float32)
                with pytest.raises(NotFound, match="1 of the"):
                    store.delete([*keys, unknown])
            else:
                assert store.delete(keys) == ref.delete(keys)
        elif op == "get" and ref.entries:
            stored = [k for k, _ in ref.entries.values()]
            keys = [pick.choice(stored) for _ in range(pick.randint(1, 6))]
            got_keys, got_values = store.get(keys)
            np.testing.assert_array_equal(got_keys, np.stack(keys))
            assert got_values == ref.get(keys)
        else:
            query = rng.normal(size=dim).astype(np.float32)
            check_find(store, ref, query, pick.randint(1, len(ref.entries) + 5))
        check_contents(store, ref)


def test_many_keys_find_matches_reference():
    rng = np.random.default_rng(7)
    keys = rng.normal(size=(3000, 64)).astype(np.float32)
    store, ref = VectorStore(), Reference()
    values = [i.to_bytes(4, "little") for i in range(len(keys))]
    store.set(keys, values)
    ref.set(keys, values)
    for _ in range(5):
        check_find(store, ref, rng.normal(size=64).astype(np.float32), 25)
    check_find(store, ref, keys[123], 1)
    _, values_found, sims = store.find(keys[123], 1)
    assert values_found == [values[123]] and abs(sims[0] - 1) < 1e-6


def test_upsert_replaces_value():
    store = VectorStore()
    store.set([[1.0, 2.0], [3.0, 4.0]], [b"a", b"b"])
    store.set([[1.0, 2.0]], [b"A"])
    assert len(store) == 2
    assert store.get([[1.0, 2.0], [3.0, 4.0]])[1] == [b"A", b"b"]


def test_duplicate_keys_in_one_set_last_wins():
    store = VectorStore()
    store.set([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], [b"first", b"other", b"last"])
    assert len(store) == 2
    assert store.get([[1.0, 0.0]])[1] == [b"last"]


def test_get_returns_request_order_and_exact_match():
    store = VectorStore()
    store.set(np.eye(3, dtype=np.float32), [b"x", b"y", b"z"])
    keys, values = store.get([[0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    assert values == [b"z", b"x", b"y", b"z"]
    np.testing.assert_array_equal(keys, np.eye(3, dtype=np.float32)[[2, 0, 1, 2]])
    with pytest.raises(NotFound):
        store.get([[0, 0, 1.0000001]])  # exact float32 match only


def test_delete_then_find_skips_deleted():
    store = VectorStore()
    keys = np.eye(4, dtype=np.float32)
    store.set(keys, [b"0", b"1", b"2", b"3"])
    assert store.delete([keys[0], keys[2]]) == 2
    _, values, _ = store.find(keys[0] + 0.1 * keys[1], 10)
    assert sorted(values) == [b"1", b"3"] and values[0] == b"1"
    with pytest.raises(NotFound):
        store.get([keys[0]])
    store.set([keys[0]], [b"again"])  # a deleted key can be set again
    assert store.find(keys[0], 1)[1] == [b"again"]


def test_delete_everything_keeps_dimension():
    store = VectorStore()
    store.set([[1.0, 2.0, 3.0]], [b"a"])
    assert store.delete([[1.0, 2.0, 3.0]]) == 1
    assert len(store) == 0 and store.dim == 3
    keys, values, sims = store.find([1.0, 0.0, 0.0], 5)
    assert keys.shape == (0, 3) and values == [] and sims.shape == (0,)
    with pytest.raises(InvalidInput, match="2 dimensions but this store holds 3-dimensional"):
        store.set([[1.0, 2.0]], [b"b"])


def test_find_top_k_clamped_to_size():
    store = VectorStore()
    store.set([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [b"a", b"b", b"c"])
    keys, values, sims = store.find([1.0, 0.2], MAX_TOP_K)
    assert values == [b"a", b"c", b"b"] and keys.shape == (3, 2) and sims.shape == (3,)


def test_find_on_empty_store():
    store = VectorStore()
    assert store.dim is None and len(store) == 0
    keys, values, sims = store.find([0.5, 0.5], 3)
    assert keys.shape == (0, 2) and values == [] and sims.shape == (0,)


def test_zero_key_stored_scores_zero():
    store = VectorStore()
    store.set([[0.0, 0.0], [1.0, 0.0]], [b"zero", b"x"])
    _, values, sims = store.find([1.0, 0.0], 2)
    assert values == [b"x", b"zero"] and sims[1] == 0


def test_extreme_magnitudes_normalise():
    store = VectorStore()
    store.set([[3e38, 3e38], [1e-38, 0.0]], [b"huge", b"tiny"])
    _, values, sims = store.find([1.0, 1.0], 2)
    assert values == [b"huge", b"tiny"]
    np.testing.assert_allclose(sims, [1.0, np.sqrt(0.5)], atol=1e-6)


# persistence


def test_reopen_has_same_contents_and_finds(tmp_path):
    path = tmp_path / "store.safetensors"
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(50, 16)).astype(np.float32)
    store = VectorStore.open(path)
    assert len(store) == 0 and not path.exists()
    store.set(keys, [f"value {i}".encode() * (i % 3) for i in range(50)])
    store.delete(keys[:10:2])
    store.set(keys[:2], [b"", b"replaced"])
    assert os.listdir(tmp_path) == ["store.safetensors"]  # no temp file left
    again = VectorStore.open(path)
    assert len(again) == len(store) == 46 and again.dim == 16
    np.testing.assert_array_equal(again.keys, store.keys)
    assert again.values == store.values
    for query in rng.normal(size=(3, 16)).astype(np.float32):
        a, b = store.find(query, 7), again.find(query, 7)
        np.testing.assert_array_equal(a[0], b[0])
        assert a[1] == b[1]
        np.testing.assert_array_equal(a[2], b[2])


def test_file_format(tmp_path):
    path = tmp_path / "s.safetensors"
    store = VectorStore.open(path)
    store.set([[1.0, 2.0], [3.0, 4.0]], [b"ab", b"cde"])
    arrays, metadata = mx.load(str(path), return_metadata=True)
    assert metadata == {"format": "mlxbackend-vector-store", "format_version": "1"}
    assert arrays["keys"].dtype == mx.float32 and arrays["keys"].shape == (2, 2)
    assert bytes(np.array(arrays["values"])) == b"abcde"
    assert np.array(arrays["offsets"]).tolist() == [0, 2, 5]


def test_empty_store_saves_and_reopens(tmp_path):
    path = tmp_path / "sub" / "empty.safetensors"
    VectorStore.open(path).save()
    store = VectorStore.open(path)
    assert len(store) == 0 and store.dim is None
    store.set([[1.0]], [b"x"])
    assert VectorStore.open(path).get([[1.0]])[1] == [b"x"]


def test_save_memory_only_store():
    with pytest.raises(Precondition, match="memory-only"):
        VectorStore.open(None).save()


def saved_store(tmp_path):
    path = tmp_path / "store.safetensors"
    store = VectorStore.open(path)
    store.set([[1.0, 0.0], [0.0, 1.0]], [b"a", b"b"])
    return path, store


def assert_unchanged(path, store):
    """The store in memory and the file under its final name still hold the first two entries."""
    for s in (store, VectorStore.open(path)):
        assert len(s) == 2
        assert s.get([[1.0, 0.0], [0.0, 1.0]])[1] == [b"a", b"b"]
        assert s.find([1.0, 0.1], 5)[1] == [b"a", b"b"]
    assert os.listdir(path.parent) == [path.name]


def test_failed_rename_leaves_previous_file(tmp_path, monkeypatch):
    path, store = saved_store(tmp_path)

    written = []

    def crash(src, dst):
        written.append(os.path.basename(src))
        raise OSError(errno.EIO, "simulated crash before rename")

    monkeypatch.setattr(publish.os, "replace", crash)  # publish.atomic_file's rename
    with pytest.raises(BackendError, match="store is unchanged"):
        store.set([[1.0, 1.0]], [b"c"])
    with pytest.raises(BackendError, match="store is unchanged"):
        store.delete([[1.0, 0.0]])
    assert [name.rsplit("-", 1)[0] for name in written] == [
        f".store.safetensors.tmp-{os.getpid()}"
    ] * 2
    monkeypatch.undo()
    assert_unchanged(path, store)


def test_write_failing_midway_leaves_previous_file(tmp_path, monkeypatch):
    path, store = saved_store(tmp_path)
    real_save = mx.save_safetensors

    def half_write(file, arrays, metadata=None):
        real_save(file, arrays, metadata=metadata)
        file.truncate(file.tell() // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module.mx, "save_safetensors", half_write)
    with pytest.raises(NoSpace, match="free disk space"):
        store.set([[1.0, 1.0]], [b"c"])
    monkeypatch.undo()
    assert_unchanged(path, store)


def test_write_to_unwritable_place_is_reported(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    store = VectorStore.open(tmp_path / "file" / "store.safetensors")
    with pytest.raises(BackendError, match="could not write the vector store"):
        store.set([[1.0]], [b"x"])
    assert len(store) == 0


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: b"this is not a safetensors file at all",
        lambda data: data[: len(data) // 2],
        lambda data: b"",
    ],
)
def test_corrupt_file_is_refused(tmp_path, damage):
    path, _ = saved_store(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(InvalidInput, match=f"cannot read the vector store file {path}"):
        VectorStore.open(path)


def test_foreign_or_newer_file_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    mx.save_safetensors(str(path), {"weight": mx.zeros((2, 2))})
    with pytest.raises(InvalidInput, match="not a vector store file"):
        VectorStore.open(path)
    mx.save_safetensors(
        str(path),
        {"keys": mx.zeros((0, 0))},
        metadata={"format": "mlxbackend-vector-store", "format_version": "9"},
    )
    with pytest.raises(InvalidInput, match="format version '9'"):
        VectorStore.open(path)


def test_inconsistent_file_is_refused(tmp_path):
    path = tmp_path / "s.safetensors"
    meta = {"format": "mlxbackend-vector-store", "format_version": "1"}
    keys = mx.array([[1.0, 2.0], [1.0, 2.0]])
    values = mx.array(np.frombuffer(b"ab", np.uint8))
    mx.save_safetensors(
        str(path), {"keys": keys, "values": values, "offsets": mx.array([0, 1, 5])}, meta
    )
    with pytest.raises(InvalidInput, match="offsets"):
        VectorStore.open(path)
    mx.save_safetensors(
        str(path), {"keys": keys, "values": values, "offsets": mx.array([0, 1, 2])}, meta
    )
    with pytest.raises(InvalidInput, match="same key is stored twice"):
        VectorStore.open(path)
    with pytest.raises(InvalidInput, match="is not a file"):
        VectorStore.open(tmp_path)


# bad input


@pytest.fixture()
def store3():
    store = VectorStore()
    store.set([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [b"a", b"b"])
    return store


@pytest.mark.parametrize(
    ("keys", "values", "match"),
    [
        ([], [], "no keys given"),
        ([[1.0, 2.0, 3.0]], [b"a", b"b"], "1 keys but 2 values"),
        ([[]], [b"a"], "0 dimensions"),
        ([[1.0, 2.0]], [b"a"], "key has 2 dimensions but this store holds 3-dimensional keys"),
        (
            [[1.0, 2.0, 3.0], [1.0, 2.0]],
            [b"a", b"b"],
            "same dimensions: key 0 has 3 but key 1 has 2",
        ),
        ([[1.0, float("nan"), 3.0]], [b"a"], "NaN or infinity"),
        (
            [[1.0, 2.0, 3.0], [1.0, float("inf"), 3.0]],
            [b"a", b"b"],
            "key 1 contains NaN or infinity",
        ),
        ([[1.0, 2.0, 1e39]], [b"a"], "NaN or infinity"),  # overflows float32
        ([[1.0, "x", 3.0]], [b"a"], "lists of floats"),
        ([1.0, 2.0, 3.0], [b"a"], "each key must be a list of floats"),
        (np.ones(3, np.float32), [b"a"], "2-D array"),
        ([[1.0, 2.0, 5.0]], ["text"], "value 0 is str: values must be bytes"),
    ],
)
def test_bad_set(store3, keys, values, match):
    with pytest.raises(InvalidInput, match=match):
        store3.set(keys, values)
    assert len(store3) == 2


@pytest.mark.parametrize(
    ("key", "top_k", "error", "match"),
    [
        ([0.0, 0.0, 0.0], 1, InvalidInput, "all zeros"),
        ([], 1, InvalidInput, "0 dimensions"),
        (
            [1.0, 2.0],
            1,
            InvalidInput,
            "key has 2 dimensions but this store holds 3-dimensional keys",
        ),
        ([1.0, float("nan"), 0.0], 1, InvalidInput, "NaN or infinity"),
        ([1.0, 2.0, 3.0], 0, InvalidInput, "top_k must be at least 1, got 0"),
        ([1.0, 2.0, 3.0], -3, InvalidInput, "at least 1"),
        ([1.0, 2.0, 3.0], MAX_TOP_K + 1, InvalidInput, "above the limit of 10000"),
        ([1.0, 2.0, 3.0], 2.5, InvalidInput, "top_k must be an integer"),
        (np.ones((1, 3), np.float32), 1, InvalidInput, "flat list"),
        ([[1.0, 2.0, 3.0]], 1, InvalidInput, "flat list"),
    ],
)
def test_bad_find(store3, key, top_k, error, match):
    with pytest.raises(error, match=match):
        store3.find(key, top_k)


def test_top_k_checked_on_empty_store():
    with pytest.raises(InvalidInput, match="above the limit"):
        VectorStore().find([1.0], MAX_TOP_K + 1)


def test_unknown_keys(store3):
    with pytest.raises(
        NotFound, match="2 of the 3 keys are not in this store.*nothing was returned"
    ):
        store3.get([[1.0, 2.0, 3.0], [9.0, 9.0, 9.0], [8.0, 8.0, 8.0]])
    with pytest.raises(
        NotFound, match="1 of the 2 keys are not in this store.*nothing was deleted"
    ):
        store3.delete([[1.0, 2.0, 3.0], [9.0, 9.0, 9.0]])
    assert len(store3) == 2  # all or nothing
    with pytest.raises(InvalidInput, match="no keys given"):
        store3.delete([])
    with pytest.raises(InvalidInput, match="no keys given"):
        store3.get([])
    with pytest.raises(NotFound):
        VectorStore().get([[1.0]])


def test_reply_over_message_limit(store3, monkeypatch):
    big = VectorStore()
    big.set([[1.0], [-1.0]], [b"x" * (30 << 20), b"y" * (30 << 20)])
    with pytest.raises(OutOfMemory, match="lower TopK"):
        big.find([1.0], 2)
    assert big.find([1.0], 1)[1][0][:1] == b"x"
    with pytest.raises(OutOfMemory, match="get fewer keys"):
        big.get([[1.0], [-1.0]])
    monkeypatch.setattr(store_module, "MAX_REPLY_BYTES", 3 * 4 + 16 + 1)  # one entry fits
    assert store3.find([1.0, 2.0, 3.0], 1)[1] == [b"a"]
    with pytest.raises(OutOfMemory, match="over the 0 MiB gRPC message limit: lower TopK"):
        store3.find([1.0, 2.0, 3.0], 2)
