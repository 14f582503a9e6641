"""Per-model calibration: the entropy gate's gamma, the recompute budget, and the turn gate's threshold and scale,
fitted on measured KL.

This module owns the calibration file (`Calibration`, JSON), where a model's file is found (`find`: the config's
``calibration`` knob, "auto" = ``<calibration dir>/<model name>.json``), how a config takes its values (`resolve`:
the per-model knobs left at None take the calibration's; a model without a calibration still serves, uncalibrated,
with a `CalibrationWarning`), and the fit itself (`fit`, pure arithmetic on per-turn measurements). Measuring is
`kvcomm calibrate`'s job (`kvcomm.bench.calibrate`).

The fit. Input: for every measured turn of a development split and every candidate recompute ratio r, the KL of
kvcomm (forced reuse) against dense, the turn gate's raw forecast s (its predicted KL at kl_scale = 1), the turn's
first-token agreement and prepare time, and its entropy ratio e (the largest entropy / log2(N) of the entropy gate's
decisions on the contents it reads, inf where the pool cannot vouch at all): the entropy gate sends it dense at
gamma iff e > gamma.

1. kl_scale = exp(mean(log KL - log s)) over every (turn, r): the scale under which the forecast is right in the
   geometric mean (the forecast is a first-order model; only its scale is fitted).
2. Every (r, gamma, threshold) triple, gamma in `GAMMAS`, thresholds being the forecasts seen at that r and inf: a
   turn is reused when neither gate sends it dense. A triple meets the targets when the 95% upper bound of the
   mean KL over its reused turns (normal approximation: mean + 1.96 sd / sqrt(n), so that the target holds on
   unseen turns too, not just on these) is <= target_kl, the first-token agreement of the served turns (a dense
   turn agrees) is >= min_top1, and its reuse rate >= min_reuse. Among those, the smallest r wins (recompute is
   the cost), then the highest reuse, then the smallest gamma (the pool learns more). If none meets all three,
   the highest reuse among those meeting the fidelity targets; if none meets them, the lowest KL bound. Which case
   applied is recorded (`met`, `why`). Replaying gamma on a fixed pool ignores that a higher gamma also teaches the
   pool less: the fidelity benchmark's calibrated pool, warmed with the chosen gamma, measures that effect.
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

FORMAT = 1
GAMMAS = (0.3, 0.5, 0.7, 1.0)      # entropy-gate gammas the fit considers (0.3: the paper's default)
# the repository's configs/calibration/ (a source checkout); KVCOMM_CALIBRATION_DIR points elsewhere
DEFAULT_DIR = Path(__file__).resolve().parents[1] / "configs" / "calibration"


class CalibrationWarning(UserWarning):
    """A model serves without a calibration (uncalibrated knobs), or with one made for another model."""


@dataclass(frozen=True)
class TurnMeasurement:
    """One development turn at one recompute ratio (what `fit` needs)."""
    ratio: float
    kl: float                    # KL(dense || kvcomm) with forced reuse
    forecast: float              # the turn gate's predicted KL at kl_scale = 1
    top1_agree: bool
    prepare_ms: float
    entropy_ratio: float         # the entropy gate sends this turn dense at gamma iff entropy_ratio > gamma


@dataclass(frozen=True)
class Calibration:
    model: str
    knobs: dict[str, float]                  # gamma, recompute_ratio, gate_max_kl (inf: never), kl_scale
    target_kl: float
    min_reuse: float
    met: bool                                # the chosen pair meets both targets on the development turns
    why: str
    min_top1: float = 0.97
    dev: dict[str, Any] = field(default_factory=dict)        # the chosen pair's figures on the development turns
    candidates: list[dict[str, Any]] = field(default_factory=list)   # the best pair per ratio
    predictor: dict[str, Any] = field(default_factory=dict)  # how well the forecast ranks measured KL
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
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"calibration file {path}: not a format-{FORMAT} calibration (kvcomm calibrate writes "
                             f"one)")
        knobs = {k: (math.inf if v is None else float(v)) for k, v in dict(data.get("knobs", {})).items()}
        try:
            return cls(**{**data, "knobs": knobs})
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


def _evaluate(turns: Sequence[TurnMeasurement], scale: float, gamma: float, threshold: float) -> dict[str, Any]:
    reused = [t for t in turns if t.entropy_ratio <= gamma and scale * t.forecast <= threshold]
    kls = [t.kl for t in reused]
    mean = sum(kls) / len(kls) if kls else 0.0
    spread = math.sqrt(sum((k - mean) ** 2 for k in kls) / (len(kls) - 1)) if len(kls) > 1 else 0.0
    return {"gamma": gamma, "threshold": threshold, "reuse": len(reused) / len(turns),
            "kl_reused": mean, "kl_reused_upper95": mean + 1.96 * spread / math.sqrt(max(1, len(kls))),
            "top1_served": (sum(t.top1_agree for t in reused) + len(turns) - len(reused)) / len(turns),
            "prepare_ms_reused": sum(t.prepare_ms for t in reused) / len(reused) if reused else math.inf}


def fit(measurements: Sequence[TurnMeasurement], *, model: str, target_kl: float, min_reuse: float,
        min_top1: float = 0.97, data: Mapping[str, Any] | None = None,
        gammas: Sequence[float] = GAMMAS) -> Calibration:
    """The calibration for `model` from development measurements (see the module docstring)."""
    if not measurements:
        raise ValueError("fit needs measurements")
    if target_kl <= 0 or not 0 <= min_reuse <= 1 or not 0 <= min_top1 <= 1:
        raise ValueError(f"need target_kl > 0, min_reuse and min_top1 in [0, 1]; got {target_kl}, {min_reuse}, "
                         f"{min_top1}")
    logs = [math.log(max(t.kl, 1e-9)) - math.log(max(t.forecast, 1e-9)) for t in measurements]
    scale = math.exp(sum(logs) / len(logs))
    by_ratio: dict[float, list[TurnMeasurement]] = {}
    for t in measurements:
        by_ratio.setdefault(t.ratio, []).append(t)
    options = []
    for ratio, turns in sorted(by_ratio.items()):
        thresholds = sorted({scale * t.forecast for t in turns}) + [math.inf]
        options += [{"ratio": ratio, **_evaluate(turns, scale, gamma, th)} for gamma in gammas for th in thresholds]
    faithful = [o for o in options if o["kl_reused_upper95"] <= target_kl and o["top1_served"] >= min_top1]
    both = [o for o in faithful if o["reuse"] >= min_reuse]
    if both:
        best = min(both, key=lambda o: (o["ratio"], -o["reuse"], o["gamma"], -o["threshold"]))
        why = "the smallest recompute ratio meeting every target, at its highest reuse"
    elif faithful:
        best = max(faithful, key=lambda o: (o["reuse"], -o["ratio"], -o["gamma"]))
        why = (f"no choice reaches reuse >= {min_reuse:.0%} at KL <= {target_kl} (95% bound) and top-1 >= "
               f"{min_top1:.0%}: the highest reuse that keeps them")
    else:
        best = min(options, key=lambda o: (o["kl_reused_upper95"], -o["reuse"]))
        why = f"no choice keeps KL <= {target_kl} (95% bound) and top-1 >= {min_top1:.0%}: the lowest KL bound"
    candidates = []
    for ratio in sorted(by_ratio):
        mine = [o for o in options if o["ratio"] == ratio]
        fitting = [o for o in faithful if o["ratio"] == ratio]
        candidates.append(max(fitting, key=lambda o: (o["reuse"], -o["gamma"])) if fitting
                          else min(mine, key=lambda o: o["kl_reused_upper95"]))
    predictor = {"turns": len(measurements), "spearman": spearman([t.forecast for t in measurements],
                                                                  [t.kl for t in measurements]),
                 "spearman_per_ratio": {str(r): spearman([t.forecast for t in ts], [t.kl for t in ts])
                                        for r, ts in sorted(by_ratio.items())}}
    return Calibration(model=model_key(model), target_kl=target_kl, min_reuse=min_reuse, min_top1=min_top1,
                       knobs={"gamma": best["gamma"], "recompute_ratio": best["ratio"],
                              "gate_max_kl": best["threshold"], "kl_scale": scale},
                       met=bool(both), why=why, dev=best, candidates=candidates, predictor=predictor,
                       data=dict(data or {}))
