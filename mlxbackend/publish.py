"""Atomic publishing: every file or folder the backend writes appears complete under its final
name, or not at all (job.json, checkpoints, exports, quantized models, store files, PNGs,
prompt-cache entries, converter output folders). Stdlib only, so converters/ use it too.

- `atomic_file(path)` yields an open temp file beside `path` (`.<name>.tmp-<pid>-<rand>`); on a
  clean exit it is flushed, fsynced, `os.replace`d onto `path` and the folder is fsynced.
- `atomic_folder(final)` yields a staging folder beside `final` (`.<name>.tmp-<pid>-<rand>`); on
  a clean exit every file in it is fsynced and it is renamed into place (see `place_folder`).
- On any exception (KeyboardInterrupt included) the temp file or staging folder is removed and
  the exception re-raised; a full disk or quota (ENOSPC, EDQUOT, EFBIG, or MLX's
  "[write] Unable to write" on a full file system) is raised as `NoSpace("no space left on
  device writing <path>")`.

Replacing an existing folder is one atomic exchange where the system has one (Linux renameat2
RENAME_EXCHANGE, macOS renamex_np RENAME_SWAP): the final name always holds a complete version,
and a kill -9 right after the exchange only leaves the old version under the staging name.
Elsewhere it takes two renames: the old one aside (`.<name>.old-<pid>-<rand>`), the new one in,
then the old one is removed; a kill -9 between the two leaves no folder under the final name, the
old one aside and the complete new one in its staging folder. `recover(final)` (called by
`atomic_folder` itself, and by the loaders of checkpoints, store files and prompt-cache folders)
rolls back: it renames the old one back and removes the leftovers of dead processes. Temp names
start with a dot and never end in a final name's extension, so globs and loaders skip them.

Test hook: `MLXB_TEST_KILL_DURING_PUBLISH=<point>[:<substring>]` makes the process SIGKILL itself
while publishing a path containing <substring> (all paths when absent). Points: `write` (the temp
file, or the staging folder's largest file, holds half its data; nothing is renamed), `swap`
(a file: the temp is complete but not renamed; a folder being replaced: the old one is aside, the
new one not yet in). Read only by this module, only by tests/test_crash_safety.py."""

import contextlib
import ctypes
import errno
import json
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from mlxbackend.errors import NO_SPACE, NoSpace

KILL_ENV = "MLXB_TEST_KILL_DURING_PUBLISH"
MLX_WRITE_ERROR = "unable to write"  # mx.save_safetensors(path) on a full file system: RuntimeError
NEARLY_FULL_BYTES = 1 << 20
_AT_FDCWD, _RENAME_EXCHANGE, _RENAME_SWAP = -100, 2, 2


def _tag() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def temp_name(final: Path, kind: str = "tmp") -> Path:
    """A name beside `final` that no loader mistakes for a final one."""
    return final.with_name(f".{final.name}.{kind}-{_tag()}")


