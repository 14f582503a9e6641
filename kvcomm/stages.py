"""The timing hook: named stages of one turn's preparation (``with times.stage("align"): ...``).

A `StageTimes` sums the wall seconds spent in each named stage (a stage entered twice adds up) and tells an
optional listener ``(stage, seconds)`` as each one ends; its `seconds` dict becomes a turn's `TurnResult.timings`.
It is not a profiler: no nesting, no device synchronization (on CUDA the figures are host time), no global state.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable

StageListener = Callable[[str, float], None]   # told (stage name, seconds) as each stage ends


class StageTimes:
    """Seconds per named stage of one turn; `stages` are present from the start (0.0 until entered)."""

    __slots__ = ("seconds", "listener", "_name", "_started")

    def __init__(self, stages: Iterable[str] = (), listener: StageListener | None = None):
        self.seconds: dict[str, float] = {name: 0.0 for name in stages}
        self.listener = listener
        self._name: str | None = None
        self._started = 0.0

    def stage(self, name: str) -> "StageTimes":
        """A context manager timing `name` (stages do not nest: one is open at a time)."""
        if self._name is not None:
            raise RuntimeError(f"stage {name!r} entered while stage {self._name!r} is open")
        self._name = name
        return self

    def __enter__(self) -> "StageTimes":
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        elapsed = time.perf_counter() - self._started
        name, self._name = self._name, None
        self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
        if self.listener is not None:
            self.listener(name, elapsed)
