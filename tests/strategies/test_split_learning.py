"""The ServerApp/Strategy/ClientApp loop through an in-process grid (no Ray).

Runs on scikit-learn's digits (8×8, 17 tokens with the vit-cpu preset) so each run takes
about a second.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from adc_flwr.compression import build_compressor
from adc_flwr.config import RunConfig
from adc_flwr.data import load_data
from adc_flwr.model.inputs import InputSpec
from adc_flwr.model.vit import build_model, split_vit
from adc_flwr.run.run_dir import RunDir
from adc_flwr.training.workers import ServerWorker
from clients import client_app as client_module
from clients.context_state import load_tensors
from clients.node_cache import ClientSetup, client_setup
from simulations.inprocess_grid import InProcessGrid, set_task_identity
from strategies.lifecycle import build_strategy, run_training
from strategies.messaging import Messenger
from strategies.outcomes import RoundFailed
from strategies.split_strategy import SplitLearningStrategy
from tests.support.helpers import tiny_config, train_in_process


def run(cfg: RunConfig, nodes: int, **grid_kwargs: object) -> tuple[dict, InProcessGrid]:
    grid = InProcessGrid(client_module.app, nodes, cfg.to_run_config(), **grid_kwargs)
    lines: list[str] = []
    summary = run_training(grid, cfg, progress=lines.append)
    return summary, grid


def test_split_sgd_equals_unsplit_training(tmp_path: Path) -> None:
    """Method none, one client, SGD: 3 split steps == 3 steps of the whole model."""
    cfg = tiny_config(tmp_path, optimizer="sgd", lr=0.05)
    strategy, _ = train_in_process(cfg, nodes=1)

    data = load_data(cfg.dataset)
    reference = build_model(cfg, data)
    spec = InputSpec.for_model(reference, data)
    opt = torch.optim.SGD(reference.parameters(), lr=cfg.lr)
    setup = client_setup(cfg, 0, 1)
    for step in range(cfg.local_steps):
        pixels, labels = spec.batch(data.train, setup.batch_indices(step))
        loss = F.cross_entropy(reference(pixel_values=pixels).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    ref_front, ref_back = split_vit(reference, cfg.split_index)
    for ours, ref in (
        (strategy.client_modules["front"], ref_front),
        (strategy.server.back, ref_back),
    ):
        for (name, p), q in zip(ours.state_dict().items(), ref.state_dict().values(), strict=True):
            torch.testing.assert_close(p, q, atol=1e-5, rtol=0, msg=name)
    assert strategy.history[0]["clients"] == 1


def test_adc_recompute_is_bit_exact(tmp_path: Path) -> None:
    """The client's recomputed forward (with the saved plan) equals its first forward."""
    cfg = tiny_config(tmp_path, method="adc", compression=0.25)
    setup = client_setup(cfg, 0, 2)
    data = load_data(cfg.dataset)
    vit = build_model(cfg, data)
    front, _ = split_vit(vit, cfg.split_index)
    worker = setup.worker(
        {f"front.{k}": v for k, v in front.state_dict().items()}, optimizer_state=None
    )
    idx = setup.batch_indices(0)
    first = worker.forward_packet(idx, seed=7)
    again = worker._encode(idx, seed=123, plan=first.plan)  # another seed: the plan must rule
    assert first.plan["assign"].shape == (len(idx),)
    for name, tensor in first.tensors.items():
        assert torch.equal(tensor, again.tensors[name].detach()), name
    assert torch.equal(first.targets, again.targets)


def test_state_survives_messages_and_rounds(tmp_path: Path) -> None:
    """Front weights and Adam moments live in context.state across steps and rounds."""
    cfg = tiny_config(tmp_path, method="adc", num_server_rounds=2, client_optimizer="keep")
    _, grid = train_in_process(cfg, nodes=2)
    for context in grid.contexts.values():
        optim = load_tensors(context, "optim")
        steps = {int(v) for k, v in optim.items() if k.endswith(".step")}
        assert steps == {2 * cfg.local_steps}  # Adam's step counter ran on over both rounds
        # between rounds a client keeps its moments only: never the front the server resends
        assert set(context.state) == {"optim", "optim.layout"}


