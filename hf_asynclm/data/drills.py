"""Copy drills: short examples whose only skill is copying values, for models trained from scratch.

A CML model must copy values it has never seen: from the request into call arguments and from
interrupts into the answer. A small model trained from scratch on the simulator's traces alone
learns the protocol quickly but copies late: the first shipped ``cml-tiny`` (6 layers, lr 2e-3,
3,500 steps on traces) still lost 1.5-1.7 nats per value token (a digit: 1.7, close to guessing
among ten) against ~0.1 on the CML scaffolding. Copying is done by attention heads that find
where a value appeared and read on from there; they form once the data makes copying the *only*
way to lower the loss, and only with a learning rate that lets them (1e-3, not 2e-3, on the
4-layer ``tiny`` preset). A drill is such an example, 30-90 tokens long, in the same trace format
as the simulator's, so ``hf-asynclm train`` reads it unchanged. The shipped recipe is a
curriculum: drills alone first (batch 32: the held-out digit loss fell from 2.0 to 0.3 nats in
1,200 steps), then traces mixed with drills (README, "Checkpoints").

* ``echo``: the user lists values, the model repeats them in order;
* ``pick``: the user gives named values and asks for some of them in another order;
* ``result``: the model calls ``lookup(key=...)`` with a value from the request, waits, and
  reports some fields of the result that arrives as an interrupt (quoting a result);
* ``calls``: the user lists 2-4 keys, the model writes one ``lookup`` call per key in the order
  given (never repeating or skipping one: what parallel requests need), waits, and reports each
  result as it arrives;
* ``plan``: BFCL-style tools with made-up names and a cheat-sheet plan (``Plan: c1 f(a=1) ~300ms;
  ...``, as :func:`hf_asynclm.data.bfcl.with_cheat_sheet` writes it); the model copies every call
  verbatim, longest expected time first (the LPT rule), traps until all results are in, and
  ends with ``Done.``: copying unseen tool names and literal arguments of every type;
* ``order`` (only when asked for): the system prompt lists 2-7 made-up tools with their
  expected times (``~420ms``), the user asks for 2-4 of them in a random order, and the model
  writes the calls longest expected time first (the LPT rule), traps, and reports each result
  as it arrives. Unlike ``plan``, the times are not next to the calls: the model has to look
  each requested tool up in the tool list and compare, which is the step where cml-tiny's
  first wrong token on parallel requests usually is (its call id: another call first).
  One retrain with 3,000 of them (README, "Earlier tries") doubled cml-tiny's LPT order on
  BFCL but taught it to report results after BFCL calls too (BFCL traces end with ``Done.``),
  so it is not in the shipped recipe.
* ``rank`` (only when asked for): a ``plan`` drill whose 2-4 made-up tools take no arguments
  (``Plan: c1 find_stock() ~230ms; c2 geo_rate() ~755ms``), so the only skill left is the LPT
  order. On 2026-12-03, 2,000 steps (batch 16) of them from the shipped cml-tiny kept the LPT
  order in 84 % of the held-out ``rank`` tasks whose calls were right, while 1,000 steps of
  ``plan`` drills left 3- and 4-call plans with arguments near chance (docs/CML_TINY_HISTORY.md):
  comparing the times is learnable, tying a time to its call across the call's arguments is the
  hard part. Alone they make the model forget how to copy arguments. Mixed into stages 2 and 3 of
  a retrain from scratch (docs/CML_TINY_HISTORY.md, "A retrain with rank drills") they taught that
  tie too (the LPT order on held-out plan drills: 27 % -> 70 % of the tasks whose calls are right),
  and on BFCL's parallel requests too (33 % -> 56-63 % of 94 held-out tasks), but the calls on those
  were right less often (58 % -> 26-34 %), and held-out synthetic tasks fell to 426-437 of 500; not in a
  shipped recipe.
* ``variants`` (only when asked for): a ``plan`` drill whose 2-4 calls go to one made-up tool and
  share every argument's value but one (sometimes a second tool takes the last call), as BFCL's
  parallel requests do (``c1 f(temp=300, gas="air") ~90ms; c2 f(temp=350, gas="air") ~420ms``);
  half of the requests name the varied values. Written longest first, such calls can only be told
  apart by the one value, which is where the models that learnt the LPT order from ``rank`` drills
  lost BFCL calls (a value from the wrong call, a call twice, one left out). In a 700-step stage 3
  after such a model's stage 2, 1,500 of them raised the calls right on BFCL's 94 held-out parallel
  requests from 26 % to 37 % and 5,000 to 47 % (the shipped weights, which keep the plan's order:
  58 %); not in a shipped recipe (docs/CML_TINY_HISTORY.md).

The first three were the shipped recipe's stage 1-3 drills; ``calls`` and ``plan`` were added
for stage 4, after the evaluation showed parallel requests repeating one call and BFCL names
miscopied. ``copy_drills(..., kinds=...)`` picks which kinds to generate.

Three options (:class:`DrillOptions`, ``data build --drill-calls`` / ``--drill-close-times`` /
``--plan-layout``) shape the multi-call kinds; at their defaults every drill is byte for byte what it
was before them:

* ``calls=4`` (or a range ``(2, 3)``): the number of calls of each ``calls``, ``plan``, ``rank``,
  ``variants`` and ``order`` drill, e.g. only four-call plans, the ones cml-tiny orders worst;
* ``close_times=0.7``: 70 % of the ``plan``, ``rank``, ``variants`` and ``order`` drills draw all
  their expected times in one window of 20-120 ms (``~310ms``, ``~341ms``, ``~322ms``), so the
  hundreds digit alone does not tell the order. cml-tiny's four-call errors on BFCL were swaps of
  times less than 30 ms apart; 2,000 such four-call ``variants`` drills in its stage 3 moved its
  four-call order once (session 29: 9 of 22) and not with other draws (session 30: 3 of 18), and
  ``hf-asynclm eval --plan-drills 200 --plan-close-times 1`` shows the shipped weights barely compare
  such times (docs/CML_TINY_HISTORY.md).
* ``plan_layout="time-first"``: the plans of the ``plan``, ``rank`` and ``variants`` drills write each
  expected time right before its call id (``Plan: ~310ms c1 f(a=1); ~95ms c2 g()``,
  :func:`hf_asynclm.data.bfcl.with_cheat_sheet`); the calls, tools and the model's part stay the same.

Values come from the same split-aware pools as the synthetic tasks
(:class:`~hf_asynclm.data.synthetic.Pools`), so drills of the ``train`` split never contain
an ``eval`` value.

Example:

```python
>>> from hf_asynclm.data.drills import copy_drills
>>> d = copy_drills(3, seed=0)
>>> [x["category"] for x in d]
['echo', 'pick', 'result']
>>> d[0]["segments"][0]["role"], d[0]["mode"]
('model', 'drill')
>>> import re
>>> v = copy_drills(1, seed=0, kinds=["variants"], calls=4, close_times=1.0)[0]
>>> times = [int(t) for t in re.findall(r"~([0-9]+)ms", v["messages"][0]["content"])]
>>> len(times), max(times) - min(times) <= 120, v["meta"]["calls"]
(4, True, [4, 4])

```
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..cml import format_call, format_interrupt, format_trap
from .synthetic import Pools
from .bfcl import check_plan_layout, with_cheat_sheet
from .tasks import PlannedCall, Task

#: Drill kinds ``copy_drills`` generates in turn by default.
DRILL_KINDS: tuple[str, ...] = ("echo", "pick", "result", "calls", "plan")
#: Kinds generated only when asked for (``kinds=`` / ``--drill-kinds``), so that the default
#: output (and every recipe that relies on it) stays what it was.
EXTRA_DRILL_KINDS: tuple[str, ...] = ("order", "rank", "variants")

#: The request line of ``plan``, ``rank`` and (half of the) ``variants`` drills (the plan follows it).
_PLAN_ASKS = ("Please help with this.", "Run these.", "Handle my request.", "Do the following.")
_KEYS = ("a", "b", "c", "d", "e", "f")
_FIELDS = ("city", "code", "date", "time", "name", "price", "ref", "gate", "symbol", "title")


def _value(p: Pools, kind: str) -> str:
    r = p.rng
    if kind == "city":
        return p.city()
    if kind == "name":
        return p.person() if r.random() < 0.5 else p.first_name()
    if kind == "date":
        return p.date()
    if kind == "time":
        return p.clock()
    if kind in ("code", "ref"):
        return p.code()
    if kind == "price":
        return str(p.amount())
    if kind == "gate":
        return f"{r.choice('ABCDE')}{r.randint(1, 40)}"
    if kind == "symbol":
        return p.symbol()
    return p.title()


def _values(p: Pools, k: int) -> list[tuple[str, str]]:
    """``k`` (field, value) pairs with distinct values."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    while len(out) < k:
        field = p.rng.choice(_FIELDS)
        v = _value(p, field)
        if v.lower() not in seen:
            seen.add(v.lower())
            out.append((field, v))
    return out


