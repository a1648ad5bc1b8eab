"""A Flower ``Grid`` that calls the ClientApp in this process: the whole loop without Ray.

Used by the fast tests and by in-process sweeps where simulated (not measured) wall time is
what matters. Each node has its own ``Context`` whose ``state`` is pickled on the way in and
out of every call, as the Ray engine does, so state that would not survive a real actor
does not survive here either. A handler that raises becomes an error reply, as in the engine.

It is as unfriendly as the engine where that matters: node ids are random 64-bit integers
unrelated to the partition ids, ``get_node_ids`` lists them in no particular order, and the
replies of one pull come back shuffled.
"""

from __future__ import annotations

import pickle
import random
from collections.abc import Callable, Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

# Error code the simulation engine uses for an exception inside a ClientApp.
CLIENT_APP_RAISED_EXCEPTION = 2


def set_task_identity(run_id: int = 1) -> None:
    """Messages can only be built inside a run; give this process a run identity."""
    TaskIdentity.run_id = run_id
    TaskIdentity.task_id = run_id
    TaskIdentity.node_id = 0


class InProcessGrid(Grid):
    """Delivers each message by calling ``client_app(message, context)`` synchronously.

    Args:
        client_app: the ClientApp under test.
        num_nodes: number of virtual SuperNodes (partition ids 0..num_nodes-1).
        run_config: the flat run config every node sees.
        seed: seeds the node ids and the shuffling (None: a fresh random seed).
        silent_nodes: partition ids that never answer a ``train.*`` message (they still say
            which partition they hold), to exercise timeouts.
        before_call: optional hook ``(partition_id, message)`` run before each delivery
            (tests use it to inject faults).
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: dict,
        *,
        silent_nodes: Iterable[int] = (),
        before_call: Callable[[int, Message], None] | None = None,
        seed: int | None = None,
    ) -> None:
        set_task_identity()
        self.client_app = client_app
        self.silent_nodes = set(silent_nodes)
        self.before_call = before_call
        self._rng = random.Random(seed)
        node_ids: dict[int, None] = {}  # random, distinct, in draw order
        while len(node_ids) < num_nodes:
            node_ids[self._rng.getrandbits(63) + 1] = None
        partitions = self._rng.sample(range(num_nodes), num_nodes)
        self.contexts: dict[int, Context] = {}
        for node_id, pid in zip(node_ids, partitions, strict=True):
            self.contexts[node_id] = Context(
                run_id=1,
                node_id=node_id,
                node_config={"partition-id": pid, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
        self._run = Run.create_empty(run_id=1)
        self._replies: dict[str, Message] = {}
        self.messages_sent = 0

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        nodes = list(self.contexts)
        self._rng.shuffle(nodes)
        return nodes

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            ids.append(msg.metadata.message_id)
            self.messages_sent += 1
            context = self.contexts[msg.metadata.dst_node_id]
            pid = int(context.node_config["partition-id"])
            if pid in self.silent_nodes and msg.metadata.message_type.startswith("train"):
                continue
            self._replies[msg.metadata.message_id] = self._deliver(pid, msg, context)
        return ids

    def _deliver(self, pid: int, msg: Message, context: Context) -> Message:
        context.state = pickle.loads(pickle.dumps(context.state))
        try:
            if self.before_call is not None:
                self.before_call(pid, msg)
            reply = self.client_app(msg, context)
        except Exception as exc:  # the engine turns handler exceptions into error replies
            reply = Message(
                Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"),
                reply_to=msg,
            )
        context.state = pickle.loads(pickle.dumps(context.state))
        reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
        return reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = [self._replies.pop(i) for i in list(message_ids) if i in self._replies]
        self._rng.shuffle(replies)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
