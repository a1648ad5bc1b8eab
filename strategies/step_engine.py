"""The steps of split learning: one exchange with every active client per step.

Each step the server decodes every active client's packet into one server batch (in
partition order, whatever order the replies came in, so every seeded draw after it repeats),
runs the back, steps, and sends each client the gradients of its packet; the reply is the
client's next packet, or on its last step its trained front. The simulated clock settles
each exchange (who vanished, who was too slow) and the ledger books every byte that crossed
a link, a late straggler's too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message

from adc_flwr.compression import Compressor, build_compressor
from adc_flwr.config import RunConfig
from adc_flwr.run.summary import STRAGGLER
from adc_flwr.training.workers import ServerWorker
from adc_flwr.wire.accounting import Traffic, TrafficLedger
from adc_flwr.wire.codec import grads_to_record, record_to_packet
from adc_flwr.wire.sizes import uncompressed_act_nbytes
from strategies.messaging import Post
from strategies.outcomes import Failure, RoundOutcome, describe_failures
from strategies.records import RunRecorder
from strategies.simulated_clients import DROP_DETAIL, ClientCost, SimulatedClients


class TrainingDiverged(RuntimeError):
    """The server loss became NaN or infinite."""


@dataclass
class ClientRound:
    """One started client's progress within a round."""

    node_id: int
    partition_id: int
    steps: int  # steps it does this round
    packet: ArrayRecord  # the packet in flight
    batch: int  # samples of the batch behind that packet
    step: int = 0  # steps done

    @property
    def on_last_step(self) -> bool:
        return self.step + 1 >= self.steps


