"""SimulTrain's stream transport: auth, TLS, hostile frames, the pipeline's maths.

The cloud's stream endpoint runs in-process (a real gRPC server on loopback,
port 0); edges are the real session handler, driven by the in-process Grid
(tests/inprocess.py) with one thread per node.
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from flwr.supercore.task_identity import TaskIdentity
from inprocess import InProcessGrid, run_inprocess

from tandem.certs import make_tls_files
from tandem.checkpoint import load_checkpoint
from tandem.clients.node import NodeConfig, load_node_split
from tandem.config import RunConfig
from tandem.frames import Frame, decode_frame, encode_frame
from tandem.options import ConfigError
from tandem.protocol.simultrain import (
    EdgeReply,
    SessionStart,
    SimulTrainOptions,
    edge_model,
    hello_frame,
    read_hello,
    reply_frame,
)
from tandem.server_context import ServerRun
from tandem.split import encode_cut
from tandem.strategies import simultrain
from tandem.strategies.simultrain import SimulTrainCloud
from tandem.strategies.simultrain_stream import StreamLoop
from tandem.streaming import Outbox, SessionKeys, StreamServer, open_stream
from tandem.tracking import read_jsonl
from tandem.training import BatchStream
from tandem.wire import PayloadError

BASE = {
    "method": "simultrain",
    "mnist1d-samples": 2000,
    "simultrain-chunk": 2,
    "simultrain-steps": 60,
    "simultrain-eval-every": 30,
    "simultrain-transport": "stream",
}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _events(records, kind):
    return [r for r in records if r["event"] == kind]


# ------------------------------------------------------------------ the endpoint
class Endpoint:
    """A cloud with its stream loop serving, and the sessions it opened."""

    def __init__(self, tmp_path, extra=None, nodes=2):
        flat = {
            "output-dir": str(tmp_path),
            "min-nodes": nodes,
            **BASE,
            **(extra or {}),
        }
        cfg = RunConfig.from_flat(flat)
        self.grid = InProcessGrid(flat, nodes)
        self.srv = ServerRun.open(cfg, self.grid, run_id=1)  # type: ignore[arg-type]
        self.tracker = self.srv.tracker
        options = cfg.options_as(SimulTrainOptions)
        self.cloud = SimulTrainCloud(self.srv, options)
        self.cloud.start(list(range(1, nodes + 1)))
        self.loop = StreamLoop(self.srv, self.cloud)
        self.loop.server.start()
        self.starts = {}
        for node, track in self.cloud.tracks.items():
            self.loop.open(track)
            msg = next(
                m
                for _, m in self.grid._pending.values()
                if m.metadata.dst_node_id == node
            )
            self.starts[node] = SessionStart.from_content(
                msg.content, self.cloud.edge_layout
            )
        self.theta_c = [p.detach().clone() for p in self.cloud.cloud.parameters()]
        self.theta_ec = {k: v.clone() for k, v in self.cloud.theta_ec.items()}

    def stream(self, frames, node=1, root=None):
        """Send ``frames``, close; the frames answered (raises RpcError)."""
        outbox = Outbox()
        for frame in frames:
            outbox.put(frame if isinstance(frame, bytes) else encode_frame(frame))
        outbox.close()
        start = self.starts[node]
        channel, responses = open_stream(
            start.address, iter(outbox), start.max_frame, root
        )
        try:
            return list(responses)
        finally:
            channel.close()

    def untouched(self):
        now = list(self.cloud.cloud.parameters())
        ec = self.cloud.theta_ec
        return (
            self.cloud.cloud_steps == 0
            and self.cloud.merges == 0
            and all(torch.equal(a, b) for a, b in zip(now, self.theta_c, strict=True))
            and all(torch.equal(v, self.theta_ec[k]) for k, v in ec.items())
        )

    def close(self):
        self.loop.server.stop(0)


@pytest.fixture
def endpoint(tmp_path):
    ep = Endpoint(tmp_path)
    yield ep
    ep.close()


def _code(err):
    return err.value.code()


FAR = "8mbit/8mbit/10000ms"


@pytest.mark.parametrize(
    ("extra", "window"),
    [
        # no delay, the same rate both ways: ceil((b + b) / b) + 2, any b
        ({"simultrain-link": "8mbit/8mbit/0ms"}, 4),
        # the slower uplink sets the pace: ceil((8b + b) / 8b) + 2
        ({"simultrain-link": "1mbit/8mbit/0ms"}, 4),
        # a 10 s RTT holds more chunks than the staleness bound allows
        ({"simultrain-link": FAR}, 8),
        ({"simultrain-link": FAR, "simultrain-staleness-bound": 3}, 3),
        ({"simultrain-link": FAR, "simultrain-window": 2}, 2),
        ({"simultrain-staleness-bound": 0}, 1),
    ],
)
def test_each_session_gets_the_window_its_link_needs(tmp_path, extra, window):
    ep = Endpoint(tmp_path, extra)
    try:
        assert ep.starts[1].window == ep.starts[2].window == window
    finally:
        ep.close()


def test_wrong_other_nodes_missing_and_replayed_secrets_are_refused(endpoint):
    ep = endpoint
    one, two = ep.starts[1].secret, ep.starts[2].secret
    assert one != two and len(one) == 32
    attempts = [
        [hello_frame(1, bytes(32))],  # wrong
        [hello_frame(1, two)],  # node 2's secret on node 1's stream
        [hello_frame(1, one[:-1])],  # truncated
        [Frame(2, arrays={"secret": np.frombuffer(one, np.uint8)})],  # not a hello
        [hello_frame(7, one)],  # a node without a session
        [b"not a frame"],
        [hello_frame(1, b"")],  # an empty secret
        [Frame(1, 0, (1, -1, 0), arrays={"secret": np.frombuffer(one, np.uint8)})],
        [],  # none at all
    ]
    for frames in attempts:
        with pytest.raises(grpc.RpcError) as err:
            ep.stream(frames)
        assert _code(err) == grpc.StatusCode.UNAUTHENTICATED
    assert ep.stream([hello_frame(1, one)]) == []  # admitted, then closed
    with pytest.raises(grpc.RpcError) as err:  # the same secret again
        ep.stream([hello_frame(1, one)])
    assert _code(err) == grpc.StatusCode.UNAUTHENTICATED
    assert ep.loop.refused == len(attempts) + 1 == ep.srv.rejected()
    reasons = [r["reason"] for r in _events(read_jsonl(ep.tracker.path), "rejected")]
    assert reasons[:2] == [
        "stream refused: wrong secret for node 1",
        "stream refused: wrong secret for node 1",
    ]
    assert reasons[-1] == "stream refused: secret for node 1 already used"
    assert ep.untouched()


def test_a_hello_may_keep_fewer_chunks_in_flight_never_more(endpoint):
    ep = endpoint
    cap = ep.starts[1].window
    assert cap >= 2
    with pytest.raises(grpc.RpcError) as err:
        ep.stream([hello_frame(1, ep.starts[1].secret, cap + 1)])
    assert _code(err) == grpc.StatusCode.UNAUTHENTICATED
    (refusal,) = _events(read_jsonl(ep.tracker.path), "rejected")
    assert refusal["reason"] == (
        f"stream refused: window {cap + 1} above the session's {cap}"
    )
    assert ep.loop.sessions[1].window == cap
    # node 2 keeps one chunk in flight: its session (what the replay is
    # told each chunk waited for) follows
    assert ep.stream([hello_frame(2, ep.starts[2].secret, 1)], node=2) == []
    assert ep.loop.sessions[2].window == 1
    assert ep.untouched()


def test_a_stream_that_never_says_who_it_is_is_cut_off(endpoint, monkeypatch):
    from tandem.strategies import simultrain_stream

    monkeypatch.setattr(simultrain_stream, "HELLO_SECONDS", 0.3)
    outbox = Outbox()  # never closed, nothing sent: it would hold a thread
    channel, responses = open_stream(endpoint.starts[1].address, iter(outbox), 1024)
    with pytest.raises(grpc.RpcError) as err:
        list(responses)
    channel.close()
    assert _code(err) == grpc.StatusCode.CANCELLED
    time.sleep(0.2)
    assert endpoint.loop.refused == 1 == endpoint.srv.rejected()
    assert endpoint.untouched()


def test_session_keys_by_hand():
    keys = SessionKeys()
    first = keys.issue(1)
    assert keys.admit(1, first) is None
    assert keys.admit(1, first) == "secret for node 1 already used"
    second = keys.issue(1)  # a new session: a new secret, the old one void
    assert keys.admit(1, first) == "wrong secret for node 1"
    assert keys.admit(1, second) is None
    assert keys.admit(2, second) == "no session for node 2"


@pytest.mark.parametrize("node", [0, 1, 2**63 - 1, 2**63, 18175264750980615280])
def test_a_hello_carries_any_unsigned_64_bit_node_id(node):
    # Flower's node ids fill all 64 bits; the frame's ints are signed int64
    raw = encode_frame(hello_frame(node, b"k" * 32, 3))
    assert read_hello(decode_frame(raw, 1 << 20)) == (node, b"k" * 32, 3)
    if node >= 2**63:  # the same 64 bits, read as a signed integer
        assert decode_frame(raw, 1 << 20).ints[0] == node - 2**64


@pytest.mark.parametrize("node", [-1, 2**64])
def test_a_hello_refuses_a_node_id_outside_64_bits(node):
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        hello_frame(node, b"k" * 32)


def _chunk_frame(ep, node=1, version=0, **change):
    """A well-formed first chunk of 2 micro-batches (float32), then ``change``."""
    rows = 2 * ep.srv.cfg.train.batch_size
    acts = np.zeros((rows, *ep.cloud.cut_shape), np.float32)
    reply = {
        "version": version,
        "base_v_c": 0,
        "compute_seconds": 0.01,
        "steps": 2,
        "acts": encode_cut(acts, ep.cloud.opts.precision, "a"),
        "labels": np.zeros(rows, np.int64),
        "sizes": np.array([rows // 2, rows // 2], np.int64),
        **change,
    }
    return reply_frame(EdgeReply(**reply), 1)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"version": 5}, "chunk version 5, expected 0"),
        ({"labels": np.full(64, 10, np.int64)}, "labels outside"),
        ({"sizes": np.array([64], np.int64)}, "micro-batch sizes"),
        ({"compute_seconds": float("nan")}, "compute-seconds"),
        ({"acts": {"a": np.zeros((64, 1), np.int8)}}, "activation keys"),
        ("nan", "activations"),
        ("scale", "a-scale"),
        ("big", "at most"),
        ("delta", "array keys differ"),
        ("delta-nan", "holds NaN or Inf"),
        ("delta-dtype", "has dtype float64"),
        ("delta-shape", "has shape"),
        ({"labels": np.zeros(64, np.int32)}, "dtypes y=int32"),
    ],
)
def test_a_bad_frame_is_refused_and_counted_without_touching_the_cloud(
    endpoint, change, reason
):
    ep = endpoint
    if change == "nan":
        good = _chunk_frame(ep)
        arrays = dict(good.arrays)
        arrays["a"] = np.array(arrays["a"])
        arrays["a-scale"] = np.array(arrays["a-scale"])
        arrays["a-scale"][3] = np.nan
        frame = Frame(good.kind, good.seq, good.ints, good.real, arrays)
        reason = "a-scale"
    elif change == "scale":
        good = _chunk_frame(ep)
        arrays = {**good.arrays, "a-scale": np.full(64, -1.0, np.float32)}
        frame = Frame(good.kind, good.seq, good.ints, good.real, arrays)
    elif change == "big":
        frame = _chunk_frame(ep)
        ep.loop.opts = ep.cloud.opts.__class__(stream_max_frame_mb=0.001)
    elif change == "delta":
        frame = _chunk_frame(ep, delta={"nope": np.zeros(2, np.float32)})
    elif isinstance(change, str) and change.startswith("delta-"):
        # the edge layers' keys, one array bad
        delta = {
            k: np.zeros(shape, dtype)
            for k, (shape, dtype) in ep.cloud.edge_layout.items()
        }
        key = sorted(delta)[-1]
        if change == "delta-nan":
            delta[key] = np.full(delta[key].shape, np.nan, np.float32)
        elif change == "delta-dtype":
            delta[key] = delta[key].astype(np.float64)
        else:
            delta[key] = np.zeros((*delta[key].shape, 2), np.float32)
        frame = _chunk_frame(ep, delta=delta)
    else:
        frame = _chunk_frame(ep, **change)
    with pytest.raises(grpc.RpcError) as err:
        ep.stream([hello_frame(1, ep.starts[1].secret), frame])
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in err.value.details()
    assert ep.untouched()
    (session, why) = ep.loop.failed[0]
    assert session.track.node_id == 1 and reason in why
    with ep.loop.lock:  # what the loop does next: the edge is dropped, counted
        ep.loop._drop(session, why)
    assert ep.srv.rejected() == 1 and 1 not in ep.cloud.tracks
    assert ep.untouched()


def test_a_good_frame_is_answered_with_its_gradients(endpoint):
    ep = endpoint
    (answer,) = ep.stream([hello_frame(1, ep.starts[1].secret), _chunk_frame(ep)])
    assert ep.cloud.cloud_steps == 2 and not ep.untouched()
    ups = [t for t in ep.srv.ledger.transfers if t.direction == "up"]
    assert [t.message_type for t in ups] == ["stream.hello", "stream.chunk"]
    (down,) = [t for t in ep.srv.ledger.transfers if t.message_type == "stream.grads"]
    assert down.nbytes == len(answer)


def test_a_tls_stream_with_generated_certificates(tmp_path):
    tls = make_tls_files(tmp_path / "certs")
    extra = {
        "simultrain-stream-tls-cert": str(tls.server_cert),
        "simultrain-stream-tls-key": str(tls.server_key),
        "simultrain-stream-tls-ca": str(tls.ca_cert),
    }
    ep = Endpoint(tmp_path, extra)
    try:
        start = ep.starts[1]
        assert start.root_cert == tls.ca_cert.read_bytes()
        (answer,) = ep.stream(
            [hello_frame(1, start.secret), _chunk_frame(ep)], root=start.root_cert
        )
        assert answer[:4] == b"TDMF"
        assert ep.cloud.cloud_steps == 2
        # plain text against the TLS port, or trusting another CA, fails
        other = make_tls_files(tmp_path / "other")
        for root in (None, other.ca_cert.read_bytes()):
            with pytest.raises(grpc.RpcError) as err:
                ep.stream([hello_frame(2, ep.starts[2].secret)], node=2, root=root)
            assert _code(err) == grpc.StatusCode.UNAVAILABLE
        assert (
            ep.stream([hello_frame(2, ep.starts[2].secret)], 2, start.root_cert) == []
        )
    finally:
        ep.close()


# ------------------------------------------------------------------ whole runs
def _capture(monkeypatch):
    clouds = []
    finish = SimulTrainCloud.finish

    def keep(self):
        clouds.append(self)
        finish(self)

    monkeypatch.setattr(SimulTrainCloud, "finish", keep)
    return clouds


def test_each_edge_keeps_the_window_its_compute_needs(tmp_path, monkeypatch):
    from tandem.clients.simultrain import StreamedEdge

    # the session's cap on the default 4g link: a chunk is 64 int8 rows of
    # 32 x 40 + 4 bytes (82,176 B, 13.15 ms at 50 Mbit/s) each way, and 30 ms
    # RTT: ceil((30 + 2 x 13.15) / 13.15) + 2 = 7. An edge at 50 ms per chunk
    # is the slowest stage and needs ceil((56.3 + 50) / 50) = 3 in flight
    monkeypatch.setattr(StreamedEdge, "_warm_up", lambda self, rows: (0.05, 82_176))
    in_flight = []  # chunks awaiting gradients as each new one is forwarded
    forward = StreamedEdge.forward

    def counting(self, want):
        in_flight.append(len(self.in_flight))
        return forward(self, want)

    monkeypatch.setattr(StreamedEdge, "forward", counting)
    records, _ = run_inprocess(BASE, nodes=2, out=tmp_path, threaded=True)
    # the edge itself keeps to its W (the cloud cannot tell: it reads a
    # stream's frames in order, so it has always answered chunk v - W first)
    assert max(in_flight) == 2 and len(in_flight) == 60
    assert records[-1]["dropped-edges"] == 0
    (stream,) = _events(records, "stream")
    assert stream["windows"] == [3]
    for node in (1, 2):
        mine = [e for e in _events(records, "exchange") if e["node-id"] == node]
        assert {e["window"] for e in mine} == {3}
        assert [e["grads-from"] for e in mine] == [-1] * 3 + list(range(27))
    # a set window is kept whatever the compute
    records, _ = run_inprocess(
        {**BASE, "simultrain-window": 5}, nodes=2, out=tmp_path / "set", threaded=True
    )
    assert _events(records, "stream")[0]["windows"] == [5]


def test_edges_stream_concurrently_and_learn(tmp_path, monkeypatch):
    clouds = _capture(monkeypatch)
    records, grid = run_inprocess(BASE, nodes=2, out=tmp_path, threaded=True)
    summary = records[-1]
    assert summary["rejected-replies"] == 0 and summary["dropped-edges"] == 0
    # R = 4 steps, chunks of 2: θ_e^c goes with every second chunk's
    # gradients (15 per edge, the last at the end); each edge reconciles and
    # reports a delta (on its next chunk, alone, or on the session's reply)
    assert clouds[0].merges == 2 * 15 and summary["dropped-deltas"] == 0
    rounds = _events(records, "round")
    # the two edges' chunks interleave differently from run to run, so the
    # result varies (a final eval-loss of 1.84 was seen, from 2.30); chance stays
    # at 2.30 and 0.1
    assert rounds[-1]["eval-loss"] < rounds[0]["eval-loss"] - 0.3
    assert summary["final-accuracy"] > 0.25
    assert grid.handled == {1: 1, 2: 1}  # one session message each
    exchanges = _events(records, "exchange")
    for node in (1, 2):
        mine = [e for e in exchanges if e["node-id"] == node]
        assert [e["seq"] for e in mine] == list(range(30))
        # W from the default 4g link and the edge's compute per chunk, as
        # measured here (it varies): at most the session's cap, 7 (below),
        # and chunk v is forwarded after the gradients of chunk v - W
        ((window,),) = {tuple({e["window"] for e in mine})}
        assert 2 <= window <= 7
        assert [e["grads-from"] for e in mine] == [-1] * window + list(
            range(30 - window)
        )
    # both edges were in flight at once: their exchanges interleave
    order = [e["node-id"] for e in exchanges]
    last_of_1 = len(order) - 1 - order[::-1].index(1)
    assert order.index(2) < last_of_1 and order.index(1) < len(order) - 30
    # the stream event adds up the real frames: 30 chunks per edge, each
    # answered by one gradients frame; up also the two hellos (and any frame
    # that carries a delta alone), each chunk frame as its exchange counted it
    (stream,) = _events(records, "stream")
    assert stream["address"].startswith("127.0.0.1:") and stream["tls"] is False
    assert stream["refused"] == 0 and stream["frames-down"] == 60
    assert 62 <= stream["frames-up"] <= 62 + 30
    hellos = 2 * len(encode_frame(hello_frame(1, bytes(32))))
    assert stream["bytes-up"] >= sum(e["bytes-up"] for e in exchanges) + hellos
    assert summary["bytes-up"] > stream["bytes-up"]  # and the session replies
    assert 0 < stream["seconds"] < summary["wall-seconds"]


def test_an_edge_that_connects_before_its_message_is_counted_sent_is_admitted(
    tmp_path, monkeypatch
):
    # the edge may present its secret before push_messages has returned to
    # the cloud (its thread descheduled there): hold the first push until a
    # hello arrives; the session must already be open for it (once, a CI run
    # dropped an edge with "no open session for node 1")
    hello = threading.Event()
    admit = SessionKeys.admit

    def admitting(self, node, secret):
        hello.set()
        return admit(self, node, secret)

    push = InProcessGrid.push_messages

    def late_return(self, messages):
        ids = push(self, messages)
        assert hello.wait(60)
        return ids

    monkeypatch.setattr(SessionKeys, "admit", admitting)
    monkeypatch.setattr(InProcessGrid, "push_messages", late_return)
    records, grid = run_inprocess(
        {**BASE, "simultrain-steps": 8}, nodes=2, out=tmp_path, threaded=True
    )
    summary = records[-1]
    assert summary["dropped-edges"] == 0 and summary["rejected-replies"] == 0
    assert grid.handled == {1: 1, 2: 1}


def test_the_stream_with_w_1_is_plain_sgd_on_the_whole_model(tmp_path, monkeypatch):
    # chunk 1, W 1, float32, the edge at the cloud's rate, no reconciliation
    # until the end: each micro-batch is forwarded, trained and back-propagated
    # before the next, at the same weights: momentum SGD on the whole model
    clouds = _capture(monkeypatch)
    config = {
        **BASE,
        "simultrain-chunk": 1,
        "simultrain-window": 1,
        "simultrain-steps": 12,
        "simultrain-precision": "float32",
        "simultrain-edge-lr-scale": 1.0,
        "simultrain-reconcile-every": 0,
        "simultrain-eval-every": 100,
    }
    records, grid = run_inprocess(config, nodes=1, out=tmp_path, threaded=True)
    (cloud,) = clouds
    cfg = RunConfig.from_flat({"output-dir": str(tmp_path), **config})
    opts = cfg.options_as(SimulTrainOptions)
    edge, top = edge_model(cfg, opts)
    model = torch.nn.Sequential(edge, top)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum
    )
    node = NodeConfig.from_node_config(grid.contexts[1].node_config)
    split = load_node_split(cfg, node, "train")
    batches = BatchStream(split, cfg.train.batch_size, node.stream_seed(cfg.seed))
    for _ in range(12):
        idx = batches.next_indices()
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(
            model(torch.from_numpy(split.x[idx])), torch.from_numpy(split.y[idx])
        )
        loss.backward()
        optimizer.step()
    for k, v in top.state_dict().items():
        torch.testing.assert_close(cloud.cloud.state_dict()[k], v, rtol=0, atol=1e-6)
    # the final delta (θ_e − θ_e at the start) merged into θ_e^c gives θ_e
    for k, v in edge.state_dict().items():
        torch.testing.assert_close(cloud.theta_ec[k], v, rtol=0, atol=1e-6)
    assert records[-1]["rejected-replies"] == 0
    # recorded for the replay as one chunk in flight: message v carries the
    # gradients of chunk v - 1 (strictly serial, as splitsync is timed)
    exchanges = _events(records, "exchange")
    assert [e["grads-from"] for e in exchanges] == [-1, *range(11)]


def test_w_1_does_the_same_on_both_transports(tmp_path, monkeypatch):
    # splitsync on the message transport: each message carries the gradients
    # of the chunk just received, so the edge waits for them as on the stream
    clouds = _capture(monkeypatch)
    config = {
        **BASE,
        "simultrain-window": 1,
        "simultrain-alpha": 0.0,
        "simultrain-steps": 20,
        "simultrain-precision": "float32",
        "simultrain-eval-every": 100,
    }
    run_inprocess(config, nodes=1, out=tmp_path / "s", threaded=True)
    records, _ = run_inprocess(
        {**config, "simultrain-transport": "message"}, nodes=1, out=tmp_path / "m"
    )
    stream, message = clouds
    assert stream.cloud_steps == message.cloud_steps == 20
    for k, v in message.cloud.state_dict().items():
        torch.testing.assert_close(stream.cloud.state_dict()[k], v, rtol=0, atol=1e-6)
    for k, v in message.theta_ec.items():
        torch.testing.assert_close(stream.theta_ec[k], v, rtol=0, atol=1e-6)
    # 10 chunks of 2, then a message that only delivers the last gradients
    exchanges = _events(records, "exchange")
    assert [e["grads-from"] for e in exchanges] == [-1, *range(10)]


def test_w_3_in_flight_with_weight_stashing_by_hand(tmp_path, monkeypatch):
    # W = 3, chunks of 1, float32, no reconciliation until the end. By hand:
    # the cloud trains the chunks in their order (momentum SGD at lr); the
    # edge forwards 3 chunks at θ_e, stashing θ_e with each; then, per chunk
    # back, it back-propagates the chunk's cut gradients at the stashed
    # weights w, adds the forecast α·(θ_e − w) and takes a momentum-SGD step
    # at lr × edge-lr-scale, and forwards the next chunk
    clouds = _capture(monkeypatch)
    steps, window, alpha = 10, 3, 0.5
    config = {
        **BASE,
        "simultrain-chunk": 1,
        "simultrain-window": window,
        "simultrain-steps": steps,
        "simultrain-precision": "float32",
        "simultrain-alpha": alpha,
        "simultrain-reconcile-every": 0,
        "simultrain-eval-every": 100,
    }
    records, grid = run_inprocess(config, nodes=1, out=tmp_path, threaded=True)
    (cloud,) = clouds
    exchanges = _events(records, "exchange")
    assert [e["seq"] for e in exchanges] == list(range(steps))

    cfg = RunConfig.from_flat({"output-dir": str(tmp_path), **config})
    opts = cfg.options_as(SimulTrainOptions)
    edge, top = edge_model(cfg, opts)
    stash_edge, _ = edge_model(cfg, opts)
    lr, beta = cfg.train.lr, cfg.train.momentum
    edge_opt = torch.optim.SGD(edge.parameters(), lr=lr * 0.5, momentum=beta)
    cloud_opt = torch.optim.SGD(top.parameters(), lr=lr, momentum=beta)
    node = NodeConfig.from_node_config(grid.contexts[1].node_config)
    split = load_node_split(cfg, node, "train")
    batches = BatchStream(split, cfg.train.batch_size, node.stream_seed(cfg.seed))
    in_flight = []  # (inputs, stashed weights, cut gradients), oldest first
    forwarded = 0
    while forwarded < steps or in_flight:
        while forwarded < steps and len(in_flight) < window:
            idx = batches.next_indices()
            x = torch.from_numpy(split.x[idx])
            w = {k: v.detach().clone() for k, v in edge.state_dict().items()}
            with torch.no_grad():
                a = edge(x)
            a.requires_grad_(True)
            cloud_opt.zero_grad()
            torch.nn.functional.cross_entropy(
                top(a), torch.from_numpy(split.y[idx])
            ).backward()
            cloud_opt.step()
            in_flight.append((x, w, a.grad.detach().clone()))
            forwarded += 1
        x, w, g = in_flight.pop(0)
        stash_edge.load_state_dict(w)
        stash_edge.zero_grad()
        stash_edge(x).backward(g)
        stashed_grads = dict(stash_edge.named_parameters())
        for k, p in edge.named_parameters():
            p.grad = stashed_grads[k].grad + alpha * (p.detach() - w[k])
        edge_opt.step()
    for k, v in top.state_dict().items():
        torch.testing.assert_close(cloud.cloud.state_dict()[k], v, rtol=0, atol=1e-6)
    for k, v in edge.state_dict().items():
        torch.testing.assert_close(cloud.theta_ec[k], v, rtol=0, atol=1e-6)


def test_w_2_does_what_the_message_transport_does(tmp_path, monkeypatch):
    # the message transport forwards chunk v + 2 right after applying chunk
    # v's gradients; the stream with W = 2 does the same: the same θ_c, θ_e^c
    clouds = _capture(monkeypatch)
    config = {
        **BASE,
        "simultrain-window": 2,
        "simultrain-steps": 20,
        "simultrain-precision": "float32",
        "simultrain-reconcile-every": 0,
        "simultrain-eval-every": 100,
    }
    run_inprocess(config, nodes=1, out=tmp_path / "s", threaded=True)
    run_inprocess(
        {**config, "simultrain-transport": "message"}, nodes=1, out=tmp_path / "m"
    )
    stream, message = clouds
    assert stream.cloud_steps == message.cloud_steps == 20
    for k, v in message.cloud.state_dict().items():
        torch.testing.assert_close(stream.cloud.state_dict()[k], v, rtol=0, atol=1e-6)
    for k, v in message.theta_ec.items():
        torch.testing.assert_close(stream.theta_ec[k], v, rtol=0, atol=1e-6)


def test_an_edge_whose_stream_breaks_is_dropped_and_the_others_finish(
    tmp_path, monkeypatch
):
    from tandem.clients import simultrain as edge_side

    receive = edge_side.StreamedEdge.receive

    def breaks(self, data):
        if self.node_id == 2 and self.state.steps > 20:
            raise ConnectionError("link lost")
        receive(self, data)

    monkeypatch.setattr(edge_side.StreamedEdge, "receive", breaks)
    records, _ = run_inprocess(BASE, nodes=2, out=tmp_path, threaded=True)
    summary = records[-1]
    assert summary["dropped-edges"] == 1 and summary["rejected-replies"] == 1
    (dropped,) = _events(records, "dropped")
    assert dropped["node-id"] == 2 and "link lost" in dropped["reason"]
    honest = [e for e in _events(records, "exchange") if e["node-id"] == 1]
    assert sum(e["micro-batches"] for e in honest) == 60
    assert summary["final-accuracy"] > 0.3


def test_a_silent_stream_is_dropped_after_the_timeout(tmp_path, monkeypatch):
    from tandem.clients import simultrain as edge_side

    receive = edge_side.StreamedEdge.receive
    silent = []

    def hangs(self, data):
        if self.node_id == 2 and self.state.steps > 20 and not silent:
            silent.append(self)
            time.sleep(6.0)  # longer than reply-timeout: the cloud gives up
        receive(self, data)

    monkeypatch.setattr(edge_side.StreamedEdge, "receive", hangs)
    config = {**BASE, "reply-timeout": 2.0}
    records, _ = run_inprocess(config, nodes=2, out=tmp_path, threaded=True)
    summary = records[-1]
    assert summary["dropped-edges"] == 1
    (dropped,) = _events(records, "dropped")
    assert "no frame within 2 s" in dropped["reason"]
    assert summary["final-accuracy"] > 0.3


def test_sessions_that_an_engine_runs_in_turns_all_stream(tmp_path, monkeypatch):
    # An engine with fewer ClientApps at once than edges (Flower's simulation
    # engine on few CPUs) starts node 2's session only once node 1's is over,
    # much later than reply-timeout: node 2 waits while node 1 streams.
    import threading

    from tandem.clients import simultrain as edge_side
    from tandem.protocol.simultrain import SESSION_TYPE

    handle, receive = edge_side.session_handler, edge_side.StreamedEdge.receive
    first_done = threading.Event()
    began = {}

    def slow(self, data):  # node 1 streams for about 30 x 0.25 s
        if self.node_id == 1:
            time.sleep(0.25)
        receive(self, data)

    def in_turns(msg, context, cfg):
        if context.node_id == 2:
            assert first_done.wait(120)
        began[context.node_id] = time.monotonic()
        try:
            return handle(msg, context, cfg)
        finally:
            if context.node_id == 1:
                first_done.set()

    monkeypatch.setattr(edge_side.StreamedEdge, "receive", slow)
    monkeypatch.setitem(edge_side.HANDLERS, SESSION_TYPE, in_turns)
    config = {**BASE, "reply-timeout": 3.0}
    records, _ = run_inprocess(config, nodes=2, out=tmp_path, threaded=True)
    summary = records[-1]
    assert summary["dropped-edges"] == 0 and summary["rejected-replies"] == 0
    for node in (1, 2):
        done = [e for e in _events(records, "exchange") if e["node-id"] == node]
        assert sum(e["micro-batches"] for e in done) == 60
    order = [e["node-id"] for e in _events(records, "exchange")]
    assert order == sorted(order)  # in turns: node 1's exchanges, then node 2's
    assert began[2] - began[1] > 3.0  # node 2 began after reply-timeout


def test_a_late_node_streams_from_the_cloud_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(simultrain, "JOIN_SCAN", 0.0)
    records, grid = run_inprocess(
        BASE, nodes=2, out=tmp_path, late={3: 5}, threaded=True
    )
    summary = records[-1]
    assert summary["joined-edges"] == 1 and summary["rejected-replies"] == 0
    late = [e for e in _events(records, "exchange") if e["node-id"] == 3]
    assert sum(e["micro-batches"] for e in late) == 60
    assert grid.handled[3] == 1


def test_a_stream_run_checkpoints_and_resumes(tmp_path):
    config = {
        **BASE,
        "mnist1d-samples": 1000,
        "simultrain-steps": 30,
        "simultrain-eval-every": 10,
        "checkpoint-every": 2,  # periods 1, 2, 3: only period 2 is saved
    }
    run_inprocess(config, nodes=2, out=tmp_path / "a", threaded=True)
    ckpt = next((tmp_path / "a").glob("*/checkpoint.npz"))
    _, state = load_checkpoint(ckpt)
    assert state["period"] == 2 and 10 <= state["steps-done"] < 30
    resumed, _ = run_inprocess(
        {**config, "resume": str(ckpt)}, nodes=2, out=tmp_path / "b", threaded=True
    )
    assert _events(resumed, "round")[0]["round"] == 2
    summary = resumed[-1]
    assert summary["rejected-replies"] == 0 and summary["dropped-edges"] == 0
    exchanges = _events(resumed, "exchange")
    for node in (1, 2):
        steps = sum(e["micro-batches"] for e in exchanges if e["node-id"] == node)
        assert steps == 30 - state["steps-done"]
    assert summary["final-accuracy"] > 0.1


def test_an_edge_gives_up_on_a_mute_cloud_after_the_timeout(tmp_path):
    from tandem.clients.simultrain import EdgeState, StreamedEdge

    frames = []

    def mute(requests, context):  # reads every frame, answers none
        for raw in requests:
            frames.append(raw)
            if len(frames) == 3:  # hello and two chunks: the edge now waits
                time.sleep(5)
        return iter(())

    server = StreamServer(mute, "127.0.0.1:0", 1 << 24)
    server.start()
    try:
        config = {**BASE, "output-dir": str(tmp_path), "reply-timeout": 0.5}
        cfg = RunConfig.from_flat(config)
        opts = cfg.options_as(SimulTrainOptions)
        edge, _ = edge_model(cfg, opts)
        params = {k: v.detach().clone() for k, v in edge.state_dict().items()}
        node = NodeConfig.from_node_config({"partition-id": 0, "num-partitions": 1})
        split = load_node_split(cfg, node, "train")
        start = SessionStart(
            address=f"127.0.0.1:{server.port}",
            secret=bytes(32),
            window=2,
            steps=8,
            chunk=2,
            next_version=0,
            v_c=0,
            edge_params={k: v.numpy() for k, v in params.items()},
            max_frame=1 << 24,
        )
        session = StreamedEdge(
            EdgeState.load(RecordDict(), params),
            edge,
            split,
            BatchStream(split, cfg.train.batch_size, 0),
            opts,
            cfg,
            start,
        )
        session.begin()
        tick = time.monotonic()
        with pytest.raises(TimeoutError, match=r"within 0\.5 s"):
            session.run(1)
        assert time.monotonic() - tick < 4  # it did not wait for the cloud
        assert len(frames) == 3 and list(session.in_flight) == [0, 1]
    finally:
        server.stop(0)


def test_half_a_tls_setting_or_a_missing_file_stops_the_run(tmp_path):
    from tandem.options import ConfigError
    from tandem.strategies.simultrain_stream import server_tls

    tls = make_tls_files(tmp_path)
    assert server_tls("", "", "") == (None, b"")
    with pytest.raises(ConfigError, match="needs simultrain-stream-tls-key"):
        server_tls(str(tls.server_cert), "", "")
    with pytest.raises(ConfigError, match="simultrain-stream-tls-ca"):
        server_tls(str(tls.server_cert), str(tls.server_key), str(tmp_path / "no"))
    served, root = server_tls(str(tls.server_cert), str(tls.server_key), "")
    assert root == tls.server_cert.read_bytes()  # pinned: the certificate itself
    assert served.private_key == tls.server_key.read_bytes()
    with pytest.raises(ConfigError, match="simultrain-stream-tls-cert"):
        run_inprocess(
            {**BASE, "simultrain-stream-tls-cert": str(tls.server_cert)},
            nodes=1,
            out=tmp_path / "run",
        )


# ------------------------------------------------------------------ real time
def test_paced_frames_leave_in_order_and_not_before_their_arrival():
    now = time.monotonic()
    outbox = Outbox(pace=lambda n, sent: now + 0.2 if n == 3 else now)  # 3 bytes
    for frame in (b"abc", b"de", b"f"):
        outbox.put(frame)
    outbox.close()
    tick = time.monotonic()
    seen = []
    for frame in outbox:
        seen.append((frame, time.monotonic() - tick))
    assert [f for f, _ in seen] == [b"abc", b"de", b"f"]  # FIFO, as on a link
    assert seen[0][1] >= 0.19  # held until its arrival time


def test_a_paced_inbox_hands_frames_out_at_their_arrival():
    from tandem.streaming import Inbox

    now = time.monotonic()
    arrivals = iter([now + 0.15, now + 0.05])
    inbox = Inbox(iter([b"abc", b"de"]), pace=lambda n, sent: next(arrivals))
    assert inbox.arrival == 0.0
    assert inbox.get(5.0) == b"abc"
    assert time.monotonic() >= now + 0.15 and inbox.arrival == now + 0.15
    assert inbox.get(5.0) == b"de" and inbox.arrival == now + 0.05
    assert inbox.get(5.0) is None  # the stream ended


def test_link_paces_match_the_link_pacer():
    from tandem.clients.simultrain import link_paces
    from tandem.network import encode_link, parse_link

    assert link_paces("") == (None, None)
    with pytest.raises(PayloadError, match="session link"):
        link_paces("9g")
    # 1 MB takes 1 s on the wire at 8 Mbit/s and arrives 2 s later (4 s RTT):
    # a second frame put at once arrives one transfer after the first
    up, down = link_paces(encode_link(parse_link("8mbit/8mbit/4000ms")))
    first, second = up(1_000_000), up(1_000_000)
    assert second - first == pytest.approx(1.0, abs=1e-6)
    assert first - time.monotonic() == pytest.approx(3.0, abs=0.1)
    assert down(0) - time.monotonic() == pytest.approx(2.0, abs=0.1)  # its own wire
    # a frame sent at a given instant is timed from it, not from when it is
    # put: a third, sent 1 s back, still queues behind the second's transfer;
    # on a fresh link, one sent 0.2 s before it is put arrives 3 s after it
    # was sent (1 s on the wire, 2 s propagating), 0.2 s sooner than if sent
    # when put
    third = up(1_000_000, time.monotonic() - 1.0)
    assert third - second == pytest.approx(1.0, abs=1e-6)
    fresh_up, _ = link_paces(encode_link(parse_link("8mbit/8mbit/4000ms")))
    sent = time.monotonic() + 0.1
    time.sleep(0.3)
    assert fresh_up(1_000_000, sent) - sent == pytest.approx(3.0, abs=0.02)
    # on a clock dilated 3 times every duration is 3 times as long: 3 s on
    # the wire, 6 s propagating; a frame sent 1.5 s later (0.5 s emulated)
    # still queues behind the first's transfer
    slow_up, _ = link_paces(encode_link(parse_link("8mbit/8mbit/4000ms")), 3.0)
    sent = time.monotonic()
    first, second = slow_up(1_000_000, sent), slow_up(1_000_000, sent + 1.5)
    assert first - sent == pytest.approx(9.0, abs=0.02)
    assert second - first == pytest.approx(3.0, abs=1e-6)


def test_the_session_message_carries_the_link_and_refuses_a_bad_one():
    start = SessionStart("h:1", bytes(32), 2, 8, 2, 0, 0, {}, link="table:0,8,8,40")
    back = SessionStart.from_content(start.to_content(), {})
    assert back.link == "table:0,8,8,40" and back.window == 2
    content = start.to_content()
    content["session"]["link"] = 7
    with pytest.raises(PayloadError, match="session link is int"):
        SessionStart.from_content(content, {})


@pytest.mark.parametrize("dilation", [1.0, 3.0])
def test_real_time_streams_wait_for_the_link(tmp_path, dilation):
    # W = 1 over a 200 ms RTT: each of the 4 chunks of an edge waits for its
    # gradients (100 ms down) and goes up (100 ms), so the last chunk arrives
    # at least 3 x 200 ms after the first; unpaced it takes milliseconds. On
    # a clock dilated k times, at least k times that (the bench divides by k)
    run = {
        **BASE,
        "simultrain-steps": 8,
        "simultrain-eval-every": 8,
        "simultrain-window": 1,
        "simultrain-link": "100mbit/100mbit/200ms",
        "simultrain-realtime": True,
        "simultrain-realtime-dilation": dilation,
    }
    records, _ = run_inprocess(run, nodes=2, out=tmp_path, threaded=True)
    (stream,) = _events(records, "stream")
    assert stream["realtime"] is True and stream["windows"] == [1]
    assert stream["dilation"] == dilation
    assert stream["session-seconds"] >= 0.6 * dilation
    summary = records[-1]
    assert summary["dropped-edges"] == 0 and summary["rejected-replies"] == 0
    # the replay of the same run (4 serial loops of 200 ms and more): the
    # dilation does not change it
    assert summary["emulated-seconds"] >= 0.8


def test_real_time_needs_the_stream(tmp_path):
    with pytest.raises(ConfigError, match="needs simultrain-transport"):
        run_inprocess(
            {**BASE, "simultrain-transport": "message", "simultrain-realtime": True},
            nodes=2,
            out=tmp_path,
        )


# ------------------------------------------------------------ what is charged
def _burning(fn, seconds):
    """``fn`` after ``seconds`` of this thread's CPU time."""

    def slow(*args, **kwargs):
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass
        return fn(*args, **kwargs)

    return slow