_Drill = tuple[list[dict[str, Any]], list[dict[str, str]], list[dict[str, Any]]]
"""A drill's ``messages``, ``segments`` and ``tools``."""

#: Kinds whose number of calls ``calls=`` (``--drill-calls``) sets.
CALL_COUNT_KINDS: tuple[str, ...] = ("calls", "plan", "rank", "variants", "order")
#: Kinds whose expected times ``close_times=`` (``--drill-close-times``) draws close together.
TIMED_KINDS: tuple[str, ...] = ("plan", "rank", "variants", "order")
#: Kinds whose prompt holds a cheat-sheet plan (its layout: ``plan_layout=``, ``--plan-layout``).
PLAN_KINDS: tuple[str, ...] = ("plan", "rank", "variants")
#: The most calls ``calls=`` allows (the ``order`` drills list up to three more tools than they call).
MAX_DRILL_CALLS = 8


@dataclass(frozen=True)
class DrillOptions:
    """How :func:`copy_drills` draws the multi-call kinds; the defaults keep every drill as it was.

    Attributes:
        calls: ``(low, high)``: each drill of :data:`CALL_COUNT_KINDS` gets ``low``-``high`` calls
            (``plan``: 1-4 by default, the others 2-4).
        close_times: probability that a drill of :data:`TIMED_KINDS` draws all its expected times in
            one window of 20-120 ms (2 ms apart at least) rather than spread over 20-900 ms. Models
            that compare only the hundreds digit get such plans wrong: cml-tiny's four-call errors
            on BFCL were swaps of times less than 30 ms apart (docs/CML_TINY_HISTORY.md, session 29).
        plan_layout: how the cheat-sheet plans of the ``plan``, ``rank`` and ``variants`` drills write
            each call (:data:`hf_asynclm.data.bfcl.PLAN_LAYOUTS`): ``"call-first"`` (``c1 f(a=1)
            ~300ms``) or ``"time-first"`` (``~300ms c1 f(a=1)``).
    """

    calls: tuple[int, int] | None = None
    close_times: float = 0.0
    plan_layout: str = "call-first"

    def __post_init__(self) -> None:
        if self.calls is not None:
            low, high = self.calls
            if not 2 <= low <= high <= MAX_DRILL_CALLS:
                raise ValueError(f"calls must be (low, high) with 2 <= low <= high <= {MAX_DRILL_CALLS}, got {self.calls}")
        if not 0.0 <= self.close_times <= 1.0:
            raise ValueError(f"close_times is a probability in [0, 1], got {self.close_times}")
        check_plan_layout(self.plan_layout)

    def n_calls(self, p: Pools) -> int:
        """A drill's number of calls: ``calls`` if set, else 2-4 (the draw the drills always made)."""
        return p.rng.randint(*(self.calls or (2, 4)))