def fsync_dir(folder: Path) -> None:
    """Make renames in `folder` durable (ignored where a folder cannot be fsynced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _nearly_full(folder: Path) -> bool:
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < NEARLY_FULL_BYTES


def no_space(exc: BaseException, path: Path, folder: Path) -> NoSpace | None:
    """`exc` as NoSpace naming `path` when it says the disk is full (check before cleaning up)."""
    if isinstance(exc, NoSpace):
        return exc
    if isinstance(exc, OSError) and exc.errno in NO_SPACE:
        return NoSpace(f"no space left on device writing {path}: {exc.strerror or exc}")
    if (
        isinstance(exc, RuntimeError)
        and MLX_WRITE_ERROR in str(exc).lower()
        and _nearly_full(folder)
    ):
        return NoSpace(f"no space left on device writing {path}: {exc}")
    return None


def _kill_point(point: str, path: Path) -> bool:
    spec = os.environ.get(KILL_ENV, "")
    if not spec:
        return False
    name, _, needle = spec.partition(":")
    return name == point and needle in str(path)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # never reached


def _half(path: Path) -> None:
    """Truncate the temp file (or a staging folder's largest file) to half its size."""
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()]
        if not files:
            return
        path = max(files, key=lambda p: p.stat().st_size)
    os.truncate(path, path.stat().st_size // 2)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", **open_args: Any) -> Iterator[IO]:
    """Write `path` atomically: yields the temp file beside it; see the module docstring."""
    final = Path(path)
    tmp = temp_name(final)
    try:
        with open(tmp, mode, **open_args) as f:
            yield f
            if _kill_point("write", final):
                f.flush()
                _half(tmp)
                _die()
            f.flush()
            os.fsync(f.fileno())
        if _kill_point("swap", final):
            _die()
        os.replace(tmp, final)
    except BaseException as exc:
        err = no_space(exc, final, final.parent)
        _remove(tmp)
        if err is not None and err is not exc:
            raise err from None
        raise
    fsync_dir(final.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    with atomic_file(path, "w", encoding=encoding) as f:
        f.write(text)


def write_json(
    path: str | os.PathLike, data: Any, indent: int | None = 2, **dump_args: Any
) -> None:
    write_text(path, json.dumps(data, indent=indent, **dump_args) + "\n")


def place_file(staged: Path, final: Path) -> None:
    """Publish a complete file written elsewhere in `final`'s folder (fsync, then replace)."""
    staged, final = Path(staged), Path(final)
    fd = os.open(staged, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if _kill_point("write", final):
        _half(staged)
        _die()
    if _kill_point("swap", final):
        _die()
    os.replace(staged, final)
    fsync_dir(final.parent)


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE, macOS renamex_np
    RENAME_SWAP); False where the system or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if sys.platform == "darwin":
            rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), ctypes.c_uint(_RENAME_SWAP))
        else:
            rc = libc.renameat2(
                _AT_FDCWD,
                os.fsencode(a),
                _AT_FDCWD,
                os.fsencode(b),
                ctypes.c_uint(_RENAME_EXCHANGE),
            )
    except (AttributeError, OSError):
        return False  # no such call in this libc
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def place_folder(staged: Path, final: Path) -> None:
    """Publish a complete staging folder as `final` (fsync its files, then rename; an existing
    `final` is renamed aside first and removed after). Raises NoSpace on a full disk."""
    staged, final = Path(staged), Path(final)
    try:
        _fsync_tree(staged)
        if _kill_point("write", final):
            _half(staged)
            _die()
        if not (final.exists() or final.is_symlink()):
            os.rename(staged, final)
        elif exchange(staged, final):  # one atomic step: `final` is never missing
            fsync_dir(final.parent)
            if _kill_point("swap", final):
                _die()  # leaves the old version under the staging name: recover() removes it
            _remove(staged)
        else:  # no atomic exchange here: two renames, see the module docstring
            old = temp_name(final, "old")
            os.rename(final, old)
            if _kill_point("swap", final):
                _die()
            try:
                os.rename(staged, final)
            except BaseException:
                os.rename(old, final)
                raise
            fsync_dir(final.parent)
            _remove(old)
    except BaseException as exc:
        err = no_space(exc, final, final.parent)
        if err is not None and err is not exc:
            raise err from None
        raise
    fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_folder(final_dir: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty staging folder beside `final_dir`; on a clean exit it becomes
    `final_dir` (replacing an existing one), on any exception it is removed."""
    final = Path(final_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final)
    staged = temp_name(final)
    try:
        staged.mkdir()
        yield staged
        place_folder(staged, final)
    except BaseException as exc:
        err = no_space(exc, final, final.parent)
        _remove(staged)
        if err is not None and err is not exc:
            raise err from None
        raise


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(final: Path, kind: str) -> list[tuple[Path, int]]:
    """(path, writer pid) of `.<name>.<kind>-<pid>-<rand>` beside `final`."""
    prefix = f".{final.name}.{kind}-"
    out = []
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return out
    for p in entries:
        if p.name.startswith(prefix):
            pid = p.name[len(prefix) :].split("-", 1)[0]
            if pid.isdigit():
                out.append((p, int(pid)))
    return out


def recover(final_dir: str | os.PathLike) -> None:
    """Finish or roll back an interrupted publish of `final_dir` (file or folder): a missing
    final name gets its old version back; leftovers of dead writers are removed."""
    final = Path(final_dir)
    olds = [(p, pid) for p, pid in _leftovers(final, "old") if not _pid_alive(pid)]
    if olds and not (final.exists() or final.is_symlink()):
        newest = max(olds, key=lambda e: e[0].stat().st_mtime)
        with contextlib.suppress(OSError):
            os.rename(newest[0], final)
            fsync_dir(final.parent)
    for kind in ("old", "tmp"):
        for p, pid in _leftovers(final, kind):
            if not _pid_alive(pid) and p.exists():
                _remove(p)


def clean_stale(folder: str | os.PathLike) -> None:
    """`recover` every publish in `folder` that a dead process left unfinished."""
    root = Path(folder)
    try:
        names = {p.name for p in root.iterdir()}
    except OSError:
        return
    finals = set()
    for name in names:
        for kind in (".tmp-", ".old-"):
            if name.startswith(".") and kind in name:
                finals.add(name[1 : name.rindex(kind)])
    for name in finals:
        recover(root / name)
