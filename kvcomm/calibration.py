"""Per-model calibration: the entropy gate's gamma, kvcomm's recompute recipe, the turn gate's threshold and scale,
and the fidelity gate's margin, fitted on measured KL and first-token agreement.

This module owns the calibration file (`Calibration`, JSON), where a model's file is found (`find`: the config's
``calibration`` knob, "auto" = ``<calibration dir>/<model name>.json``), how a config takes its values (`resolve`:
the per-model knobs left at None take the calibration's; a model without a calibration still serves, uncalibrated,
with a `CalibrationWarning`), and the fit itself (`fit`, pure arithmetic on per-turn measurements). Measuring is
`kvcomm calibrate`'s job (`kvcomm.bench.calibrate`).

The fit. Input: for every measured turn of a development split and every candidate recompute recipe r (a share of
the reused span chosen by the query, the first k tokens of every placeholder, and the tail: the last fixed segment
recomputed whole, or only its last N tokens with the query choosing among the segment's others), the KL of
kvcomm (forced reuse) against dense, the turn gate's raw forecast s (its predicted KL at kl_scale = 1), the turn's
first-token agreement, its reused first token's margin (top-1 minus top-2 probability: the fidelity gate's signal),
its prepare time and its dense prefill time, and its entropy ratio e (the largest entropy / log2(N) of the entropy
gate's decisions on the contents it reads, inf where the pool cannot vouch at all): the entropy gate sends it dense
at gamma iff e > gamma.

1. kl_scale = exp(mean(log KL - log s)) over every (turn, r): the scale under which the forecast is right in the
   geometric mean (the forecast is a first-order model; only its scale is fitted).
2. Every (recipe r, gamma, KL threshold, margin) choice, gamma in `GAMMAS`, the thresholds being those seen at r that
   send at most `MAX_GATED` of the turns dense (and inf / 0: never): a turn is reused when no gate sends it dense.
   A choice meets the targets when, so that they hold on unseen turns too and not just on these, the 95% upper
   bound of the mean KL over its reused turns (normal approximation: mean + 1.96 sd / sqrt(n)) is <= target_kl
   and the 95% lower bound (Wilson) of the first-token agreement of the served turns (a dense turn agrees) is >=
   min_top1, and its reuse rate is >= min_reuse. (A lower bound needs enough turns: at 97%, 192 turns allow one
   disagreement, 96 none.) With a preparation cap (`max_vs_naive`, the measurements carrying naive reuse's time on
   the same turns) a reused turn must also prepare within that multiple of naive's; when none does the cap is
   dropped (`met` false, `why` says so) rather than traded for fidelity, reuse or the cost per turn. A recipe
   qualifies only if its fidelity gate also holds out of sample (`cross_validate`): the development questions in
   `FOLDS` folds, the margin chosen on the other folds by the same rule (the smallest meeting min_top1's bound)
   and applied to the fold left out, the out-of-fold reuse must reach min_reuse and the out-of-fold agreement's
   bound min_top1. (A margin fitted to the few turns that disagree is fitted to them: on held-out questions a low
   recompute share with a tight margin lost first tokens that 30% did not.) Among those the cheapest wins: the mean preparation per turn, a turn gated before its
   reused prefill costing a dense prefill, one the fidelity gate sends back after it costing both (then the
   highest reuse, the smallest gamma: the pool learns more). If none meets all three, the highest reuse among
   those meeting the fidelity targets; if none meets them, the best top-1 bound among those keeping KL; else the
   lowest KL bound. Which case applied is recorded (`met`, `why`). Replaying gamma on a fixed pool ignores that a
   higher gamma also teaches the pool less: the fidelity benchmark's calibrated pool, warmed with the chosen gamma, measures that effect.

How well each gate's signal predicts what it guards is recorded too (`predictor`): the forecast's Spearman against
KL, and the margin's ROC AUC for first-token disagreement.

The chosen recipe is bounded (`recompute_max_tokens`, `measured_bound`): no turn recomputes more cached tokens
than the recipe did on any development turn. A share of the reused span grows with the content; without the bound
the embedded model's 30% recomputed 974 tokens at agent 5 of the paper's Table-2 setting (3,072 reused tokens),
20x naive reuse's preparation, where the development turns never asked for more than 91.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .config import UNCALIBRATED, KVCommConfig

FORMAT = 4
# what older formats' files leave out: format 1 had no fidelity gate (it never falls back); formats 1 and 2 knew
# one recipe shape (the query-chosen share only, the last fixed segment recomputed whole); before format 4 a
# recipe's budget had no bound
_UNBOUNDED_BEFORE_4 = {"recompute_max_tokens": math.inf}
_RECIPE_BEFORE_3 = {"recompute_span_starts": 0, "kvcomm_tail": "last_segment", **_UNBOUNDED_BEFORE_4}
OLD_FORMATS = {1: {"gate_min_margin": 0.0, **_RECIPE_BEFORE_3}, 2: _RECIPE_BEFORE_3, 3: _UNBOUNDED_BEFORE_4}
GAMMAS = (0.3, 0.5, 0.7, 1.0)      # entropy-gate gammas the fit considers (0.3: the paper's default)
FOLDS = 4                          # the fidelity gate's out-of-sample check: folds of development questions
Z95 = 1.96                         # the normal quantile of every 95% bound the fit uses
MAX_GATED = 0.3                    # the fit tries gate thresholds sending up to this share of turns dense
# the repository's configs/calibration/ (a source checkout); KVCOMM_CALIBRATION_DIR points elsewhere
DEFAULT_DIR = Path(__file__).resolve().parents[1] / "configs" / "calibration"


class CalibrationWarning(UserWarning):
    """A model serves without a calibration (uncalibrated knobs), or with one made for another model."""


@dataclass(frozen=True)
class TurnMeasurement:
    """One development turn at one recompute recipe (what `fit` needs)."""
    ratio: float                 # the recipe: the query-chosen share of the reused span (with span_starts and
                                 # kvcomm_tail below)
    kl: float                    # KL(dense || kvcomm) with forced reuse
    forecast: float              # the turn gate's predicted KL at kl_scale = 1
    top1_agree: bool
    prepare_ms: float
    entropy_ratio: float         # the entropy gate sends this turn dense at gamma iff entropy_ratio > gamma
    margin: float = math.inf     # the reused first token's top-1 minus top-2 probability (the fidelity gate's signal)
    dense_ms: float = 0.0        # what a fallback costs: the turn's exact prefill after the agent's own prefix
    naive_ms: float = 0.0        # the turn's naive reuse (the preparation cap's yardstick; 0: not measured)
    group: int = -1              # the turn's question (folds never split one); -1: unknown, a fold per turn
    span_starts: int = 0         # the recipe's first k tokens of every placeholder
    kvcomm_tail: str | int = "last_segment"   # the recipe's tail (`KVCommConfig.kvcomm_tail`)
    chosen_tokens: int = -1      # the cached tokens the recipe recomputed on this turn (-1: not measured)

    @property
    def recipe(self) -> tuple[float, int, str | int]:
        return (self.ratio, self.span_starts, self.kvcomm_tail)


def recipe_label(ratio: float, span_starts: int = 0, kvcomm_tail: str | int = "last_segment") -> str:
    """A recipe's short name: "20%", "20%+s2" (first 2 tokens of every placeholder too), "20%+s2+qtail" (only the
    last token recomputed, the last fixed segment's others open to the query's choice), "20%+t8" (the last 8)."""
    tail = {"last_segment": "", "last_token": "+qtail"}.get(kvcomm_tail, f"+t{kvcomm_tail}")   # type: ignore[arg-type]
    return f"{ratio:.0%}" + (f"+s{span_starts}" if span_starts else "") + tail


@dataclass(frozen=True)
class Calibration:
    model: str
    knobs: dict[str, Any]                    # gamma, recompute_ratio, recompute_span_starts, kvcomm_tail,
                                             # recompute_max_tokens (inf: no bound), gate_max_kl (inf: never),
                                             # kl_scale, gate_min_margin (0: never)
    target_kl: float
    min_reuse: float
    met: bool                                # the chosen knobs meet every target on the development turns
    why: str
    min_top1: float = 0.97
    max_vs_naive: float | None = None        # the preparation cap the fit was given (None: none)
    dev: dict[str, Any] = field(default_factory=dict)        # the chosen knobs' figures on the development turns
    candidates: list[dict[str, Any]] = field(default_factory=list)   # the best choice per recipe
    predictor: dict[str, Any] = field(default_factory=dict)  # how well each gate's signal predicts what it guards
    data: dict[str, Any] = field(default_factory=dict)       # where the development turns came from
    format: int = FORMAT

    def __post_init__(self) -> None:
        unknown = sorted(set(self.knobs) - set(UNCALIBRATED))
        missing = sorted(set(UNCALIBRATED) - set(self.knobs))
        if unknown or missing:
            raise ValueError(f"a calibration sets exactly {', '.join(UNCALIBRATED)}; unknown: {unknown or '-'}, "
                             f"missing: {missing or '-'}")
        KVCommConfig().with_(**self.knobs)       # the config's own checks

    # ---- files ------------------------------------------------------------------------------------------------
    def to_json(self) -> str:
        """JSON with every infinite number (a threshold that never falls back) written as null."""
        return json.dumps(_finite(asdict(self)), indent=2, allow_nan=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"calibration file {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"calibration file {path} is not JSON: {exc}") from None
        if not isinstance(data, dict) or (data.get("format") != FORMAT and data.get("format") not in OLD_FORMATS):
            raise ValueError(f"calibration file {path}: not a format-{FORMAT} calibration (kvcomm calibrate writes "
                             f"one)")
        knobs = {**OLD_FORMATS.get(data["format"], {}), **dict(data.get("knobs", {}))}
        data["format"] = FORMAT
        try:
            return cls(**{**data, "knobs": {k: _knob(k, v) for k, v in knobs.items()}})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"calibration file {path}: {exc}") from None


# ------------------------------------------------------------------------------------------------------------
# Finding a model's calibration and applying it
# ------------------------------------------------------------------------------------------------------------
def calibration_dir() -> Path:
    return Path(os.environ.get("KVCOMM_CALIBRATION_DIR") or DEFAULT_DIR)


def model_key(model: str) -> str:
    """The name a model's calibration file carries: the model's name or the last part of its path, lowercase."""
    name = Path(str(model).rstrip("/")).name.lower()
    return name[:-5] if name.endswith(".gguf") else name


def find(model: str, calibration: str = "auto") -> Path | None:
    """The calibration file a config's ``calibration`` knob names for `model`: "auto" -> the calibration
    directory's ``<model key>.json`` when it exists (else None), "none" -> None, anything else -> that path."""
    if calibration == "none":
        return None
    if calibration == "auto":
        path = calibration_dir() / f"{model_key(model)}.json"
        return path if path.is_file() else None
    return Path(calibration)


