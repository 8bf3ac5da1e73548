"""Clusters that shape ACE-Sync training, against the real edge handlers.

Two groups of devices on the grouped split (their labels disagree), the
in-process Grid of tests/inprocess.py: clusters form after the first round,
each device then trains from its cluster's model, and every device does
better with its cluster's model than with the global one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import MessageType
from flwr.supercore.task_identity import TaskIdentity
from inprocess import InProcessGrid, run_inprocess

from tandem.wire import KEY_ARRAYS, KEY_CONFIG

CONFIG = {
    "method": "acesync",
    "mnist1d-samples": 2000,
    "num-server-rounds": 4,
    "local-steps": 20,
    "partitioner": "grouped",
    "partition-groups": 2,
    "acesync-personalize": True,
    "acesync-recluster-every": 2,
    "acesync-interval-mode": "batched",
}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _record_sent(monkeypatch):
    """(round, node) -> the flat float arrays of each train message pushed."""
    sent: dict[tuple[int, int], np.ndarray] = {}
    push = InProcessGrid.push_messages

    def recording(self, messages):
        messages = list(messages)
        for msg in messages:
            if msg.metadata.message_type == MessageType.TRAIN:
                content = msg.content
                round_ = int(content[KEY_CONFIG]["server-round"])
                arrays = content.array_records.get(KEY_ARRAYS)
                sent[(round_, msg.metadata.dst_node_id)] = (
                    None
                    if arrays is None  # continuous sync: the device resumes
                    else np.concatenate(
                        [arrays[k].numpy().ravel() for k in sorted(arrays)]
                    )
                )
        return push(self, messages)

    monkeypatch.setattr(InProcessGrid, "push_messages", recording)
    return sent


def test_clusters_shape_training_on_the_grouped_split(tmp_path, monkeypatch):
    sent = _record_sent(monkeypatch)
    records, _ = run_inprocess(CONFIG, nodes=6, out=tmp_path)
    events = [r for r in records if r["event"] == "clusters"]
    assert [e["round"] for e in events] == [1, 2, 3, 4]
    assert [e["reclustered"] for e in events] == [True, False, True, False]
    # partition p is in group p mod 2; node ids are p + 1
    groups = [(1, 3, 5), (2, 4, 6)]
    for e in events:
        assert e["clusters"] == 2 and e["cluster-sizes"] == [3, 3]
        labels = e["labels"]
        first = {labels[str(n)] for n in groups[0]}
        second = {labels[str(n)] for n in groups[1]}
        assert len(first) == len(second) == 1 and first != second
        # the inner FedAvg's global model is the device -> cluster -> global
        # aggregate (float32 rounding apart)
        assert e["hierarchical-gap"] < 1e-6
    # round 1: everyone trains from the global model; later rounds: each
    # cluster from its own model, and the two clusters' models differ
    assert all(np.array_equal(sent[(1, 1)], sent[(1, n)]) for n in range(2, 7))
    for round_ in (2, 3, 4):
        for members in groups:
            a = sent[(round_, members[0])]
            assert all(np.array_equal(a, sent[(round_, n)]) for n in members[1:])
        assert np.max(np.abs(sent[(round_, 1)] - sent[(round_, 2)])) > 1e-3
    summary = records[-1]
    assert summary["personal-in-training"] is True
    assert summary["personal-clusters"] == 2
    assert summary["personal-devices"] == 6
    per_global = summary["personal-device-accuracy-global"]
    per_cluster = summary["personal-device-accuracy-cluster"]
    assert sorted(per_global) == sorted(per_cluster) == [str(n) for n in range(1, 7)]
    mean_global = np.mean(list(per_global.values()))
    assert summary["personal-accuracy-global"] == pytest.approx(mean_global)
    # measured: 0.34 with the cluster's model, 0.24 with the global one
    assert (
        summary["personal-accuracy-cluster"]
        > summary["personal-accuracy-global"] + 0.05
    )
    assert summary["personal-devices-improved"] >= 4


def test_personalize_is_off_by_default(tmp_path, monkeypatch):
    sent = _record_sent(monkeypatch)
    # full models on the downlink, so every message shows the model it sends
    # (a compressed downlink sends each device a delta of its own)
    config = {
        **CONFIG,
        "num-server-rounds": 2,
        "acesync-personalize-rounds": 0,
        "acesync-downlink": "full",
    }
    del config["acesync-personalize"]
    records, _ = run_inprocess(config, nodes=4, out=tmp_path)
    assert not [r for r in records if r["event"] == "clusters"]
    for round_ in (1, 2):
        assert all(
            np.array_equal(sent[(round_, 1)], sent[(round_, n)]) for n in (2, 3, 4)
        )
    assert "personal-in-training" not in records[-1]


def test_a_personalized_reply_is_averaged_as_its_devices_model():
    """``rebuild`` hands the inner FedAvg ``b_k + û_k`` (cluster model + update)."""
    from flwr.app import Array, ArrayRecord
    from flwr.serverapp.strategy import FedAvg

    from tandem.protocol.acesync import AceSyncOptions
    from tandem.strategies.acesync import AceSync
    from tandem.strategies.compressed import DecodedUpdate

    strategy = AceSync(
        FedAvg(), options=AceSyncOptions(personalize=True), local_steps=1
    )
    theta = {"w": np.array([1.0, 2.0, 3.0], np.float32), "step": np.array(4)}
    strategy.set_arrays(ArrayRecord({k: Array(v) for k, v in theta.items()}))
    own = np.array([0.5, -1.0, 2.0], np.float32)  # node 7's cluster model
    strategy._bases = {7: own}
    update = np.array([0.25, 0.5, -0.75], np.float32)

    def reply(node):
        decoded = DecodedUpdate(
            node, update, np.ones(1, bool), {}, {"num-examples": 10.0}, 0, None
        )
        record = strategy.rebuild(decoded, 0.5, strategy.current)
        return record[strategy.strategy.arrayrecord_key]

    np.testing.assert_array_equal(reply(7)["w"].numpy(), [0.75, -0.5, 1.25])
    np.testing.assert_array_equal(reply(8)["w"].numpy(), [1.25, 2.5, 2.25])
    assert int(reply(7)["step"].numpy()) == 4  # not a float tensor: as sent


def test_clusters_and_their_models_survive_a_checkpoint():
    from flwr.serverapp.strategy import FedAvg

    from tandem.protocol.acesync import AceSyncOptions
    from tandem.strategies.acesync import AceSync

    def fresh():
        return AceSync(
            FedAvg(), options=AceSyncOptions(personalize=True), local_steps=1
        )

    before = fresh()
    before.hierarchy.restore({3: 0, 5: 1}, {0: np.ones(4), 1: np.arange(4.0)})
    arrays, state = before.checkpoint_state()
    after = fresh()
    after.restore_state(arrays, state)
    assert after.hierarchy.labels == {3: 0, 5: 1}
    np.testing.assert_array_equal(after.hierarchy.base(5), np.arange(4.0))
    np.testing.assert_array_equal(after.hierarchy.base(3), np.ones(4))


def test_clusters_shape_training_with_continuous_sync(tmp_path, monkeypatch):
    """Every device on a two-round interval: its cluster's model comes when
    an interval begins (rounds 2 and 4), nothing in the round it resumes
    and syncs (3 and 5), and the digest the cloud expects is the cluster
    model's it was sent."""
    sent = _record_sent(monkeypatch)
    config = {
        **CONFIG,
        "num-server-rounds": 5,
        "acesync-interval-mode": "continuous",
        "acesync-min-interval": 2,
        "acesync-max-interval": 2,
    }
    records, _ = run_inprocess(config, nodes=6, out=tmp_path)
    plans = {
        (r["round"], r["node-id"]): (r["resume"], r["hold"])
        for r in records
        if r["event"] == "plan"
    }
    phases = [(False, False), (False, True), (True, False), (False, True)]
    for n in range(1, 7):
        assert [plans[(r, n)] for r in range(1, 6)] == [*phases, (True, False)]
        assert sent[(3, n)] is None and sent[(5, n)] is None
    groups = [(1, 3, 5), (2, 4, 6)]
    for round_ in (2, 4):
        for members in groups:
            a = sent[(round_, members[0])]
            assert all(np.array_equal(a, sent[(round_, n)]) for n in members[1:])
        assert np.max(np.abs(sent[(round_, 1)] - sent[(round_, 2)])) > 1e-3
    events = [r for r in records if r["event"] == "clusters"]
    assert [e["round"] for e in events] == [1, 3, 5]  # the rounds with syncs
    assert all(e["clusters"] == 2 for e in events)
    assert all(e["hierarchical-gap"] < 1e-6 for e in events)
    summary = records[-1]
    assert summary["downlink-digest-mismatches"] == 0
    assert summary["rejected-replies"] == 0 and summary["dropouts"] == 0
    assert (
        summary["personal-accuracy-cluster"]
        > summary["personal-accuracy-global"] + 0.05
    )
