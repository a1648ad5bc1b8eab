"""The validated run configuration: one dataclass built from Flower's flat run-config dict.

Every key of ``[tool.flwr.app.config]`` in pyproject.toml is a field here (dashes become
underscores). Bad input raises :class:`ConfigError` naming the key and what it accepts, so
a typo in ``--run-config`` fails before any data or model is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adc_flwr.privacy.columns import PRIVACY_MODES

DATASETS_HELP = (
    "'fashion-mnist', 'digits', 'hf:<hub id>', 'parquet:<dir or file>' or 'imagefolder:<dir>'"
)
PARTITIONERS = ("iid", "dirichlet", "pathological", "shard")
POOLINGS = ("attention", "cls", "mean")
WIRE_DTYPES = ("float32", "float16", "bfloat16")
SL_MODES = ("splitfed", "vanilla")
OPTIMIZERS = ("adam", "adamw", "sgd")
CHANNELS = ("clean", "awgn")
DEVICE_HELP = "auto, cpu, cuda, cuda:N (N < the number of GPUs)"
PRECISIONS = ("fp32", "bf16")
AUGMENTS = ("none", "paper")  # adc_flwr/data/augment.py


_TERM = re.compile(r"^([0-9]+)(?:-([0-9]+))?$")
MAX_CLASS_INDEX = 100_000  # a range is expanded: "0-999999999" must not size memory


def parse_classes(spec: str) -> list[int]:
    """The class indices ``spec`` names, in its order ([] for an empty spec). Raises
    ValueError saying what is wrong (syntax, a reversed range, a repeat)."""
    spec = spec.strip()
    if not spec:
        return []
    picked: list[int] = []
    for term in spec.split(","):
        match = _TERM.match(term.strip())
        if not match:
            raise ValueError(
                f"{term.strip()!r} is not a class index or a range; expected e.g. '0-4' or "
                "'5,6,7,8,9' (class indices of the dataset, 0-based)"
            )
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise ValueError(f"range {term.strip()!r} runs backwards; write '{high}-{low}'")
        if high > MAX_CLASS_INDEX:
            raise ValueError(f"class index {high} is beyond any dataset's (<= {MAX_CLASS_INDEX})")
        picked.extend(range(low, high + 1))
    repeated = sorted(c for c, times in Counter(picked).items() if times > 1)
    if repeated:
        raise ValueError(f"class(es) {repeated} named more than once")
    return picked


class ConfigError(ValueError):
    """A run-config value is unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class RunConfig:
    """All run-config keys, typed, with the defaults pyproject.toml declares."""

    dataset: str = "fashion-mnist"
    data_dir: str = ""
    classes: str = ""
    augment: str = "none"
    partitioner: str = "iid"
    alpha: float = 0.5
    min_partition_size: int = 10
    classes_per_client: int = 2
    shards_per_client: int = 2
    seed: int = 42
    model: str = "vit-cpu"
    image_size: int = 0
    patch_size: int = 0
    split_index: int = 3
    method: str = "adc"
    compression: float = 0.1
    batch_compression: float = 0.0
    token_compression: float = 0.0
    pooling: str = "attention"
    c3sl_r: int = 0
    quant_bits: int = 0
    quant_granularity: str = "token"
    random_topk_p: float = 0.1
    bottlenet_width: int = 0
    bottlenet_layers: int = 2
    pq_subvectors: int = 0
    pq_centroids: int = 0
    pq_lambda: float = 0.0
    kmeans_iters: int = 50
    kmeans_tol: float = 1e-4
    wire_dtype: str = "float32"
    device: str = "auto"
    precision: str = "fp32"
    sl_mode: str = "splitfed"
    num_server_rounds: int = 5
    local_steps: int = 100
    batch_size: int = 128
    lr: float = 2e-3
    optimizer: str = "adam"
    client_optimizer: str = "reset"
    weight_decay: float = 0.0
    fraction_train: float = 1.0
    num_partitions: int = 0
    min_nodes: int = 1
    min_clients: int = 1
    budget_mb: float = 0.0
    eval_every: int = 0
    eval_batch_size: int = 512
    eval_samples: int = 0
    step_timeout: float = 120.0
    start_timeout: float = 600.0
    channel: str = "clean"
    snr_db: str = "10"
    profile_mix: str = "uniform"
    profile_trace: str = ""
    server_gflops: float = 10000.0
    deadline_s: float = 0.0
    straggler_policy: str = "drop"
    over_select: float = 1.0
    adaptive_compression: bool = False
    target_upload_s: float = 0.0
    compression_min: float = 0.01
    federated_eval_every: int = 0
    federated_eval_fraction: float = 0.1
    privacy_eval: str = "off"
    privacy_aux_samples: int = 2000
    privacy_clients: int = 4
    privacy_epochs: int = 30
    out_dir: str = "results"
    run_name: str = ""

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's ``context.run_config`` (kebab-case keys); absent keys: defaults."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in run_config.items():
            name = key.replace("-", "_")
            if name not in fields:
                known = sorted(f.replace("_", "-") for f in fields)
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(
                    f"unknown run-config key {key!r}{hint}; known keys: {', '.join(known)}"
                )
            values[name] = _coerce(key, raw, fields[name].type)
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def to_run_config(self) -> dict[str, Any]:
        """The kebab-case dict Flower uses (inverse of :meth:`from_run_config`)."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> RunConfig:
        """A validated copy with some fields changed (snake_case names)."""
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    # ---- derived values -------------------------------------------------------------

    @property
    def compression_split(self) -> tuple[float, float]:
        """(xi_b, xi_t) for ADC: both given, or sqrt(compression) each."""
        if self.batch_compression > 0 and self.token_compression > 0:
            return self.batch_compression, self.token_compression
        root = math.sqrt(self.compression)
        return root, root

    @property
    def snr_range_db(self) -> tuple[float, float]:
        """``snr-db`` as (low, high): 'x' means fixed x dB, 'a,b' uniform in [a, b]."""
        parts = [float(p) for p in self.snr_db.split(",")]
        return (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])

    def clients_per_round(self, num_partitions: int) -> int:
        """Clients sampled each round: ``fraction-train`` of the partitions, at least one."""
        return max(1, round(self.fraction_train * num_partitions))

    def draws_per_round(self, num_partitions: int) -> int:
        """Partitions drawn each round: the clients a round needs times ``over-select``."""
        count = self.clients_per_round(num_partitions)
        return min(num_partitions, math.ceil(round(count * self.over_select, 9)))

    @property
    def pooled(self) -> bool:
        """``num-partitions`` > 0: the population is that many partitions, and each round's
        clients run on whichever SuperNodes are free (a simulation of more clients than
        nodes); 0: one partition per SuperNode, each node its own client."""
        return self.num_partitions > 0

    def partitions(self, num_supernodes: int) -> int:
        """The population's size: ``num-partitions``, or one per SuperNode."""
        return self.num_partitions or num_supernodes

    @property
    def resolved_run_name(self) -> str:
        """``run-name``, or one derived from the swept parameters when empty."""
        if self.run_name:
            return self.run_name
        return f"{self.method}-c{self.compression:g}-{self.partitioner}-s{self.seed}"

    @property
    def run_dir(self) -> Path:
        """Absolute run directory ``<out-dir>/<run-name>``."""
        return Path(self.out_dir).expanduser().resolve() / self.resolved_run_name

    # ---- validation -----------------------------------------------------------------

    def validate(self) -> None:
        """Raise :class:`ConfigError` for the first value outside its allowed range."""
        for key, check in _CHECKS.items():
            value = getattr(self, key.replace("-", "_"))
            problem = check(value)
            if problem:
                raise ConfigError(f"run-config key {key!r} = {value!r}: {problem}")
        if self.batch_compression > 0 and self.token_compression > 0:
            # both given: they override `compression`; check their product is a valid ratio
            if not 0 < self.batch_compression * self.token_compression <= 1:
                raise ConfigError("batch-compression × token-compression must lie in (0, 1]")
        elif (self.batch_compression > 0) != (self.token_compression > 0):
            raise ConfigError(
                "batch-compression and token-compression must be given together "
                "(both > 0) or both left at 0 to split `compression` evenly"
            )
        if self.over_select > 1 and self.sl_mode == "vanilla":
            raise ConfigError(
                f"run-config key 'over-select' = {self.over_select!r}: vanilla split learning "
                "trains its clients one after another, so there is no first to finish; use 1"
            )
        if self.adaptive_compression and self.compression_min > self.compression:
            raise ConfigError(
                f"run-config key 'compression-min' = {self.compression_min!r} must not exceed "
                f"'compression' = {self.compression!r} with adaptive-compression"
            )


