"""Flower ClientApp: the ViT's front blocks and the split-point compressor.

Protocol (docs/design.md section 3), one exchange per step:

- ``query.info``: which partition this node holds (node ids say nothing about it).
- ``train.start`` {front weights, config}: load the front, forward batch 0, reply packet 0;
  the config carries this client's own data cursor (batches consumed in earlier rounds).
- ``train.step`` {gradients for packet s, config}: recompute forward s with its saved plan,
  backward, optimizer step; reply packet s+1, or on the last step the front weights.
- ``evaluate.held_out`` {front}: federated evaluation on the partition's held-out part.
- ``train.stop``: the server cut this client from the round (simulated drop-out or
  straggler): forget the round's state.

With ``num-partitions`` > 0 the node is a worker, not a client: every message names the
partition it runs (``partition-id`` in ``train.start`` and ``evaluate.held_out``, kept in
``context.state`` for the round's steps), and with ``client-optimizer = keep`` the moments go
to the server at the round's end and come back with the client's next ``train.start``. A
node's own client sends them too (the server puts them in its checkpoint) but keeps its own
copy, and is sent the server's only when its ``context.state`` lacks them (a resumed run).

The front runs on this process's client device (``device``; under Ray the GPU its actor was
given, if any); everything that leaves it (packets, fronts, ``context.state``) goes through the
CPU. Between messages only ``context.state`` survives. Within a round it holds the front, the
optimizer state and the plan of the packet in flight; between rounds only what the server
cannot send again: the optimizer moments with ``client-optimizer = keep``, nothing with
``reset`` (the front comes with every ``train.start``).
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from adc_flwr.config import RunConfig
from adc_flwr.training.modules import optimizer_tensors
from adc_flwr.training.workers import ClientWorker
from adc_flwr.wire.codec import packet_to_record, record_to_grads, record_to_state, state_to_record
from clients import engine_dispatch
from clients.context_state import load_tensors, store_tensors
from clients.node_cache import ClientSetup, client_setup

app = ClientApp()
engine_dispatch.install()  # where this process runs the simulation engine (flwr 1.41.0)

FRONT = "front"
OPTIM = "optim"
PENDING = "pending"
PENDING_META = "pending-meta"
ROUND = "round"


@app.query("info")
def info(msg: Message, context: Context) -> Message:
    """Which data partition this node holds: the server samples partitions, not node ids."""
    node = context.node_config
    record = MetricRecord(
        {"partition-id": int(node["partition-id"]), "num-partitions": int(node["num-partitions"])}
    )
    return Message(RecordDict({"info": record}), reply_to=msg)


@app.train("start")
def start(msg: Message, context: Context) -> Message:
    """Start of a round: take the front the server sent, send the first packet."""
    config = msg.content["config"]
    setup = _setup(context, int(config["partition-id"]))
    if int(config["partition-id"]) != setup.partition_id:
        raise ValueError(
            f"the server addressed partition {config['partition-id']} to the node holding "
            f"partition {setup.partition_id}"
        )
    keep = setup.cfg.client_optimizer == "keep"
    moments = None
    if keep and not setup.cfg.pooled and OPTIM in context.state:  # the node's own copy
        moments = _optimizer_state(context)
    elif keep and OPTIM in msg.content:  # pooled; or the checkpoint's, after a resume
        moments = record_to_state(msg.content[OPTIM])
    _clear(context, keep_moments=keep and not setup.cfg.pooled)  # what a dropped round left
    xi = float(config["compression"])
    worker = setup.worker(record_to_state(msg.content[FRONT]), moments, xi)
    context.state[ROUND] = ConfigRecord(
        {
            "server-round": int(config["server-round"]),
            "partition-id": setup.partition_id,
            "batches-done": int(config["batches-done"]),
            "compression": xi,
        }
    )
    reply = _forward_next(setup, worker, context, step=0, examples=0)
    _save(context, worker)
    return Message(reply, reply_to=msg)


@app.train("step")
def step(msg: Message, context: Context) -> Message:
    """Apply the gradients of the packet in flight; send the next packet or the front.

    ``probe`` asks for the front beside the next packet: the server evaluates the model as it
    stands mid-round (``eval-every``); it is not part of the protocol's traffic.
    """
    setup = _setup(context, int(context.state[ROUND]["partition-id"]))
    config = msg.content["config"]
    xi = float(context.state[ROUND]["compression"])
    worker = setup.worker(load_tensors(context, FRONT), _optimizer_state(context), xi)
    pending = context.state[PENDING]
    meta = context.state[PENDING_META]
    plan = {
        k.removeprefix("plan."): v for k, v in pending.to_torch_state_dict().items() if k != "idx"
    }
    idx = pending["idx"].numpy()
    batch = int(context.state[ROUND]["batches-done"]) + int(meta["step"])
    worker.apply_grads(
        idx,
        int(meta["seed"]),
        plan,
        record_to_grads(msg.content["grads"]),
        setup.augment_seed(batch),
    )
    examples = int(meta["examples"]) + len(idx)
    if bool(config["last"]):
        metrics = MetricRecord({"num-examples": examples})
        reply = RecordDict({FRONT: state_to_record(worker.front_state()), "metrics": metrics})
        _clear(context, keep_moments=False)
        if setup.cfg.client_optimizer == "keep":  # the only thing a client keeps
            _keep_moments(setup, context, reply, optimizer_tensors(worker.optimizer))
        return Message(reply, reply_to=msg)
    reply = _forward_next(setup, worker, context, step=int(meta["step"]) + 1, examples=examples)
    if bool(config["probe"]):
        reply[FRONT] = state_to_record(worker.front_state())
    _save(context, worker)
    return Message(reply, reply_to=msg)


@app.evaluate("held_out")
def evaluate_held_out(msg: Message, context: Context) -> Message:
    """Federated evaluation: the global front on this client's held-out samples; the server
    runs the back on the activations (nothing of this is stored or counted as traffic)."""
    setup = _setup(context, int(msg.content["config"]["partition-id"]))
    h, labels = setup.held_out_activations(record_to_state(msg.content[FRONT]))
    record = ArrayRecord({"h": h.contiguous(), "labels": labels})
    return Message(RecordDict({"held-out": record}), reply_to=msg)


@app.train("stop")
def stop(msg: Message, context: Context) -> Message:
    """The server ended this client's round early (it vanished or was too slow in the
    simulated clock): forget the round, keep what a finished round would keep."""
    cfg = RunConfig.from_run_config(context.run_config)
    reply = RecordDict()
    keep = cfg.client_optimizer == "keep" and OPTIM in context.state
    if keep:  # what it keeps goes back to the server (pooled: which holds it for the client)
        reply[OPTIM] = state_to_record(load_tensors(context, OPTIM))
    _clear(context, keep_moments=keep and not cfg.pooled)
    return Message(reply, reply_to=msg)


def _setup(context: Context, partition_id: int) -> ClientSetup:
    """This message's client: with ``num-partitions`` the partition the server addressed
    (``partition_id``: any node may run any client), else the node's own partition."""
    cfg = RunConfig.from_run_config(context.run_config)
    if cfg.pooled:
        return client_setup(cfg, partition_id, cfg.num_partitions)
    node = context.node_config
    return client_setup(cfg, int(node["partition-id"]), int(node["num-partitions"]))


