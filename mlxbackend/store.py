"""A vector store for LocalAI's Stores RPCs: float32 keys, bytes values, exact cosine top-k in MLX.

Keys all have one dimension per store (fixed by the first Set, kept after the store empties).
`set` upserts, `get`/`delete` match keys exactly (bitwise float32 equality), `find` returns the
`top_k` entries most similar to a key by cosine similarity, most similar first.

A store opened with a path is written after every successful `set`/`delete`, atomically
(`publish.atomic_file`: a temp file beside it, fsync, `os.replace` onto the final name). If the
write fails (a full disk: NoSpace, RESOURCE_EXHAUSTED) the call raises and the store (in memory
and on disk) is left as it was.

File format (one `.safetensors` file, written with `mx.save_safetensors`, read without pickle):
  keys     float32 [N, D]  the raw keys, as sent ([0, 0] for a store that never had a key)
  values   uint8   [B]     every value's bytes, concatenated in row order
  offsets  int64   [N + 1] value i is values[offsets[i]:offsets[i + 1]]
  metadata {"format": "mlxbackend-vector-store", "format_version": "1"}

Not thread-safe: the servicer calls it from one worker thread.
"""

import errno
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxbackend import publish
from mlxbackend.errors import (
    BackendError,
    InvalidInput,
    NoSpace,
    NotFound,
    OutOfMemory,
    Precondition,
)

FORMAT_NAME = "mlxbackend-vector-store"
FORMAT_VERSION = "1"
MAX_TOP_K = 10_000
MAX_REPLY_BYTES = 50 * 1024 * 1024  # LocalAI's gRPC message limit
ENTRY_OVERHEAD_BYTES = 16  # protobuf framing per returned entry, roughly


def key_ids(keys: np.ndarray) -> list[bytes]:
    """The bytes of each float32 row: the exact-match identity of a key."""
    buf = np.ascontiguousarray(keys, dtype=np.float32).tobytes()
    step = keys.shape[1] * 4
    if not buf:
        return []
    return [buf[i : i + step] for i in range(0, len(buf), step)]


def unit_rows(keys: np.ndarray) -> mx.array:
    """Rows scaled to unit length in MLX (all-zero rows stay zero, so they score 0 in `find`).

    Rows are first divided by their largest magnitude so squaring cannot overflow float32.
    """
    if keys.size == 0:
        return mx.zeros(keys.shape, mx.float32)
    rows = mx.array(keys, dtype=mx.float32)
    peak = mx.max(mx.abs(rows), axis=1, keepdims=True)
    rows = rows / mx.where(peak > 0, peak, 1)
    norm = mx.sqrt(mx.sum(rows * rows, axis=1, keepdims=True))
    return rows / mx.where(norm > 0, norm, 1)


def reply_bytes(dim: int, values: list[bytes]) -> int:
    """Estimated size of a reply carrying these entries (keys, values, framing)."""
    return len(values) * (4 * dim + ENTRY_OVERHEAD_BYTES) + sum(map(len, values))


def check_reply_size(dim: int, values: list[bytes], lower: str) -> None:
    size = reply_bytes(dim, values)
    if size > MAX_REPLY_BYTES:
        raise OutOfMemory(
            f"the reply would be about {size / 2**20:.1f} MiB ({len(values)} entries), over the "
            f"{MAX_REPLY_BYTES // 2**20} MiB gRPC message limit: {lower}"
        )