def _coerce(key: str, raw: Any, type_name: Any) -> Any:
    """Check ``raw`` against the field's declared type; ints are accepted for floats."""
    expected = {"str": str, "int": int, "float": float, "bool": bool}[str(type_name)]
    if expected is bool:
        if not isinstance(raw, bool):
            raise ConfigError(f"run-config key {key!r}: expected true or false, got {raw!r}")
        return raw
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise ConfigError(f"run-config key {key!r}: expected {expected.__name__}, got {raw!r}")
    if expected is float and isinstance(raw, int):
        return float(raw)
    if expected is int and isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if not isinstance(raw, expected):
        raise ConfigError(
            f"run-config key {key!r}: expected {expected.__name__}, "
            f"got {type(raw).__name__} {raw!r}"
        )
    return raw


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"allowed values are {', '.join(choices)}"


def _in_range(
    low: float, high: float = math.inf, *, low_open: bool = False
) -> Callable[[Any], str | None]:
    def check(v: float) -> str | None:
        left = "(" if low_open else "["
        right = "]" if high != math.inf else ")"
        allowed = f"allowed range is {left}{low:g}, {high:g}{right}"
        if not math.isfinite(v):
            return f"must be a finite number; {allowed}"
        if (v > low if low_open else v >= low) and v <= high:
            return None
        return allowed

    return check


