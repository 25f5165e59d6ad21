"""Latency model (paper appendix A) and the ideal-schedule simulator."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_asynclm.bench.latency_model import (
    SimCall,
    ideal_schedule,
    l_async_independent,
    l_sync,
    l_sync_parallel,
    sim_calls_from_task,
)
from hf_asynclm.data.tasks import PlannedCall, Task


def _independent(G, E):
    return [SimCall(f"c{i}", g, e) for i, (g, e) in enumerate(zip(G, E))]


# --------------------------------------------------------------------------- closed forms, by hand


def test_closed_forms_by_hand():
    G, E = [1, 2, 3], [10, 5, 1]
    assert l_sync(G, E) == 6 + 16
    assert l_sync_parallel(G, E) == 6 + 10
    # LPT: write E=10 (0-1, done 11), E=5 (1-3, done 8), E=1 (3-6, done 7)
    assert l_async_independent(G, E) == 11


def test_async_closed_form_when_the_last_written_call_dominates():
    # E = [4, 4, 3]: write both 4s (0-2, 2-4; done 6, 8), then the 3 (4-5, done 8)
    G, E = [2, 2, 1], [4, 4, 3]
    assert l_async_independent(G, E) == 8  # ties count each other's G: 4 + (2 + 2)
    assert l_sync(G, E) == 16 and l_sync_parallel(G, E) == 9


def test_async_short_calls_bounded_by_generation():
    # tiny executions: async is barely above the time to write everything
    G, E = [5, 5, 5], [0.1, 0.2, 0.3]
    assert l_async_independent(G, E) == pytest.approx(15.1)
    assert l_sync(G, E) == pytest.approx(15.6)
    assert l_sync_parallel(G, E) == pytest.approx(15.3)


def test_closed_forms_edge_cases():
    assert l_sync([], []) == 0 and l_sync_parallel([], []) == 0 and l_async_independent([], []) == 0
    with pytest.raises(ValueError):
        l_sync([1], [1, 2])
    with pytest.raises(ValueError):
        l_async_independent([1], [-1])


# --------------------------------------------------------------------------- simulator = closed forms


times = st.floats(min_value=0.0, max_value=1.0, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(times, times), min_size=1, max_size=10))
def test_simulation_matches_closed_forms_for_independent_calls(pairs):
    G = [g for g, _ in pairs]
    E = [e for _, e in pairs]
    calls = _independent(G, E)
    assert ideal_schedule(calls, "async").total_s == pytest.approx(l_async_independent(G, E), abs=1e-9)
    assert ideal_schedule(calls, "sync").total_s == pytest.approx(l_sync(G, E), abs=1e-9)
    assert ideal_schedule(calls, "sync-parallel").total_s == pytest.approx(l_sync_parallel(G, E), abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 500)), min_size=1, max_size=8))
def test_async_never_slower_than_sync_parallel_and_integer_exact(pairs):
    G = [g for g, _ in pairs]
    E = [e for _, e in pairs]
    calls = _independent(G, E)
    a = ideal_schedule(calls, "async").total_s
    assert a == l_async_independent(G, E)  # exact on integers
    assert a <= l_sync_parallel(G, E) <= l_sync(G, E)


# --------------------------------------------------------------------------- timelines


def test_async_timeline_lpt_and_trap():
    calls = _independent([1, 2, 3], [10, 5, 1])
    s = ideal_schedule(calls, "async")
    assert s.write_order == ["c0", "c1", "c2"]
    tl = s.calls
    assert (tl["c0"].write_start, tl["c0"].write_end, tl["c0"].exec_start, tl["c0"].exec_end) == (0, 1, 1, 11)
    assert (tl["c1"].write_start, tl["c1"].write_end, tl["c1"].exec_end) == (1, 3, 8)
    assert (tl["c2"].write_start, tl["c2"].write_end, tl["c2"].exec_end) == (3, 6, 7)
    # stream idle from 6 until the last result at 11
    assert s.idle_s == 5 and s.requests == 1
    # c2 ended at 7, while nothing was being written: injected at once
    assert tl["c2"].result_at == 7 and tl["c0"].result_at == 11


def test_async_lpt_reorders_input():
    s = ideal_schedule(_independent([1, 1, 1], [1, 3, 2]), "async")
    assert s.write_order == ["c1", "c2", "c0"]
    assert s.total_s == 4  # max(3+1, 2+2, 1+3)


def test_results_wait_for_the_end_of_a_call_block():
    # c0 (E=1) finishes at 2 while c1 is being written (1-11): injected at 11, its critical section's end
    calls = [SimCall("c0", 1, 1), SimCall("c1", 10, 0.5), SimCall("c2", 1, 0, ("c0",))]
    s = ideal_schedule(calls, "async")
    assert s.write_order == ["c0", "c1", "c2"]
    assert s.calls["c0"].exec_end == 2 and s.calls["c0"].result_at == 11
    assert s.calls["c2"].write_start == 11
    assert s.total_s == 12


def test_sync_parallel_timeline_waves():
    calls = _independent([1, 2], [4, 3])
    s = ideal_schedule(calls, "sync-parallel")
    # both written (0-1, 1-3), both start at 3
    assert [s.calls[c].exec_start for c in ("c0", "c1")] == [3, 3]
    assert s.total_s == 7 and s.requests == 2


def test_sync_timeline():
    s = ideal_schedule(_independent([1, 2], [4, 3]), "sync")
    assert (s.calls["c0"].write_start, s.calls["c0"].exec_end) == (0, 5)
    assert (s.calls["c1"].write_start, s.calls["c1"].exec_end) == (5, 10)
    assert s.total_s == 10 and s.requests == 3 and s.idle_s == 7


# --------------------------------------------------------------------------- DAGs


def test_chain_by_hand():
    chain = [SimCall("a", 1, 2), SimCall("b", 1, 3, ("a",)), SimCall("c", 1, 4, ("b",))]
    for mode in ("sync", "sync-parallel", "async"):
        assert ideal_schedule(chain, mode).total_s == 12, mode  # a chain cannot overlap
    s = ideal_schedule(chain, "async")
    assert (s.calls["b"].write_start, s.calls["c"].write_start) == (3, 7)
    assert s.idle_s == 2 + 3 + 4
    # with futures (book(city=w1)): b and c are written right away and run when their input exists
    f = ideal_schedule(chain, "async", futures=True)
    assert [f.calls[x].write_start for x in "abc"] == [0, 1, 2]
    assert [f.calls[x].exec_start for x in "abc"] == [1, 3, 6]
    assert f.total_s == 10


def test_two_chains_multistep_by_hand():
    # chain A: a1 (G1,E4) -> a2 (G1,E1); chain B: b1 (G1,E2) -> b2 (G1,E2)
    calls = [SimCall("a1", 1, 4), SimCall("a2", 1, 1, ("a1",)), SimCall("b1", 1, 2), SimCall("b2", 1, 2, ("b1",))]
    assert ideal_schedule(calls, "sync").total_s == 4 + 9
    # waves: {a1, b1} written 0-2, run to 6; {a2, b2} written 6-8, run to 10
    sp = ideal_schedule(calls, "sync-parallel")
    assert sp.total_s == 10 and sp.requests == 3
    # async: a1 0-1 (-> 5), b1 1-2 (-> 4), trap, b2 4-5 (-> 7), a2 5-6 (-> 7): 7
    s = ideal_schedule(calls, "async")
    assert s.write_order == ["a1", "b1", "b2", "a2"]
    assert s.calls["b2"].write_start == 4 and s.calls["a2"].write_start == 5
    assert s.total_s == 7


def test_fixed_costs_sync():
    calls = _independent([1, 1], [2, 2])
    s = ideal_schedule(calls, "sync", request_overhead_s=0.5, answer_s=1.0)
    # 0.5 | write 0.5-1.5 | run -3.5 | +0.5 | write 4-5 | run -7 | +0.5 | answer 1
    assert s.total_s == pytest.approx(8.5) and s.requests == 3
    sp = ideal_schedule(calls, "sync-parallel", request_overhead_s=0.5, answer_s=1.0)
    assert sp.total_s == pytest.approx(0.5 + 2 + 2 + 0.5 + 1.0) and sp.requests == 2


def test_fixed_costs_async_prefill():
    calls = [SimCall("c0", 1, 2, result_tokens=10), SimCall("c1", 1, 5, result_tokens=20)]
    s = ideal_schedule(calls, "async", request_overhead_s=0.5, answer_s=1.0, prefill_s_per_token=0.01)
    # 0.5 | c1 0.5-1.5 (-> 6.5) | c0 1.5-2.5 (-> 4.5) | inject c0 4.5-4.6 | inject c1 6.5-6.7 | answer
    assert s.write_order == ["c1", "c0"]
    assert s.calls["c0"].result_at == pytest.approx(4.6) and s.calls["c1"].result_at == pytest.approx(6.7)
    assert s.total_s == pytest.approx(7.7) and s.requests == 1
    # prefill of results also counts in sync modes
    sy = ideal_schedule(calls, "sync", prefill_s_per_token=0.01)
    assert sy.total_s == pytest.approx(1 + 2 + 0.1 + 1 + 5 + 0.2)


def test_validation():
    with pytest.raises(ValueError, match="mode"):
        ideal_schedule([], "parallel")
    with pytest.raises(ValueError, match="duplicate"):
        ideal_schedule([SimCall("a", 1, 1), SimCall("a", 1, 1)], "sync")
    with pytest.raises(ValueError, match="unknown"):
        ideal_schedule([SimCall("a", 1, 1, ("z",))], "async")
    for mode in ("sync", "sync-parallel", "async"):
        with pytest.raises(ValueError, match="cycle"):
            ideal_schedule([SimCall("a", 1, 1, ("b",)), SimCall("b", 1, 1, ("a",))], mode)
    with pytest.raises(ValueError, match="non-negative"):
        ideal_schedule([SimCall("a", -1, 1)], "sync")
    with pytest.raises(ValueError, match="futures"):
        ideal_schedule([], "sync", futures=True)
    empty = ideal_schedule([], "async", answer_s=2.0)
    assert empty.total_s == 2.0 and empty.calls == {}


def test_sim_calls_from_task():
    t = Task("t", "bfcl", "chain", [], [], [
        PlannedCall("c1", "cd", {"folder": "document"}, latency_s=0.2),
        PlannedCall("c2", "mkdir", {"dir_name": "temp"}, ["c1"]),
    ])
    with pytest.raises(ValueError, match="execution time"):
        sim_calls_from_task(t, per_token_s=0.01)
    calls = sim_calls_from_task(t, per_token_s=0.01, exec_s={"c2": 0.1}, count_tokens=lambda body: 10, result_tokens={"c1": 7})
    assert [(c.call_id, c.gen_s, c.exec_s, c.depends_on, c.result_tokens) for c in calls] == [
        ("c1", 0.1, 0.2, (), 7),
        ("c2", 0.1, 0.1, ("c1",), 0),
    ]
    default = sim_calls_from_task(t, per_token_s=0.01, exec_s={"c2": 0.1})
    assert default[0].gen_s == pytest.approx(0.01 * (math.ceil(len('cd(folder="document")') / 4) + 4))
    assert ideal_schedule(calls, "async").total_s == pytest.approx(0.1 + 0.2 + 0.1 + 0.1)