def test_the_clouds_compute_covers_decoding_and_encoding_the_frames(
    endpoint, monkeypatch
):
    import tandem.strategies.simultrain_stream as loop

    ep = endpoint
    monkeypatch.setattr(loop, "decode_frame", _burning(loop.decode_frame, 0.03))
    monkeypatch.setattr(loop, "encode_frame", _burning(loop.encode_frame, 0.03))
    ep.stream([hello_frame(1, ep.starts[1].secret), _chunk_frame(ep)])
    (exchange,) = ep.cloud.exchanges
    # two micro-batches of f_c take milliseconds; the frames' 60 ms are in
    assert 0.06 <= exchange.cloud_seconds < 1.0


def test_the_edges_compute_covers_its_codecs_and_frames(tmp_path, monkeypatch):
    import tandem.clients.simultrain as edge

    clouds = _capture(monkeypatch)
    monkeypatch.setattr(edge, "encode_cut", _burning(edge.encode_cut, 0.02))
    monkeypatch.setattr(edge, "decode_frame", _burning(edge.decode_frame, 0.03))
    run = {**BASE, "simultrain-steps": 8, "simultrain-window": 2}
    run_inprocess(run, nodes=1, out=tmp_path, threaded=True)
    (cloud,) = clouds
    seconds = [ex.edge_seconds for ex in cloud.exchanges]
    assert len(seconds) == 4  # chunks of 2
    # the first two frames carry a forward pass each (its int8 encoding
    # included); each later one also the gradients frame received before it
    assert all(0.02 <= s < 0.5 for s in seconds[:2])
    assert all(0.05 <= s < 0.5 for s in seconds[2:])


