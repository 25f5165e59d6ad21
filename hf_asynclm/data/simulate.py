"""Simulated CML traces for training (AsyncLM paper, section 4).

For each task (a DAG of calls, :class:`~hf_asynclm.data.tasks.Task`) the simulator plays what
an ideal model would write while the calls run, in simulated time, and records it as a
**trace**: the model's text cut into segments, with the interrupts the runtime injects in
between. Three modes, from the same sampled timings so that they compare fairly:

``async``
    The model writes every call it can (inputs available), longest expected time first (the
    LPT rule), then writes the answer sentences whose results have arrived, and writes a trap
    ``[TRAP] [END]`` only when nothing is writable and some call is still running. A call
    starts when its ``[END]`` is written and completes ``exec_ms`` later; its interrupt goes in
    at the first **safe point** at or after that time: between two atoms of model text, where
    an atom is a call or trap block, or a word (text is cut only before a space, or right
    after a block's ``[END]``). Never inside a block. Interrupts ready at the same point go in
    together, in completion order. After an interrupt the model finishes the sentence it was
    writing, then writes the calls the result made possible (LPT), then more answer text.
    With ``interrupt_at="sentence"`` the results are **paced**: one at a time, right after a
    block's ``[END]`` or after a word that ends a sentence, and only once the model has ended a
    sentence (or written a trap) since the previous one; after each, the model writes the calls
    it can (LPT), then the sentence of that result. The sentence's result is then always the
    nearest one in context. Nor does a result go in inside a **burst of calls**: after a call's
    ``[END]``, while another call is writable, the model writes it first; the result goes in after
    the burst's last call (the runtime's ``interrupt_at="sentence"`` follows the same rules: it
    looks ahead at the model's next token).
``sync``
    Calls one by one (same LPT-topological order); after each call's ``[END]`` the model waits
    for its result, which is injected right there. The answer comes after the last result.
``sync-parallel``
    Waves: every call whose inputs are available is written (LPT order), then a trap; the
    wave's calls start at the trap and all their results are injected together (completion
    order) when the last one finishes. The answer comes after the last wave.

Timing, per task (seeded by ``seed`` and the task id; shared by the three modes):

* time per output token ``tpot_ms`` ~ U(5, 30) ms (``tpot_range_ms`` changes the range: a slow
  decoder, e.g. a 270M model on a CPU at ~90 ms per token, sees results arrive while it is
  still writing the other calls); tokens are counted with the tokenizer
  passed (each atom separately), or as about one token per 4 characters (at least one per
  atom). Injected tokens cost no time (the runtime prefills them in the same forward pass as
  the next decode step, the "ride-along").
* **Expected** time of a call: the per-call time the source put in the prompt
  (``PlannedCall.latency_s``, e.g. BFCL's cheat sheet), else its tool's ``"x-latency-ms"``
  (the prompt shows it), else a random 1-1000 ms (``latency_range_ms`` changes the range)
  that is then written into the tool schema, so the prompt always shows it. **The LPT rule
  uses the expected time: what the model can read in its prompt, never the hidden sampled
  time.**
* **Execution** time: the per-call time itself when the source gave one (the cheat sheet
  is exact); otherwise the expected time times U(1 - jitter, 1 + jitter) (default 0.25),
  clipped to 1-1000 ms, so results do not always arrive in expected order.

Optional user interrupts (async only, off by default, ``user_interrupt_rate``): when a task
has ``meta["followup"]`` (synthetic tasks do), a ``[INTR] user [HEAD] Also ... [END]`` arrives
at a random time after the first call; its calls and answer sentence join the plan.

Output: one dict per trace, in the JSONL format the trainer and the runtime share (see
:func:`simulate`); :func:`check_trace` verifies the rules above on a trace;
:func:`trace_mask_spans` says which text is trained; :func:`build_dataset` writes a JSONL file.

Example:

```python
>>> from hf_asynclm.data.synthetic import generate_tasks
>>> from hf_asynclm.data.simulate import check_trace, simulate
>>> task = generate_tasks(1, seed=3, shapes=["parallel"])[0]
>>> ex = simulate(task, "async", seed=0)
>>> ex["segments"][0]["role"], ex["segments"][1]["role"]
('model', 'inject')
>>> check_trace(ex)
[]
>>> sim = {m: simulate(task, m, seed=0)["meta"]["sim_latency_ms"] for m in ("async", "sync", "sync-parallel")}
>>> sim["async"] <= sim["sync-parallel"] <= sim["sync"]
True

```
"""

from __future__ import annotations

import copy
import functools
import json
import math
import random
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..cml import (
    CALL,
    END,
    Block,
    INTR,
    PACED_INTERRUPT_AT,
    TRAP,
    USER_ID,
    CMLParser,
    ends_sentence,
    format_call,
    format_interrupt,
    format_trap,
    parse_blocks,
    serialize_result,
)
from .tasks import PlannedCall, Task

__all__ = [
    "GENERIC_RESULTS",
    "MODES",
    "SIM_INTERRUPT_AT",
    "TokenCounter",
    "build_dataset",
    "check_latency_range",
    "check_trace",
    "default_result",
    "ends_sentence",
    "example_length",
    "generic_result",
    "sample_latency_ms",
    "simulate",
    "simulate_task",
    "split_atoms",
    "trace_mask_spans",
]

#: The three trace modes.
MODES: tuple[str, ...] = ("async", "sync", "sync-parallel")

_EPS = 1e-6

#: Where the simulator puts results in async traces (``simulate(interrupt_at=...)``): ``"word"``,
#: or ``"sentence"`` for paced traces (the runtime's ``interrupt_at="sentence"`` follows the same
#: rule): one result at a time, right after a block's ``[END]`` or after a word that ends a
#: sentence, and only once the model has ended a sentence (or written a trap) since the previous one.
SIM_INTERRUPT_AT: tuple[str, ...] = ("word", "sentence", "sentence-eager")


def _check_interrupt_at(value: str) -> None:
    if value not in SIM_INTERRUPT_AT:
        raise ValueError(f"unknown interrupt_at {value!r}; choose from {SIM_INTERRUPT_AT}")


_OPENERS = (CALL, TRAP, INTR)


def sample_latency_ms(rng: random.Random, low: float = 1.0, high: float = 1000.0, exact: bool = False) -> int:
    """A random expected latency in ``[low, high]`` ms, rounded the way a prompt shows it
    (to 10 ms above 100 ms), or with ``exact=True`` to the millisecond (``~387ms``: measured
    latencies, and the BFCL cheat sheets of ``hf-asynclm eval``, are not round). The value
    stays within the range (and at least 1 ms).

    >>> import random
    >>> sample_latency_ms(random.Random(0)), sample_latency_ms(random.Random(0), exact=True)
    (840, 845)
    """
    v = rng.uniform(low, high)
    shown = round(v) if exact or v < 100 else round(v, -1)
    # rounding to 10 ms may step past an end of the range (110 from 95-107): keep it inside
    return int(max(1, min(max(shown, math.ceil(low)), math.floor(high))))


