"""``flwr run .`` on a private simulation SuperLink, judged truthfully, leaving nothing behind.

``scripts/flwr_run.sh`` and the sweep's ``flwr`` runner run this module under
:func:`simulations.supervise.supervise` (checks first, every process ended by PID, the
verdict of this invocation, exit status 0 only for ``completed``). What is particular to the
simulation: the run gets its own Flower home, Ray temp dir and two free ports, so runs side
by side never share a SuperLink, and the SuperLink's log is kept when the run did not
complete. ``RAY_ADDRESS`` (a Ray cluster for the simulation's actors,
[deployment](../docs/deployment.md)) is checked first (:mod:`simulations.ray_address`): one
``error:`` line and exit status 2 when it is malformed or nothing answers there.

    OUT_DIR=... RUN_NAME=... python -m simulations.launcher [RUN_CONFIG] [FEDERATION_CONFIG]
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from simulations import supervise
from simulations.ray_address import ENV, RayAddressError, check_ray_address
from simulations.reaper import free_ports

DEFAULT_FEDERATION = "num-supernodes=4 client-resources-num-cpus=1"


class Simulation:
    """``flwr run . --federation-config FEDERATION`` on a local simulation SuperLink."""

    prefix = "adcf."
    what = "the simulation"

    def __init__(self, federation_config: str, ray_address: str | None = None) -> None:
        self.federation_config = federation_config
        self.ray_address = ray_address  # a cluster's, checked; None: Ray starts its own

    def command(self, run_config: str) -> list[str]:
        return [
            "flwr",
            "run",
            ".",
            "--stream",
            "--run-config",
            run_config,
            "--federation-config",
            self.federation_config,
        ]

    def run(self, home: Path, run_config: str) -> None:
        http_port, control_port = free_ports(2)
        env = supervise.flower_env() | {
            "FLWR_HOME": str(home),
            "RAY_TMPDIR": str(home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        }
        env.pop(ENV, None)  # `auto` would search the private temp dir, then any Ray here
        if self.ray_address is not None:
            env[ENV] = self.ray_address
        subprocess.Popen(self.command(run_config), cwd=supervise.ROOT, env=env).wait()

    def logs(self, home: Path) -> dict[str, Path]:
        return {"superlink.log": home / "local-superlink" / "superlink.log"}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    run_config = args[0] if args else ""
    federation = args[1] if len(args) > 1 and args[1].strip() else DEFAULT_FEDERATION
    try:
        address = check_ray_address()
    except RayAddressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return supervise.EXIT_INVALID
    return supervise.main(Simulation(federation, address), run_config, federation)


if __name__ == "__main__":
    sys.exit(main())
