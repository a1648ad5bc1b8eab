"""What the server evaluates: the global model on the central test split each round, the
model as it stands mid-round (``eval-every``), and the clients' held-out activations
(federated evaluation, ``federated-eval-every``). Nothing here is compressed, counted as
traffic or put on the simulated clock.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from adc_flwr.config import RunConfig
from adc_flwr.data import ImageSplit
from adc_flwr.model.inputs import InputSpec
from adc_flwr.training.evaluation import evaluate
from adc_flwr.training.modules import load_modules_state
from adc_flwr.training.workers import ServerWorker
from adc_flwr.wire.codec import record_to_state
from strategies.messaging import fronts


@dataclass(eq=False)
class Evaluator:
    """Central and federated evaluation against the strategy's back.

    Attributes:
        cfg: the run config (evaluation batch size, precision).
        server: the back and the compressor's server side.
        client_modules: the global client-side modules (front, learned encoder).
        test_split, spec: central test data and how to feed it to the model.
    """

    cfg: RunConfig
    server: ServerWorker
    client_modules: dict[str, torch.nn.Module]
    test_split: ImageSplit
    spec: InputSpec
    _probe_modules: dict[str, torch.nn.Module] | None = field(default=None, init=False)

    def central(self, modules: dict[str, torch.nn.Module]) -> tuple[float, float]:
        """Accuracy and loss of ``modules`` + the back on the central test split."""
        return evaluate(
            modules,
            self.server.back,
            self.test_split,
            self.spec,
            self.cfg.eval_batch_size,
            compressor=self.server.compressor,
            precision=self.cfg.precision,
        )

    def averaged(self, replies: list[Message]) -> dict[str, torch.nn.Module]:
        """Client-side modules holding the average, weighted by examples trained this round,
        of the fronts in ``replies`` (a copy of the global modules, reused)."""
        if self._probe_modules is None:
            self._probe_modules = copy.deepcopy(self.client_modules)
        average: ArrayRecord = aggregate_arrayrecords(fronts(replies), "num-examples")
        load_modules_state(self._probe_modules, record_to_state(average))
        return self._probe_modules

    def held_out(self, replies: list[tuple[int, Message]]) -> dict[int, tuple[float, int]]:
        """Federated evaluation: the back on each client's held-out activations; accuracy and
        examples by partition (clients without held-out samples are left out)."""
        results: dict[int, tuple[float, int]] = {}
        self.server.back.eval()
        device = self.server.device
        with torch.no_grad():
            for partition, reply in replies:
                record = reply.content["held-out"]
                labels = torch.from_numpy(record["labels"].numpy()).to(device)
                if len(labels) == 0:
                    continue
                h = torch.from_numpy(record["h"].numpy()).to(device)
                logits = self.server.logits(self.server.compressor.eval_server(h))
                accuracy = float((logits.argmax(dim=1) == labels).float().mean())
                results[partition] = (accuracy, len(labels))
        self.server.back.train()
        return results
