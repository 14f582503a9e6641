"""`Latencies`: the recent durations of one kind of event (a decode step, a pool call), bounded, with quantiles.

Used where a worker reports how long things take (`TurnScheduler` steps and the gaps between them,
`RemoteAnchorPool` calls), so that a benchmark can show p50 / p99 / max without a metrics system."""
from __future__ import annotations

import collections


class Latencies:
    """The last `keep` durations in seconds; `summary()` in ms."""

    def __init__(self, keep: int = 4096):
        self._values: collections.deque[float] = collections.deque(maxlen=keep)

    def add(self, seconds: float) -> None:
        self._values.append(seconds)

    def __len__(self) -> int:
        return len(self._values)

    def summary(self) -> dict[str, float]:
        """p50 / p99 / max in ms (zeros when nothing was recorded)."""
        values = sorted(self._values)
        if not values:
            return {"p50": 0.0, "p99": 0.0, "max": 0.0}
        at = lambda q: values[min(len(values) - 1, int(q * len(values)))] * 1e3   # noqa: E731
        return {"p50": at(0.5), "p99": at(0.99), "max": values[-1] * 1e3}
