"""Edge and cloud agree: the fill of unsent groups, and a codec added by one class.

The edge runs :func:`~tandem.compression.pipeline.compress_update` and mirrors
the cloud's stand-ins for the groups it defers; the cloud
(:class:`~tandem.strategies.compressed.CompressedUpdates`) decodes the reply
and fills those groups from its cache. Both must reconstruct the very same
update, bit for bit, or the edge's error feedback would carry the wrong
residual.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from tandem.compression.codecs import (
    Codec,
    CodecError,
    Option,
    codec_rule,
    encode,
    encoded_nbytes,
    option_table,
    parse_codecs,
    register,
    unregister,
)
from tandem.compression.knapsack import select_options
from tandem.compression.packing import encode_packed, pack_groups, unpack_groups
from tandem.compression.pipeline import EdgeMemory, compress_update
from tandem.protocol.acesync import (
    EDGE_METRICS,
    KEY_UPDATE,
    AceSyncOptions,
    EdgePlan,
    update_record,
)
from tandem.strategies.compressed import CompressedUpdates

GLOBAL = {
    "conv.weight": np.zeros((4, 2, 5), np.float32),
    "conv.bias": np.zeros(4, np.float32),
    "fc.weight": np.zeros((3, 20), np.float32),
}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _as_reply(node, content):
    sent = Message(RecordDict(), dst_node_id=node, message_type="train")
    sent.metadata.__dict__["_message_id"] = f"m{node}-{id(content)}"
    return Message(content, reply_to=sent)


class _Cloud(CompressedUpdates):
    """The wrapper with a fixed byte budget per node."""

    budget = 0

    def plan(self, server_round, node_ids, config):
        return {n: self.make_plan(server_round, self.budget, 1) for n in node_ids}


def _edge_reply(node, out, plan):
    metrics = {
        **dict.fromkeys(sorted(EDGE_METRICS), 0.0),
        "num-examples": 10,
        "steps": plan.local_steps,
        "bytes-budget": plan.budget,
        "bytes-encoded": out.encoded_bytes,
    }
    content = RecordDict(
        {
            KEY_UPDATE: update_record(out.codecs, out.payload),
            "metrics": MetricRecord(metrics),
        }
    )
    return _as_reply(node, content)


def _rounds(cloud, rounds, seed=0):
    """Run ``rounds`` rounds of one edge against ``cloud``; yield what each
    side reconstructed and the codec table sent."""
    rng = np.random.default_rng(seed)
    cloud.set_arrays(ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}))
    layout = cloud.layout
    memory = EdgeMemory.fresh(layout, cloud.history)
    for server_round in range(1, rounds + 1):
        plan = cloud.prepare(server_round, [1], ConfigRecord())[1]
        # the plan crosses the wire as config entries
        plan = EdgePlan.from_config(plan.to_config())
        update = rng.laplace(size=layout.total).astype(np.float32)
        weights = rng.normal(size=layout.total).astype(np.float32)
        out = compress_update(update, weights, memory, plan, layout)
        decoded, _ = cloud.decode_replies(server_round, [_edge_reply(1, out, plan)])
        assert len(decoded) == 1, cloud.stats
        yield out, decoded[0]


def test_edge_and_cloud_fill_deferred_groups_identically():
    cloud = _Cloud(
        FedAvg(),
        codecs=(Option("full"), Option("topk", 0.25), Option("defer")),
        chunk=16,
        gamma=1.0,
        importance="magnitude",
        fill_decay=0.5,
        history=2,
    )
    cloud.budget = 150  # about a third of the 416 float32 bytes
    deferred_and_cached = 0
    for out, decoded in _rounds(cloud, rounds=8):
        # the cloud's û_k is the edge's "sent", bit for bit
        np.testing.assert_array_equal(decoded.update, out.sent)
        deferred = out.codecs == 2
        assert (~decoded.sent == deferred).all()
        stand_ins = np.repeat(deferred, cloud.layout.sizes)
        deferred_and_cached += int(np.count_nonzero(out.sent[stand_ins]))
    # the scenario really exercised fills from the cache (not only zeros)
    assert deferred_and_cached > 0


def test_fill_with_no_decay_repeats_and_full_decay_zeroes():
    for decay in (0.0, 1.0):
        cloud = _Cloud(
            FedAvg(),
            codecs=(Option("half"), Option("defer")),
            chunk=8,
            importance="magnitude",
            fill_decay=decay,
            history=1,
        )
        cloud.budget = 60
        for out, decoded in _rounds(cloud, rounds=5, seed=3):
            np.testing.assert_array_equal(decoded.update, out.sent)


# --------------------------------------------------------------------------- codec
class Mean(Codec):
    """A toy codec: one float32, the group's mean, for every element."""

    name = "mean"
    layout = {"mean": np.dtype(np.float32)}  # noqa: RUF012

    def lengths(self, sizes, ratio):
        return {"mean": np.ones_like(sizes)}

    def fidelity(self, ratio):
        return 0.25

    def encode(self, x, ratio):
        mean = x.astype(np.float64).mean() if x.size else 0.0
        return {"mean": np.array([mean], dtype=np.float32)}

    def expand(self, arrays, size):
        return np.full(size, arrays["mean"][0], dtype=np.float32)