def test_client_optimizer_reset_keeps_nothing_between_rounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(tmp_path, method="adc", num_server_rounds=2)
    assert cfg.client_optimizer == "reset"  # the default
    started_with: list[bool] = []
    real_worker = ClientSetup.worker

    def worker(self, front_state, optimizer_state, compression=None):
        started_with.append(optimizer_state is None)
        return real_worker(self, front_state, optimizer_state, compression)

    monkeypatch.setattr(ClientSetup, "worker", worker)
    _, grid = train_in_process(cfg, nodes=2)
    for context in grid.contexts.values():
        assert len(context.state) == 0
    # each train.start builds a fresh optimizer; each train.step restores the round's moments
    assert started_with.count(True) == 2 * 2


def test_fedavg_of_fronts_matches_hand_computation(tmp_path: Path) -> None:
    set_task_identity()
    strategy, _ = build_strategy(tiny_config(tmp_path), run_dir=None)
    w1, w2 = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((2, 3), np.float32)
    replies = []
    for w, n in ((w1, 10), (w2, 30)):
        content = RecordDict(
            {
                "front": ArrayRecord({"w": Array(w)}),
                "metrics": MetricRecord({"num-examples": n}),
            }
        )
        replies.append(Message(content, dst_node_id=1, message_type="train.start"))
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), (10 * w1 + 30 * w2) / 40, rtol=1e-6)
    assert metrics["num-examples"] == 40


def test_run_writes_run_directory_and_counts_bytes(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, method="adc", compression=0.1, num_server_rounds=2)
    summary, grid = run(cfg, nodes=2)
    assert summary["status"] == "completed" and summary["stop_reason"] == "num-server-rounds"
    assert summary["rounds"] == 2
    # ADC at 0.1 sends about a tenth of the uncompressed activation bytes, up and down alike
    assert 0.05 < summary["compression_ratio"] < 0.15
    assert summary["bytes_down_grad"] == summary["bytes_up_act"]
    metrics = RunDir(cfg.run_dir).read_metrics()
    assert (metrics["kind"] == "step").sum() == 2 * cfg.local_steps
    assert (metrics["kind"] == "eval").sum() == 2
    assert metrics["bytes_up_act"].dropna().is_monotonic_increasing
    # 2 nodes asked which partition they hold, then (start + 3 steps) × 2 rounds each
    assert grid.messages_sent == 2 + 2 * (1 + cfg.local_steps) * 2


def test_vanilla_relays_front_through_clients(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, sl_mode="vanilla", optimizer="sgd", lr=0.05)
    strategy, grid = train_in_process(cfg, nodes=2)
    # each client trained after the other: the server back took 2 × local-steps steps
    assert len(strategy.history) == 1 and strategy.history[0]["clients"] == 2
    assert strategy.global_step == 2 * cfg.local_steps
    assert grid.messages_sent == 2 + 2 * (1 + cfg.local_steps)


def test_failing_client_is_dropped_and_round_completes(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, num_server_rounds=2)

    def fail_partition_1(pid: int, msg: Message) -> None:
        if pid == 1 and msg.metadata.message_type == "train.step":
            raise RuntimeError("simulated crash")

    summary, _ = run(cfg, nodes=3, before_call=fail_partition_1)
    assert summary["status"] == "completed"
    assert [h["clients"] for h in summary["history"]] == [2, 2]
    assert [h["sampled"] for h in summary["history"]] == [3, 3]
    assert summary["drops"] == {
        "error": 2,
        "timeout": 0,
        "unavailable": 0,
        "dropped-out": 0,
        "straggler": 0,
    }


def test_silent_client_times_out_and_is_not_messaged_again(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, step_timeout=0.05, start_timeout=0.05, num_server_rounds=2)
    summary, grid = run(cfg, nodes=2, silent_nodes={0})
    assert summary["status"] == "completed"
    assert [h["clients"] for h in summary["history"]] == [1, 1]
    # round 2 draws partition 0 again, but its node still owes the reply to round 1's start:
    # it is not messaged, and counts as unavailable
    assert [h["sampled"] for h in summary["history"]] == [2, 2]
    assert summary["drops"] == {
        "error": 0,
        "timeout": 1,
        "unavailable": 1,
        "dropped-out": 0,
        "straggler": 0,
    }
    # 2 info queries; partition 0 got its first start message only
    assert grid.messages_sent == 2 + (1 + (1 + cfg.local_steps)) + (1 + cfg.local_steps)


