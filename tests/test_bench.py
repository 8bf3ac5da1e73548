"""`tandem bench fedavg --quick` end to end: real Flower runs, valid JSON, PNG plots."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Every test that starts Flower's simulation engine (and with it a Ray
# cluster) runs in one worker, one at a time (pytest -n 2 --dist loadgroup)
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("simulation-engine")]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_bench_fedavg_quick(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tandem.bench",
            "fedavg",
            "--quick",
            "--no-progress",
            "--profile",
            "4g",
            "5g",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard: 2 runs took 263 s beside the deployment tests
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| fedavg-k10 |" in proc.stdout and "| fedavg-k50 |" in proc.stdout

    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"fedavg-k10", "fedavg-k50"}
    for label, m in results["methods"].items():
        assert 0.0 <= m["final_accuracy"] <= 1.0, label
        assert m["final_accuracy_per_seed"] == [m["final_accuracy"]]
        assert m["bytes_up"] > 0 and m["bytes_down"] > 0
        assert set(m["emulated_seconds"]) == {"4g", "5g"}
        # the same bytes take longer on the slower link
        assert m["emulated_seconds"]["4g"] > m["emulated_seconds"]["5g"] > 0
        assert m["wall_seconds"] > 0
        assert m["clock_mode"] == "retimed"
    k10, k50 = results["methods"]["fedavg-k10"], results["methods"]["fedavg-k50"]
    # same rounds, same model: same bytes; five times the steps: a fifth per step
    assert k10["bytes_up"] == k50["bytes_up"]
    assert k10["bytes_up_per_step"] == pytest.approx(5 * k50["bytes_up_per_step"])
    assumptions = results["assumptions"]
    assert assumptions["seeds"] == [0] and assumptions["nodes"] == 3
    assert assumptions["dataset"] == {"name": "mnist1d", "train": 800, "test": 200}
    assert assumptions["profiles"]["4g"]["up_mbps"] == 50
    assert assumptions["devices"]["edge"]["time_factor"] > 0
    # the calibration settled (two blocks at least) and was probed again after
    # the runs; every run is re-timed at the factor those probes give too
    check = assumptions["devices"]["calibration_check"]
    assert check["blocks"] >= 2 and check["edge_gflops_before"] > 0
    assert check["drift"] == pytest.approx(
        check["edge_gflops_after"] / check["edge_gflops_before"] - 1
    )
    assert (
        len(assumptions["devices"]["calibration_probes"]["edge"]) == 9 * check["blocks"]
    )
    after = f"{round(check['drift'] + 1, 3):g}"
    for m in results["methods"].values():
        assert after in m["emulated_seconds_per_step_by_edge_factor"]["4g"]
    for name in ("accuracy_vs_time.png", "accuracy_vs_bytes.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC


def test_bench_rejects_an_unknown_profile(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tandem.bench",
            "fedavg",
            "--profile",
            "3g",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    assert "unknown link profile '3g'" in proc.stderr


def test_bench_simultrain_quick(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tandem.bench",
            "simultrain",
            "--quick",
            "--no-progress",
            "--nodes",
            "2",
            "--profile",
            "4g",
            "5g",
            "--realtime",
            "--dilation",
            "2",
            # each run costs this test half a minute; the other variants take
            # these paths (a pinned variant's profiles: test_bench_profiles)
            "--variants",
            "syncsgd",
            "simultrain",
            "splitsync",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        # a hang guard, not a timing check: on 2 cores beside the deployment
        # tests, 6 runs took 566 s here and over 600 s in CI, 4 runs 463 s
        timeout=1200,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    # SimulTrain's W follows the link: it runs under each profile; the others
    # (splitsync: W = 1 on any link) are re-timed under both
    labels = {
        "syncsgd": {"4g", "5g"},
        "simultrain@4g": {"4g"},
        "simultrain@5g": {"5g"},
        "splitsync": {"4g", "5g"},
    }
    assert set(results["methods"]) == set(labels)
    for label in labels:
        assert f"| {label} |" in proc.stdout
    for label, m in results["methods"].items():
        assert m["steps_per_edge"] == 50, label
        assert set(m["emulated_seconds_per_step"]) == labels[label]
        assert all(t > 0 for t in m["emulated_seconds_per_step"].values()), label
        assert m["bytes_up_per_step"] > 0, label
        assert set(m["bandwidth_time_product_per_step"]) == labels[label]
        assert all(0 < e <= 1 for e in m["pipeline_efficiency"].values()), label
        assert set(m["emulated_seconds_to_target"]) == labels[label]
    # --realtime: every stream run paced to its profile's link, on a clock
    # twice as slow; its wall time per step / 2 is reported beside the replay's
    for label in ("simultrain@4g", "simultrain@5g"):
        m = results["methods"][label]
        (profile,) = labels[label]
        assert set(m["realtime_seconds_per_step"]) == {profile}
        assert m["realtime_seconds_per_step"][profile] > 0
        assert m["realtime_dilation"] == {profile: 2.0}  # the wall time / 2
        # the replay with the cloud at this machine's speed, which real time
        # runs at: no faster than the replay with the emulated T4
        host = m["replay_host_cloud_seconds_per_step"][profile]
        assert host >= m["emulated_seconds_per_step"][profile] > 0
    for label in ("syncsgd", "splitsync"):  # not streamed / not per profile
        assert "realtime_seconds_per_step" not in results["methods"][label]
    split = results["methods"]["simultrain@4g"]
    assert split["schedule"] == "pipeline"
    # the emulated timeline ends with the last exchange, after every report
    curve = split["curves"][0]
    assert len(curve["emulated_seconds"]["4g"]) == len(curve["accuracy"])
    # SyncSGD moves the whole model both ways every step
    sync = results["methods"]["syncsgd"]
    assert sync["bytes_down_per_step"] > 38_440  # 9,610 float32 parameters
    assert 0 < results["target_accuracy"] <= 1
