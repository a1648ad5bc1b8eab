"""Every check a run config must pass before anything expensive starts, in one function.

``scripts/flwr_run.sh`` (through ``simulations.preflight``), the sweep runner, the in-process
API and the ServerApp all call :func:`validate_run`, so a bad value fails the same way
everywhere: one :class:`~adc_flwr.config.ConfigError` naming the key and what it accepts,
in seconds, before Flower or Ray start. Beyond types and ranges (``RunConfig``) it checks
what needs the machine, the data or the model: that ``device`` exists here and runs
``precision``, that the method exists and accepts its parameters for this model, that
``split-index`` fits the model's depth, that the dataset (or ``data-dir``) is there, and that
the partitioner can split it over ``num_partitions`` clients.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adc_flwr.config import ConfigError, RunConfig
from adc_flwr.run.input_root import InputPathError, check_input, local_inputs

log = logging.getLogger("adc_flwr")


def validate_run(run_config: Mapping[str, Any], num_supernodes: int | None = None) -> RunConfig:
    """The validated :class:`RunConfig` of ``run_config`` (kebab-case keys, absent = default).

    ``num_supernodes``: the SuperNodes of the federation when known. With them, or with
    ``num-partitions`` set, it checks that partitioning and sampling are feasible. Loads the
    dataset (cached per process) and builds the model once, about a second for the presets.
    """
    from adc_flwr.compression import available_methods, build_compressor, get_compressor_class
    from adc_flwr.data import DataError, load_data, run_partitions
    from adc_flwr.model.inputs import InputSpec
    from adc_flwr.model.vit import ModelError, build_model, split_vit
    from adc_flwr.population.profile_csv import run_profiles
    from adc_flwr.population.profiles import ProfileError
    from adc_flwr.training.device import check_precision, resolve_device

    cfg = RunConfig.from_run_config(run_config)
    check_out_root(cfg)
    check_in_root(cfg)
    # a GPU asked for must be there, and run bf16 if asked (ConfigError otherwise)
    check_precision(resolve_device(cfg.device), cfg.precision)
    if cfg.method not in available_methods():
        raise ConfigError(
            f"run-config key 'method' = {cfg.method!r}: allowed values are "
            f"{', '.join(available_methods())}"
        )
    num_partitions = cfg.num_partitions or num_supernodes
    if num_partitions:
        sampled = cfg.clients_per_round(num_partitions)
        if sampled < cfg.min_clients:
            raise ConfigError(
                f"run-config key 'min-clients' = {cfg.min_clients}: fraction-train="
                f"{cfg.fraction_train:g} of {num_partitions} partitions samples {sampled} "
                "client(s) a round, so min-clients must be at most that"
            )
    if num_supernodes is not None:
        if cfg.min_nodes > num_supernodes:
            raise ConfigError(
                f"run-config key 'min-nodes' = {cfg.min_nodes}: only {num_supernodes} "
                "SuperNode(s) will run; allowed range is [1, num-supernodes]"
            )
        drawn = cfg.draws_per_round(cfg.num_partitions)
        if cfg.pooled and drawn > num_supernodes:
            raise ConfigError(
                f"run-config key 'num-partitions' = {cfg.num_partitions}: each round draws "
                f"{drawn} client(s) (fraction-train x over-select), and each needs a SuperNode "
                f"of its own, but num-supernodes = {num_supernodes}; raise num-supernodes to "
                f"at least {drawn} (nodes are cheap: Ray's actors do the work) or lower "
                "fraction-train"
            )
    if cfg.adaptive_compression:
        _check_adaptive(cfg, get_compressor_class(cfg.method))
    try:
        run_profiles(cfg.profile_mix, 1, cfg.seed, cfg.profile_trace)
    except ProfileError as exc:
        raise ConfigError(str(exc)) from exc
    try:
        data = load_data(cfg.dataset, cfg.data_dir, cfg.classes)
        if cfg.privacy_eval != "off" and cfg.privacy_aux_samples >= len(data.test):
            raise ConfigError(
                f"run-config key 'privacy-aux-samples' = {cfg.privacy_aux_samples}: the test "
                f"split holds {len(data.test)} images, and central evaluation keeps the rest; "
                f"allowed range is [1, {len(data.test) - 1}]"
            )
        vit = build_model(cfg, data)
        InputSpec.for_model(vit, data, cfg.model)  # a checkpoint's image processor
        front, _ = split_vit(vit, cfg.split_index)
        build_compressor(cfg, data.num_classes, hidden_size=front.hidden_size)
        if cfg.adaptive_compression:  # the smallest ξ a client may get must build too
            smallest = cfg.replace(compression=cfg.compression_min)
            build_compressor(smallest, data.num_classes, hidden_size=front.hidden_size)
        if num_partitions:
            warn_small_partitions(cfg, [len(p) for p in run_partitions(cfg, num_partitions)])
    except (DataError, ModelError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(str(exc)) from exc
    return cfg


def _check_adaptive(cfg: RunConfig, method: type) -> None:
    """Adaptive ξ needs a method whose parameter ``compression`` sets, and no override."""
    overrides = method.adaptive_overrides
    if overrides is None:
        raise ConfigError(
            f"run-config key 'adaptive-compression' = true: method {cfg.method!r} takes no "
            "parameter from 'compression' that a client could choose for itself (learned "
            "parts are sized by it, its group size must divide the batch, or it has none); use "
            "adc, topk, random-topk, quant or pq"
        )
    given = [key for key in overrides if getattr(cfg, key.replace("-", "_"))]
    if given:
        raise ConfigError(
            f"run-config key 'adaptive-compression' = true: {', '.join(map(repr, given))} "
            f"would fix {cfg.method}'s parameter for every client; leave it at 0"
        )


def partitions_below_batch(batch_size: int, sizes: list[int]) -> dict[str, int]:
    """How many partitions hold fewer samples than a batch, and the smallest: their
    clients train on batches of their whole partition (the batch is clamped to it)."""
    below = [s for s in sizes if s < batch_size]
    return {"partitions": len(below), "smallest": min(sizes, default=0)}


def warn_small_partitions(cfg: RunConfig, sizes: list[int]) -> None:
    """Say so before the run when ``batch-size`` exceeds some partitions (not an error:
    thousands of small clients are a study of their own); the summary records it too."""
    clamp = partitions_below_batch(cfg.batch_size, sizes)
    if clamp["partitions"]:
        log.warning(
            "warning: run-config key 'batch-size' = %d is above %d of %d partition(s) "
            "(the smallest holds %d samples): their clients train on batches of their whole "
            "partition; summary.json records it as batch_clamped",
            cfg.batch_size,
            clamp["partitions"],
            len(sizes),
            clamp["smallest"],
        )


OUT_ROOT_ENV = "ADC_OUT_ROOT"  # set where the ServerApp runs, not by whoever submits a run


def check_out_root(cfg: RunConfig) -> None:
    """:class:`ConfigError` when ``ADC_OUT_ROOT`` is set in this process's environment and
    the run directory does not lie inside it. The ServerApp writes wherever ``out-dir``
    points, and on a shared deployment whoever submits a run chooses it: the deployment
    pins the root in the environment of its SuperLink, which no run config can change."""
    root = os.environ.get(OUT_ROOT_ENV, "").strip()
    if root and not cfg.run_dir.is_relative_to(Path(root).expanduser().resolve()):
        raise ConfigError(
            f"run-config key 'out-dir' = {cfg.out_dir!r}: this deployment writes runs under "
            f"{OUT_ROOT_ENV}={root}; the run directory {cfg.run_dir} is outside it"
        )


def check_in_root(cfg: RunConfig) -> None:
    """:class:`ConfigError` naming the key when a path of :func:`local_inputs` lies outside
    ``ADC_IN_ROOT`` (when set in this process's environment) or is a FIFO or device: as for
    ``out-dir``, whoever submits a run to a deployment chooses these paths."""
    for key, path in local_inputs(cfg):
        try:
            check_input(path)
        except InputPathError as exc:
            value = getattr(cfg, key.replace("-", "_"))
            raise ConfigError(f"run-config key {key!r} = {value!r}: {exc}") from None
