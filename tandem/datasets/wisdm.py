"""WISDM v1.1 activity recognition: fixed-length accelerometer windows.

WISDM v1.1 (Kwapisz, Weiss & Moore, "Activity Recognition using Cell Phone
Accelerometers", SIGKDD Explorations 12(2), 2010) holds about 1.1 million
20 Hz tri-axial accelerometer samples from 36 users doing six activities. The
user supplies the raw file ``WISDM_ar_v1.1_raw.txt`` (from the WISDM lab's site,
https://www.cis.fordham.edu/wisdm/dataset.php); we never download it.

Each record reads ``user,activity,timestamp,x,y,z;``. The published file has
known quirks, all handled by :func:`parse_wisdm_raw`: records end with ``;``
(sometimes followed by a comma or whitespace), some lines are blank, some lines
hold several ``;``-separated records, and some records are malformed (a missing
field, an empty z value, non-numeric text). Malformed records are skipped and
counted. Timestamps of 0 occur too; they are kept, since windows follow file
order, not timestamps.

:func:`make_windows` cuts each run of consecutive records with the same (user,
activity) into non-overlapping windows; :func:`load_wisdm` splits the windows
into train and test, stratified by activity, keeping the user of every window as
its natural id (``ArraySplit.groups``). The windows are cached on disk (see
:func:`tandem.datasets.cache.cached_arrays`), so the file is parsed once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tandem.datasets.base import ArraySplit, DataBundle, DataError
from tandem.datasets.cache import cached_arrays

__all__ = [
    "ACTIVITIES",
    "RAW_FILENAME",
    "STANDARD_GRAVITY",
    "WisdmRecords",
    "load_wisdm",
    "make_windows",
    "parse_wisdm_raw",
    "parse_wisdm_report",
    "stratified_split",
]

ACTIVITIES = ("Walking", "Jogging", "Upstairs", "Downstairs", "Sitting", "Standing")
"""Class names; the class id of an activity is its index here."""

RAW_FILENAME = "WISDM_ar_v1.1_raw.txt"
"""The raw file's name in the WISDM v1.1 archive."""

STANDARD_GRAVITY = 9.80665
"""m/s² per g; the raw values (m/s²) are divided by this, so windows are in g."""

_ACTIVITY_IDS = {name: i for i, name in enumerate(ACTIVITIES)}
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_STRIP = " \t\f\v,"  # what may surround a record: whitespace, the ';,' quirk
_CACHE_VERSION = 2  # bump when parsing, windowing or the cached report changes
#: Skipped records whose reasons a load report quotes.
REPORTED_SKIPS = 5


@dataclass(frozen=True, eq=False)
class WisdmRecords:
    """Well-formed WISDM records, in file order.

    Attributes
    ----------
    user : np.ndarray
        ``int64`` user ids, shape ``(M,)``.
    activity : np.ndarray
        ``int64`` indices into :data:`ACTIVITIES`, shape ``(M,)``.
    timestamp : np.ndarray
        ``int64`` raw timestamps (may be 0), shape ``(M,)``.
    xyz : np.ndarray
        ``float32`` accelerations in m/s² as in the file, shape ``(M, 3)``.
    """

    user: np.ndarray
    activity: np.ndarray
    timestamp: np.ndarray
    xyz: np.ndarray

    def __len__(self) -> int:
        return len(self.user)


def _parse_record(fields: list[str]) -> tuple[int, int, int, float, float, float]:
    """One record's values; raises ``ValueError`` or ``KeyError`` if malformed."""
    user, activity, timestamp, x, y, z = fields  # ValueError unless 6 fields
    values = float(x), float(y), float(z)
    if not all(math.isfinite(v) for v in values):
        raise ValueError("non-finite acceleration")
    return (int(user), _ACTIVITY_IDS[activity.strip()], int(timestamp), *values)


def _why_malformed(fields: list[str]) -> str:
    """Why a record does not parse (for the load report)."""
    if len(fields) != 6:
        return f"{len(fields)} fields, expected 6"
    user, activity, timestamp = fields[:3]
    if activity.strip() not in _ACTIVITY_IDS:
        return f"unknown activity {activity.strip()!r}"
    for name, text in (("user", user), ("timestamp", timestamp)):
        try:
            int(text)
        except ValueError:
            return f"{name} {text.strip()!r} is not an integer"
    return "x, y, z must be finite numbers"


