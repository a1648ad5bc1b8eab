"""``RAY_ADDRESS`` checked in seconds, before a sweep or a simulation waits on it.

Ray waits forever for a cluster that does not answer (its GCS warnings, nothing else) and
meets a malformed address with a traceback, so the sweep runner and the launcher ask
:func:`check_ray_address` first: one ``error:`` line naming the address. The meanings are
Ray's (``ray.init``); what each does here: [sweeps](../docs/sweeps.md).
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

ENV = "RAY_ADDRESS"
CONNECT_TIMEOUT_S = 5.0
RAY_CLIENT_PORT = 10001  # ray://HOST without a port: Ray Client's default
PRIVATE = ("", "local")  # a Ray of our own, never a cluster


class RayAddressError(ValueError):
    """``RAY_ADDRESS`` is malformed or nothing answers at it; the message names it."""


def check_ray_address(value: str | None = None, timeout_s: float = CONNECT_TIMEOUT_S) -> str | None:
    """The address to hand ``ray.init`` for ``value`` (default: ``$RAY_ADDRESS``), after a
    TCP connection to it succeeded within ``timeout_s``; None for a private Ray (unset,
    empty, ``local``). ``auto`` is the cluster the last ``ray start`` on this machine
    recorded (never, as Ray's fallback would, whichever Ray happens to run here)."""
    value = os.environ.get(ENV, "") if value is None else value
    address, host, port = resolve(value)
    if address is not None:
        _connect(value, host, port, timeout_s)
    return address


def resolve(value: str) -> tuple[str | None, str, int]:
    """``(address, host, port)`` for ``value``, without touching the network; the address
    None for a private Ray. :class:`RayAddressError` when it cannot be parsed."""
    said = f"{ENV}={value!r}"
    value = value.strip()
    if value in PRIVATE:
        return None, "", 0
    if value == "auto":
        value = _recorded_cluster(said)
    client = value.startswith("ray://")
    try:
        parts = urlsplit(value if client else f"//{value}")
        host, port = parts.hostname, parts.port
    except ValueError as exc:  # a port that is no number, or out of range
        raise RayAddressError(f"{said}: {exc}; expected HOST:PORT (or local, auto)") from None
    port = port or (RAY_CLIENT_PORT if client else None)
    if not host or port is None or any(c.isspace() for c in host) or parts.path:
        raise RayAddressError(f"{said}: expected HOST:PORT, ray://HOST[:PORT], local or auto")
    return value, host, port


def _recorded_cluster(said: str) -> str:
    """The address the last ``ray start`` on this machine wrote (Ray's own file)."""
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    try:
        recorded = path.read_text().strip()
    except OSError:
        recorded = ""
    if not recorded:
        raise RayAddressError(f"{said}: no `ray start` on this machine recorded a cluster ({path})")
    return recorded


def _connect(said_value: str, host: str, port: int, timeout_s: float) -> None:
    """A TCP connection to ``host:port`` within ``timeout_s`` (name resolution included)."""
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=attempt, daemon=True)  # a hung lookup is left behind
    thread.start()
    thread.join(timeout_s)
    said = f"{ENV}={said_value!r}"
    hint = "start the cluster or unset RAY_ADDRESS (a private Ray then starts)"
    if not outcome:
        raise RayAddressError(
            f"{said}: no answer from {host}:{port} within {timeout_s:g} s; {hint}"
        )
    if (error := outcome[0]) is not None:
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        raise RayAddressError(f"{said}: cannot reach {host}:{port} ({reason}); {hint}")