# ---------------------------------------------------------------------------------------------
# Token counting and atoms
# ---------------------------------------------------------------------------------------------


class TokenCounter:
    """Counts tokens of model text: with ``tokenizer`` (no special tokens added), or about one
    token per 4 characters (at least one)."""

    def __init__(self, tokenizer: Any | None = None) -> None:
        self.tokenizer = tokenizer
        self.name = "approx" if tokenizer is None else "tokenizer"
        self._cache: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        n = self._cache.get(text)
        if n is None:
            if self.tokenizer is None:
                n = max(1, (len(text) + 2) // 4)
            else:
                n = max(1, len(self.tokenizer(text, add_special_tokens=False)["input_ids"]))
            if len(self._cache) < 100_000:
                self._cache[text] = n
        return n


def split_atoms(text: str) -> list[str]:
    """Cut model text at its safe points: before every space outside a block, and right after
    every block's ``[END]``. Blocks are never cut.

    ```python
    >>> split_atoms('[CALL] w1 [HEAD] get_weather(city="New York") [END] Paris: 18 C.')
    ['[CALL] w1 [HEAD] get_weather(city="New York") [END]', ' Paris:', ' 18', ' C.']

    ```
    """
    points = [0]
    i, n, in_block = 0, len(text), False
    while i < n:
        if not in_block and text.startswith(_OPENERS, i):
            in_block = True
            i += len(CALL)
            continue
        if in_block:
            if text.startswith(END, i):
                in_block = False
                i += len(END)
                points.append(i)
                continue
        elif text[i] == " ":
            points.append(i)
        i += 1
    points.append(n)
    return [text[a:b] for a, b in zip(points, points[1:]) if b > a]


# ---------------------------------------------------------------------------------------------
# Timing and results
# ---------------------------------------------------------------------------------------------


def _tool_map(tools: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for t in tools:
        f = t["function"] if "function" in t else t
        out[f["name"]] = f
    return out


DEFAULT_TPOT_RANGE_MS: tuple[float, float] = (5.0, 30.0)
DEFAULT_LATENCY_RANGE_MS: tuple[float, float] = (1.0, 1000.0)
MAX_LATENCY_MS = 60_000.0


def check_latency_range(latency_range_ms: Sequence[float]) -> tuple[float, float]:
    """``(low, high)`` expected call latency in ms as floats; ``ValueError`` unless
    ``1 <= low <= high <= 60000``.

    >>> check_latency_range((30, 500))
    (30.0, 500.0)
    """
    try:
        low, high = (float(v) for v in latency_range_ms)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"latency_range_ms must be two numbers (low, high), got {latency_range_ms!r}") from exc
    if not 1.0 <= low <= high <= MAX_LATENCY_MS:
        raise ValueError(
            f"latency_range_ms must satisfy 1 <= low <= high <= {MAX_LATENCY_MS:.0f}, got ({low}, {high})"
        )
    return low, high


def check_tpot_range(tpot_range_ms: Sequence[float]) -> tuple[float, float]:
    """``(low, high)`` ms per token as floats; ``ValueError`` unless ``0 < low <= high``."""
    try:
        low, high = (float(v) for v in tpot_range_ms)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"tpot_range_ms must be two numbers (low, high), got {tpot_range_ms!r}") from exc
    if not 0.0 < low <= high:
        raise ValueError(f"tpot_range_ms must satisfy 0 < low <= high, got ({low}, {high})")
    return low, high


def _timing(
    task: Task,
    seed: int,
    jitter: float,
    tpot_range_ms: Sequence[float] = DEFAULT_TPOT_RANGE_MS,
    latency_range_ms: Sequence[float] = DEFAULT_LATENCY_RANGE_MS,
) -> dict[str, Any]:
    """Sampled timing of a task: tools with latencies, expected and execution time per call."""
    low, high = check_tpot_range(tpot_range_ms)
    lat_low, lat_high = check_latency_range(latency_range_ms)
    exec_cap = max(DEFAULT_LATENCY_RANGE_MS[1], lat_high)
    rng = random.Random(f"sim:{seed}:{task.task_id}")
    tpot = round(rng.uniform(low, high), 2)  # one draw whatever the range: the rest is unchanged
    tools = copy.deepcopy(task.tools)
    fmap = _tool_map(tools)
    for f in fmap.values():
        if f.get("x-latency-ms") is None:
            f["x-latency-ms"] = sample_latency_ms(rng, lat_low, lat_high)
    followup = (task.meta or {}).get("followup") or {}
    calls = list(task.calls) + [PlannedCall(**c) for c in followup.get("calls", [])]
    expected: dict[str, float] = {}
    exec_ms: dict[str, float] = {}
    for c in calls:
        jit = rng.uniform(1.0 - jitter, 1.0 + jitter)  # drawn for every call: stable sampling
        if c.latency_s is not None:
            expected[c.call_id] = exec_ms[c.call_id] = round(float(c.latency_s) * 1000.0, 1)
            continue
        f = fmap.get(c.name)
        if f is None:  # a call to a tool the prompt does not list: invent a latency
            f = {"name": c.name, "x-latency-ms": sample_latency_ms(rng, lat_low, lat_high)}
            fmap[c.name] = f
        expected[c.call_id] = float(f["x-latency-ms"])
        exec_ms[c.call_id] = round(min(exec_cap, max(1.0, expected[c.call_id] * jit)), 1)
    return {
        "rng": rng,
        "tpot": tpot,
        "tools": tools,
        "expected": expected,
        "exec": exec_ms,
        "user_u": rng.random(),
        "user_draw": rng.random(),
    }


#: How the simulator shapes the results of tools it has no implementation of (BFCL's):
#: ``"code"``, always ``{"result": "<code>"}``; ``"varied"``, one of :data:`VARIED_RESULT_SHAPES`
#: per call, so that a model learns to go on after results of any shape. Neither uses the keys
#: ``"status"`` or ``"id"``: the evaluation's default BFCL result (``{"status": "ok", "id":
#: "r12345"}``, :func:`hf_asynclm.evaluation.bfcl_result`) stays a shape no trace holds.
GENERIC_RESULTS: tuple[str, ...] = ("code", "varied")

