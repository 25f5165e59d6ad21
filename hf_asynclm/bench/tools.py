"""Simulated tools for the benchmarks: seeded latencies, deterministic schema-shaped results.

Every function of a task gets a handler that waits its sampled latency and returns a result
built from the function's schema. The latency of a call is a pure function of
``(seed, task id, function name, arguments)``: every mode of a benchmark run (and every rerun
with the same seed) sees the same latency for the same call, whoever writes it.

Latencies follow the paper's measured range (AsyncLM section 6: 30 - 500 ms, mean 110 ms):
a shifted exponential, ``30 ms + Exp(scale)`` clipped at 500 ms, whose scale is solved so
that the clipped mean is exactly 110 ms (:data:`LATENCY_SCALE_MS`, about 80.2 ms).

Results: when the schema says what the function returns (BFCL multi-turn functions carry a
``return`` / ``response`` object schema) a value of that shape, otherwise
``{"status": "ok", "<function>": "<token>"}``; values are derived from a hash of the call, so
the same call always returns the same result. The synthetic workload passes its own result
function (:func:`hf_asynclm.data.synthetic.tool_result`), whose results carry the values that
later calls copy.

Example:

```python
>>> from hf_asynclm.bench.tools import ToolSet, sample_latency_ms
>>> from hf_asynclm.data.tasks import PlannedCall, Task
>>> schema = {"type": "function", "function": {"name": "get_weather", "description": "Weather.",
...     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
>>> task = Task("t1", "bfcl", "parallel", [], [schema], [PlannedCall("c1", "get_weather", {"city": "Oslo"})])
>>> tools = ToolSet(task, seed=0, latency_scale=0.01)
>>> tools.latency_s("get_weather", {"city": "Oslo"}) == tools.planned_latencies()["c1"]
True
>>> tools.call_sync("get_weather", {"city": "Oslo"}) == tools.call_sync("get_weather", {"city": "Oslo"})
True
>>> 30 <= sample_latency_ms("any key") <= 500
True

```
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..data.tasks import Task
from ..executor.registry import Tool, ToolRegistry

__all__ = [
    "LATENCY_MIN_MS",
    "LATENCY_MAX_MS",
    "LATENCY_MEAN_MS",
    "LATENCY_SCALE_MS",
    "sample_latency_ms",
    "call_key",
    "simulated_result",
    "ToolSet",
    "SimulatedTool",
    "validate_task_calls",
]

LATENCY_MIN_MS = 30.0
LATENCY_MAX_MS = 500.0
LATENCY_MEAN_MS = 110.0


def _clipped_mean(scale: float, low: float, high: float) -> float:
    # E[min(low + X, high)] for X ~ Exp(scale)
    return low + scale * (1.0 - math.exp(-(high - low) / scale))


def _solve_scale(low: float, high: float, mean: float) -> float:
    if not low < mean < high:
        raise ValueError(f"cannot fit a mean of {mean} ms into [{low}, {high}] ms")
    lo, hi = 1e-6, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        if _clipped_mean(mid, low, high) < mean:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


#: Scale of the exponential part, so that the clipped mean is :data:`LATENCY_MEAN_MS`.
LATENCY_SCALE_MS = _solve_scale(LATENCY_MIN_MS, LATENCY_MAX_MS, LATENCY_MEAN_MS)


def _unit(key: str) -> float:
    """A uniform number in (0, 1) from a string (sha256, stable across runs and machines)."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return (h + 0.5) / 2.0**64


def sample_latency_ms(key: str, low: float = LATENCY_MIN_MS, high: float = LATENCY_MAX_MS, mean: float = LATENCY_MEAN_MS) -> float:
    """The latency (ms) of the call identified by ``key``: ``low + Exp`` clipped at ``high``, mean ``mean``."""
    scale = LATENCY_SCALE_MS if (low, high, mean) == (LATENCY_MIN_MS, LATENCY_MAX_MS, LATENCY_MEAN_MS) else _solve_scale(low, high, mean)
    u = _unit(key)
    return min(high, low - scale * math.log(1.0 - u))


