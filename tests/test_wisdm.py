"""WISDM v1.1 raw parsing, windowing and splitting on a small synthetic file."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.datasets.base import DataError
from tandem.datasets.wisdm import (
    ACTIVITIES,
    STANDARD_GRAVITY,
    load_wisdm,
    make_windows,
    parse_wisdm_raw,
)

WINDOW = 20

# (user, activity, records) runs, in file order. Run lengths are chosen so every
# run leaves a remainder, and user 7 walks twice (runs 0 and 4) with a run in
# between, so a window that ignored run boundaries would be detectable.
RUNS = [
    (7, "Walking", 45),  # 2 windows
    (7, "Jogging", 41),  # 2 windows
    (33, "Walking", 65),  # 3 windows
    (33, "Sitting", 19),  # 0 windows (too short)
    (7, "Walking", 25),  # 1 window
    (12, "Jogging", 63),  # 3 windows
    (12, "Standing", 40),  # 2 windows
    (12, "Upstairs", 21),  # 1 window
    (33, "Downstairs", 20),  # 1 window
]
EXPECTED_WINDOWS = [(7, 0)] * 2 + [(7, 1)] * 2 + [(33, 0)] * 3 + [(7, 0)]
EXPECTED_WINDOWS += [(12, 1)] * 3 + [(12, 5)] * 2 + [(12, 2)] + [(33, 3)]
NUM_VALID = sum(n for _, _, n in RUNS)
NUM_SKIPPED = 3  # missing z, non-numeric value, unknown activity


def _value(run: int, i: int, axis: int) -> float:
    """A distinct, exactly representable acceleration for record i of a run."""
    return run * 100 + i + axis / 4


def _records() -> list[str]:
    """The valid records, one string each (without the ';')."""
    out = []
    ts = 49105962326000
    for r, (user, activity, n) in enumerate(RUNS):
        for i in range(n):
            ts += 50_000_000
            stamp = 0 if (r, i) == (2, 3) else ts  # a timestamp of 0 is valid
            x, y, z = (_value(r, i, a) for a in range(3))
            out.append(f"{user},{activity},{stamp},{x},{y},{z}")
    return out


def _raw_text() -> str:
    """The valid records in the raw file's format, with its quirks mixed in."""
    recs = _records()
    lines = [f"{rec};" for rec in recs]
    lines[1] = f"{recs[1]};,"  # ';,' ending
    lines[2] = f"{recs[2]};  "  # trailing whitespace
    lines[3] = f"{recs[3]};{recs[4]};"  # two records on one line
    del lines[4]
    lines.insert(10, "")  # blank line
    # Malformed records inside a run (they are dropped, so the run stays whole).
    lines.insert(20, "7,Walking,1867172313000,4.4,4.4,;")  # empty z
    lines.insert(30, "7,Walking,1867172313000,4.4,abc,0.5;")  # non-numeric
    lines.insert(100, "12,Running,1867172313000,4.4,4.4,0.5;")  # unknown activity
    lines.append("")
    return "\n".join(lines) + "\n"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def raw_file(tmp_path):
    path = tmp_path / "WISDM_ar_v1.1_raw.txt"
    path.write_text(_raw_text())
    return path


def test_parse_counts_and_values():
    records, skipped = parse_wisdm_raw(_raw_text())
    assert len(records) == NUM_VALID
    assert skipped == NUM_SKIPPED
    assert records.user.dtype == np.int64
    assert records.activity.dtype == np.int64
    assert records.timestamp.dtype == np.int64
    assert records.xyz.dtype == np.float32
    assert records.xyz.shape == (NUM_VALID, 3)
    users = [u for u, _, n in RUNS for _ in range(n)]
    acts = [ACTIVITIES.index(a) for _, a, n in RUNS for _ in range(n)]
    np.testing.assert_array_equal(records.user, users)
    np.testing.assert_array_equal(records.activity, acts)
    assert records.timestamp[0] == 49105962326000 + 50_000_000
    assert (records.timestamp == 0).sum() == 1
    np.testing.assert_array_equal(records.xyz[1], [1.0, 1.25, 1.5])


