"""The Pareto benchmark and `kvcomm calibrate`'s measurement on a tiny random-weight model: every variant on every
turn, the gate sweep, and a calibration fitted from the report that a config then resolves to."""
from __future__ import annotations

import json

import pytest
import torch

from kvcomm.bench import calibrate, pareto
from kvcomm.calibration import Calibration, resolve
from kvcomm.config import KVCommConfig
from kvcomm.model_loading import load_model

QUESTIONS = ["Tom has 3 apples and buys 5 more. How many apples does he have?",
             "A train travels 60 miles per hour for 2 hours. How far does it go?",
             "A box holds 6 eggs. How many eggs are in 9 boxes?",
             "Sara reads 12 pages a day for 4 days. How many pages did she read?"]


@pytest.fixture(scope="module")
def report(tiny_model_dir, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    data = tmp_path_factory.mktemp("gsm8k") / "test.jsonl"
    data.write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS))
    loaded = load_model(tiny_model_dir, random_weights=True, seed=4)
    setting = pareto.Setting(questions=1, warmup=3, agents=3, response_tokens=5, bootstrap=100, data=str(data),
                             ratios=(0.0, 0.5), span_starts=(1,), recompute_starts=(0, 1),
                             kvcomm_tails=("last_segment", 2))
    try:
        yield pareto.measure("tiny", setting, loaded=loaded, progress=False)
    finally:
        torch.set_num_threads(threads)


def test_every_variant_on_every_turn_and_the_gate_sweep(report):
    names = [v["name"] for v in report["setting"]["variants"]]
    assert names == ["naive", "kvcomm@0%", "kvcomm@50%", "kvcomm@0%+s1", "kvcomm@50%+s1", "kvcomm@0%+t2",
                     "kvcomm@50%+t2", "kvcomm@0%+s1+t2", "kvcomm@50%+s1+t2", "kvcomm+starts@1", "hybrid@50%",
                     "cacheblend@50%"]
    assert report["turns"] == 3 and all(set(row["variants"]) == set(names) for row in report["rows"])
    summary = pareto.summarize(report)
    v = summary["variants"]
    assert v["kvcomm@50%"]["recomputed_tokens"] > v["kvcomm@0%"]["recomputed_tokens"]
    assert v["kvcomm+starts@1"]["recomputed_tokens"] > v["kvcomm@0%"]["recomputed_tokens"]
    # a recipe's span starts and short tail reach the engine: 2 tail tokens instead of the last segment's
    assert v["kvcomm@0%+s1"]["recomputed_tokens"] == v["kvcomm+starts@1"]["recomputed_tokens"]
    assert v["kvcomm@0%+t2"]["recomputed_tokens"] == 2 < v["kvcomm@0%"]["recomputed_tokens"]
    for name in ("kvcomm@0%", "kvcomm@50%"):
        points = summary["gate_sweep"][name]
        reuse = [p["reuse"] for p in points]
        assert reuse == sorted(reuse) and points[-1]["threshold"] == float("inf")   # a higher threshold reuses more
        never_dense = sum(not r["entropy_gate_dense"] for r in report["rows"]) / report["turns"]
        assert points[-1]["reuse"] == pytest.approx(never_dense)        # at gamma 0.3, as traced
        assert all((r["entropy_ratio"] > 0.3) == r["entropy_gate_dense"] for r in report["rows"])
    assert "| kvcomm@50% |" in pareto.markdown_table(report, summary)
    # a turn the gates send dense costs what the engine's fallback costs (the prefill after the agent's own prefix)
    assert all(row["fallback_prepare_ms"] > 0 for row in report["rows"])
    all_dense = pareto._gate_point(report["rows"], "kvcomm@0%", 1.0, -1.0, float("inf"))
    assert all_dense["reuse"] == 0 and all_dense["served_ms"] == pytest.approx(summary["fallback_prepare_ms"])
    # the fidelity gate's signal on every variant, and its sweep: a higher minimum margin never reuses more
    assert all(0.0 <= cell["margin"] <= 1.0 for row in report["rows"] for cell in row["variants"].values())
    for name in ("kvcomm@0%", "kvcomm@50%"):
        reuse = [p["reuse"] for p in summary["margin_sweep"][name]]
        assert reuse == sorted(reuse, reverse=True) and reuse[0] == summary["gate_sweep"][name][-1]["reuse"]
        quality = summary["signals"][name]
        assert quality["disagreements"] == sum(not r["variants"][name]["top1_agree"] for r in report["rows"])
        assert set(pareto.SIGNALS) <= set(quality)


def test_a_calibration_fitted_from_the_report_is_what_a_config_resolves_to(report, tmp_path):
    calibration = calibrate.calibrate(report, model="tiny", target_kl=0.01, min_reuse=0.5, max_vs_naive=1.3)
    assert calibration.knobs["recompute_ratio"] in (0.0, 0.5) and calibration.data["turns"] == 3
    assert len(calibrate.measurements(report)) == 8 * 3                   # (turn, kvcomm recipe) pairs
    assert all(m.naive_ms == row["variants"]["naive"]["prepare_ms"] for m, row in zip(
        calibrate.measurements(report), report["rows"]))                  # the cap's yardstick, per turn
    assert calibration.dev["prepare_vs_naive"] > 0 and "x naive's)" in calibrate.describe(calibration)
    path = calibration.save(tmp_path / "tiny.json")
    config, found = resolve(KVCommConfig(calibration=str(path)), "tiny")
    assert found == Calibration.load(path)
    assert {name: getattr(config, name) for name in calibration.knobs} == calibration.knobs
    summary = pareto.summarize(report, found)
    k = calibration.knobs
    assert summary["calibrated"]["variant"] == pareto.kvcomm_variant(k["recompute_ratio"], k["recompute_span_starts"],
                                                                     k["kvcomm_tail"]) in summary["variants"]
    pareto.plot(report, summary, str(tmp_path / "pareto.png"))
    assert (tmp_path / "pareto.png").stat().st_size > 0
