"""What a round did, told truthfully (DESIGN.md section 7).

Every sampled client ends a round in one of a few outcomes: finished, or dropped for a reason
(``error``, ``timeout``). A round with fewer finished clients than ``min-clients`` fails the
run with a message that says which clients and why; a failure shared by many clients is
told once with its message, not once per client.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from flwr.app import Message

from strategies.transport import ERROR, TIMEOUT, Failure

DROP_REASONS = (ERROR, TIMEOUT)
MAX_LISTED = 8  # partition ids listed per failure group before "and N more"


class RoundFailed(RuntimeError):
    """A round ended with fewer finished clients than ``min-clients``."""


@dataclass
class RoundOutcome:
    """One round: who was sampled, who finished, who was dropped and why."""

    sampled: list[int]
    finished: dict[int, Message] = field(default_factory=dict)  # partition -> final reply
    failures: dict[int, Failure] = field(default_factory=dict)  # partition -> why dropped
    not_started: list[int] = field(default_factory=list)  # vanilla: budget ran out first
    losses: list[float] = field(default_factory=list)
    budget_hit: bool = False

    def drop_counts(self) -> dict[str, int]:
        """Dropped clients per reason, every reason present (0 when none)."""
        counts = collections.Counter(f.reason for f in self.failures.values())
        return {reason: counts.get(reason, 0) for reason in DROP_REASONS}

    def required(self, min_clients: int) -> int:
        """Finished clients this round needs: ``min-clients``, or fewer when the budget ran
        out before every sampled client could start (vanilla), but at least one."""
        started = len(self.sampled) - len(self.not_started)
        return max(1, min(min_clients, started))

    def check(self, server_round: int, min_clients: int) -> None:
        """Raise :class:`RoundFailed` when too few clients finished, saying why."""
        need = self.required(min_clients)
        if len(self.finished) >= need:
            return
        raise RoundFailed(
            f"round {server_round}: {len(self.finished)} of {len(self.sampled)} sampled "
            f"client(s) finished, fewer than min-clients={need}. "
            + describe_failures(self.failures)
        )


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