def as_keys(keys, dim: int | None) -> np.ndarray:
    """Request keys as a float32 [n, D] array, or InvalidInput saying what is wrong with them."""
    if isinstance(keys, np.ndarray):
        if keys.ndim != 2:
            raise InvalidInput(
                f"keys must be a 2-D array [count, dimensions], got shape {keys.shape}"
            )
    else:
        keys = list(keys)
        try:
            lengths = [len(k) for k in keys]
        except TypeError:
            raise InvalidInput("each key must be a list of floats") from None
        for i, n in enumerate(lengths):
            if n != lengths[0]:
                raise InvalidInput(
                    f"keys in one request must all have the same dimensions: key 0 has "
                    f"{lengths[0]} but key {i} has {n}"
                )
    if len(keys) == 0:
        raise InvalidInput("no keys given: send at least one key")
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            rows = np.asarray(keys, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"keys must be lists of floats: {e}") from None
    if rows.ndim != 2:
        raise InvalidInput(
            f"each key must be a flat list of floats, got an array of shape {rows.shape}"
        )
    if rows.shape[1] == 0:
        raise InvalidInput("a key has 0 dimensions: send non-empty float vectors")
    if dim is not None and rows.shape[1] != dim:
        raise InvalidInput(
            f"key has {rows.shape[1]} dimensions but this store holds {dim}-dimensional keys: "
            f"use the embedding model the store was built with, or another store"
        )
    finite = np.isfinite(rows).all(axis=1)
    if not finite.all():
        bad = int(np.argmin(finite))
        raise InvalidInput(
            f"key {bad} contains NaN or infinity: keys must be finite float32 numbers"
        )
    return rows


def as_values(values, count: int) -> list[bytes]:
    values = list(values)
    if len(values) != count:
        raise InvalidInput(f"{count} keys but {len(values)} values: send exactly one value per key")
    for i, v in enumerate(values):
        if not isinstance(v, bytes | bytearray | memoryview):
            raise InvalidInput(f"value {i} is {type(v).__name__}: values must be bytes")
    return [bytes(v) for v in values]


def as_top_k(top_k) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer):
        raise InvalidInput(f"top_k must be an integer, got {type(top_k).__name__}")
    if top_k < 1:
        raise InvalidInput(f"top_k must be at least 1, got {top_k}")
    if top_k > MAX_TOP_K:
        raise InvalidInput(
            f"top_k {top_k} is above the limit of {MAX_TOP_K}: ask for at most {MAX_TOP_K} results"
        )
    return int(top_k)


def write_store(path: Path, keys: np.ndarray, values: list[bytes]) -> None:
    """Write the store file atomically: temp file in the same folder, fsync, `os.replace`."""
    lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths, dtype=np.int64)])
    arrays = {
        "keys": mx.array(keys, dtype=mx.float32),
        "values": mx.array(np.frombuffer(b"".join(values), dtype=np.uint8)),
        "offsets": mx.array(offsets),
    }
    metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
    path.parent.mkdir(parents=True, exist_ok=True)
    with publish.atomic_file(path) as f:
        mx.save_safetensors(f, arrays, metadata=metadata)


def read_store(path: Path) -> tuple[np.ndarray, list[bytes]]:
    """Keys and values from a store file; InvalidInput naming the path if it is not a valid one."""
    try:
        arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise InvalidInput(unreadable(path, str(e))) from e
    if metadata.get("format") != FORMAT_NAME:
        raise InvalidInput(
            unreadable(path, "it is not a vector store file (no store format in its metadata)")
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise InvalidInput(
            f"vector store file {path} has format version {metadata.get('format_version')!r}, this "
            f"backend reads version {FORMAT_VERSION}: upgrade the backend, or move the file away"
        )
    try:
        keys = np.array(arrays["keys"], dtype=np.float32)
        blob = np.array(arrays["values"]).tobytes()
        offsets = np.array(arrays["offsets"]).astype(np.int64)
    except (KeyError, RuntimeError, ValueError) as e:
        raise InvalidInput(unreadable(path, f"missing or unreadable array {e}")) from e
    problem = layout_problem(keys, offsets, len(blob))
    if problem:
        raise InvalidInput(unreadable(path, problem))
    values = [blob[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)]
    return keys, values


def layout_problem(keys: np.ndarray, offsets: np.ndarray, blob_size: int) -> str | None:
    """What is inconsistent in loaded store arrays, or None."""
    if keys.ndim != 2:
        return "keys are not a 2-D array"
    if len(keys) and keys.shape[1] == 0:
        return "keys have 0 dimensions"
    if offsets.shape != (len(keys) + 1,):
        return "offsets do not match the number of keys"
    if offsets[0] != 0 or offsets[-1] != blob_size or (np.diff(offsets) < 0).any():
        return "value offsets are out of order or out of range"
    if not np.isfinite(keys).all():
        return "keys contain NaN or infinity"
    return None


def unreadable(path: Path, why: str) -> str:
    return (
        f"cannot read the vector store file {path}: {why}. Nothing was loaded; restore the file "
        f"from a backup, or move it away to start an empty store"
    )


def write_error(path: Path, e: Exception) -> BackendError:
    what = f"could not write the vector store to {path} ({e}); the store is unchanged"
    if isinstance(e, NoSpace) or isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"{what}: free disk space and retry")
    return BackendError(f"{what}: check that the folder exists and is writable, then retry")


