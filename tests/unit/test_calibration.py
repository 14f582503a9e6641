"""kvcomm.calibration: the fit's choices, the file's round trip, how a config finds and takes a calibration, a
calibration written to disk and read back driving the turn gate's and the fidelity gate's decisions on the embedded
model, and a model without a calibration serving with a warning."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from kvcomm.anchor_pool import AnchorPool
from kvcomm.bench.calibrate import chosen_tokens
from kvcomm.calibration import (Calibration, CalibrationWarning, TurnMeasurement, cross_validate, find, fit,
                                model_key, recipe_label, resolve, wilson)
from kvcomm.config import UNCALIBRATED, KVCommConfig
from kvcomm.engine import KVCommEngine, TurnRequest, build_engine
from kvcomm.gate import first_token_margin
from kvcomm.generation import Sampling
from kvcomm.templates import AgentTemplate

MODEL = "smollm2-135m-instruct"


def _turns(ratio: float, kls: list[float], forecasts: list[float], prepare_ms: float,
           entropy: dict[int, float] | None = None) -> list[TurnMeasurement]:
    """Turns whose entropy ratio is 0 (the entropy gate never sends them dense) unless `entropy` says otherwise."""
    return [TurnMeasurement(ratio, kl, f, kl < 0.02, prepare_ms, (entropy or {}).get(i, 0.0))
            for i, (kl, f) in enumerate(zip(kls, forecasts))]


def test_fit_picks_the_cheapest_ratio_and_threshold_that_meet_both_targets():
    # ratio 0: KL too high on most turns; 0.1: meets KL 0.01 once the worst turn is gated out; 0.4: meets it with
    # no gate at all, but costs more
    low = [0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008, 0.009, 0.1]
    measurements = (_turns(0.0, [k * 5 for k in low], [k * 5 for k in low], 100.0)
                    + _turns(0.1, low, low, 150.0) + _turns(0.4, [k / 4 for k in low], [k / 4 for k in low], 300.0))
    calibration = fit(measurements, model=MODEL, target_kl=0.01, min_reuse=0.85, min_top1=0.0)   # KL alone
    assert calibration.met and calibration.knobs["recompute_ratio"] == 0.1
    assert calibration.knobs["kl_scale"] == pytest.approx(1.0)           # forecasts equal the measured KL
    assert calibration.knobs["gate_max_kl"] == pytest.approx(0.009)     # the 0.1 turn goes dense
    assert calibration.dev["reuse"] == pytest.approx(0.9) and calibration.dev["kl_reused"] == pytest.approx(0.005)
    assert calibration.predictor["spearman"] > 0.9
    assert calibration.knobs["gamma"] == 0.3                            # nothing to gain from a higher gamma
    # the entropy gate's own fallbacks count against the reuse rate: two turns the pool cannot vouch for (inf)
    # leave no room at any gamma ...
    strict = fit(_turns(0.1, low, low, 150.0, entropy={0: math.inf, 1: math.inf}), model=MODEL, target_kl=0.01,
                 min_reuse=0.85, min_top1=0.0)
    assert not strict.met and "highest reuse" in strict.why and strict.dev["reuse"] <= 0.8
    # ... but two turns gated out at entropy ratio 0.6 come back at gamma 0.7
    noisy = fit(_turns(0.1, low, low, 150.0, entropy={0: 0.6, 1: 0.6}), model=MODEL, target_kl=0.01,
                min_reuse=0.85, min_top1=0.0)
    assert noisy.met and noisy.knobs["gamma"] == 0.7 and noisy.dev["reuse"] == pytest.approx(0.9)
    hopeless = fit(_turns(0.0, [0.5] * 4, [0.5] * 4, 100.0), model=MODEL, target_kl=0.01, min_reuse=0.85)
    assert not hopeless.met and "lowest KL" in hopeless.why


def test_a_calibration_round_trips_through_its_file_with_an_infinite_threshold(tmp_path):
    calibration = Calibration(model=MODEL, knobs={"gamma": 0.5, "recompute_ratio": 0.2, "recompute_span_starts": 2,
                                                  "kvcomm_tail": "last_token", "recompute_max_tokens": 64.0,
                                                  "gate_max_kl": math.inf,
                                                  "kl_scale": 2.5, "gate_min_margin": 0.05},
                              target_kl=0.01, min_reuse=0.85, met=True, why="test",
                              dev={"threshold": math.inf, "reuse": 1.0})
    path = calibration.save(tmp_path / "cal.json")
    assert json.loads(path.read_text())["knobs"]["gate_max_kl"] is None          # strict JSON, no Infinity
    loaded = Calibration.load(path)
    assert loaded.knobs == calibration.knobs and loaded.dev["threshold"] is None
    assert type(loaded.knobs["recompute_span_starts"]) is int and loaded.knobs["kvcomm_tail"] == "last_token"
    assert KVCommConfig(calibration=str(path)).with_calibration(loaded.knobs).kvcomm_tail == "last_token"
    with pytest.raises(ValueError, match="recompute_ratio must be in"):
        Calibration(model=MODEL, knobs={**calibration.knobs, "recompute_ratio": 2.0}, target_kl=0.01, min_reuse=0.8,
                    met=False, why="")
    for bad, problem in (({"kvcomm_tail": "everything"}, "kvcomm_tail must be"),
                         ({"recompute_span_starts": 1.5}, "recompute_span_starts must be an integer")):
        (tmp_path / "badknob.json").write_text(json.dumps({**json.loads(path.read_text()),
                                                           "knobs": {**json.loads(path.read_text())["knobs"], **bad}}))
        with pytest.raises(ValueError, match=problem):
            Calibration.load(tmp_path / "badknob.json")
    (tmp_path / "bad.json").write_text("{\"format\": 99}")
    with pytest.raises(ValueError, match="not a format-4 calibration"):
        Calibration.load(tmp_path / "bad.json")
    # older files still load with what they meant: before format 4 a recipe had no bound, format 2 knew one recipe
    # shape (no span starts, the last segment recomputed whole), format 1 also had no fidelity gate (off)
    old = json.loads(path.read_text())
    del old["knobs"]["recompute_max_tokens"]
    (tmp_path / "three.json").write_text(json.dumps({**old, "format": 3}))
    assert Calibration.load(tmp_path / "three.json").knobs == {**calibration.knobs, "recompute_max_tokens": math.inf}
    for name in ("recompute_span_starts", "kvcomm_tail"):
        del old["knobs"][name]
    (tmp_path / "two.json").write_text(json.dumps({**old, "format": 2}))
    shape_2 = {**calibration.knobs, "recompute_span_starts": 0, "kvcomm_tail": "last_segment",
               "recompute_max_tokens": math.inf}
    assert Calibration.load(tmp_path / "two.json").knobs == shape_2
    del old["knobs"]["gate_min_margin"]
    (tmp_path / "old.json").write_text(json.dumps({**old, "format": 1}))
    assert Calibration.load(tmp_path / "old.json").knobs == {**shape_2, "gate_min_margin": 0.0}


def test_resolve_fills_only_unset_knobs_and_warns_without_a_calibration(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCOMM_CALIBRATION_DIR", str(tmp_path))
    with pytest.warns(CalibrationWarning, match="no calibration for model"):
        config, found = resolve(KVCommConfig(), MODEL)
    assert found is None and config.recompute_ratio == UNCALIBRATED["recompute_ratio"]
    with pytest.warns(CalibrationWarning) as caught:                         # it names only what it fills
        config, _ = resolve(KVCommConfig(gamma=1.0), MODEL)
    assert config.gamma == 1.0 and "recompute_ratio=0.0" in str(caught[0].message)
    assert "gamma" not in str(caught[0].message).split("uncalibrated")[1].split(";")[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve(KVCommConfig(calibration="none"), MODEL)                    # asked for none: no warning
    Calibration(model=MODEL, knobs={"gamma": 0.5, "recompute_ratio": 0.3, "recompute_span_starts": 0,
                                    "recompute_max_tokens": math.inf, "kvcomm_tail": "last_segment",
                                    "gate_max_kl": 0.02, "kl_scale": 3.0,
                                    "gate_min_margin": 0.1}, target_kl=0.01,
                min_reuse=0.85, met=True, why="").save(tmp_path / f"{MODEL}.json")
    assert find(MODEL) == tmp_path / f"{MODEL}.json" and model_key("/models/SmolLM2-135M-Instruct.gguf") == MODEL
    config, found = resolve(KVCommConfig(gate_max_kl=0.5), MODEL)
    assert found is not None and config.recompute_ratio == 0.3 and config.kl_scale == 3.0 and config.gamma == 0.5
    assert config.gate_min_margin == 0.1
    assert config.gate_max_kl == 0.5                                          # set by hand: kept
    with pytest.warns(CalibrationWarning, match="made for"):
        resolve(KVCommConfig(calibration=str(tmp_path / f"{MODEL}.json")), "llama-3.1-8b")


def _agent() -> AgentTemplate:
    return AgentTemplate("solver", "You are a careful math solver. Reason step by step.",
                         "Question:\n{user_question}\nAnswer with one number.")


@pytest.fixture(scope="module")
def recorder(smollm2_engine_parts) -> KVCommEngine:
    """An engine whose pool holds two anchors for the solver's question, each with its recorded deltas (tests
    only read it: their transactions are aborted)."""
    runner, tokenizer = smollm2_engine_parts
    recorder = KVCommEngine(runner, tokenizer, KVCommConfig(calibration="none"))
    txn = recorder.pool.begin("ns")
    for question in ("Tom has 3 apples and buys 5 more. How many apples?", "A box holds 6 eggs. How many in 9?"):
        content = recorder.make_input(question)
        recorder.offer_content("ns", "user_question", content, txn)
        recorder.prepare(TurnRequest(_agent(), {"user_question": content}, "kvcomm", Sampling(max_new_tokens=4),
                                     "ns", txn))
    recorder.pool.commit(txn)
    return recorder


def test_a_calibration_read_back_from_disk_drives_the_turn_gate(smollm2_engine_parts, recorder, tmp_path):
    runner, tokenizer = smollm2_engine_parts
    sampling = Sampling(max_new_tokens=4)
    anchors = recorder.pool.snapshot("ns").anchors("user_question")
    errors = [d.offset_error for a in anchors for d in a.deltas.values()]
    assert len(errors) == 2 and all(0.0 < e < 1.0 for e in errors)          # each anchor's own track record
    question = recorder.make_input("Sara reads 12 pages a day for 4 days. How many pages?")
    forecast = recorder.prepare(TurnRequest(_agent(), {"user_question": question}, "kvcomm", sampling, "ns",
                                            recorder.pool.begin("ns"))).forecast
    assert forecast is not None and forecast.predicted_kl > 0 and math.isinf(forecast.threshold)

    for factor, expect_reuse in ((0.5, False), (2.0, True)):
        path = Calibration(model=MODEL, knobs={"gamma": 0.3, "recompute_ratio": 0.0, "recompute_span_starts": 0,
                                               "recompute_max_tokens": math.inf, "kvcomm_tail": "last_segment",
                                               "kl_scale": 1.0,
                                               "gate_max_kl": factor * forecast.predicted_kl, "gate_min_margin": 0.0},
                           target_kl=0.01, min_reuse=0.85, met=True, why="test").save(tmp_path / f"cal{factor}.json")
        config, _ = resolve(KVCommConfig(calibration=str(path)), MODEL)
        engine = KVCommEngine(runner, tokenizer, config, recorder.pool)
        txn = engine.pool.begin("ns")
        content = engine.make_input("Sara reads 12 pages a day for 4 days. How many pages?")
        prepared = engine.prepare(TurnRequest(_agent(), {"user_question": content}, "kvcomm", sampling, "ns", txn))
        assert prepared.reused == expect_reuse, (factor, prepared.reason)
        assert prepared.forecast.predicted_kl == pytest.approx(forecast.predicted_kl, rel=1e-4)
        if not expect_reuse:   # the fallback teaches the pool: the content is staged with this consumer's deltas
            assert prepared.reason == "new_anchor:predicted_kl"
            assert content.gate_reason["user_question"] == "predicted_kl" and txn.staged_anchor_ids
        engine.pool.abort(txn)


def test_fit_buys_first_token_agreement_with_the_fidelity_gate_when_that_is_cheaper_than_recompute():
    # ratio 0.1: KL fine, but 3 turns in 200 lose their first token, and they have the smallest margins; ratio 0.4:
    # every first token agrees, at twice the preparation. The target is the 95% lower bound of the served
    # agreement (Wilson): at 200 turns >= 97% allows one disagreement
    def turns(ratio, prepare_ms, dense_ms, wrong=()):
        return [TurnMeasurement(ratio, 0.004, 0.004, i not in wrong, prepare_ms, 0.0, margin=0.001 * (i + 1),
                                dense_ms=dense_ms) for i in range(200)]
    cheap_fallback = fit(turns(0.1, 150.0, 1000.0, wrong={0, 1, 2}) + turns(0.4, 300.0, 1000.0), model=MODEL,
                         target_kl=0.01, min_reuse=0.85)
    assert cheap_fallback.met and cheap_fallback.knobs["recompute_ratio"] == 0.1
    # the two smallest margins go dense (the threshold halfway to the third): 199/200 served agree, bound >= 97%
    assert cheap_fallback.knobs["gate_min_margin"] == pytest.approx(0.0025)
    assert cheap_fallback.dev["top1_served"] == pytest.approx(0.995) and cheap_fallback.dev["reuse"] == 0.99
    assert cheap_fallback.dev["top1_served_lower95"] == pytest.approx(wilson(199, 200)[0])
    assert wilson(199, 200)[0] >= 0.97 > wilson(198, 200)[0]
    assert cheap_fallback.dev["cost_ms"] == pytest.approx((200 * 150 + 2 * 1000) / 200)   # a fallback pays both
    assert cheap_fallback.predictor["margin_auc_per_recipe"]["10%"] == 1.0
    # when a dense prefill costs more than the recompute saves, the recompute wins
    dear_fallback = fit(turns(0.1, 150.0, 20000.0, wrong={0, 1, 2}) + turns(0.4, 300.0, 20000.0), model=MODEL,
                        target_kl=0.01, min_reuse=0.85)
    assert dear_fallback.knobs["recompute_ratio"] == 0.4 and dear_fallback.knobs["gate_min_margin"] == 0.0
    # too few turns to bound agreement at 97% (96 turns, all agreeing: >= 96.2%): not met, the best bound kept
    few = fit(turns(0.4, 300.0, 1000.0)[:96], model=MODEL, target_kl=0.01, min_reuse=0.85)
    assert not few.met and "best top-1 bound" in few.why and few.dev["top1_served"] == 1.0


def test_the_fidelity_gate_sends_a_turn_dense_exactly_below_its_margin_and_serves_dense_tokens(
        smollm2_engine_parts, recorder):
    runner, tokenizer = smollm2_engine_parts
    question = "Sara reads 12 pages a day for 4 days. How many pages?"
    sampling = Sampling(max_new_tokens=3)
    reused = recorder.prepare(TurnRequest(_agent(), {"user_question": recorder.make_input(question)}, "kvcomm",
                                          sampling, "ns"), force_reuse=True)
    margin = first_token_margin(reused.last_logits[-1])
    assert 0.0 < margin < 1.0
    oracle = recorder.run_turn(TurnRequest(_agent(), {"user_question": recorder.make_input(question)}, "dense",
                                           sampling, "ns"))
    for threshold, expect_reuse in ((margin * 1.001, False), (margin * 0.999, True)):
        engine = KVCommEngine(runner, tokenizer, KVCommConfig(calibration="none", gate_min_margin=threshold),
                              recorder.pool)
        txn = engine.pool.begin("ns")
        content = engine.make_input(question)
        result = engine.run_turn(TurnRequest(_agent(), {"user_question": content}, "kvcomm", sampling, "ns", txn))
        assert result.reused == expect_reuse, (threshold, margin, result.reason)
        assert result.predicted_kl is not None and result.predicted_kl > 0     # the forecast is reported either way
        if expect_reuse:
            assert first_token_margin(result.first_logits) == pytest.approx(margin, rel=1e-5)
        else:   # why it went dense, the pool learns from it, and what it serves is dense's own output
            assert result.reason == "new_anchor:low_margin" and content.gate_reason["user_question"] == "low_margin"
            assert txn.staged_anchor_ids
            assert result.token_ids == oracle.token_ids and torch.equal(result.first_logits, oracle.first_logits)
        engine.pool.abort(txn)


def test_a_model_without_a_calibration_still_serves_with_a_warning(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KVCOMM_CALIBRATION_DIR", str(tmp_path))             # no calibration file there
    with pytest.warns(CalibrationWarning, match="serving uncalibrated"):
        engine = build_engine(tiny_model_dir, random_weights=True)
    assert {name: getattr(engine.config, name) for name in UNCALIBRATED} == UNCALIBRATED
    txn = engine.pool.begin("ns")
    content = engine.make_input("Tom has 3 apples and buys 5 more. How many apples?")
    engine.offer_content("ns", "user_question", content, txn)
    result = engine.run_turn(TurnRequest(_agent(), {"user_question": content}, "kvcomm", Sampling(max_new_tokens=3),
                                         "ns", txn))
    assert len(result.token_ids) == 3 and result.reason.startswith("new_anchor:")   # a cold pool: dense, learning


def test_fit_chooses_among_recipe_shapes_and_the_chosen_shape_is_what_the_config_gets():
    """Recipes of the same ratio but another shape are separate candidates: the cheapest one meeting the targets
    wins, whatever its shape, and the knobs carry its span starts and tail."""
    def turns(ratio, kl, prepare_ms, **shape):
        return [TurnMeasurement(ratio, kl, kl, True, prepare_ms, 0.0, margin=0.5, dense_ms=1000.0, **shape)
                for _ in range(200)]
    measured = (turns(0.2, 0.02, 200.0) + turns(0.2, 0.005, 210.0, span_starts=2)
                + turns(0.25, 0.006, 180.0, span_starts=2, kvcomm_tail="last_token") + turns(0.4, 0.003, 300.0))
    calibration = fit(measured, model=MODEL, target_kl=0.01, min_reuse=0.85)
    assert calibration.met
    assert {k: calibration.knobs[k] for k in ("recompute_ratio", "recompute_span_starts", "kvcomm_tail")} == {
        "recompute_ratio": 0.25, "recompute_span_starts": 2, "kvcomm_tail": "last_token"}
    assert [recipe_label(c["ratio"], c["span_starts"], c["kvcomm_tail"]) for c in calibration.candidates] == [
        "20%", "20%+s2", "25%+s2+qtail", "40%"]
    config = KVCommConfig(calibration="none").with_calibration(calibration.knobs)
    assert (config.recompute_ratio, config.recompute_span_starts, config.kvcomm_tail) == (0.25, 2, "last_token")
    assert calibration.knobs["recompute_max_tokens"] == math.inf        # the turns' counts were not measured


def test_the_chosen_recipe_is_bounded_by_the_most_it_recomputed_on_a_development_turn():
    """recompute_max_tokens is the chosen recipe's largest count of recomputed cached tokens on the development
    turns (another recipe's counts do not matter); the counts come from the Pareto rows: recomputed tokens less the
    recipe's tail (naive's last segment, its last N, or the last token)."""
    def turns(ratio, prepare_ms, counts, **shape):
        return [TurnMeasurement(ratio, 0.004, 0.004, True, prepare_ms, 0.0, margin=0.5, dense_ms=1000.0,
                                chosen_tokens=counts[i % len(counts)], **shape) for i in range(200)]
    chosen = fit(turns(0.3, 200.0, [20, 57, 31]) + turns(0.4, 300.0, [90, 120]), model=MODEL, target_kl=0.01,
                 min_reuse=0.85)
    assert chosen.knobs["recompute_ratio"] == 0.3 and chosen.knobs["recompute_max_tokens"] == 57
    row = {"prompt_tokens": 200, "variants": {"naive": {"recomputed_tokens": 30}}}
    assert chosen_tokens({"recomputed_tokens": 75}, row, "last_segment") == 45
    assert chosen_tokens({"recomputed_tokens": 50}, row, 8) == 42
    assert chosen_tokens({"recomputed_tokens": 50}, row, 100) == 20                    # N beyond the segment
    assert chosen_tokens({"recomputed_tokens": 50}, row, "last_token") == 49
    unmeasured = {"prompt_tokens": 200, "variants": {}}                                    # naive not measured
    assert chosen_tokens({"recomputed_tokens": 50}, unmeasured, "last_segment") == -1


def test_the_preparation_cap_against_naive_decides_before_the_cost_per_turn():
    """With a cap, a recipe whose reused turns prepare beyond max_vs_naive x naive's (on the same turns) does not
    qualify even when its fallbacks make it cheaper per turn; when nothing fits under the cap the cap is dropped
    (the cheapest per turn again) and the calibration says the targets are not met."""
    def turns(ratio, prepare_ms, wrong=(), **shape):
        return [TurnMeasurement(ratio, 0.004, 0.004, i not in wrong, prepare_ms, 0.0, margin=0.001 * (i + 1),
                                dense_ms=600.0, naive_ms=100.0, **shape) for i in range(200)]
    slow_sure = turns(0.3, 150.0)                                        # 1.5x naive, nothing sent back
    quick_fragile = turns(0.1, 125.0, wrong=set(range(12)), kvcomm_tail=8)   # 1.25x, 11 turns sent back
    uncapped = fit(slow_sure + quick_fragile, model=MODEL, target_kl=0.01, min_reuse=0.85)
    assert uncapped.knobs["recompute_ratio"] == 0.3 and uncapped.met            # cheaper per turn
    capped = fit(slow_sure + quick_fragile, model=MODEL, target_kl=0.01, min_reuse=0.85, max_vs_naive=1.3)
    assert capped.met and (capped.knobs["recompute_ratio"], capped.knobs["kvcomm_tail"]) == (0.1, 8)
    assert capped.dev["prepare_vs_naive"] == pytest.approx(1.25) and capped.max_vs_naive == 1.3
    assert capped.dev["cost_ms"] > uncapped.dev["cost_ms"]
    too_tight = fit(slow_sure + quick_fragile, model=MODEL, target_kl=0.01, min_reuse=0.85, max_vs_naive=1.1)
    assert not too_tight.met and "within 1.1x naive" in too_tight.why
    assert too_tight.knobs["recompute_ratio"] == 0.3 and too_tight.dev == uncapped.dev


def test_a_margin_fitted_to_the_few_turns_that_disagree_must_hold_out_of_sample():
    """Two recipes that both pass once the margin gate is fitted on all turns: in one the turns that lose their
    first token all have small margins; in the other one question's two such turns have margins above every other
    question's, so a threshold chosen without that question misses both. Only the first passes the cross-validated
    check, and the fit takes it although the other is cheaper."""
    def turns(ratio, prepare_ms, wrong_margins):
        out = []
        for question in range(64):
            for agent in range(3):
                i = 3 * question + agent
                wrong = i in wrong_margins
                out.append(TurnMeasurement(ratio, 0.004, 0.004, not wrong, prepare_ms, 0.0,
                                           margin=wrong_margins.get(i, 0.2 + 0.001 * i), dense_ms=1000.0,
                                           group=question))
        return out
    tight = turns(0.3, 200.0, {0: 0.001, 3: 0.0011, 6: 0.0012, 9: 0.0013})          # all far below the rest
    scattered = turns(0.1, 150.0, {0: 0.05, 1: 0.06, 3: 0.01, 6: 0.012, 9: 0.014})   # question 0's are high
    assert cross_validate(tight, 0.97)["top1_served"] == 191 / 192             # only the largest escapes
    assert cross_validate(scattered, 0.97)["top1_served"] == 190 / 192         # question 0's two escape
    chosen = fit(tight + scattered, model=MODEL, target_kl=0.01, min_reuse=0.85)
    assert chosen.met and chosen.knobs["recompute_ratio"] == 0.3
    assert chosen.dev["cv"]["reuse"] >= 0.85 and chosen.dev["cv"]["top1_served_lower95"] >= 0.97
    alone = fit(scattered, model=MODEL, target_kl=0.01, min_reuse=0.85)              # in-sample it would pass
    assert not alone.met and alone.dev["top1_served_lower95"] >= 0.97
