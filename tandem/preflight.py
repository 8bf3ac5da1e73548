"""Before any node trains: load and report the data, check what nodes will need.

The ServerApp runs :func:`run_checked` around the method. It loads the run's
dataset (so a wrong ``data-path`` fails the run at once, on the server),
reports what was loaded (console and a ``data`` record in ``metrics.jsonl``),
and checks the facts of the nodes' side that the server can see: with the
``natural`` partitioner, one partition per node needs at least as many
natural ids (WISDM users) as nodes. Any exception from the checks or the
method is recorded by the tracker and re-raised, so Flower reports the run
as ``finished:failed`` with the message as its status details.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from tandem.config import ConfigError, RunConfig
from tandem.datasets import ArraySplit, DataBundle
from tandem.failures import run_reporting_failure
from tandem.protocol.simultrain import SimulTrainOptions
from tandem.server_context import ServerRun
from tandem.split import split_model

__all__ = [
    "check_partitions",
    "check_simultrain_cut",
    "data_lines",
    "data_report",
    "run_checked",
]


def _split_figures(split: ArraySplit) -> dict[str, object]:
    figures: dict[str, object] = {
        "samples": len(split),
        "classes": len(np.unique(split.y)),
    }
    if split.groups is not None:
        figures["natural-ids"] = len(np.unique(split.groups))
    return figures


def data_report(bundle: DataBundle) -> dict[str, Any]:
    """What was loaded: per split, samples, classes present and natural ids,
    plus the source's own report (e.g. WISDM's skipped records)."""
    return {
        "dataset": bundle.name,
        "num-classes": bundle.num_classes,
        "train": _split_figures(bundle.train),
        "test": _split_figures(bundle.test),
        **dict(bundle.report),
    }


def data_lines(report: Mapping[str, Any]) -> list[str]:
    """Console lines of a :func:`data_report`."""

    def split(name: str) -> str:
        s = report[name]
        ids = f", {s['natural-ids']} natural ids" if "natural-ids" in s else ""
        return f"{name} {s['samples']:,} samples ({s['classes']} classes{ids})"

    lines = [
        f"data {report['dataset']}: {split('train')}; {split('test')}; "
        f"{report['num-classes']} classes in all"
    ]
    if "corpus-sha256" in report:  # pysource: which interpreter, which files
        lines.append(
            f"data {report['dataset']}: Python {report['python-version']} stdlib, "
            f"{report['files']} files ({report['files-test']} held out for test) "
            f"of {report['units']} modules, {report['bytes-used']:,} bytes; "
            f"corpus sha256 {report['corpus-sha256']}"
        )
    if "file-sha256" in report:  # text: which file
        lines.append(
            f"data {report['dataset']}: {report['format']} file, "
            f"{report['file-bytes']:,} bytes, sha256 {report['file-sha256']}"
        )
    if "records" in report:
        lines.append(
            f"data {report['dataset']}: {report['records']:,} records read, "
            f"{report['skipped-records']:,} skipped as malformed; "
            f"{report['users']} users, {report['windows']:,} windows of "
            f"{report['window']} samples"
        )
        lines.extend(f"  skipped {why}" for why in report.get("skipped-examples", []))
        short = report.get("users-without-window") or []
        if short:
            lines.append(
                f"  {len(short)} users have no full {report['window']}-sample "
                f"window and are left out: {', '.join(map(str, short))}"
            )
    return lines


def check_partitions(cfg: RunConfig, bundle: DataBundle, nodes: int) -> None:
    """Check a node-side fact on the server: enough natural ids for ``nodes``.

    Each node takes one partition (the simulation sets ``num-partitions`` to
    the number of SuperNodes), and the ``natural`` partitioner needs at least
    one natural id per partition.

    Raises
    ------
    ConfigError
        With the message a node would raise, naming how many nodes there are.
    """
    groups = bundle.train.groups
    if cfg.data.partitioner != "natural" or groups is None:
        return
    ids = len(np.unique(groups))
    if nodes > ids:
        raise ConfigError(
            "num-partitions",
            nodes,
            f"must not exceed the {ids} natural ids (users) in the data "
            f"({nodes} nodes take one partition each); use at most {ids} nodes, "
            "or partitioner iid or dirichlet",
        )


def check_simultrain_cut(srv: ServerRun) -> None:
    """Check ``simultrain-cut`` against the run's model, whatever the method.

    The key is a stage name or index of the model, so only the model can tell
    whether it is valid; every key is checked on every run, so a FedAvg run
    with a cut that names no stage stops here too.

    Raises
    ------
    ConfigError
        Naming the key, the value and the model's stages.
    """
    cut = srv.cfg.section(SimulTrainOptions).cut
    if cut != "default":
        split_model(srv.build_model(), cut)


def _check_before_training(srv: ServerRun) -> None:
    bundle = srv.data()
    report = data_report(bundle)
    srv.tracker.log_event("data", report)
    for line in data_lines(report):
        srv.tracker.note(line)
    nodes = max(srv.cfg.min_nodes, len(list(srv.grid.get_node_ids())))
    check_partitions(srv.cfg, bundle, nodes)
    check_simultrain_cut(srv)


def run_checked(srv: ServerRun, run_server: Callable[[ServerRun], None]) -> None:
    """Check the data and the nodes' facts, then run the method.

    A failure of either is recorded (:meth:`~tandem.tracking.Tracker.fail`)
    and re-raised for Flower to report.
    """

    def body() -> None:
        _check_before_training(srv)
        run_server(srv)

    run_reporting_failure(srv.tracker.fail, body)
