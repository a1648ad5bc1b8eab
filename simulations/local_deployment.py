"""A Flower 1.41 deployment on this machine: one ``flower-superlink`` and SuperNodes, over
TLS, with SuperNode authentication, driven only through Flower's own commands.

How 1.41 does it (read from its source, ``flwr/superlink/cli/flower_superlink.py``,
``flwr/superlink/routers/fleet/node_auth.py``, ``flwr/superlink/servicer/fleet/
fleet_handlers.py``, ``flwr/supernode/fleet_http_connection.py``, ``flwr/cli/supernode/
register.py``):

- the SuperLink serves its Fleet, Control and Runtime APIs over HTTPS on one ``--port``
  (``--ssl-ca-certfile --ssl-certfile --ssl-keyfile``); its SuperExec and the ServerApp
  reach it there, trusting the CA;
- ``--enable-supernode-auth`` turns self-registration off: a SuperNode's public key must be
  registered first through the Control API (``flwr supernode register KEY.pub``;
  ``--auth-list-public-keys`` is refused since 1.2x); the SuperNode signs each request with
  its private key, and ``activate-node`` fails (HTTP 412, "Failed to activate SuperNode",
  exit code 305) for a key nobody registered;
- the ``flwr`` CLI finds the SuperLink in ``$FLWR_HOME/config.toml``: a connection
  ``[superlink.<name>]`` with ``address`` and an absolute ``root-certificates`` path
  (``[tool.flwr.federations]`` in pyproject.toml is migrated there and commented out, so it
  is not used).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from simulations.certs import NodeKey, Tls, make_tls
from simulations.supervise import StartFailed, flower_env

HOST = "127.0.0.1"
CONNECTION = "adc-deploy"  # the SuperLink connection's name in the CLI's config.toml
CLI_TIMEOUT_S = 120.0
TAIL_LINES = 12
NODE_CACHE_ENV = "ADC_NODE_CACHE"  # clients.disk_cache.CACHE_ENV, not imported (light)


class DeploymentError(StartFailed):
    """A SuperLink or SuperNode did not start or was refused; the message says which, why,
    and ends with its log's last lines."""


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of a log, indented, for an error message."""
    if not path.exists():
        return "  (no log)"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join(f"  | {line}" for line in text)


class LocalDeployment:
    """The processes of one deployment under ``home`` (a private directory): each gets its
    own Flower home and a log ``home/logs/<name>.log``. Started processes are kept in
    :attr:`procs` by name. Ending them is the caller's: :mod:`simulations.deploy`, a child
    subreaper, ends every descendant by PID, Flower's detached ones included."""

    def __init__(self, home: Path, env: Mapping[str, str] | None = None) -> None:
        self.home = home
        self.tls: Tls = make_tls(home / "tls")
        self.port = 0
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = flower_env(env)  # this interpreter's flower-superexec first on PATH
        self.cli_env = self.env | {"FLWR_HOME": str(home / "cli")}

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def log(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    def _start(
        self, name: str, command: list[str], cwd: Path, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen:
        (self.home / name).mkdir(parents=True, exist_ok=True)
        self.log(name).parent.mkdir(exist_ok=True)
        with self.log(name).open("wb") as out:
            proc = subprocess.Popen(
                command,
                cwd=cwd,
                env=self.env | dict(env or {}) | {"FLWR_HOME": str(self.home / name)},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.procs[name] = proc
        return proc

    def _failed(self, name: str, what: str) -> DeploymentError:
        return DeploymentError(f"{what}; the end of its log:\n{tail(self.log(name))}")

    def start_superlink(self, port: int, cwd: Path, timeout_s: float = 60.0) -> None:
        """``flower-superlink`` with TLS and SuperNode authentication on ``HOST:port``; returns
        once it accepts connections, with the CLI's connection to it written."""
        self.port = port
        # fmt: off
        command = [
            "flower-superlink",
            "--ssl-ca-certfile", str(self.tls.ca),
            "--ssl-certfile", str(self.tls.cert),
            "--ssl-keyfile", str(self.tls.key),
            "--enable-supernode-auth",
            "--host", HOST,
            "--port", str(port),
            "--disable-runtime-dependency-installation",
        ]
        # fmt: on
        proc = self._start("superlink", command, cwd)
        cli_home = Path(self.cli_env["FLWR_HOME"])
        cli_home.mkdir(parents=True, exist_ok=True)
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{self.address}"\n'
            f'root-certificates = "{self.tls.ca}"\n'
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise self._failed("superlink", f"the SuperLink exited ({proc.returncode})")
            try:
                socket.create_connection((HOST, port), timeout=1.0).close()
                return
            except OSError:
                time.sleep(0.2)
        raise self._failed("superlink", f"the SuperLink did not listen within {timeout_s:.0f} s")

    def flwr(self, *args: str) -> subprocess.CompletedProcess:
        """One ``flwr`` CLI command against this SuperLink (the CLI's own Flower home)."""
        return subprocess.run(
            ["flwr", *args],
            env=self.cli_env,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )

    def _flwr_json(self, *args: str) -> dict:
        try:
            done = self.flwr(*args, "--format", "json")
        except subprocess.TimeoutExpired:
            raise DeploymentError(
                f"`flwr {' '.join(args)}` did not answer within {CLI_TIMEOUT_S:.0f} s"
            ) from None
        try:
            reply = json.loads(done.stdout)
        except json.JSONDecodeError:
            reply = {}
        if done.returncode != 0 or not reply.get("success"):
            output = (done.stdout + done.stderr).strip()
            raise DeploymentError(f"`flwr {' '.join(args)}` failed ({done.returncode}): {output}")
        return reply

    def register(self, key: NodeKey) -> int:
        """Register a SuperNode's public key with the SuperLink; returns its node id."""
        reply = self._flwr_json("supernode", "register", str(key.public), CONNECTION)
        return int(reply["node-id"])

    def node_status(self) -> dict[int, str]:
        """``{node id: status}`` as ``flwr supernode ls`` reports it (``registered``,
        ``online``, ``offline``, ...)."""
        reply = self._flwr_json("supernode", "ls", CONNECTION)
        return {int(node["node-id"]): node["status"] for node in reply["nodes"]}

    def start_supernode(
        self,
        name: str,
        key: NodeKey,
        node_config: str,
        port: int,
        cwd: Path,
        extra: Sequence[str] = (),
    ) -> subprocess.Popen:
        """``flower-supernode`` connecting over TLS and signing with ``key``; its own Runtime
        API (where its ClientApp processes connect) on ``HOST:port``, over TLS too;
        ``extra`` arguments go last.

        Each message it receives starts a ClientApp process; its clients keep their data in a
        disk cache private to this SuperNode (``ADC_NODE_CACHE``, :mod:`clients.disk_cache`)
        unless the environment names one (an empty value: none), removed with the rest.
        """
        env = {NODE_CACHE_ENV: os.environ.get(NODE_CACHE_ENV, str(self.home / name / "node-cache"))}
        # fmt: off
        command = [
            "flower-supernode",
            "--superlink", self.address,
            "--root-certificates", str(self.tls.ca),
            "--auth-supernode-private-key", str(key.private),
            "--node-config", node_config,
            "--host", HOST,
            "--port", str(port),
            "--ssl-certfile", str(self.tls.cert),
            "--ssl-keyfile", str(self.tls.key),
            "--ssl-ca-certfile", str(self.tls.ca),
            *extra,
        ]
        # fmt: on
        return self._start(name, command, cwd, env)

    def wait_online(self, nodes: Mapping[int, str], timeout_s: float = 180.0) -> None:
        """Return once every node id in ``nodes`` (id -> process name) is ``online``; raise
        when one of those processes exits first or the time is up."""
        deadline = time.monotonic() + timeout_s
        while True:
            for name in nodes.values():
                if (code := self.procs[name].poll()) is not None:
                    raise self._failed(name, f"{name} exited ({code}) before it came online")
            status = self.node_status()
            if all(status.get(node) == "online" for node in nodes):
                return
            if time.monotonic() > deadline:
                late = [name for node, name in nodes.items() if status.get(node) != "online"]
                raise self._failed(
                    late[0], f"{', '.join(late)} not online within {timeout_s:.0f} s"
                )
            time.sleep(1.0)
