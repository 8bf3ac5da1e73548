"""Next-token data: byte windows, the stdlib corpus, plain text and LEAF Shakespeare."""

from __future__ import annotations

import hashlib
import json
import platform

import numpy as np
import pytest

from tandem.clients.node import NodeConfig, load_node_split
from tandem.config import ConfigError, RunConfig
from tandem.datasets import load_dataset, partition_indices
from tandem.datasets.base import ArraySplit, DataError
from tandem.datasets.pysource import (
    corpus_files,
    corpus_sha256,
    held_out,
    load_pysource,
    unit_of,
)
from tandem.datasets.text import byte_windows, load_text, role_text


def test_byte_windows_by_hand():
    x, y = byte_windows(b"abcdefg", 3)  # (7 - 1) // 3 = 2 windows, "g" is a target
    assert x.dtype == y.dtype == np.int64
    assert x.tolist() == [list(b"abc"), list(b"def")]
    assert y.tolist() == [list(b"bcd"), list(b"efg")]
    assert byte_windows(b"abc", 3)[0].shape == (0, 3)  # no next byte for "c"


def test_token_splits_check_their_shapes():
    x = np.zeros((4, 8), dtype=np.int64)
    ArraySplit(x, x.copy(), np.zeros(4, dtype=np.int64))
    with pytest.raises(DataError, match="same"):
        ArraySplit(x, np.zeros(4, dtype=np.int64))
    with pytest.raises(DataError, match="groups"):
        ArraySplit(x, x.copy(), np.zeros(3, dtype=np.int64))


def _fake_stdlib(root):
    files = {
        "os.py": b"A" * 300,
        "bisect.py": b"B" * 300,
        "json/__init__.py": b"C" * 300,
        "json/decoder.py": b"D" * 300,
        "email/mime/text.py": b"E" * 300,
        "email/utils.py": b"F" * 300,
        "abc.py": b"G" * 300,
        "csv.py": b"H" * 300,
        # left out: test suites, applications, generated code, caches
        "test/test_os.py": b"x" * 300,
        "json/tests/test_json.py": b"x" * 300,
        "idlelib/editor.py": b"x" * 300,
        "encodings/cp1252.py": b"x" * 300,
        "__pycache__/os.py": b"x" * 300,
        "README.txt": b"x" * 300,
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return {k: v for k, v in files.items() if v[:1] != b"x"}


def test_corpus_files_units_and_hash(tmp_path):
    kept = _fake_stdlib(tmp_path)
    listing = corpus_files(tmp_path)
    assert [rel for rel, _ in listing] == sorted(kept)
    assert all(size == 300 for _, size in listing)
    assert unit_of("json/decoder.py") == "json"
    assert unit_of("email/mime/text.py") == "email"
    assert unit_of("bisect.py") == "bisect"
    # the hash is over path, NUL, 8-byte length and contents, in order
    expected = hashlib.sha256()
    for rel in ("a.py", "b/c.py"):
        data = rel.encode() * 3
        expected.update(rel.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    files = [(rel, rel.encode() * 3) for rel in ("a.py", "b/c.py")]
    assert corpus_sha256(files) == expected.hexdigest()
    assert corpus_sha256(files[::-1]) != expected.hexdigest()


def test_pysource_holds_out_whole_files_and_groups_by_module(tmp_path):
    root = tmp_path / "lib"
    kept = _fake_stdlib(root)
    data = load_pysource(context=16, test_fraction=0.4, max_bytes=0, root=root)
    # every file is one letter, so a window's letter names its file
    letter = {v[:1][0]: rel for rel, v in kept.items()}
    train_files = {letter[b] for b in np.unique(data.train.x)}
    test_files = {letter[b] for b in np.unique(data.test.x)}
    assert train_files.isdisjoint(test_files)
    assert train_files | test_files == set(kept)
    assert test_files == {rel for rel in kept if held_out(rel, 0.4)}
    # (300 - 1) // 16 = 18 windows per file
    assert len(data.train) == 18 * len(train_files)
    assert data.tokens and data.input_shape == (16,) and data.num_classes == 256
    # natural ids are the modules: both json files share one id
    units = data.report["unit-names"]
    assert units == sorted({unit_of(rel) for rel in kept})
    for split in (data.train, data.test):
        for row_letter, gid in zip(split.x[:, 0], split.groups, strict=True):
            assert units[gid] == unit_of(letter[row_letter])
    report = data.report
    assert report["python-version"] == platform.python_version()
    assert report["files"] == len(kept) and report["bytes-used"] == 300 * len(kept)
    assert report["corpus-sha256"] == corpus_sha256(
        [(rel, kept[rel]) for rel in sorted(kept, key=_rank)]
    )


def _rank(rel):
    return hashlib.sha256(rel.encode()).digest()


def test_pysource_is_deterministic_and_the_hash_follows_the_contents(
    tmp_path, monkeypatch
):
    root = tmp_path / "lib"
    _fake_stdlib(root)
    a = load_pysource(context=16, max_bytes=0, root=root)
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "other-cache"))
    b = load_pysource(context=16, max_bytes=0, root=root)  # rebuilt, not cached
    np.testing.assert_array_equal(a.train.x, b.train.x)
    np.testing.assert_array_equal(a.test.y, b.test.y)
    assert a.report["corpus-sha256"] == b.report["corpus-sha256"]
    (root / "os.py").write_bytes(b"A" * 299 + b"Z")
    c = load_pysource(context=16, max_bytes=0, root=root)
    assert c.report["corpus-sha256"] != a.report["corpus-sha256"]


