"""Tool-use tasks as DAGs of calls: the common currency of the simulator, training and benchmarks.

A :class:`Task` is a request (chat messages), the tools it may use (JSON schemas in the
``{"type": "function", "function": {...}}`` form that chat templates take) and the calls that
answer it, as a DAG: a :class:`PlannedCall` lists the calls whose results it needs.

Example:

```python
>>> from hf_asynclm.data.tasks import PlannedCall, Task
>>> t = Task(task_id="t0", source="synthetic", category="chain",
...          messages=[{"role": "user", "content": "Weather where flight AF12 lands?"}],
...          tools=[], calls=[PlannedCall("f1", "get_flight", {"code": "AF12"}),
...                           PlannedCall("w1", "get_weather", {"city": "Paris"}, depends_on=["f1"])])
>>> [c.call_id for c in t.topological_order()]
['f1', 'w1']
>>> Task.from_dict(t.to_dict()) == t
True

```
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class PlannedCall:
    """One node of a task's call DAG.

    ``arguments`` are the literal values of the call once its inputs are known;
    ``depends_on`` lists the ids of calls whose results it needs (their values appear in
    ``arguments``, copied out of the interrupts); ``latency_s`` is the execution time the
    simulator or benchmark assigns (None: not assigned yet).
    """

    call_id: str
    name: str
    arguments: dict[str, Any]
    depends_on: list[str] = field(default_factory=list)
    latency_s: float | None = None

    def body(self) -> str:
        """The call as CML writes it: ``name(key=value, ...)`` with Python literals."""
        args = ", ".join(f"{k}={_py_literal(v)}" for k, v in self.arguments.items())
        return f"{self.name}({args})"


def _py_literal(value: Any) -> str:
    if isinstance(value, str):
        # double quotes, like most models write; repr-escape the content
        inner = repr(value)[1:-1] if "'" not in value else repr(value)[1:-1].replace("\\'", "'")
        return '"' + inner.replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_py_literal(k)}: {_py_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_py_literal(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    return repr(value)


@dataclass
class Task:
    """A request, its tools and the DAG of calls that answers it."""

    task_id: str
    source: str
    category: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    calls: list[PlannedCall]
    answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def call(self, call_id: str) -> PlannedCall:
        """The planned call with this id."""
        for c in self.calls:
            if c.call_id == call_id:
                return c
        raise KeyError(f"task {self.task_id!r} has no call {call_id!r}")

    def topological_order(self) -> list[PlannedCall]:
        """Calls in an order where every call comes after the calls it depends on."""
        done: set[str] = set()
        order: list[PlannedCall] = []
        pending = list(self.calls)
        while pending:
            ready = [c for c in pending if all(d in done for d in c.depends_on)]
            if not ready:
                raise ValueError(f"task {self.task_id!r}: the call graph has a cycle or an unknown dependency")
            for c in ready:
                order.append(c)
                done.add(c.call_id)
                pending.remove(c)
        return order

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Task":
        data = dict(data)
        data["calls"] = [PlannedCall(**c) for c in data.get("calls", [])]
        return cls(**data)