def _canon(value: Any) -> Any:
    """Values as the key sees them: tuples are lists, integral floats are ints (2.0 == 2)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping):
        return {str(k): _canon(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canon(v) for v in value]
    return repr(value)


def call_key(seed: int, task_id: str, name: str, arguments: Mapping[str, Any]) -> str:
    """The identity of a call for latency and result sampling."""
    args = json.dumps(_canon(dict(arguments)), sort_keys=True, ensure_ascii=False)
    return f"{seed}|{task_id}|{name}|{args}"


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------

_WORDS = ("alpha", "bravo", "cedar", "delta", "ember", "fjord", "gamma", "harbor", "indigo", "juniper", "koala", "lumen")


def _value_for(schema: Any, key: str, depth: int = 0) -> Any:
    """A deterministic value of the JSON-schema type ``schema`` (BFCL type names accepted)."""
    if not isinstance(schema, Mapping):
        schema = {}
    u = _unit(key)
    typ = schema.get("type")
    if isinstance(typ, list):
        typ = next((t for t in typ if t != "null"), "string")
    typ = {"dict": "object", "float": "number", "tuple": "array", "list": "array", "str": "string", "int": "integer", "bool": "boolean"}.get(
        str(typ).lower() if typ else "", typ
    )
    if "enum" in schema and isinstance(schema["enum"], list) and schema["enum"]:
        return schema["enum"][int(u * len(schema["enum"])) % len(schema["enum"])]
    if typ == "integer":
        return int(u * 1000)
    if typ == "number":
        return round(u * 1000, 2)
    if typ == "boolean":
        return u < 0.5
    if typ == "array":
        if depth >= 2:
            return []
        return [_value_for(schema.get("items") or {"type": "string"}, f"{key}/{i}", depth + 1) for i in range(1 + int(u * 2))]
    if typ == "object":
        props = schema.get("properties") or {}
        if depth >= 2 or not props:
            return {}
        return {p: _value_for(s, f"{key}/{p}", depth + 1) for p, s in list(props.items())[:6]}
    return f"{_WORDS[int(u * len(_WORDS)) % len(_WORDS)]}-{int(u * 1e6) % 10000:04d}"


def simulated_result(function: Mapping[str, Any], arguments: Mapping[str, Any], key: str) -> Any:
    """A deterministic, schema-shaped result of calling ``function`` with ``arguments``."""
    fn = function.get("function", function) if isinstance(function, Mapping) else {}
    ret = fn.get("return") or fn.get("response") or fn.get("returns")
    if isinstance(ret, Mapping) and (ret.get("properties") or ret.get("type") not in (None, "object", "dict")):
        return _value_for(ret, key)
    return {"status": "ok", fn.get("name", "result"): _value_for({"type": "string"}, key)}


# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------


class SimulatedTool:
    """One simulated function: waits the call's sampled latency, returns its result.

    ``__call__`` is the plain (blocking) form a synchronous loop calls directly; ``acall`` the
    ``async def`` form the hf-asynclm executor awaits on its event loop (no worker thread).
    """

    def __init__(
        self,
        schema: Mapping[str, Any],
        task_id: str,
        seed: int,
        latency_scale: float = 1.0,
        result_fn: Callable[[str, dict[str, Any]], Any] | None = None,
        sleep: bool = True,
        latency_from_schema: bool = False,
    ) -> None:
        self.schema = dict(schema)
        self.function = self.schema.get("function", self.schema)
        self.name = str(self.function["name"])
        self.task_id = task_id
        self.seed = seed
        self.latency_scale = latency_scale
        self.result_fn = result_fn
        self.sleep = sleep
        hint = self.function.get("x-latency-ms", self.schema.get("x-latency-ms"))
        self.fixed_latency_ms: float | None = float(hint) if latency_from_schema and hint is not None else None
        #: (arguments, started, finished) of each run, in completion order
        self.runs: list[tuple[dict[str, Any], float, float]] = []

    def key(self, arguments: Mapping[str, Any]) -> str:
        return call_key(self.seed, self.task_id, self.name, arguments)

    def latency_s(self, arguments: Mapping[str, Any]) -> float:
        """The call's latency in seconds (sampled in ms, or the schema's ``x-latency-ms``, times ``latency_scale``)."""
        if self.fixed_latency_ms is not None:
            # the advertised latency is an estimate: the call takes it +-10 % (seeded per call), so
            # that two calls of one tool do not tie exactly
            ms = self.fixed_latency_ms * (0.9 + 0.2 * _unit("jitter|" + self.key(arguments)))
        else:
            ms = sample_latency_ms(self.key(arguments))
        return ms * self.latency_scale / 1000.0

    def result(self, arguments: Mapping[str, Any]) -> Any:
        if self.result_fn is not None:
            return self.result_fn(self.name, dict(arguments))
        return simulated_result(self.function, arguments, self.key(arguments))

    def __call__(self, **arguments: Any) -> Any:
        t0 = time.monotonic()
        if self.sleep:
            time.sleep(self.latency_s(arguments))
        out = self.result(arguments)
        self.runs.append((dict(arguments), t0, time.monotonic()))
        return out

    async def acall(self, **arguments: Any) -> Any:
        t0 = time.monotonic()
        if self.sleep:
            await asyncio.sleep(self.latency_s(arguments))
        out = self.result(arguments)
        self.runs.append((dict(arguments), t0, time.monotonic()))
        return out


class ToolSet:
    """The simulated tools of one task.

    Args:
        task: the task; each schema in ``task.tools`` becomes a :class:`SimulatedTool`.
        seed: latency / result seed.
        latency_scale: multiply every latency (tests use small values).
        result_fn: ``(name, arguments) -> result`` replacing the schema-shaped results.
        latency_from_schema: a function whose schema has ``"x-latency-ms"`` (the synthetic
            tasks show it to the model) takes that latency, +-10 % per call, instead of a
            sampled one.
    """

    def __init__(
        self,
        task: Task,
        seed: int = 0,
        latency_scale: float = 1.0,
        result_fn: Callable[[str, dict[str, Any]], Any] | None = None,
        latency_from_schema: bool = False,
    ) -> None:
        self.task = task
        self.seed = seed
        self.latency_scale = latency_scale
        self.tools: dict[str, SimulatedTool] = {}
        for schema in task.tools:
            tool = SimulatedTool(schema, task.task_id, seed, latency_scale, result_fn, latency_from_schema=latency_from_schema)
            self.tools.setdefault(tool.name, tool)

    def latency_s(self, name: str, arguments: Mapping[str, Any]) -> float:
        return self.tools[name].latency_s(arguments)

    def planned_latencies(self) -> dict[str, float]:
        """Latency (s) of each planned call of the task, by call id."""
        return {c.call_id: self.latency_s(c.name, c.arguments) for c in self.task.calls if c.name in self.tools}

    def call_sync(self, name: str, arguments: Mapping[str, Any]) -> Any:
        """Run a call in the calling thread (what a plain synchronous loop does)."""
        return self.tools[name](**dict(arguments))

    def registry(self, asynchronous: bool = True) -> ToolRegistry:
        """A :class:`ToolRegistry` for :class:`~hf_asynclm.asynclm.AsyncLM` (``async def`` handlers by default)."""
        reg = ToolRegistry()
        for tool in self.tools.values():
            handler = tool.acall if asynchronous else tool
            reg.add(Tool.from_schema(tool.schema, handler))
        return reg

    def reset(self) -> None:
        for tool in self.tools.values():
            tool.runs.clear()


def validate_task_calls(task: Task) -> str | None:
    """None when every planned call of ``task`` passes the executor's checks, else why not.

    BFCL has a few ground-truth values that break their own schema; the runtime would answer
    such a call with an error interrupt, so benchmarks leave those tasks out.
    """
    from ..executor.parsing import ArgumentError, CallParseError, bind_arguments, parse_call

    try:
        reg = ToolRegistry([(schema, lambda **kw: None) for schema in task.tools])
    except (ValueError, TypeError) as exc:
        return f"bad tool schema: {exc}"
    for c in task.calls:
        if c.name not in reg:
            return f"{c.call_id}: unknown function {c.name}"
        try:
            bind_arguments(parse_call(c.body()), reg.get(c.name))
        except (ArgumentError, CallParseError) as exc:
            return f"{c.call_id}: {exc}"
    return None
