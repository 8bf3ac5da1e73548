"""Links, devices and the virtual clock: time under emulated networks.

Pure Python and NumPy; no Flower imports. Three pieces:

1. **Links.** A :class:`Trace` is a piecewise-constant function of time
   (Mbit/s, or seconds of RTT). A :class:`LinkProfile` has an uplink and a
   downlink bandwidth trace, an RTT trace and optional jitter. A message of
   ``n`` bytes leaving at ``t`` arrives after ``RTT(t)/2 + T`` seconds, where
   ``T`` solves ``∫_t^{t+T} bw(s) ds = 8·n`` (bandwidth in bit/s), i.e.
   ``bytes·8/bandwidth`` while the bandwidth is constant, integrated exactly
   across the trace's steps.
2. **Devices.** A :class:`DeviceProfile` is a sustained FP32 throughput; a
   compute step measured on this machine is scaled by
   ``local_gflops / device_gflops``.
3. **The clock.** :class:`VirtualClock` is a small event simulation of
   resources (one per edge, per link direction, one cloud). Each task runs on
   one resource, after the tasks it depends on and after the resource's
   previous task (FIFO), so overlap is credited only where the schedule
   really overlaps. Sequential and pipelined schedules differ only in their
   dependencies, never in a formula.

The presets follow the seeds: 4G = 50 Mbit/s with 30 ms RTT, 5G = 300 Mbit/s
with 10 ms RTT, variable links 5-200 Mbit/s and 10-300 ms.
"""

from __future__ import annotations

import bisect
import csv
import io
import itertools
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tandem.options import ConfigError

__all__ = [
    "PRESETS",
    "BandwidthEstimator",
    "DeviceProfile",
    "LinkProfile",
    "Task",
    "Trace",
    "TraceError",
    "VirtualClock",
    "assign_links",
    "encode_link",
    "link_label",
    "load_fedscale_capacity",
    "load_link_trace",
    "load_trace_csv",
    "measure_local_gflops",
    "parse_link",
    "parse_rates",
    "preset",
    "variable_link",
]

BITS_PER_BYTE = 8
MEGA = 1e6


class TraceError(ValueError):
    """A malformed trace file; names the file and line."""


# --------------------------------------------------------------------------- traces
@dataclass(frozen=True)
class Trace:
    """A piecewise-constant function of time, repeating after its last step.

    Attributes
    ----------
    times : tuple of float
        Start of each step in seconds; ``times[0] == 0``, strictly increasing.
    values : tuple of float
        Value of each step (Mbit/s for bandwidth, seconds for RTT), >= 0.
    period : float
        Length of one pass; time ``t`` reads the trace at ``t mod period``.
        A constant trace has ``period = inf``.
    """

    times: tuple[float, ...]
    values: tuple[float, ...]
    period: float = math.inf

    def __post_init__(self) -> None:
        if not self.times or len(self.times) != len(self.values):
            raise ValueError("a trace needs as many times as values, at least one")
        if self.times[0] != 0:
            raise ValueError(f"a trace starts at time 0, not {self.times[0]}")
        if any(b <= a for a, b in zip(self.times, self.times[1:], strict=False)):
            raise ValueError("trace times must increase strictly")
        if any(v < 0 or not math.isfinite(v) for v in self.values):
            raise ValueError("trace values must be finite and >= 0")
        if self.period <= self.times[-1]:
            raise ValueError("the period must exceed the last step's start")

    @classmethod
    def constant(cls, value: float) -> Trace:
        """A trace that never changes."""
        return cls((0.0,), (float(value),))

    def at(self, t: float) -> float:
        """Value at time ``t`` (seconds)."""
        if math.isfinite(self.period):
            t = t % self.period
        return self.values[bisect.bisect_right(self.times, t) - 1]

    def _next_change(self, t: float) -> float:
        """The first step boundary strictly after ``t``."""
        if len(self.times) == 1 and not math.isfinite(self.period):
            return math.inf
        base = (
            math.floor(t / self.period) * self.period
            if math.isfinite(self.period)
            else 0.0
        )
        local = t - base
        i = bisect.bisect_right(self.times, local)
        nxt = self.times[i] if i < len(self.times) else self.period
        return base + nxt

    def integrate_until(self, start: float, amount: float) -> float:
        """Seconds ``T`` with ``∫_start^{start+T} value(s) ds = amount``.

        Used with bandwidth in Mbit/s and ``amount`` in Mbit: the exact
        transfer time across the trace's steps. Raises if the trace is zero
        forever after ``start``.
        """
        if amount <= 0:
            return 0.0
        t, left = start, amount
        for _ in range(1_000_000):
            rate = self.at(t)
            boundary = self._next_change(t)
            span = boundary - t
            if rate > 0 and rate * span >= left:
                return t + left / rate - start
            if rate > 0:
                left -= rate * span
            if not math.isfinite(boundary):
                raise ValueError("a zero-bandwidth link never delivers the message")
            t = boundary
        raise ValueError("transfer did not finish within a million trace steps")


