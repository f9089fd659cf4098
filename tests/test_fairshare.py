"""Max-min fair bandwidth sharing (moesim.cost.fairshare)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.cost.fairshare import incidence, max_min_rates


def _paths(*links: list[int]) -> list[np.ndarray]:
    return [np.array(p, dtype=np.int64) for p in links]


def _rates(paths: list[list[int]], capacity: list[float]) -> np.ndarray:
    links, a = incidence(_paths(*paths))
    return max_min_rates(a, np.array(capacity, dtype=float)[links])


def test_incidence_matrix() -> None:
    """incidence lists the used links and marks (link, flow) for every link a flow crosses."""
    links, a = incidence(_paths([4, 2], [1], [], [2]))
    np.testing.assert_array_equal(links, [1, 2, 4])
    np.testing.assert_array_equal(a, [[0, 1, 0, 0], [1, 0, 0, 1], [1, 0, 0, 0]])


def test_one_flow_gets_full_capacity() -> None:
    """A single flow on a single link runs at the link's capacity."""
    np.testing.assert_allclose(_rates([[0]], [37.5]), [37.5])


@pytest.mark.parametrize("n", [2, 3, 7])
def test_n_flows_share_equally(n: int) -> None:
    """n flows on one link each get capacity / n."""
    np.testing.assert_allclose(_rates([[0]] * n, [12.0]), [12.0 / n] * n)


def test_flow_limited_by_its_slowest_link() -> None:
    """A lone flow over links of capacity 10, 3 and 8 runs at 3."""
    np.testing.assert_allclose(_rates([[0, 1, 2]], [10.0, 3.0, 8.0]), [3.0])


def test_textbook_max_min_example() -> None:
    """Progressive filling on three links: leftover of a bottleneck goes to the other flows."""
    # links: L0 = 10, L1 = 4, L2 = 6
    # flows: f0 = {L0}, f1 = {L0, L1}, f2 = {L1, L2}, f3 = {L2}
    # fair shares: L0 10/2 = 5, L1 4/2 = 2, L2 6/2 = 3 -> L1 is the bottleneck: f1 = f2 = 2
    # then L0 has 10 - 2 = 8 left for f0 alone, L2 has 6 - 2 = 4 left for f3 alone
    rates = _rates([[0], [0, 1], [1, 2], [2]], [10.0, 4.0, 6.0])
    np.testing.assert_allclose(rates, [8.0, 2.0, 2.0, 4.0])


def test_three_level_example() -> None:
    """Three bottleneck levels: 3 flows on L0 (cap 3), then L1 (cap 5), then L2 (cap 10)."""
    # f0,f1,f2 on L0 (cap 3): 1 each. f2 also on L1 (cap 5) with f3: f3 gets 5 - 1 = 4.
    # f3 also on L2 (cap 10) with f4: f4 gets 10 - 4 = 6.
    rates = _rates([[0], [0], [0, 1], [1, 2], [2]], [3.0, 5.0, 10.0])
    np.testing.assert_allclose(rates, [1.0, 1.0, 1.0, 4.0, 6.0])


def test_local_flows_get_infinite_rate() -> None:
    """Flows crossing no link get an infinite rate and do not disturb the others."""
    rates = _rates([[], [0], []], [5.0])
    assert np.isinf(rates[0]) and np.isinf(rates[2])
    assert rates[1] == pytest.approx(5.0)


def test_no_flows() -> None:
    """No flows give an empty rate vector."""
    links, a = incidence([])
    assert links.shape == (0,)
    assert max_min_rates(a, np.ones(0)).shape == (0,)


def test_zero_capacity_link_stalls_its_flows_only() -> None:
    """Flows over a zero-capacity link get rate 0; a flow elsewhere is unaffected."""
    rates = _rates([[0], [0, 1], [1]], [0.0, 4.0])
    np.testing.assert_allclose(rates, [0.0, 0.0, 4.0])


@st.composite
def network(draw: st.DrawFn) -> tuple[list[list[int]], list[float]]:
    n_links = draw(st.integers(1, 8))
    capacity = draw(st.lists(st.floats(0.5, 100.0), min_size=n_links, max_size=n_links))
    paths = draw(
        st.lists(
            st.lists(st.integers(0, n_links - 1), max_size=4, unique=True),
            min_size=0,
            max_size=12,
        )
    )
    return paths, capacity


@settings(max_examples=200, deadline=None)
@given(net=network())
def test_max_min_properties(net: tuple[list[list[int]], list[float]]) -> None:
    """Rates are feasible and max-min fair: every flow has a saturated link where it is largest."""
    paths, capacity = net
    cap = np.array(capacity)
    rates = _rates(paths, capacity)
    assert rates.shape == (len(paths),)
    load = np.zeros(len(cap))
    for f, p in enumerate(paths):
        if not p:
            assert np.isinf(rates[f])
            continue
        assert np.isfinite(rates[f]) and rates[f] >= 0
        for link in p:
            load[link] += rates[f]
    # feasibility: no link carries more than its capacity
    assert (load <= cap * (1 + 1e-9) + 1e-12).all()
    # max-min fairness: each flow crosses a saturated link on which no flow is faster
    for f, p in enumerate(paths):
        if not p:
            continue
        ok = False
        for link in p:
            saturated = load[link] >= cap[link] * (1 - 1e-9)
            others = [rates[g] for g, q in enumerate(paths) if link in q]
            if saturated and rates[f] >= max(others) * (1 - 1e-9):
                ok = True
        assert ok, f"flow {f} has no bottleneck link"
