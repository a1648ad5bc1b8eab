"""`scripts/deploy_local.sh`: the app on Flower's Deployment Runtime (a SuperLink and
SuperNodes over TLS with SuperNode authentication), judged and cleaned up like a simulation
run; SuperNodes without registered credentials are refused; a bad N is refused at once."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import psutil
import pytest

from adc_flwr.run.run_dir import METRIC_COLUMNS
from simulations.certs import make_node_key, make_tls
from simulations.local_deployment import LocalDeployment
from simulations.reaper import free_ports
from tests.support.helpers import flwr_run_env, run_server_app, tiny_config

ROOT = Path(__file__).resolve().parents[2]
TINY = (
    "dataset='digits' method='none' num-server-rounds=1 local-steps=2 batch-size=16 "
    "eval-samples=64 lr=0.001"
)
RUN_TIMEOUT_S = 420  # about 3 min on 2 busy cores: each ClientApp message is a new process


def private_dirs() -> set[Path]:
    """The private directories deploy makes (and must remove)."""
    return set(Path(os.environ.get("TMPDIR", "/tmp")).glob("adcd.*"))


def deploy_local(out: Path, name: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", "scripts/deploy_local.sh", *args],
        cwd=ROOT,
        env=flwr_run_env(out, name),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def watch_tree(proc: subprocess.Popen, timeout_s: float) -> tuple[str, dict]:
    """Wait for ``proc``, recording every descendant seen on the way (sampled every 0.3 s):
    its output and ``{(pid, create_time): command line}``."""
    seen: dict[tuple[int, float], str] = {}
    root = psutil.Process(proc.pid)
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"deploy_local.sh ran past {timeout_s} s:\n{proc.communicate()[0][-3000:]}")
        try:
            for child in root.children(recursive=True):
                try:
                    seen[(child.pid, child.create_time())] = " ".join(child.cmdline())
                except psutil.Error:
                    continue
        except psutil.NoSuchProcess:
            break
        time.sleep(0.3)
    return proc.communicate()[0], seen


def survivors(seen: dict[tuple[int, float], str]) -> list[str]:
    """The recorded processes still running (same PID and start time)."""
    alive = []
    for (pid, created), cmd in seen.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{pid} {cmd}")
        except psutil.NoSuchProcess:
            continue
    return alive


def stop_federation(fed: LocalDeployment | SimpleNamespace, grace_s: float = 5.0) -> None:
    """End the federation's processes that still run, and their descendants, by PID (this
    test process is no subreaper): SIGTERM, then SIGKILL after ``grace_s``. One already
    reaped is left alone: its PID may name an unrelated process by now."""
    live = [proc for proc in fed.procs.values() if proc.poll() is None]
    tree: list[psutil.Process] = []
    for proc in live:
        try:
            root = psutil.Process(proc.pid)
            tree += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    for each in tree:
        try:
            each.terminate()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for each in alive:
        try:
            each.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=grace_s)
    for proc in live:
        proc.wait(timeout=10)


@pytest.mark.slow
def test_deploy_local_runs_over_tls_with_auth_and_leaves_nothing(tmp_path: Path) -> None:
    """Two authenticated SuperNodes train one round; the run directory is a simulation
    run's; every process it started is gone, and so is its private directory."""
    before = private_dirs()
    proc = deploy_local(tmp_path / "out", "dep", "2", TINY)
    out, seen = watch_tree(proc, RUN_TIMEOUT_S)
    assert proc.returncode == 0, out[-4000:]
    assert "2 SuperNode(s) registered and online" in out and "clients 2/2" in out
    run_dir = tmp_path / "out" / "dep"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 1
    assert [(r["sampled"], r["clients"]) for r in summary["history"]] == [(2, 2)]
    assert not list(run_dir.glob("*.log"))  # Flower's logs are kept only on failure

    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics.columns) == list(METRIC_COLUMNS)
    assert (metrics["kind"] == "step").sum() == 2
    simulated, _ = run_server_app(tiny_config(tmp_path / "sim", local_steps=2), nodes=2)
    assert simulated is not None and simulated["status"] == "completed"
    sim_metrics = pd.read_csv(tmp_path / "sim" / "t" / "metrics.csv")
    assert list(metrics.columns) == list(sim_metrics.columns)

    commands = list(seen.values())
    links = [c.split() for c in commands if "flower-superlink" in c]
    assert len(links) == 1
    assert {"--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile"} <= set(links[0])
    nodes = [c.split() for c in commands if "flower-supernode" in c]
    assert len(nodes) == 2
    assert all({"--root-certificates", "--auth-supernode-private-key"} <= set(c) for c in nodes)
    assert any("flower-superexec" in c for c in commands)
    assert not [c for c in commands if "--insecure" in c.split()]  # TLS everywhere
    assert not survivors(seen)
    assert private_dirs() <= before