@pytest.fixture
def mean_codec():
    codec = register(Mean())
    yield codec
    unregister("mean")


def test_a_new_codec_is_one_class_and_one_registry_line(mean_codec):
    options = parse_codecs("full,mean,defer")
    assert options[1] == Option("mean") and options[1].codec is mean_codec
    assert "mean" in codec_rule()
    assert encoded_nbytes("mean", 17) == 4
    with pytest.raises(CodecError, match="takes no ratio"):
        Option("mean", 0.5)
    # the option rule of acesync-codecs reads the registry
    assert AceSyncOptions(codecs="full,mean").options == options[:2]
    # the knapsack prices it: 4 bytes a group
    sizes = np.array([16, 16, 8, 4])
    costs, fidelity = option_table(options, sizes)
    assert costs[:, 1].tolist() == [4, 4, 4, 4]
    assert fidelity.tolist() == [1.0, 0.25, 0.0]
    choice = select_options(np.ones(4), costs, fidelity, budget=16).choice
    assert choice.tolist() == [1, 1, 1, 1]  # mean everywhere fits, full nowhere
    # the packed wire: the vectorized encoder gives the per-group bytes
    x = np.arange(44, dtype=np.float32)
    codes, payload, decoded = encode_packed(x, sizes, choice, options)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    per_group = [
        encode("mean", x[s : s + n]) for s, n in zip(starts, sizes, strict=True)
    ]
    np.testing.assert_array_equal(pack_groups(per_group, choice, options)[1], payload)
    assert payload.size == 16
    back = unpack_groups(codes, payload, sizes, options)
    np.testing.assert_array_equal(np.concatenate(back), decoded)
    np.testing.assert_array_equal(decoded[:16], np.full(16, 7.5, np.float32))


def test_a_new_codec_runs_through_the_edge_and_the_cloud(mean_codec):
    cloud = _Cloud(
        FedAvg(),
        codecs=parse_codecs("full,mean"),
        chunk=16,
        importance="uniform",
    )
    cloud.budget = 4 * 8 + 16  # groups of 16, 16, 8, 4, 16, 16, 16, 12: mean x8
    chosen = set()
    for out, decoded in _rounds(cloud, rounds=3, seed=5):
        np.testing.assert_array_equal(decoded.update, out.sent)
        chosen |= set(out.codecs.tolist())
        assert out.encoded_bytes <= cloud.budget
    assert 1 in chosen  # the toy codec went over the wire
    # a hostile length for it is refused by the generic checks
    with pytest.raises(CodecError, match="payload has 3 bytes"):
        unpack_groups(
            np.array([1], np.uint8), np.zeros(3, np.uint8), np.array([5]), cloud.codecs
        )


# --------------------------------------------------------------------------- layering
def _imports(path):
    import ast

    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_cloud_and_edge_meet_only_in_the_protocol_and_compression_is_pure():
    from pathlib import Path

    import tandem

    root = Path(tandem.__file__).parent
    cloud = ["compressed.py", "acesync.py", "acesync_baselines.py"]
    for name in cloud:
        imports = _imports(root / "strategies" / name)
        assert not any(m.startswith("tandem.clients") for m in imports), name
    edge = _imports(root / "clients" / "acesync.py")
    assert not any(m.startswith("tandem.strategies") for m in edge)
    assert "tandem.protocol.acesync" in edge
    for path in (root / "compression").glob("*.py"):
        imports = _imports(path)
        assert not any(m.split(".")[0] == "flwr" for m in imports), path.name
        assert not any(
            m.startswith(("tandem.wire", "tandem.protocol", "tandem.clients"))
            for m in imports
        ), path.name


def test_compression_mod_replaces_a_local_model_by_its_compressed_update():
    """The mod around any handler that replies with its local model."""
    from tandem.clients.acesync import compression_mod

    cloud = _Cloud(FedAvg(), codecs=(Option("full"), Option("defer")), chunk=16)
    cloud.budget = 10**6
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    cloud.set_arrays(arrays)
    plan = cloud.prepare(1, [1], ConfigRecord())[1]
    msg = Message(
        cloud.content(1, plan, arrays, {}), dst_node_id=1, message_type="train"
    )
    local = {k: v + 0.5 for k, v in GLOBAL.items()}

    def trained(message, context):  # a plain local-model reply
        metrics = {
            "train-loss": 0.25,
            "num-examples": 12,
            "train-seconds": 0.1,
            "compute-seconds": 0.05,
            "steps": 1,
        }
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in local.items()}),
                "metrics": MetricRecord(metrics),
            }
        )
        return Message(content, reply_to=message)

    from flwr.app import Context

    context = Context(
        run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}
    )
    reply = compression_mod(msg, context, trained)
    assert set(reply.content.keys()) == {"update", "metrics"}
    metrics = reply.content["metrics"]
    assert set(metrics.keys()) == EDGE_METRICS
    assert metrics["num-examples"] == 12 and metrics["train-compute-seconds"] == 0.05
    assert metrics["compute-seconds"] >= 0.05
    decoded, _ = cloud.decode_replies(1, [reply])
    # everything sent in full: the cloud gets θ_k − θ = 0.5 everywhere
    np.testing.assert_array_equal(decoded[0].update, np.full(104, 0.5, np.float32))
