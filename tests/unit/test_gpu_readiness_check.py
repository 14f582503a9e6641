"""scripts/gpu_check.sh --tiny runs the GPU check's code paths on the CPU, as a bare GPU machine would run them:
Ray, pydantic, gguf, flash-attn, accelerate and FastAPI hidden from Python (a sitecustomize marks them missing),
so the check cannot come to depend on anything that machine lacks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MISSING_ON_A_BARE_GPU_MACHINE = ("ray", "pydantic", "gguf", "flash_attn", "accelerate", "fastapi")


def test_gpu_check_tiny_runs_without_what_a_bare_gpu_machine_lacks(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in MISSING_ON_A_BARE_GPU_MACHINE))
    env = {**os.environ, "PYTHONPATH": str(bare), "PYTHON": sys.executable}
    hidden = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True)
    assert hidden.returncode != 0 and "ModuleNotFoundError" in hidden.stderr   # the hiding works

    out = tmp_path / "check"
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--tiny", str(out)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["ok"] and report["mode"] == "tiny" and report["environment"]["forbidden_modules_imported"] == []
    sections = report["sections"]
    assert list(sections) == ["parity", "fidelity", "ttft", "recipe_cost", "decode", "memory"]
    fidelity = {e["mode"]: e for e in sections["fidelity"]["modes"]}
    assert sections["fidelity"]["dtypes"] == ["bfloat16", "float32"] and len(fidelity) == 6
    assert fidelity["kvcomm"]["kl_bfloat16"] < fidelity["naive"]["kl_bfloat16"]
    parity = sections["parity"]
    assert parity["logits_ok"] and parity["greedy_ok"] and parity["tolerance"] > 0
    assert parity["ours_bf16_vs_fp32_max_abs"] <= parity["tolerance"]
    modes = report["settings"]["ttft"]["modes"]
    assert len(modes) == 6 and all(agent["modes"][m]["ttft_ms"] > 0 for agent in sections["ttft"]["agents"]
                                   for m in modes)
    assert [row["batch"] for row in sections["decode"]["batches"]] == [1, 16, 64]
    assert all(row["tokens_per_s"] > 0 for row in sections["decode"]["batches"])
    memory = sections["memory"]
    assert 0 < memory["kv_ledger_peak_bytes"] <= memory["kv_budget_bytes"] == memory["plan"]["kv_bytes"]
    # issue #16's cost aim, measured with the recipe the embedded model's calibration ships, every turn reused
    cost, shipped = sections["recipe_cost"], json.loads(
        (REPO / "configs" / "calibration" / "smollm2-135m-instruct.json").read_text())["knobs"]
    assert cost["recipe"] == {k: shipped[k] for k in cost["recipe"]} and shipped["recompute_ratio"] > 0
    assert [r["agent"] for r in cost["agents"]] == [1, 2, 3, 4, 5]
    assert all(r["kvcomm_reuse_rate"] == 1.0 and r["kvcomm_recomputed"] > r["naive_recomputed"]
               and r["kvcomm_vs_naive"] == r["kvcomm_ms"] / r["naive_ms"] for r in cost["agents"])
    assert cost["aim_met"] == (cost["agents"][-1]["kvcomm_vs_naive"] < 1.3)
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# GPU check (tiny): PASS") and "| batch | tokens/s |" in summary
    assert "## recipe_cost: ok" in summary and "| agent | prompt tokens | naive ms | kvcomm ms |" in summary
    assert (out / "ttft.png").stat().st_size > 10_000 and (out / "gpu_check.log").exists()
