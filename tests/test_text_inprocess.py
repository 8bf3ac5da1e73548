"""Every method on the stdlib corpus with a tiny transformer, in one process.

The in-process Grid (tests/inprocess.py) runs each method's cloud side
against the real edge handlers. A byte model starts at perplexity ≈ 256
(uniform over the vocabulary); a few dozen SGD steps on Python source must
bring it far below that (the byte frequencies alone give about 25).
"""

from __future__ import annotations

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity
from inprocess import run_inprocess

from tandem.models import MODELS, ModelEntry
from tandem.transformer import transformer

BASE = {
    "dataset": "pysource",
    "model": "tiny-transformer",
    "text-max-bytes": 200_000,
    "text-context": 32,
    "text-test-windows": 128,
    "partitioner": "natural",
    "batch-size": 16,
    "lr": 0.1,
    "num-server-rounds": 3,
    "local-steps": 20,
}


def _tiny(input_shape: tuple[int, ...], vocab: int) -> torch.nn.Sequential:
    return transformer(vocab, input_shape[0], width=32, layers=2, heads=2)


@pytest.fixture(autouse=True)
def tiny_model(monkeypatch):
    monkeypatch.setitem(MODELS, "tiny-transformer", ModelEntry(_tiny, "block1"))
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _perplexities(records):
    return [r["eval-perplexity"] for r in records if r["event"] == "round"]


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("fedavg", {}),
        ("acesync", {"acesync-clusters": 1}),
        ("centralized", {"num-server-rounds": 2, "local-steps": 10}),
        ("topk", {"num-server-rounds": 2}),
    ],
)
def test_round_methods_learn_the_corpus(tmp_path, method, extra):
    records, _ = run_inprocess(
        {**BASE, "method": method, **extra}, nodes=2, out=tmp_path
    )
    summary = records[-1]
    assert summary["event"] == "summary"
    ppl = _perplexities(records)
    assert 200 < ppl[0] < 320  # ≈ 256 at initialization
    assert summary["final-perplexity"] == ppl[-1] < 60
    assert summary["final-accuracy"] > 0.15  # the most frequent byte: ~ 0.12
    assert summary["rejected-replies"] == 0
    data = next(r for r in records if r["event"] == "config")
    assert data["config"]["dataset"] == "pysource"


@pytest.mark.parametrize("transport", ["message", "stream"])
def test_simultrain_learns_the_corpus_through_int8_sequence_activations(
    tmp_path, transport
):
    run = {
        **BASE,
        "method": "simultrain",
        "simultrain-steps": 40,
        "simultrain-eval-every": 20,
        "simultrain-chunk": 2,
        "simultrain-precision": "int8",
        "simultrain-transport": transport,
    }
    records, _ = run_inprocess(
        run, nodes=2, out=tmp_path, threaded=transport == "stream"
    )
    summary = records[-1]
    ppl = _perplexities(records)
    assert 200 < ppl[0] < 320
    assert summary["final-perplexity"] == ppl[-1] < 60
    assert summary["rejected-replies"] == 0 and summary["dropped-edges"] == 0
    # cut-layer activations: 16 windows x 32 positions x 32 wide, int8 + a scale
    exchange = next(
        r for r in records if r["event"] == "exchange" and r["micro-batches"] == 2
    )
    assert exchange["bytes-up"] > 2 * 16 * (32 * 32 + 4)