def resolve(config: KVCommConfig, model: str) -> tuple[KVCommConfig, Calibration | None]:
    """`config` with its per-model knobs filled: from `model`'s calibration when there is one, else uncalibrated
    (`kvcomm.config.UNCALIBRATED`) with a `CalibrationWarning`. Knobs set in the config keep their values."""
    if config.calibrated:
        return config, None
    path = find(model, config.calibration)
    if path is None:
        if config.calibration != "none":
            warnings.warn(f"no calibration for model {model!r} (looked for {calibration_dir()}/"
                          f"{model_key(model)}.json): serving uncalibrated ({_describe(_unset(config))}); run "
                          f"`kvcomm calibrate --model {model}` to fit one", CalibrationWarning, stacklevel=2)
        return config.with_calibration(), None
    calibration = Calibration.load(path)
    if model_key(calibration.model) != model_key(model):
        warnings.warn(f"calibration {path} was made for {calibration.model!r}, not {model!r}",
                      CalibrationWarning, stacklevel=2)
    return config.with_calibration(calibration.knobs), calibration


def _knob(name: str, value: Any) -> Any:
    """A knob as JSON holds it, typed: span starts and a tail count integers, a tail name a string, the rest floats
    (null: an infinite threshold)."""
    if value is None:
        return math.inf
    if name == "kvcomm_tail" and isinstance(value, str):     # a policy name, else a token count
        return value
    if name in ("kvcomm_tail", "recompute_span_starts"):
        if float(value) != int(value):
            raise ValueError(f"knob {name} must be an integer, got {value!r}")
        return int(value)
    return float(value)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _unset(config: KVCommConfig) -> dict[str, float]:
    """The uncalibrated values of the per-model knobs `config` leaves unset (those it sets keep theirs)."""
    return {k: v for k, v in UNCALIBRATED.items() if getattr(config, k) is None}


