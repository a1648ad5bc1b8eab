"""One writer per run directory: the lock names its holder, dies with it, and run_training
refuses a directory another process holds before it writes anything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adc_flwr.run.lock import TOKEN_ENV, RunBusy, RunLock
from clients import client_app as client_module
from simulations.inprocess_grid import InProcessGrid
from strategies.lifecycle import run_training
from tests.support.helpers import tiny_config


def hold_in_another_process(run_dir: Path, token: str) -> subprocess.Popen:
    """A process that takes the lock, says so on stdout, then waits to be killed."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from adc_flwr.run.lock import RunLock
        RunLock(Path({str(run_dir)!r})).acquire({token!r})
        print("held", flush=True)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_lock_names_its_holder_and_dies_with_it(tmp_path: Path) -> None:
    holder = hold_in_another_process(tmp_path / "run", "tok-1")
    try:
        lock = RunLock(tmp_path / "run")
        seen = lock.held_elsewhere()
        assert seen is not None and seen.pid == holder.pid and seen.token == "tok-1"
        with pytest.raises(RunBusy, match=rf"is in use by PID {holder.pid} on \S+ since "):
            lock.acquire("tok-2")
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # kill -9: the kernel gives the lock back
        holder.wait()
    lock.acquire("tok-2")
    try:
        assert lock.held and lock.previous is not None and lock.previous.token == "tok-1"
        assert lock.holder() is not None and lock.holder().pid == os.getpid()
    finally:
        lock.release()


def test_run_training_refuses_a_directory_another_process_holds(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    holder = hold_in_another_process(cfg.run_dir, "someone-else")
    try:
        grid = InProcessGrid(client_module.app, 2, cfg.to_run_config())
        with pytest.raises(RunBusy, match="one run writes a run directory at a time"):
            run_training(grid, cfg, progress=lambda _: None)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in cfg.run_dir.iterdir()) == [".lock"]  # nothing written


def test_run_training_writes_under_its_launchers_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ServerApp a launcher started finds the lock held with its launcher's token."""
    cfg = tiny_config(tmp_path)
    holder = hold_in_another_process(cfg.run_dir, "launcher-token")
    try:
        monkeypatch.setenv(TOKEN_ENV, "launcher-token")
        grid = InProcessGrid(client_module.app, 2, cfg.to_run_config())
        assert run_training(grid, cfg, progress=lambda _: None)["status"] == "completed"
    finally:
        holder.kill()
        holder.wait()
