"""Which codec for which group: a multiple-choice knapsack (seed 004, eq. 2).

Pure numpy; no Flower imports. Eq. 2 sends the top-p fraction of groups by
importance; the seed's knapsack generalises it to a choice among compression
levels within a byte budget. For ``n`` groups and ``m`` options per group,
with importance ``I_i`` (eq. 3), cost ``c_ij`` (bytes) and fidelity ``f_ij``
(fraction of the update kept, see :func:`~tandem.compression.codecs.fidelity`)::

    maximise   Σ_i I_i·f_{i,x_i}      over one option x_i per group
    subject to Σ_i c_{i,x_i} <= budget

Multiple-choice knapsack is NP-hard; this is the classic greedy on the LP
relaxation (Sinha & Zoltners, 1979), vectorized, ``O(N log N)`` in the total
number of options ``N = n·m``:

1. Per group, sort options by cost (then value, descending) and start from the
   cheapest one (``defer``, cost 0, when offered).
2. Per group, keep the upper concave hull of its (cost, value) points; the
   steps along it are *increments* with falling efficiency ``Δvalue/Δcost``.
3. Sort all increments by efficiency and take them in that order while they
   fit; an increment is takeable only if its group's previous one was taken.
   Taking the longest fitting prefix solves the LP relaxation up to one
   fractional increment, so the result is within the largest single option
   value of the optimum.
4. Swap: if the first increment that did not fit is worth more than the least
   efficient taken increments (of other groups) that would make room for it,
   take it in their place.
5. Fill: with the bytes left, upgrade groups to any option (hull or not) whose
   extra cost fits, largest value gain first.

Steps 1-2 are done once per set of groups that sort and climb alike (groups
of one size share their costs; with one fidelity per option their values
differ by ``I_i`` only), each such row checked to pass the same comparisons
(:func:`_sorted_hulls`), so that they cost a few passes over the ``n × m``
table; when they all do (one group size), only each row's valid increments
are formed, and the fill is skipped when no option costs between 1 and the
bytes left more than a chosen one. The budget is never exceeded (integer
arithmetic on costs). The scans of steps 3 and 5 are one compiled loop
(:func:`~tandem.compression.kernels.scan`). Speed: about 3.5 ms for 16,000
groups × 7 options (``tandem bench codecs``, 4M parameters), on one CPU
core, a quarter of it the sort of the increments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Selection", "select_options"]

#: Rows done as templates of rows that sort and climb alike (:func:`_sorted_hulls`).
_TEMPLATES = 8


@dataclass(frozen=True)
class Selection:
    """The options chosen for every group.

    Attributes
    ----------
    choice : np.ndarray
        Shape ``(n,)``, int64: the column of the option chosen for each group.
    cost : int
        ``Σ_i costs[i, choice[i]]`` in bytes, never above ``budget``.
    value : float
        ``Σ_i importance[i]·fidelity[i, choice[i]]``.
    budget : int
        The byte budget the choice was made under.
    """

    choice: np.ndarray
    cost: int
    value: float
    budget: int


def _check_inputs(
    importance: np.ndarray, costs: np.ndarray, fidelity: np.ndarray, budget: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    costs = np.asarray(costs)
    if costs.ndim != 2 or costs.shape[1] == 0:
        raise ValueError(f"costs must have shape (n, m) with m >= 1, got {costs.shape}")
    n, m = costs.shape
    if np.issubdtype(costs.dtype, np.floating):
        if not np.isfinite(costs).all() or (costs != np.floor(costs)).any():
            raise ValueError("costs must be whole numbers of bytes")
    elif not np.issubdtype(costs.dtype, np.integer) and costs.size:
        raise ValueError(f"costs must be integers (bytes), got dtype {costs.dtype}")
    costs = costs.astype(np.int64)
    if costs.size and costs.min() < 0:
        raise ValueError("costs must be >= 0")
    importance = np.asarray(importance, dtype=np.float64)
    if importance.shape != (n,):
        raise ValueError(f"importance must have shape ({n},), got {importance.shape}")
    if not np.isfinite(importance).all() or (importance < 0).any():
        raise ValueError("importance must be finite and >= 0")
    fidelity = np.asarray(fidelity, dtype=np.float64)
    if fidelity.shape not in ((m,), (n, m)):
        raise ValueError(f"fidelity must have shape ({m},) or ({n}, {m})")
    if not np.isfinite(fidelity).all():
        raise ValueError("fidelity must be finite")
    if isinstance(budget, bool) or not isinstance(budget, int | np.integer):
        raise ValueError(f"budget must be an integer number of bytes, got {budget!r}")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    return importance, costs, np.broadcast_to(fidelity, (n, m)), int(budget)


def _upper_hulls(cost: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the upper concave hull of rising (cost, value) points.

    ``cost`` and ``value`` are ``(n, m)``, each row sorted by cost ascending and
    value descending. Returns ``hull`` (``(n, m)`` column indices, the first
    ``length[i]`` valid in row ``i``, costs and values strictly rising) and
    ``length``. Monotone chain, vectorized over rows; each point is pushed and
    popped at most once.
    """
    n, m = cost.shape
    rows = np.arange(n)
    hull = np.zeros((n, m), dtype=np.int64)  # column 0 starts every hull
    length = np.ones(n, dtype=np.int64)
    for j in range(1, m):
        cp, vp = cost[:, j], value[:, j]
        # a point no higher than the hull's last (hence costlier) is dominated
        push = np.flatnonzero(vp > value[rows, hull[rows, length - 1]])
        # pop hull points strictly below the segment from the one before to p
        cand = push[length[push] >= 2]
        while cand.size:
            a = hull[cand, length[cand] - 2]
            b = hull[cand, length[cand] - 1]
            ca, va = cost[cand, a], value[cand, a]
            cb, vb = cost[cand, b], value[cand, b]
            below = (vb - va) * (cp[cand] - ca) < (vp[cand] - va) * (cb - ca)
            cand = cand[below]
            length[cand] -= 1
            cand = cand[length[cand] >= 2]
        hull[push, length[push]] = j
        length[push] += 1
    return hull, length