def _echo(p: Pools, o: DrillOptions) -> _Drill:
    vals = [v for _, v in _values(p, p.rng.randint(2, 5))]
    ask = p.rng.choice(("Repeat: {}.", "Say back {}.", "Copy exactly: {}", "Echo {}"))
    sep = p.rng.choice((", ", "; ", " "))
    return ([{"role": "user", "content": ask.format(sep.join(vals))}], [{"role": "model", "text": sep.join(vals) + "."}], [])


def _pick(p: Pools, o: DrillOptions) -> _Drill:
    r = p.rng
    pairs = _values(p, r.randint(2, 6))
    keys = r.sample(_KEYS, len(pairs)) if r.random() < 0.5 else [f for f, _ in pairs]
    if len(set(keys)) < len(keys):
        keys = list(_KEYS[: len(pairs)])
    table = dict(zip(keys, (v for _, v in pairs)))
    listed = "; ".join(f"{k}={v}" for k, v in table.items())
    wanted = r.sample(list(table), r.randint(1, len(table)))
    ask = r.choice(("{} -- give {}.", "{}. What are {}?", "Given {}, write {}."))
    answer = ", ".join(f"{k} {table[k]}" for k in wanted) + "."
    return ([{"role": "user", "content": ask.format(listed, " and ".join(wanted))}], [{"role": "model", "text": answer}], [])


#: The one tool the ``result`` drills call.
LOOKUP_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look up a record by its key.",
        "parameters": {"type": "object", "properties": {"key": {"type": "string", "description": "Record key."}},
                       "required": ["key"]},
    },
}


