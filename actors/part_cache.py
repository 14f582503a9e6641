"""A worker's cache of fetched anchor-pool tensor parts: a host tier and, on an accelerator, a device tier.

`PartCache` is one LRU tier with a byte budget. `AnchorPartCache` is what `actors.pool_client.RemoteAnchorPool`
uses: parts arrive from the object store into the host tier (`host_bytes`; pinned memory on CUDA, so the copy to
the device can run asynchronously); a turn reads device copies, kept in the device tier under their own budget
(`device_bytes`, `ClusterConfig.anchor_device_cache_bytes`). A device copy evicted is made again from the host
tier without a fetch; a host part evicted takes its device copy with it. On a CPU worker the host tier is the
device tier: one budget (`host_bytes`), no copy.

`device` and `pin` are the seams tests use to run the accelerator branch on a CPU-only machine (e.g. the "meta"
device and a recording `pin`). A part's key never goes stale (see `actors.pool_state.PartRef`).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch

Tensors = dict[str, torch.Tensor]


class PartCache:
    """Fetched tensor parts by key, least recently used evicted first once over `budget_bytes` (one entry
    larger than the budget is kept alone). `on_evict(key)` is told of every eviction."""

    def __init__(self, budget_bytes: int, on_evict: Callable[[str], None] | None = None):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, tuple[Tensors, int]] = OrderedDict()
        self._on_evict = on_evict
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> Tensors | None:
        """The cached tensors (now the most recently used), or None; counted as a hit or a miss."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: str, tensors: Tensors, nbytes: int) -> None:
        if key in self._entries:
            return
        self._entries[key] = (tensors, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.budget_bytes and len(self._entries) > 1:
            evicted, (_, size) = self._entries.popitem(last=False)
            self.nbytes -= size
            self.evictions += 1
            if self._on_evict is not None:
                self._on_evict(evicted)

    def discard(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry[1]

    def __len__(self) -> int:
        return len(self._entries)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor cached (for memory accounting)."""
        return [t for tensors, _ in self._entries.values() for t in tensors.values()]


class AnchorPartCache:
    """Host tier + device tier (see the module docstring). Not thread-safe: the pool client's lock guards it.

    `get(key)` and `put(key, host_tensors, nbytes)` return the tensors a snapshot should hold (on `device`).
    `on_evict(key)` is told whenever a part leaves either tier (a kept snapshot holding it is then dropped).
    """

    def __init__(self, host_bytes: int, device_bytes: int, device: torch.device | str = "cpu", *,
                 pin: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 on_evict: Callable[[str], None] | None = None):
        self.device = torch.device(device)
        self.tiered = self.device.type != "cpu"
        if pin is None and self.device.type == "cuda":
            pin = torch.Tensor.pin_memory
        self._pin = pin if self.tiered else None
        self._on_evict = on_evict
        self.host = PartCache(host_bytes, on_evict=self._host_evicted)
        self.on_device = PartCache(device_bytes, on_evict=on_evict) if self.tiered else None

    def _host_evicted(self, key: str) -> None:
        if self.on_device is not None:
            self.on_device.discard(key)
        if self._on_evict is not None:
            self._on_evict(key)

    def __contains__(self, key: str) -> bool:
        """Whether the part is here without a fetch (in the host tier)."""
        return key in self.host

    @property
    def nbytes(self) -> int:
        """Bytes held in both tiers."""
        return self.host.nbytes + (0 if self.on_device is None else self.on_device.nbytes)

    @property
    def evictions(self) -> int:
        """Evictions from either tier."""
        return self.host.evictions + (0 if self.on_device is None else self.on_device.evictions)

    def holds_on_device(self, key: str) -> bool:
        return key in (self.host if self.on_device is None else self.on_device)

    def get(self, key: str) -> Tensors | None:
        """The part's tensors on the device (copied from the host tier when only there), or None (fetch it)."""
        host = self.host.get(key)
        if host is None or self.on_device is None:
            return host
        copy = self.on_device.get(key)
        if copy is None:
            copy = self._to_device(host)
            self.on_device.put(key, copy, _nbytes(copy))
        return copy

    def put(self, key: str, host_tensors: Tensors, nbytes: int) -> Tensors:
        """Store a fetched part (CPU tensors) in the host tier, pinned on CUDA; its device copy in the device tier.
        Returns the device copy (the host tensors themselves on a CPU worker)."""
        if self._pin is not None:
            host_tensors = {name: self._pin(t) for name, t in host_tensors.items()}
        self.host.put(key, host_tensors, nbytes)
        if self.on_device is None:
            return host_tensors
        copy = self._to_device(host_tensors)
        self.on_device.put(key, copy, nbytes)
        return copy

    def _to_device(self, tensors: Tensors) -> Tensors:
        return {name: t.to(self.device, non_blocking=self._pin is not None) for name, t in tensors.items()}

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor either tier holds (for memory accounting)."""
        return self.host.tensors() + ([] if self.on_device is None else self.on_device.tensors())

    # ---- counters (the pool client's stats) ---------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        device = self.on_device if self.on_device is not None else self.host
        return {"cache_entries": len(self.host), "cache_bytes": self.host.nbytes, "cache_hits": self.host.hits,
                "cache_misses": self.host.misses, "cache_evictions": self.host.evictions,
                "device_cache_entries": len(device), "device_cache_bytes": device.nbytes,
                "device_cache_evictions": device.evictions, "cache_tiered": int(self.tiered)}


def _nbytes(tensors: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
