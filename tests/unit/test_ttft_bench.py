"""The TTFT benchmark (kvcomm.bench.ttft) on a tiny random-weight Llama with the embedded tokenizer: report
structure, a TTFT for every agent and mode, speedups against dense / dense-prefix of the same run, kvcomm's split,
the markdown table and the plot, scripts/gpu_bench.sh's Python path run end to end on the CPU, and the option that
runs kvcomm with a calibration (its recipe and bound)."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from kvcomm.bench import ttft, ttft_workload
from kvcomm.calibration import Calibration, model_key

REPO = Path(__file__).resolve().parents[2]
TINY = dict(agents=3, prefix=16, input=32, output=16)


@pytest.fixture(scope="module")
def report(tiny_model_dir):
    return ttft.run(**TINY, samples=2, warmup=2, model=tiny_model_dir, random_weights=True, progress=False)


def test_every_mode_has_a_ttft_for_every_agent(report):
    assert report["benchmark"] == "ttft"
    assert report["setting"]["modes"] == list(ttft.DEFAULT_MODES)
    assert report["setting"]["response_generation"] == "teacher_forced"
    assert report["config"]["gamma"] == 1.0
    assert [a["agent"] for a in report["agents"]] == [1, 2, 3]
    for agent in report["agents"]:
        assert agent["prompt_tokens"] > agent["leading_fixed_tokens"] > 0
        assert agent["placeholders"] == agent["agent"]
        for mode in ttft.DEFAULT_MODES:
            entry = agent["modes"][mode]
            assert len(entry["ttft_ms_samples"]) == 2
            assert entry["ttft_ms"] > 0
    measured = [t for t in report["turns"] if t["sample"] >= 2]
    assert len(measured) == 2 * 3 * len(ttft.DEFAULT_MODES)
    warmup = [t for t in report["turns"] if t["sample"] < 2]
    assert {t["mode"] for t in warmup} == {"kvcomm"}
    assert all(not t["reused"] for t in warmup)        # the warm-up's dense fallbacks record the anchors
    json.dumps(report)                                  # JSON-able as it is


def test_speedups_are_against_dense_and_dense_prefix_of_the_same_run(report):
    for agent in report["agents"]:
        modes = agent["modes"]
        dense = statistics.median(modes["dense"]["ttft_ms_samples"])
        dense_prefix = statistics.median(modes["dense-prefix"]["ttft_ms_samples"])
        for mode, entry in modes.items():
            own = statistics.median(entry["ttft_ms_samples"])
            assert entry["ttft_ms"] == pytest.approx(own)
            assert entry["speedup_vs_dense"] == pytest.approx(dense / own)
            assert entry["speedup_vs_dense_prefix"] == pytest.approx(dense_prefix / own)
    goals = report["goals"]
    assert goals["agent"] == 3
    assert goals["vs_dense"]["measured"] == report["agents"][-1]["modes"]["kvcomm"]["speedup_vs_dense"]


def test_kvcomm_reuses_after_warmup_and_reports_its_split(report):
    for agent in report["agents"]:
        for mode in ("kvcomm", "hybrid"):
            entry = agent["modes"][mode]
            assert entry["reuse_rate"] == 1.0 and entry["reasons"] == {"reused": 2}
            assert set(entry["split_ms"]) == {"fetch", "align", "offset", "prefill", "other"}
            assert all(v is not None and v >= 0 for k, v in entry["split_ms"].items() if k != "other")
        assert agent["modes"]["dense"]["reuse_rate"] == 0.0
    first = report["agents"][0]["modes"]["kvcomm"]
    assert report["input_prefill_ms"] > 0
    assert first["ttft_with_input_prefill_ms"] > first["ttft_ms"]
    assert report["pool"]["anchors"]["user_question"] == 2   # two warm-up anchors, gamma = 1: no more


def test_markdown_table_and_plot(report, tmp_path):
    table = ttft.markdown_table(report)
    lines = table.splitlines()
    assert lines[0].startswith("| agent | prompt tokens | dense ms |")
    assert sum(line.startswith(("| 1 |", "| 2 |", "| 3 |")) for line in lines) == 3 + 3 * 2   # TTFT + split rows
    assert "| 1 + input prefill |" in table and "Goals, agent 3 kvcomm" in table
    png = ttft.plot(report, tmp_path / "ttft.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_teacher_forced_response_equals_prefilling_prompt_and_response_together(tiny_model_dir):
    from kvcomm.model_loading import load_model
    from kvcomm.runner import ModelRunner
    loaded = load_model(tiny_model_dir, random_weights=True)
    runner = ModelRunner(loaded.spec, loaded.state_dict)
    prompt, response = list(range(5, 45)), list(range(100, 112))
    content = ttft_workload.teacher_forced_response(runner, prompt, response)
    _, whole = runner.prefill(prompt + response)
    expected = whole.segment(len(prompt)).shifted(runner.rope, 0)
    assert content.kind == "response" and content.token_ids == tuple(response) and content.base.start == 0
    assert (content.base.keys - expected.keys).abs().max() < 1e-5
    assert (content.base.values - expected.values).abs().max() < 1e-6


def test_gpu_bench_script_runs_on_cpu_with_a_tiny_model(tiny_model_dir, tmp_path):
    out = tmp_path / "ttft_script"
    env = dict(os.environ, PYTHON=sys.executable, KVCOMM_BENCH_DEVICE="cpu", KVCOMM_BENCH_DTYPE="float32",
               KVCOMM_BENCH_MODEL=tiny_model_dir, KVCOMM_BENCH_AGENTS="2", KVCOMM_BENCH_PREFIX="8",
               KVCOMM_BENCH_INPUT="16", KVCOMM_BENCH_OUTPUT="8", KVCOMM_BENCH_SAMPLES="1",
               KVCOMM_BENCH_OUT=str(out), KVCOMM_BENCH_TIME_LIMIT="120",
               KVCOMM_BENCH_CALIBRATION=str(REPO / "configs" / "calibration" / "smollm2-135m-instruct.json"))
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_bench.sh")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-2000:]
    script_report = json.loads(out.with_suffix(".json").read_text())
    assert [a["agent"] for a in script_report["agents"]] == [1, 2]
    assert script_report["setting"]["samples"] == 1 and script_report["device"] == "cpu"
    shipped = json.loads(Path(env["KVCOMM_BENCH_CALIBRATION"]).read_text())["knobs"]   # the recipe the file names
    assert {k: script_report["config"][k] for k in ("recompute_ratio", "recompute_span_starts", "kvcomm_tail")} == \
        {k: shipped[k] for k in ("recompute_ratio", "recompute_span_starts", "kvcomm_tail")}
    assert out.with_suffix(".png").exists() and "| agent |" in out.with_suffix(".md").read_text()


def test_grid_reports_the_last_agent_per_prefix_and_output(tiny_model_dir):
    grid = ttft.run_grid(agents=2, prefixes=(8, 24), outputs=(8,), input=16, samples=1, warmup=2,
                         model=tiny_model_dir, random_weights=True, progress=False)
    assert grid["benchmark"] == "ttft-grid"
    assert [(c["prefix"], c["output"]) for c in grid["cells"]] == [(8, 8), (24, 8)]
    for cell in grid["cells"]:
        kvcomm = cell["modes"]["kvcomm"]
        assert cell["agent"] == 2 and kvcomm["reuse_rate"] == 1.0
        assert kvcomm["speedup_vs_dense"] == pytest.approx(cell["modes"]["dense"]["ttft_ms"] / kvcomm["ttft_ms"])
    table = ttft.markdown_table(grid)
    assert table.splitlines()[0] == "| prefix \\ output | 8 |" and "| 24 |" in table


def test_the_calibration_option_runs_kvcomm_as_a_served_engine_would(tiny_model_dir, tmp_path):
    """`--calibration FILE` applies a calibration's recipe, bound included: each reused kvcomm turn recomputes its
    tail (naive's) plus exactly the bound's tokens, where half the reused span would be more; the default (none)
    stays uncalibrated."""
    path = Calibration(model=model_key(tiny_model_dir), knobs={
        "gamma": 1.0, "recompute_ratio": 0.5, "recompute_span_starts": 1, "kvcomm_tail": "last_segment",
        "recompute_max_tokens": 3.0, "gate_max_kl": math.inf, "kl_scale": 1.0, "gate_min_margin": 0.0},
        target_kl=0.01, min_reuse=0.85, met=True, why="test").save(tmp_path / "tiny.json")
    common = ["--agents", "2", "--prefix", "8", "--input", "16", "--output", "8", "--samples", "1",
              "--modes", "naive,kvcomm", "--model", tiny_model_dir, "--random-weights", "--no-progress"]
    assert ttft.main(common + ["--calibration", str(path), "--json", str(tmp_path / "cal.json")]) == 0
    assert ttft.main(common + ["--json", str(tmp_path / "none.json")]) == 0
    calibrated, plain = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("cal", "none"))
    assert calibrated["config"]["recompute_max_tokens"] == 3 and calibrated["config"]["recompute_ratio"] == 0.5
    assert plain["config"]["recompute_ratio"] == 0.0
    for agent in calibrated["agents"]:
        naive, kvcomm = agent["modes"]["naive"], agent["modes"]["kvcomm"]
        assert kvcomm["reuse_rate"] == 1.0
        assert kvcomm["recomputed_tokens"] == naive["recomputed_tokens"] + 3, agent