def test_real_time_stretches_steady_work_to_the_edge_device(monkeypatch):
    import tandem.clients.simultrain as edge

    deadlines = []
    monkeypatch.setattr(edge, "wait_until", deadlines.append)
    session = edge.StreamedEdge.__new__(edge.StreamedEdge)
    session.steady, session.free_at = {}, None
    session.opts = SimulTrainOptions(edge_factor=10.0, realtime=True)
    # back-to-back forward passes: each starts when the edge is free (the
    # first when it began); a cold first pass, then steady ones
    session._slow_down("fwd", 100.0, 0.5)
    for seconds in (0.01, 0.01, 0.01, 0.01):
        session._slow_down("fwd", 0.0, seconds)
    # 10 x the lower quartile so far (the median of fewer than four)
    assert deadlines == pytest.approx([105.0, 107.55, 107.65, 107.75, 107.85])
    # gradients that arrive after the edge is free start it then ...
    session._slow_down("rcv", 110.0, 0.002)  # its own kind
    assert deadlines[-1] == pytest.approx(110.02)
    # ... and gradients already there, once it is free
    session._slow_down("rcv", 50.0, 0.002)
    assert deadlines[-1] == pytest.approx(110.04)
    # not in real time, or an edge as fast as this machine: no wait
    session.opts = SimulTrainOptions(edge_factor=10.0, realtime=False)
    session._slow_down("fwd", 0.0, 1.0)
    session.opts = SimulTrainOptions(edge_factor=1.0, realtime=True)
    session._slow_down("fwd", 0.0, 1.0)
    assert len(deadlines) == 7
