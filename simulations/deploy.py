"""``flwr run`` against a real Flower deployment on this machine, judged and cleaned up like
``scripts/flwr_run.sh``.

``scripts/deploy_local.sh N "RUN_CONFIG"`` runs this module. Where ``flwr_run.sh`` simulates
the clients on Ray, this starts the Deployment Runtime: one ``flower-superlink`` and ``N``
``flower-supernode`` processes on 127.0.0.1 (free ports), SuperNode ``i`` holding
``partition-id=i num-partitions=N``, all over TLS with a throw-away CA, with SuperNode
authentication (a key pair per SuperNode, registered with the SuperLink before it starts).
So the app is exercised over the same transport, serialisation and authentication as across
machines. Like the launcher:

1. the config is checked first (as for ``num-supernodes=N``); a bad value is one line on
   stderr before any Flower process starts; a finished run is reported and not redone;
2. this process is a child subreaper; at the end, on failure or on SIGINT / SIGTERM /
   SIGHUP, every process it started is ended by PID and the private directory (certificates,
   keys, Flower homes, logs) is removed; Flower's logs are copied into the run directory
   when the run did not complete (made for them when it failed before its ServerApp made
   it);
3. the verdict is the ``summary.json`` this invocation wrote. Exit status: 0 completed,
   1 failed, no verdict or the deployment did not start, 2 invalid arguments or config,
   130 interrupted (rerun the same command to resume).

    OUT_DIR=... RUN_NAME=... python -m simulations.deploy N [RUN_CONFIG]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from adc_flwr.config import ConfigError
from adc_flwr.run.files import RunDirError
from adc_flwr.run.resume import FINISHED
from simulations.certs import make_node_key
from simulations.local_deployment import CONNECTION, DeploymentError, LocalDeployment
from simulations.preflight import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_INVALID,
    check_apart,
    keep_logs,
    parse_pairs,
    pinned_run_config,
    run_location,
    verdict,
)
from simulations.reaper import (
    Interrupted,
    become_subreaper,
    block_stop_signals,
    free_ports,
    handle_stop_signals,
    ignore_stop_signals,
    restore_signal_mask,
    stop_descendants,
)

ROOT = Path(__file__).resolve().parents[1]
MAX_NODES = 32  # each SuperNode is two processes here, plus one per message it handles
USAGE = 'usage: scripts/deploy_local.sh N ["RUN_CONFIG"]  (N SuperNodes, 1 to 32)'


def parse_nodes(text: str) -> int:
    """The number of SuperNodes ``N``; raises :class:`ConfigError` naming N and its range."""
    try:
        nodes = int(text.strip())
    except ValueError:
        nodes = 0
    if not 1 <= nodes <= MAX_NODES or text.strip() != str(nodes):
        raise ConfigError(
            f"N (the number of SuperNodes) must be an integer from 1 to {MAX_NODES}, got {text!r}"
        )
    return nodes


def start_deployment(fed: LocalDeployment, nodes: int) -> None:
    """SuperLink, then each SuperNode's key registered, then the SuperNodes; returns once
    all of them are online."""
    began = time.monotonic()
    link_port, *node_ports = free_ports(nodes + 1)
    fed.start_superlink(link_port, cwd=ROOT)
    names: dict[int, str] = {}
    for i, port in enumerate(node_ports):
        name = f"supernode-{i}"
        key = make_node_key(fed.home / "keys", name)
        names[fed.register(key)] = name
        fed.start_supernode(name, key, f"partition-id={i} num-partitions={nodes}", port, ROOT)
    fed.wait_online(names)
    print(
        f"deployment: SuperLink on https://{fed.address} (TLS, SuperNode authentication), "
        f"{nodes} SuperNode(s) registered and online in {time.monotonic() - began:.1f} s",
        flush=True,
    )


def deploy(nodes: int, run_config: str, out_dir: str, run_name: str) -> int:
    """Run one ``flwr run`` on a local deployment of ``nodes`` SuperNodes; the exit status."""
    run_dir = Path(out_dir).expanduser().resolve() / run_name
    try:
        state = check_apart(run_config, f"num-supernodes={nodes}", str(run_dir.parent), run_name)
        pinned = pinned_run_config(run_config, run_dir)
    except (ConfigError, RunDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if state == FINISHED:
        print(f"run {run_name} already completed: {run_dir / 'summary.json'}")
        return 0
    if not become_subreaper():
        print("warning: not a child subreaper; a process Flower detaches may survive the run")
    interrupted: Interrupted | None = None
    failure: DeploymentError | None = None
    logs: list[str] = []
    since = time.time_ns()
    # stop signals are held from here until their handler is in place, and again from the
    # end of the run to the end of the clean-up, so none can cut either short
    mask = block_stop_signals()
    home = Path(tempfile.mkdtemp(prefix="adcd."))
    fed: LocalDeployment | None = None
    try:
        try:
            handle_stop_signals()
            restore_signal_mask(mask)  # one that came meanwhile raises Interrupted here
            fed = LocalDeployment(home)
            start_deployment(fed, nodes)
            command = ["flwr", "run", ".", CONNECTION, "--stream", "--run-config", pinned]
            subprocess.Popen(command, cwd=ROOT, env=fed.cli_env, stdin=subprocess.DEVNULL).wait()
        finally:
            block_stop_signals()  # or raises the Interrupted of one that came just before
    except Interrupted as exc:
        interrupted = exc
    except DeploymentError as exc:
        failure = exc
    finally:
        try:
            stop_descendants()
            if fed is not None:
                sources = {f"{name}.log": fed.log(name) for name in fed.procs}
                logs = keep_logs(sources, run_dir, since, interrupted is not None)
        finally:
            shutil.rmtree(home, ignore_errors=True)
            ignore_stop_signals(mask)  # the verdict is written whatever comes
    if failure is not None and interrupted is None:
        kept = f"\nFlower's logs: {', '.join(str(run_dir / log) for log in logs)}" if logs else ""
        print(f"error: the local deployment did not start: {failure}{kept}", file=sys.stderr)
        return EXIT_FAILED
    return verdict(run_dir, run_name, since, interrupted, logs)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not 1 <= len(args) <= 2:
        print(USAGE, file=sys.stderr)
        return EXIT_INVALID
    try:
        nodes = parse_nodes(args[0])
        run_config = args[1] if len(args) > 1 else ""
        pairs = parse_pairs(run_config, "--run-config")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    out_dir, run_name = run_location(pairs, ROOT / "results")
    try:
        return deploy(nodes, run_config, out_dir, run_name)
    except (KeyboardInterrupt, Interrupted):  # during the checks: nothing was started
        return EXIT_INTERRUPTED
    except RunDirError as exc:  # the verdict could not be read or written
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
