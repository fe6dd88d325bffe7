"""Background jobs (fine-tuning, quantization): the latest state of each job, fanned out to
every progress subscriber.

A snapshot is a plain dict of the progress message's fields. Every subscriber first gets the
current snapshot, then each later one; the stream ends after a terminal status. Snapshots are
published from the worker thread and delivered on the event loop.

Each job's output folder holds `job.json` (its last snapshot), and a small index maps job ids
to output folders, so that a respawned backend process can still answer for a job it did not
run (contract §12.3)."""

import asyncio
import hashlib
import json
import os
import threading
import time
from pathlib import Path

from mlxbackend import publish
from mlxbackend.errors import InvalidInput, NoSpace, NotFound

TERMINAL = ("completed", "failed", "stopped")
STATE_FILE = "job.json"


def index_dir() -> Path:
    return Path(os.environ.get("MLXB_JOBS_DIR") or Path.home() / ".cache" / "mlxbackend" / "jobs")


def write_json_atomic(path: Path, data: dict):
    """Publish JSON atomically (publish.write_json): readers never see half a file."""
    publish.write_json(path, data, default=str)


def check_output_dir(path: str):
    """Create output_dir now, so an unwritable one fails the Start call itself."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise InvalidInput(f"output_dir {path} is not writable: {exc.strerror or exc}") from None


async def wait_ended(runs: dict, timeout: float):
    """Wait until `runs` (job_id -> running job) is empty, at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while runs and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def remember(kind: str, job_id: str, output_dir: Path):
    """Record where a job writes, for a later process asked about it."""
    try:
        folder = index_dir() / kind
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            folder / f"{_safe(job_id)}.json", {"job_id": job_id, "output_dir": str(output_dir)}
        )
    except (OSError, NoSpace):
        pass  # best effort: the data-path lookup still works


def _safe(job_id: str) -> str:
    """job_id as one short ASCII file name (at most ~120 bytes, within every NAME_MAX); an id
    that had to be changed gets a hash of itself appended, so two ids never share an entry."""
    safe = "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "_" for c in job_id[:101])
    if safe != job_id or len(safe) > 100:
        safe = f"{safe[:100]}-{hashlib.sha256(job_id.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"
    return safe


def find_output_dir(kind: str, job_id: str) -> Path | None:
    """A job's output folder from the index, or from LocalAI's layout `<data path>/<kind>/<id>`."""
    entry = index_dir() / kind / f"{_safe(job_id)}.json"
    if entry.exists():
        try:
            return Path(json.loads(entry.read_text())["output_dir"])
        except (OSError, ValueError, KeyError):
            pass
    data_path = os.environ.get("LOCALAI_DATA_PATH")
    folder = {"finetune": "fine-tune", "quantize": "quantization"}.get(kind, kind)
    if (
        data_path
        and job_id == _safe(job_id)
        and job_id.strip(".")
        and (Path(data_path) / folder / job_id).is_dir()
    ):
        return Path(data_path) / folder / job_id  # a plain name only: no "..", "/", or NUL
    return None


def recovered_snapshot(kind: str, job_id: str) -> dict:
    """The last state a previous process left for job_id. A job it left running did not finish:
    it is reported as failed, naming the last checkpoint to resume from."""
    output_dir = find_output_dir(kind, job_id)
    state_file = output_dir / STATE_FILE if output_dir else None
    if state_file is None or not state_file.exists():
        raise NotFound(f"unknown job_id {job_id!r}: no job with this id in this process or on disk")
    snapshot = json.loads(state_file.read_text()).get("snapshot", {})
    snapshot["job_id"] = job_id
    if snapshot.get("status") not in TERMINAL:
        from mlxbackend.train.checkpoints import latest_checkpoint  # only fine-tunes have them

        last = latest_checkpoint(output_dir) if kind == "finetune" else None
        hint = f"; resume with resume_from_checkpoint={last}" if last else ""
        snapshot.update(
            status="failed", message=f"the backend process running this job exited{hint}"
        )
    return snapshot


class JobBoard:
    """Latest snapshot per job id, and the subscribers waiting for the next ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self.snapshots: dict = {}
        self.watchers: dict = {}  # job_id -> list of asyncio.Queue
        self.lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None

    def open(self, job_id: str, snapshot: dict):
        """Event loop: register a new job with its first snapshot."""
        self.loop = asyncio.get_running_loop()
        with self.lock:
            self.snapshots[job_id] = dict(snapshot, job_id=job_id)

    def publisher(self, job_id: str, output_dir: str, config: dict, on_end=None):
        """publish(**fields) for one job: the board, plus `<output_dir>/job.json` on each status
        change, at the end and every 10 s. on_end() runs before a terminal status goes out."""
        state = {"status": None, "written": 0.0}
        path = Path(output_dir) / STATE_FILE

        def publish(**fields):
            if on_end is not None and fields.get("status") in TERMINAL:
                on_end()
            snapshot, queues = self._merge(job_id, fields)
            status = snapshot.get("status")
            now = time.monotonic()
            if status != state["status"] or now - state["written"] > 10 or status in TERMINAL:
                state.update(status=status, written=now)
                try:
                    write_json_atomic(path, {"snapshot": snapshot, "config": config})
                except (OSError, NoSpace):
                    pass  # best effort: the board still has the snapshot
            for q in queues:  # after job.json: a subscriber that saw a status finds it on disk too
                self._deliver(q, snapshot)

        return publish

    def publish(self, job_id: str, **fields) -> dict:
        """Any thread: merge fields into the job's snapshot and send it to every subscriber."""
        snapshot, queues = self._merge(job_id, fields)
        for q in queues:
            self._deliver(q, snapshot)
        return snapshot

    def _merge(self, job_id: str, fields: dict) -> tuple:
        """(the job's new snapshot, its subscribers' queues)."""
        with self.lock:
            snapshot = {**self.snapshots.get(job_id, {}), **fields, "job_id": job_id}
            self.snapshots[job_id] = snapshot
            queues = list(self.watchers.get(job_id, ()))
        return snapshot, queues

    def _deliver(self, q: asyncio.Queue, snapshot: dict):
        try:
            self.loop.call_soon_threadsafe(q.put_nowait, dict(snapshot))
        except RuntimeError:  # the event loop is closed: shutting down
            pass

    def get(self, job_id: str) -> dict | None:
        with self.lock:
            snapshot = self.snapshots.get(job_id)
        return dict(snapshot) if snapshot else None

    def running(self) -> list:
        with self.lock:
            return [j for j, s in self.snapshots.items() if s.get("status") not in TERMINAL]

    async def watch(self, job_id: str):
        """The current snapshot, then every update; ends after a terminal status."""
        q: asyncio.Queue = asyncio.Queue()
        with self.lock:
            current = self.snapshots.get(job_id)
            if current is not None:
                self.watchers.setdefault(job_id, []).append(q)
        if current is None:
            yield recovered_snapshot(self.kind, job_id)
            return
        try:
            snapshot = dict(current)
            while True:
                yield snapshot
                if snapshot.get("status") in TERMINAL:
                    return
                snapshot = await q.get()
        finally:
            with self.lock:
                self.watchers.get(job_id, []).remove(q)
