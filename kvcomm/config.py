"""The one home of every algorithm knob: `KVCommConfig`, frozen, with one default each.

Deployment knobs (workers, placement, HTTP) live in `cluster.config`, which embeds this object unchanged.
`KVCommConfig.reference()` reproduces the published KVCOMM code's choices (FastMAS/KVCOMM @48ca0b3); the
default is the corrected mode, whose fixes are each a separate flag so every one can be measured alone.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict, replace
from typing import Any, Literal

TailPolicy = Literal["last_token", "last_segment"]


@dataclass(frozen=True)
class KVCommConfig:
    # --- entropy gate (predict_as_anchor) ---
    gamma: float = 0.3                 # new anchor iff entropy > gamma * log2(N compatible anchors)
    exact_top_p: bool = True           # activate the true top-p set (reference: one short, and all anchors if empty)
    top_p: float = 0.9
    # --- anchor pool ---
    max_anchors: int = 20              # V: anchors per (namespace, placeholder kind)
    window: int = 5                    # W: eviction victim = least activated among the W oldest
    pool_byte_budget: int = 2 << 30    # bytes of anchor tensors in the whole pool, all namespaces
    # --- offset estimation ---
    temperature: float = 1.0           # softmax temperature of the anchor weights (reference hard-codes 1)
    rerotate_deltas: bool = True       # store key deltas at position 0 and rotate them to the current positions
    per_consumer_weights: bool = True  # weights computed per consumer agent (reference: first consumer's, shared)
    # --- assembly ---
    tail_policy: TailPolicy = "last_segment"  # recompute only the last prompt token, or the whole last fixed segment
    # --- baselines that live on the same runner ---
    blend_recompute_ratio: float = 0.15  # cacheblend: share of reused tokens recomputed
    blend_check_layer: int = 1           # cacheblend: layer whose K deviation selects the tokens
    hybrid_recompute_ratio: float = 0.10  # hybrid: KVCOMM offsets + this share of worst-matching tokens recomputed

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 <= self.gamma:
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
        if self.tail_policy not in ("last_token", "last_segment"):
            problems.append(f"tail_policy must be 'last_token' or 'last_segment', got {self.tail_policy!r}")
        for name in ("blend_recompute_ratio", "hybrid_recompute_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.blend_check_layer < 0:
            problems.append(f"blend_check_layer must be >= 0, got {self.blend_check_layer}")
        if problems:
            raise ValueError("invalid KVCommConfig: " + "; ".join(problems))

    @classmethod
    def reference(cls, **overrides: Any) -> "KVCommConfig":
        """The published code's behaviour: shared weights, un-rotated deltas, its top-p quirk, L-1 cache."""
        base = dict(exact_top_p=False, rerotate_deltas=False, per_consumer_weights=False, tail_policy="last_token")
        base.update(overrides)
        return cls(**base)

    @property
    def mode(self) -> str:
        ref = KVCommConfig.reference(**{k: getattr(self, k) for k in (
            "gamma", "top_p", "max_anchors", "window", "pool_byte_budget", "temperature",
            "blend_recompute_ratio", "blend_check_layer", "hybrid_recompute_ratio")})
        return "reference" if ref == self else "corrected"

    def with_(self, **changes: Any) -> "KVCommConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
