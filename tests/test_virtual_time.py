"""Simulated time (hf_asynclm.virtual_time): results go in where the clock says, the same on every run."""

from __future__ import annotations

import threading
import time

import pytest
from transformers import LogitsProcessorList

from hf_asynclm import AsyncLM, VirtualClock
from hf_asynclm.executor import ToolExecutor
from hf_asynclm.testing import ScriptedPolicy, tiny_llama, tiny_tokenizer

LATENCY = {"slow": 0.5, "fast": 0.05, "mid": 0.2}
RELEASE = threading.Event()


def slow(x: int) -> int:
    """Due late, returns at once.

    Args:
        x: A number.
    """
    return x


def fast(x: int) -> int:
    """Due early, but returns only when released (real time).

    Args:
        x: A number.
    """
    RELEASE.wait(5)
    return x


def mid(x: int) -> int:
    """Due in between.

    Args:
        x: A number.
    """
    return x


def _clock(tpot_s: float = 0.01) -> VirtualClock:
    return VirtualClock(tpot_s, lambda name, args: LATENCY[name])


def test_results_are_held_until_due_and_handed_over_in_due_order() -> None:
    RELEASE.set()
    clock = _clock()
    ex = ToolExecutor([slow, fast, mid], clock=clock)
    try:
        for cid, name in (("s1", "slow"), ("m1", "mid"), ("f1", "fast")):
            ex.submit(cid, f"{name}(x=1)")
        assert ex.wait_all(5)
        assert not ex.has_ready() and ex.pop_ready() == []
        assert sorted(ex.pending_ids()) == ["f1", "m1", "s1"]  # owed, though they returned
        clock.tick(30)  # 0.3 s
        assert [i.call_id for i in ex.pop_ready()] == ["f1", "m1"]
        assert ex.pending_ids() == ["s1"]
        assert ex.wait_ready(5) and clock.now == pytest.approx(0.5)
        assert [i.call_id for i in ex.pop_ready()] == ["s1"] and ex.pending_ids() == []
        assert not ex.wait_ready(0.05)  # nothing owed: no wait, no jump
        ex.submit("bad", "nope()")  # rejected before it ran: due at once
        ex.push_interrupt("user", "hi")
        assert [i.call_id for i in ex.pop_ready()] == ["bad", "user"]
    finally:
        ex.close()


def test_a_trap_waits_for_a_running_call_that_is_due_first() -> None:
    """The clock jumps to a finished result only when no running call is due before it: a tool
    still running in real time but due earlier is waited for, so due order never depends on
    how fast the tools really are."""
    RELEASE.clear()
    clock = _clock()
    ex = ToolExecutor([slow, fast], clock=clock)
    try:
        ex.submit("s1", "slow(x=1)")
        ex.submit("f1", "fast(x=2)")
        threading.Timer(0.2, RELEASE.set).start()
        t0 = time.monotonic()
        assert ex.wait_ready(5)
        assert time.monotonic() - t0 >= 0.15  # waited for fast, in real time
        assert clock.now == pytest.approx(0.05)
        assert [i.call_id for i in ex.pop_ready()] == ["f1"]
        ex.submit("s2", "slow(x=3)")  # written at 0.05: due at 0.55
        clock.tick(3)
        assert ex.wait_ready(5) and clock.now == pytest.approx(0.5)
        assert [i.call_id for i in ex.pop_ready()] == ["s1"]
        assert ex.wait_for(ex.calls[-1], 5) and clock.now == pytest.approx(0.55)
        assert [i.call_id for i in ex.drain_ready()] == ["s2"]
    finally:
        RELEASE.set()
        ex.close()


def _run(alm: AsyncLM, clock: VirtualClock | None, pieces: list[str]):
    tok = alm.tokenizer
    policy = ScriptedPolicy(tok, pieces)
    return alm.generate("Go.", logits_processor=LogitsProcessorList([policy]), max_new_tokens=120, do_sample=False,
                        virtual_clock=clock)