def test_parse_quirks_one_by_one():
    rec = "33,Jogging,49105962326000,-0.6946377,12.680544,0.50395286"
    records, skipped = parse_wisdm_raw(f"{rec};\n\n{rec};,\n{rec};{rec};\n")
    assert (len(records), skipped) == (4, 0)
    np.testing.assert_allclose(records.xyz[0], [-0.6946377, 12.680544, 0.50395286])
    bad = [
        "11,Walking,1867172313000,4.4,4.4,;",  # empty z
        "11,Walking,1867172313000,4.4,4.4;",  # missing field
        "11,Walking,1867172313000,4.4,4.4,1,2;",  # extra field
        "x1,Walking,1867172313000,4.4,4.4,1;",  # non-numeric user
        "11,Walking,1867172313000,nan,4.4,1;",  # non-finite
        "11,Running,1867172313000,4.4,4.4,1;",  # unknown activity
    ]
    records, skipped = parse_wisdm_raw("\n".join(bad))
    assert (len(records), skipped) == (0, len(bad))
    assert records.xyz.shape == (0, 3)


def test_windows_respect_runs():
    records, _ = parse_wisdm_raw(_raw_text())
    split = make_windows(records, WINDOW)
    assert split.x.shape == (len(EXPECTED_WINDOWS), 3, WINDOW)
    assert split.x.dtype == np.float32
    assert split.y.dtype == np.int64
    assert split.groups.dtype == np.int64
    assert list(zip(split.groups.tolist(), split.y.tolist(), strict=True)) == (
        EXPECTED_WINDOWS
    )
    # Every window holds consecutive records of one run: value = run*100 + i.
    raw = split.x * np.float32(STANDARD_GRAVITY)
    first = np.round(raw[:, 0, :])
    run_of = first // 100
    assert (run_of == run_of[:, :1]).all()
    np.testing.assert_array_equal(np.diff(first, axis=1), 1.0)
    # Channels first: x, y, z of the first window's first record (run 0, i 0).
    np.testing.assert_allclose(raw[0, :, 0], [0.0, 0.25, 0.5], atol=1e-5)
    np.testing.assert_allclose(split.x[0, 1, 0], 0.25 / 9.80665, rtol=1e-6)
    # Windows start at the beginning of each run, without overlap.
    starts = first[:, 0] % 100
    assert starts.tolist() == [0, 20, 0, 20, 0, 20, 40, 0, 0, 20, 40, 0, 20, 0, 0]


def test_load_split_is_stratified_and_keeps_users(raw_file):
    bundle = load_wisdm(str(raw_file), window=WINDOW, test_fraction=0.5, seed=3)
    assert bundle.name == "wisdm"
    assert bundle.class_names == ACTIVITIES
    assert bundle.num_classes == 6
    assert bundle.input_shape == (3, WINDOW)
    train, test = bundle.train, bundle.test
    assert len(train) + len(test) == len(EXPECTED_WINDOWS)
    # Per class: Walking 6, Jogging 5, Upstairs 1, Downstairs 1, Standing 2;
    # round(0.5 * n) go to test (Python rounds halves to even).
    counts = {0: 6, 1: 5, 2: 1, 3: 1, 5: 2}
    for label, n in counts.items():
        assert (test.y == label).sum() == round(0.5 * n)
        assert (train.y == label).sum() == n - round(0.5 * n)
    assert (train.y == 4).sum() == (test.y == 4).sum() == 0  # Sitting: too short
    # Groups travel with their windows.
    pairs = sorted(zip(train.groups.tolist(), train.y.tolist(), strict=True))
    pairs += zip(test.groups.tolist(), test.y.tolist(), strict=True)
    assert sorted(pairs) == sorted(EXPECTED_WINDOWS)
    assert set(train.groups.tolist()) | set(test.groups.tolist()) == {7, 12, 33}