@dataclass
class VectorStore:
    """Entries in row order: `keys[i]` (raw float32) holds `values[i]`.

    `unit_keys` is the MLX copy of `keys` scaled to unit length, used by `find`;
    `row_of` maps a key's bytes to its row. Treat all four as read-only.
    """

    path: Path | None = None
    keys: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32), repr=False)
    values: list[bytes] = field(default_factory=list, repr=False)
    unit_keys: mx.array = field(init=False, repr=False)
    row_of: dict[bytes, int] = field(init=False, repr=False)

    def __post_init__(self):
        self.keys = np.ascontiguousarray(self.keys, dtype=np.float32)
        if len(self.values) != len(self.keys):
            raise ValueError(f"{len(self.keys)} keys but {len(self.values)} values")
        self.unit_keys = unit_rows(self.keys)
        mx.eval(self.unit_keys)
        self.row_of = {kid: row for row, kid in enumerate(key_ids(self.keys))}
        if len(self.row_of) != len(self.keys):
            raise ValueError("the same key is stored twice")

    @classmethod
    def open(cls, path: Path | str | None) -> "VectorStore":
        """The store saved at `path`, an empty one if there is no file yet, memory-only if None."""
        if path is None:
            return cls()
        path = Path(path)
        publish.recover(path)  # temp files a killed writer left beside it
        if not path.exists():
            return cls(path=path)
        if not path.is_file():
            raise InvalidInput(f"vector store path {path} is not a file: give a file path")
        keys, values = read_store(path)
        try:
            return cls(path=path, keys=keys, values=values)
        except ValueError as e:
            raise InvalidInput(unreadable(path, str(e))) from e

    @property
    def dim(self) -> int | None:
        """Key dimension, None until the first Set."""
        return self.keys.shape[1] or None

    def __len__(self) -> int:
        return len(self.values)

    def save(self) -> None:
        """Write the store to its path now (Set and Delete already do)."""
        if self.path is None:
            raise Precondition("this vector store is memory-only: open it with a path to save it")
        try:
            write_store(self.path, self.keys, self.values)
        except (OSError, RuntimeError, NoSpace) as e:
            raise write_error(self.path, e) from e

    def commit(self, keys: np.ndarray, values: list[bytes], unit_keys: mx.array) -> None:
        """Persist the new contents, then adopt them; a failed write changes nothing."""
        mx.eval(unit_keys)
        if self.path is not None:
            try:
                write_store(self.path, keys, values)
            except (OSError, RuntimeError, NoSpace) as e:
                raise write_error(self.path, e) from e
        self.keys, self.values, self.unit_keys = keys, values, unit_keys

    def set(self, keys, values: list[bytes]) -> None:
        """Insert or replace entries. A key repeated in one call keeps its last value."""
        keys = as_keys(keys, self.dim)
        values = as_values(values, len(keys))
        latest = {kid: i for i, kid in enumerate(key_ids(keys))}
        new_values = list(self.values)
        added_ids, added_at = [], []
        for kid, i in latest.items():
            row = self.row_of.get(kid)
            if row is None:
                added_ids.append(kid)
                added_at.append(i)
            else:
                new_values[row] = values[i]
        new_values.extend(values[i] for i in added_at)
        added = keys[added_at]
        if self.dim is None:
            new_keys, new_units = added, unit_rows(added)
        else:
            new_keys = np.concatenate([self.keys, added])
            new_units = mx.concatenate([self.unit_keys, unit_rows(added)])
        first_new = len(self)
        self.commit(new_keys, new_values, new_units)
        self.row_of.update((kid, first_new + j) for j, kid in enumerate(added_ids))

    def rows_for(self, keys, action: str) -> tuple[np.ndarray, list[bytes], list[int]]:
        """Validated keys, their ids and their rows; NotFound if any key is not stored."""
        keys = as_keys(keys, self.dim)
        ids = key_ids(keys)
        rows = [self.row_of.get(kid) for kid in ids]
        missing = rows.count(None)
        if missing:
            raise NotFound(
                f"{missing} of the {len(ids)} keys are not in this store (keys must match a "
                f"stored key exactly); {action}"
            )
        return keys, ids, rows

    def get(self, keys) -> tuple[np.ndarray, list[bytes]]:
        """The stored keys [n, D] and values, in request order."""
        _, _, rows = self.rows_for(keys, "nothing was returned: get only keys that were set")
        values = [self.values[r] for r in rows]
        check_reply_size(self.dim, values, "get fewer keys per call")
        return self.keys[rows], values

    def delete(self, keys) -> int:
        """Remove entries, all or none; returns how many were removed."""
        _, ids, rows = self.rows_for(keys, "nothing was deleted: delete only keys that are stored")
        doomed = set(rows)
        keep = len(self) - len(doomed)
        # swap-remove: the surviving rows past `keep` move into the holes below it
        holes = sorted(r for r in doomed if r < keep)
        movers = [r for r in range(keep, len(self)) if r not in doomed]
        new_keys = self.keys[:keep].copy()
        new_values = self.values[:keep]
        new_units = self.unit_keys[:keep]
        if holes:
            new_keys[holes] = self.keys[movers]
            new_units[mx.array(holes)] = self.unit_keys[mx.array(movers)]
            for hole, mover in zip(holes, movers, strict=True):
                new_values[hole] = self.values[mover]
        self.commit(new_keys, new_values, new_units)
        for kid in set(ids):
            del self.row_of[kid]
        for hole, kid in zip(holes, key_ids(new_keys[holes]), strict=True):
            self.row_of[kid] = hole
        return len(doomed)

    def find(self, key, top_k: int) -> tuple[np.ndarray, list[bytes], np.ndarray]:
        """The `top_k` entries most cosine-similar to `key`, most similar first.

        Returns (keys [k, D], values, similarities [k] float32). `top_k` above the store size is
        clamped to the size; an empty store returns empty results.
        """
        top_k = as_top_k(top_k)
        if isinstance(key, np.ndarray) and key.ndim != 1:
            raise InvalidInput(
                f"key must be a flat list of floats, got an array of shape {key.shape}"
            )
        query = as_keys([key], self.dim)
        if not query.any():
            raise InvalidInput(
                "key is all zeros: cosine similarity is undefined for it; send a non-zero key"
            )
        n, dim = len(self), query.shape[1]
        if n == 0:
            return np.zeros((0, dim), np.float32), [], np.zeros(0, np.float32)
        k = min(top_k, n)
        sims = self.unit_keys @ unit_rows(query)[0]
        top = mx.argpartition(sims, kth=n - k)[n - k :] if k < n else mx.arange(n)
        top = top[mx.argsort(-sims[top])]
        top_sims = sims[top]
        rows = np.array(top).tolist()
        values = [self.values[r] for r in rows]
        check_reply_size(dim, values, "lower TopK")
        return self.keys[rows], values, np.clip(np.array(top_sims), -1.0, 1.0)
