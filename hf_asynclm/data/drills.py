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
  reports some fields of the result that arrives as an interrupt (quoting a result).

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

```
"""

from __future__ import annotations

import json
import random
from typing import Any, Callable

from ..cml import format_call, format_interrupt, format_trap
from .synthetic import Pools

#: Drill kinds, generated in turn.
DRILL_KINDS: tuple[str, ...] = ("echo", "pick", "result")

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


def _echo(p: Pools) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    vals = [v for _, v in _values(p, p.rng.randint(2, 5))]
    ask = p.rng.choice(("Repeat: {}.", "Say back {}.", "Copy exactly: {}", "Echo {}"))
    sep = p.rng.choice((", ", "; ", " "))
    return ([{"role": "user", "content": ask.format(sep.join(vals))}], [{"role": "model", "text": sep.join(vals) + "."}])


def _pick(p: Pools) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
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
    return ([{"role": "user", "content": ask.format(listed, " and ".join(wanted))}], [{"role": "model", "text": answer}])


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


def _result(p: Pools) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
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
    return ([{"role": "user", "content": ask.format(key)}], segs)


_MAKERS: dict[str, Callable[[Pools], tuple[list[dict[str, Any]], list[dict[str, str]]]]] = {
    "echo": _echo,
    "pick": _pick,
    "result": _result,
}


def copy_drills(n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """``n`` copy drills (kinds in turn), as trace dicts ``hf-asynclm train`` reads.

    Args:
        n: how many drills.
        seed: seed of the values and phrasings.
        split: value pool (``train``, ``eval`` or ``all``), as for the synthetic tasks.

    Returns:
        dicts with ``task_id``, ``mode="drill"``, ``source="drill"``, ``category`` (the kind),
        ``messages``, ``tools`` (``lookup`` for ``result`` drills, else none), ``segments`` and ``meta``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pools = Pools(random.Random(f"drills-{seed}-{split}"), split=split)
    out: list[dict[str, Any]] = []
    for i in range(n):
        kind = DRILL_KINDS[i % len(DRILL_KINDS)]
        messages, segments = _MAKERS[kind](pools)
        out.append({
            "task_id": f"drill-{split}-{seed}-{i}",
            "mode": "drill",
            "source": "drill",
            "category": kind,
            "messages": messages,
            "tools": [LOOKUP_TOOL] if kind == "result" else [],
            "segments": segments,
            "meta": {"seed": seed, "kind": kind},
        })
    return out


__all__ = ["DRILL_KINDS", "LOOKUP_TOOL", "copy_drills"]