#: The shapes ``generic_results="varied"`` draws from (``{code}`` stands for the call's code).
VARIED_RESULT_SHAPES: tuple[str, ...] = (
    '{"result": "{code}"}',
    '{"ok": true, "ref": "{code}"}',
    '{"output": "{code}"}',
    '{"success": true, "data": {"code": "{code}"}}',
    '{"message": "done", "code": "{code}"}',
    '{"value": "{code}", "ok": true}',
    '"{code}"',
    '{"results": ["{code}"]}',
    '{"done": true}',
)


def check_generic_results(value: str) -> str:
    """Return ``value`` when it is one of :data:`GENERIC_RESULTS`, else raise ``ValueError``."""
    if value not in GENERIC_RESULTS:
        raise ValueError(f"unknown generic_results {value!r}: use one of {', '.join(GENERIC_RESULTS)}")
    return value


def generic_result(name: str, arguments: Any, shape: str = "code") -> Any:
    """The result a call of a tool without a simulated implementation (BFCL's) gets in the
    traces: ``{"result": "<code>"}`` (``shape="code"``), or with ``shape="varied"`` one of
    :data:`VARIED_RESULT_SHAPES`; the code and the shape are seeded by the call's name and arguments.

    ```python
    >>> from hf_asynclm.data.simulate import generic_result
    >>> generic_result("f", {"a": 1}) == generic_result("f", {"a": 1}), sorted(generic_result("f", {"a": 1}))
    (True, ['result'])
    >>> shapes = {str(type(generic_result("f", {"a": i}, "varied"))) for i in range(40)}
    >>> sorted(shapes)
    ["<class 'dict'>", "<class 'str'>"]

    ```
    """
    from ..demo_tools import random_code, seeded_rng

    code = random_code(seeded_rng("generic", name, arguments))
    if check_generic_results(shape) == "code":
        return {"result": code}
    template = seeded_rng("generic-shape", name, arguments).choice(VARIED_RESULT_SHAPES)
    return json.loads(template.replace("{code}", code))


def default_result(task: Task, call: PlannedCall, generic_results: str = "code") -> Any:
    """The result a call gets in the simulation: ``task.meta["results"][id]`` when the task
    provides one, the synthetic catalogue's tool when it has that tool (and accepts the
    arguments), else a hash-seeded generic result (:func:`generic_result`, shaped as
    ``generic_results`` says)."""
    given = (task.meta or {}).get("results") or {}
    if call.call_id in given:
        return given[call.call_id]
    from .synthetic import catalogue, tool_result

    if call.name in catalogue():
        try:
            return tool_result(call)
        except (TypeError, ValueError):
            pass
    return generic_result(call.name, call.arguments, generic_results)


def _answer_parts(task: Task) -> list[dict[str, Any]]:
    parts = (task.meta or {}).get("answer_parts")
    if parts:
        return [{"text": p["text"], "needs": list(p.get("needs", []))} for p in parts]
    text = task.answer if task.answer else "Done."
    return [{"text": text, "needs": [c.call_id for c in task.calls]}]


# ---------------------------------------------------------------------------------------------
# The trace writer
# ---------------------------------------------------------------------------------------------


class _Trace:
    def __init__(self, counter: TokenCounter, tpot: float) -> None:
        self.counter = counter
        self.tpot = tpot
        self.segments: list[dict[str, str]] = []
        self.t = 0.0
        self.n_tokens = 0
        self.started = False  # has the model written anything

    def unit(self, text: str) -> list[str]:
        """Atoms of a unit of model text, with the separating space when it is not the first."""
        return split_atoms(text if not self.started else " " + text)

    def write(self, atom: str) -> None:
        if self.segments and self.segments[-1]["role"] == "model":
            self.segments[-1]["text"] += atom
        else:
            self.segments.append({"role": "model", "text": atom})
        n = self.counter(atom)
        self.n_tokens += n
        self.t += n * self.tpot
        self.started = True

    def inject(self, text: str) -> None:
        self.segments.append({"role": "inject", "text": text})


def _lpt_pick(writable: list[PlannedCall], expected: dict[str, float]) -> PlannedCall:
    best = writable[0]
    for c in writable[1:]:
        if expected[c.call_id] > expected[best.call_id] + _EPS:
            best = c
    return best