def parse_wisdm_report(
    text: str, keep: int = REPORTED_SKIPS
) -> tuple[WisdmRecords, int, list[str]]:
    """Parse the text of ``WISDM_ar_v1.1_raw.txt``, saying what was skipped.

    The text is split on ``;`` and line breaks; each piece is stripped of
    whitespace and commas (the ``;,`` ending), and empty pieces are ignored. A
    piece is a record if it has exactly six comma-separated fields: an integer
    user, a known activity, an integer timestamp and three finite numbers.
    Anything else is skipped and counted.

    Parameters
    ----------
    text : str
        The whole file's text.
    keep : int (default: 5)
        How many skipped records to describe.

    Returns
    -------
    tuple[WisdmRecords, int, list[str]]
        The well-formed records in file order, the number of malformed records
        skipped, and ``line N: 'piece': why`` for the first ``keep`` of them.
    """
    rows: list[tuple[int, int, int, float, float, float]] = []
    skipped = 0
    reasons: list[str] = []
    for lineno, line in enumerate(_LINE_BREAK.split(text), start=1):
        for piece in line.split(";"):
            piece = piece.strip(_STRIP)
            if not piece:
                continue
            fields = piece.split(",")
            try:
                rows.append(_parse_record(fields))
            except (ValueError, KeyError):
                skipped += 1
                if len(reasons) < keep:
                    quoted = piece if len(piece) <= 60 else piece[:57] + "..."
                    reasons.append(
                        f"line {lineno}: {quoted!r}: {_why_malformed(fields)}"
                    )
    if rows:
        user, activity, timestamp, x, y, z = zip(*rows, strict=True)
        xyz = np.array([x, y, z], dtype=np.float32).T.copy()
    else:
        user = activity = timestamp = ()
        xyz = np.zeros((0, 3), dtype=np.float32)
    records = WisdmRecords(
        user=np.array(user, dtype=np.int64),
        activity=np.array(activity, dtype=np.int64),
        timestamp=np.array(timestamp, dtype=np.int64),
        xyz=xyz,
    )
    return records, skipped, reasons


def parse_wisdm_raw(text: str) -> tuple[WisdmRecords, int]:
    """:func:`parse_wisdm_report` without the reasons: records and skip count."""
    records, skipped, _ = parse_wisdm_report(text, keep=0)
    return records, skipped


