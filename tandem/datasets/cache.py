"""An on-disk cache of generated arrays, safe for concurrent ClientApps.

In deployment every message starts a fresh ClientApp process, and in
simulation several Ray workers start at once; both would otherwise regenerate
or re-decode the same dataset. The cache lives in ``$TANDEM_CACHE_DIR``
(default ``~/.cache/tandem``); files are ``.npz`` (no pickle) written to a
temporary name and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["cache_dir", "cached_arrays"]


def cache_dir() -> Path:
    """The cache folder (created on first use)."""
    root = os.environ.get("TANDEM_CACHE_DIR") or Path.home() / ".cache" / "tandem"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cached_arrays(
    key: str, build: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Return the arrays cached under ``key``, building and storing them if absent."""
    path = cache_dir() / f"{key}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {name: npz[name] for name in npz.files}
        except (OSError, ValueError):
            path.unlink(missing_ok=True)  # a corrupt entry: rebuild it
    arrays = build()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key}.", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return arrays