def simulate(
    task: Task,
    mode: str = "async",
    seed: int = 0,
    tokenizer: Any | None = None,
    user_interrupt_rate: float = 0.0,
    jitter: float = 0.25,
    result_fn: Callable[[Task, PlannedCall], Any] | None = None,
    counter: TokenCounter | None = None,
    tpot_range_ms: Sequence[float] = DEFAULT_TPOT_RANGE_MS,
    interrupt_at: str = "word",
    generic_results: str = "code",
    latency_range_ms: Sequence[float] = DEFAULT_LATENCY_RANGE_MS,
) -> dict[str, Any]:
    """Simulate ``task`` in ``mode`` and return one trace (a JSON-ready dict)::

        {"task_id", "mode", "source", "category", "messages", "tools", "segments", "meta"}

    ``segments`` are ``{"role": "model" | "inject", "text": ...}``; concatenated they are
    exactly what the model conditions on after the prompt (the prompt itself is rendered later
    from ``messages`` and ``tools`` with the checkpoint's chat template). Inject texts are
    exactly ``format_interrupt(id, serialize_result(result))``. ``tools`` carry the
    ``x-latency-ms`` the simulation used. ``meta`` holds the timing (``tpot_ms``,
    ``expected_ms``, ``exec_ms``, ``start_ms``, ``done_ms``, ``inject_ms``,
    ``sim_latency_ms``), the plan (``depends_on``, ``answer_parts``), ``n_model_tokens`` and
    how tokens were counted (``token_count``). ``tpot_range_ms`` is the range the time per
    output token is drawn from (default 5-30 ms, the paper's); ``latency_range_ms`` the range
    of the expected time of a call whose tool has no ``x-latency-ms`` and whose plan gives none
    (default 1-1000 ms, the paper's).

    ``interrupt_at`` (async) is where results go in: ``"word"`` (every ready result at the
    first safe point, see the module docstring) or ``"sentence"`` (paced, :data:`SIM_INTERRUPT_AT`):
    one result at a time, right after a block's ``[END]`` or after a word that ends a sentence,
    and only once the model has ended a sentence (or trapped) since the last one went in; the
    model writes the calls it can, then the answer sentence of the result that came last, so
    the result a sentence quotes is the nearest one; no result goes in between two calls of a
    burst. ``"sentence-eager"`` is the same without that last rule (the paced traces written
    before 2026-12-02). ``meta["interrupt_at"]`` records it.

    ``generic_results`` shapes the results of tools the simulator has no implementation of
    (:data:`GENERIC_RESULTS`; ignored where ``result_fn`` is given).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    _check_interrupt_at(interrupt_at)
    paced = mode == "async" and interrupt_at in PACED_INTERRUPT_AT
    hold_bursts = paced and interrupt_at == "sentence"
    timing = _timing(task, seed, jitter, tpot_range_ms, latency_range_ms)
    counter = counter or TokenCounter(tokenizer)
    check_generic_results(generic_results)
    if result_fn is None:
        def result_fn(task: Task, call: PlannedCall) -> Any:
            return default_result(task, call, generic_results)
    tr = _Trace(counter, timing["tpot"])
    expected, exec_ms = timing["expected"], timing["exec"]
    task.topological_order()  # raises on a cycle or an unknown dependency
    plan: list[PlannedCall] = list(task.calls)
    parts = _answer_parts(task)
    by_id = {c.call_id: c for c in plan}
    written: list[str] = []
    injected: list[str] = []
    start: dict[str, float] = {}
    done: dict[str, float] = {}
    inject_ms: dict[str, float] = {}
    parts_done: list[int] = []
    followup = (task.meta or {}).get("followup") if mode == "async" else None
    use_user = bool(followup) and timing["user_draw"] < user_interrupt_rate
    user: dict[str, Any] = {"time": None, "fired": False}
    pace: dict[str, Any] = {"may": True, "last": None}  # paced: may one go in now; the last one in

    def inject_result(cid: str) -> None:
        tr.inject(format_interrupt(cid, serialize_result(result_fn(task, by_id[cid]))))
        injected.append(cid)
        inject_ms[cid] = round(tr.t, 3)

    def writable_calls() -> list[PlannedCall]:
        have = set(injected)
        return [c for c in plan if c.call_id not in written and all(d in have for d in c.depends_on)]

    def write_call(c: PlannedCall) -> None:
        for atom in tr.unit(format_call(c.body(), call_id=c.call_id)):
            tr.write(atom)
        written.append(c.call_id)

    def writable_parts() -> list[int]:
        have = set(injected)
        return [i for i, p in enumerate(parts) if i not in parts_done and all(n in have for n in p["needs"])]

    def fire_user() -> None:
        assert followup is not None
        tr.inject(format_interrupt(USER_ID, followup["text"]))
        user["fired"] = True
        user["time"] = round(user["time"] if paced else tr.t, 3)  # paced: when they spoke, it may go in later
        for c in followup.get("calls", []):
            pc = PlannedCall(**c)
            plan.append(pc)
            by_id[pc.call_id] = pc
        parts.extend({"text": p["text"], "needs": list(p["needs"])} for p in followup.get("answer_parts", []))

    def safe_point() -> None:
        """Inject every result (and the user's message) that is ready now, in completion order."""
        ready = [cid for cid in written if cid not in injected and done[cid] <= tr.t + _EPS]
        ready.sort(key=lambda cid: (done[cid], written.index(cid)))
        events: list[tuple[float, str]] = [(done[cid], cid) for cid in ready]
        if use_user and not user["fired"] and user["time"] is not None and user["time"] <= tr.t + _EPS:
            events.append((user["time"], USER_ID))
            events.sort(key=lambda e: e[0])
        for _, cid in events:
            if cid == USER_ID:
                fire_user()
            else:
                inject_result(cid)

    def deliver_one() -> bool:
        """Paced: inject the earliest ready result (or the user's message), if one may go in."""
        if not pace["may"]:
            return False
        events = [(done[cid], written.index(cid), cid) for cid in written if cid not in injected and done[cid] <= tr.t + _EPS]
        if use_user and not user["fired"] and user["time"] is not None and user["time"] <= tr.t + _EPS:
            events.append((user["time"], -1, USER_ID))
        if not events:
            return False
        cid = min(events)[2]
        if cid == USER_ID:
            fire_user()
        else:
            inject_result(cid)
            pace["last"] = cid
        pace["may"] = False
        return True

    def write_part(i: int, check_between: bool) -> None:
        for k, atom in enumerate(tr.unit(parts[i]["text"])):
            if k and check_between:
                if not paced:
                    safe_point()
                elif ends_sentence(tr.segments[-1]["text"]):
                    pace["may"] = True
                    deliver_one()
            tr.write(atom)
        parts_done.append(i)
        if paced and ends_sentence(parts[i]["text"]):
            pace["may"] = True

    if mode == "async":
        in_burst = False  # paced: a call was just written and another is writable: results wait
        while True:
            if paced:
                if not (hold_bursts and in_burst and writable_calls()):
                    deliver_one()  # here: the start, after a burst's last call or a trap, or after a sentence
            else:
                safe_point()
            ready_calls = writable_calls()
            in_burst = bool(ready_calls)
            if ready_calls:
                c = _lpt_pick(ready_calls, expected)
                write_call(c)
                start[c.call_id] = round(tr.t, 3)
                done[c.call_id] = tr.t + exec_ms[c.call_id]
                if use_user and user["time"] is None:  # the user speaks some time after the first call
                    user["time"] = tr.t + timing["user_u"] * max(exec_ms.values())
                continue
            ready_parts = writable_parts()
            if ready_parts:
                order = {cid: k for k, cid in enumerate(injected)}
                # paced: the sentence of the result that came last first, so the nearest result is the one quoted
                i = min(ready_parts, key=lambda j: (
                    paced and pace["last"] not in parts[j]["needs"], max((order[n] for n in parts[j]["needs"]), default=-1), j
                ))
                write_part(i, check_between=True)
                continue
            pending = [cid for cid in written if cid not in injected]
            if pending:
                for atom in tr.unit(format_trap()):
                    tr.write(atom)
                wake = min(done[cid] for cid in pending)
                if use_user and not user["fired"] and user["time"] is not None:
                    wake = min(wake, user["time"])
                tr.t = max(tr.t, wake)
                pace["may"] = True  # paced: a trap takes the next result
                continue
            if use_user and not user["fired"]:  # all done before the user spoke: they speak now
                user["time"] = tr.t
                fire_user()
                pace["may"] = False
                continue
            break
    elif mode == "sync":
        while True:
            ready_calls = writable_calls()
            if not ready_calls:
                break
            c = _lpt_pick(ready_calls, expected)
            write_call(c)
            start[c.call_id] = round(tr.t, 3)
            tr.t += exec_ms[c.call_id]
            done[c.call_id] = tr.t
            inject_result(c.call_id)
        for i in range(len(parts)):
            write_part(i, check_between=False)
    else:  # sync-parallel
        while True:
            wave = []
            ready_calls = writable_calls()
            while ready_calls:
                c = _lpt_pick(ready_calls, expected)
                write_call(c)
                wave.append(c.call_id)
                ready_calls = [r for r in ready_calls if r.call_id != c.call_id]
            if not wave:
                break
            for atom in tr.unit(format_trap()):
                tr.write(atom)
            t0 = tr.t
            for cid in wave:
                start[cid] = round(t0, 3)
                done[cid] = t0 + exec_ms[cid]
            tr.t = max(done[cid] for cid in wave)
            for cid in sorted(wave, key=lambda k: (done[k], wave.index(k))):
                inject_result(cid)
        for i in range(len(parts)):
            write_part(i, check_between=False)

    if not tr.segments:  # a task with nothing to call and nothing to say
        tr.write("Done.")
    answer_text = " ".join(parts[i]["text"] for i in parts_done)
    used = set(written)
    meta: dict[str, Any] = {
        "seed": seed,
        "tpot_ms": tr.tpot,
        "token_count": counter.name,
        "n_model_tokens": tr.n_tokens,
        "sim_latency_ms": round(tr.t, 3),
        "expected_ms": {k: v for k, v in expected.items() if k in used},
        "exec_ms": {k: v for k, v in exec_ms.items() if k in used},
        "start_ms": start,
        "done_ms": {k: round(v, 3) for k, v in done.items()},
        "inject_ms": inject_ms,
        "depends_on": {c.call_id: list(c.depends_on) for c in plan},
        "answer_parts": [parts[i] for i in parts_done],
        "answer": answer_text,
    }
    if paced:
        meta["interrupt_at"] = interrupt_at
    if (task.meta or {}).get("plan_layout"):  # a cheat sheet in a layout other than call-first
        meta["plan_layout"] = task.meta["plan_layout"]
    if followup:
        meta["followup_calls"] = [c["call_id"] for c in followup.get("calls", [])] if user["fired"] else []
        if user["fired"]:
            meta["user_ms"] = user["time"]
    return {
        "task_id": task.task_id,
        "mode": mode,
        "source": task.source,
        "category": task.category,
        "messages": copy.deepcopy(task.messages),
        "tools": timing["tools"],
        "segments": tr.segments,
        "meta": meta,
    }


def simulate_task(task: Task, modes: Sequence[str] = MODES, **kwargs: Any) -> list[dict[str, Any]]:
    """:func:`simulate` in each of ``modes`` (same timings)."""
    return [simulate(task, m, **kwargs) for m in modes]


# ---------------------------------------------------------------------------------------------
# Masks and checks
# ---------------------------------------------------------------------------------------------


def trace_mask_spans(example: dict[str, Any]) -> list[tuple[str, bool]]:
    """``(text, trained)`` pieces of a trace: what the model wrote is trained, injected
    interrupts are not. Concatenated, the texts are the whole trace.

    ```python
    >>> trace_mask_spans({"segments": [{"role": "model", "text": "[TRAP] [END]"},
    ...                                {"role": "inject", "text": "[INTR] w1 [HEAD] 1 [END]"}]})
    [('[TRAP] [END]', True), ('[INTR] w1 [HEAD] 1 [END]', False)]

    ```
    """
    return [(s["text"], s["role"] == "model") for s in example["segments"] if s["text"]]


def check_trace(example: dict[str, Any], tokenizer: Any | None = None) -> list[str]:
    """Rule violations of a trace (an empty list when it is clean).

    Always checked: segment roles; the model never writes ``[INTR]`` and writes no malformed
    block; inject segments are single well-formed interrupts, placed only at safe points (not
    inside a call block; after ``[END]`` or before a space); call ids unique; each result
    injected at most once and only for a call already written; every call gets its result;
    a trap only while something is pending and no call is writable (async: and no answer text
    is writable), and a trap is followed by interrupts; the LPT rule (a written call is never
    shorter, by expected time, than another writable call); answer sentences come after the
    results they quote; interrupts in completion order (``meta["done_ms"]``); single spaces.
    Sync: each result right after its call. Sync-parallel: results only after a trap, the
    whole wave together. Paced async: no interrupt between two calls of a burst (before a call
    that was already writable).
    When the token counting can be reproduced (``meta["token_count"] == "approx"``, or a
    ``tokenizer`` is given), the simulated timeline is replayed: no interrupt before its call
    completed, none later than the first safe point after, and ``sim_latency_ms`` matches.
    """
    v: list[str] = []
    segs = example.get("segments") or []
    meta = example.get("meta") or {}
    mode = example.get("mode", "async")
    paced = mode == "async" and meta.get("interrupt_at") in PACED_INTERRUPT_AT
    for k, s in enumerate(segs):
        if s.get("role") not in ("model", "inject"):
            v.append(f"segment {k}: unknown role {s.get('role')!r}")
    if v:
        return v
    model_segs = [s["text"] for s in segs if s["role"] == "model"]
    model_text = "".join(model_segs)
    if INTR in model_text:
        v.append("the model wrote [INTR]")
    if "  " in model_text:
        v.append("double space in model text")
    if model_text.startswith(" "):
        v.append("model text starts with a space")
    if model_text.endswith(" "):
        v.append("model text ends with a space")

    depends = {k: list(d) for k, d in (meta.get("depends_on") or {}).items()}
    followup_ids = set(meta.get("followup_calls") or [])
    expected = meta.get("expected_ms") or {}
    done_ms = meta.get("done_ms") or {}
    parts = meta.get("answer_parts") or []

    parser = CMLParser()
    written: list[str] = []
    injected: list[str] = []
    user_seen = False
    inject_offsets: dict[str, int] = {}
    model_off = 0
    last_done = -math.inf
    trap_pending = False  # a trap was written and no interrupt has come yet
    wave: list[str] = []  # sync-parallel: calls written since the last trap
    call_awaiting: str | None = None  # sync: the call whose result must come next
    hold_bursts = paced and meta.get("interrupt_at") == "sentence"  # results wait for a burst of calls to end
    last_atom_call = False  # the model's last atom was a call block

    def plan_ids() -> list[str]:
        return [cid for cid in depends if cid not in followup_ids or user_seen]

    def writable_now() -> list[str]:
        have = set(injected)
        return [cid for cid in plan_ids() if cid not in written and all(d in have for d in depends[cid])]

    def writable_parts_now() -> list[str]:
        have = set(injected)
        out = []
        for p in parts:
            pos = model_text.find(p["text"])
            if all(n in have for n in p.get("needs", [])) and (pos < 0 or pos >= model_off):
                out.append(p["text"])
        return out

    def on_block(ev: Block) -> None:
        nonlocal trap_pending, call_awaiting
        if ev.kind == "malformed":
            v.append(f"malformed block {ev.raw!r}: {ev.error}")
        elif ev.kind == "interrupt":
            v.append("the model wrote an interrupt block")
        elif ev.kind == "trap":
            pending = [c for c in written if c not in injected]
            if not pending:
                v.append("trap with nothing pending")
            if mode == "sync":
                v.append("sync trace has a trap")
            for cid in writable_now():
                v.append(f"trap while call {cid} could be written")
            if mode == "async":
                for ptxt in writable_parts_now():
                    v.append(f"trap while answer text {ptxt!r} could be written")
            trap_pending = True
        elif ev.kind == "call" and ev.call_id is not None:
            cid = ev.call_id
            if cid in written:
                v.append(f"call id {cid} written twice")
            elif depends:
                if cid not in depends or (cid in followup_ids and not user_seen):
                    v.append(f"call {cid} is not in the plan")
                else:
                    cands = writable_now()
                    if cid not in cands:
                        v.append(f"call {cid} written before its inputs arrived")
                    elif expected:
                        longer = [c for c in cands if expected.get(c, 0) > expected.get(cid, 0) + _EPS]
                        if longer:
                            v.append(f"LPT: {cid} ({expected.get(cid)} ms) written before longer {longer[0]} ({expected.get(longer[0])} ms)")
            written.append(cid)
            if mode == "sync":
                if call_awaiting is not None:
                    v.append(f"sync: the result of {call_awaiting} does not follow its call")
                call_awaiting = cid
            if mode == "sync-parallel":
                wave.append(cid)

    for k, s in enumerate(segs):
        text = s["text"]
        if s["role"] == "model":
            if trap_pending:
                v.append(f"segment {k}: trap not followed by an interrupt")
                trap_pending = False
            if call_awaiting is not None:
                v.append(f"sync: the result of {call_awaiting} does not follow its call")
                call_awaiting = None
            for atom in split_atoms(text):
                last_atom_call = False
                for ev in parser.feed(atom):
                    if isinstance(ev, Block):
                        on_block(ev)
                        last_atom_call = ev.kind == "call" and ev.call_id is not None
                model_off += len(atom)
            continue
        # inject segment
        blocks = parse_blocks(text)
        if len(blocks) != 1 or blocks[0].kind != "interrupt" or blocks[0].raw != text:
            v.append(f"segment {k}: not a single interrupt block: {text[:60]!r}")
            continue
        b = blocks[0]
        if text != format_interrupt(b.call_id or "", b.body):
            v.append(f"segment {k}: interrupt not formatted by format_interrupt")
        if parser.in_block or parser.holding:
            v.append(f"segment {k}: interrupt {b.call_id} inside a block")
        prev_model = model_text[:model_off]
        next_model = model_text[model_off:]
        if prev_model and not prev_model.endswith(END) and next_model and not next_model.startswith(" "):
            v.append(f"segment {k}: interrupt {b.call_id} splits a word")
        if paced:
            if prev_model and not prev_model.endswith(END) and not ends_sentence(prev_model):
                v.append(f"segment {k}: paced interrupt {b.call_id} inside a sentence")
            if k and segs[k - 1]["role"] == "inject":
                v.append(f"segment {k}: paced interrupts go in one at a time")
            if hold_bursts and last_atom_call and writable_now():
                v.append(f"burst: {b.call_id} went in between calls, with {', '.join(writable_now())} still to write")
        last_atom_call = False
        trap_pending = False
        cid = b.call_id or ""
        if cid == USER_ID:
            if user_seen:
                v.append("two user interrupts")
            user_seen = True
            continue
        if cid not in written:
            v.append(f"interrupt for {cid}, which was not called")
            continue
        if cid in injected:
            v.append(f"result of {cid} injected twice")
            continue
        if mode == "sync":
            if call_awaiting != cid:
                v.append(f"sync: result of {cid} not right after its call")
            call_awaiting = None
        if mode == "sync-parallel":
            if cid not in wave:
                v.append(f"sync-parallel: result of {cid} outside its wave")
            prev_seg = segs[k - 1] if k else None
            if prev_seg is None or (prev_seg["role"] == "model" and not prev_seg["text"].endswith(format_trap())):
                v.append(f"sync-parallel: result of {cid} not after a trap")
        injected.append(cid)
        inject_offsets[cid] = model_off
        if cid in done_ms:
            if done_ms[cid] < last_done - _EPS:
                v.append(f"interrupt {cid} out of completion order")
            last_done = max(last_done, done_ms[cid])
        if mode == "sync-parallel" and wave and all(c in injected for c in wave):
            wave = []
    if trap_pending:
        v.append("trace ends with a trap")
    if parser.in_block:
        v.append("trace ends inside a block")
    for cid in written:
        if cid not in injected:
            v.append(f"call {cid} never got its result")
    search_from: dict[str, int] = {}  # identical sentences are matched to successive occurrences
    for p in parts:
        pos = model_text.find(p["text"], search_from.get(p["text"], 0))
        search_from[p["text"]] = pos + max(1, len(p["text"]))
        if pos < 0:
            v.append(f"answer text {p['text']!r} missing")
            continue
        for n in p.get("needs", []):
            if n not in inject_offsets:
                v.append(f"answer text {p['text']!r} quotes {n}, whose result never came")
            elif inject_offsets[n] > pos:
                v.append(f"answer text {p['text']!r} written before the result of {n}")
    if mode == "sync-parallel":
        v += _check_waves(segs)
    counter = None
    if meta.get("token_count") == "approx":
        counter = TokenCounter(None)
    elif tokenizer is not None:
        counter = TokenCounter(tokenizer)
    if counter is not None and "tpot_ms" in meta and "exec_ms" in meta:
        v += _replay_paced(segs, meta, counter) if paced else _replay(segs, meta, mode, counter)
    return v


def _check_waves(segs: list[dict[str, str]]) -> list[str]:
    """Sync-parallel: the injects after a trap are exactly the calls written since the previous trap."""
    out: list[str] = []
    since: list[str] = []
    k = 0
    while k < len(segs):
        s = segs[k]
        if s["role"] == "model":
            for b in parse_blocks(s["text"]):
                if b.kind == "call" and b.call_id:
                    since.append(b.call_id)
            k += 1
            continue
        group = []
        while k < len(segs) and segs[k]["role"] == "inject":
            bl = parse_blocks(segs[k]["text"])
            if bl and bl[0].call_id:
                group.append(bl[0].call_id)
            k += 1
        if sorted(group) != sorted(since):
            out.append(f"sync-parallel: wave {since} answered by {group}")
        since = []
    return out


class _ReplayClock:
    """The simulated clock both replays share: the time, when each started call completes,
    which results (and the user's interrupt) are still to go in, and the final latency check."""

    def __init__(self, meta: dict[str, Any]) -> None:
        self.tpot = float(meta["tpot_ms"])
        self.exec_ms = {k: float(x) for k, x in meta["exec_ms"].items()}
        self.user_ms = None if meta.get("user_ms") is None else float(meta["user_ms"])
        self.user_pending = self.user_ms is not None
        self.sim_latency_ms = meta.get("sim_latency_ms")
        self.t = 0.0
        self.done: dict[str, float] = {}
        self.pending: list[str] = []  # started and not yet injected

    def write(self, n_tokens: int) -> None:
        self.t += n_tokens * self.tpot

    def start(self, cid: str) -> None:
        """Start call ``cid`` now (the caller checked ``cid in exec_ms``)."""
        self.done[cid] = self.t + self.exec_ms[cid]
        self.pending.append(cid)

    def ready(self) -> list[tuple[float, str]]:
        """What has completed and is still to go in, as ``(completion time, id)``, earliest first."""
        r = [(self.done[c], c) for c in self.pending if self.done[c] <= self.t + 1e-3]
        if self.user_pending and self.user_ms is not None and self.user_ms <= self.t + 1e-3:
            r.append((self.user_ms, USER_ID))
        return sorted(r)

    def wake(self, *, all_of: bool = False) -> None:
        """A trap: sleep until the first pending completion (``all_of``: the last one)."""
        times = [self.done[c] for c in self.pending]
        if self.user_pending and self.user_ms is not None:
            times.append(self.user_ms)
        if times:
            self.t = max(self.t, max(times) if all_of else min(times))

    def take(self, cid: str) -> None:
        """Result ``cid`` (or the user's interrupt) went in."""
        if cid == USER_ID:
            self.user_pending = False
        elif cid in self.pending:
            self.pending.remove(cid)

    def latency_check(self) -> list[str]:
        if self.sim_latency_ms is not None and abs(self.t - float(self.sim_latency_ms)) > 0.01:
            return [f"timing: replayed latency {self.t:.3f} ms != sim_latency_ms {self.sim_latency_ms}"]
        return []


def _replay(segs: list[dict[str, str]], meta: dict[str, Any], mode: str, counter: TokenCounter) -> list[str]:
    """Replay the simulated clock over the trace and compare with where interrupts landed."""
    out: list[str] = []
    clock = _ReplayClock(meta)
    collected: list[str] = []  # sync-parallel: written, not started
    last_atom_trap = False
    k = 0

    def ready_now() -> set[str]:
        return {c for _, c in clock.ready()}

    while k < len(segs):
        s = segs[k]
        if s["role"] == "model":
            atoms = split_atoms(s["text"])
            for j, atom in enumerate(atoms):
                if mode == "async" and (j > 0 or k == 0 or segs[k - 1]["role"] == "model"):
                    late = ready_now()
                    if late:
                        out.append(f"timing: {sorted(late)} ready at {clock.t:.1f} ms but injected later")
                        return out
                clock.write(counter(atom))
                blocks = parse_blocks(atom)
                last_atom_trap = bool(blocks) and blocks[0].kind == "trap"
                if blocks and blocks[0].kind == "call" and blocks[0].call_id:
                    cid = blocks[0].call_id
                    if cid not in clock.exec_ms:
                        out.append(f"timing: no exec_ms for {cid}")
                        return out
                    if mode == "sync-parallel":
                        collected.append(cid)
                    else:
                        clock.start(cid)
                        if mode == "sync":
                            clock.t = clock.done[cid]
                if last_atom_trap and mode == "sync-parallel":
                    for cid in collected:
                        clock.start(cid)
                    collected = []
            k += 1
            continue
        group = []
        while k < len(segs) and segs[k]["role"] == "inject":
            bl = parse_blocks(segs[k]["text"])
            group.append(bl[0].call_id if bl else "")
            k += 1
        if last_atom_trap:
            clock.wake(all_of=mode == "sync-parallel")
        ready = ready_now()
        for cid in group:
            if cid == USER_ID and USER_ID not in ready:
                out.append(f"timing: user interrupt before {clock.user_ms} ms (at {clock.t:.1f} ms)")
            elif cid != USER_ID and cid not in ready:
                out.append(
                    f"timing: result of {cid} injected at {clock.t:.1f} ms, before it completed "
                    f"({clock.done.get(cid, float('nan')):.1f} ms)"
                )
            clock.take(cid)
        missing = ready - set(group)
        if missing and mode != "sync":
            out.append(f"timing: {sorted(missing)} ready at {clock.t:.1f} ms but not injected there")
        if out:
            return out
        last_atom_trap = False
    return out + clock.latency_check()


def _replay_paced(segs: list[dict[str, str]], meta: dict[str, Any], counter: TokenCounter) -> list[str]:
    """Replay the clock of a paced async trace (``interrupt_at="sentence"``): each interrupt
    went in one at a time, already completed, the earliest ready first; and where one was ready
    and might go in (the start, right after a block, after a sentence end, with the last one
    answered by a sentence or a trap since), it went in there."""
    out: list[str] = []
    clock = _ReplayClock(meta)
    may = True
    last_trap = False
    hold_bursts = meta.get("interrupt_at") == "sentence"

    def call_next(k: int, j: int, atoms: list[str]) -> bool:
        """Whether the model's next atom, with no interrupt between, is a call (one it could
        write already: check_trace's "written before its inputs arrived" sees to that)."""
        nxt = atoms[j + 1] if j + 1 < len(atoms) else None
        if nxt is None and k + 1 < len(segs) and segs[k + 1]["role"] == "model":
            nxt = (split_atoms(segs[k + 1]["text"]) or [None])[0]
        blocks = parse_blocks(nxt) if nxt else []
        return bool(blocks) and blocks[0].kind == "call" and bool(blocks[0].call_id)

    for k, s in enumerate(segs):
        if s["role"] == "model":
            atoms = split_atoms(s["text"])
            for j, atom in enumerate(atoms):
                clock.write(counter(atom))
                blocks = parse_blocks(atom)
                last_trap = bool(blocks) and blocks[0].kind == "trap"
                if blocks and blocks[0].kind == "call" and blocks[0].call_id:
                    cid = blocks[0].call_id
                    if cid not in clock.exec_ms:
                        return out + [f"timing: no exec_ms for {cid}"]
                    clock.start(cid)
                if last_trap:
                    may = True
                    continue  # the trap's wake-up is checked at the interrupt that follows it
                if not blocks and ends_sentence(atom):
                    may = True
                at_point = bool(blocks) or ends_sentence(atom)
                if hold_bursts and blocks and blocks[0].kind == "call" and call_next(k, j, atoms):
                    at_point = False  # inside a burst of calls: results wait for its end
                next_is_inject = j == len(atoms) - 1 and k + 1 < len(segs) and segs[k + 1]["role"] == "inject"
                if at_point and may and not next_is_inject:
                    ready = clock.ready()
                    if ready:
                        return out + [f"timing: {ready[0][1]} ready at {clock.t:.1f} ms but not injected there"]
            continue
        bl = parse_blocks(s["text"])
        cid = bl[0].call_id if bl else ""
        if last_trap:
            clock.wake()
            last_trap = False
        ready = clock.ready()
        if not ready or ready[0][1] != cid:
            what = "before it completed" if cid not in [r[1] for r in ready] else f"before {ready[0][1]}, ready earlier"
            return out + [f"timing: {cid} injected at {clock.t:.1f} ms {what}"]
        clock.take(cid)
        may = False
    return out + clock.latency_check()


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _cml_template() -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from ..prompting import CML_CHAT_TEMPLATE

    return ImmutableSandboxedEnvironment().from_string(CML_CHAT_TEMPLATE)


def _render_prompt(example: dict[str, Any], tokenizer: Any | None) -> str:
    tools = example.get("tools") or None
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            example["messages"], tools=tools, add_generation_prompt=True, tokenize=False
        )
    return _cml_template().render(messages=example["messages"], tools=tools, bos_token="", add_generation_prompt=True)