def _result(p: Pools, o: DrillOptions) -> _Drill:
    r = p.rng
    key = p.code() if r.random() < 0.5 else p.city()
    pairs = _values(p, r.randint(2, 4))
    fields: dict[str, str] = {}
    for field, v in pairs:
        fields[field if field not in fields else f"{field}{len(fields)}"] = v
    call_id = r.choice("abcdefghkmnprstw") + str(r.randint(1, 9))
    payload = json.dumps({k: (int(v) if v.isdigit() else v) for k, v in fields.items()})
    wanted = r.sample(list(fields), r.randint(1, len(fields)))
    ask = r.choice(("Look up {} and report it.", "What is on record for {}?", "Find {}."))
    segs = [
        {"role": "model", "text": format_call(f'lookup(key="{key}")', call_id=call_id) + " " + format_trap()},
        {"role": "inject", "text": format_interrupt(call_id, payload)},
        {"role": "model", "text": " " + ", ".join(f"{k} {fields[k]}" for k in wanted) + "."},
    ]
    return ([{"role": "user", "content": ask.format(key)}], segs, [LOOKUP_TOOL])


def _call_ids(p: Pools, k: int) -> list[str]:
    letter = p.rng.choice("abcdefghkmnprstw")
    if p.rng.random() < 0.5:
        return [f"{letter}{i + 1}" for i in range(k)]
    return [f"{x}{p.rng.randint(1, 9)}" for x in p.rng.sample("abcdefghkmnprstw", k)]


def _calls(p: Pools, o: DrillOptions) -> _Drill:
    r = p.rng
    keys = [v for _, v in _values(p, o.n_calls(p))]
    ids = _call_ids(p, len(keys))
    field = r.choice(_FIELDS)
    results = {cid: (k, _value(p, field)) for cid, k in zip(ids, keys)}
    listed = ", ".join(keys[:-1]) + " and " + keys[-1]
    ask = r.choice(("Look up {} (one call each).", "Find {}.", "Run lookup for {}.", "What is on record for {}?"))
    segs: list[dict[str, str]] = [{
        "role": "model",
        "text": " ".join(format_call(f'lookup(key="{k}")', call_id=cid) for cid, k in zip(ids, keys)) + " " + format_trap(),
    }]
    order = list(ids)
    r.shuffle(order)
    for i, cid in enumerate(order):
        key, val = results[cid]
        segs.append({"role": "inject", "text": format_interrupt(cid, json.dumps({"key": key, field: val}))})
        tail = " " + format_trap() if i < len(order) - 1 else ""
        segs.append({"role": "model", "text": f" {key}: {field} {val}.{tail}"})
    return ([{"role": "user", "content": ask.format(listed)}], segs, [LOOKUP_TOOL])


_NAME_PARTS = ("calc", "get", "find", "stats", "geo", "finance", "compute", "search", "weather", "sports", "math",
               "chem", "music", "city", "event", "price", "score", "route", "data", "mean", "area", "rate", "info",
               "player", "stock", "time", "zone", "volume", "density", "recipe", "movie", "team", "tax", "loan")
_ARG_NAMES = ("location", "year", "amount", "name", "unit", "rate", "count", "city", "team", "date", "radius",
              "values", "limit", "category", "mode", "precision", "country", "genre", "duration", "detailed")


def _made_up_name(p: Pools) -> str:
    r = p.rng
    parts = r.sample(_NAME_PARTS, r.randint(2, 3))
    name = "_".join(parts)
    if r.random() < 0.3:
        name = r.choice(_NAME_PARTS) + "." + name
    return name


def _made_up_tool(name: str, args: dict[str, str], latency_ms: int | None = None) -> dict[str, Any]:
    """A tool schema for a made-up name: ``args`` maps argument names to JSON types, all required."""
    function: dict[str, Any] = {
        "name": name, "description": name.replace("_", " ").replace(".", " ") + ".",
        "parameters": {"type": "object", "properties": {a: {"type": t} for a, t in args.items()}, "required": list(args)}}
    if latency_ms is not None:
        function["x-latency-ms"] = latency_ms
    return {"type": "function", "function": function}


_TYPES = ("integer", "integer", "number", "string", "string", "boolean", "array")


def _literal(p: Pools, type_: str) -> Any:
    r = p.rng
    if type_ == "integer":
        return r.choice((r.randint(1, 20), r.randint(10, 5000)))
    if type_ == "number":
        return round(r.uniform(0.01, 100), r.choice((1, 2)))
    if type_ == "boolean":
        return r.random() < 0.5
    if type_ == "array":
        return [r.randint(1, 99) for _ in range(r.randint(2, 4))]
    return _value(p, r.choice(("city", "name", "date", "title", "symbol")))


def _distinct_names(p: Pools, k: int) -> list[str]:
    """``k`` different made-up tool names."""
    names: list[str] = []
    while len(names) < k:
        name = _made_up_name(p)
        if name not in names:
            names.append(name)
    return names


