"""Which hosts other than this machine the test process tries to reach while a block runs.

`outbound_attempts()` records every socket connect and name lookup of this process (every thread) whose host is not
a loopback address, through Python's audit events (``socket.connect``, ``socket.getaddrinfo``). The audit hook is
installed on first use and cannot be removed (audit hooks never can); outside a ``with`` block it returns at once.
Here only loopback is reachable, so a library that phones home would hang or fail: a test asserts the list is empty.
"""
from __future__ import annotations

import contextlib
import ipaddress
import sys
from collections.abc import Iterator
from typing import Any

_recording: list[list[tuple[str, Any]]] = []     # the lists the open blocks fill
_installed = False


def _is_loopback(host: Any) -> bool:
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _recording or event not in ("socket.connect", "socket.getaddrinfo"):
        return
    if event == "socket.connect":
        address = args[1]
        if not isinstance(address, tuple):           # a Unix socket's path: this machine
            return
        host = address[0]
    else:
        host = args[0]
        if host is None:                              # a passive lookup of this machine's own addresses
            return
    if not _is_loopback(host):
        for attempts in _recording:
            attempts.append((event, host))


@contextlib.contextmanager
def outbound_attempts() -> Iterator[list[tuple[str, Any]]]:
    """The (event, host) of every non-loopback connect or lookup while the block runs."""
    global _installed
    if not _installed:
        sys.addaudithook(_audit)
        _installed = True
    attempts: list[tuple[str, Any]] = []
    _recording.append(attempts)
    try:
        yield attempts
    finally:
        _recording.remove(attempts)
