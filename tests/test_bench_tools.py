"""Simulated BFCL tools: seeded latencies in the paper's range, deterministic schema-shaped results."""

from __future__ import annotations

import asyncio
import statistics

import pytest

from hf_asynclm.bench.tools import (
    LATENCY_MAX_MS,
    LATENCY_MEAN_MS,
    LATENCY_MIN_MS,
    ToolSet,
    call_key,
    sample_latency_ms,
    simulated_result,
    validate_task_calls,
)
from hf_asynclm.data import bfcl
from hf_asynclm.data.tasks import PlannedCall, Task

MINI = "tests/data/bfcl_mini"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "number"}}, "required": ["city"]},
    },
}


def _task(task_id: str = "t1") -> Task:
    calls = [PlannedCall("c1", "get_weather", {"city": "Oslo", "days": 2}), PlannedCall("c2", "get_weather", {"city": "Rome"})]
    return Task(task_id, "bfcl", "parallel", [{"role": "user", "content": "?"}], [WEATHER], calls)


def test_latency_distribution_matches_the_paper_range() -> None:
    xs = [sample_latency_ms(f"k{i}") for i in range(20000)]
    assert min(xs) >= LATENCY_MIN_MS and max(xs) <= LATENCY_MAX_MS
    assert abs(statistics.fmean(xs) - LATENCY_MEAN_MS) < 3.0
    assert max(xs) == LATENCY_MAX_MS  # the clip is reached: the tail goes to 500 ms


def test_latency_is_a_pure_function_of_seed_task_and_call() -> None:
    a, b = ToolSet(_task(), seed=0), ToolSet(_task(), seed=0)
    assert a.planned_latencies() == b.planned_latencies()
    assert ToolSet(_task(), seed=1).planned_latencies() != a.planned_latencies()
    assert ToolSet(_task("other"), seed=0).planned_latencies() != a.planned_latencies()
    # the key does not care how the model spells an integral float or a tuple
    assert call_key(0, "t", "f", {"x": 2.0, "y": (1, 2)}) == call_key(0, "t", "f", {"y": [1, 2], "x": 2})
    # what the handler is called with gives the planned latency
    assert a.latency_s("get_weather", {"days": 2.0, "city": "Oslo"}) == a.planned_latencies()["c1"]


def test_results_are_deterministic_and_the_handlers_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    tools = ToolSet(_task(), seed=0, latency_scale=0.01)
    slept: list[float] = []
    monkeypatch.setattr("hf_asynclm.bench.tools.time.sleep", lambda s: slept.append(s))
    r1 = tools.call_sync("get_weather", {"city": "Oslo", "days": 2})
    r2 = tools.call_sync("get_weather", {"city": "Oslo", "days": 2})
    assert r1 == r2 and r1 != tools.call_sync("get_weather", {"city": "Rome"})
    assert slept[0] == pytest.approx(tools.planned_latencies()["c1"])
    # the async handler (what the executor awaits) returns the same result
    tool = tools.tools["get_weather"]
    assert asyncio.run(tool.acall(city="Oslo", days=2)) == r1
    assert len(tool.runs) == 4
    registry = tools.registry()
    assert registry.get("get_weather").is_async
    assert not tools.registry(asynchronous=False).get("get_weather").is_async


def test_results_follow_the_return_schema() -> None:
    fn = {
        "name": "authenticate_twitter",
        "parameters": {"type": "dict", "properties": {}},
        "return": {"type": "dict", "properties": {"authentication_status": {"type": "boolean"}, "count": {"type": "integer"},
                                                  "items": {"type": "array", "items": {"type": "string"}}}},
    }
    out = simulated_result(fn, {}, "k")
    assert set(out) == {"authentication_status", "count", "items"}
    assert isinstance(out["authentication_status"], bool) and isinstance(out["count"], int)
    assert all(isinstance(x, str) for x in out["items"])
    plain = simulated_result(WEATHER, {"city": "Oslo"}, "k")
    assert plain["status"] == "ok" and isinstance(plain["get_weather"], str)
    enum = simulated_result({"name": "f", "return": {"type": "string", "enum": ["a", "b"]}}, {}, "k")
    assert enum in ("a", "b")


def test_bfcl_tasks_get_a_tool_per_function_and_latency_from_schema() -> None:
    task = bfcl.load_tasks("multi_turn_base", MINI)[0]
    tools = ToolSet(task, seed=3)
    assert set(tools.tools) == {t["function"]["name"] for t in task.tools}
    assert all(0.03 <= s <= 0.5 for s in tools.planned_latencies().values())
    hinted = Task("s", "synthetic", "single", [], [{**WEATHER, "function": {**WEATHER["function"], "x-latency-ms": 250}}],
                  [PlannedCall("w1", "get_weather", {"city": "Oslo"})])
    hinted_s = ToolSet(hinted, latency_from_schema=True).planned_latencies()["w1"]
    assert 0.225 <= hinted_s <= 0.275 and hinted_s == ToolSet(hinted, latency_from_schema=True).planned_latencies()["w1"]
    assert 0.03 <= ToolSet(hinted).planned_latencies()["w1"] <= 0.5  # without the flag: sampled


def test_validate_task_calls_finds_ground_truth_that_breaks_its_schema() -> None:
    assert validate_task_calls(_task()) is None
    bad = _task()
    bad.calls[0] = PlannedCall("c1", "get_weather", {"city": 3})
    assert "city" in (validate_task_calls(bad) or "")
    unknown = _task()
    unknown.calls.append(PlannedCall("c3", "nope", {}))
    assert "unknown function" in (validate_task_calls(unknown) or "")