def _describe(knobs: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v}" for k, v in knobs.items())


# ------------------------------------------------------------------------------------------------------------
# The fit
# ------------------------------------------------------------------------------------------------------------
def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman rank correlation of two equally long sequences (NaN when undefined)."""
    def ranks(values: Sequence[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        for rank, index in enumerate(order):
            out[index] = float(rank)
        return out
    rx, ry = ranks(xs), ranks(ys)
    n = len(rx)
    if n < 2:
        return math.nan
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var else math.nan


def _evaluate(turns: Sequence[TurnMeasurement], scale: float, gamma: float, threshold: float,
              min_margin: float) -> dict[str, Any]:
    """One (gamma, KL threshold, margin) choice replayed on one ratio's turns: reuse, KL on reused turns and its 95%
    bound, served first-token agreement, and the preparation cost per turn (`_cost_ms`)."""
    before = [t for t in turns if t.entropy_ratio <= gamma and scale * t.forecast <= threshold]
    reused = [t for t in before if t.margin >= min_margin]
    kls = [t.kl for t in reused]
    mean = sum(kls) / len(kls) if kls else 0.0
    spread = math.sqrt(sum((k - mean) ** 2 for k in kls) / (len(kls) - 1)) if len(kls) > 1 else 0.0
    cost = sum(t.dense_ms for t in turns) + sum(t.prepare_ms for t in before) - sum(t.dense_ms for t in reused)
    agree = sum(t.top1_agree for t in reused) + len(turns) - len(reused)          # a dense turn agrees
    return {"gamma": gamma, "threshold": threshold, "min_margin": min_margin, "reuse": len(reused) / len(turns),
            "margin_gated": (len(before) - len(reused)) / len(turns),
            "kl_reused": mean, "kl_reused_upper95": mean + Z95 * spread / math.sqrt(max(1, len(kls))),
            "top1_served": agree / len(turns), "top1_served_lower95": wilson(agree, len(turns))[0],
            "prepare_ms_reused": sum(t.prepare_ms for t in reused) / len(reused) if reused else math.inf,
            "prepare_vs_naive": (sum(t.prepare_ms for t in reused) / sum(t.naive_ms for t in reused)
                                 if reused and all(t.naive_ms > 0 for t in reused) else math.inf),
            "cost_ms": cost / len(turns)}


def cross_validate(turns: Sequence[TurnMeasurement], min_top1: float, folds: int = FOLDS) -> dict[str, float]:
    """The fidelity gate out of sample, on one recipe's turns: per fold of questions, the smallest margin threshold
    whose served agreement on the other folds keeps its 95% lower bound >= min_top1, applied to the fold; the
    out-of-fold reuse, agreement and its bound (the entropy and turn gates left out)."""
    groups = [t.group if t.group >= 0 else -1 - i for i, t in enumerate(turns)]   # no question: a group per turn
    fold_of = {g: i % folds for i, g in enumerate(sorted(set(groups)))}
    keys = [fold_of[g] for g in groups]
    agree = reused = 0
    for k in range(folds):
        train = [t for t, f in zip(turns, keys) if f != k]
        test = [t for t, f in zip(turns, keys) if f == k]
        if not train or not test:
            continue
        margin = next((m for m in [0.0] + sorted(math.nextafter(t.margin, math.inf) for t in train)
                       if wilson(_served_agreement(train, m), len(train))[0] >= min_top1), math.inf)
        agree += _served_agreement(test, margin)
        reused += sum(t.margin >= margin for t in test)
    return {"reuse": reused / len(turns), "top1_served": agree / len(turns),
            "top1_served_lower95": wilson(agree, len(turns))[0]}


def _served_agreement(turns: Sequence[TurnMeasurement], min_margin: float) -> int:
    """Turns whose served first token is dense's at this margin threshold (a turn sent back is dense)."""
    return sum(t.top1_agree or t.margin < min_margin for t in turns)


