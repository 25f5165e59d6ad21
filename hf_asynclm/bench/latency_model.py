"""The paper's latency model (AsyncLM, appendix A) and an ideal-schedule simulator.

Each call ``f`` of a task costs ``G(f)``, the time the model spends writing it (its tokens
times the time per token), and ``E(f)``, the time it takes to execute. With one serial token
stream (one model writing), the closed forms for independent calls are:

- synchronous: write a call, wait for it, repeat: ``L_sync = sum G + sum E``;
- synchronous parallel (OpenAI-style): write all, run them together:
  ``L_sync_parallel = sum G + max E``;
- asynchronous: each call starts as soon as it is written; written longest-first (LPT):
  ``L_async = max_f (E(f) + sum_{g: E(f) <= E(g)} G(g))``.

:func:`ideal_schedule` simulates the three modes on any DAG of calls, with optional fixed
costs (per-request overhead, prefill of injected results, answer tokens), and returns the
total and a per-call timeline. With no fixed costs and independent calls it reproduces the
closed forms exactly.

Example:

```python
>>> from hf_asynclm.bench.latency_model import SimCall, ideal_schedule, l_async_independent, l_sync, l_sync_parallel
>>> G, E = [1.0, 2.0, 3.0], [10.0, 5.0, 1.0]
>>> l_sync(G, E), l_sync_parallel(G, E), l_async_independent(G, E)
(22.0, 16.0, 11.0)
>>> calls = [SimCall(f"c{i}", g, e) for i, (g, e) in enumerate(zip(G, E))]
>>> ideal_schedule(calls, "async").total_s
11.0

```
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

logger = logging.getLogger(__name__)

__all__ = [
    "Mode",
    "MODES",
    "SimCall",
    "CallTimeline",
    "Schedule",
    "l_sync",
    "l_sync_parallel",
    "l_async_independent",
    "ideal_schedule",
    "sim_calls_from_task",
]

Mode = Literal["sync", "sync-parallel", "async"]
#: The three modes, in the order the benchmark reports them.
MODES: tuple[str, ...] = ("sync", "sync-parallel", "async")


# ---------------------------------------------------------------------------------------------
# Closed forms (independent calls)
# ---------------------------------------------------------------------------------------------


def _check_lengths(G: Sequence[float], E: Sequence[float]) -> None:
    if len(G) != len(E):
        raise ValueError(f"G and E differ in length ({len(G)} != {len(E)})")
    if any(x < 0 for x in G) or any(x < 0 for x in E):
        raise ValueError("times must be non-negative")


def l_sync(G: Sequence[float], E: Sequence[float]) -> float:
    """Synchronous calling: ``sum G + sum E``.

    Example:

    ```python
    >>> l_sync([1, 2], [3, 4])
    10

    ```
    """
    _check_lengths(G, E)
    return sum(G) + sum(E)


def l_sync_parallel(G: Sequence[float], E: Sequence[float]) -> float:
    """Synchronous parallel calling: all calls written, then run together: ``sum G + max E``.

    Example:

    ```python
    >>> l_sync_parallel([1, 2], [3, 4])
    7

    ```
    """
    _check_lengths(G, E)
    return sum(G) + (max(E) if E else 0)


def l_async_independent(G: Sequence[float], E: Sequence[float]) -> float:
    """Asynchronous calling of independent calls, written longest-first (LPT).

    ``max_f (E(f) + sum_{g: E(f) <= E(g)} G(g))``: call ``f`` starts once it and every call
    with a longer (or equal) execution time has been written.

    Example:

    ```python
    >>> l_async_independent([1, 2], [3, 4])   # write the 4 first (2), then the 3 (1): max(2+4, 3+3)
    6

    ```
    """
    _check_lengths(G, E)
    best: float = 0
    for e in E:
        best = max(best, e + sum(g for g, e2 in zip(G, E) if e <= e2))
    return best


# ---------------------------------------------------------------------------------------------
# Simulation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimCall:
    """A call for the simulator.

    Attributes:
        call_id: unique id.
        gen_s: G, the time to write the call (its tokens times the time per token).
        exec_s: E, its execution time.
        depends_on: ids of the calls whose results it needs.
        result_tokens: tokens of its result, prefilled when injected
            (``prefill_s_per_token`` each).
    """

    call_id: str
    gen_s: float
    exec_s: float
    depends_on: tuple[str, ...] = ()
    result_tokens: int = 0


@dataclass
class CallTimeline:
    """When one call was written, ran, and when its result was in the model's context."""

    call_id: str
    write_start: float
    write_end: float
    exec_start: float
    exec_end: float
    result_at: float = math.nan


