"""`Latencies`: the recent durations of one kind of event (a decode step, a pool call), bounded, with quantiles.

Used where a worker reports how long things take (`TurnScheduler` steps and the gaps between them,
`RemoteAnchorPool` calls), so that a benchmark can show p50 / p99 / max without a metrics system, and so that
`actors.metrics` can hand every new duration to a Prometheus histogram (`since`) without timing it twice."""
from __future__ import annotations

import collections
import threading


class Latencies:
    """The last `keep` durations in seconds; `summary()` in ms. Thread-safe (one thread adds, another reads)."""

    def __init__(self, keep: int = 4096):
        self._values: collections.deque[float] = collections.deque(maxlen=keep)
        self._lock = threading.Lock()
        self.total = 0                    # durations ever added (the deque keeps the last `keep`)

    def add(self, seconds: float) -> None:
        with self._lock:
            self._values.append(seconds)
            self.total += 1

    def __len__(self) -> int:
        return len(self._values)

    def since(self, mark: int) -> tuple[list[float], int]:
        """The durations added after the first `mark` ever added (at most the last `keep`), and the new mark."""
        with self._lock:
            total, values = self.total, list(self._values)
        new = min(max(total - mark, 0), len(values))
        return values[len(values) - new:], total

    def summary(self) -> dict[str, float]:
        """p50 / p99 / max in ms (zeros when nothing was recorded)."""
        with self._lock:
            values = sorted(self._values)
        if not values:
            return {"p50": 0.0, "p99": 0.0, "max": 0.0}
        at = lambda q: values[min(len(values) - 1, int(q * len(values)))] * 1e3   # noqa: E731
        return {"p50": at(0.5), "p99": at(0.99), "max": values[-1] * 1e3}
