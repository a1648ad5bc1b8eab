"""``flwr run`` against a real Flower deployment on this machine, supervised like
``scripts/flwr_run.sh``.

``scripts/deploy_local.sh N "RUN_CONFIG"`` runs this module. Where ``flwr_run.sh`` simulates
the clients on Ray, this starts the Deployment Runtime: one ``flower-superlink`` and ``N``
``flower-supernode`` processes on 127.0.0.1 (free ports), SuperNode ``i`` holding
``partition-id=i num-partitions=N``, all over TLS with a throw-away CA, with SuperNode
authentication (a key pair per SuperNode, registered with the SuperLink before it starts).
So the app is exercised over the same transport, serialisation and authentication as across
machines. :func:`simulations.supervise.supervise` does the rest: the config is checked as
for ``num-supernodes=N`` before any Flower process starts, every process is ended by PID
and the private directory (certificates, keys, Flower homes, logs) removed at the end,
Flower's logs are kept in the run directory when the run did not complete, and the exit
status is the run's (0 completed, 1 failed, no verdict or the deployment did not start,
2 invalid arguments or config, 130 interrupted).

    OUT_DIR=... RUN_NAME=... python -m simulations.deploy N [RUN_CONFIG]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from adc_flwr.config import ConfigError, RunConfig
from adc_flwr.run.input_root import IN_ROOT_ENV, local_inputs
from adc_flwr.run.validation import OUT_ROOT_ENV
from simulations import supervise
from simulations.certs import make_node_key
from simulations.local_deployment import CONNECTION, LocalDeployment
from simulations.preflight import parse_pairs
from simulations.reaper import free_ports

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


def start_deployment(deployment: LocalDeployment, nodes: int) -> None:
    """SuperLink, then each SuperNode's key registered, then the SuperNodes; returns once
    all of them are online."""
    began = time.monotonic()
    link_port, *node_ports = free_ports(nodes + 1)
    deployment.start_superlink(link_port, cwd=supervise.ROOT)
    names: dict[int, str] = {}
    for i, port in enumerate(node_ports):
        name = f"supernode-{i}"
        key = make_node_key(deployment.home / "keys", name)
        names[deployment.register(key)] = name
        node_config = f"partition-id={i} num-partitions={nodes}"
        deployment.start_supernode(name, key, node_config, port, supervise.ROOT)
    deployment.wait_online(names)
    print(
        f"deployment: SuperLink on https://{deployment.address} (TLS, SuperNode "
        f"authentication), {nodes} SuperNode(s) registered and online in "
        f"{time.monotonic() - began:.1f} s",
        flush=True,
    )


def input_root(run_config: str, out_dir: str) -> str:
    """``ADC_IN_ROOT`` for this deployment: the files and folders its run config names, the
    link traces of its profile-trace included (its out-dir when it names none). A path that
    holds ``os.pathsep`` cannot be listed: the ServerApp then refuses it, naming it."""
    from adc_flwr.population.profile_csv import read_trace

    cfg = RunConfig.from_run_config(parse_pairs(run_config, "--run-config"))
    paths = [path for _, path in local_inputs(cfg)]
    if cfg.profile_trace.strip():  # read by the preflight already: a valid trace
        for profile in read_trace(cfg.profile_trace):
            paths += [Path(t.path) for t in (profile.uplink_trace, profile.downlink_trace) if t]
    roots = dict.fromkeys(str(path.expanduser().resolve()) for path in paths if path.exists())
    return os.pathsep.join(root for root in roots if os.pathsep not in root) or out_dir


class Deployment:
    """``flwr run`` against a SuperLink and ``nodes`` SuperNodes started in the private
    directory."""

    prefix = "adcd."
    what = "the local deployment"

    def __init__(self, nodes: int) -> None:
        self.nodes = nodes
        self.deployment: LocalDeployment | None = None

    def run(self, home: Path, run_config: str) -> None:
        # the ServerApp writes only under this run's out-dir and reads only this run's inputs,
        # unless the user pinned roots of their own
        out_dir = str(parse_pairs(run_config, "--run-config")["out-dir"])
        env = {OUT_ROOT_ENV: out_dir, IN_ROOT_ENV: input_root(run_config, out_dir)} | os.environ
        self.deployment = LocalDeployment(home, env=env)
        start_deployment(self.deployment, self.nodes)
        command = ["flwr", "run", ".", CONNECTION, "--stream", "--run-config", run_config]
        subprocess.Popen(
            command,
            cwd=supervise.ROOT,
            env=self.deployment.cli_env,
            stdin=subprocess.DEVNULL,
        ).wait()

    def logs(self, home: Path) -> dict[str, Path]:
        if self.deployment is None:
            return {}
        return {f"{name}.log": self.deployment.log(name) for name in self.deployment.procs}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not 1 <= len(args) <= 2:
        print(USAGE, file=sys.stderr)
        return supervise.EXIT_INVALID
    try:
        nodes = parse_nodes(args[0])
        run_config = args[1] if len(args) > 1 else ""
        if parse_pairs(run_config, "--run-config").get("num-partitions", 0):
            raise ConfigError(
                "run-config key 'num-partitions': the deployment runtime trains each "
                "SuperNode on its own data; leave it 0 (pooled clients are for simulations)"
            )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return supervise.EXIT_INVALID
    return supervise.main(Deployment(nodes), run_config, f"num-supernodes={nodes}")


if __name__ == "__main__":
    sys.exit(main())