def _row_hull(
    cost: np.ndarray, value: np.ndarray
) -> tuple[list[int], list[tuple[int, int, int, bool]]]:
    """:func:`_upper_hulls` of one row, and the tests it made on the way.

    Each test is ``(a, b, p, outcome)``: with ``a == -1``, "is ``p`` above
    the hull's last point ``b``"; else "is ``b`` strictly below the segment
    from ``a`` to ``p``" (the same arithmetic as :func:`_upper_hulls`).
    """
    hull, tests = [0], []
    for p in range(1, cost.size):
        above = bool(value[p] > value[hull[-1]])
        tests.append((-1, hull[-1], p, above))
        if not above:
            continue
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            below = bool(
                (value[b] - value[a]) * (cost[p] - cost[a])
                < (value[p] - value[a]) * (cost[b] - cost[a])
            )
            tests.append((a, b, p, below))
            if not below:
                break
            hull.pop()
        hull.append(p)
    return hull, tests


def _sorted_hulls(
    costs: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Steps 1-2 of :func:`select_options`: ``order`` (each row's options by
    cost ascending, value descending, ties by column: a stable
    ``np.lexsort``), ``cost_s`` and ``value_s`` in that order, and
    :func:`_upper_hulls` of them (``hull``, ``length``).

    Groups of one size share their costs, and with one fidelity per option
    their values differ by the factor ``I_i`` only, so most rows sort and
    climb alike. A row (the first one left) is done alone as a template;
    every row with the same costs whose values pass the same comparisons
    (the sort's between neighbours of equal cost, each test of the hull's
    monotone chain, :func:`_row_hull`) has the same order and hull, as the
    per-row computation would find them. Up to :data:`_TEMPLATES` templates;
    the rows left are sorted and climbed per row.
    """
    n, m = costs.shape
    order = np.empty((n, m), dtype=np.int64)
    cost_s = np.empty((n, m), dtype=np.int64)
    value_s = np.empty((n, m), dtype=values.dtype)
    hull = np.zeros((n, m), dtype=np.int64)
    length = np.empty(n, dtype=np.int64)
    todo = np.arange(n)
    for _ in range(_TEMPLATES):
        if not todo.size:
            break
        first = int(todo[0])
        row_order = np.lexsort((-values[first], costs[first]))
        row_cost = costs[first, row_order]
        row_hull, tests = _row_hull(row_cost, values[first, row_order])
        if todo.size == n:
            vs = values[:, row_order]
            alike = costs == costs[first]
            # one group size: every row alike, found without a per-row pass
            same = np.ones(n, dtype=bool) if alike.all() else alike.all(axis=1)
        else:
            vs = values[todo][:, row_order]
            same = (costs[todo] == costs[first]).all(axis=1)
        for q in range(m - 1):
            if row_cost[q] == row_cost[q + 1]:
                left, right = vs[:, q], vs[:, q + 1]
                if row_order[q] < row_order[q + 1]:
                    same &= left >= right
                else:
                    same &= left > right
        for a, b, p, outcome in tests:
            if a < 0:
                result = vs[:, p] > vs[:, b]
            else:
                result = (vs[:, b] - vs[:, a]) * (row_cost[p] - row_cost[a]) < (
                    vs[:, p] - vs[:, a]
                ) * (row_cost[b] - row_cost[a])
            same &= result == outcome
        if todo.size == n and same.all():  # every row alike (one group size)
            padded = np.zeros(m, dtype=np.int64)
            padded[: len(row_hull)] = row_hull
            return (
                np.broadcast_to(row_order, (n, m)),
                np.broadcast_to(row_cost, (n, m)),
                vs,
                np.broadcast_to(padded, (n, m)),
                np.full(n, len(row_hull), dtype=np.int64),
            )
        rows = todo[same]
        order[rows] = row_order
        cost_s[rows] = row_cost
        value_s[rows] = vs[same]
        hull[rows, : len(row_hull)] = row_hull
        length[rows] = len(row_hull)
        todo = todo[~same]
    if todo.size:  # one row at a time
        rest = np.lexsort((-values[todo], costs[todo]), axis=1)
        order[todo] = rest
        cost_s[todo] = np.take_along_axis(costs[todo], rest, axis=1)
        value_s[todo] = np.take_along_axis(values[todo], rest, axis=1)
        hull[todo], length[todo] = _upper_hulls(cost_s[todo], value_s[todo])
    return order, cost_s, value_s, hull, length


def _scan(
    group: np.ndarray, dc: np.ndarray, room: int, n: int
) -> tuple[np.ndarray, int]:
    """Take items in list order while they fit; a group stops at its first miss.

    Items are listed in the order to consider them, a group's items in its own
    order (groups ``0 … n−1``). An item is taken if every earlier item of its
    group was taken and its cost ``dc`` fits in what is left. Returns the
    taken mask and the room left: one compiled loop
    (:func:`~tandem.compression.kernels.scan`).
    """
    from tandem.compression.kernels import scan  # numba: when first used

    return scan(group, dc, room, n)


def _stable_argsort(key: np.ndarray) -> np.ndarray:
    """``np.argsort(key, kind="stable")``: a plain (SIMD) sort when ``key`` has
    no ties, where every sort gives the same order; the stable one otherwise."""
    order = np.argsort(key)
    ordered = key[order]
    if np.isnan(ordered[-1:]).any() or (ordered[1:] == ordered[:-1]).any():
        return np.argsort(key, kind="stable")
    return order


def _increments(
    cost_s: np.ndarray, value_s: np.ndarray, hull: np.ndarray, length: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 3 of :func:`select_options`: every hull increment ``(group, cost,
    value)``, by efficiency ``Δvalue/Δcost`` falling (ties: group, then
    position along the hull)."""
    m = cost_s.shape[1]
    hull_cost = np.take_along_axis(cost_s, hull, axis=1)
    hull_value = np.take_along_axis(value_s, hull, axis=1)
    valid = np.arange(1, m) < length[:, None]  # (n, m-1): increment t -> t+1
    d_cost = np.diff(hull_cost, axis=1)
    d_value = np.diff(hull_value, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        eff = np.where(valid, d_value / np.where(valid, d_cost, 1), -np.inf)
    # efficiencies fall along a hull; enforce it against rounding so that the
    # global order below never lists an increment before its predecessor
    # (np.minimum.accumulate along each row, a column at a time)
    for t in range(1, m - 1):
        np.minimum(eff[:, t - 1], eff[:, t], out=eff[:, t])
    flat = np.flatnonzero(valid)  # (group, position) order, so a stable sort
    # on efficiency alone breaks its ties by group, then position
    flat = flat[_stable_argsort(-eff.ravel()[flat])]
    return flat // max(m - 1, 1), d_cost.ravel()[flat], d_value.ravel()[flat]


def _shared_increments(
    row_cost: np.ndarray, value_s: np.ndarray, row_hull: np.ndarray, length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_increments` when every row has the same order, costs
    ``row_cost`` ``(m,)`` and hull ``row_hull[:length]``: only the ``length −
    1`` valid increments of each row are formed (the same numbers, in the
    same order)."""
    steps = int(length) - 1
    if steps < 1:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    points = row_hull[: steps + 1]
    d_cost = np.diff(row_cost[points])  # (steps,)
    d_value = np.diff(value_s[:, points], axis=1)  # (n, steps)
    eff = d_value / d_cost  # hull costs rise strictly: no division by 0
    for t in range(1, steps):  # as _increments: efficiencies fall along a hull
        np.minimum(eff[:, t - 1], eff[:, t], out=eff[:, t])
    flat = _stable_argsort(-eff.ravel())  # (group, position) order, as there
    position = flat % steps
    return flat // steps, d_cost[position], d_value.ravel()[flat]


def _shared_upgrades(
    value_s: np.ndarray, row_cost: np.ndarray, choice_s: np.ndarray, room: int
) -> tuple[np.ndarray, np.ndarray]:
    """Step 5's best affordable upgrade per group when every row has the
    sorted costs ``row_cost`` ``(m,)``: ``(best, gain)``, ``(n,)`` each, the
    column and its value gain (0 and 0.0 where none gains).

    The general step takes ``value_s[i, j] − value_s[i, c_i]`` over every
    column, zeroes the gains that are not positive or cost more than
    ``room`` bytes extra, and takes each row's first largest. An option
    costing no more than the chosen one has no more value (it comes before
    it in the sorted order), so only the columns costing 1 to ``room`` bytes
    more than the chosen column ``c`` can gain: they are the same for every
    row that chose ``c``, and only those are formed, with the same numbers
    and the same first largest.
    """
    n = choice_s.size
    best = np.zeros(n, dtype=np.int64)
    gain = np.zeros(n, dtype=value_s.dtype)
    for c in np.flatnonzero(np.bincount(choice_s, minlength=row_cost.size)).tolist():
        extra = row_cost - row_cost[c]
        cols = np.flatnonzero((extra > 0) & (extra <= room))
        if not cols.size:
            continue
        rows = np.flatnonzero(choice_s == c)
        gains = value_s[rows][:, cols] - value_s[rows, c][:, None]
        np.maximum(gains, 0.0, out=gains)
        top = np.argmax(gains, axis=1)
        best[rows] = cols[top]
        gain[rows] = gains[np.arange(rows.size), top]
    return best, gain


def select_options(
    importance: np.ndarray,
    costs: np.ndarray,
    fidelity: np.ndarray,
    *,
    budget: int,
) -> Selection:
    """Choose one option per group to maximise kept importance within a budget.

    Parameters
    ----------
    importance : np.ndarray
        Shape ``(n,)``, ``I_i >= 0`` (eq. 3).
    costs : np.ndarray
        Shape ``(n, m)``, whole bytes ``>= 0`` (e.g. from
        :func:`~tandem.compression.codecs.option_table`).
    fidelity : np.ndarray
        Shape ``(m,)`` (same for every group) or ``(n, m)``: fraction of the
        update each option keeps.
    budget : int
        Bytes available (:func:`~tandem.compression.budget.byte_budget`).

    Returns
    -------
    Selection
        ``cost <= budget`` always. With values ``I·f >= 0``, ``value >=
        optimum − max_ij I_i·f_ij``; on small random instances it is usually the
        optimum.

    Raises
    ------
    ValueError
        If shapes disagree, costs are negative or fractional, importance is
        negative or not finite, fidelity is not finite, the budget is negative,
        or even the cheapest option of every group does not fit (offer a
        zero-cost ``defer`` option to make every budget feasible).
    """
    importance, costs, fidelity, budget = _check_inputs(
        importance, costs, fidelity, budget
    )
    n = costs.shape[0]
    values = importance[:, None] * fidelity
    if n == 0:
        return Selection(np.zeros(0, dtype=np.int64), 0, 0.0, budget)
    rows = np.arange(n)

    # 1. per group: options by cost ascending, value descending
    # 2. per group: upper concave hull, increments between its points
    order, cost_s, value_s, hull, length = _sorted_hulls(costs, values)
    base = int(cost_s[:, 0].sum())
    if base > budget:
        raise ValueError(
            f"budget {budget} is below the cheapest choice ({base} bytes); "
            "offer a zero-cost option"
        )
    # 3. all increments by efficiency (ties: group, then position), in order
    shared = hull.strides[0] == 0  # one order and hull for every row
    if shared:
        group, inc_cost, inc_value = _shared_increments(
            cost_s[0], value_s, hull[0], int(length[0])
        )
    else:
        group, inc_cost, inc_value = _increments(cost_s, value_s, hull, length)
    taken, room = _scan(group, inc_cost, budget - base, n)

    # 4. swap in the first increment that missed, if worth what it displaces
    missed = np.flatnonzero(~taken)
    if missed.size:
        b = missed[0]
        drop = np.flatnonzero(taken & (group != group[b]))[::-1]
        freed = np.cumsum(inc_cost[drop])
        k = int(np.searchsorted(freed, inc_cost[b] - room))
        if k < drop.size and inc_value[b] > inc_value[drop[: k + 1]].sum():
            taken[drop[: k + 1]] = False
            taken[b] = True
            room += int(freed[k]) - int(inc_cost[b])
    level = np.bincount(group[taken], minlength=n)  # hull points climbed
    choice_s = hull[0][level] if shared else hull[rows, level]

    # 5. fill: best affordable upgrade per group, largest value gain first
    # (with a shared hull, only the few columns that can gain are formed)
    if shared:
        best, best_gain = _shared_upgrades(value_s, cost_s[0], choice_s, room)
        extra_best = cost_s[0][best] - cost_s[0][choice_s]
    else:
        gain = value_s - value_s[rows, choice_s][:, None]
        extra = cost_s - cost_s[rows, choice_s][:, None]
        gain = np.where((gain > 0) & (extra <= room), gain, 0.0)
        best = np.argmax(gain, axis=1)
        best_gain = gain[rows, best]
        extra_best = extra[rows, best]
    cand = np.flatnonzero(best_gain > 0)
    if cand.size:
        cand = cand[np.lexsort((cand, -best_gain[cand]))]
        up, room = _scan(cand, extra_best[cand], room, n)
        choice_s[cand[up]] = best[cand[up]]

    choice = order[0][choice_s] if shared else order[rows, choice_s]
    return Selection(
        choice=choice,
        cost=int(costs[rows, choice].sum()),
        value=float(values[rows, choice].sum()),
        budget=budget,
    )
