"""What a round did, told truthfully (docs/design.md section 7).

Every sampled client ends a round in one of a few outcomes: finished, or dropped for a reason
(``error``: it raised; ``timeout``: no reply in time; ``unavailable``: drawn, but its node was
gone or still owed a reply from an earlier round; ``dropped-out`` and ``straggler``: the
simulated population's drop-outs and slow clients, :mod:`strategies.simulated_clients`). A round
with fewer finished clients than ``min-clients`` fails the run with a message that says which
clients and why; a failure shared by many clients is told once with its message, not once per
client.
"""

from __future__ import annotations

import collections
import math
import re
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message

from adc_flwr.run.summary import DROP_REASONS, drop_key
from adc_flwr.wire.accounting import Traffic

FED_EVAL_KEYS = ("fed_accuracy_mean", "fed_accuracy_p10", "fed_accuracy_min")


MAX_LISTED = 8  # partition ids listed per failure group before "and N more"
FATE_CHARS = 200  # of a multi-line error's later lines kept in its one line
FLOWER_REASON = re.compile(r"<class '([^']+)'>:<'(.*)'>", re.DOTALL)  # vce_api's worker
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its tracebacks


@dataclass
class Failure:
    """Why a client gave no usable reply: ``reason`` is one of the drop reasons."""

    reason: str
    detail: str


class RoundFailed(RuntimeError):
    """A round ended with fewer finished clients than ``min-clients``."""


@dataclass
class RoundOutcome:
    """One round: who was sampled, who finished, who was dropped and why."""

    sampled: list[int]
    finished: dict[int, Message] = field(default_factory=dict)  # partition -> final reply
    failures: dict[int, Failure] = field(default_factory=dict)  # partition -> why dropped
    not_started: list[int] = field(default_factory=list)  # vanilla: budget ran out first
    offline: int = 0  # partitions not reachable at the round's start (not drawable)
    fed_eval: dict[int, tuple[float, int]] = field(default_factory=dict)  # accuracy, examples
    losses: list[float] = field(default_factory=list)
    budget_hit: bool = False

    def drop_counts(self) -> dict[str, int]:
        """Dropped clients per reason, every reason present (0 when none)."""
        counts = collections.Counter(f.reason for f in self.failures.values())
        return {reason: counts.get(reason, 0) for reason in DROP_REASONS}

    def row(self, server_round: int, acc: float, loss: float, total: Traffic) -> dict[str, float]:
        """This round's line of ``history``: accuracy, MB so far, who finished, who dropped."""
        return {
            "round": server_round,
            "test_accuracy": acc,
            "test_loss": loss,
            "train_loss": float(np.mean(self.losses)) if self.losses else math.nan,
            "mb_up": total.up / 1e6,
            "mb_down": total.down / 1e6,
            "mb_model_sync": total.bytes_model_sync / 1e6,
            "compression_ratio": total.compression_ratio,
            "sampled": len(self.sampled),
            "clients": len(self.finished),
            "not_started": len(self.not_started),
            "offline": self.offline,
            **self.fed_eval_summary(),
            **{drop_key(reason): n for reason, n in self.drop_counts().items()},
        }

    def fed_eval_summary(self) -> dict[str, float]:
        """Federated evaluation over this round's clients: mean, 10th percentile and worst
        client accuracy (NaN when there was none), each client counted once."""
        accuracies = np.array([acc for acc, _ in self.fed_eval.values()])
        if not len(accuracies):
            return dict.fromkeys(FED_EVAL_KEYS, math.nan)
        values = (accuracies.mean(), np.percentile(accuracies, 10), accuracies.min())
        return {k: float(v) for k, v in zip(FED_EVAL_KEYS, values, strict=True)}

    def required(self, min_clients: int) -> int:
        """Finished clients this round needs: ``min-clients``, lowered only when the budget
        ran out before every sampled client could start (vanilla), but at least one."""
        return max(1, min(min_clients, len(self.sampled) - len(self.not_started)))

    def check(self, server_round: int, min_clients: int) -> None:
        """Raise :class:`RoundFailed` when too few clients finished, saying why."""
        need = self.required(min_clients)
        if len(self.finished) >= need:
            return
        budget = f" (the budget left {len(self.not_started)} unstarted)" if self.not_started else ""
        raise RoundFailed(
            f"round {server_round}: {len(self.finished)} of {len(self.sampled)} sampled "
            f"client(s) finished, fewer than the {need} required by min-clients="
            f"{min_clients}{budget}. " + describe_failures(self.failures)
        )


