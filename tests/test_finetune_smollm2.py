"""SmolLM2 learns ~20 fictional facts through a LoRA fine-tuning job over gRPC: greedy recall of
the canonical questions goes from < 10% before to >= 90% after (scripts/finetune_facts.py)."""

import importlib.util
import json

import pytest

from tests.conftest import ROOT, Server


def _facts_module():
    spec = importlib.util.spec_from_file_location(
        "finetune_facts", ROOT / "scripts" / "finetune_facts.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ff = _facts_module()


@pytest.mark.slow
def test_lora_learns_facts(smollm2_dir, tmp_path):
    srv = Server(env={"MLXB_JOBS_DIR": str(tmp_path / "jobs")})
    try:
        updates = []
        result = ff.run_experiment(
            srv.stub, smollm2_dir, tmp_path, on_update=updates.append, log=lambda *_: None
        )
    finally:
        srv.stop()
    summary = json.dumps({k: v for k, v in result.items() if k != "per_fact"}, indent=1)
    misses = [(r["key"], r["after"]) for r in result["per_fact"] if not r["after_hit"]]
    print(summary)
    assert result["facts"] >= 20
    assert result["before_recall"] < 0.10, [
        (r["key"], r["before"]) for r in result["per_fact"] if r["before_hit"]
    ]
    assert result["after_recall"] >= 0.90, (misses, summary)
    train = result["training"]
    assert train["status"] == "completed" and train["steps"] == ff.HYPERPARAMETERS["max_steps"]
    assert train["final_loss"] < train["first_loss"] / 5
    assert train["train_tokens_per_second"] > 0
    assert [u.status for u in updates][-1] == "completed"
    assert (tmp_path / "facts-lora" / "adapters.safetensors").exists()
