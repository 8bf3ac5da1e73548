"""All of a node's encoded groups as one byte stream and one codec table.

Pure numpy; no Flower imports. Every array in a Flower ``ArrayRecord`` pays a
fixed serialization cost: about 600 bytes even when empty (measured with
:func:`tandem.accounting.payload_bytes` under flwr 1.41: one empty float32
array 606 bytes, 80 arrays of 10 floats 39,279 bytes against 4,610 for one
array of 1,000). One array per group and payload key (``g<i>/values`` ...)
would cost more than the update it carries (42 groups of cnn1d's 9,610
parameters: ~40 KB of framing for a ~38 KB model). So a node's update travels
as two arrays:

``codecs`` : uint8 ``(n,)``
    For group ``i``, the index into the round's option list
    (:class:`~tandem.compression.codecs.Option` s) of the codec it used.
``payload`` : uint8 ``(B,)``
    The groups' payload arrays, group by group, each group's arrays in
    :func:`~tandem.compression.codecs.payload_keys` order, as raw
    little-endian bytes (float32 ``<f4``, float16 ``<f2``, uint32 ``<u4``,
    uint8, int8).

Nothing in the stream says how long a part is: group sizes are known to the
receiver (from its own model) and the codec table fixes every length (``4n``
full, ``2n`` half, ``n`` int8 levels and one scale, ``⌈n/8⌉`` sign bits and
one scale, ``k = topk_count(n, r)``
indices and values for top-k, nothing for defer), so
``B = Σ_i encoded_nbytes(option_i, n_i)`` exactly. :func:`unpack_flat`
checks the table and that equality, then has every group's bytes checked and
decoded with the rules of :func:`~tandem.compression.codecs.decode` (index
range, duplicates, NaN/Inf, scale sign, padding bits). A malformed payload
raises :class:`~tandem.compression.codecs.CodecError` naming the group and
the rule; in particular a scale "of the wrong shape" can only appear as a
stream of the wrong length and is rejected as such.

Speed: both directions work once per (option, group size), not once per
group. All groups of one option and one size take the same ``L`` bytes, so
their payloads are the rows of a ``(k, L)`` matrix cut from (or written to)
the stream at offsets that follow from the table
(:mod:`~tandem.compression.rows`), and their values the rows of a ``(k, n)``
matrix of the flat update; each codec encodes and decodes such matrices
(:meth:`~tandem.compression.codecs.Codec.encode_rows`,
:meth:`~tandem.compression.codecs.Codec.decode_rows`) with the same bytes
and values as its per-group :func:`~tandem.compression.codecs.encode` and
:func:`~tandem.compression.codecs.decode`. On a 4M-parameter update in
groups of 256 that is a handful of numpy passes instead of 16,000 Python
iterations (``tandem bench codecs``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from tandem.compression.codecs import (
    CodecError,
    Option,
    RowError,
    option_table,
    wire_dtype,
)
from tandem.compression.rows import (
    exclusive_cumsum,
    get_rows,
    put_rows,
)

__all__ = [
    "encode_packed",
    "pack_groups",
    "split_groups",
    "unpack_flat",
    "unpack_groups",
]


def pack_groups(
    payloads: Sequence[Mapping[str, np.ndarray]],
    choice: Sequence[int] | np.ndarray,
    options: Sequence[Option],
) -> tuple[np.ndarray, np.ndarray]:
    """Pack encoded groups into ``(codecs uint8 (n,), payload uint8 (B,))``.

    Parameters
    ----------
    payloads : Sequence[Mapping[str, np.ndarray]]
        Group ``i``'s payload from :func:`~tandem.compression.codecs.encode`
        with ``options[choice[i]]``.
    choice : Sequence[int] or np.ndarray
        Shape ``(n,)``: the option index of each group.
    options : Sequence[Option]
        At most 256 options.

    Raises
    ------
    CodecError
        If there are more than 256 options, a choice is out of range, or a
        payload's keys differ from its codec's.
    """
    if len(options) > 256:
        raise CodecError(f"at most 256 options fit a uint8 table, got {len(options)}")
    choice = np.asarray(choice, dtype=np.int64)
    if choice.shape != (len(payloads),):
        raise CodecError(
            f"choice has shape {choice.shape}, expected ({len(payloads)},)"
        )
    if choice.size and (choice.min() < 0 or choice.max() >= len(options)):
        raise CodecError(f"choice out of range for {len(options)} options")
    parts: list[bytes] = []
    for i, (payload, c) in enumerate(zip(payloads, choice.tolist(), strict=True)):
        codec = options[c].codec
        if set(payload) != set(codec.layout):
            raise CodecError(
                f"group {i}: {codec.name} payload has keys {sorted(payload)}, "
                f"expected {list(codec.layout)}"
            )
        parts.extend(
            np.ascontiguousarray(payload[key], dtype=wire_dtype(dtype)).tobytes()
            for key, dtype in codec.layout.items()
        )
    stream = np.frombuffer(b"".join(parts), dtype=np.uint8).copy()
    return choice.astype(np.uint8), stream


def _group_costs(
    codecs: np.ndarray,
    payload: np.ndarray,
    sizes: np.ndarray,
    options: Sequence[Option],
    max_bytes: int | None,
) -> np.ndarray:
    """The structural checks of :func:`split_groups`; each group's payload
    bytes ``(n,)`` int64 as the table implies them."""
    sizes = np.asarray(sizes, dtype=np.int64)
    n = sizes.size
    if not isinstance(codecs, np.ndarray) or codecs.dtype != np.uint8:
        raise CodecError(f"codec table must be a uint8 array, got {_describe(codecs)}")
    if codecs.shape != (n,):
        raise CodecError(f"codec table has shape {codecs.shape}, expected ({n},)")
    if not isinstance(payload, np.ndarray) or payload.dtype != np.uint8:
        raise CodecError(f"payload must be a uint8 array, got {_describe(payload)}")
    if payload.ndim != 1:
        raise CodecError(f"payload has shape {payload.shape}, expected 1-D")
    if n and int(codecs.max()) >= len(options):
        bad = int(np.flatnonzero(codecs >= len(options))[0])
        raise CodecError(
            f"group {bad}: codec index {int(codecs[bad])} out of range "
            f"for {len(options)} options"
        )
    costs, _ = option_table(options, sizes)
    chosen = costs[np.arange(n), codecs.astype(np.int64)]
    implied = int(chosen.sum())
    if max_bytes is not None and implied > max_bytes:
        raise CodecError(
            f"the codec table asks for {implied} payload bytes, more than the "
            f"budget of {max_bytes} bytes"
        )
    if payload.size != implied:
        raise CodecError(
            f"payload has {payload.size} bytes; the codec table implies {implied}"
        )
    return chosen


def split_groups(
    codecs: np.ndarray,
    payload: np.ndarray,
    sizes: np.ndarray,
    options: Sequence[Option],
    *,
    max_bytes: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """Cut a packed stream back into per-group payload dicts (not yet decoded).

    Checks the structure only: the table's dtype, shape and indices, the
    stream's dtype and shape, its exact length, and ``max_bytes``. The values
    are checked by :func:`~tandem.compression.codecs.decode`
    (:func:`unpack_groups` does both).

    Parameters
    ----------
    codecs : np.ndarray
        uint8 ``(n,)``: option index per group.
    payload : np.ndarray
        uint8 ``(B,)``: the stream.
    sizes : np.ndarray
        int ``(n,)``: elements per group, from the receiver's own model.
    options : Sequence[Option]
        The options the table indexes.
    max_bytes : int or None (default: None)
        Largest ``B`` accepted (the sender's byte budget).

    Raises
    ------
    CodecError
        Naming what was wrong.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    _group_costs(codecs, payload, sizes, options, max_bytes)
    raw = payload.tobytes()
    offset = 0
    groups: list[dict[str, np.ndarray]] = []
    for size, c in zip(sizes.tolist(), codecs.tolist(), strict=True):
        option = options[c]
        codec = option.codec
        arrays: dict[str, np.ndarray] = {}
        lengths = codec.lengths(np.asarray(size, dtype=np.int64), option.ratio)
        for key, count in lengths.items():
            native = codec.layout[key]
            wire = wire_dtype(native)
            arrays[key] = np.frombuffer(raw, wire, int(count), offset).astype(native)
            offset += int(count) * wire.itemsize
        groups.append(arrays)
    return groups


def unpack_flat(
    codecs: np.ndarray,
    payload: np.ndarray,
    sizes: np.ndarray,
    options: Sequence[Option],
    *,
    max_bytes: int | None = None,
    labels: Sequence[str] | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Check and decode a packed update into one flat vector, vectorized.

    The same checks and values as :func:`split_groups` followed by
    :func:`~tandem.compression.codecs.decode` on every group, run once per
    (option, group size) instead of once per group: the groups of one option
    and one size all take ``L`` bytes, so their payloads are cut out of the
    stream as one ``(k, L)`` matrix (:func:`~tandem.compression.rows.get_rows`)
    and checked and decoded by
    :meth:`~tandem.compression.codecs.Codec.decode_rows`.

    Parameters
    ----------
    codecs, payload, sizes, options, max_bytes
        As in :func:`split_groups`.
    labels : Sequence[str] or None (default: None)
        Group names for error messages (e.g. ``ParamGroup.key``).
    out : np.ndarray or None (default: None)
        A float32 ``(N,)`` buffer to decode into (reused across replies, it
        saves an allocation per reply); its values are overwritten.

    Returns
    -------
    decoded : np.ndarray
        ``(N,)`` float32, ``N = Σ sizes`` (``out`` if given): every sent
        group's values, zeros in the others.
    sent : np.ndarray
        ``(n,)`` bool: the groups whose codec sends a payload (not ``defer``).

    Raises
    ------
    CodecError
        From the structural checks, or naming a group whose payload breaks a
        rule (the first such group found; with several bad groups it need
        not be the first in group order).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    widths = _group_costs(codecs, payload, sizes, options, max_bytes)
    starts = exclusive_cumsum(sizes)
    offsets = exclusive_cumsum(widths)
    total = int(sizes.sum())
    if out is None:
        decoded = np.zeros(total, dtype=np.float32)
    elif out.dtype != np.float32 or out.shape != (total,):
        raise ValueError(f"out must be float32 of shape ({total},)")
    else:
        decoded = out
    sent = np.zeros(sizes.size, dtype=bool)
    codes = codecs.astype(np.int64)
    for j in np.flatnonzero(np.bincount(codes, minlength=len(options))).tolist():
        option = options[j]
        if not option.codec.layout:  # nothing sent (defer)
            continue
        chosen = np.flatnonzero(codes == j)
        sent[chosen] = True
        chosen_sizes = sizes[chosen]
        for size in np.unique(chosen_sizes).tolist():
            groups = chosen[chosen_sizes == size]
            rows = get_rows(payload, offsets[groups], int(widths[groups[0]]))
            try:
                values = option.codec.decode_rows(rows, size, option.ratio)
            except RowError as err:
                group = int(groups[err.row])
                name = labels[group] if labels is not None else str(group)
                raise CodecError(f"group {name}: {err.reason}") from None
            put_rows(decoded, starts[groups], values)
    if out is not None and not sent.all():
        decoded[np.repeat(~sent, sizes)] = 0.0
    return decoded, sent


def unpack_groups(
    codecs: np.ndarray,
    payload: np.ndarray,
    sizes: np.ndarray,
    options: Sequence[Option],
    *,
    max_bytes: int | None = None,
    labels: Sequence[str] | None = None,
) -> list[np.ndarray | None]:
    """Check and decode a packed update: one float32 ``(n_i,)`` per sent group.

    Deferred groups come back as ``None`` (nothing was sent for them). The
    groups are views of one fresh array (:func:`unpack_flat`).

    Parameters
    ----------
    codecs, payload, sizes, options, max_bytes
        As in :func:`split_groups`.
    labels : Sequence[str] or None (default: None)
        Group names for error messages (e.g. ``ParamGroup.key``).

    Raises
    ------
    CodecError
        From :func:`split_groups`'s checks or from a codec's value rules,
        prefixed with the group.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    decoded, sent = unpack_flat(
        codecs, payload, sizes, options, max_bytes=max_bytes, labels=labels
    )
    parts = np.split(decoded, exclusive_cumsum(sizes)[1:]) if sizes.size else []
    return [
        part if is_sent else None
        for part, is_sent in zip(parts, sent.tolist(), strict=True)
    ]


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array"
    return type(value).__name__


def _check_packed_inputs(
    x: np.ndarray, sizes: np.ndarray, choice: np.ndarray, options: Sequence[Option]
) -> None:
    n = sizes.size
    if x.dtype != np.float32 or x.shape != (int(sizes.sum()),):
        raise CodecError(f"x must be float32 of shape ({int(sizes.sum())},)")
    if choice.shape != (n,):
        raise CodecError(f"choice has shape {choice.shape}, expected ({n},)")
    if len(options) > 256 or (n and (choice.min() < 0 or choice.max() >= len(options))):
        raise CodecError(f"choice out of range for {len(options)} options")
    if not np.isfinite(x).all():
        raise CodecError("x holds NaN or Inf")


def encode_packed(
    x: np.ndarray,
    sizes: np.ndarray,
    choice: np.ndarray,
    options: Sequence[Option],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encode every group of a flat vector and pack them, vectorized.

    The same bytes as calling :func:`~tandem.compression.codecs.encode` on
    each group and :func:`pack_groups` on the results. With thousands of
    groups the per-group route costs far more than the arithmetic; here the
    groups of one option and one size are encoded at once, as the rows of a
    ``(k, n)`` matrix (:meth:`~tandem.compression.codecs.Codec.encode_rows`:
    float16 rounding, int8 levels under each row's ``max|x|``, sign bits and
    each row's ``mean|x|``, top-k by a per-row partition), and their wire
    bytes are written straight to their offsets in the stream: each
    cache-sized piece of consecutive groups is encoded in place by the
    option most of its groups chose, from a view of ``x`` into views of the
    stream and of ``decoded``, and the piece's other groups are gathered and
    scattered (:func:`~tandem.compression.rows.put_rows`); no per-group
    arrays, no join. The offsets follow from the codec table, as on the
    receiving side.

    Parameters
    ----------
    x : np.ndarray
        ``(N,)`` float32, finite: the groups back to back.
    sizes : np.ndarray
        ``(n,)`` elements per group, summing to ``N``.
    choice : np.ndarray
        ``(n,)`` option index per group.
    options : Sequence[Option]
        At most 256 options.

    Returns
    -------
    codecs : np.ndarray
        ``(n,)`` uint8, ``choice``.
    payload : np.ndarray
        ``(B,)`` uint8, as :func:`pack_groups` would give.
    decoded : np.ndarray
        ``(N,)`` float32: what the receiver decodes (zeros in deferred groups).

    Raises
    ------
    CodecError
        If ``x`` is not finite, the shapes disagree, or a choice is out of
        range.
    """
    x = np.asarray(x)
    sizes = np.asarray(sizes, dtype=np.int64)
    choice = np.asarray(choice, dtype=np.int64)
    _check_packed_inputs(x, sizes, choice, options)
    costs, _ = option_table(options, sizes)
    return _encode_packed(x, sizes, choice, options, costs)


def _encode_packed(
    x: np.ndarray,
    sizes: np.ndarray,
    choice: np.ndarray,
    options: Sequence[Option],
    costs: np.ndarray,
    residual: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`encode_packed` on checked inputs (``costs`` from
    :func:`~tandem.compression.codecs.option_table`); with ``residual`` (``x``
    itself, or another ``(N,)`` float32 array), also ``x − decoded`` into
    ``residual`` in every group (``x`` in deferred groups, which decode to
    zeros), while the group is in the CPU cache.

    Each option encodes all of its groups in one call,
    :meth:`~tandem.compression.codecs.Codec.encode_groups`, from ``x`` into
    the stream at the groups' offsets and into ``decoded`` where they lie:
    group by group in a compiled loop for int8 and sign, gathered as rows of
    one size for the others. The options' groups are disjoint, so ``x`` may
    be the residual: each group is read before it is written.
    """
    n = sizes.size
    widths = costs[np.arange(n), choice]
    starts = exclusive_cumsum(sizes)
    offsets = exclusive_cumsum(widths)
    stream = np.empty(int(widths.sum()), dtype=np.uint8)
    decoded = np.empty_like(x)
    for j in np.flatnonzero(np.bincount(choice, minlength=len(options))).tolist():
        groups = np.flatnonzero(choice == j)
        option = options[j]
        if option.codec.layout:
            option.codec.encode_groups(
                x,
                starts[groups],
                sizes[groups],
                option.ratio,
                stream,
                offsets[groups],
                decoded,
                residual,
            )
            continue
        # defer: no bytes, zeros decoded, e = g̃ − 0
        for size in np.unique(sizes[groups]).tolist():
            at = starts[groups[sizes[groups] == size]]
            put_rows(decoded, at, np.zeros((at.size, size), dtype=np.float32))
            if residual is not None and residual is not x:
                put_rows(residual, at, get_rows(x, at, size))
    return choice.astype(np.uint8), stream, decoded