def test_generation_in_simulated_time_is_the_same_on_every_run() -> None:
    """fast() really returns last (after slow), but is due first: in simulated time its result
    goes in first, every time, and where each result goes in follows the tokens written."""
    tok = tiny_tokenizer()
    alm = AsyncLM(tiny_llama(tok), tok, tools=[slow, fast])
    script = [" [CALL] s1 [HEAD] slow(x=1) [END]", " [CALL] f1 [HEAD] fast(x=2) [END]", " [TRAP] [END]", " a", " [TRAP] [END]", " b"]
    runs = []
    for _ in range(2):
        RELEASE.clear()
        threading.Timer(0.3, RELEASE.set).start()
        runs.append(_run(alm, _clock(), script))
    assert runs[0].raw_text == runs[1].raw_text
    assert [i.call_id for i in runs[0].interrupts] == ["f1", "s1"]
    assert runs[0].raw_text.index("[INTR] f1") < runs[0].raw_text.index(" a") < runs[0].raw_text.index("[INTR] s1")
    # on the wall clock slow's result goes in first (fast really takes 0.3 s)
    RELEASE.clear()
    threading.Timer(0.3, RELEASE.set).start()
    wall = _run(alm, None, script)
    assert [i.call_id for i in wall.interrupts][:2] == ["s1", "f1"]


def test_clock_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="tpot_s"):
        VirtualClock(0, lambda n, a: 0.1)
    clock = VirtualClock(0.01, lambda n, a: -1)
    with pytest.raises(ValueError, match="latency"):
        clock.call_latency("x", {})
    clock.advance_to(1.0)
    clock.advance_to(0.5)  # never back
    assert clock.now == 1.0 and "now=1.000s" in repr(clock)


def test_a_call_that_uses_an_earlier_result_runs_after_it_is_due() -> None:
    """``mid(x=s1)`` written at once is due at s1's due time + its own latency, not before s1."""
    RELEASE.set()
    clock = _clock()
    ex = ToolExecutor([slow, mid], clock=clock)
    try:
        ex.submit("s1", "slow(x=1)")
        ex.submit("m1", "mid(x=s1)")
        assert ex.wait_all(5)
        assert ex.wait_ready(5) and clock.now == pytest.approx(0.5)
        assert [i.call_id for i in ex.pop_ready()] == ["s1"]
        assert ex.wait_ready(5) and clock.now == pytest.approx(0.7)
        assert [i.call_id for i in ex.pop_ready()] == ["m1"]
    finally:
        ex.close()


def test_a_result_due_while_its_tool_still_runs_goes_in_where_it_is_due(monkeypatch: pytest.MonkeyPatch) -> None:
    """No trap: the model writes on while fast() (due after 5 tokens) really takes 0.3 s. Its result
    goes in where it is due, as when the tool returns at once: not later because the machine is slow."""
    tok = tiny_tokenizer()
    alm = AsyncLM(tiny_llama(tok), tok, tools=[fast])
    script = [" [CALL] f1 [HEAD] fast(x=2) [END]"] + [" word"] * 40
    RELEASE.set()
    instant = _run(alm, _clock(), script)
    RELEASE.clear()
    threading.Timer(0.3, RELEASE.set).start()
    t0 = time.monotonic()
    late = _run(alm, _clock(), script)
    assert time.monotonic() - t0 >= 0.25  # it did wait for the tool, in real time
    assert [i.call_id for i in instant.interrupts] == ["f1"]
    assert late.raw_text == instant.raw_text
    assert instant.raw_text.index("[INTR] f1") < instant.raw_text.index(" word" * 10)  # due early, went in early
    # with the executor's own bound on that wait reached, it goes on without the result (and logs it)
    monkeypatch.setattr("hf_asynclm.executor.executor.VIRTUAL_SETTLE_TIMEOUT_S", 0.3)
    ex = ToolExecutor([fast], clock=_clock())
    try:
        RELEASE.clear()
        ex.submit("f1", "fast(x=1)")
        ex.virtual_clock.tick(10)
        t0 = time.monotonic()
        assert not ex.has_ready()
        t1 = time.monotonic()
        assert ex.pending_ids() == ["f1"] and not ex.has_ready()
        t2 = time.monotonic()
        assert t2 - t1 < (t1 - t0) / 2  # waited for once, not again at every step
    finally:
        RELEASE.set()
        ex.close()