def load_trace_csv(path: str | Path) -> Trace:
    """Read a bandwidth trace from a CSV of ``time_s,mbps`` rows.

    An optional header row (non-numeric first cell) and ``#`` comment lines
    are skipped. Times start at 0 and increase; values are >= 0. The trace
    repeats after its last row plus that row's step (the mean step length).

    Raises
    ------
    TraceError
        Naming the file and line of the first malformed row.
    """
    path = Path(path)
    times: list[float] = []
    values: list[float] = []
    with path.open(newline="", encoding="utf-8") as fh:
        for lineno, row in enumerate(csv.reader(fh), start=1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if lineno == 1 and not _is_number(row[0]):
                continue  # header
            if len(row) != 2:
                raise TraceError(
                    f"{path}:{lineno}: expected 'time_s,mbps', got {row!r}"
                )
            try:
                t, v = float(row[0]), float(row[1])
            except ValueError:
                raise TraceError(f"{path}:{lineno}: not numbers: {row!r}") from None
            if not (math.isfinite(t) and math.isfinite(v)) or v < 0:
                raise TraceError(f"{path}:{lineno}: need finite time and mbps >= 0")
            if not times and t != 0:
                raise TraceError(f"{path}:{lineno}: the first time must be 0, got {t}")
            if times and t <= times[-1]:
                raise TraceError(f"{path}:{lineno}: time {t} does not increase")
            times.append(t)
            values.append(v)
    if not times:
        raise TraceError(f"{path}: no rows")
    step = times[-1] / (len(times) - 1) if len(times) > 1 else math.inf
    return Trace(tuple(times), tuple(values), times[-1] + step)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_fedscale_capacity(path: str | Path) -> dict[str, Trace]:
    """Per-client bandwidth from FedScale's device-capacity layout.

    FedScale's ``client_device_capacity`` maps a client id to
    ``{"computation": float, "communication": float}``, communication in
    kbit/s. FedScale ships it as a pickle, which tandem never loads; export it
    to JSON (same layout) or CSV (``client_id,computation,communication``)
    once on a machine you trust. Returns constant bandwidth traces in Mbit/s.

    Raises
    ------
    TraceError
        On a malformed entry, naming the client (JSON) or line (CSV).
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    out: dict[str, Trace] = {}
    if path.suffix.lower() == ".json":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise TraceError(f"{path}: expected an object of client id -> capacity")
        for cid, entry in data.items():
            kbps = entry.get("communication") if isinstance(entry, dict) else None
            if (
                not isinstance(kbps, int | float)
                or not math.isfinite(kbps)
                or kbps <= 0
            ):
                raise TraceError(f"{path}: client {cid}: bad 'communication' {kbps!r}")
            out[str(cid)] = Trace.constant(kbps / 1000.0)
        return out
    for lineno, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or (lineno == 1 and not _is_number(row[-1])):
            continue
        if len(row) != 3:
            raise TraceError(
                f"{path}:{lineno}: expected 'client_id,computation,communication'"
            )
        try:
            kbps = float(row[2])
        except ValueError:
            raise TraceError(
                f"{path}:{lineno}: communication is not a number"
            ) from None
        if not math.isfinite(kbps) or kbps <= 0:
            raise TraceError(f"{path}:{lineno}: communication must be > 0 kbit/s")
        out[row[0].strip()] = Trace.constant(kbps / 1000.0)
    if not out:
        raise TraceError(f"{path}: no clients")
    return out


# --------------------------------------------------------------------------- links
@dataclass(frozen=True)
class LinkProfile:
    """One edge's link to the cloud.

    Attributes
    ----------
    name : str
        Preset name or a label.
    up, down : Trace
        Uplink (edge -> cloud) and downlink bandwidth in Mbit/s.
    rtt : Trace
        Round-trip time in seconds.
    jitter : float
        Standard deviation (s) of a normal delay added to each one-way trip,
        clipped at 0; drawn from the clock's seeded generator.
    """

    name: str
    up: Trace
    down: Trace
    rtt: Trace
    jitter: float = 0.0

    @classmethod
    def fixed(
        cls,
        name: str,
        up_mbps: float,
        down_mbps: float,
        rtt_ms: float,
        jitter_ms: float = 0.0,
    ) -> LinkProfile:
        """A link with constant bandwidth and RTT."""
        return cls(
            name,
            Trace.constant(up_mbps),
            Trace.constant(down_mbps),
            Trace.constant(rtt_ms / 1000.0),
            jitter_ms / 1000.0,
        )

    def one_way_seconds(
        self,
        direction: str,
        nbytes: int,
        start: float,
        rng: np.random.Generator | None = None,
    ) -> float:
        """Seconds for ``nbytes`` to cross ``direction`` (up/down) from ``start``.

        ``RTT(start)/2 + transfer``, the transfer integrated over the bandwidth
        trace (bandwidth in Mbit/s -> bit/s).
        """
        return self.delay_seconds(start, rng) + self.transfer_seconds(
            direction, nbytes, start
        )

    def transfer_seconds(self, direction: str, nbytes: int, start: float) -> float:
        """Seconds the link is busy putting ``nbytes`` on the wire from ``start``.

        The bandwidth trace of ``direction`` (Mbit/s -> bit/s) integrated.
        """
        trace = self.up if direction == "up" else self.down
        return trace.integrate_until(start, nbytes * BITS_PER_BYTE / MEGA)

    def delay_seconds(
        self, start: float, rng: np.random.Generator | None = None
    ) -> float:
        """One-way propagation from ``start``: RTT/2 plus a jitter draw (if any)."""
        seconds = self.rtt.at(start) / 2
        if self.jitter > 0 and rng is not None:
            seconds += max(0.0, float(rng.normal(0.0, self.jitter)))
        return seconds

    def describe(self) -> dict[str, object]:
        """A JSON-able summary (for results files)."""

        def span(trace: Trace, scale: float = 1.0) -> object:
            lo, hi = min(trace.values) * scale, max(trace.values) * scale
            return lo if lo == hi else [lo, hi]

        return {
            "name": self.name,
            "up_mbps": span(self.up),
            "down_mbps": span(self.down),
            "rtt_ms": span(self.rtt, 1000.0),
            "jitter_ms": self.jitter * 1000.0,
        }


def variable_link(seed: int, duration: float = 600.0, step: float = 1.0) -> LinkProfile:
    """A seeded variable link: 5-200 Mbit/s and 10-300 ms RTT (seed 004's range).

    Bandwidth and RTT follow independent random walks in log space, one step
    per ``step`` seconds, reflected into their ranges; the walk repeats after
    ``duration`` seconds. Up and down share the bandwidth walk.
    """
    rng = np.random.default_rng(seed)
    n = max(int(duration / step), 1)

    def walk(lo: float, hi: float, sigma: float) -> tuple[float, ...]:
        log_lo, log_hi = math.log(lo), math.log(hi)
        x = rng.uniform(log_lo, log_hi)
        out = []
        for _ in range(n):
            x += rng.normal(0.0, sigma)
            while x < log_lo or x > log_hi:  # reflect
                x = 2 * log_lo - x if x < log_lo else 2 * log_hi - x
            out.append(math.exp(x))
        return tuple(out)

    times = tuple(i * step for i in range(n))
    bw = Trace(times, walk(5.0, 200.0, 0.25), n * step)
    rtt = Trace(times, tuple(v / 1000.0 for v in walk(10.0, 300.0, 0.25)), n * step)
    return LinkProfile(f"variable-{seed}", bw, bw, rtt)


#: Named link presets. ``variable`` is a family: see :func:`variable_link`.
PRESETS: dict[str, LinkProfile] = {
    # Seeds 000-003: "emulated 4G (50 Mbps, 30 ms RTT) and 5G (300 Mbps, 10 ms RTT)".
    "4g": LinkProfile.fixed("4g", 50, 50, 30),
    "5g": LinkProfile.fixed("5g", 300, 300, 10),
    # Our assumptions (not from the seeds): wired gigabit Ethernet, and a
    # typical home 802.11n/ac Wi-Fi link.
    "lan": LinkProfile.fixed("lan", 1000, 1000, 0.5),
    "wifi": LinkProfile.fixed("wifi", 100, 100, 5, jitter_ms=1),
}


#: Most characters a link spec may have (a node declaring a trace sends it inline).
MAX_SPEC_CHARS = 65536

_RATE_UNITS = {"kbit": 1e-3, "mbit": 1.0, "gbit": 1e3}  # -> Mbit/s
_TIME_UNITS = {"ms": 1e-3, "s": 1.0}  # -> seconds
_QUANTITY = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]+)\s*$", re.I)


def _quantity(text: str, units: Mapping[str, float], what: str, spec: str) -> float:
    """``"2mbit"`` -> 2.0 (units of ``units``' 1.0); ``ValueError`` naming ``spec``."""
    match = _QUANTITY.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in units:
        raise ValueError(
            f"link spec {spec!r}: {what} {text.strip()!r} is not a number with a "
            f"unit ({', '.join(units)})"
        )
    return float(match.group(1)) * units[unit]


def parse_rates(spec: str) -> tuple[float, float, float]:
    """``"UP/DOWN/RTT"`` -> (up Mbit/s, down Mbit/s, RTT seconds).

    Bandwidths take ``kbit``, ``mbit`` or ``gbit`` (per second), the RTT
    ``ms`` or ``s``: ``2mbit/8mbit/120ms`` is 2 Mbit/s up, 8 Mbit/s down and
    a 120 ms round trip. Bandwidths must be > 0, the RTT >= 0.

    Raises
    ------
    ValueError
        Naming the spec and the part that is wrong.
    """
    parts = spec.split("/")
    if len(parts) != 3:
        raise ValueError(
            f"link spec {spec!r}: expected UP/DOWN/RTT, e.g. 2mbit/8mbit/120ms"
        )
    up = _quantity(parts[0], _RATE_UNITS, "uplink", spec)
    down = _quantity(parts[1], _RATE_UNITS, "downlink", spec)
    rtt = _quantity(parts[2], _TIME_UNITS, "RTT", spec)
    if up <= 0 or down <= 0:
        raise ValueError(f"link spec {spec!r}: bandwidths must be > 0")
    return up, down, rtt


#: Column names a link trace file's header may use (lower case, units dropped).
_TRACE_COLUMNS = {"time": "time", "up": "up", "down": "down", "rtt": "rtt"}


def load_link_trace(path: str | Path, index: int = 0) -> LinkProfile:
    """A link from a trace file, in any of three layouts.

    1. **Link trace** (CSV, four columns): ``time_s,up_mbps,down_mbps,rtt_ms``,
       one row per step; an optional header names the columns (``time``,
       ``up``, ``down``, ``rtt``, each optionally followed by ``_`` and a
       unit), in any order. The trace repeats after its last row plus the
       mean step.
    2. **Bandwidth trace** (CSV, two columns ``time_s,mbps``,
       :func:`load_trace_csv`): the same bandwidth up and down, RTT 0.
    3. **FedScale device capacity** (``.json``, or a CSV with the header
       ``client_id,computation,communication``; :func:`load_fedscale_capacity`):
       a constant bandwidth up and down, RTT 0. ``path#client`` picks a
       client; else ``index`` picks the ``index``-th client (mod their
       number), in file order.

    Raises
    ------
    TraceError
        Naming the file (and line) of what is malformed.
    """
    text_path, _, client = str(path).partition("#")
    file = Path(text_path)
    with file.open(newline="", encoding="utf-8") as fh:
        numbered = [
            (lineno, row)
            for lineno, row in enumerate(csv.reader(fh), start=1)
            if row and "".join(row).strip() and not row[0].lstrip().startswith("#")
        ]
    rows = [row for _, row in numbered]
    if not rows:
        raise TraceError(f"{file}: no rows")
    header = [c.strip().lower() for c in rows[0]]
    if file.suffix.lower() == ".json" or header[:1] == ["client_id"]:
        clients = load_fedscale_capacity(file)
        names = list(clients)
        if client:
            if client not in clients:
                raise TraceError(f"{file}: no client {client!r}")
            name = client
        else:
            name = names[index % len(names)]
        bw = clients[name]
        return LinkProfile(f"trace:{file}#{name}", bw, bw, Trace.constant(0.0))
    width = len(rows[0])
    if width == 2:
        bw = load_trace_csv(file)
        return LinkProfile(f"trace:{file}", bw, bw, Trace.constant(0.0))
    if width != 4:
        raise TraceError(
            f"{file}:1: expected 'time_s,up_mbps,down_mbps,rtt_ms' "
            f"(or 'time_s,mbps', or FedScale's capacity layout), got {rows[0]!r}"
        )
    order = ["time", "up", "down", "rtt"]
    if not _is_number(rows[0][0]):
        named = [_TRACE_COLUMNS.get(h.split("_")[0].split(" ")[0]) for h in header]
        if sorted(filter(None, named)) != sorted(order):
            raise TraceError(
                f"{file}:1: header {rows[0]!r} must name time, up, down and rtt"
            )
        order = named  # type: ignore[assignment]
        numbered = numbered[1:]
    table: list[tuple[float, float, float, float]] = []
    for lineno, row in numbered:
        if len(row) != 4:
            raise TraceError(f"{file}:{lineno}: expected 4 columns, got {row!r}")
        try:
            value = dict(zip(order, (float(c) for c in row), strict=True))
        except ValueError:
            raise TraceError(f"{file}:{lineno}: not numbers: {row!r}") from None
        table.append((value["time"], value["up"], value["down"], value["rtt"] / 1000))
    return _from_table(table, f"trace:{file}", str(file))


def _from_table(
    table: Sequence[tuple[float, float, float, float]], name: str, where: str
) -> LinkProfile:
    """A link from ``(time s, up Mbit/s, down Mbit/s, RTT s)`` rows."""
    if not table:
        raise TraceError(f"{where}: no rows")
    times = [row[0] for row in table]
    if times[0] != 0:
        raise TraceError(f"{where}: the first time must be 0, got {times[0]}")
    for row in table:
        if not all(math.isfinite(v) for v in row) or min(row[1:]) < 0:
            raise TraceError(f"{where}: row {row}: need finite values, rates >= 0")
    if any(b <= a for a, b in itertools.pairwise(times)):
        raise TraceError(f"{where}: times must increase strictly")
    step = times[-1] / (len(times) - 1) if len(times) > 1 else math.inf
    period = times[-1] + step

    def column(i: int) -> Trace:
        return Trace(tuple(times), tuple(row[i] for row in table), period)

    return LinkProfile(name, column(1), column(2), column(3))


def encode_link(link: LinkProfile) -> str:
    """A self-contained spec of ``link``: ``table:`` rows of its steps.

    ``table:t,up,down,rtt;t,up,down,rtt;...`` with time in s, bandwidth in
    Mbit/s and RTT in ms; :func:`parse_link` reads it back. A node declaring
    a trace file sends this, since the cloud cannot read the node's files.
    Only links whose traces share their step times and period (or are
    constant) can be encoded; the period is the last step plus the mean step,
    as for a trace file.
    """
    traces = (link.up, link.down, link.rtt)
    ref = max(traces, key=lambda t: len(t.times))
    for t in traces:
        if len(t.times) > 1 and (t.times != ref.times or t.period != ref.period):
            raise ValueError(f"link {link.name!r}: traces do not share their steps")
    rows = zip(
        ref.times,
        *(t.values * len(ref.times) if len(t.times) == 1 else t.values for t in traces),
        strict=True,
    )
    return "table:" + ";".join(
        f"{t:g},{up:g},{down:g},{rtt * 1000:g}" for t, up, down, rtt in rows
    )


def _parse_table(spec: str) -> LinkProfile:
    rows = []
    for part in spec.removeprefix("table:").split(";"):
        cells = part.split(",")
        try:
            t, up, down, rtt = (float(c) for c in cells)
        except ValueError:
            raise ValueError(
                f"link spec table row {part!r}: expected t,up_mbps,down_mbps,rtt_ms"
            ) from None
        rows.append((t, up, down, rtt / 1000))
    try:
        return _from_table(rows, spec, "link spec table")
    except TraceError as err:
        raise ValueError(str(err)) from None


def parse_link(spec: str, seed: int = 0, index: int = 0) -> LinkProfile:
    """One link from a spec: the one parser of link specs.

    ``spec`` is one of

    - a preset name (``4g``, ``5g``, ``lan``, ``wifi``; see :data:`PRESETS`),
      or ``variable`` (a seeded trace, :func:`variable_link` of ``seed``);
    - ``UP/DOWN/RTT`` (:func:`parse_rates`), e.g. ``2mbit/8mbit/120ms``;
    - ``trace:<file>`` (:func:`load_link_trace`; ``index`` picks a FedScale
      client when the file does not name one);
    - ``table:...`` (:func:`encode_link`'s inline trace).

    The link's ``name`` is the spec itself (a preset's name for a preset), so
    a declared spec compares equal to the link it gave.

    Raises
    ------
    ValueError
        For an unknown name or a malformed spec, saying what is wrong
        (:class:`TraceError`, a ``ValueError``, for a bad trace file).
    """
    spec = spec.strip()
    if len(spec) > MAX_SPEC_CHARS:
        raise ValueError(
            f"link spec of {len(spec)} characters (at most {MAX_SPEC_CHARS})"
        )
    if spec == "variable":
        return variable_link(seed)
    if spec in PRESETS:
        return PRESETS[spec]
    if spec.startswith("trace:"):
        try:
            return load_link_trace(spec.removeprefix("trace:"), index)
        except OSError as err:
            raise TraceError(f"link spec {spec!r}: {err.strerror or err}") from None
    if spec.startswith("table:"):
        return _parse_table(spec)
    if "/" in spec:
        up, down, rtt = parse_rates(spec)
        return LinkProfile(
            spec, Trace.constant(up), Trace.constant(down), Trace.constant(rtt)
        )
    known = ", ".join([*PRESETS, "variable"])
    raise ValueError(
        f"unknown link profile {spec!r} (known: {known}; or UP/DOWN/RTT such as "
        "2mbit/8mbit/120ms, or trace:<file>)"
    )


def preset(name: str, seed: int = 0) -> LinkProfile:
    """A link by spec (an alias of :func:`parse_link`, kept for its callers)."""
    return parse_link(name, seed)


def link_label(spec: str) -> str:
    """A short label of a spec for logs: an inline ``table:`` becomes its size."""
    if spec.startswith("table:"):
        return f"trace ({spec.count(';') + 1} steps)"
    return spec[:200]


def assign_links(
    node_ids: Sequence[int], spec: str | Mapping[int, str | LinkProfile], seed: int = 0
) -> dict[int, LinkProfile]:
    """One link per node.

    ``spec`` is a single-link spec (:func:`parse_link`: every node alike;
    ``variable`` gives each node its own seeded trace, a FedScale capacity
    file each node its own client), ``"mix:4g,5g,variable"`` (a seeded random
    choice per node among single-link specs), or a mapping ``{node: spec or
    LinkProfile}``.
    """
    rng = np.random.default_rng(seed)
    out: dict[int, LinkProfile] = {}
    if isinstance(spec, Mapping):
        for i, node in enumerate(node_ids):
            value = spec[node]
            out[node] = (
                value
                if isinstance(value, LinkProfile)
                else parse_link(value, seed + i, i)
            )
        return out
    if spec.startswith("mix:"):
        names = [s.strip() for s in spec[4:].split(",") if s.strip()]
        if not names:
            raise ValueError(f"empty link mix {spec!r}")
        for name in names:  # a bad member fails even if no node draws it
            parse_link(name, seed)
        picks = rng.integers(0, len(names), size=len(node_ids))
        return {
            node: parse_link(names[int(p)], seed + i, i)
            for i, (node, p) in enumerate(zip(node_ids, picks, strict=True))
        }
    return {node: parse_link(spec, seed + i, i) for i, node in enumerate(node_ids)}


# --------------------------------------------------------------------------- devices
@dataclass(frozen=True)
class DeviceProfile:
    """A device's sustained FP32 compute throughput.

    Attributes
    ----------
    name : str
        Label.
    gflops : float
        Sustained GFLOP/s the device reaches on dense float math.
    source : str
        Where the figure comes from.
    """

    name: str
    gflops: float
    source: str


#: Raspberry Pi 4 (seeds' edge): HPL (Linpack) measured about 8 GFLOP/s on all
#: four Cortex-A72 cores under 64-bit Raspberry Pi OS (B. Feiereisen,
#: "Benchmarking the Raspberry Pi 4 with Raspberry Pi OS64", 2022). HPL is
#: FP64; FP32 NEON math is up to twice as fast, so this is conservative.
EDGE_RPI4 = DeviceProfile(
    "rpi4", 8.0, "HPL on Raspberry Pi 4, 4 cores, 64-bit OS (2022)"
)
#: NVIDIA T4 (seeds' cloud, AWS g4dn.xlarge): 8.1 TFLOP/s FP32 peak (NVIDIA T4
#: datasheet). Small models reach a fraction of peak on a GPU; override with a
#: measured figure when it matters.
CLOUD_T4 = DeviceProfile("t4", 8100.0, "NVIDIA T4 datasheet, FP32 peak")


def measure_local_gflops(size: int = 256, repeats: int = 20, threads: int = 1) -> float:
    """This machine's FP32 matrix-multiply GFLOP/s on ``threads`` threads.

    On one thread it is timed in that thread's CPU seconds
    (``time.thread_time``), as the compute it calibrates is measured: another
    process holding the core does not lower it (timed by the wall clock, a
    probe on a machine at load 4 read 39 GFLOP/s where a quiet one reads
    about 170). Several threads are timed by the wall clock.
    """
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=gen)
        b = torch.randn(size, size, generator=gen)
        a @ b  # warm up
        clock = time.thread_time if threads == 1 else time.perf_counter
        start = clock()
        for _ in range(repeats):
            a @ b
        seconds = clock() - start
    finally:
        torch.set_num_threads(old)
    return 2 * size**3 * repeats / seconds / 1e9


# --------------------------------------------------------------------------- clock
@dataclass
class LinkPacer:
    """One direction of one link, frame after frame: when each arrives.

    A link puts one frame on the wire at a time (its transfer, at the
    trace's rate); frames already sent propagate at once (RTT/2 each, plus
    jitter), so a frame sent while another is still in the air only waits
    for the other's transfer, not for its delay. The virtual clock times
    transfers with it, and the stream's real-time mode paces real frames.
    """

    link: LinkProfile
    direction: str
    rng: np.random.Generator | None = None
    free: float = 0.0  # when the wire is free again (s)

    def __post_init__(self) -> None:
        if self.direction not in ("up", "down"):
            raise ValueError(
                f"direction must be 'up' or 'down', not {self.direction!r}"
            )

    def send(self, nbytes: int, ready: float) -> tuple[float, float, float]:
        """Send ``nbytes`` once ``ready``: ``(start, end of transfer, arrival)``."""
        start = max(ready, self.free)
        self.free = start + self.link.transfer_seconds(self.direction, nbytes, start)
        return start, self.free, self.free + self.link.delay_seconds(start, self.rng)


@dataclass(frozen=True)
class Task:
    """One scheduled task: what ran where, from when to when.

    ``held`` is how long the task kept its resource (a transfer holds its
    link for its transfer, not while it propagates); ``None``: all of it.
    """

    name: str
    resource: str
    start: float
    end: float
    held: float | None = None

    @property
    def seconds(self) -> float:
        """Duration."""
        return self.end - self.start

    @property
    def busy(self) -> float:
        """Seconds its resource was busy with it."""
        return self.seconds if self.held is None else self.held


@dataclass
class VirtualClock:
    """An event simulation of edges, links and the cloud.

    Resources are named strings: ``edge:<node>``, ``up:<node>``,
    ``down:<node>``, ``cloud``. :meth:`compute` and :meth:`transfer` schedule
    a task after ``after`` (the end times of what it depends on) and after the
    resource's previous task, and return the task; its ``end`` is when the
    result is available. The caller states the method's real order of events
    through these dependencies, so overlap appears only where it exists.

    Parameters
    ----------
    links : Mapping[int, LinkProfile]
        Each node's link.
    edge_factor, cloud_factor : float (default: 1.0)
        Multipliers from measured seconds to device seconds.
    seed : int (default: 0)
        Seed of the jitter generator.
    """

    links: Mapping[int, LinkProfile]
    edge_factor: float = 1.0
    cloud_factor: float = 1.0
    seed: int = 0
    tasks: list[Task] = field(default_factory=list)
    _free: dict[str, float] = field(default_factory=dict)
    _pacers: dict[str, LinkPacer] = field(default_factory=dict)
    _rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    def _schedule(
        self,
        name: str,
        resource: str,
        after: Iterable[float],
        seconds_at: Callable[[float], float],
    ) -> Task:
        ready = max([0.0, *after])
        start = max(ready, self._free.get(resource, 0.0))
        end = start + seconds_at(start)
        self._free[resource] = end
        task = Task(name, resource, start, end)
        self.tasks.append(task)
        return task

    def compute(
        self,
        resource: str,
        measured_seconds: float,
        after: Iterable[float] = (),
        name: str = "compute",
    ) -> Task:
        """Run ``measured_seconds`` of local compute on an edge or the cloud."""
        factor = self.cloud_factor if resource == "cloud" else self.edge_factor
        return self._schedule(
            name, resource, after, lambda _t: measured_seconds * factor
        )

    def transfer(
        self,
        node: int,
        direction: str,
        nbytes: int,
        after: Iterable[float] = (),
        name: str = "transfer",
    ) -> Task:
        """Send ``nbytes`` over ``node``'s link, ``up`` or ``down``.

        The task ends when the bytes arrive (:class:`LinkPacer`: it holds the
        link for its transfer; its RTT/2 overlaps the next frame's transfer).
        """
        if direction not in ("up", "down"):
            raise ValueError(f"direction must be 'up' or 'down', not {direction!r}")
        resource = f"{direction}:{node}"
        pacer = self._pacers.get(resource)
        if pacer is None:
            pacer = LinkPacer(self.links[node], direction, self._rng)
            self._pacers[resource] = pacer
        start, sent, arrival = pacer.send(nbytes, max([0.0, *after]))
        task = Task(name, resource, start, arrival, held=sent - start)
        self.tasks.append(task)
        return task

    @property
    def now(self) -> float:
        """End of the last task scheduled (the makespan so far)."""
        return max((t.end for t in self.tasks), default=0.0)

    def utilization(self, until: float | None = None) -> dict[str, float]:
        """Busy share of ``[0, until]`` per resource kind (edge, up, down, cloud).

        Per-node resources are averaged over nodes.
        """
        horizon = self.now if until is None else until
        if horizon <= 0:
            return {}
        busy: dict[str, float] = {}
        for task in self.tasks:
            held = min(task.start + task.busy, horizon) - min(task.start, horizon)
            busy[task.resource] = busy.get(task.resource, 0.0) + held
        kinds: dict[str, list[float]] = {}
        for resource, seconds in busy.items():
            kinds.setdefault(resource.split(":")[0], []).append(seconds / horizon)
        return {kind: float(np.mean(shares)) for kind, shares in kinds.items()}


# --------------------------------------------------------------------------- estimator
@dataclass
class BandwidthEstimator:
    """Smoothed observed throughput of an edge's link.

    ``estimate ← (1 − β)·estimate + β·observed`` (an exponentially weighted
    moving average), fed with ``bytes`` and the seconds their transfer took:
    from the virtual clock in simulation, from measured transfer times in
    deployment. The RTT share of the time is removed when ``rtt`` is known.

    Parameters
    ----------
    smoothing : float (default: 0.3)
        β in (0, 1]; larger follows changes faster.
    initial_mbps : float | None (default: None)
        Starting estimate; ``None`` takes the first observation.
    """

    smoothing: float = 0.3
    initial_mbps: float | None = None
    estimate_mbps: float | None = field(init=False, default=None)
    observations: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if not 0 < self.smoothing <= 1:
            raise ValueError(f"smoothing must lie in (0, 1], got {self.smoothing}")
        self.estimate_mbps = self.initial_mbps

    def observe(self, nbytes: int, seconds: float, rtt: float = 0.0) -> float:
        """Add one transfer; return the new estimate in Mbit/s."""
        payload_seconds = seconds - rtt / 2
        if nbytes <= 0 or payload_seconds <= 0:
            return self.estimate_mbps or 0.0
        observed = nbytes * BITS_PER_BYTE / payload_seconds / MEGA
        if self.estimate_mbps is None:
            self.estimate_mbps = observed
        else:
            self.estimate_mbps += self.smoothing * (observed - self.estimate_mbps)
        self.observations += 1
        return self.estimate_mbps


def link_option_check(key: str) -> Callable[[str], bool]:
    """A run-config ``check`` for the link spec under ``key``.

    It parses the spec with the same parser that times the run's links
    (:func:`assign_links`), so the config accepts exactly what the run can use.
    The returned function gives ``True``, or raises :class:`ConfigError`
    naming ``key``, the spec and the parser's reason.
    """

    def check(spec: str) -> bool:
        try:
            assign_links([0], spec)
        except ValueError as err:
            raise ConfigError(key, spec, str(err)) from None
        return True

    return check
