"""Server-side checkpoints: arrays in ``.npz`` and counters in JSON, never pickled.

A checkpoint is one ``.npz`` file written atomically (to a temporary name,
then renamed): every array under its name, plus ``__state__``, the UTF-8
JSON of the counters (round, method, format version, ...). Loading uses
``allow_pickle=False`` and checks the format version, so a file from a newer
tandem or a tampered one is refused with a clear error instead of being
guessed at.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FORMAT",
    "CheckpointError",
    "load_checkpoint",
    "resume_from",
    "save_checkpoint",
]

#: Checkpoint format version written by this tandem.
FORMAT = 1
_STATE = "__state__"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; says why."""


def save_checkpoint(
    path: Path, arrays: Mapping[str, np.ndarray], state: Mapping[str, Any]
) -> Path:
    """Write ``arrays`` and the JSON-able ``state`` to ``path`` atomically."""
    if _STATE in arrays:
        raise ValueError(f"'{_STATE}' is reserved")
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = json.dumps({**state, "format": FORMAT}).encode("utf-8")
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as out:
        np.savez(
            out,
            **{k: np.asarray(v) for k, v in arrays.items()},
            **{_STATE: np.frombuffer(blob, dtype=np.uint8)},
        )
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises
    ------
    CheckpointError
        If the file is missing or not a checkpoint, holds object arrays, or
        has a format version other than :data:`FORMAT`.
    """
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files if k != _STATE}
            if _STATE not in data.files:
                raise CheckpointError(f"{path} holds no '{_STATE}' record")
            state = json.loads(data[_STATE].tobytes().decode("utf-8"))
    except CheckpointError:
        raise
    except (ValueError, OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not a readable checkpoint: {err}") from None
    found = state.get("format") if isinstance(state, dict) else None
    if found != FORMAT:
        raise CheckpointError(
            f"{path} has format {found!r}, this tandem reads format {FORMAT}"
        )
    return arrays, state


def resume_from(path: str, method: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The checkpoint the run config's ``resume`` names, for ``method``.

    Raises
    ------
    ConfigError
        Naming ``resume``: no usable checkpoint there, or one of another method.
    """
    from tandem.config import ConfigError

    try:
        arrays, state = load_checkpoint(Path(path))
    except CheckpointError as err:
        raise ConfigError("resume", path, str(err)) from None
    if state.get("method") != method:
        raise ConfigError(
            "resume", path, f"is a checkpoint of method {state.get('method')!r}"
        )
    return arrays, state
