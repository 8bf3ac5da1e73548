"""The running interpreter's standard library as a next-token corpus.

Real text on every machine, with no download: the ``.py`` files under
``sysconfig.get_paths()["stdlib"]``. Tokens are bytes (vocabulary 256) and
examples are windows of ``text-context`` bytes with the next byte of every
position as target (:func:`tandem.datasets.text.byte_windows`); windows never
cross a file.

**Which files.** Every ``.py`` file below the stdlib folder except test
suites and generated or bundled code: any folder named ``test``, ``tests`` or
``idle_test``; the top-level ``idlelib`` (the IDLE application),
``turtledemo`` (demos), ``lib2to3`` (its grammar tables and fixers),
``encodings`` (generated codec tables), ``pydoc_data`` (one generated
string), ``site-packages`` and ``dist-packages``; and ``__pycache__``.
:data:`EXCLUDED_TOP` and :data:`EXCLUDED_ANYWHERE` hold the lists.

**Natural ids.** A file's unit is its top-level module or package
(``json/decoder.py`` belongs to ``json``, ``bisect.py`` to ``bisect``); the
unit's index in the sorted unit names is the natural id of its windows, so
``partitioner="natural"`` gives every node whole codebases.

**Size and split.** Files are ranked by the SHA-256 of their relative path
(a fixed, machine-independent shuffle that mixes units) and taken in that
order until ``text-max-bytes`` bytes are used (0: all). A file goes to the
test split when the SHA-256 of ``"test:" + path``, read as a fraction,
falls below ``test-fraction``: held-out *files*, never windows of a
training file.

**What is recorded.** The report (the ``data`` record of ``metrics.jsonl``
and the benchmark's assumptions) gives the interpreter's version, the
number of files, units and bytes used, and ``corpus-sha256``: the SHA-256 of
every used file's relative path and contents, in the order above.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sysconfig
from pathlib import Path

import numpy as np

from tandem.datasets.base import ArraySplit, DataBundle, DataError
from tandem.datasets.cache import cached_arrays
from tandem.datasets.text import (
    BYTE_NAMES,
    VOCAB_SIZE,
    documents_to_splits,
    evenly_spaced,
)

__all__ = [
    "EXCLUDED_ANYWHERE",
    "EXCLUDED_TOP",
    "corpus_files",
    "corpus_sha256",
    "held_out",
    "load_pysource",
    "unit_of",
]

#: Top-level folders of the stdlib left out (applications, demos, generated).
EXCLUDED_TOP = frozenset(
    {
        "idlelib",
        "turtledemo",
        "lib2to3",
        "encodings",
        "pydoc_data",
        "site-packages",
        "dist-packages",
    }
)
#: Folder names left out wherever they are (test suites, bytecode caches).
EXCLUDED_ANYWHERE = frozenset({"test", "tests", "idle_test", "__pycache__"})
_CACHE_VERSION = 1  # bump when the selection, windows or report change


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def unit_of(relpath: str) -> str:
    """The top-level module or package a stdlib file belongs to."""
    head = relpath.split("/", 1)[0]
    return head[:-3] if head.endswith(".py") and "/" not in relpath else head


def _rank(relpath: str, salt: str = "") -> bytes:
    return hashlib.sha256((salt + relpath).encode("utf-8")).digest()


def held_out(relpath: str, test_fraction: float) -> bool:
    """Whether a file is in the test split: ``sha256("test:" + path)`` as a
    fraction in ``[0, 1)`` is below ``test_fraction``."""
    value = int.from_bytes(_rank(relpath, "test:")[:8], "big") / 2.0**64
    return value < test_fraction


def corpus_files(root: Path | None = None) -> list[tuple[str, int]]:
    """Relative paths (``/``-separated) and sizes of the corpus files, sorted.

    Parameters
    ----------
    root : Path, optional
        The folder to scan (default: :func:`stdlib_root`).
    """
    root = stdlib_root() if root is None else root
    if not root.is_dir():
        raise DataError(f"the standard library folder {root} does not exist")
    files = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if parts[0] in EXCLUDED_TOP or EXCLUDED_ANYWHERE.intersection(parts[:-1]):
            continue
        if path.is_file():
            files.append(("/".join(parts), path.stat().st_size))
    return sorted(files)


def corpus_sha256(files: list[tuple[str, bytes]]) -> str:
    """SHA-256 over each file's relative path, a NUL, its length and contents."""
    digest = hashlib.sha256()
    for relpath, data in files:
        digest.update(relpath.encode("utf-8") + b"\0")
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def _select(listing: list[tuple[str, int]], max_bytes: int) -> list[str]:
    """Files in rank order until ``max_bytes`` (0: all); at least one."""
    chosen, used = [], 0
    for relpath, size in sorted(listing, key=lambda item: _rank(item[0])):
        if max_bytes > 0 and chosen and used + size > max_bytes:
            continue
        chosen.append(relpath)
        used += size
    return chosen