@dataclass
class Schedule:
    """Result of :func:`ideal_schedule`.

    Attributes:
        mode: the mode simulated.
        total_s: end-to-end latency (until the last answer token).
        calls: per-call timelines, by id.
        write_order: ids in the order the model wrote them.
        requests: model requests (1 for async; sync: one more per result; sync-parallel:
            one more per wave).
        idle_s: time the token stream waited for results (traps / blocking waits).
    """

    mode: str
    total_s: float
    calls: dict[str, CallTimeline] = field(default_factory=dict)
    write_order: list[str] = field(default_factory=list)
    requests: int = 1
    idle_s: float = 0.0


def _validate(calls: Sequence[SimCall]) -> dict[str, SimCall]:
    by_id: dict[str, SimCall] = {}
    for c in calls:
        if c.call_id in by_id:
            raise ValueError(f"duplicate call id {c.call_id!r}")
        if c.gen_s < 0 or c.exec_s < 0 or c.result_tokens < 0:
            raise ValueError(f"call {c.call_id!r}: times and token counts must be non-negative")
        by_id[c.call_id] = c
    for c in calls:
        for d in c.depends_on:
            if d not in by_id:
                raise ValueError(f"call {c.call_id!r} depends on unknown call {d!r}")
    return by_id


def ideal_schedule(
    calls: Sequence[SimCall],
    mode: str,
    *,
    request_overhead_s: float = 0.0,
    answer_s: float = 0.0,
    prefill_s_per_token: float = 0.0,
    futures: bool = False,
) -> Schedule:
    """Simulate one serial token stream writing a DAG of calls, in ``sync``, ``sync-parallel`` or ``async`` mode.

    - ``sync``: write a ready call (task order), wait for it, send its result in a new request;
      repeat.
    - ``sync-parallel``: write every ready call (a "wave"), then run them all together and
      wait for all; their results go back in one new request; next wave.
    - ``async``: write the ready call with the longest execution time (LPT) while earlier
      calls run; a call is ready once the results of its dependencies are in the context
      (with ``futures=True``, once its dependencies are *written*: it then runs as soon as
      their results exist, as CML's id references allow). Results are injected at the next
      safe point (after the call being written); with nothing to write the stream traps until
      the next result.

    Args:
        calls: the calls (ids unique, dependencies among them, no cycles).
        mode: ``"sync"``, ``"sync-parallel"`` or ``"async"``.
        request_overhead_s: time to first token of every model request (the first one
            included). Sync modes start a new request per result (sync) or per wave
            (sync-parallel); async runs in one request.
        answer_s: time to write the answer after the last result arrived.
        prefill_s_per_token: prefill cost of each injected result token (all modes).
        futures: async only, see above.

    Returns:
        A :class:`Schedule`.

    Example (a chain a -> b -> c, each written in 1 s and run in 2, 3, 4 s):

    ```python
    >>> chain = [SimCall("a", 1, 2), SimCall("b", 1, 3, ("a",)), SimCall("c", 1, 4, ("b",))]
    >>> [ideal_schedule(chain, m).total_s for m in ("sync", "sync-parallel", "async")]
    [12.0, 12.0, 12.0]
    >>> ideal_schedule(chain, "async", futures=True).total_s
    10.0

    ```
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if futures and mode != "async":
        raise ValueError("futures=True only applies to the async mode")
    if min(request_overhead_s, answer_s, prefill_s_per_token) < 0:
        raise ValueError("fixed costs must be non-negative")
    by_id = _validate(calls)
    if mode == "async":
        sched = _simulate_async(list(calls), by_id, request_overhead_s, prefill_s_per_token, futures)
    else:
        sched = _simulate_sync(list(calls), mode, request_overhead_s, prefill_s_per_token)
    sched.total_s = sched.total_s + answer_s
    logger.debug("%s schedule of %d calls: %.4f s", mode, len(calls), sched.total_s)
    return sched


def _cycle_error(pending: Sequence[SimCall]) -> ValueError:
    return ValueError(f"the call graph has a cycle among {[c.call_id for c in pending]}")


def _simulate_sync(calls: list[SimCall], mode: str, overhead: float, prefill: float) -> Schedule:
    sched = Schedule(mode=mode, total_s=0.0)
    t = overhead
    done: set[str] = set()
    pending = list(calls)
    while pending:
        ready = [c for c in pending if all(d in done for d in c.depends_on)]
        if not ready:
            raise _cycle_error(pending)
        wave = ready if mode == "sync-parallel" else ready[:1]
        for c in wave:
            sched.calls[c.call_id] = CallTimeline(c.call_id, t, t + c.gen_s, math.nan, math.nan)
            sched.write_order.append(c.call_id)
            t += c.gen_s
        start = t
        for c in wave:
            tl = sched.calls[c.call_id]
            tl.exec_start = start
            tl.exec_end = start + c.exec_s
        end = max(sched.calls[c.call_id].exec_end for c in wave)
        sched.idle_s += end - start
        t = end + overhead + prefill * sum(c.result_tokens for c in wave)
        sched.requests += 1
        for c in wave:
            sched.calls[c.call_id].result_at = t
            done.add(c.call_id)
            pending.remove(c)
    sched.total_s = t
    return sched


def _simulate_async(calls: list[SimCall], by_id: Mapping[str, SimCall], overhead: float, prefill: float, futures: bool) -> Schedule:
    sched = Schedule(mode="async", total_s=0.0)
    order = {c.call_id: i for i, c in enumerate(calls)}
    t = overhead
    pending = list(calls)
    written: set[str] = set()
    in_context: set[str] = set()
    running: dict[str, float] = {}  # id -> exec_end, result not injected yet
    while True:
        # safe point: inject every result that has arrived, in completion order (ride-along)
        due = sorted((end, order[cid], cid) for cid, end in running.items() if end <= t)
        if due:
            t += prefill * sum(by_id[cid].result_tokens for _, _, cid in due)
            for _, _, cid in due:
                del running[cid]
                in_context.add(cid)
                sched.calls[cid].result_at = t
        known = written if futures else in_context
        ready = [c for c in pending if all(d in known for d in c.depends_on)]
        if ready:
            c = max(ready, key=lambda x: (x.exec_s, -order[x.call_id]))  # LPT, stable on ties
            write_end = t + c.gen_s
            exec_start = write_end
            if futures and c.depends_on:
                exec_start = max([write_end] + [sched.calls[d].exec_end for d in c.depends_on])
            tl = CallTimeline(c.call_id, t, write_end, exec_start, exec_start + c.exec_s)
            sched.calls[c.call_id] = tl
            sched.write_order.append(c.call_id)
            running[c.call_id] = tl.exec_end
            written.add(c.call_id)
            pending.remove(c)
            t = write_end
            continue
        if running:  # trap: idle until the next result
            nxt = min(running.values())
            if nxt > t:
                sched.idle_s += nxt - t
                t = nxt
            continue
        if pending:
            raise _cycle_error(pending)
        break
    sched.total_s = t
    return sched


# ---------------------------------------------------------------------------------------------
# From tasks
# ---------------------------------------------------------------------------------------------


def _default_call_tokens(body: str) -> int:
    """Rough token count of a CML call block: ~4 characters per token plus 4 marker/id tokens."""
    return max(1, math.ceil(len(body) / 4)) + 4


def sim_calls_from_task(
    task: Any,
    *,
    per_token_s: float,
    exec_s: Mapping[str, float] | None = None,
    count_tokens: Callable[[str], int] | None = None,
    result_tokens: int | Mapping[str, int] = 0,
) -> list[SimCall]:
    """Build :class:`SimCall` s from a :class:`~hf_asynclm.data.tasks.Task`.

    Args:
        task: the task; its planned calls give ids, dependencies and bodies.
        per_token_s: generation time per output token.
        exec_s: execution time per call id; default each call's ``latency_s``.
        count_tokens: tokens of a call body (default: ``len(body)/4 + 4`` for markers and id;
            pass ``lambda b: len(tokenizer(b).input_ids) + 4`` for a real count).
        result_tokens: tokens of each result (one number, or per call id).

    Example:

    ```python
    >>> from hf_asynclm.data.tasks import PlannedCall, Task
    >>> t = Task("t", "synthetic", "chain", [], [], [PlannedCall("a", "f", {}, latency_s=0.3),
    ...          PlannedCall("b", "g", {"x": 1}, ["a"], latency_s=0.1)])
    >>> [(c.call_id, c.depends_on, c.exec_s) for c in sim_calls_from_task(t, per_token_s=0.01)]
    [('a', (), 0.3), ('b', ('a',), 0.1)]

    ```
    """
    count = count_tokens or _default_call_tokens
    out = []
    for c in task.calls:
        if exec_s is not None and c.call_id in exec_s:
            e = float(exec_s[c.call_id])
        elif c.latency_s is not None:
            e = float(c.latency_s)
        else:
            raise ValueError(f"call {c.call_id!r} has no execution time (set latency_s or pass exec_s)")
        rt = result_tokens.get(c.call_id, 0) if isinstance(result_tokens, Mapping) else int(result_tokens)
        out.append(SimCall(c.call_id, count(c.body()) * per_token_s, e, tuple(c.depends_on), rt))
    return out