def _low_margins(turns: Sequence[TurnMeasurement], share: float) -> list[float]:
    """Fidelity-gate thresholds to try: 0 (never) and the midpoints between the lowest margins, gating up to
    `share` of the turns."""
    margins = sorted(t.margin for t in turns if math.isfinite(t.margin))
    count = min(len(margins) - 1, math.ceil(share * len(turns)))
    return [0.0] + [(margins[i] + margins[i + 1]) / 2 for i in range(max(0, count))]


def fit(measurements: Sequence[TurnMeasurement], *, model: str, target_kl: float, min_reuse: float,
        min_top1: float = 0.97, max_vs_naive: float | None = None, data: Mapping[str, Any] | None = None,
        gammas: Sequence[float] = GAMMAS, max_gated: float = MAX_GATED) -> Calibration:
    """The calibration for `model` from development measurements (see the module docstring)."""
    if not measurements:
        raise ValueError("fit needs measurements")
    if target_kl <= 0 or not 0 <= min_reuse <= 1 or not 0 <= min_top1 <= 1:
        raise ValueError(f"need target_kl > 0, min_reuse and min_top1 in [0, 1]; got {target_kl}, {min_reuse}, "
                         f"{min_top1}")
    logs = [math.log(max(t.kl, 1e-9)) - math.log(max(t.forecast, 1e-9)) for t in measurements]
    scale = math.exp(sum(logs) / len(logs))
    by_recipe: dict[tuple[float, int, str | int], list[TurnMeasurement]] = {}
    for t in measurements:
        by_recipe.setdefault(t.recipe, []).append(t)
    by_recipe = dict(sorted(by_recipe.items(), key=lambda item: _recipe_order(item[0])))
    options_by_recipe = {}
    for (ratio, starts, tail), turns in by_recipe.items():
        forecasts = sorted({scale * t.forecast for t in turns})
        thresholds = forecasts[max(0, len(forecasts) - 1 - math.ceil(max_gated * len(turns))):] + [math.inf]
        margins = _low_margins(turns, max_gated)
        held_out = cross_validate(turns, min_top1)
        options_by_recipe[ratio, starts, tail] = [
            {"ratio": ratio, "span_starts": starts, "kvcomm_tail": tail, **_evaluate(turns, scale, gamma, th, m),
             "cv": held_out} for gamma in gammas for th in thresholds for m in margins]
    options = [o for recipe_options in options_by_recipe.values() for o in recipe_options]
    faithful = [o for o in options if o["kl_reused_upper95"] <= target_kl and o["top1_served_lower95"] >= min_top1
                and o["cv"]["top1_served_lower95"] >= min_top1]
    both = [o for o in faithful if o["reuse"] >= min_reuse and o["cv"]["reuse"] >= min_reuse]
    capped = [o for o in both if max_vs_naive is None or o["prepare_vs_naive"] <= max_vs_naive]
    cap = "" if max_vs_naive is None else f", a reused turn within {max_vs_naive}x naive's preparation"
    if capped:
        best = min(capped, key=lambda o: (o["cost_ms"], -o["reuse"], o["gamma"], -o["threshold"], o["min_margin"]))
        why = f"the cheapest choice (preparation per turn, fallbacks included) meeting every target{cap}"
    elif both:     # the cap is dropped, not traded for fidelity, reuse or the cost per turn
        best = min(both, key=lambda o: (o["cost_ms"], -o["reuse"], o["gamma"], -o["threshold"], o["min_margin"]))
        why = (f"no choice meeting the fidelity and reuse targets prepares a reused turn within {max_vs_naive}x "
               f"naive's: the cheapest of them (preparation per turn, fallbacks included)")
    elif faithful:
        best = max(faithful, key=lambda o: (o["reuse"], -o["cost_ms"], -o["gamma"]))
        why = (f"no choice reaches reuse >= {min_reuse:.0%} at KL <= {target_kl} (95% bound) and top-1 >= "
               f"{min_top1:.0%}: the highest reuse that keeps them")
    elif any(o["kl_reused_upper95"] <= target_kl for o in options):
        best = max((o for o in options if o["kl_reused_upper95"] <= target_kl),
                   key=lambda o: (o["top1_served_lower95"], o["reuse"], -o["cost_ms"]))
        why = (f"no choice keeps KL <= {target_kl} and top-1 >= {min_top1:.0%} (95% bounds): the best top-1 bound "
               f"that keeps KL")
    else:
        best = min(options, key=lambda o: (o["kl_reused_upper95"], -o["reuse"]))
        why = f"no choice keeps KL <= {target_kl} (95% bound): the lowest KL bound"
    candidates = []
    for recipe, mine in options_by_recipe.items():
        fitting = [o for o in both if _recipe(o) == recipe]
        candidates.append(min(fitting, key=lambda o: (o["cost_ms"], -o["reuse"])) if fitting
                          else min(mine, key=lambda o: (o["kl_reused_upper95"] > target_kl,
                                                        -o["top1_served_lower95"], -o["reuse"])))
    predictor = {"turns": len(measurements), "spearman": spearman([t.forecast for t in measurements],
                                                                  [t.kl for t in measurements]),
                 "spearman_per_recipe": {recipe_label(*r): spearman([t.forecast for t in ts], [t.kl for t in ts])
                                         for r, ts in by_recipe.items()},
                 "margin_auc_per_recipe": {recipe_label(*r): auc([-t.margin for t in ts],
                                                                 [not t.top1_agree for t in ts])
                                           for r, ts in by_recipe.items()}}
    knobs = {"gamma": best["gamma"], "recompute_ratio": best["ratio"], "recompute_span_starts": best["span_starts"],
             "kvcomm_tail": best["kvcomm_tail"], "recompute_max_tokens": measured_bound(by_recipe[_recipe(best)]),
             "gate_max_kl": best["threshold"], "kl_scale": scale, "gate_min_margin": best["min_margin"]}
    return Calibration(model=model_key(model), target_kl=target_kl, min_reuse=min_reuse, min_top1=min_top1,
                       knobs=knobs, met=bool(capped), why=why, max_vs_naive=max_vs_naive, dev=best,
                       candidates=candidates, predictor=predictor,
                       data=dict(data or {}))


def measured_bound(turns: Sequence[TurnMeasurement]) -> float:
    """A recipe's `recompute_max_tokens`: the most cached tokens it recomputed on any development turn (what the
    calibration measured and vouches for); inf when a turn's count was not measured."""
    counts = [t.chosen_tokens for t in turns]
    return math.inf if not counts or min(counts) < 0 else float(max(counts))


def _recipe(option: Mapping[str, Any]) -> tuple[float, int, str | int]:
    return (option["ratio"], option["span_starts"], option["kvcomm_tail"])


def _recipe_order(recipe: tuple[float, int, str | int]) -> tuple[float, int, str]:
    """Recipes in order of ratio, then span starts, then tail (a name or a count)."""
    ratio, starts, tail = recipe
    return (ratio, starts, str(tail))


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (95% at the default z) of a proportion k/n."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def auc(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """Area under the ROC curve: the chance a positive scores above a negative (ties count half); NaN without
    both classes."""
    pos = [s for s, p in zip(scores, positives) if p]
    neg = [s for s, p in zip(scores, positives) if not p]
    if not pos or not neg:
        return math.nan
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))