def _dataset(v: str) -> str | None:
    if v in ("fashion-mnist", "digits"):
        return None
    prefix, _, rest = v.partition(":")
    if prefix in ("hf", "parquet", "imagefolder") and rest:
        return None
    return f"allowed values are {DATASETS_HELP}"


def _classes(v: str) -> str | None:
    try:
        parse_classes(v)
    except ValueError as err:
        return str(err)
    return None


def _snr(v: str) -> str | None:
    try:
        parts = [float(p) for p in v.split(",")]
    except ValueError:
        parts = []
    if len(parts) in (1, 2) and all(math.isfinite(p) for p in parts) and parts[0] <= parts[-1]:
        return None
    return "expected one number of dB ('10') or a range 'low,high' ('-10,10')"


def device_spelling(v: str) -> str | None:
    """Why ``v`` is no ``device`` value; whether that device exists is for ``validate_run``
    (this config is rebuilt in ClientApp processes, where Ray may hide the GPUs)."""
    return None if re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) else f"allowed values are {DEVICE_HELP}"


def _non_empty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


MAX_RUN_NAME_BYTES = 200


def run_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a run directory, or None: a run name is one folder name
    inside ``out-dir`` (the ServerApp takes it from whoever submits a run); empty means
    derived from the swept values."""
    if name in (".", ".."):
        return "must be a folder name, not '.' or '..'"
    if any(c in name for c in "/\\\0"):
        return "must be one folder name: no '/', '\\' or NUL"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "must not hold control characters (a newline, a tab, ...)"
    if name.startswith("-"):
        return "must not start with '-'"
    if (size := len(name.encode("utf-8"))) > MAX_RUN_NAME_BYTES:
        return f"is {size} bytes long; at most {MAX_RUN_NAME_BYTES}"
    return None


_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "dataset": _dataset,
    "classes": _classes,
    "augment": _one_of(*AUGMENTS),
    "partitioner": _one_of(*PARTITIONERS),
    "alpha": _in_range(0, low_open=True),
    "min-partition-size": _in_range(0),
    "classes-per-client": _in_range(1),
    "shards-per-client": _in_range(1),
    "seed": _in_range(0, 2**63 - 1),
    "model": _non_empty,
    "image-size": _in_range(0),
    "patch-size": _in_range(0),
    "split-index": _in_range(1),
    "method": _non_empty,
    "compression": _in_range(0, 1, low_open=True),
    "batch-compression": _in_range(0, 1),
    "token-compression": _in_range(0, 1),
    "pooling": _one_of(*POOLINGS),
    "c3sl-r": _in_range(0),
    "quant-bits": _in_range(0, 16),
    "quant-granularity": _one_of("token", "tensor"),
    "random-topk-p": _in_range(0, 1),
    "bottlenet-width": _in_range(0),
    "bottlenet-layers": _in_range(1, 8),
    "pq-subvectors": _in_range(0),
    "pq-centroids": _in_range(0),
    "pq-lambda": _in_range(0),
    "kmeans-iters": _in_range(1),
    "kmeans-tol": _in_range(0),
    "wire-dtype": _one_of(*WIRE_DTYPES),
    "device": device_spelling,
    "precision": _one_of(*PRECISIONS),
    "sl-mode": _one_of(*SL_MODES),
    "num-server-rounds": _in_range(1),
    "local-steps": _in_range(0),
    "batch-size": _in_range(2),
    "lr": _in_range(0, low_open=True),
    "optimizer": _one_of(*OPTIMIZERS),
    "client-optimizer": _one_of("reset", "keep"),
    "weight-decay": _in_range(0),
    "fraction-train": _in_range(0, 1, low_open=True),
    "num-partitions": _in_range(0),
    "min-nodes": _in_range(1),
    "min-clients": _in_range(1),
    "budget-mb": _in_range(0),
    "eval-every": _in_range(0),
    "eval-batch-size": _in_range(1),
    "eval-samples": _in_range(0),
    "step-timeout": _in_range(0, low_open=True),
    "start-timeout": _in_range(0, low_open=True),
    "channel": _one_of(*CHANNELS),
    "snr-db": _snr,
    "profile-mix": _one_of("uniform", "edge", "lognormal"),
    "server-gflops": _in_range(0, low_open=True),
    "deadline-s": _in_range(0),
    "straggler-policy": _one_of("drop", "wait"),
    "over-select": _in_range(1, 10),
    "target-upload-s": _in_range(0),
    "compression-min": _in_range(1e-4, 1),  # ξ is rounded to 4 digits
    "federated-eval-every": _in_range(0),
    "federated-eval-fraction": _in_range(0, 0.5, low_open=True),
    "privacy-eval": _one_of(*PRIVACY_MODES),
    "privacy-aux-samples": _in_range(1),
    "privacy-clients": _in_range(1),
    "privacy-epochs": _in_range(1),
    "out-dir": _non_empty,
    "run-name": run_name_problem,
}


def nominal_level(config: Mapping[str, Any]) -> float:
    """The compression level a run was swept at, on one axis for every method.

    ``compression``, except: 1 for ``none``; 1/R for C3-SL with ``c3sl-r``; bits/32 for
    quant with ``quant-bits``; xi_b·xi_t for ADC with both given. The measured ratio is
    ``compression_ratio``; this is the knob, for grouping and pivots.
    """
    method = config.get("method")
    if method == "none":
        return 1.0
    if method == "c3sl" and config.get("c3sl-r", 0) > 0:
        return 1.0 / config["c3sl-r"]
    if method == "quant" and config.get("quant-bits", 0) > 0:
        return config["quant-bits"] / 32
    xi_b, xi_t = config.get("batch-compression", 0.0), config.get("token-compression", 0.0)
    if method == "adc" and xi_b > 0 and xi_t > 0:
        return xi_b * xi_t
    return float(config.get("compression", RunConfig.compression))
