"""The data-flow space alone (pure): slot names, bounds, x0 and decode under its constraints."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.dfs import DfsSpace, layers_within
from evomerge.layerpath import Hop, SourceLayer

SOURCES = tuple([SourceLayer("a", i) for i in range(3)] + [SourceLayer("b", i) for i in range(3)])


def space(**kw) -> DfsSpace:
    return DfsSpace(SOURCES, host="a", repeats=2, **kw)


def params_for(sp: DfsSpace, on: set[int], scale: float = 1.0) -> dict[str, float]:
    out = {}
    for k, slot in enumerate(sp.slots):
        out[f"{slot.name}.use"] = 0.5 if k in on else -0.5
        if sp.scales:
            out[f"{slot.name}.scale"] = scale
    return out


def test_slots_bounds_and_x0():
    sp = space()
    assert [s.name for s in sp.slots][:4] == ["r0.a.L00", "r0.a.L01", "r0.a.L02", "r0.b.L00"]
    assert len(sp.slots) == 12 and len(sp.bounds()) == 24
    assert sp.bounds()["r1.b.L02.scale"] == (0.5, 1.5) and sp.bounds()["r1.b.L02.use"] == (-1.0, 1.0)
    assert sp.decode(sp.x0()) == [Hop(0), Hop(1), Hop(2)] == sp.host_path()


def test_decode_order_scales_and_the_ends():
    sp = space()
    # slot 4 is r0.b.L01 (source layer 4), slot 9 is r1.b.L00 (source layer 3)
    hops = sp.decode(params_for(sp, {4, 9}, scale=0.75))
    assert hops == [Hop(0), Hop(4, 0.75), Hop(3, 0.75), Hop(2)]  # host first and last added
    assert space(keep_first=False, keep_last=False).decode(params_for(sp, {4, 9})) == [Hop(4), Hop(3)]
    assert space(scales=False).decode(params_for(space(scales=False), {1})) == [Hop(0), Hop(1), Hop(2)]
    assert space(keep_first=False, keep_last=False).decode(params_for(sp, set())) == [Hop(0)]


def test_max_layers_keeps_the_first_hops_and_the_closing_layer():
    sp = space(max_layers=3)
    every = params_for(sp, set(range(12)), scale=1.25)
    assert sp.decode(every) == [Hop(0, 1.25), Hop(1, 1.25), Hop(2)]  # last slot is b2, so a2 closes
    assert space(max_layers=3, keep_last=False).decode(every) == [Hop(0, 1.25), Hop(1, 1.25), Hop(2, 1.25)]


@settings(max_examples=200, deadline=None)
@given(on=st.sets(st.integers(0, 11)), max_layers=st.one_of(st.none(), st.integers(2, 8)),
       keep_first=st.booleans(), keep_last=st.booleans())
def test_decode_always_respects_the_constraints(on, max_layers, keep_first, keep_last):
    sp = space(max_layers=max_layers, keep_first=keep_first, keep_last=keep_last)
    hops = sp.decode(params_for(sp, on))
    assert 1 <= len(hops) <= (max_layers or 12 + 2)
    if keep_first:
        assert hops[0].layer == 0
    if keep_last:
        assert hops[-1].layer == 2
    assert all(0 <= h.layer < len(SOURCES) for h in hops)


def test_layers_within():
    assert layers_within(1000, 100, 250) == 7
    assert layers_within(1049, 100, 250) == 7 and layers_within(1050, 100, 250) == 8
    assert layers_within(200, 100, 250) == 0
    with pytest.raises(ValueError):
        layers_within(1000, 0, 1)