def make_windows(records: WisdmRecords, window: int) -> ArraySplit:
    """Cut records into non-overlapping windows within (user, activity) runs.

    A run is a maximal stretch of consecutive records (in file order) with the
    same user and activity. Each run yields ``len(run) // window`` windows; the
    remainder is dropped, so no window spans two runs.

    Parameters
    ----------
    records : WisdmRecords
        Parsed records, in file order.
    window : int
        Samples per window (20 Hz, so 200 is 10 s), >= 1.

    Returns
    -------
    ArraySplit
        ``x`` float32 of shape ``(N, 3, window)`` (channels x, y, z; in g, i.e.
        divided by :data:`STANDARD_GRAVITY`), ``y`` the activity ids and
        ``groups`` the user ids, in file order. ``N`` may be 0.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    n = len(records)
    change = (records.user[1:] != records.user[:-1]) | (
        records.activity[1:] != records.activity[:-1]
    )
    bounds = np.concatenate([[0], np.flatnonzero(change) + 1, [n]]).astype(np.int64)
    first = np.concatenate(  # each window's first record; there is >= 1 run
        [
            np.arange(lo, hi - window + 1, window, dtype=np.int64)
            for lo, hi in itertools.pairwise(bounds)
        ]
    )
    idx = first[:, None] + np.arange(window, dtype=np.int64)  # (N, window)
    x = records.xyz[idx].transpose(0, 2, 1) / np.float32(STANDARD_GRAVITY)
    return ArraySplit(
        x=np.ascontiguousarray(x, dtype=np.float32),
        y=records.activity[first].copy(),
        groups=records.user[first].copy(),
    )


def stratified_split(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Train and test row indices, with ``test_fraction`` of every class in test.

    Each class's rows are shuffled with ``rng`` (classes in ascending order) and
    ``round(test_fraction * count)`` of them go to test. Both index arrays are
    returned sorted.

    Parameters
    ----------
    labels : np.ndarray
        ``int64`` class ids, shape ``(N,)``.
    test_fraction : float
        Share of each class for the test split, in ``[0, 1]``.
    rng : np.random.Generator
        The source of the shuffles.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        ``int64`` train indices and test indices.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    train: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    test: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        n_test = round(test_fraction * len(rows))
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _resolve(path: str) -> Path:
    """The raw file at ``path`` (or inside it, if a folder); ``DataError`` if absent."""
    file = Path(path).expanduser() if path else None
    if file is not None and file.is_dir() and (file / RAW_FILENAME).is_file():
        file = file / RAW_FILENAME
    if file is None or not file.is_file():
        raise DataError(
            f"WISDM raw file not found: {path!r}. Get WISDM_ar_v1.1 from the WISDM "
            "lab's site (https://www.cis.fordham.edu/wisdm/dataset.php), unpack it "
            f"and set data-path to its {RAW_FILENAME}; tandem never downloads it."
        )
    return file.resolve()


def _build(
    file: Path, window: int, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    text = file.read_text(encoding="utf-8", errors="replace")
    records, skipped, reasons = parse_wisdm_report(text)
    windows = make_windows(records, window)
    if len(windows) == 0:
        raise DataError(
            f"no {window}-sample window could be made from {file} "
            f"({len(records)} valid records, {skipped} malformed skipped); "
            f"is it {RAW_FILENAME}?"
        )
    train_idx, test_idx = stratified_split(
        windows.y, test_fraction, np.random.default_rng(seed)
    )
    train, test = windows.subset(train_idx), windows.subset(test_idx)
    users = np.unique(records.user)
    kept = np.unique(windows.groups)  # type: ignore[arg-type]
    report = {
        "records": len(records),
        "skipped-records": skipped,
        "skipped-examples": reasons,
        "users": len(kept),
        "users-without-window": [int(u) for u in np.setdiff1d(users, kept)],
        "windows": len(windows),
        "window": window,
    }
    return {
        "x": train.x,
        "y": train.y,
        "groups": train.groups,
        "x_test": test.x,
        "y_test": test.y,
        "groups_test": test.groups,
        "report": np.frombuffer(json.dumps(report).encode(), dtype=np.uint8),
    }


def load_wisdm(
    path: str, window: int = 200, test_fraction: float = 0.2, seed: int = 0
) -> DataBundle:
    """Read (or fetch from cache) WISDM v1.1 windows from the raw file.

    Parameters
    ----------
    path : str
        ``WISDM_ar_v1.1_raw.txt``, or the folder that holds it.
    window : int (default: 200)
        Samples per window (10 s at 20 Hz); windows do not overlap.
    test_fraction : float (default: 0.2)
        Share of each activity's windows in the test split.
    seed : int (default: 0)
        Seed of the stratified split.

    Returns
    -------
    DataBundle
        ``x`` of shape ``(N, 3, window)`` float32 in g (m/s² divided by
        :data:`STANDARD_GRAVITY`), labels indexing :data:`ACTIVITIES`, the
        user ids as ``groups`` on both splits, and a ``report``: records
        read, records skipped (with the first few reasons), users and
        windows kept, users too short for a window.

    Raises
    ------
    DataError
        If the file is missing, or yields no window.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    file = _resolve(path)
    stat = file.stat()
    where = hashlib.sha256(str(file).encode()).hexdigest()[:12]
    key = (
        f"wisdm-v{_CACHE_VERSION}-{where}-{stat.st_size}-{stat.st_mtime_ns}"
        f"-w{window}-t{float(test_fraction)!r}-s{seed}"
    )
    arrays = cached_arrays(key, lambda: _build(file, window, test_fraction, seed))
    return DataBundle(
        name="wisdm",
        train=ArraySplit(arrays["x"], arrays["y"], arrays["groups"]),
        test=ArraySplit(arrays["x_test"], arrays["y_test"], arrays["groups_test"]),
        class_names=ACTIVITIES,
        report=json.loads(arrays["report"].tobytes().decode()),
    )
