"""The one home of every algorithm knob: `KVCommConfig`, frozen, with one default each.

Deployment knobs (workers, placement, HTTP) live in `cluster.config`, which embeds this object unchanged.
Eight knobs are per model (`UNCALIBRATED`: the entropy gate's gamma, kvcomm's recompute recipe (its budget, span
starts, tail and the most tokens it may recompute), the turn gate's threshold and its predictor's scale, the
fidelity gate's margin): their default None means "the model's calibration file" (`kvcomm.calibration` resolves
it, warning when the model has none); `with_calibration` fills them (an engine fills what is left uncalibrated).
`KVCommConfig.reference()` reproduces the published KVCOMM code's choices (FastMAS/KVCOMM @48ca0b3); the
default is the corrected mode, whose fixes are each a separate flag so every one can be measured alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, asdict, replace
from typing import Any, Literal, Mapping

TailPolicy = Literal["last_token", "last_segment"]
# the per-model knobs a calibration file sets (`kvcomm.calibration`), and their values when a model has none
UNCALIBRATED = {"gamma": 0.3, "recompute_ratio": 0.0, "recompute_span_starts": 0, "kvcomm_tail": "last_segment",
                "recompute_max_tokens": math.inf, "gate_max_kl": math.inf, "kl_scale": 1.0, "gate_min_margin": 0.0}


@dataclass(frozen=True)
class KVCommConfig:
    # --- entropy gate (predict_as_anchor) ---
    gamma: float | None = None         # calibrated: new anchor iff entropy > gamma * log2(N compatible anchors)
    exact_top_p: bool = True           # activate the true top-p set (reference: one short, and all anchors if empty)
    top_p: float = 0.9
    min_anchor_coverage: float = 0.5   # an anchor vouches for content up to 1/this times its length (reference: 1)
    # --- per-model calibration (kvcomm.calibration) ---
    calibration: str = "auto"          # where None knobs below come from: "auto" (the model's file in the
                                       # calibration directory, if any), "none" (uncalibrated), or a file path
    # --- turn gate (kvcomm.gate.predict_kl): dense iff the predicted KL of a reused turn exceeds gate_max_kl ---
    gate_max_kl: float | None = None   # calibrated (None: the model's calibration; inf: never falls back)
    kl_scale: float | None = None      # calibrated: predicted KL = kl_scale * sum_t attention(t) * error(t)^2
    unknown_anchor_error: float = 0.3  # offset error assumed for anchors that recorded none
    # --- fidelity gate (kvcomm.gate.first_token_signals): after the reused prefill, dense iff the first token's
    # margin (top-1 minus top-2 probability) is below gate_min_margin ---
    gate_min_margin: float | None = None  # calibrated (None: the model's calibration; 0: never falls back)
    # --- anchor pool ---
    max_anchors: int = 20              # V: anchors per (namespace, placeholder kind)
    window: int = 5                    # W: eviction victim = least activated among the W oldest
    pool_byte_budget: int = 2 << 30    # bytes of anchor tensors in the whole pool, all namespaces
    # --- offset estimation ---
    temperature: float = 1.0           # softmax temperature of the anchor weights (reference hard-codes 1)
    rerotate_deltas: bool = True       # store key deltas at position 0 and rotate them to the current positions
    per_consumer_weights: bool = True  # weights computed per consumer agent (reference: first consumer's, shared)
    # --- assembly and corrections (kvcomm.corrections) ---
    tail_policy: TailPolicy = "last_segment"  # naive, cacheblend, hybrid: recompute only the last prompt token,
                                              # or the whole last fixed segment
    kvcomm_tail: TailPolicy | int | None = None  # calibrated: kvcomm's tail. "last_token" or N: only the last 1 or N
                                                 # prompt tokens; the rest of the last fixed segment is reused with
                                                 # its offsets, its tokens open to the recompute budget's choice
    recompute_ratio: float | None = None  # calibrated: kvcomm's share of the reused span recomputed, the tokens
                                          # the last prompt token attends to most (0: offsets alone)
    recompute_span_starts: int | None = None  # calibrated: kvcomm also recomputes the first k tokens of every
                                              # placeholder (EPIC: each reused span's own attention sink)
    recompute_max_tokens: float | None = None  # calibrated: at most this many cached tokens recomputed per turn
                                               # (span starts first; inf: no bound). The ratio alone would make
                                               # a long content pay a share of a dense prefill
    # --- baselines that live on the same runner ---
    blend_recompute_ratio: float = 0.15  # cacheblend: share of reused tokens recomputed
    blend_check_layer: int = 1           # cacheblend: layer whose K deviation selects the tokens
    hybrid_recompute_ratio: float = 0.10  # hybrid: KVCOMM offsets + this share of worst-matching tokens recomputed

    def __post_init__(self) -> None:
        problems = []
        if self.gamma is not None and not 0.0 <= self.gamma:
            problems.append(f"gamma must be >= 0, got {self.gamma}")
        if self.max_anchors < 1:
            problems.append(f"max_anchors must be >= 1, got {self.max_anchors}")
        if not 1 <= self.window:
            problems.append(f"window must be >= 1, got {self.window}")
        if self.pool_byte_budget < 0:
            problems.append(f"pool_byte_budget must be >= 0, got {self.pool_byte_budget}")
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.min_anchor_coverage <= 1:
            problems.append(f"min_anchor_coverage must be in (0, 1], got {self.min_anchor_coverage}")
        if self.gate_max_kl is not None and not self.gate_max_kl >= 0:
            problems.append(f"gate_max_kl must be >= 0 (inf: never fall back), got {self.gate_max_kl}")
        if self.kl_scale is not None and not (self.kl_scale >= 0 and math.isfinite(self.kl_scale)):
            problems.append(f"kl_scale must be a finite number >= 0, got {self.kl_scale}")
        if self.gate_min_margin is not None and not 0.0 <= self.gate_min_margin <= 1.0:
            problems.append(f"gate_min_margin must be in [0, 1] (0: never fall back), got {self.gate_min_margin}")
        if not 0 <= self.unknown_anchor_error:
            problems.append(f"unknown_anchor_error must be >= 0, got {self.unknown_anchor_error}")
        if self.recompute_span_starts is not None and not (isinstance(self.recompute_span_starts, int)
                                                           and self.recompute_span_starts >= 0):
            problems.append(f"recompute_span_starts must be an integer >= 0, got {self.recompute_span_starts!r}")
        if self.recompute_max_tokens is not None and not (
                self.recompute_max_tokens == math.inf or (float(self.recompute_max_tokens).is_integer()
                                                          and self.recompute_max_tokens >= 0)):
            problems.append(f"recompute_max_tokens must be a whole number >= 0 or inf, got "
                            f"{self.recompute_max_tokens!r}")
        if self.tail_policy not in ("last_token", "last_segment"):
            problems.append(f"tail_policy must be 'last_token' or 'last_segment', got {self.tail_policy!r}")
        tail = self.kvcomm_tail
        if not (tail is None or tail in ("last_token", "last_segment")
                or (isinstance(tail, int) and not isinstance(tail, bool) and tail >= 1)):
            problems.append(f"kvcomm_tail must be 'last_token', 'last_segment' or a token count >= 1, got {tail!r}")
        for name in ("blend_recompute_ratio", "hybrid_recompute_ratio", "recompute_ratio"):
            if getattr(self, name) is not None and not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.blend_check_layer < 0:
            problems.append(f"blend_check_layer must be >= 0, got {self.blend_check_layer}")
        if problems:
            raise ValueError("invalid KVCommConfig: " + "; ".join(problems))

    @classmethod
    def reference(cls, **overrides: Any) -> "KVCommConfig":
        """The published code's behaviour: shared weights, un-rotated deltas, its top-p quirk, L-1 cache, anchors
        at least as long as the content, no recompute, no turn gate and no fidelity gate."""
        base = dict(gamma=UNCALIBRATED["gamma"], exact_top_p=False, rerotate_deltas=False,
                    per_consumer_weights=False, tail_policy="last_token", kvcomm_tail="last_token",
                    min_anchor_coverage=1.0, recompute_ratio=0.0, recompute_span_starts=0,
                    recompute_max_tokens=math.inf, gate_max_kl=math.inf,
                    kl_scale=UNCALIBRATED["kl_scale"], gate_min_margin=0.0)
        base.update(overrides)
        return cls(**base)

    @property
    def mode(self) -> str:
        ref = KVCommConfig.reference(**{k: getattr(self, k) for k in (
            "gamma", "top_p", "max_anchors", "window", "pool_byte_budget", "temperature",
            "blend_recompute_ratio", "blend_check_layer", "hybrid_recompute_ratio", "unknown_anchor_error",
            "calibration")})
        return "reference" if ref == self else "corrected"

    def with_(self, **changes: Any) -> "KVCommConfig":
        return replace(self, **changes)

    @property
    def calibrated(self) -> bool:
        """Whether every per-model knob has a value (from a calibration, or set by hand)."""
        return all(getattr(self, name) is not None for name in UNCALIBRATED)

    def with_calibration(self, values: Mapping[str, Any] | None = None) -> "KVCommConfig":
        """The per-model knobs left at None filled from `values` (a calibration's), the rest from `UNCALIBRATED`;
        knobs already set keep their values."""
        values = values or {}
        unknown = sorted(set(values) - set(UNCALIBRATED))
        if unknown:
            raise ValueError(f"a calibration sets only {', '.join(UNCALIBRATED)}; got {', '.join(unknown)}")
        filled = {name: values.get(name, fallback) for name, fallback in UNCALIBRATED.items()
                  if getattr(self, name) is None}
        return replace(self, **filled) if filled else self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