def readable_reason(reason: str) -> str:
    """An error reply's reason as one line (docs/outcomes.md#what-a-runs-status-says).

    Flower's engine sends ``<class 'ray.exceptions.ActorDiedError'>:<'message'>``, and Ray's
    messages run to many lines: this keeps the class name, the message's first line, the
    ``class_name`` and ``pid`` fields Ray indents under it, and its other lines (the actor's
    fate) up to :data:`FATE_CHARS`; a traceback is told by its last line. A one-line reason
    is kept as it is.
    """
    wrapped = FLOWER_REASON.fullmatch(reason.strip())
    name, message = (wrapped[1].rsplit(".", 1)[-1], wrapped[2]) if wrapped else ("", reason)
    fields, lines = {}, []
    for line in ANSI_ESCAPE.sub("", message).splitlines():
        key, sep, value = line.strip().partition(": ")
        if line.startswith("\t") and sep and key.isidentifier():
            fields[key] = value
        elif line.strip():
            lines.append(line.strip())
    if any(line.startswith(("Traceback ", 'File "')) for line in lines):
        lines = lines[-1:]
    parts = [f"{name}:" if name and lines else name, *lines[:1]]
    if "class_name" in fields:
        pid = f" (pid {fields['pid']})" if "pid" in fields else ""
        parts.append(f"{fields['class_name']}{pid}" + (":" if lines[1:] else ""))
    parts.append(_clip(" ".join(lines[1:]), FATE_CHARS))
    return " ".join(part for part in parts if part) or reason.strip()


def _clip(text: str, limit: int) -> str:
    """``text``'s first sentences, up to ``limit`` characters; " ..." when some were cut."""
    if len(text) <= limit:
        return text
    kept = ""
    for sentence in re.split(r"(?<=\.)\s+", text):
        if len(kept) + len(sentence) + 1 > limit:
            break
        kept = f"{kept} {sentence}".strip()
    return f"{kept or text[:limit]} ..."


def describe_failures(failures: dict[int, Failure]) -> str:
    """One sentence per distinct (reason, message), naming the partitions it hit."""
    if not failures:
        return "No client failed."
    groups: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
    for partition, failure in sorted(failures.items()):
        groups[(failure.reason, failure.detail)].append(partition)
    parts = []
    for (reason, detail), partitions in sorted(groups.items(), key=lambda g: -len(g[1])):
        listed = ", ".join(str(p) for p in partitions[:MAX_LISTED])
        if len(partitions) > MAX_LISTED:
            listed += f" and {len(partitions) - MAX_LISTED} more"
        who = f"partition {listed}" if len(partitions) == 1 else f"partitions {listed}"
        parts.append(f"{reason} on {len(partitions)} client(s) ({who}): {detail}")
    return "; ".join(parts)


def _duration(seconds: float) -> str:
    """Simulated time as people read it: 42.0 s, 12.5 min, 3.2 h."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def round_line(row: dict[str, float], num_rounds: int, eta_s: float | None = None) -> str:
    """The progress line of one ``history`` row: ``clients 3/4 (1 error)`` and the rest;
    ``eta_s``: the wall time the remaining rounds should take at the pace so far."""
    dropped = ", ".join(
        [f"{int(row[drop_key(r)])} {r}" for r in DROP_REASONS if row.get(drop_key(r))]
        + ([f"{int(row['not_started'])} not started"] if row["not_started"] else [])
        + ([f"{int(row['offline'])} offline"] if row.get("offline") else [])
    )
    return (
        f"round {int(row['round']):>3}/{num_rounds} | acc {row['test_accuracy']:.4f} | "
        f"test loss {row['test_loss']:.4f} | train loss {row['train_loss']:.4f} | "
        f"up {row['mb_up']:.1f} MB | down {row['mb_down']:.1f} MB | "
        f"sync {row['mb_model_sync']:.1f} MB | compression {row['compression_ratio']:.4f} | "
        f"clients {row['clients']}/{row['sampled']}"
        + (f" ({dropped})" if dropped else "")
        + (
            f" | clients' acc {row['fed_accuracy_mean']:.4f} (p10 "
            f"{row['fed_accuracy_p10']:.4f}, worst {row['fed_accuracy_min']:.4f})"
            if not math.isnan(row.get("fed_accuracy_mean", math.nan))
            else ""
        )
        + f" | sim {_duration(row['sim_time_s'])} | {row['wall_time_s']:.1f} s"
        + (f" | eta {_duration(eta_s)}" if eta_s else "")
    )