def test_run_where_every_client_fails_is_failed_with_the_error_once(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, num_server_rounds=3)

    def fail_all(pid: int, msg: Message) -> None:
        if msg.metadata.message_type.startswith("train"):
            raise RuntimeError("disk full")

    with pytest.raises(RoundFailed) as raised:
        run(cfg, nodes=4, before_call=fail_all)
    message = str(raised.value)
    assert "0 of 4 sampled client(s) finished, fewer than the 1 required" in message
    assert message.count("disk full") == 1  # one error, told once, with the partitions
    assert "partitions 0, 1, 2, 3" in message
    summary = RunDir(cfg.run_dir).read_summary()
    assert summary["status"] == "failed" and "disk full" in summary["error"]
    assert summary["rounds"] == 1
    assert summary["drops"] == {
        "error": 4,
        "timeout": 0,
        "unavailable": 0,
        "dropped-out": 0,
        "straggler": 0,
    }
    assert RunDir(cfg.run_dir).load_checkpoint() is None  # a failed round is not checkpointed


def test_every_client_timing_out_fails_the_run(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, step_timeout=0.001, start_timeout=0.001)
    with pytest.raises(RoundFailed, match="timeout on 2 client"):
        run(cfg, nodes=2, silent_nodes={0, 1})
    assert RunDir(cfg.run_dir).read_summary()["status"] == "failed"


def test_first_exchange_gets_start_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading data and building the model on a client's first message may take far longer
    than a step: the start of the first round waits start-timeout, later steps step-timeout."""
    cfg = tiny_config(tmp_path, step_timeout=0.5, start_timeout=30.0, num_server_rounds=2)
    waited: list[tuple[str, float]] = []
    real = Messenger.exchange

    def exchange(self, messages, timeout):
        waited.append((messages[0].metadata.message_type, timeout))
        return real(self, messages, timeout)

    monkeypatch.setattr(Messenger, "exchange", exchange)
    summary, _ = run(cfg, nodes=2)
    assert summary["status"] == "completed"
    assert waited[0] == ("query.info", 30.0)
    starts = [t for kind, t in waited if kind == "train.start"]
    assert starts == [30.0, 0.5]  # round 1 cold, round 2 warm
    assert {t for kind, t in waited if kind == "train.step"} == {0.5}


def test_min_clients_fails_a_round_with_one_raising_client(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, min_clients=2, num_server_rounds=2)

    def fail_partition_0(pid: int, msg: Message) -> None:
        if pid == 0 and msg.metadata.message_type == "train.step":
            raise ValueError("bad batch")

    with pytest.raises(RoundFailed) as raised:
        run(cfg, nodes=2, before_call=fail_partition_0)
    assert "1 of 2 sampled client(s) finished, fewer than the 2 required by min-clients=2" in str(
        raised.value
    )
    assert "error on 1 client(s) (partition 0): ValueError: bad batch" in str(raised.value)
    summary = RunDir(cfg.run_dir).read_summary()
    assert summary["status"] == "failed" and summary["drops"]["error"] == 1
    assert summary["history"][0]["clients"] == 1


def test_nan_loss_stops_with_message_and_keeps_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(tmp_path, local_steps=4)
    real_step = ServerWorker.step
    calls = {"n": 0}

    def nan_on_third(self, packets):
        calls["n"] += 1
        step = real_step(self, packets)
        return step._replace(loss=math.nan) if calls["n"] == 3 else step

    monkeypatch.setattr(ServerWorker, "step", nan_on_third)
    with pytest.raises(RuntimeError, match="diverged"):
        run(cfg, nodes=1)
    run_dir = RunDir(cfg.run_dir)
    summary = run_dir.read_summary()
    assert summary["status"] == "failed" and "nan" in summary["error"].lower()
    assert (run_dir.read_metrics()["kind"] == "step").sum() == 2


def test_budget_stops_the_run(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, local_steps=50, num_server_rounds=5, budget_mb=1.0)
    summary, _ = run(cfg, nodes=2)
    assert summary["status"] == "completed" and summary["stop_reason"] == "budget-mb"
    sent = sum(summary[k] for k in ("bytes_up_act", "bytes_up_targets", "bytes_down_grad"))
    total = sent + summary["bytes_model_sync"]
    assert total >= 1e6
    # it stopped in the step that crossed the budget: one step of traffic over it, at most,
    # plus the front weights coming back
    step_bytes = sent / len(RunDir(cfg.run_dir).read_metrics().query("kind == 'step'"))
    assert total - 1e6 <= step_bytes + summary["bytes_model_sync"]


def test_crash_then_resume_equals_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SGD (no optimizer state on clients): a resumed run ends with the same weights."""
    whole = tiny_config(tmp_path / "a", optimizer="sgd", lr=0.05, num_server_rounds=3)
    reference, _ = train_in_process(whole, nodes=2)

    cfg = tiny_config(tmp_path / "b", optimizer="sgd", lr=0.05, num_server_rounds=3)
    real_evaluate = SplitLearningStrategy.evaluate_round

    def crash_in_round_2(self, server_round, outcome):
        if server_round == 2:
            raise RuntimeError("power cut")
        return real_evaluate(self, server_round, outcome)

    monkeypatch.setattr(SplitLearningStrategy, "evaluate_round", crash_in_round_2)
    with pytest.raises(RuntimeError, match="power cut"):
        run(cfg, nodes=2)
    monkeypatch.setattr(SplitLearningStrategy, "evaluate_round", real_evaluate)

    lines: list[str] = []
    grid = InProcessGrid(client_module.app, 2, cfg.to_run_config())
    summary = run_training(grid, cfg, progress=lines.append)
    assert any("resuming" in line for line in lines)
    assert summary["status"] == "completed" and summary["rounds"] == 3
    metrics = RunDir(cfg.run_dir).read_metrics()
    assert (metrics["kind"] == "eval").sum() == 3  # no duplicate rows from the crashed round
    assert (metrics["kind"] == "step").sum() == 3 * cfg.local_steps

    state = RunDir(cfg.run_dir).load_checkpoint()
    for name, value in reference.server.back.state_dict().items():
        assert torch.equal(state["back"][name], value), name  # bit for bit

    # a finished run is not redone
    again = run_training(grid, cfg, progress=lines.append)
    assert again["rounds"] == 3 and "already finished" in lines[-1]


