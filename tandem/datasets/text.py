"""Text as next-token data: byte tokens, fixed-length windows, two file formats.

Every text source here is tokenized the same way: the UTF-8 bytes of the
text are the tokens (vocabulary 256, no tokenizer to ship or train), and a
document of ``L`` bytes gives ``floor((L − 1) / T)`` windows of ``T + 1``
consecutive bytes, stride ``T`` (:func:`byte_windows`). Window ``w`` is one
example: input ``w[:T]``, target ``w[1:]`` (the next byte of every
position). Windows never cross a document boundary, and the bytes after the
last full window are dropped.

``dataset="text"`` reads ``data-path`` (:func:`load_text`):

- **LEAF Shakespeare** (Caldas et al., "LEAF: A Benchmark for Federated
  Settings", 2018, https://arxiv.org/abs/1812.01097): a JSON file
  ``{"users": [...], "user_data": {user: {"x": [...], "y": [...]}}}`` whose
  users are speaking roles and whose samples are 80-character windows ``x``
  with the next character ``y``. Each role's text is rebuilt from its
  samples (:func:`role_text`), the role is the natural id of its windows,
  and the last ``test-fraction`` of each role's windows is its test share.
- **Any other file**: plain text, one document; the last ``test-fraction``
  of its windows (the file's tail) is the test split. It has no natural
  ids; ``partitioner="contiguous"`` gives each node one contiguous shard.

Both are cached on disk (:func:`tandem.datasets.cache.cached_arrays`), keyed
by the file's path, size and modification time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from tandem.datasets.base import ArraySplit, DataBundle, DataError
from tandem.datasets.cache import cached_arrays

__all__ = [
    "BYTE_NAMES",
    "VOCAB_SIZE",
    "byte_windows",
    "documents_to_splits",
    "evenly_spaced",
    "load_text",
    "parse_leaf",
    "role_text",
]

#: Byte-level vocabulary: every token is one byte.
VOCAB_SIZE = 256
#: Class names of the byte vocabulary (``DataBundle.class_names``).
BYTE_NAMES = tuple(f"0x{b:02x}" for b in range(VOCAB_SIZE))
_CACHE_VERSION = 1  # bump when tokenization, windowing or the report changes


def byte_windows(data: bytes, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-byte targets of ``data`` cut into windows of ``context``.

    Parameters
    ----------
    data : bytes
        One document.
    context : int
        Tokens per example ``T`` (>= 1).

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        ``x`` and ``y``, ``int64`` of shape ``(floor((len(data) − 1) / T), T)``
        with ``y[i, t] = x[i, t + 1]`` inside a window and ``y[i, T − 1]`` the
        byte after it.
    """
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    tokens = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    n = max(len(tokens) - 1, 0) // context
    starts = np.arange(n, dtype=np.int64)[:, None] * context
    offsets = np.arange(context, dtype=np.int64)[None, :]
    return tokens[starts + offsets], tokens[starts + offsets + 1]