def _close_times(p: Pools, k: int) -> list[int]:
    """``k`` expected times of 20-900 ms that lie in one window of 20-120 ms (wider for many calls:
    at least ``3 * k``), each at least 2 ms from the others: only the tens and units tell them apart."""
    r = p.rng
    width = r.randint(max(20, 3 * k), max(120, 3 * k))
    low = r.randint(20, 900 - width)
    times: list[int] = []
    while len(times) < k:  # a point blocks at most 3 of the window's width + 1 values: never stuck
        ms = r.randint(low, low + width)
        if all(abs(ms - t) >= 2 for t in times):
            times.append(ms)
    return times


def _draws_close(p: Pools, close_times: float) -> bool:
    """Whether a drill's times are drawn close together: with probability ``close_times``, a draw
    only when it is above 0 (so the default keeps every earlier drill's draws)."""
    return close_times > 0 and p.rng.random() < close_times


def _spaced_times(p: Pools, k: int, gap_ms: int, close_times: float = 0.0) -> list[int]:
    """``k`` expected times of 20-900 ms, each at least ``gap_ms`` from the others; with probability
    ``close_times`` :func:`_close_times` instead."""
    if _draws_close(p, close_times):
        return _close_times(p, k)
    times: list[int] = []
    while len(times) < k:
        ms = p.rng.randint(20, 900)
        if all(abs(ms - t) >= gap_ms for t in times):
            times.append(ms)
    return times


def _plan_task(
    p: Pools, n_calls: int | None = None, distinct: bool = False, call_range: tuple[int, int] = (1, 4),
    close_times: float = 0.0, layout: str = "call-first",
) -> Task:
    """A cheat-sheet task over 1-3 made-up tools: ``n_calls`` calls (default: drawn from ``call_range``)
    with 20-900 ms each (with probability ``close_times``: all in one narrow window, :func:`_close_times`);
    ``distinct``: no call repeats an earlier one (same tool and arguments), as the runtime's
    ``no_repeat_calls`` demands (the drills keep the draws they always had)."""
    r = p.rng
    signatures: list[tuple[str, dict[str, str]]] = []
    for _ in range(r.randint(1, 3)):
        signatures.append((_made_up_name(p), {a: r.choice(_TYPES) for a in r.sample(_ARG_NAMES, r.randint(1, 3))}))
    calls: list[PlannedCall] = []
    k = r.randint(*call_range) if n_calls is None else n_calls
    close = _close_times(p, k) if _draws_close(p, close_times) else None
    for i in range(k):
        name, args = signatures[i] if i < len(signatures) else r.choice(signatures)
        values = {a: _literal(p, t) for a, t in args.items()}
        if distinct:
            for _ in range(50):
                if all(c.name != name or c.arguments != values for c in calls):
                    break
                values = {a: _literal(p, t) for a, t in args.items()}  # e.g. the one boolean drawn again
            else:  # every value of the signature taken: a tool of its own
                name, args = _made_up_name(p), {"value": "integer"}
                signatures.append((name, args))
                values = {"value": r.randint(10, 5000)}
        ms = close[i] if close is not None else r.randint(20, 900)
        calls.append(PlannedCall(f"c{i + 1}", name, values, latency_s=ms / 1000.0))
    tools = [_made_up_tool(name, args) for name, args in signatures]
    ask = r.choice(_PLAN_ASKS)
    used = len({c.name for c in calls})
    category = ("parallel_multiple" if used > 1 else "parallel") if len(calls) > 1 else ("multiple" if len(tools) > 1 else "simple")
    return with_cheat_sheet(Task("drill", "drill", category, [{"role": "user", "content": ask}], tools, calls), layout=layout)


def _rank_task(p: Pools, n_calls: int, close_times: float = 0.0, layout: str = "call-first") -> Task:
    """A cheat-sheet task of ``n_calls`` made-up tools without parameters (``c1 name() ~300ms``),
    their times 20-900 ms and at least 5 ms apart (``close_times``: see :func:`_spaced_times`):
    only the times tell the calls' order."""
    r = p.rng
    names = _distinct_names(p, n_calls)
    times = _spaced_times(p, n_calls, gap_ms=5, close_times=close_times)
    calls = [PlannedCall(f"c{i + 1}", n, {}, latency_s=t / 1000.0) for i, (n, t) in enumerate(zip(names, times))]
    tools = [_made_up_tool(n, {}) for n in names]
    ask = r.choice(_PLAN_ASKS)
    category = "parallel_multiple" if n_calls > 1 else "simple"
    return with_cheat_sheet(Task("drill", "drill", category, [{"role": "user", "content": ask}], tools, calls), layout=layout)