def example_length(example: dict[str, Any], tokenizer: Any | None = None) -> int:
    """Tokens of a trace with its prompt: the prompt rendered with the tokenizer's chat
    template (or :data:`~hf_asynclm.prompting.CML_CHAT_TEMPLATE`), each segment counted on its
    own, plus one for EOS. Without a tokenizer, about one token per 4 characters."""
    prompt = _render_prompt(example, tokenizer)
    if tokenizer is None:
        count = lambda text: (len(text) + 3) // 4  # noqa: E731
    else:
        count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    return count(prompt) + sum(count(s["text"]) for s in example["segments"]) + 1


def build_dataset(
    tasks: Iterable[Task],
    out_path: str | Path,
    modes: Sequence[str] = MODES,
    seed: int = 0,
    tokenizer: Any | None = None,
    user_interrupt_rate: float = 0.0,
    jitter: float = 0.25,
    check: bool = True,
    max_tokens: int | None = None,
    progress: Callable[[int], None] | None = None,
    tpot_range_ms: Sequence[float] = DEFAULT_TPOT_RANGE_MS,
    interrupt_at: str = "word",
    generic_results: str = "code",
    latency_range_ms: Sequence[float] = DEFAULT_LATENCY_RANGE_MS,
) -> dict[str, Any]:
    """Simulate every task in every mode and write the traces to ``out_path`` (JSONL).

    Traces that break a rule (:func:`check_trace`, when ``check``) are not written; they are
    counted in the stats, and so are traces longer than ``max_tokens`` (prompt included,
    :func:`example_length`). ``progress`` is called with 1 after each task. Returns stats:
    counts per mode, source and category, mean simulated latency per mode, the mean
    sync/async latency ratio, model tokens and the longest trace. ``interrupt_at`` is where
    async traces put results and ``generic_results`` how the results of tools without an
    implementation look, ``latency_range_ms`` where latencies no task gives are drawn from
    (:func:`simulate`).
    """
    _check_interrupt_at(interrupt_at)
    check_generic_results(generic_results)
    modes = tuple(modes)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"unknown modes {bad}; choose from {MODES}")
    tpot_range_ms = check_tpot_range(tpot_range_ms)
    latency_range_ms = check_latency_range(latency_range_ms)
    counter = TokenCounter(tokenizer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    n_tasks = n_examples = 0
    by_mode: dict[str, dict[str, float]] = {m: {"n": 0, "latency_ms": 0.0, "model_tokens": 0} for m in modes}
    by_category: dict[str, int] = {}
    by_source: dict[str, int] = {}
    ratios: list[float] = []
    violations: list[str] = []
    n_bad = 0
    n_long = 0
    max_chars = 0
    with out_path.open("w", encoding="utf-8") as fh:
        for task in tasks:
            n_tasks += 1
            lat: dict[str, float] = {}
            for mode in modes:
                ex = simulate(
                    task, mode, seed=seed, user_interrupt_rate=user_interrupt_rate, jitter=jitter, counter=counter,
                    tpot_range_ms=tpot_range_ms, interrupt_at=interrupt_at, generic_results=generic_results,
                    latency_range_ms=latency_range_ms,
                )
                if check:
                    problems = check_trace(ex, tokenizer=tokenizer)
                    if problems:
                        n_bad += 1
                        if len(violations) < 20:
                            violations.append(f"{task.task_id} [{mode}]: {problems[0]}")
                        continue
                if max_tokens is not None and example_length(ex, tokenizer) > max_tokens:
                    n_long += 1
                    continue
                fh.write(json.dumps(ex, ensure_ascii=False) + "\n")
                n_examples += 1
                st = by_mode[mode]
                st["n"] += 1
                st["latency_ms"] += ex["meta"]["sim_latency_ms"]
                st["model_tokens"] += ex["meta"]["n_model_tokens"]
                lat[mode] = ex["meta"]["sim_latency_ms"]
                max_chars = max(max_chars, sum(len(s["text"]) for s in ex["segments"]))
                by_category[task.category] = by_category.get(task.category, 0) + 1
                by_source[task.source] = by_source.get(task.source, 0) + 1
            if "async" in lat and "sync" in lat and lat["async"] > 0:
                ratios.append(lat["sync"] / lat["async"])
            if progress is not None:
                progress(1)
    return {
        "out_path": str(out_path),
        "n_tasks": n_tasks,
        "n_examples": n_examples,
        "n_rejected": n_bad,
        "n_too_long": n_long,
        "violations": violations,
        "by_mode": {
            m: {
                "n": int(st["n"]),
                "mean_latency_ms": round(st["latency_ms"] / st["n"], 1) if st["n"] else None,
                "mean_model_tokens": round(st["model_tokens"] / st["n"], 1) if st["n"] else None,
            }
            for m, st in by_mode.items()
        },
        "by_category": by_category,
        "by_source": by_source,
        "mean_sync_over_async": round(sum(ratios) / len(ratios), 3) if ratios else None,
        "max_trace_chars": max_chars,
        "token_count": counter.name,
        "interrupt_at": interrupt_at,
    }