def test_unregistered_supernode_is_refused(tmp_path: Path) -> None:
    """With SuperNode authentication, a SuperNode whose key was not registered cannot
    activate (Flower 1.41: HTTP 412, exit code 305) and never shows up in the SuperLink's
    node list; the registered one, started the same way, comes online."""
    fed = LocalDeployment(tmp_path / "fed")
    link_port, good_port, bad_port = free_ports(3)
    try:
        fed.start_superlink(link_port, cwd=ROOT)
        good = make_node_key(fed.home / "keys", "good")
        bad = make_node_key(fed.home / "keys", "bad")
        good_id = fed.register(good)
        # `--isolation process`: the node starts no SuperExec, only the connection is tested
        only = ("--isolation", "process")
        intruder = fed.start_supernode("bad", bad, "partition-id=1", bad_port, ROOT, only)
        assert intruder.wait(timeout=120) != 0
        log = fed.log("bad").read_text()
        assert "Failed to activate SuperNode" in log and "Exit Code: 305" in log
        assert fed.node_status() == {good_id: "registered"}

        fed.start_supernode("good", good, "partition-id=0", good_port, ROOT, only)
        fed.wait_online({good_id: "good"}, timeout_s=120)
        assert fed.node_status() == {good_id: "online"}
    finally:
        stop_federation(fed)
    assert all(proc.poll() is not None for proc in fed.procs.values())


def test_stopping_a_federation_spares_a_reused_pid() -> None:
    """A process the test already reaped is not signalled again: its PID may have been
    reused, here by a bystander."""
    done = subprocess.Popen(["true"])
    done.wait()
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        done.pid = bystander.pid  # what PID reuse does
        stop_federation(SimpleNamespace(procs={"bad": done}), grace_s=1.0)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_private_keys_are_owner_only_from_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys are created mode 0o600, not chmod-ed afterwards: with a permissive umask and
    chmod doing nothing, they are owner-only; a link at a key's path is not written
    through."""
    monkeypatch.setattr(os, "chmod", lambda *_, **__: None)
    monkeypatch.setattr(os, "fchmod", lambda *_, **__: None)
    umask = os.umask(0)
    try:
        tls = make_tls(tmp_path / "tls")
        node = make_node_key(tmp_path / "keys", "node")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(tls.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(node.private.stat().st_mode) == 0o600
    assert stat.S_IMODE(tls.cert.stat().st_mode) == 0o666  # public ones follow the umask

    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("untouched")
    (tmp_path / "planted").mkdir()
    (tmp_path / "planted" / "node").symlink_to(elsewhere)
    with pytest.raises(FileExistsError):
        make_node_key(tmp_path / "planted", "node")
    assert elsewhere.read_text() == "untouched"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["0", TINY], "N (the number of SuperNodes) must be an integer from 1 to 32, got '0'"),
        (["33"], "must be an integer from 1 to 32, got '33'"),
        (["two", TINY], "must be an integer from 1 to 32, got 'two'"),
        ([], "usage: scripts/deploy_local.sh N"),
        (["2", f"{TINY} num-partitions=8"], "the deployment runtime trains each SuperNode on"),
    ],
)
def test_bad_n_is_refused_at_once(tmp_path: Path, args: list[str], message: str) -> None:
    before = private_dirs()
    began = time.monotonic()
    proc = deploy_local(tmp_path / "out", "bad", *args)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert message in out
    assert time.monotonic() - began < 30
    assert private_dirs() <= before and not (tmp_path / "out").exists()


def test_bad_config_is_refused_before_flower_starts(tmp_path: Path) -> None:
    proc = deploy_local(tmp_path / "out", "bad", "2", "compresion=0.2")
    out, seen = watch_tree(proc, 120)
    assert proc.returncode == 2, out
    assert "unknown run-config key 'compresion' (did you mean 'compression'?)" in out
    assert not [c for c in seen.values() if "flower-" in c or "flwr " in c]