def test_pysource_byte_cap_and_test_window_cap(tmp_path):
    root = tmp_path / "lib"
    _fake_stdlib(root)
    capped = load_pysource(context=16, max_bytes=900, root=root)
    assert capped.report["bytes-used"] == 900 and capped.report["files"] == 3
    full = load_pysource(context=16, max_bytes=0, test_fraction=0.4, root=root)
    few = load_pysource(
        context=16, max_bytes=0, test_fraction=0.4, test_windows=5, root=root
    )
    n = len(full.test)
    rows = [i * n // 5 for i in range(5)]
    np.testing.assert_array_equal(few.test.x, full.test.x[rows])


def test_the_real_stdlib_corpus_partitions_by_module():
    cfg = RunConfig.from_flat(
        {
            "dataset": "pysource",
            "text-max-bytes": 300_000,
            "text-context": 32,
            "partitioner": "natural",
        }
    )
    bundle = load_dataset(cfg.data)
    assert bundle.report["python-version"] == platform.python_version()
    assert len(bundle.report["corpus-sha256"]) == 64
    assert bundle.report["bytes-used"] <= 300_000
    seen: list[set[int]] = []
    for pid in range(3):
        split = load_node_split(cfg, NodeConfig(pid, 3), "train")
        seen.append(set(np.unique(split.groups).tolist()))
        # a node's rows are every window of its modules
        mine = np.isin(bundle.train.groups, list(seen[-1]))
        assert len(split) == int(mine.sum())
    assert seen[0].isdisjoint(seen[1]) and seen[1].isdisjoint(seen[2])
    assert set().union(*seen) == set(np.unique(bundle.train.groups).tolist())


def test_dirichlet_on_token_data_skews_over_modules():
    groups = np.repeat(np.arange(4, dtype=np.int64), 50)
    split = ArraySplit(
        np.zeros((200, 4), dtype=np.int64), np.zeros((200, 4), dtype=np.int64), groups
    )
    assert split.partition_labels is groups
    parts = [
        partition_indices(split.partition_labels, groups, "dirichlet", 2, p, alpha=0.1)
        for p in range(2)
    ]
    assert sorted(np.concatenate(parts).tolist()) == list(range(200))


def test_plain_text_tail_is_the_test_split_and_contiguous_shards(tmp_path):
    text = bytes(range(32, 127)) * 20  # 1,900 bytes
    path = tmp_path / "book.txt"
    path.write_bytes(text)
    data = load_text(str(path), context=10, test_fraction=0.2)
    x, y = byte_windows(text, 10)  # 189 windows
    n_test = round(0.2 * len(x))
    np.testing.assert_array_equal(data.train.x, x[: len(x) - n_test])
    np.testing.assert_array_equal(data.test.y, y[len(x) - n_test :])
    assert data.train.groups is None and data.report["format"] == "plain"
    assert data.report["file-sha256"] == hashlib.sha256(text).hexdigest()
    shards = [
        partition_indices(data.train.partition_labels, None, "contiguous", 3, p)
        for p in range(3)
    ]
    assert np.concatenate(shards).tolist() == list(range(len(data.train)))
    with pytest.raises(ConfigError, match="natural ids"):
        partition_indices(data.train.partition_labels, None, "natural", 2, 0)
    cut = load_text(str(path), context=10, max_bytes=101)
    assert cut.report["bytes-used"] == 101 and len(cut.train) + len(cut.test) == 10


def test_role_text_rebuilds_leaf_windows():
    text = "To be, or not to be, that is the question"
    xs = [text[i : i + 8] for i in range(len(text) - 8)]
    ys = [text[i + 8] for i in range(len(text) - 8)]
    assert role_text(xs, ys) == text
    # a subsampled file: a sample that does not continue adds its whole window
    assert role_text([xs[0], xs[5]], [ys[0], ys[5]]) == (text[:9] + text[5:14])


def test_leaf_shakespeare_is_partitioned_by_role(tmp_path):
    lines = {
        "HAMLET": "To be, or not to be, that is the question. " * 4,
        "OPHELIA": "O, what a noble mind is here o'erthrown! " * 4,
        "YORICK": "Alas.",  # too short for one window of 17 bytes
    }
    blob = {"users": list(lines), "user_data": {}, "num_samples": []}
    for role, text in lines.items():
        n = max(len(text) - 8, 0)
        blob["user_data"][role] = {
            "x": [text[i : i + 8] for i in range(n)],
            "y": [text[i + 8] for i in range(n)],
        }
    path = tmp_path / "all_data.json"
    path.write_text(json.dumps(blob))
    data = load_text(str(path), context=16, test_fraction=0.25)
    assert data.report["format"] == "leaf-shakespeare"
    assert data.report["role-names"] == ["HAMLET", "OPHELIA"]
    for gid, role in enumerate(["HAMLET", "OPHELIA"]):
        x, y = byte_windows(lines[role].encode(), 16)
        n_test = round(0.25 * len(x))
        np.testing.assert_array_equal(
            data.train.x[data.train.groups == gid], x[: len(x) - n_test]
        )
        np.testing.assert_array_equal(
            data.test.y[data.test.groups == gid], y[len(x) - n_test :]
        )
    cfg = RunConfig.from_flat(
        {
            "dataset": "text",
            "data-path": str(path),
            "text-context": 16,
            "partitioner": "natural",
        }
    )
    a = load_node_split(cfg, NodeConfig(0, 2), "train")
    b = load_node_split(cfg, NodeConfig(1, 2), "train")
    assert {len(set(a.groups.tolist())), len(set(b.groups.tolist()))} == {1}
    assert set(a.groups.tolist()) != set(b.groups.tolist())


def test_the_data_report_names_the_interpreter_and_the_corpus(tmp_path):
    from tandem.preflight import data_lines, data_report

    root = tmp_path / "lib"
    _fake_stdlib(root)
    bundle = load_pysource(context=16, max_bytes=0, test_fraction=0.4, root=root)
    report = data_report(bundle)
    assert report["dataset"] == "pysource" and report["num-classes"] == 256
    assert report["train"]["natural-ids"] + report["test"]["natural-ids"] >= 5
    line = data_lines(report)[1]
    assert f"Python {platform.python_version()} stdlib" in line
    assert report["corpus-sha256"] in line and "8 files" in line


def test_text_config_rules(tmp_path):
    with pytest.raises(ConfigError, match="data-path"):
        RunConfig.from_flat({"dataset": "text"})
    with pytest.raises(ConfigError, match="natural ids"):
        RunConfig.from_flat({"dataset": "mnist1d", "partitioner": "natural"})
    with pytest.raises(ConfigError, match="text-context"):
        RunConfig.from_flat({"dataset": "pysource", "text-context": 1})
    cfg = RunConfig.from_flat({"dataset": "pysource", "partitioner": "natural"})
    assert cfg.data.text_context == 64 and cfg.data.text_max_bytes == 2_000_000
    with pytest.raises(DataError, match="not found"):
        load_text(str(tmp_path / "missing.txt"))


def _upload(x, y):
    from flwr.app import Array, ArrayRecord, RecordDict

    from tandem.protocol.centralized import KEY_DATA

    return RecordDict({KEY_DATA: ArrayRecord({"x": Array(x), "y": Array(y)})})


def test_centralized_uploads_of_byte_tokens():
    from tandem.strategies.centralized import check_upload
    from tandem.wire import PayloadError

    x = np.array([[1, 2, 3], [4, 5, 255]], dtype=np.uint8)
    y = np.array([[2, 3, 4], [5, 255, 0]], dtype=np.uint8)
    got = check_upload(_upload(x, y), (3,), 256, 10, tokens=True)
    assert got.x.dtype == np.int64 and got.y.tolist() == y.tolist()
    got = check_upload(
        _upload(x.astype(np.int64), y.astype(np.int64)), (3,), 256, 10, tokens=True
    )
    assert got.tokens and got.x.tolist() == x.tolist()
    bad = [
        (_upload(x.astype(np.float32), y), "dtypes"),
        (_upload(x, y[:, 0].copy()), "shapes"),
        (_upload(x.astype(np.int64) + 1, y.astype(np.int64)), "token ids outside"),
    ]
    for content, match in bad:
        with pytest.raises(PayloadError, match=match):
            check_upload(content, (3,), 256, 10, tokens=True)
    with pytest.raises(PayloadError, match="dtypes"):  # classifiers keep theirs
        check_upload(_upload(x, y[:, 0].copy()), (3,), 256, 10)
