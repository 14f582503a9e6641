"""The fidelity benchmark on a tiny random-weight Llama with the embedded tokenizer: report structure and the
invariants every run must satisfy (dense against dense is exact; KL is never negative; per-layer arrays)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from kvcomm.bench import anchors, fidelity, fidelity_report
from kvcomm.bench.turns import load_questions
from kvcomm.calibration import Calibration
from kvcomm.templates import AgentTemplate

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py: torch on one thread for the module

QUESTIONS = [
    "Tom has 3 apples and buys 5 more. How many apples does he have?",
    "A train travels 60 miles per hour for 2 hours. How far does it go?",
    "Sara reads 12 pages a day for 4 days, then 7 more pages. How many pages did she read?",
    "A box holds 6 eggs. How many eggs are in 9 boxes?",
]


def _agents() -> list[AgentTemplate]:
    """Three fully connected agents: agent k reads the question and every agent j < k."""
    roles = ("math solver", "mathematical analyst", "inspector")
    agents = []
    for k, role in enumerate(roles, start=1):
        upstream = "".join(f"Agent {j} said:\n{{agent_{j}_current}}\n\n" for j in range(1, k))
        agents.append(AgentTemplate(str(k), f"You are a {role}. Answer with one number.",
                                    "Q:\n{user_question}\n" + upstream + "Your answer:", "A: "))
    return agents


@pytest.fixture(scope="module")
def report(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gsm8k")
    data = folder / "test.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "#### 0"}) + "\n" for q in QUESTIONS))
    # a fidelity gate at margin 1 sends every turn the other gates let through back to dense
    calibration = Calibration(model="tiny", knobs={"gamma": 1.0, "recompute_ratio": 0.5, "recompute_span_starts": 1,
                                                   "recompute_max_tokens": math.inf, "kvcomm_tail": 4,
                                                   "gate_max_kl": math.inf, "kl_scale": 1.0,
                                                   "gate_min_margin": 1.0},
                              target_kl=0.01, min_reuse=0.85, met=True, why="test").save(folder / "tiny.json")
    setting = fidelity.Setting(questions=2, warmup=2, response_tokens=6, continuation_tokens=4, bootstrap=200,
                               data=str(data), calibration=str(calibration))
    return fidelity.run("tiny", setting=setting, agents=_agents(), loaded=tiny_model, progress=False)


def test_report_structure(report, tiny_model):
    layers = tiny_model.spec.num_layers
    assert report["turns"] == 2 * 3 == len(report["rows"])
    assert set(report["methods"]) == set(fidelity.METHODS)
    assert not set(report["questions"]["measured"]) & set(report["questions"]["warmup"])
    for method, m in report["methods"].items():
        assert m["turns"] == 6
        for group in fidelity.ERROR_GROUPS:
            for side in ("k", "v"):
                values = m[f"{group}_rel_err_{side}"]
                assert len(values) == layers, (method, group, side)
                assert all(v >= 0 and math.isfinite(v) for v in values), (method, group, side)
        lo, hi = m["kl_ci95"]
        assert lo <= m["kl_mean"] + 1e-12 and m["kl_mean"] <= hi + 1e-12, method
        # the summary is the rows' own numbers (a miscount or a mixed-up method would differ)
        cells = [row["methods"][method] for row in report["rows"]]
        assert m["kl_mean"] == pytest.approx(sum(c["kl"] for c in cells) / len(cells))
        assert m["top1_agree"] == sum(c["top1_agree"] for c in cells)
        # offsets are timed exactly where a cache carries them: the pool methods, never the others
        assert (m["offset_ms_mean"] is not None) == (method in fidelity.POOL_METHODS), method
        # (prepare times are the benchmark's figures, compared side by side in its table: no test asserts them)
    for row in report["rows"]:   # what each method recomputed before the first token, exactly
        assert row["methods"]["dense"]["recomputed_tokens"] == row["prompt_tokens"]
        assert row["methods"]["base-only"]["recomputed_tokens"] == 1   # the reference's tail: the last token only
    traced = [m for m in fidelity.POOL_METHODS if "gate_reuse_rate" in report["methods"][m]]
    assert {"kvcomm-reference", "kvcomm-corrected"} <= set(traced)
    for method in traced:
        # the gate's own decision per turn: reused exactly when its reason says so, and the rate counts those
        cells = [row["methods"][method] for row in report["rows"]]
        assert all(c["gate_reused"] == (c["gate_reason"] == "reused") for c in cells), method
        assert report["methods"][method]["gate_reuse_rate"] == sum(c["gate_reused"] for c in cells) / len(cells)
        assert sum(report["methods"][method]["gate_reasons"].values()) == len(cells)
    assert report["pools"]["corrected"]["anchors"], "warm-up recorded no anchors"
    json.dumps(report)   # JSON-able
    table = fidelity.markdown_table(report)
    assert all(f"| {m} |" in table for m in fidelity.METHODS)


def test_the_calibrated_method_runs_the_calibration_and_its_served_figures_add_up(report):
    calibrated, corrected = report["methods"]["kvcomm-calibrated"], report["methods"]["kvcomm-corrected"]
    assert report["configs"]["calibrated"]["recompute_ratio"] == 0.5 and report["calibration"]["model"] == "tiny"
    assert (report["configs"]["calibrated"]["recompute_span_starts"], report["configs"]["calibrated"]["kvcomm_tail"]
            ) == (1, 4)                                                       # the whole recipe reached the engine
    assert report["configs"]["corrected"]["recompute_ratio"] == 0.0
    assert calibrated["recomputed_tokens_mean"] > corrected["recomputed_tokens_mean"]   # its budget reached the engine
    for method in fidelity.GATE_TRACED:
        m = report["methods"][method]
        cells = [row["methods"][method] for row in report["rows"]]
        served = [c["kl"] if c["gate_reused"] else 0.0 for c in cells]   # a dense turn is exact
        assert m["served_kl_mean"] == pytest.approx(sum(served) / len(served))
        assert m["served_top1_agree"] == sum(c["top1_agree"] or not c["gate_reused"] for c in cells)
        assert m["gate_reuse_rate"] == pytest.approx(sum(c["gate_reused"] for c in cells) / len(cells))
    assert all(row["methods"]["kvcomm-calibrated"]["predicted_kl"] is not None for row in report["rows"])
    assert "reused" not in calibrated["gate_reasons"] and calibrated["served_top1_agree"] == calibrated["turns"]
    assert "new_anchor:low_margin" in fidelity.markdown_table(report)
    for method in fidelity.GATE_TRACED:     # what the gates' own decisions cost, fallbacks included
        cells = [row["methods"][method] for row in report["rows"]]
        assert report["methods"][method]["served_prepare_ms_mean"] == pytest.approx(
            sum(c["served_prepare_ms"] for c in cells) / len(cells))
    assert "| kvcomm-calibrated | " in "\n".join(fidelity_report.served_table(report))


def test_questions_come_from_the_requested_lines_only(tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"question": f"question {i}"}) + "\n" for i in range(20)))
    measured = load_questions(str(data), 4, seed=3, lines=(10, 20))
    warmup = load_questions(str(data), 6, skip=4, seed=3, lines=(10, 20))
    assert all(10 <= line < 20 for line, _ in measured + warmup)
    assert not {line for line, _ in measured} & {line for line, _ in warmup}
    assert measured == load_questions(str(data), 4, seed=3, lines=(10, 20))          # seeded
    with pytest.raises(ValueError, match="lines 10:20 .* hold 10 questions"):
        load_questions(str(data), 11, seed=3, lines=(10, 20))


def test_invariants(report):
    dense = report["methods"]["dense"]
    assert dense["kl_mean"] == pytest.approx(0.0, abs=1e-9)
    assert dense["top1_agree"] == dense["turns"]
    assert dense["greedy_exact"] == dense["turns"]
    assert dense["span_rel_err_v_mean"] == pytest.approx(0.0, abs=1e-6)
    for row in report["rows"]:
        for method, cell in row["methods"].items():
            assert cell["kl"] >= 0.0, (method, cell["kl"])
    # the diagnostic splices copy the oracle's own KV for their part
    assert report["methods"]["diag-exact-placeholders"]["placeholders_rel_err_v_mean"] == 0.0
    assert report["methods"]["diag-exact-fixed"]["fixed_rel_err_k_mean"] == 0.0
    # layer 0 KV depends only on token and position: every method without recompute gets it exactly
    assert report["methods"]["base-only"]["span_rel_err_v"][0] == pytest.approx(0.0, abs=1e-5)
    assert report["methods"]["kvcomm-corrected"]["span_rel_err_v"][0] == pytest.approx(0.0, abs=1e-5)


def test_plot_and_sweep(report, tiny_model, tmp_path):
    path = tmp_path / "fidelity.png"
    fidelity.plot(report, str(path))
    assert path.stat().st_size > 0
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS))
    setting = fidelity.Setting(questions=1, warmup=3, response_tokens=4, bootstrap=100, data=str(data))
    sweep = anchors.sweep_anchors(anchors=(1, 2), setting=setting, agents=_agents(), loaded=tiny_model,
                                  progress=False)
    assert [r["max_anchors"] for r in sweep["rows"]] == [1, 2]
    for row in sweep["rows"]:
        assert all(n <= row["max_anchors"] for n in row["anchors"].values())
        # the row's figures are its turns' own: every turn has one gate reason, the rate counts the reused ones
        assert sum(row["gate_reasons"].values()) == row["turns"] == 3
        assert row["gate_reuse_rate"] == row["gate_reasons"].get("reused", 0) / row["turns"]
        assert row["kl_ci95"][0] <= row["kl_mean"] <= row["kl_ci95"][1]
    assert "| 2 |" in anchors.markdown_table(sweep)
    anchors.plot(sweep, str(tmp_path / "sweep.png"))


def _tiny_engine(tiny_model):
    from kvcomm.engine import KVCommEngine
    from kvcomm.runner import ModelRunner
    return KVCommEngine(ModelRunner(tiny_model.spec, tiny_model.state_dict), tiny_model.tokenizer)


def test_force_reuse_measures_the_reuse_path_of_a_turn_the_gates_send_dense(tiny_model):
    """What the fidelity benchmark's forced methods rely on: with an empty pool the gates send a kvcomm turn
    dense (and stage an anchor); `force_reuse=True` assembles it from the cache instead, stages nothing, and is
    the very turn a prepare without any transaction gives."""
    from kvcomm.engine import TurnRequest
    from kvcomm.generation import Sampling
    engine = _tiny_engine(tiny_model)
    agent, sampling = _agents()[0], Sampling(max_new_tokens=4)
    question = engine.make_input(QUESTIONS[0])
    txn = engine.pool.begin("ns")
    engine.offer_content("ns", "user_question", question, txn)
    gated = engine.prepare(TurnRequest(agent, {"user_question": question}, "kvcomm", sampling, "ns", txn))
    staged = txn.staged_anchor_ids
    assert not gated.reused and staged, gated.reason         # sent dense, the question staged as an anchor
    forced = engine.prepare(TurnRequest(agent, {"user_question": question}, "kvcomm", sampling, "ns", txn),
                            force_reuse=True)
    assert forced.reused and forced.reason == "reused" and forced.recomputed < len(forced.prompt_ids)
    assert txn.staged_anchor_ids == staged                    # forced reuse stages nothing
    plain = engine.prepare(TurnRequest(agent, {"user_question": question}, "kvcomm", sampling, "ns"))
    assert torch.equal(forced.last_logits, plain.last_logits)
    engine.pool.abort(txn)
    for mode, force_dense in (("dense", False), ("dense-prefix", False), ("kvcomm", True)):
        with pytest.raises(ValueError, match="force_reuse"):
            engine.prepare(TurnRequest(agent, {"user_question": question}, mode, sampling, "ns",
                                       force_dense=force_dense), force_reuse=True)


def test_the_timing_hook_reports_every_stage_the_turn_result_records(tiny_model):
    """`engine.stage_listener` hears each stage as it ends; per stage its seconds add up to the turn's timings."""
    from kvcomm.engine import TurnRequest
    from kvcomm.generation import Sampling
    engine = _tiny_engine(tiny_model)
    heard: list[tuple[str, float]] = []
    engine.stage_listener = lambda stage, seconds: heard.append((stage, seconds))
    agent = _agents()[1]
    contents = {"user_question": engine.make_input(QUESTIONS[1]), "agent_1_current": engine.make_input("12")}
    for mode, stages in (("naive", {"fetch", "align", "offset", "prefill"}), ("dense", {"prefill"})):
        heard.clear()
        result = engine.run_turn(TurnRequest(agent, contents, mode, Sampling(max_new_tokens=2), "ns"))
        assert set(result.timings) == stages | {"decode"}, mode
        totals: dict[str, float] = {}
        for stage, seconds in heard:
            assert seconds >= 0.0
            totals[stage] = totals.get(stage, 0.0) + seconds
        assert set(totals) == (stages - {"offset"} if mode == "naive" else stages), (mode, totals)
        for stage, seconds in totals.items():
            assert result.timings[stage] == pytest.approx(seconds), (mode, stage)
    assert sum(stage == "align" for stage, _ in heard) == 0   # dense has no alignment
