#!/usr/bin/env python
"""Speculative decoding benchmark (issue 20): prompt lookup on vs off, side by side, one server.

Workloads, greedy, on SmolLM2-135M-Instruct (the bundled default model):
  * edit: the prompt holds a ~400-token Python file and asks for it back with a few small
    changes (the reply copies long spans of the prompt);
  * chat: a plain question (a story; little of the prompt to copy);
  * edit ×N concurrent: N editing requests (different files) at once, aggregate tokens/s from the
    client's wall clock: "batch" with their prompts already in the prefix cache (each sent once
    before with Tokens 1), so the wall time is decoding; "batch_cold" with fresh prompts, their
    prefill included.
Decode tokens/s per request comes from the server's own timing (Reply tokens and
timing_token_generation: first token to last).
Each round loads the model with Options prompt_lookup:false, then :true (or the reverse on odd
rounds), runs every workload, and checks that the replies are equal; ratios are medians over
rounds. DraftModel rounds (`--draft-bits N`, 0 = none): the target quantized to N bits with
mlx-lm (the same tokenizer) as the DraftModel, prompt lookup off, against the plain target: one
edit alone and --concurrent edits at once (prompts warm).

  LD_PRELOAD=…/libopenblas.so.0 python scripts/bench_spec.py [--rounds 3] [--concurrent 8]
"""

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mlxbackend.proto import backend_pb2 as pb  # noqa: E402

NAMES = ["parse_config", "load_items", "merge_rows", "render_table", "check_limits", "send_batch",
         "read_header", "write_footer"]  # fmt: skip


def code_file(seed: int) -> str:
    """A ~400-token Python module whose names vary with `seed`."""
    a, b = NAMES[seed % len(NAMES)], NAMES[(seed + 3) % len(NAMES)]
    return f'''import json
from pathlib import Path

LIMIT = {100 + seed}
DEFAULT_NAME = "item-{seed}"


def {a}(path, limit=LIMIT):
    """Read the rows of a JSON file, at most `limit` of them."""
    rows = json.loads(Path(path).read_text())
    if not isinstance(rows, list):
        raise ValueError(f"{{path}}: expected a list, got {{type(rows).__name__}}")
    return rows[:limit]


def {b}(rows, key="name"):
    """Group rows by `key` and count them."""
    counts = {{}}
    for row in rows:
        name = row.get(key, DEFAULT_NAME)
        counts[name] = counts.get(name, 0) + 1
    return counts


def summary(path, key="name"):
    """The ten most common values of `key` in the file, with their counts."""
    counts = {b}({a}(path), key)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    lines = [f"{{name}}: {{count}}" for name, count in ranked[:10]]
    return "\\n".join(lines)


class Report:
    def __init__(self, path, key="name"):
        self.path = path
        self.key = key
        self.rows = {a}(path)

    def total(self):
        return len(self.rows)

    def distinct(self):
        return len({b}(self.rows, self.key))

    def text(self):
        return summary(self.path, self.key)


if __name__ == "__main__":
    import sys

    print(summary(sys.argv[1]))
'''


def edit_request(seed: int, tokens: int, salt: str = "") -> pb.PredictOptions:
    text = (
        "Here is a Python file:\n\n```python\n" + code_file(seed) + "```\n\n"
        f"Rename LIMIT to MAX_ROWS everywhere and change {100 + seed} to {200 + seed}. "
        "Reply with the whole updated file in one ```python block and nothing else." + salt
    )
    return _chat(text, tokens)


def chat_request(tokens: int) -> pb.PredictOptions:
    return _chat("Tell me a short story about a dragon who learns to bake bread.", tokens)


def _chat(text: str, tokens: int) -> pb.PredictOptions:
    return pb.PredictOptions(
        Messages=[pb.Message(role="user", content=text)],
        UseTokenizerTemplate=True,
        Tokens=tokens,
        Temperature=0,
    )


def decode_rate(reply) -> float:
    secs = reply.timing_token_generation / 1000
    return (reply.tokens - 1) / secs if secs > 0 else 0.0


def concurrent(stub, requests: list) -> tuple[list, float]:
    replies = [None] * len(requests)

    def call(i):
        replies[i] = stub.Predict(requests[i], timeout=3600)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return replies, time.perf_counter() - start


def metrics(stub) -> dict:
    m = stub.GetMetrics(pb.MetricsRequest())
    return json.loads(m.prompt_json_for_slot or "{}")