def test_compressor_mismatch_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"method='nope'.*choose one of"):
        build_compressor(tiny_config(tmp_path, method="nope"), num_classes=10)


def test_configure_train_builds_the_start_messages_the_client_app_runs(tmp_path: Path) -> None:
    """Flower's configure_train hook yields the same train.start the loop sends."""
    cfg = tiny_config(tmp_path)
    grid = InProcessGrid(client_module.app, 2, cfg.to_run_config())
    strategy, arrays = build_strategy(cfg, run_dir=None, progress=lambda _: None)
    strategy.sampler.settle_s = 0.0
    messages = list(strategy.configure_train(1, arrays, ConfigRecord({"note": "x"}), grid))
    assert len(messages) == 2
    assert messages[0].content["config"]["note"] == "x"
    replies = grid.send_and_receive(messages)
    assert all(not r.has_error() and "packet" in r.content for r in replies)


def test_strategy_start_keeps_flowers_arguments(tmp_path: Path) -> None:
    """evaluate_fn runs before the first round and after each, as in Flower's start;
    train_config reaches the clients in train.start, evaluate_config in evaluate.held_out
    (federated evaluation), whose accuracies are Flower's client-side evaluation metrics."""
    cfg = tiny_config(tmp_path, num_server_rounds=2, federated_eval_every=1)
    grid = InProcessGrid(client_module.app, 2, cfg.to_run_config())
    strategy, arrays = build_strategy(cfg, run_dir=None, progress=lambda _: None)
    strategy.sampler.settle_s = 0.0
    calls: list[int] = []
    seen_config: list[tuple[str, str]] = []

    def note(_pid: int, msg: Message) -> None:
        if msg.metadata.message_type in ("train.start", "evaluate.held_out"):
            seen_config.append((msg.metadata.message_type, msg.content["config"]["note"]))

    grid.before_call = note

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        calls.append(server_round)
        return MetricRecord({"custom": float(server_round)})

    result = strategy.start(
        grid,
        arrays,
        num_rounds=2,
        train_config=ConfigRecord({"note": "hi"}),
        evaluate_config=ConfigRecord({"note": "ev"}),
        evaluate_fn=evaluate_fn,
    )
    assert calls == [0, 1, 2]
    # 2 clients × 2 rounds of each
    assert sorted(seen_config) == [("evaluate.held_out", "ev")] * 4 + [("train.start", "hi")] * 4
    assert result.evaluate_metrics_serverapp[2]["custom"] == 2.0
    assert "test_accuracy" in result.evaluate_metrics_serverapp[2]
    assert set(result.evaluate_metrics_clientapp) == {1, 2}
    fed = result.evaluate_metrics_clientapp[2]["fed_accuracy_mean"]
    assert fed == strategy.history[1]["fed_accuracy_mean"] and 0 <= fed <= 1
    assert result.train_metrics_clientapp[1]["clients"] == 2