def _keep_moments(
    setup: ClientSetup, context: Context, reply: RecordDict, moments: dict[str, torch.Tensor]
) -> None:
    """``client-optimizer = keep`` at the end of a round: the moments go to the server with
    the front (not traffic: they stand for memory on the client's device; the server holds a
    pooled client's and checkpoints everyone's); a node's own client also keeps them in
    ``context.state``."""
    reply[OPTIM] = state_to_record(moments)
    if not setup.cfg.pooled:
        store_tensors(context, OPTIM, moments)


def _forward_next(
    setup: ClientSetup,
    worker: ClientWorker,
    context: Context,
    *,
    step: int,
    examples: int,
) -> RecordDict:
    """Forward and encode batch ``step`` of this round; remember its plan in the state.

    ``examples`` counts the samples already trained this round (FedAvg weight).
    """
    round_state = context.state[ROUND]
    batch = int(round_state["batches-done"]) + step
    idx = setup.batch_indices(batch)
    seed = setup.encode_seed(int(round_state["server-round"]), step)
    packet = worker.forward_packet(idx, seed, setup.augment_seed(batch))
    pending = {"idx": torch.from_numpy(idx)} | {f"plan.{k}": v for k, v in packet.plan.items()}
    context.state[PENDING] = ArrayRecord(pending)
    context.state[PENDING_META] = ConfigRecord({"seed": seed, "step": step, "examples": examples})
    metrics = MetricRecord(
        {"steps-per-epoch": setup.steps_per_epoch, "num-examples": examples, "batch": len(idx)}
    )
    return RecordDict(
        {"packet": packet_to_record(packet, setup.cfg.wire_dtype), "metrics": metrics}
    )


def _optimizer_state(context: Context) -> dict[str, torch.Tensor] | None:
    return load_tensors(context, OPTIM) if OPTIM in context.state else None


def _save(context: Context, worker: ClientWorker) -> None:
    store_tensors(context, FRONT, worker.front_state())
    store_tensors(context, OPTIM, optimizer_tensors(worker.optimizer))


def _clear(context: Context, *, keep_moments: bool) -> None:
    """Empty ``context.state`` (but for the optimizer moments when ``keep_moments``)."""
    kept = (OPTIM, f"{OPTIM}.layout") if keep_moments else ()
    for key in list(context.state):
        if key not in kept:
            del context.state[key]
