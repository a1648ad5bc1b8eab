"""A Ray actor's death, as Flower's engine reports it, ends in one readable line: in the
summary's ``error``, in a client's missed-rounds reason and in the launcher's verdict
(issue 27, item 11; why one dead actor fails the others' clients too: docs/outcomes.md)."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest
from flwr.app import Context, Error, Message

from adc_flwr.run.lock import TOKEN_ENV, RunLock
from adc_flwr.run.run_dir import RunDir
from clients import client_app as client_module
from simulations import supervise
from simulations.inprocess_grid import InProcessGrid
from strategies.lifecycle import run_training
from strategies.outcomes import RoundFailed, readable_reason
from tests.simulations.test_launcher import TINY, finish, launch
from tests.support.helpers import tiny_config

# Ray 2.55's ActorDiedError for a ClientAppActor killed with -9, as the worker of Flower
# 1.41's engine words it: str(type(ex)) + ":<'" + str(ex) + "'>" (vce_api.py)
ACTOR_DIED = (
    "<class 'ray.exceptions.ActorDiedError'>:<'The actor died unexpectedly before finishing "
    "this task.\n\tclass_name: ClientAppActor\n\tactor_id: 6d1a2e0c1b9f8a7e5d4c3b2a01000000\n"
    "\tpid: 4567\n\tnamespace: 0b5c6f1e-2d3a\n\tip: 127.0.0.1\nThe actor is dead because its "
    "worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: Worker "
    "unexpectedly exits with a connection error code 2. End of file. There are some potential "
    "root causes. (1) The process is killed by SIGKILL by OOM killer due to high memory usage. "
    "(2) ray stop --force is called. (3) The worker is crashed unexpectedly due to SIGSEGV or "
    "other unexpected errors.'>"
)
READABLE = (
    "ActorDiedError: The actor died unexpectedly before finishing this task. ClientAppActor "
    "(pid 4567): The actor is dead because its worker process has died. Worker exit type: "
    "SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a connection error code 2. "
    "End of file. ..."
)


class DeadActorGrid(InProcessGrid):
    """Partitions in ``dead`` fail every message from round ``since`` on with
    :data:`ACTOR_DIED`, the way the Ray engine replies for a client whose actor died."""

    def __init__(self, dead: set[int], since: int, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.dead, self.since, self.round = dead, since, 0

    def _deliver(self, pid: int, msg: Message, context: Context) -> Message:
        if msg.metadata.message_type == "train.start":
            self.round = max(self.round, int(msg.content["config"]["server-round"]))
        if (
            pid not in self.dead
            or self.round < self.since
            or msg.metadata.message_type == "query.info"
        ):
            return super()._deliver(pid, msg, context)
        reply = Message(Error(code=0, reason=ACTOR_DIED), reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
        return reply


def test_both_clients_lost_to_a_dead_actor_fail_the_run_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A round's clients both get Ray's ActorDiedError: the run fails, and the summary's
    error, every progress line and the launcher's verdict are one line each, naming the
    error's first line and the actor's fate, without Ray's raw repr."""
    cfg = tiny_config(tmp_path)
    grid = DeadActorGrid({0, 1}, 1, client_module.app, 2, cfg.to_run_config())
    lines: list[str] = []
    since = time.time_ns()
    with pytest.raises(RoundFailed):
        run_training(grid, cfg, progress=lines.append)
    summary = RunDir(cfg.run_dir).read_summary()
    assert summary["status"] == "failed"
    assert summary["error"] == (
        "RoundFailed: round 1: 0 of 2 sampled client(s) finished, fewer than the 1 required by "
        f"min-clients=1. error on 2 client(s) (partitions 0, 1): {READABLE}"
    )
    assert all("\n" not in line and "<class" not in line for line in lines), lines
    capsys.readouterr()
    assert supervise.verdict(Path(cfg.run_dir), since, None, []) == supervise.EXIT_FAILED
    err = capsys.readouterr().err
    assert err == f"run t did not complete (status failed): {summary['error']}\n"


def test_a_client_lost_to_a_dead_actor_is_named_in_one_line(tmp_path: Path) -> None:
    """One client's actor died: the other trains on, and the lost one's missed rounds give
    the readable line as their reason."""
    cfg = tiny_config(tmp_path, num_server_rounds=2)
    grid = DeadActorGrid({1}, 2, client_module.app, 2, cfg.to_run_config())
    summary = run_training(grid, cfg, progress=lambda _: None)
    assert summary["status"] == "completed"
    assert summary["clients_missed"] == [
        {"partition": 1, "rounds": [2], "reason": f"error: {READABLE}"}
    ]


@pytest.mark.parametrize(
    ("reason", "line"),
    [
        ("RuntimeError: the loss diverged", "RuntimeError: the loss diverged"),
        (
            "<class 'ray.exceptions.ActorDiedError'>:<'The actor died unexpectedly before "
            "finishing this task.'>",
            "ActorDiedError: The actor died unexpectedly before finishing this task.",
        ),
        (
            "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::"
            'ClientAppActor.run()\x1b[39m (pid=9, ip=127.0.0.1)\n  File "a.py", line 1, in run\n'
            "flwr.clientapp.client_app.ClientAppException: \nException ClientAppException "
            "occurred. Message: boom'>",
            "RayTaskError(ClientAppException): Exception ClientAppException occurred. "
            "Message: boom",
        ),
    ],
    ids=["one-line", "ray-one-line", "ray-traceback"],
)
def test_readable_reason(reason: str, line: str) -> None:
    assert readable_reason(reason) == line


@pytest.mark.slow  # a real run on Ray with one actor killed: in .ci/run, out of the default suite
def test_killing_one_client_actor_ends_in_one_readable_line(tmp_path: Path) -> None:
    """kill -9 of one of the two ClientAppActors after round 1 of ``scripts/flwr_run.sh``:
    whatever Flower's pool then does with the dead actor (docs/outcomes.md), the launcher's
    last line is one readable line, and a failed summary's error names the actor's death."""
    proc = launch(tmp_path, "actor", f"{TINY} num-server-rounds=20")
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until a round is done
        if line.startswith("round"):
            break
    holder = RunLock(tmp_path / "actor").holder()
    assert holder is not None
    actors = [p for p in psutil.process_iter() if _actor_of(p, holder.token)]
    assert len(actors) == 2, [p.cmdline() for p in actors]
    actors[0].kill()
    code, out = finish(proc)
    last = out.strip().splitlines()[-1]
    summary = RunDir(tmp_path / "actor").read_summary()
    # our own lines (Flower's ERROR log above them keeps Ray's raw repr, as Flower writes it)
    ours = [line for line in out.splitlines() if line.lstrip().startswith(OUR_LINES)]
    assert ours and not any("<class" in line or "class_name:" in line for line in ours), ours
    if code == 0:  # the live actor trained on
        assert last.startswith("run actor completed"), out
        assert all("\n" not in m["reason"] for m in summary["clients_missed"]), summary
    else:
        assert code == 1 and last.startswith("run actor did not complete (status failed)"), out
        assert "ActorDiedError: The actor died unexpectedly" in last, last
        assert "\n" not in summary["error"], summary["error"]


OUR_LINES = ("round ", "dropped:", "run actor", "error:")


def _actor_of(proc: psutil.Process, token: str) -> bool:
    try:
        named = "ClientAppActor" in " ".join(proc.cmdline())
        return named and proc.environ().get(TOKEN_ENV) == token
    except (psutil.Error, OSError):
        return False