def evenly_spaced(split: ArraySplit, count: int) -> ArraySplit:
    """``count`` rows of ``split`` spread evenly over it (all if ``count`` is 0
    or at least its length): rows ``floor(i · N / count)``, ``i < count``."""
    n = len(split)
    if count <= 0 or count >= n:
        return split
    return split.subset(np.arange(count, dtype=np.int64) * n // count)


def documents_to_splits(
    documents: Sequence[bytes],
    groups: Sequence[int],
    to_test: Sequence[bool],
    context: int,
) -> tuple[ArraySplit, ArraySplit]:
    """Windows of whole documents, each document in the train or the test split.

    Parameters
    ----------
    documents : sequence of bytes
        The documents, in a fixed order (the rows follow it).
    groups : sequence of int
        Natural id of each document (its module, its role).
    to_test : sequence of bool
        Whether each document belongs to the test split.
    context : int
        Tokens per example.
    """
    parts: dict[bool, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {
        False: [],
        True: [],
    }
    for data, group, test in zip(documents, groups, to_test, strict=True):
        x, y = byte_windows(data, context)
        parts[bool(test)].append((x, y, np.full(len(x), group, dtype=np.int64)))

    def join(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> ArraySplit:
        if not rows:
            empty = np.zeros((0, context), dtype=np.int64)
            return ArraySplit(empty, empty.copy(), np.zeros(0, dtype=np.int64))
        xs, ys, gs = zip(*rows, strict=True)
        return ArraySplit(np.concatenate(xs), np.concatenate(ys), np.concatenate(gs))

    return join(parts[False]), join(parts[True])


def role_text(xs: Sequence[str], ys: Sequence[str]) -> str:
    """One LEAF role's text, rebuilt from its (window, next character) samples.

    LEAF cuts a role's lines into overlapping windows shifted by one
    character, so sample ``i + 1``'s window is sample ``i``'s window moved on
    by its next character; then only that character is new. A sample that
    does not continue the text so far (a subsampled file) adds its whole
    window and next character.
    """
    pieces: list[str] = []
    tail = ""  # the end of the text so far, at least one window long
    for x, y in zip(xs, ys, strict=True):
        piece = y if x and tail.endswith(x) else x + y
        pieces.append(piece)
        tail = (tail + piece)[-max(len(x), 256) :]
    return "".join(pieces)


def parse_leaf(blob: Mapping[str, object]) -> dict[str, str]:
    """Role -> rebuilt text of a LEAF Shakespeare JSON object, in ``users`` order.

    Raises
    ------
    DataError
        If ``users`` or ``user_data`` is missing or malformed.
    """
    users = blob.get("users")
    data = blob.get("user_data")
    if not isinstance(users, list) or not isinstance(data, dict):
        raise DataError("LEAF JSON needs a 'users' list and a 'user_data' object")
    out: dict[str, str] = {}
    for user in users:
        record = data.get(user)
        if not isinstance(record, dict):
            raise DataError(f"LEAF JSON: user {user!r} has no user_data entry")
        xs, ys = record.get("x"), record.get("y")
        if (
            not isinstance(xs, list)
            or not isinstance(ys, list)
            or len(xs) != len(ys)
            or not all(isinstance(s, str) for s in [*xs, *ys])
        ):
            raise DataError(
                f"LEAF JSON: user {user!r} needs equally long string lists x and y"
            )
        out[str(user)] = role_text(xs, ys)
    return out


def _leaf_or_none(raw: bytes) -> dict[str, object] | None:
    """The JSON object if ``raw`` is LEAF's format, else ``None`` (plain text)."""
    if raw.lstrip()[:1] != b"{":
        return None
    try:
        blob = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(blob, dict) and "user_data" in blob:
        return blob
    return None


def _tail_split(n: int, test_fraction: float) -> np.ndarray:
    """``True`` for the last ``round(test_fraction · n)`` of ``n`` rows."""
    mask = np.zeros(n, dtype=bool)
    n_test = round(test_fraction * n)
    if n_test:
        mask[n - n_test :] = True
    return mask


def _build(file: Path, context: int, test_fraction: float, max_bytes: int) -> dict:
    raw = file.read_bytes()
    blob = _leaf_or_none(raw)
    if blob is not None:
        roles = parse_leaf(blob)
        names = list(roles)
        xs, ys, gs, test = [], [], [], []
        short = []
        for gid, name in enumerate(names):
            x, y = byte_windows(roles[name].encode("utf-8"), context)
            if len(x) == 0:
                short.append(name)
                continue
            xs.append(x)
            ys.append(y)
            gs.append(np.full(len(x), gid, dtype=np.int64))
            test.append(_tail_split(len(x), test_fraction))
        if not xs:
            raise DataError(f"no role in {file} has {context + 1} bytes of text")
        x, y, g = np.concatenate(xs), np.concatenate(ys), np.concatenate(gs)
        mask = np.concatenate(test)
        report = {
            "format": "leaf-shakespeare",
            "roles": len(names) - len(short),
            "roles-too-short": len(short),
            "role-names": [n for n in names if n not in short],
        }
    else:
        used = raw if max_bytes <= 0 else raw[:max_bytes]
        x, y = byte_windows(used, context)
        if len(x) == 0:
            raise DataError(f"{file} has fewer than {context + 1} bytes")
        g = None
        mask = _tail_split(len(x), test_fraction)
        report = {"format": "plain", "bytes-used": len(used)}
    report.update(
        {
            "file-bytes": len(raw),
            "file-sha256": hashlib.sha256(raw).hexdigest(),
            "context": context,
            "vocab": VOCAB_SIZE,
            "windows": len(x),
        }
    )
    arrays = {
        "x": x[~mask],
        "y": y[~mask],
        "x_test": x[mask],
        "y_test": y[mask],
        "report": np.frombuffer(json.dumps(report).encode(), dtype=np.uint8),
    }
    if g is not None:
        arrays["groups"] = g[~mask]
        arrays["groups_test"] = g[mask]
    return arrays


def load_text(
    path: str,
    context: int = 64,
    test_fraction: float = 0.2,
    max_bytes: int = 0,
    test_windows: int = 0,
) -> DataBundle:
    """Read (or fetch from cache) a plain-text or LEAF Shakespeare file.

    Parameters
    ----------
    path : str
        The file (``data-path``).
    context : int (default: 64)
        Tokens per example (``text-context``).
    test_fraction : float (default: 0.2)
        Share of windows in the test split: the file's tail (plain text) or
        each role's tail (LEAF).
    max_bytes : int (default: 0)
        Plain text: use only the first ``max_bytes`` bytes (0: all). LEAF
        files are used whole.
    test_windows : int (default: 0)
        Keep this many test windows, evenly spaced (:func:`evenly_spaced`;
        0: all).

    Returns
    -------
    DataBundle
        ``x`` and ``y`` int64 of shape ``(N, context)`` (bytes), 256 classes,
        the role of each window as ``groups`` (LEAF only), and a report
        (format, roles, windows, the file's SHA-256).

    Raises
    ------
    DataError
        If the file is missing, malformed LEAF JSON, or too short.
    """
    file = Path(path).expanduser() if path else None
    if file is None or not file.is_file():
        raise DataError(
            f"text file not found: {path!r}; set data-path to a plain-text file "
            "or a LEAF Shakespeare JSON file"
        )
    file = file.resolve()
    stat = file.stat()
    where = hashlib.sha256(str(file).encode()).hexdigest()[:12]
    key = (
        f"text-v{_CACHE_VERSION}-{where}-{stat.st_size}-{stat.st_mtime_ns}"
        f"-c{context}-t{float(test_fraction)!r}-m{max_bytes}"
    )
    arrays = cached_arrays(key, lambda: _build(file, context, test_fraction, max_bytes))
    groups = arrays.get("groups")
    return DataBundle(
        name="text",
        train=ArraySplit(arrays["x"], arrays["y"], groups),
        test=evenly_spaced(
            ArraySplit(arrays["x_test"], arrays["y_test"], arrays.get("groups_test")),
            test_windows,
        ),
        class_names=BYTE_NAMES,
        report=json.loads(arrays["report"].tobytes().decode()),
    )
