"""Seeded fuzzing of all 34 Backend RPCs against real server processes (the long run, `make soak`).

    python scripts/fuzz.py --seed 1 --per-rpc 60 --states none,text,encoder,whisper,sd3
    python scripts/fuzz.py --seed 1 --only Predict:17 --states text    # replay one input

Prints the inputs tried and the statuses seen per RPC, and every finding (INTERNAL / UNKNOWN
status, crash, Health not OK, worker still busy after a deadline); exits 1 if there is one."""

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fuzzer import STATES, can_drop_root, fuzz  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--per-rpc", type=int, default=60, help="inputs per RPC and state")
    ap.add_argument("--states", default=",".join(STATES), help=f"from {','.join(STATES)}")
    ap.add_argument("--timeout", type=float, default=60, help="deadline per call, seconds")
    ap.add_argument("--no-big", action="store_true", help="no multi-MB values or ~50 MB messages")
    ap.add_argument("--only", help="RPC:INDEX, replay one input")
    args = ap.parse_args()
    if not can_drop_root():
        print("running as root needs setpriv (the server runs as nobody)", file=sys.stderr)
        return 2
    only = None
    if args.only:
        rpc, _, index = args.only.partition(":")
        only = (rpc, int(index))
    states = [s for s in args.states.split(",") if s]
    with tempfile.TemporaryDirectory(prefix="mlxb-fuzz-") as tmp:
        report = fuzz(
            Path(tmp),
            args.seed,
            args.per_rpc,
            states,
            big=not args.no_big,
            timeout=args.timeout,
            only=only,
            log=lambda m: print(m, flush=True),
        )
    print(report.table())
    for f in report.findings:
        print(
            f"[{f.state}] {f.input.rpc}#{f.input.index} ({f.input.kind}) {f.code}: {f.message[:300]}"
        )
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