def test_load_is_deterministic_and_seeded(raw_file, tmp_path, monkeypatch):
    a = load_wisdm(str(raw_file), window=WINDOW, test_fraction=0.5, seed=0)
    # A fresh cache folder forces a re-parse; the split must not change.
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache2"))
    b = load_wisdm(str(raw_file), window=WINDOW, test_fraction=0.5, seed=0)
    np.testing.assert_array_equal(a.train.x, b.train.x)
    np.testing.assert_array_equal(a.test.y, b.test.y)
    np.testing.assert_array_equal(a.test.groups, b.test.groups)
    splits = {
        load_wisdm(str(raw_file), window=WINDOW, test_fraction=0.5, seed=s)
        .test.x[:, 0, 0]
        .tobytes()
        for s in range(6)
    }
    assert len(splits) > 1  # the seed matters


def test_load_uses_cache(raw_file, tmp_path):
    first = load_wisdm(str(raw_file), window=WINDOW)
    assert len(list((tmp_path / "cache").glob("wisdm-*.npz"))) == 1
    again = load_wisdm(str(raw_file), window=WINDOW)
    np.testing.assert_array_equal(first.train.x, again.train.x)
    assert len(list((tmp_path / "cache").glob("wisdm-*.npz"))) == 1
    load_wisdm(str(raw_file), window=WINDOW + 1)
    assert len(list((tmp_path / "cache").glob("wisdm-*.npz"))) == 2


def test_missing_file_raises(tmp_path):
    missing = tmp_path / "nowhere" / "WISDM_ar_v1.1_raw.txt"
    with pytest.raises(DataError, match="nowhere") as info:
        load_wisdm(str(missing))
    assert "WISDM_ar_v1.1_raw.txt" in str(info.value)
    assert "never downloads" in str(info.value)


def test_no_window_raises(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("7,Walking,1,0.1,0.2,0.3;\n7,Walking,2,0.1,0.2,0.3;\n")
    with pytest.raises(DataError, match=r"short\.txt"):
        load_wisdm(str(path), window=WINDOW)


def test_the_parse_says_which_records_it_skipped_and_why():
    from tandem.datasets.wisdm import parse_wisdm_report

    records, skipped, reasons = parse_wisdm_report(_raw_text())
    assert (len(records), skipped) == (NUM_VALID, NUM_SKIPPED)
    assert reasons == [
        "line 21: '7,Walking,1867172313000,4.4,4.4': 5 fields, expected 6",
        "line 31: '7,Walking,1867172313000,4.4,abc,0.5': x, y, z must be finite "
        "numbers",
        "line 101: '12,Running,1867172313000,4.4,4.4,0.5': unknown activity 'Running'",
    ]
    assert parse_wisdm_report(_raw_text(), keep=1)[2] == reasons[:1]


def test_load_reports_users_windows_and_skips(tmp_path):
    path = tmp_path / "WISDM_ar_v1.1_raw.txt"
    path.write_text(_raw_text() + "99,Walking,1,1.0,2.0,3.0;\n")  # too short
    report = load_wisdm(str(path), window=WINDOW, test_fraction=0.25).report
    assert report["records"] == NUM_VALID + 1
    assert report["skipped-records"] == NUM_SKIPPED
    assert len(report["skipped-examples"]) == NUM_SKIPPED
    assert report["users"] == 3 and report["users-without-window"] == [99]
    assert report["windows"] == len(EXPECTED_WINDOWS) and report["window"] == WINDOW
    again = load_wisdm(str(path), window=WINDOW, test_fraction=0.25).report
    assert again == report  # the report survives the cache


def test_local_epochs_cap_the_steps_of_a_small_partition():
    from tandem.training import capped_steps

    assert capped_steps(50, 0.0, 54, 32) == 50  # no cap
    assert capped_steps(50, 1.0, 54, 32) == 2  # ceil(54 / 32)
    assert capped_steps(50, 2.5, 54, 32) == 5  # ceil(135 / 32)
    assert capped_steps(3, 10.0, 54, 32) == 3  # never more than asked
    assert capped_steps(50, 0.01, 54, 32) == 1  # at least one step
