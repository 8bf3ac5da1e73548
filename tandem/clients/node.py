"""What every edge handler needs: this node's identity, data and devices."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from flwr.app import ConfigRecord, Context

from tandem.config import ConfigError, RunConfig
from tandem.datasets import ArraySplit, load_dataset, partition_indices
from tandem.training import BatchStream
from tandem.wire import KEY_NODE

__all__ = [
    "KEY_NODE",
    "NodeConfig",
    "load_node_split",
    "node_record",
    "restore_stream",
    "save_stream",
]

STREAM_STATE_KEY = "tandem.stream"


@dataclass(frozen=True)
class NodeConfig:
    """A SuperNode's own settings (``--node-config``; set by the simulation).

    Attributes
    ----------
    partition_id : int
        Which share of the data this node holds.
    num_partitions : int
        Into how many shares the data is cut.
    data_path : str
        Optional per-node data location, overriding the run's ``data-path``.
    link : str
        Optional declared link spec: ``link-profile`` as given (a preset such
        as ``4g``, or ``UP/DOWN/RTT`` such as ``2mbit/8mbit/120ms``), or the
        ``link-trace`` file's steps inline (``table:...``). Reported to the
        cloud with every reply, so its clock and methods know the link.
    """

    partition_id: int
    num_partitions: int
    data_path: str = ""
    link: str = ""

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> NodeConfig:
        """Parse and check a node config."""
        try:
            pid = node_config["partition-id"]
            num = node_config["num-partitions"]
        except KeyError as err:
            raise ConfigError(
                f"node-config {err.args[0]}",
                None,
                "is required (flower-supernode --node-config "
                '"partition-id=0 num-partitions=2")',
            ) from None
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ConfigError("num-partitions", num, "must be an integer >= 1")
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < num:
            raise ConfigError("partition-id", pid, f"must be an integer in [0, {num})")
        path = node_config.get("data-path", "")
        return cls(pid, num, str(path), _declared_link(node_config, pid))

    def stream_seed(self, run_seed: int) -> int:
        """Seed of this node's batch order: distinct per node, fixed per run."""
        return run_seed * 1_000_003 + self.partition_id


def _declared_link(node_config: Mapping[str, object], partition_id: int = 0) -> str:
    """Validate ``link-profile`` / ``link-trace`` from a node config.

    ``link-profile`` is any single-link spec (a preset or ``UP/DOWN/RTT``);
    ``link-trace`` a trace file (:func:`~tandem.network.load_link_trace`; a
    FedScale capacity file without ``#client`` gives the ``partition-id``-th
    client). A trace is sent inline (:func:`~tandem.network.encode_link`),
    since the cloud cannot read the node's files.
    """
    from tandem.network import encode_link, parse_link

    name = node_config.get("link-profile", "")
    trace = node_config.get("link-trace", "")
    if name and trace:
        raise ConfigError(
            "link-trace", trace, "give link-profile or link-trace, not both"
        )
    if name:
        if str(name).startswith("mix:"):
            raise ConfigError("link-profile", name, "a node has one link, not a mix")
        try:
            parse_link(str(name))
        except ValueError as err:
            raise ConfigError("link-profile", name, str(err)) from None
        return str(name).strip()
    if trace:
        try:
            return encode_link(parse_link(f"trace:{trace}", index=partition_id))
        except ValueError as err:
            raise ConfigError("link-trace", trace, str(err)) from None
    return ""


def node_record(node: NodeConfig) -> ConfigRecord:
    """What a reply tells the cloud about the node (wire key ``node``)."""
    return ConfigRecord({"partition-id": node.partition_id, "link": node.link})


def _node_data_config(cfg: RunConfig, node: NodeConfig) -> RunConfig:
    if node.data_path:
        return replace(cfg, data=replace(cfg.data, path=node.data_path))
    return cfg


def load_node_split(
    cfg: RunConfig, node: NodeConfig, split: str = "train"
) -> ArraySplit:
    """This node's share of the ``train`` or ``test`` split.

    The test split is cut with the same partitioner, so a node's evaluation data
    follows the same distribution (same users, or the same label skew drawn
    independently) as its training data.
    """
    data_cfg = _node_data_config(cfg, node).data
    bundle = load_dataset(data_cfg)
    rows = bundle.train if split == "train" else bundle.test
    idx = partition_indices(
        rows.partition_labels,
        rows.groups,
        data_cfg.partitioner,
        node.num_partitions,
        node.partition_id,
        alpha=data_cfg.dirichlet_alpha,
        seed=data_cfg.seed if split == "train" else data_cfg.seed + 1,
    )
    return rows.subset(idx)


def restore_stream(
    context: Context, split: ArraySplit, batch_size: int, seed: int
) -> BatchStream:
    """The node's batch stream, resumed from ``context.state`` if it has one."""
    record = context.state.config_records.get(STREAM_STATE_KEY)
    if record is None:
        return BatchStream(split, batch_size, seed)
    return BatchStream(
        split,
        batch_size,
        seed,
        epoch=int(record["epoch"]),
        offset=int(record["offset"]),
    )


def save_stream(context: Context, stream: BatchStream) -> None:
    """Store the stream's position in ``context.state`` for the next message."""
    epoch, offset = stream.position
    context.state[STREAM_STATE_KEY] = ConfigRecord({"epoch": epoch, "offset": offset})
