"""One home for stop signals (SIGINT, SIGTERM, SIGHUP): a one-shot handler that raises an
exception of the caller's choosing, its installer, and holding them pending.

A sweep stops alike on Ctrl-C, SIGTERM and SIGHUP: each raises :class:`Stopped`, a
:class:`KeyboardInterrupt`, so a point's run writes an ``interrupted`` summary and a Ray task
is cancelled exactly as on Ctrl-C (what the sweep then does: [sweeps](../docs/sweeps.md)).
One run's launcher raises :class:`simulations.reaper.Interrupted` the same way
(:func:`simulations.reaper.handle_stop_signals`).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Collection, Iterator
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
Handler = Callable[[int, FrameType | None], None]

_received: list[str] = []  # Ray re-raises a bare KeyboardInterrupt: the name is kept here


class Stopped(KeyboardInterrupt):
    """A stop signal came; the message is its name (``SIGTERM``)."""


def one_shot(stop: Callable[[str], BaseException]) -> Handler:
    """A signal handler raising ``stop(name)``, once: it first sets every stop signal to
    ``SIG_IGN``, so no later one cuts the clean-up short."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        _received.append(signal.Signals(signum).name)
        raise stop(_received[-1])

    return handler


raise_stopped = one_shot(Stopped)


def fired() -> bool:
    """Whether a one-shot handler has fired (every stop signal is ignored now)."""
    return all(signal.getsignal(sig) is signal.SIG_IGN for sig in STOP_SIGNALS)


def handle(handler: Handler, keep_ignored: Collection[int]) -> dict[signal.Signals, Any]:
    """``handler`` for every stop signal from now on, but those in ``keep_ignored`` that this
    process ignores now (SIGHUP under ``nohup``); the handlers it replaced."""
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig, old in before.items():
        if sig not in keep_ignored or old is not signal.SIG_IGN:
            signal.signal(sig, handler)
    return before


def stopped_by(exc: KeyboardInterrupt) -> str:
    """The name of the signal that stopped the sweep (``SIGINT`` for a bare Ctrl-C)."""
    return str(exc) or (_received[-1] if _received else "SIGINT")


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """Stop signals raise :class:`Stopped` in the block (main thread); a signal this process
    was started ignoring stays ignored (SIGHUP under ``nohup``, SIGINT under a script's
    ``cmd &``). The handlers before are put back after it."""
    before = handle(raise_stopped, keep_ignored=STOP_SIGNALS)
    try:
        yield
    finally:
        for sig, old in before.items():
            if old is not None:  # None: set outside Python, left as it is
                signal.signal(sig, old)


def block_stop_signals() -> set[signal.Signals]:
    """Hold SIGINT, SIGTERM and SIGHUP pending; returns the signal mask it replaced.

    Once it returns, no stop signal's handler runs until they are unblocked:
    ``pthread_sigmask`` runs the handlers of signals that came just before it, so an
    exception they raise comes out of this call, never later. (The signal mask is the
    calling thread's: the launchers start no threads.)
    """
    return signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def restore_signal_mask(mask: set[signal.Signals]) -> None:
    """Put back a mask :func:`block_stop_signals` returned; a stop signal held pending
    meanwhile runs its handler in this call."""
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def ignore_stop_signals(mask: set[signal.Signals]) -> None:
    """Stop signals are ignored from now on (the run is over: its clean-up and verdict go
    on, whatever comes), those held pending meanwhile too; then ``mask`` is put back."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # a pending signal set to SIG_IGN is dropped
    restore_signal_mask(mask)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Stop signals held pending in the block, and in every process started there, for
    good (a mask is inherited): what Ray starts then never sees a signal sent to the sweep's
    process group, only the sweep, which stops it in order (Ray itself holds SIGINT so).
    One that came meanwhile is handled as the block ends."""
    mask = block_stop_signals()
    try:
        yield
    finally:
        restore_signal_mask(mask)


@contextlib.contextmanager
def released(signals: tuple[signal.Signals, ...] = STOP_SIGNALS[1:]) -> Iterator[None]:
    """``signals`` (SIGTERM and SIGHUP) let through in the block, in a process :func:`held`
    started (a Ray worker) and in what it starts (a launcher must see its SIGTERM)."""
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


@contextlib.contextmanager
def caught() -> Iterator[list[int]]:
    """The stop signals that came in the block, listed as it ends, whichever handler took
    them: ``ray.init`` puts in its own SIGTERM handler, whose ``sys.exit`` Ray's code may
    swallow (Python's wakeup fd sees every signal a Python handler takes)."""
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    came: list[int] = []
    before = signal.set_wakeup_fd(write)
    try:
        yield came
    finally:
        signal.set_wakeup_fd(before)
        with contextlib.suppress(BlockingIOError):
            came.extend(sig for sig in os.read(read, 4096) if sig in STOP_SIGNALS)
        os.close(read)
        os.close(write)
