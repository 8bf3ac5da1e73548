"""The FLOP-count device model: counts checked by hand, the re-timing formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tandem.bench.flops import (
    RowFlops,
    count_row_flops,
    device_seconds,
    exchanges_on_device,
    rounds_on_device,
    row_flops_for,
)
from tandem.schedules import Exchange, NodeRound, SyncRound


def test_a_split_mlp_is_counted_by_hand():
    first, second = nn.Linear(4, 3), nn.Linear(3, 2)
    model = nn.Sequential(first, nn.ReLU(), second)
    parts = (nn.Sequential(first, nn.ReLU()), nn.Sequential(second))
    flops = count_row_flops(model, torch.randn(5, 4), parts)
    # forward: 2 x 4 x 3 + 2 x 3 x 2 = 36 per row; backward: the first
    # layer's weights only (the input needs no gradient), 24, the second
    # layer's weights and input, 12 + 12; the cloud part's input does need
    # its gradient (it goes down to the edge)
    assert flops == RowFlops(36, 48, 24, 24, 12, 24)
    assert count_row_flops(model, torch.randn(5, 4)) == RowFlops(36, 48)


def test_the_mnist1d_cnn_of_a_simultrain_run_is_counted_by_hand():
    flops, batch = row_flops_for(
        {"method": "simultrain", "dataset": "mnist1d", "mnist1d-samples": 200}
    )
    assert batch == 32
    # conv1 (1 -> 32, k 5, length 40): 2 x 5 x 32 x 40 = 12,800; conv2 (32 ->
    # 32, k 3, length 20): 122,880; conv3 (length 10): 61,440; fc 320 -> 10:
    # 6,400. The cut is after conv1 (act1)
    assert flops.full_forward == 12_800 + 122_880 + 61_440 + 6_400
    assert flops.edge_forward == flops.edge_backward == 12_800
    assert flops.cloud_forward == 122_880 + 61_440 + 6_400
    assert flops.cloud_backward == 2 * flops.cloud_forward
    assert flops.full_backward == 12_800 + 2 * flops.cloud_forward


def test_device_seconds_keep_the_overhead_and_rescale_the_flops():
    # 10 ms measured, of which 1 GFLOP at 100 GFLOP/s: no overhead
    assert device_seconds(0.01, 1e9, 100.0, 10.0) == pytest.approx(0.1)
    # 50 ms measured: 40 ms of overhead kept, the GFLOP at 10 GFLOP/s
    assert device_seconds(0.05, 1e9, 100.0, 10.0) == pytest.approx(0.14)
    # faster than the FLOPs allow (a low host calibration): no overhead
    assert device_seconds(0.001, 1e9, 100.0, 10.0) == pytest.approx(0.1)


def test_exchanges_and_rounds_are_put_on_the_devices():
    flops = RowFlops(36, 48, 24, 24, 12, 24)
    exchanges = [
        Exchange(1, 0, 100, 0.002, 200, 0.001, grads_from=-1, micro_batches=2),
        Exchange(1, 1, 100, 0.003, 200, 0.001, grads_from=0, micro_batches=1),
    ]
    # host: 1 GFLOP/s (edge), 2 (cloud); devices: 0.001 and 1 GFLOP/s
    out = exchanges_on_device(exchanges, flops, 10, (1.0, 2.0), (1e-3, 1.0))
    # exchange 0: 20 rows forward on the edge, 480 FLOPs; exchange 1: 10 rows
    # forward (240) and exchange 0's 20 rows backward (480)
    assert out[0].edge_seconds == pytest.approx(0.002 - 480e-9 + 480e-6)
    assert out[1].edge_seconds == pytest.approx(0.003 - 720e-9 + 720e-6)
    # the cloud: each chunk's rows forward and backward, 36 FLOPs per row
    assert out[0].cloud_seconds == pytest.approx(0.001 - 720 / 2e9 + 720e-9)
    assert out[1].cloud_seconds == pytest.approx(0.001 - 360 / 2e9 + 360e-9)
    assert out[1].grads_from == 0 and out[1].bytes_up == 200
    rounds = [SyncRound(1, {7: NodeRound(10, 0.01, 20)}, 0.004)]
    (rnd,) = rounds_on_device(rounds, flops, 10, 5, (1.0, 2.0), (1e-3, 1.0))
    # 5 steps of 10 rows, 84 FLOPs each: 4,200 FLOPs; the cloud x 2 / 1
    assert rnd.nodes[7].edge_seconds == pytest.approx(0.01 - 4.2e-6 + 4.2e-3)
    assert rnd.cloud_seconds == pytest.approx(0.008)
    (rnd,) = rounds_on_device(rounds, flops, 10, {(1, 7): 0}, (1.0, 2.0), (1.0, 1.0))
    assert rnd.nodes[7].edge_seconds == pytest.approx(0.01)  # nothing trained
