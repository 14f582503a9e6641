"""The Ray runtime a command runs on: join a cluster or start a local one, and stop what it started.

This module owns the one way `kvcomm submit`, `kvcomm serve`, `kvcomm demo` and the benchmarks start and stop Ray:

* `RayRuntime(address, num_cpus, object_store_mb)`: joins ``address`` (``auto``, ``ray://...``) or starts a local
  cluster on this machine (``RAY_AUTH_MODE=disabled`` unless set, no dashboard). A local cluster dies with this
  process however it ends, SIGKILL included: `cluster.reaper` watches it from a process of its own and kills
  what outlives this one (Ray's dashboard and runtime-env agents would linger about a minute). `close()` shuts
  down only a cluster this object started or connected, with SIGINT and SIGTERM held off meanwhile. When the
  process was already connected, nothing is done and nothing is shut down.
* `sigterm_as_interrupt()`: SIGTERM (what `docker stop`, Kubernetes and systemd send) raises `Terminated`, a
  `KeyboardInterrupt`, so a command unwinds through the same path as on Ctrl-C.

Ray's auto-init is turned off in a process that starts or joins a cluster here: a thread that outlives `close()`
(Ctrl-C with jobs in flight) gets an error from its next Ray call instead of starting a second, unowned cluster.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
from typing import Any

from .reaper import start_reaper, stop_reaper


class RayRuntime:
    """Joins or starts Ray (see the module docstring); a context manager."""

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None, object_store_mb: int = 2560):
        import ray
        self.owned = False
        self._reaper: subprocess.Popen | None = None
        if ray.is_initialized():
            return          # the calling process is already connected: use that cluster, leave it running
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")   # a local cluster on this machine only
        _no_auto_init()
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            self._reaper = start_reaper()
            try:
                # "local": a new cluster even when another runs on this machine (without it Ray joins the one
                # named in /tmp/ray/ray_current_cluster, and then refuses num_cpus)
                ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                         log_to_driver=False, object_store_memory=object_store_mb << 20)
            except BaseException:
                self._stop_reaper()
                raise
        self.owned = True

    @property
    def started_local(self) -> bool:
        """This object started a local cluster (it dies with this process)."""
        return self._reaper is not None

    def close(self) -> None:
        import ray
        if self.owned and ray.is_initialized():
            with signals_held():
                ray.shutdown()
        self.owned = False
        self._stop_reaper()

    def _stop_reaper(self) -> None:
        if self._reaper is not None:
            stop_reaper(self._reaper)                 # it sweeps up what ray.shutdown left running
            self._reaper = None

    def __enter__(self) -> "RayRuntime":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _no_auto_init() -> None:
    """Ray API calls without a connection raise instead of calling `ray.init()` (Ray reads the variable at
    import, so the flag it set is cleared too)."""
    os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
    try:
        from ray._private import auto_init_hook
        auto_init_hook.enable_auto_connect = False
    except (ImportError, AttributeError):   # another Ray version: the variable alone
        pass


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so that it unwinds through the same path as Ctrl-C."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def sigterm_as_interrupt() -> Any:
    """Make SIGTERM raise `Terminated` in the main thread; returns the previous handler to restore (None off the
    main thread, where nothing changes). Call it after `ray.init`, which installs a handler of its own."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


class signals_held:
    """A block during which SIGINT and SIGTERM are ignored (in the main thread; elsewhere nothing changes)."""

    def __enter__(self) -> None:
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}

    def __exit__(self, *exc_info: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
