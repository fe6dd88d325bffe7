"""scripts/bench_agent.py's short version (`make bench-agent` runs the full one): two sessions
on the tiny model, the RAM cache too small for their KV, kill -9 and a resumed turn that the SSD
tier serves, Options cpu_softmax:numpy on both servers; the JSON has every figure the README
table takes."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_short_agent_run(trained_dir, tmp_path):
    out = tmp_path / "agent.json"
    args = ["--model", str(trained_dir), "--sessions", "2", "--turns", "2", "--stagger", "0"]
    args += ["--system-tokens", "200", "--tool-tokens", "60", "--reply-tokens", "4"]
    args += ["--ram-mib", "0", "--repeats", "1", "--overhead-tokens", "40", "--json", str(out)]
    args += ["--option", "cpu_softmax:numpy"]  # more Options reach both servers
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_agent.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    turns = result["turns"]
    assert [t["turn"] for t in turns] == [1, 2, 3] and turns[-1]["resumed_after_kill9"]
    for t in turns:
        assert len(t["ttft_ms"]) == len(t["ratios"]) == len(t["served_ratios"]) == 2
        assert t["cold_ms"] > 0 and t["prompt_tokens"] > 0
    # nothing in RAM: every reused token came from the SSD tier, after the restart too
    assert all(t["prompt_tokens_from_ram"] == 0 for t in turns)
    assert turns[1]["prompt_tokens_from_ssd"] > 0 and turns[2]["prompt_tokens_from_ssd"] > 0
    # each turn computes only what it adds: the history's last partial block comes back too
    # (the SSD tier's tails), after the restart as well
    for before, t in zip(turns, turns[1:], strict=False):
        added = t["prompt_tokens"] - before["prompt_tokens"]
        assert t["prompt_tokens_computed"] <= 2 * (added + 2), (added, t)
    assert result["overhead"]["arrival_to_prefill_ms"] > 0
    assert "worst turn ÷ cold" in r.stdout
    assert "attention softmax in NumPy" in result["load_message"]