@dataclass(eq=False)
class StepEngine:
    """Runs the steps of the clients a round starts, until each has done its steps.

    Attributes:
        cfg: the validated run config.
        server: the back, its optimizer and loss.
        clients: the simulated population (clock, drop-outs, stragglers, ξ per client).
        ledger: where every byte is booked.
        post: messages by partition.
        recorder: where each step's row goes.
        front_shape: (n, d) of the front's output, the reference of compression ratios.
        probe: called with (round, the replies of the clients that took the step, outcome)
            when ``eval-every`` asks for a mid-round evaluation.
    """

    cfg: RunConfig
    server: ServerWorker
    clients: SimulatedClients
    ledger: TrafficLedger
    post: Post
    recorder: RunRecorder
    front_shape: tuple[int, int]
    probe: Callable[[int, dict[int, Message], RoundOutcome], None]
    global_step: int = 0
    batches_done: dict[int, int] = field(default_factory=dict)  # partition -> batches consumed
    warm: set[int] = field(default_factory=set)  # nodes that answered a train.start (ids)
    timeout: float = field(init=False)  # seconds to wait for one exchange's replies
    _compressors: dict[float, Compressor] = field(init=False)

    def __post_init__(self) -> None:
        self.timeout = self.cfg.step_timeout
        self._compressors = {self.cfg.compression: self.server.compressor}

    def train(
        self,
        server_round: int,
        starts: dict[int, Message],
        outcome: RoundOutcome,
        last_turn: bool = True,
        keep: int | None = None,
    ) -> None:
        """Send the ``train.start`` messages ``starts`` (by partition), then step with those
        clients until each has done its steps.

        ``last_turn``: no other client trains after these this round (vanilla: the last
        client's turn), so their last step ends the round. ``keep``: over-selection, only
        the first ``keep`` clients to send their first packet go on.
        """
        partitions = list(starts)
        sync = {p: Traffic.of_model_sync(start.content["front"]) for p, start in starts.items()}
        for partition in partitions:  # the front went on the wire, answered or not
            self.ledger.add(server_round, partition, sync[partition])
        # a node's first train.start imports torch, loads data and builds the model: judged
        # per node, since a pooled partition may run on a node that never trained before
        nodes = {p: self.post.nodes[p] for p in partitions}
        cold = not self.warm.issuperset(nodes.values())
        timeout = max(self.timeout, self.cfg.start_timeout) if cold else self.timeout
        active: dict[int, ClientRound] = {}
        replies = self.post.exchange(starts, timeout, outcome)
        self.warm.update(nodes[p] for p in replies)
        for partition, reply in replies.items():
            metrics = reply.content["metrics"]
            steps = self.cfg.local_steps or int(metrics["steps-per-epoch"])
            node = self.post.nodes[partition]
            packet, batch = reply.content["packet"], int(metrics["batch"])
            active[partition] = ClientRound(node, partition, steps, packet, batch)
        costs = [
            ClientCost(p, sync[p].bytes_model_sync, c.packet, c.batch, 0) for p, c in active.items()
        ]
        self._settle(server_round, 0, costs, active, outcome, keep)
        while active:
            loss, grads = self.server_step(server_round, active)
            outcome.losses.append(loss)
            grad_traffic = {p: Traffic.of_grads(record) for p, record in grads.items()}
            for partition, traffic in grad_traffic.items():
                self.ledger.add(server_round, partition, traffic)
            outcome.budget_hit |= self.budget_spent()
            ends_round = last_turn and all(c.on_last_step for c in active.values())
            probe = (
                self.evaluation_due(self.global_step + 1)
                and not ends_round
                and not outcome.budget_hit
            )
            messages = {
                p: self.step_message(server_round, active[p], grads[p], outcome.budget_hit, probe)
                for p in active
            }
            replies = self.post.exchange(messages, self.timeout, outcome)
            self.global_step += 1
            self.recorder.step(server_round, self.global_step, loss)
            costs = []
            for partition, client in list(active.items()):
                reply = replies.get(partition)
                if reply is None:
                    del active[partition]
                    continue
                up = reply.content["packet" if "packet" in reply.content else "front"]
                batch = int(reply.content["metrics"].get("batch", 0))
                down = grad_traffic[partition].bytes_down_grad
                costs.append(ClientCost(partition, down, up, batch, client.batch))
            exchange = 1 + min((c.step for c in active.values()), default=0)
            kept = self._settle(server_round, exchange, costs, active, outcome)
            for partition in replies.keys() - set(kept):  # cut with its reply in: it trained
                self.clients.remember(partition, replies[partition])  # those steps (keep)
            stepped: dict[int, Message] = {}  # replies of the clients that took this step
            for partition in kept:
                client, reply = active[partition], replies[partition]
                self.batches_done[partition] = self.batches_done.get(partition, 0) + 1
                client.step += 1
                self.clients.steps[partition] = client.step
                stepped[partition] = reply
                if "packet" in reply.content:
                    client.packet = reply.content["packet"]
                    client.batch = int(reply.content["metrics"]["batch"])
                else:  # its last step: the reply carries its trained front
                    del active[partition]
                    self.ledger.add(
                        server_round, partition, Traffic.of_model_sync(reply.content["front"])
                    )
                    outcome.finished[partition] = reply
                    self.clients.remember(partition, reply)
            if probe:
                self.probe(server_round, stepped, outcome)

    def stop_cut_clients(self, server_round: int) -> None:
        """``train.stop`` to the clients cut this round: their nodes forget the round's state
        (nothing of a client should outlive its round; see ``client-optimizer``)."""
        if not self.clients.to_stop:
            return
        config = ConfigRecord({"server-round": server_round})
        messages = {
            p: self.post.message(p, "train.stop", server_round, config=config)
            for p in self.post.idle(sorted(self.clients.to_stop))
        }
        for partition, reply in self.post.exchange(messages, self.timeout).items():
            self.clients.remember(partition, reply)

    def _settle(
        self,
        server_round: int,
        exchange: int,
        costs: list[ClientCost],
        active: dict[int, ClientRound],
        outcome: RoundOutcome,
        keep: int | None = None,
    ) -> list[int]:
        """Run the simulated clock over one exchange's replies; drop from ``active`` the
        clients that vanished or were too slow (what they sent still counts as sent: a late
        packet crossed the link); the partitions that go on, ascending."""
        steps = {p: c.steps for p, c in active.items()}
        dropped = self.clients.settle(server_round, exchange, costs, steps, keep)
        for cost in costs:  # a straggler's reply came, too late: it crossed the link
            if dropped.get(cost.partition) == STRAGGLER:
                late = (
                    self.packet_traffic(cost.reply, cost.forward_batch)
                    if cost.forward_batch
                    else Traffic.of_model_sync(cost.reply)
                )
                self.ledger.add(server_round, cost.partition, late)
        for partition, reason in sorted(dropped.items()):
            del active[partition]
            outcome.failures[partition] = Failure(reason, DROP_DETAIL[reason])
        if dropped:
            failed = {p: outcome.failures[p] for p in dropped}
            self.post.progress(f"  dropped: {describe_failures(failed)}")
        return sorted(active)  # clients without a reply left ``active`` before

    def server_step(
        self, server_round: int, active: dict[int, ClientRound]
    ) -> tuple[float, dict[int, ArrayRecord]]:
        """Decode every active client's packet, one server batch; gradient records per client."""
        # fixed order (by partition), whatever order the replies arrived in: the server batch,
        # and with it every seeded draw after it (channel noise), is reproducible
        partitions = sorted(active)
        packets = []
        for partition in partitions:
            record = active[partition].packet
            received = record_to_packet(record, device=self.server.device)
            received.compressor = self.compressor_for(self.clients.xi[partition])
            packets.append(received)
            # soft-label counts add up to the batch
            batch = int(received.targets.sum()) if received.soft_targets else len(received.targets)
            self.ledger.add(server_round, partition, self.packet_traffic(record, batch))
        loss, grads, rows = self.server.step(packets)
        self.clients.server_step(rows)
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"server loss is {loss} at round {server_round}, step {self.global_step}: "
                f"training diverged (try a lower lr than {self.cfg.lr:g})"
            )
        return loss, {
            p: grads_to_record(g, self.cfg.wire_dtype)
            for p, g in zip(partitions, grads, strict=True)
        }

    def packet_traffic(self, record: ArrayRecord, batch: int) -> Traffic:
        """Uplink of one packet of ``batch`` samples; its reference is what method `none`
        would send for the same batch: B samples, all tokens, float32."""
        return Traffic.of_packet(record, uncompressed_act_nbytes(batch, *self.front_shape))

    def compressor_for(self, xi: float) -> Compressor:
        """The server side of ξ's compressor (one per ξ used: adaptive-compression)."""
        if xi not in self._compressors:
            hidden = self.front_shape[1]
            num_classes = self.server.compressor.num_classes
            self._compressors[xi] = build_compressor(
                self.cfg.replace(compression=xi), num_classes, hidden_size=hidden
            ).to(self.server.device)
        return self._compressors[xi]

    def budget_spent(self) -> bool:
        return self.cfg.budget_mb > 0 and self.ledger.mb_sent >= self.cfg.budget_mb

    def evaluation_due(self, global_step: int) -> bool:
        return bool(self.cfg.eval_every) and global_step % self.cfg.eval_every == 0

    def step_message(
        self, server_round: int, client: ClientRound, grads: ArrayRecord, last: bool, probe: bool
    ) -> Message:
        """``train.step``: gradients of the packet in flight; ``last`` asks for the front
        instead of a next packet, ``probe`` for the front beside it (evaluation only)."""
        config = ConfigRecord({"last": last or client.on_last_step, "probe": probe})
        return self.post.message(
            client.partition_id, "train.step", server_round, grads=grads, config=config
        )