def _variants_task(p: Pools, n_calls: int, close_times: float = 0.0, layout: str = "call-first") -> Task:
    """A cheat-sheet task of ``n_calls`` calls to one made-up tool (sometimes a second tool takes
    the last call) whose arguments share their values but one, as BFCL's parallel requests do
    (``c1 f(temp=300, gas="air") ~90ms; c2 f(temp=350, gas="air") ~420ms``); times 20-900 ms, at
    least 5 ms apart. The request names the varied values half of the time, as BFCL's questions do."""
    r = p.rng
    names = _distinct_names(p, 2)
    arg_names = r.sample(_ARG_NAMES, r.randint(2, 4))
    types = {a: r.choice(_TYPES) for a in arg_names}
    varied = r.choice([a for a in arg_names if types[a] != "boolean"] or arg_names)
    if types[varied] == "boolean":
        types[varied] = "string"  # two booleans cannot tell more than two calls apart
    base = {a: _literal(p, t) for a, t in types.items()}
    second_args = {a: r.choice(_TYPES) for a in r.sample(_ARG_NAMES, r.randint(1, 2))}
    with_second = n_calls > 2 and r.random() < 0.3
    times = _spaced_times(p, n_calls, gap_ms=5, close_times=close_times)
    calls: list[PlannedCall] = []
    seen: list[Any] = []
    for i in range(n_calls):
        if with_second and i == n_calls - 1:
            name, values = names[1], {a: _literal(p, t) for a, t in second_args.items()}
        else:
            values = dict(base)
            if i:
                for _ in range(50):  # a value no earlier call has
                    values[varied] = _literal(p, types[varied])
                    if values[varied] not in seen:
                        break
                else:  # never in practice; keeps the calls distinct, as the runtime's no_repeat_calls demands
                    kind = types[varied]
                    values[varied] = (5001 + i if kind in ("integer", "number")
                                      else [5001 + i] if kind == "array" else f"{values[varied]} {i + 1}")
            name = names[0]
            seen.append(values[varied])
        calls.append(PlannedCall(f"c{i + 1}", name, values, latency_s=times[i] / 1000.0))
    tools = [_made_up_tool(names[0], types)] + ([_made_up_tool(names[1], second_args)] if with_second else [])
    if r.random() < 0.5:
        shown = [json.dumps(v) if not isinstance(v, str) else v for v in seen]
        ask = r.choice(("Run {} with {} {}.", "I need {} for {} {}.", "Please check {} for each {}: {}.")).format(
            names[0].split(".")[-1].replace("_", " "), varied, ", ".join(shown[:-1]) + " and " + shown[-1])
    else:
        ask = r.choice(_PLAN_ASKS)
    category = "parallel_multiple" if with_second else "parallel"
    return with_cheat_sheet(Task("drill", "drill", category, [{"role": "user", "content": ask}], tools, calls), layout=layout)


def _plan_segments(task: Task) -> list[dict[str, str]]:
    """Every planned call verbatim, longest expected time first, a trap; results shortest first, then ``Done.``"""
    calls = task.calls
    ms = {c.call_id: round(c.latency_s * 1000) for c in calls}
    lpt = sorted(calls, key=lambda c: (-ms[c.call_id], c.call_id))
    segs: list[dict[str, str]] = [{
        "role": "model", "text": " ".join(format_call(c.body(), call_id=c.call_id) for c in lpt) + " " + format_trap()}]
    # all start at about the same time: shortest first back
    for i, c in enumerate(sorted(calls, key=lambda c: (ms[c.call_id], c.call_id))):
        segs.append({"role": "inject", "text": format_interrupt(c.call_id, json.dumps({"result": "ok"}))})
        segs.append({"role": "model", "text": " " + format_trap() if i < len(calls) - 1 else " Done."})
    return segs


def _plan_drill(task: Task) -> _Drill:
    """A cheat-sheet task as a drill: its request and tools, the model's part by :func:`_plan_segments`."""
    return task.messages, _plan_segments(task), task.tools


def _plan(p: Pools, o: DrillOptions) -> _Drill:
    return _plan_drill(_plan_task(p, call_range=o.calls or (1, 4), close_times=o.close_times, layout=o.plan_layout))


def _rank(p: Pools, o: DrillOptions) -> _Drill:
    return _plan_drill(_rank_task(p, o.n_calls(p), close_times=o.close_times, layout=o.plan_layout))


