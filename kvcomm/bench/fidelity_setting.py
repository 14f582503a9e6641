"""What `kvcomm bench fidelity` measures: its methods, the engine and pool behind each, the token groups whose KV
error it reports, and the `Setting` of one run. No measurement here (`kvcomm.bench.fidelity`), no presentation
(`kvcomm.bench.fidelity_report`).
"""
from __future__ import annotations

from dataclasses import dataclass

from .turns import DEFAULT_DATA, WARMUP_MODES

METHODS = ("dense", "base-only", "base-only+tail", "naive-other", "kvcomm-reference", "kvcomm-corrected-lasttoken",
           "kvcomm-corrected", "kvcomm-calibrated", "cacheblend", "hybrid", "diag-exact-placeholders",
           "diag-exact-fixed")
# method -> the `_Engines` field that prepares it; each engine's pool is "reference", "corrected" or "calibrated"
POOL_METHODS = {"kvcomm-reference": "reference", "kvcomm-corrected-lasttoken": "corrected_lasttoken",
                "kvcomm-corrected": "corrected", "kvcomm-calibrated": "calibrated", "hybrid": "corrected"}
GATE_TRACED = {"kvcomm-reference": "reference", "kvcomm-corrected": "corrected",
               "kvcomm-calibrated": "calibrated"}   # method -> pool whose gate decisions it traces
POOLS = ("reference", "corrected", "calibrated")
# the pool each engine of POOL_METHODS reads (corrected_lasttoken shares corrected's)
ENGINE_POOL = {"reference": "reference", "corrected": "corrected", "corrected_lasttoken": "corrected",
               "calibrated": "calibrated"}
ERROR_GROUPS = ("span", "placeholders", "question", "responses", "fixed")
CONFIDENT_MARGIN = 0.1           # dense top-1 minus top-2 probability for a turn to count as confident
PROBE = {"base-only": {"kl": 0.230, "top1": (35, 48), "greedy_exact": (18, 48)},
         "kvcomm-reference": {"kl": 0.054, "top1": (38, 48), "greedy_exact": (20, 48)}}


@dataclass(frozen=True)
class Setting:
    """What one run measures. `questions` x `agents` turns are measured; `warmup` other questions warm the pools."""
    questions: int = 12
    warmup: int = 15
    agents: int = 3
    response_tokens: int = 64           # budget of each upstream response (greedy, stops at EOS)
    continuation_tokens: int = 32       # greedy tokens compared with dense's
    methods: tuple[str, ...] = METHODS
    seed: int = 0                       # question order and bootstrap
    bootstrap: int = 2000
    data: str = DEFAULT_DATA
    warmup_mode: str = "jobs"           # "jobs": run_job in kvcomm mode; "replay": the fixed dense responses
    lines: tuple[int, int] | None = None  # draw questions only from these 0-based lines of `data` (a split)
    calibration: str = "auto"           # kvcomm-calibrated's calibration (KVCommConfig.calibration)

    @property
    def pools(self) -> tuple[str, ...]:
        """The pools the requested methods read (only these are warmed and diagnosed)."""
        used = {ENGINE_POOL[engine] for method, engine in POOL_METHODS.items() if method in self.methods}
        return tuple(p for p in POOLS if p in used)

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; methods: {', '.join(METHODS)}")
        if self.warmup_mode not in WARMUP_MODES:
            raise ValueError(f"warmup_mode must be one of {', '.join(WARMUP_MODES)}, got {self.warmup_mode!r}")
        if self.questions < 1 or self.warmup < 0 or self.agents < 1:
            raise ValueError(f"need questions >= 1, warmup >= 0, agents >= 1; got {self.questions}, "
                             f"{self.warmup}, {self.agents}")