def _build(
    root: Path,
    listing: list[tuple[str, int]],
    context: int,
    test_fraction: float,
    max_bytes: int,
) -> dict[str, np.ndarray]:
    chosen = _select(listing, max_bytes)
    contents = [(relpath, (root / relpath).read_bytes()) for relpath in chosen]
    units = sorted({unit_of(relpath) for relpath in chosen})
    unit_id = {name: i for i, name in enumerate(units)}
    test = [held_out(relpath, test_fraction) for relpath in chosen]
    train_split, test_split = documents_to_splits(
        [data for _, data in contents],
        [unit_id[unit_of(relpath)] for relpath in chosen],
        test,
        context,
    )
    if len(train_split) == 0 or len(test_split) == 0:
        raise DataError(
            f"the stdlib sample of {len(chosen)} files gives no "
            f"{'training' if len(train_split) == 0 else 'test'} window of "
            f"{context + 1} bytes; raise text-max-bytes"
        )
    report = {
        "python-version": platform.python_version(),
        "python-implementation": platform.python_implementation(),
        "corpus-sha256": corpus_sha256(contents),
        "files": len(chosen),
        "files-test": int(sum(test)),
        "units": len(units),
        "bytes-used": sum(len(data) for _, data in contents),
        "stdlib-files": len(listing),
        "stdlib-bytes": sum(size for _, size in listing),
        "context": context,
        "vocab": VOCAB_SIZE,
    }
    return {
        "x": train_split.x,
        "y": train_split.y,
        "groups": train_split.groups,  # type: ignore[dict-item]
        "x_test": test_split.x,
        "y_test": test_split.y,
        "groups_test": test_split.groups,  # type: ignore[dict-item]
        "units": np.array(units),
        "report": np.frombuffer(json.dumps(report).encode(), dtype=np.uint8),
    }


def load_pysource(
    context: int = 64,
    test_fraction: float = 0.2,
    max_bytes: int = 2_000_000,
    test_windows: int = 0,
    root: Path | None = None,
) -> DataBundle:
    """The stdlib corpus as next-byte windows (cached on disk).

    Parameters
    ----------
    context : int (default: 64)
        Bytes per example (``text-context``).
    test_fraction : float (default: 0.2)
        Expected share of files held out for the test split.
    max_bytes : int (default: 2,000,000)
        Bytes of source used (``text-max-bytes``; 0: the whole corpus).
    test_windows : int (default: 0)
        Keep this many windows of the held-out files, evenly spaced
        (``text-test-windows``; 0: all).
    root : Path, optional
        The folder to read (default: the running interpreter's stdlib).

    Returns
    -------
    DataBundle
        ``x`` and ``y`` int64 of shape ``(N, context)``, 256 classes, the
        unit of every window as ``groups`` (names in ``report["unit-names"]``)
        and the report described in the module docstring.
    """
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    root = stdlib_root() if root is None else root
    listing = corpus_files(root)
    if not listing:
        raise DataError(f"no Python source files under {root}")
    # the cache follows every file's path, size and modification time
    stamps = [(rel, size, (root / rel).stat().st_mtime_ns) for rel, size in listing]
    fingerprint = hashlib.sha256(
        (str(root) + json.dumps(stamps) + platform.python_version()).encode()
    ).hexdigest()[:16]
    key = (
        f"pysource-v{_CACHE_VERSION}-{fingerprint}-c{context}"
        f"-t{float(test_fraction)!r}-m{max_bytes}"
    )
    arrays = cached_arrays(
        key, lambda: _build(root, listing, context, test_fraction, max_bytes)
    )
    report = json.loads(arrays["report"].tobytes().decode())
    report["unit-names"] = [str(u) for u in arrays["units"]]
    return DataBundle(
        name="pysource",
        train=ArraySplit(arrays["x"], arrays["y"], arrays["groups"]),
        test=evenly_spaced(
            ArraySplit(arrays["x_test"], arrays["y_test"], arrays["groups_test"]),
            test_windows,
        ),
        class_names=BYTE_NAMES,
        report=report,
    )