def run_round(stub, model: str, options: list, args) -> dict:
    reply = stub.LoadModel(pb.ModelOptions(Model=model, Options=options), timeout=600)
    assert reply.success, reply.message
    concurrent(stub, [chat_request(8)] * 2)  # warm-up; a batch measures spec_step_tokens once
    out = {}
    only = set(args.only.split(",")) if args.only else {"edit", "chat", "batch"}
    if "edit" in only:
        edit = stub.Predict(edit_request(0, args.tokens), timeout=3600)
        out["edit"] = (decode_rate(edit), edit.message, metrics(stub))
    if "chat" in only:
        chat = stub.Predict(chat_request(args.chat_tokens), timeout=3600)
        out["chat"] = (decode_rate(chat), chat.message, metrics(stub))
    if "batch" not in only:
        return out
    out["batch"] = warm_batch(stub, args)
    cold = [
        edit_request(i, args.tokens, f" ({options[0]}, round {args.round})")
        for i in range(args.concurrent)
    ]
    replies, wall = concurrent(stub, cold)
    out["batch_cold"] = (sum(r.tokens for r in replies) / wall, [r.message for r in replies], {})
    return out


def warm_batch(stub, args) -> tuple:
    """--concurrent edits at once, their prompts prefilled before (prefix cache)."""
    reqs = [edit_request(i, args.tokens) for i in range(args.concurrent)]
    for r in reqs:
        warm = pb.PredictOptions()
        warm.CopyFrom(r)
        warm.Tokens = 1
        stub.Predict(warm, timeout=3600)
    replies, wall = concurrent(stub, reqs)
    return sum(r.tokens for r in replies) / wall, [r.message for r in replies], {}


def quantized(model: str, bits: int, out: Path) -> Path:
    """The target model quantized to `bits` (groups of 64) by mlx-lm: a draft that shares its
    tokenizer."""
    from mlx_lm import convert

    convert(model, str(out), quantize=True, q_bits=bits, q_group_size=64)
    return out


def draft_round(stub, model: str, draft: str, args) -> dict:
    fields = {"DraftModel": draft} if draft else {}
    reply = stub.LoadModel(
        pb.ModelOptions(Model=model, Options=["prompt_lookup:false"], **fields), timeout=600
    )
    assert reply.success, reply.message
    concurrent(stub, [chat_request(8)] * 2)  # warm-up (and spec_step_tokens)
    edit = stub.Predict(edit_request(0, args.tokens), timeout=3600)
    out = {"draft_edit": (decode_rate(edit), edit.message, metrics(stub))}
    out["draft_batch"] = warm_batch(stub, args)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="MLX model folder (default: bundled SmolLM2)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=480, help="reply tokens of an edit")
    ap.add_argument("--chat-tokens", type=int, default=200)
    ap.add_argument("--concurrent", type=int, default=8)
    ap.add_argument("--draft-bits", type=int, default=4, help="DraftModel = target at N bits")
    ap.add_argument("--json", default="", help="write the figures here too")
    ap.add_argument("--only", default="", help="comma-separated workloads (edit,chat,batch)")
    args = ap.parse_args()

    from mlxbackend.default_model import ensure_default_model
    from tests.conftest import Server

    model = args.model or ensure_default_model(Path(os.environ.get("MLXB_MODELS_DIR", "models")))
    model = str(Path(model).resolve())
    import tempfile

    draft = ""
    if args.draft_bits:
        tmp = Path(tempfile.mkdtemp(prefix="bench-spec-"))
        draft = str(quantized(model, args.draft_bits, tmp / f"draft-q{args.draft_bits}"))
    srv = Server()
    ratios = {"edit": [], "chat": [], "batch": [], "batch_cold": []}
    if draft:
        ratios.update(draft_edit=[], draft_batch=[])
    rows = []
    try:
        for r in range(args.rounds):
            args.round = r
            order = [False, True] if r % 2 == 0 else [True, False]
            got = {}
            for on in order:
                opt = [f"prompt_lookup:{str(on).lower()}"]
                got[on] = run_round(srv.stub, model, opt, args)
                if draft:
                    got[on].update(draft_round(srv.stub, model, draft if on else "", args))
            for name in ratios:
                if name not in got[False]:
                    continue
                off, on = got[False][name], got[True][name]
                ratios[name].append(on[0] / off[0])
                rows.append(
                    {
                        "round": r,
                        "workload": name,
                        "off_tok_s": round(off[0], 2),
                        "on_tok_s": round(on[0], 2),
                        "ratio": round(on[0] / off[0], 3),
                        "same_text": off[1] == on[1],
                        "spec": on[2],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    finally:
        srv.stop()
    summary = {name: round(statistics.median(v), 3) for name, v in ratios.items() if v}
    print("median ratios (prompt lookup on ÷ off):", json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "median": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