def _variants(p: Pools, o: DrillOptions) -> _Drill:
    return _plan_drill(_variants_task(p, o.n_calls(p), close_times=o.close_times, layout=o.plan_layout))


def _order(p: Pools, o: DrillOptions) -> _Drill:
    r = p.rng
    k = o.n_calls(p)
    n_tools = k + r.randint(0, 3)
    names = _distinct_names(p, n_tools)
    # the longest-first order is never a tie (close times: 2 ms apart at least)
    times = _spaced_times(p, len(names), gap_ms=25, close_times=o.close_times)
    arg = {n: r.choice(_ARG_NAMES) for n in names}
    tools = [_made_up_tool(n, {arg[n]: "string"}, latency_ms=ms) for n, ms in zip(names, times)]
    latency = dict(zip(names, times))
    asked = r.sample(names, k)
    values = [v for _, v in _values(p, k)]
    ids: dict[str, str] = {}
    for n in asked:
        letter = n.split(".")[-1].split("_")[-1][0]
        i = 1
        while f"{letter}{i}" in ids.values():
            i += 1
        ids[n] = f"{letter}{i}"
    parts = [f"{n} for {v}" for n, v in zip(asked, values)]
    ask = r.choice(("Use {}.", "Please run {}.", "Call {}.", "I need {}."))
    listed = ", ".join(parts[:-1]) + " and " + parts[-1]
    field = r.choice(_FIELDS)
    results = {n: _value(p, field) for n in asked}
    value_of = dict(zip(asked, values))
    lpt = sorted(asked, key=lambda n: -latency[n])
    segs: list[dict[str, str]] = [{
        "role": "model",
        "text": " ".join(format_call(f'{n}({arg[n]}="{value_of[n]}")', call_id=ids[n]) for n in lpt) + " " + format_trap(),
    }]
    back = sorted(asked, key=lambda n: latency[n])  # all start together: shortest first back
    for i, n in enumerate(back):
        segs.append({"role": "inject", "text": format_interrupt(ids[n], json.dumps({field: results[n]}))})
        tail = " " + format_trap() if i < len(back) - 1 else ""
        segs.append({"role": "model", "text": f" {value_of[n]}: {field} {results[n]}.{tail}"})
    r.shuffle(tools)
    return [{"role": "user", "content": ask.format(listed)}], segs, tools


_MAKERS: dict[str, Callable[[Pools, DrillOptions], _Drill]] = {
    "echo": _echo,
    "pick": _pick,
    "result": _result,
    "calls": _calls,
    "plan": _plan,
    "order": _order,
    "rank": _rank,
    "variants": _variants,
}


def copy_drills(
    n: int,
    seed: int = 0,
    split: str = "train",
    kinds: Sequence[str] | None = None,
    calls: int | tuple[int, int] | None = None,
    close_times: float = 0.0,
    plan_layout: str = "call-first",
) -> list[dict[str, Any]]:
    """``n`` copy drills (kinds in turn), as trace dicts ``hf-asynclm train`` reads.

    Args:
        n: how many drills.
        seed: seed of the values and phrasings.
        split: value pool (``train``, ``eval`` or ``all``), as for the synthetic tasks.
        kinds: which of :data:`DRILL_KINDS` and :data:`EXTRA_DRILL_KINDS` to generate, in turn
            (default: all of :data:`DRILL_KINDS`).
        calls: the number of calls (or a ``(low, high)`` range, 2-8) of each drill of
            :data:`CALL_COUNT_KINDS`; default: as before (``plan`` 1-4, the others 2-4).
        close_times: the share of drills of :data:`TIMED_KINDS` whose expected times all lie in one
            window of 20-120 ms (:class:`DrillOptions`); default 0, the times spread over 20-900 ms.
            With either option at its default the drills are byte for byte what they were without it.
        plan_layout: how the plans of the ``plan``, ``rank`` and ``variants`` drills write each call
            (:data:`hf_asynclm.data.bfcl.PLAN_LAYOUTS`; default ``"call-first"``, as before the option).

    Returns:
        dicts with ``task_id``, ``mode="drill"``, ``source="drill"``, ``category`` (the kind),
        ``messages``, ``tools`` (``lookup`` for ``result`` and ``calls``, made-up tools for ``plan``), ``segments`` and ``meta``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    kinds = tuple(kinds) if kinds is not None else DRILL_KINDS
    unknown = sorted(set(kinds) - set(DRILL_KINDS) - set(EXTRA_DRILL_KINDS))
    if unknown or not kinds:
        raise ValueError(f"unknown drill kinds {unknown or '(none given)'}; "
                         f"choose from {list(DRILL_KINDS + EXTRA_DRILL_KINDS)}")
    options = DrillOptions(calls=(calls, calls) if isinstance(calls, int) else calls, close_times=close_times,
                           plan_layout=plan_layout)
    if options.calls is not None and not set(kinds) & set(CALL_COUNT_KINDS):
        raise ValueError(f"calls= sets the number of calls of the kinds {list(CALL_COUNT_KINDS)}; none of them is in {list(kinds)}")
    if options.close_times and not set(kinds) & set(TIMED_KINDS):
        raise ValueError(f"close_times= draws the times of the kinds {list(TIMED_KINDS)}; none of them is in {list(kinds)}")
    if options.plan_layout != "call-first" and not set(kinds) & set(PLAN_KINDS):
        raise ValueError(f"plan_layout= writes the plans of the kinds {list(PLAN_KINDS)}; none of them is in {list(kinds)}")
    pools = Pools(random.Random(f"drills-{seed}-{split}"), split=split)
    meta_options: dict[str, Any] = {}
    if options.calls is not None:
        meta_options["calls"] = list(options.calls)
    if options.close_times:
        meta_options["close_times"] = options.close_times
    if options.plan_layout != "call-first":
        meta_options["plan_layout"] = options.plan_layout
    out: list[dict[str, Any]] = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        messages, segments, tools = _MAKERS[kind](pools, options)
        out.append({
            "task_id": f"drill-{split}-{seed}-{i}",
            "mode": "drill",
            "source": "drill",
            "category": kind,
            "messages": messages,
            "tools": tools,
            "segments": segments,
            "meta": {"seed": seed, "kind": kind, **meta_options},
        })
    return out


def plan_tasks(
    n: int, seed: int = 0, split: str = "eval", calls: tuple[int, int] = (2, 4), arguments: bool = True,
    close_times: float = 0.0, layout: str = "call-first",
) -> list[Task]:
    """``n`` plan-drill tasks to *evaluate* on: the ``plan`` drill's prompt as a :class:`Task`.

    Each holds 1-3 made-up tools and ``calls[0]``-``calls[1]`` independent, distinct calls with
    20-900 ms each, listed in a cheat-sheet plan (:func:`hf_asynclm.data.bfcl.with_cheat_sheet`), so
    :func:`hf_asynclm.evaluation.evaluate_bfcl` scores them like BFCL tasks: calls copied right,
    the LPT order (longest expected time first) and traps. Unlike BFCL the tool names and
    values are new in every task and the format is the one the drills train, so the LPT order
    rate measures the one skill of comparing expected times. ``arguments=False``: the ``rank``
    drills' tasks instead (tools without parameters, one per call). ``close_times``: the share of tasks
    whose expected times all lie in one window of 20-120 ms (:class:`DrillOptions`; 0 keeps the tasks
    of every earlier evaluation). ``layout``: how the plan writes each call
    (:data:`hf_asynclm.data.bfcl.PLAN_LAYOUTS`; the checkpoint's ``AsyncLM.plan_layout``). Tasks of one ``seed`` are the same
    on every run; the default seed stream is not the drills' (``copy_drills`` uses
    ``drills-{seed}-{split}``, these ``plan-tasks-{seed}-{split}``).

    Example:

    ```python
    >>> from hf_asynclm.data.drills import plan_tasks
    >>> ts = plan_tasks(3, seed=0)
    >>> [len(t.calls) >= 2 for t in ts], ts[0].task_id, ts[0].meta["cheat_sheet"]
    ([True, True, True], 'plan-eval-0-0', True)

    ```
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    lo, hi = calls
    if not 1 <= lo <= hi:
        raise ValueError(f"calls must be (low, high) with 1 <= low <= high, got {calls}")
    DrillOptions(close_times=close_times, plan_layout=layout)  # checks them
    pools = Pools(random.Random(f"plan-tasks-{seed}-{split}"), split=split)
    out = []
    for i in range(n):
        k = pools.rng.randint(lo, hi)
        task = (_plan_task(pools, n_calls=k, distinct=True, close_times=close_times, layout=layout) if arguments
                else _rank_task(pools, k, close_times=close_times, layout=layout))
        task.task_id = f"plan-{split}-{seed}-{i}"
        out.append(task)
    return out


__all__ = [
    "CALL_COUNT_KINDS", "DRILL_KINDS", "DrillOptions", "EXTRA_DRILL_KINDS", "LOOKUP_TOOL", "MAX_DRILL_CALLS",
    "PLAN_KINDS", "TIMED_KINDS", "copy_drills", "plan_tasks",
]
