"""Tool registry and the concurrent tool executor.

Timing assertions compare orderings or ratios of measured times, never absolute durations.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import threading
import time
import weakref

import pytest

from hf_asynclm.cml import format_interrupt, parse_blocks
from hf_asynclm.executor import (
    CallRecord,
    Interrupt,
    Tool,
    ToolExecutor,
    ToolRegistry,
    UnknownToolError,
)

# ---------------------------------------------------------------------------------------------
# tools used by the tests
# ---------------------------------------------------------------------------------------------


def get_weather(city: str, days: int = 1) -> dict:
    """Weather forecast for a city.

    Args:
        city: Name of the city.
        days: Number of days.
    """
    return {"city": city, "days": days, "temp_c": 18}


async def aget_weather(city: str) -> dict:
    """Weather, asynchronously.

    Args:
        city: Name of the city.
    """
    await asyncio.sleep(0.01)
    return {"city": city, "temp_c": 20}


def _schema(name: str, **properties: str) -> dict:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} tool",
            "parameters": {
                "type": "object",
                "properties": {k: {"type": v} for k, v in properties.items()},
                "required": list(properties),
            },
        },
    }


def _fn(name: str, required: tuple[str, ...] = (), **properties: dict) -> dict:
    """A bare function schema whose properties are given as JSON schemas."""
    return {"name": name, "parameters": {"type": "object", "properties": properties, "required": list(required)}}


def _sleep(seconds: float, value: object = "ok") -> object:
    time.sleep(seconds)
    return value


async def _asleep(seconds: float, value: object = "ok") -> object:
    await asyncio.sleep(seconds)
    return value


def _raise(message: str) -> None:
    raise ValueError(message)


SLEEP = Tool.from_schema(_fn("sleep", ("seconds",), seconds={"type": "number"}, value={}), _sleep)
ASLEEP = Tool.from_schema(_fn("asleep", ("seconds",), seconds={"type": "number"}, value={}), _asleep)
ECHO = Tool.from_schema(_fn("echo", x={}), lambda x=None: x)
FAIL = Tool.from_schema(_schema("fail", message="string"), _raise)


@pytest.fixture
def make_executor():
    created: list[ToolExecutor] = []

    def factory(tools=(SLEEP, ASLEEP, ECHO, FAIL), **kwargs) -> ToolExecutor:
        executor = ToolExecutor(list(tools), **kwargs)
        created.append(executor)
        return executor

    yield factory
    for executor in created:
        executor.close(wait=True, timeout=5)


def _values(interrupts: list[Interrupt]) -> list[tuple[str, str]]:
    return [(i.call_id, i.value) for i in interrupts]


def _collect(executor: ToolExecutor, n: int, timeout: float = 5.0) -> list[Interrupt]:
    """Pop interrupts until ``n`` have arrived (bounded wait)."""
    out: list[Interrupt] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        executor.wait_ready(timeout=max(0.0, deadline - time.monotonic()))
        out += executor.pop_ready()
    return out


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------


def test_tool_from_sync_callable() -> None:
    tool = Tool.from_callable(get_weather)
    assert tool.name == "get_weather"
    assert tool.is_async is False
    assert tool.timeout_s is None
    fn = tool.schema["function"]
    assert tool.schema["type"] == "function"
    assert fn["description"] == "Weather forecast for a city."
    assert fn["parameters"]["properties"]["city"] == {"type": "string", "description": "Name of the city."}
    assert fn["parameters"]["required"] == ["city"]
    assert tool.parameter_names == ["city", "days"]
    assert "return" not in fn


def test_tool_from_async_callable_with_overrides() -> None:
    tool = Tool.from_callable(aget_weather, name="weather", timeout_s=2.5, latency_ms=300)
    assert tool.is_async is True
    assert tool.name == tool.schema["function"]["name"] == "weather"
    assert tool.schema["function"]["x-latency-ms"] == 300 == tool.latency_ms
    assert tool.timeout_s == 2.5


def send_message(to: str, text: str, urgent: bool = False) -> dict:
    """Send a short text message.

    Args:
        to: Recipient name.
        text: Message text.
        urgent: Flag it.
    """
    return {"sent": True}


def test_free_text_parameters_are_marked_in_the_schema_and_checked() -> None:
    tool = Tool.from_callable(send_message, free_text=["text"])
    props = tool.parameters["properties"]
    assert props["text"]["x-free-text"] is True and "x-free-text" not in props["to"]
    with pytest.raises(ValueError, match="'body', which is not a parameter of tool 'send_message'.*to, text, urgent"):
        Tool.from_callable(send_message, free_text=["body"])
    with pytest.raises(ValueError, match="only string parameters can be free text"):
        Tool.from_callable(send_message, free_text=["urgent"])
    registry = ToolRegistry()
    assert registry.add(send_message, free_text=["text"]).parameters["properties"]["text"]["x-free-text"] is True
    schema = Tool.from_callable(send_message).schema
    marked = registry.add(schema, lambda **kw: kw, name=None, free_text=["text"], replace=True)
    assert marked.parameters["properties"]["text"]["x-free-text"] is True
    assert "x-free-text" not in schema["function"]["parameters"]["properties"]["text"]  # the caller's dict is not changed
    with pytest.raises(ValueError, match="free_text= apply to functions"):
        registry.add(Tool.from_callable(send_message), free_text=["text"], replace=True)


def test_tool_is_async_for_async_callable_object() -> None:
    class Handler:
        async def __call__(self, x: int) -> int:
            return x

    assert Tool.from_schema(_schema("h", x="integer"), Handler()).is_async is True
    assert Tool.from_schema(_schema("h", x="integer"), lambda x: x).is_async is False


def test_tool_from_schema_forms() -> None:
    wrapped = Tool.from_schema(_schema("f", x="integer"), lambda x: x)
    bare = Tool.from_schema(_schema("f", x="integer")["function"], lambda x: x)
    assert wrapped.schema == bare.schema
    assert wrapped.schema["type"] == "function"
    bfcl = Tool.from_schema(
        {
            "name": "math.factorial",
            "description": "n!",
            "parameters": {"type": "dict", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
        },
        lambda n: n,
    )
    assert bfcl.name == "math.factorial"
    assert bfcl.parameters["type"] == "object"
    no_params = Tool.from_schema({"name": "ping"}, lambda: "pong")
    assert no_params.parameters == {"type": "object", "properties": {}}


def test_tool_from_schema_errors() -> None:
    with pytest.raises(ValueError, match="needs a function name"):
        Tool.from_schema({"description": "x"}, lambda: None)
    with pytest.raises(ValueError, match="cannot be written in a call"):
        Tool.from_schema({"name": "get weather"}, lambda: None)
    with pytest.raises(TypeError, match="must be callable"):
        Tool.from_schema({"name": "f"}, "not callable")  # type: ignore[arg-type]


def test_from_schema_does_not_modify_input() -> None:
    schema = {"name": "f", "parameters": {"type": "dict", "properties": {"x": {"type": "float"}}}}
    Tool.from_schema(schema, lambda x: x)
    assert schema["parameters"]["type"] == "dict"


def test_get_json_schema_errors_are_explained() -> None:
    def no_hints(city):
        """Weather.

        Args:
            city: The city.
        """

    def no_args_section(city: str):
        """Weather for a city."""

    def no_docstring(city: str):
        pass

    for fn in (no_hints, no_args_section, no_docstring):
        with pytest.raises(ValueError) as info:
            Tool.from_callable(fn)
        message = str(info.value)
        assert repr(fn.__name__) in message
        assert "type hint" in message and "Args:" in message and "Google-style" in message
        assert info.value.__cause__ is not None


def test_registry_mixed_inputs_and_lookup() -> None:
    registry = ToolRegistry([get_weather, Tool.from_callable(aget_weather), (_schema("ping"), lambda: "pong")])
    assert len(registry) == 3
    assert "get_weather" in registry and "nope" not in registry
    assert [t.name for t in registry] == ["get_weather", "aget_weather", "ping"] == registry.names
    assert [s["function"]["name"] for s in registry.schemas()] == registry.names
    assert registry.get("ping").handler() == "pong"
    with pytest.raises(KeyError) as info:
        registry.get("get_wether")
    assert isinstance(info.value, UnknownToolError)
    assert str(info.value) == "no tool named 'get_wether'; known tools: get_weather, aget_weather, ping"


def test_registry_add_variants_and_duplicates() -> None:
    registry = ToolRegistry()
    assert str(pytest.raises(UnknownToolError, registry.get, "x").value) == "no tool named 'x'; known tools: (none)"
    registry.add(get_weather, name="weather", timeout_s=1.0, latency_ms=100)
    registry.add(_schema("f", x="integer"), lambda x: x)
    assert registry.get("weather").timeout_s == 1.0
    with pytest.raises(ValueError, match="already registered; pass replace=True"):
        registry.add(get_weather, name="weather")
    registry.add(get_weather, name="weather", replace=True)
    assert registry.get("weather").timeout_s is None
    with pytest.raises(ValueError, match="needs a handler"):
        registry.add(_schema("g"))
    with pytest.raises(ValueError, match="cannot make a tool"):
        registry.add(42)  # type: ignore[arg-type]
    assert registry.remove("f").name == "f" and "f" not in registry


def test_registry_coerce() -> None:
    registry = ToolRegistry([get_weather])
    assert ToolRegistry.coerce(registry) is registry
    assert len(ToolRegistry.coerce(None)) == 0
    assert ToolRegistry.coerce([get_weather]).names == ["get_weather"]
    assert ToolRegistry.coerce(get_weather).names == ["get_weather"]
    assert ToolRegistry.coerce({"w": get_weather}).names == ["w"]
    with pytest.raises(ValueError, match="single schema dict"):
        ToolRegistry.coerce(_schema("f"))


# ---------------------------------------------------------------------------------------------
# executor: results and errors
# ---------------------------------------------------------------------------------------------


def test_sync_and_async_tools(make_executor) -> None:
    executor = make_executor([get_weather, aget_weather])
    a = executor.submit("w1", 'get_weather("Paris", days=2)')
    b = executor.submit("w2", 'aget_weather(city="Rome")')
    assert executor.wait_for(a, 5) and executor.wait_for(b, 5)
    got = dict(_values(_collect(executor, 2)))
    assert got == {"w1": '{"city": "Paris", "days": 2, "temp_c": 18}', "w2": '{"city": "Rome", "temp_c": 20}'}
    assert a.status == b.status == "done"
    assert a.result == {"city": "Paris", "days": 2, "temp_c": 18}  # the raw object is kept
    assert a.arguments == {"city": "Paris", "days": 2}
    for record in (a, b):
        assert record.submitted_at <= record.started_at <= record.finished_at
        assert record.dispatch_latency_s >= 0 and record.duration_s >= 0


def test_interrupt_text_and_record(make_executor) -> None:
    executor = make_executor()
    record = executor.submit("r", "echo(x=[1, 'a'])")
    (interrupt,) = _collect(executor, 1)
    assert interrupt.record is record and interrupt.is_error is False
    assert interrupt.text() == format_interrupt("r", '[1, "a"]') == '[INTR] r [HEAD] [1, "a"] [END]'
    assert record.result_text == '[1, "a"]'


def test_concurrent_sync_calls_overlap(make_executor) -> None:
    executor = make_executor()
    single = executor.submit("s0", "sleep(0.2)")
    executor.wait_for(single, 5)
    single_time = single.finished_at - single.submitted_at
    records = [executor.submit(f"s{i}", "sleep(0.2)") for i in (1, 2, 3)]
    for record in records:
        executor.wait_for(record, 5)
    total = max(r.finished_at for r in records) - min(r.submitted_at for r in records)
    assert all(r.status == "done" for r in records)
    assert total < 2 * single_time, (total, single_time)  # serial would be 3x


def test_concurrent_async_calls_overlap(make_executor) -> None:
    executor = make_executor()
    single = executor.submit("s0", "asleep(0.2)")
    executor.wait_for(single, 5)
    single_time = single.finished_at - single.submitted_at
    records = [executor.submit(f"s{i}", "asleep(0.2)") for i in (1, 2, 3)]
    assert executor.wait_all(5)
    total = max(r.finished_at for r in records) - min(r.submitted_at for r in records)
    assert total < 2 * single_time, (total, single_time)


def test_interrupts_come_in_completion_order(make_executor) -> None:
    executor = make_executor()
    executor.submit("slow", "sleep(0.3, value='slow')")
    executor.submit("fast", "asleep(0.05, value='fast')")
    executor.submit("mid", "sleep(0.15, value='mid')")
    got = _collect(executor, 3)
    assert [i.call_id for i in got] == ["fast", "mid", "slow"]
    assert [i.value for i in got] == ["fast", "mid", "slow"]
    assert [i.created_at for i in got] == sorted(i.created_at for i in got)


def test_timeout_sync_and_async(make_executor) -> None:
    executor = make_executor(timeout_s=0.1)
    slow = executor.submit("t1", "sleep(0.3)")
    aslow = executor.submit("t2", "asleep(0.3)")
    got = dict(_values(_collect(executor, 2)))
    assert got == {
        "t1": "error: TimeoutError: sleep did not return within 0.1 s",
        "t2": "error: TimeoutError: asleep did not return within 0.1 s",
    }
    assert slow.status == aslow.status == "timeout"
    assert slow.error == "TimeoutError: sleep did not return within 0.1 s"
    time.sleep(0.3)  # the sync tool's thread finishes: its late result is dropped
    assert executor.pop_ready() == [] and slow.status == "timeout" and slow.result is None


def test_per_tool_timeout_overrides_executor(make_executor) -> None:
    quick = Tool.from_schema(_fn("quick", seconds={"type": "number"}), _sleep, timeout_s=0.05)
    executor = make_executor([quick, SLEEP], timeout_s=5)
    executor.submit("a", "quick(0.3)")
    executor.submit("b", "sleep(0.1)")
    got = _collect(executor, 2)
    assert _values(got) == [("a", "error: TimeoutError: quick did not return within 0.05 s"), ("b", "ok")]


def test_tool_timeout_error_is_not_confused_with_executor_timeout(make_executor) -> None:
    async def flaky() -> None:
        raise TimeoutError("upstream API timed out")

    executor = make_executor([Tool.from_schema({"name": "flaky"}, flaky)], timeout_s=5)
    record = executor.submit("f", "flaky()")
    assert _values(_collect(executor, 1)) == [("f", "error: TimeoutError: upstream API timed out")]
    assert record.status == "error"


def test_tool_exception_becomes_one_line_error(make_executor) -> None:
    executor = make_executor()
    record = executor.submit("e", 'fail("bad city\\n  second line")')
    assert _values(_collect(executor, 1)) == [("e", "error: ValueError: bad city second line")]
    assert record.status == "error" and record.error == "ValueError: bad city second line"


def test_unknown_tool_is_an_immediate_error(make_executor) -> None:
    executor = make_executor([Tool.from_schema({"name": "a"}, lambda: 1), Tool.from_schema({"name": "b"}, lambda: 2)])
    record = executor.submit("w1", "x(1)")
    assert executor.has_ready()  # no waiting for the loop: rejected in submit()
    assert _values(executor.pop_ready()) == [("w1", "error: UnknownToolError: no tool named 'x'; known tools: a, b")]
    assert record.status == "error" and record.name == "x"


def test_parse_and_argument_errors(make_executor) -> None:
    executor = make_executor([get_weather])
    executor.submit("p", "get_weather(city=open('/etc/passwd'))")
    executor.submit("q", "get_weather(")
    executor.submit("a", "get_weather(city=3)")
    executor.submit("m", "get_weather(days=3)")
    got = dict(_values(executor.pop_ready()))
    assert got["p"].startswith("error: CallParseError: a function call is not allowed in argument 'city'")
    assert got["q"].startswith("error: CallParseError: not a valid Python call")
    assert got["a"] == "error: ArgumentError: get_weather(): argument 'city' must be a string, got integer 3"
    assert got["m"] == "error: ArgumentError: get_weather() is missing required argument 'city'"
    assert all("\n" not in v for v in got.values())


def test_handler_signature_mismatch_is_reported(make_executor) -> None:
    executor = make_executor([Tool.from_schema(_schema("f", x="integer"), lambda y: y)])
    executor.submit("w", "f(x=1)")
    ((call_id, value),) = _values(_collect(executor, 1))
    assert call_id == "w" and value.startswith("error: TypeError:") and "'x'" in value


def test_duplicate_id(make_executor) -> None:
    executor = make_executor()
    first = executor.submit("w1", "sleep(0.1, value='first')")
    second = executor.submit("w1", "echo(x='second')")
    assert _values(executor.pop_ready()) == [("w1", "error: DuplicateIdError: id 'w1' is already used")]
    assert second.status == "error"
    assert executor.pending_ids() == ["w1"] and first.status in ("queued", "running")
    assert _values(_collect(executor, 1)) == [("w1", "first")]
    assert first.status == "done" and first.result == "first"
    assert executor.calls == [first, second]


def test_invalid_and_reserved_ids(make_executor) -> None:
    executor = make_executor()
    executor.submit("1bad", "echo(x=1)")
    executor.submit("user", "echo(x=1)")
    got = executor.pop_ready()
    assert [i.call_id for i in got] == ["cml", "cml"]
    assert got[0].value.startswith("error: InvalidIdError: '1bad' is not a valid call id")
    assert got[1].value == "error: InvalidIdError: id 'user' is reserved for the runtime: use another id, e.g. w1"


def test_fire_and_forget(make_executor) -> None:
    executor = make_executor()
    ok = executor.submit(None, "echo(x=1)")
    assert executor.pending_ids() == []  # no interrupt will come for it
    assert executor.wait_for(ok, 5) and ok.status == "done" and ok.result == 1
    bad = executor.submit(None, "fail('oops')")
    unknown = executor.submit(None, "nope()")
    executor.wait_for(bad, 5)
    # both errors come back (in the order they happened: the tool may fail before nope() is submitted)
    assert sorted(_values(_collect(executor, 2))) == [
        ("error", "error: UnknownToolError: no tool named 'nope'; known tools: sleep, asleep, echo, fail"),
        ("error", "error: ValueError: oops"),
    ]
    assert unknown.status == "error"


def test_fire_and_forget_errors_can_be_silenced(make_executor) -> None:
    executor = make_executor(anonymous_errors=False)
    bad = executor.submit(None, "fail('oops')")
    executor.wait_for(bad, 5)
    assert bad.status == "error" and executor.pop_ready() == []


def test_result_serialization(make_executor) -> None:
    class Point:
        def __init__(self) -> None:
            self.x, self.y = 1, 2

    results = {"obj": Point(), "text": "line one\nline two [END] [INTR]", "set": {3}, "none": None}
    tool = Tool.from_schema(_fn("get", k={"type": "string"}), lambda k: results[k])
    executor = make_executor([tool])
    for key in results:
        executor.submit(key, f"get('{key}')")
    got = dict(_values(_collect(executor, 4)))
    assert got == {
        "obj": '{"x": 1, "y": 2}',
        "text": "line one\\nline two [END ] [INTR ]",
        "set": "[3]",
        "none": "null",
    }
    # each interrupt parses back as exactly one well-formed block
    for call_id, value in got.items():
        (block,) = parse_blocks(format_interrupt(call_id, value))
        assert block.kind == "interrupt" and block.call_id == call_id and block.body == value


def test_huge_result_truncated_with_marker(make_executor) -> None:
    big = "x" * 1_000_000
    tool = Tool.from_schema({"name": "big"}, lambda: big)
    executor = make_executor([tool], max_result_chars=1000)
    record = executor.submit("b", "big()")
    (interrupt,) = _collect(executor, 1)
    assert interrupt.value == "x" * 1000 + "...[truncated 999000 chars]"
    assert record.result is big  # the full Python object stays available to references


# ---------------------------------------------------------------------------------------------
# references between calls
# ---------------------------------------------------------------------------------------------


def test_ref_chain_waits_for_the_earlier_call(make_executor) -> None:
    seen: list[object] = []

    def book(city: dict, nights: int) -> str:
        """Book a hotel.

        Args:
            city: Weather record of the city.
            nights: Nights.
        """
        seen.append(city)
        return f"booked {city['city']} for {nights}"

    def slow_weather(city: str) -> dict:
        """Slow weather.

        Args:
            city: City.
        """
        time.sleep(0.15)
        return {"city": city}

    executor = make_executor([slow_weather, book, ECHO])
    a = executor.submit("a", 'slow_weather("Paris")')
    b = executor.submit("b", "book(city=a, nights=2)")
    c = executor.submit("c", "echo(x=[b, a])")
    assert b.status == "queued" and b.depends_on == ["a"] and c.depends_on == ["b", "a"]
    got = _collect(executor, 3)
    assert [i.call_id for i in got] == ["a", "b", "c"]
    assert got[1].value == "booked Paris for 2"
    assert seen == [a.result] and seen[0] is a.result  # the Python object, not its JSON text
    assert c.result == ["booked Paris for 2", {"city": "Paris"}]
    assert a.finished_at <= b.started_at and b.finished_at <= c.started_at
    assert b.arguments == {"city": {"city": "Paris"}, "nights": 2}


def test_ref_to_failed_call(make_executor) -> None:
    executor = make_executor()
    executor.submit("a", "sleep(0.05, value=1) if True else 0")  # parse error
    executor.submit("b", "fail('boom')")
    executor.submit("c", "echo(x=a)")
    executor.submit("d", "echo(x=b)")
    got = dict(_values(_collect(executor, 4)))
    assert got["c"].startswith("error: DependencyError: a failed: CallParseError:")
    assert got["d"] == "error: DependencyError: b failed: ValueError: boom"


def test_ref_to_timed_out_call(make_executor) -> None:
    executor = make_executor(timeout_s=0.1)
    executor.submit("a", "asleep(0.3)")
    executor.submit("b", "echo(x=a)")
    got = _collect(executor, 2)
    assert _values(got) == [
        ("a", "error: TimeoutError: asleep did not return within 0.1 s"),
        ("b", "error: DependencyError: a failed: TimeoutError: asleep did not return within 0.1 s"),
    ]


def test_ref_to_unknown_or_own_id_is_an_immediate_argument_error(make_executor) -> None:
    executor = make_executor()
    executor.submit("a", "echo(x=w9)")
    executor.submit("b", "echo(x=b)")
    executor.submit("c", "echo(x=true)")
    got = dict(_values(executor.pop_ready()))
    assert got["a"] == (
        "error: ArgumentError: echo(): argument 'x' names 'w9', which is not the id of an earlier call; "
        "to pass a string, put it in quotes"
    )
    assert got["b"].startswith("error: ArgumentError: echo() refers to its own id 'b'")
    assert "for the literal write True" in got["c"]


def test_dependency_wait_does_not_count_against_the_timeout(make_executor) -> None:
    executor = make_executor(timeout_s=5)
    quick_echo = Tool.from_schema(_fn("qecho", x={}), lambda x: x, timeout_s=0.1)
    executor.tools.add(quick_echo)
    executor.submit("a", "sleep(0.25, value=7)")
    b = executor.submit("b", "qecho(x=a)")
    got = _collect(executor, 2)
    assert _values(got) == [("a", "7"), ("b", "7")]
    assert b.started_at - b.submitted_at > b.duration_s  # waited longer than its own timeout would allow


def test_dependency_wait_is_bounded_by_the_executor_timeout(make_executor) -> None:
    slow = Tool.from_schema({"name": "slow"}, lambda: _sleep(0.4), timeout_s=5)
    executor = make_executor([slow, ECHO], timeout_s=0.1)
    executor.submit("a", "slow()")
    executor.submit("b", "echo(x=a)")
    got = _collect(executor, 2)
    assert _values(got) == [("b", "error: DependencyError: a did not finish within 0.1 s"), ("a", "ok")]


def test_refs_with_a_single_run_slot(make_executor) -> None:
    # with one slot, dependents wait for their inputs without blocking other calls
    executor = make_executor(max_in_flight=1)
    executor.submit("a", "sleep(0.1, value=2)")
    executor.submit("b", "echo(x=a)")
    executor.submit("c", "echo(x=[b, a])")
    executor.submit("e", "echo(x=3)")
    got = _collect(executor, 4)
    # e queued for the slot while b and c waited for their inputs: it does not wait for them
    assert _values(got) == [("a", "2"), ("e", "3"), ("b", "2"), ("c", "[2, 2]")]
    assert all(r.status == "done" for r in executor.calls)


# ---------------------------------------------------------------------------------------------
# scheduling, waiting, threads
# ---------------------------------------------------------------------------------------------


def test_max_in_flight_serialises(make_executor) -> None:
    executor = make_executor(max_in_flight=1)
    records = [executor.submit(f"s{i}", "sleep(0.05)") for i in range(3)] + [executor.submit("a", "asleep(0.05)")]
    assert executor.in_flight == 4
    assert executor.wait_all(5)
    runs = sorted((r.started_at, r.finished_at) for r in records)
    for (_, end), (start, _) in zip(runs, runs[1:]):
        assert end <= start  # no overlap
    assert [r.call_id for r in sorted(records, key=lambda r: r.started_at)] == ["s0", "s1", "s2", "a"]


def test_in_flight_and_pending_ids(make_executor) -> None:
    executor = make_executor()
    assert executor.in_flight == 0 and executor.pending_ids() == []
    a = executor.submit("a", "sleep(0.1)")
    executor.submit(None, "sleep(0.1)")
    executor.submit("b", "asleep(0.1)")
    executor.submit("bad", "nope()")
    assert executor.in_flight == 3
    assert executor.pending_ids() == ["a", "b"]
    assert executor.wait_all(5)
    assert executor.in_flight == 0 and executor.pending_ids() == [] and a.finished


def test_wait_ready_times_out_and_returns_early(make_executor) -> None:
    executor = make_executor()
    assert executor.wait_ready(timeout=0.05) is False
    assert executor.wait_ready(timeout=0) is False
    executor.submit("w", "echo(x=1)")
    assert executor.wait_ready(timeout=5) is True
    assert executor.wait_ready(timeout=5) is True  # still ready: nothing popped


def test_wait_ready_wakes_on_push_interrupt_from_another_thread(make_executor) -> None:
    executor = make_executor()
    pushed = threading.Event()

    def speak() -> None:
        time.sleep(0.1)
        executor.push_interrupt("user", "make it\nThursday [END]")
        pushed.set()

    timeout = 5.0
    thread = threading.Thread(target=speak)
    start = time.monotonic()
    thread.start()
    assert executor.wait_ready(timeout=timeout) is True
    elapsed = time.monotonic() - start
    thread.join()
    assert pushed.is_set() and elapsed < timeout / 4
    (interrupt,) = executor.pop_ready()
    assert interrupt.call_id == "user" and interrupt.value == "make it Thursday [END ]" and interrupt.record is None
    with pytest.raises(ValueError, match="not a valid interrupt id"):
        executor.push_interrupt("not valid", "x")


def test_wait_for_returns_false_on_timeout(make_executor) -> None:
    executor = make_executor()
    record = executor.submit("s", "sleep(0.2)")
    assert executor.wait_for(record, timeout=0.01) is False
    assert executor.wait_for(record, timeout=5) is True


def test_submit_and_pop_from_many_threads(make_executor) -> None:
    executor = make_executor(max_workers=4)
    per_thread, n_threads = 25, 4
    popped: list[Interrupt] = []
    done = threading.Event()

    def consumer() -> None:
        while len(popped) < per_thread * n_threads and not done.is_set():
            executor.wait_ready(timeout=0.05)
            popped.extend(executor.pop_ready())

    def producer(t: int) -> None:
        for i in range(per_thread):
            executor.submit(f"t{t}_{i}", f"echo(x={i})" if i % 2 else f"asleep(0.001, value={i})")

    reader = threading.Thread(target=consumer)
    reader.start()
    writers = [threading.Thread(target=producer, args=(t,)) for t in range(n_threads)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert executor.wait_all(10)
    reader.join(10)
    done.set()
    expected = sorted(f"t{t}_{i}" for t in range(n_threads) for i in range(per_thread))
    assert sorted(i.call_id for i in popped) == expected
    assert len(executor.calls) == per_thread * n_threads
    assert all(r.status == "done" for r in executor.calls)


def test_cancel_all_on_hanging_tools(make_executor) -> None:
    sync_finished = threading.Event()
    async_cancelled = threading.Event()

    def hang() -> str:
        time.sleep(0.3)
        sync_finished.set()
        return "late"

    async def ahang() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            async_cancelled.set()
            raise
        return "never"

    executor = make_executor([Tool.from_schema(_fn("hang"), hang), Tool.from_schema(_fn("ahang"), ahang), ECHO])
    h = executor.submit("h", "hang()")
    a = executor.submit("a", "ahang()")
    dep = executor.submit("d", "echo(x=h)")
    time.sleep(0.05)
    assert h.status == a.status == "running"
    executor.cancel_all("user stopped")
    assert (h.status, a.status, dep.status) == ("cancelled", "cancelled", "cancelled")
    assert h.error == "CancelledError: user stopped"
    assert executor.in_flight == 0 and executor.pending_ids() == []
    assert async_cancelled.wait(5)  # the async tool really is cancelled
    assert sync_finished.wait(5)  # the sync tool runs to its end (threads cannot be killed) ...
    time.sleep(0.05)
    assert executor.pop_ready() == [] and h.result is None  # ... and its late result is dropped
    # the executor stays usable after cancel_all
    executor.submit("n", "echo(x=5)")
    assert _values(_collect(executor, 1)) == [("n", "5")]


def test_close_is_idempotent_and_final(make_executor) -> None:
    executor = make_executor()
    executor.submit("a", "echo(x=1)")
    executor.close()
    executor.close()
    executor.close(wait=False)
    assert executor.closed
    with pytest.raises(RuntimeError, match="closed"):
        executor.submit("b", "echo(x=1)")
    with pytest.raises(RuntimeError, match="closed"):
        executor.push_interrupt("user", "hi")
    assert executor.wait_ready(timeout=5) in (True, False)  # returns at once, never hangs


def test_close_without_any_call(make_executor) -> None:
    baseline = threading.active_count()
    with ToolExecutor([get_weather]) as executor:
        assert executor.in_flight == 0
    assert threading.active_count() == baseline


def test_threads_return_to_baseline_after_close() -> None:
    baseline = threading.active_count()
    with ToolExecutor([SLEEP, ASLEEP, ECHO], max_workers=4) as executor:
        for i in range(6):
            executor.submit(f"c{i}", "sleep(0.02)" if i % 2 else "asleep(0.02)")
        assert executor.wait_all(5)
        assert threading.active_count() > baseline
        names = {t.name for t in threading.enumerate()}
        assert "hf-asynclm-loop" in names and any(n.startswith("hf-asynclm-tool") for n in names)
    assert threading.active_count() == baseline


def test_close_with_a_hanging_sync_tool() -> None:
    baseline = threading.active_count()
    released = threading.Event()

    def hang() -> str:
        released.wait(5)
        time.sleep(0.05)
        return "late"

    executor = ToolExecutor([Tool.from_schema({"name": "hang"}, hang)])
    record = executor.submit("h", "hang()")
    while record.status != "running":
        time.sleep(0.005)
    start = time.monotonic()
    executor.close(wait=True, timeout=0.1)  # bounded: does not wait for the tool to end
    bounded = time.monotonic() - start
    assert not released.is_set() and record.status == "cancelled"
    released.set()  # the tool ends now; its thread goes away
    deadline = time.monotonic() + 5
    while threading.active_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == baseline
    assert bounded < 5 / 2
    assert executor.pop_ready() == []


def test_close_waits_for_a_running_tool_within_timeout() -> None:
    baseline = threading.active_count()
    executor = ToolExecutor([SLEEP])
    record = executor.submit("h", "sleep(0.2)")
    while record.status != "running":
        time.sleep(0.005)
    executor.close(wait=True, timeout=5)  # the tool ends before the bound: close waits for it
    assert threading.active_count() == baseline


def test_unclosed_executor_stops_when_collected() -> None:
    baseline = threading.active_count()
    executor = ToolExecutor([ECHO])
    record = executor.submit("a", "echo(x=1)")
    executor.wait_for(record, 5)
    ref = weakref.ref(executor)
    del executor, record
    gc.collect()
    assert ref() is None
    deadline = time.monotonic() + 5
    while threading.active_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == baseline


def test_sync_handler_returning_a_coroutine(make_executor) -> None:
    tool = Tool.from_schema(_fn("wrapped", v={}), lambda v: _asleep(0.01, v))
    executor = make_executor([tool])
    assert tool.is_async is False
    executor.submit("w", "wrapped(v=3)")
    assert _values(_collect(executor, 1)) == [("w", "3")]


def test_dispatch_latency(make_executor) -> None:
    executor = make_executor()
    latencies = []
    for i in range(200):
        record = executor.submit(f"d{i}", f"echo(x={i})")
        assert executor.wait_for(record, 5)
        latencies.append(record.dispatch_latency_s)
    assert statistics.median(latencies[20:]) < 0.005


def test_records_are_kept_in_submission_order(make_executor) -> None:
    executor = make_executor()
    records = [executor.submit("a", "sleep(0.05)"), executor.submit(None, "nope()"), executor.submit("b", "echo(x=1)")]
    assert executor.calls == records
    assert all(isinstance(r, CallRecord) for r in records)
    assert executor.wait_all(5)
    assert [r.status for r in executor.calls] == ["done", "error", "done"]


def test_start_warms_the_loop_and_a_tool_thread_and_close_returns_to_baseline():
    import threading
    import time as _time

    def noop() -> int:
        """Nothing.
        """
        return 1

    baseline = threading.active_count()
    ex = ToolExecutor([noop])
    ex.start()
    names = {t.name for t in threading.enumerate()}
    assert "hf-asynclm-loop" in names and any(n.startswith("hf-asynclm-tool") for n in names)
    record = ex.submit("a", "noop()")
    assert ex.wait_for(record, 5) and record.status == "done"
    ex.close()
    with pytest.raises(RuntimeError):
        ex.start()
    deadline = _time.monotonic() + 5
    while threading.active_count() > baseline and _time.monotonic() < deadline:
        _time.sleep(0.02)
    assert threading.active_count() <= baseline


def test_pop_ready_can_take_one_at_a_time(make_executor) -> None:
    # paced delivery (interrupt_at="sentence") takes the oldest ready interrupt and leaves the rest
    executor = make_executor([get_weather])
    for cid in ("a", "b", "c"):
        executor.submit(cid, "nope()")  # rejected at once: ready in submission order
    assert [i.call_id for i in executor.pop_ready(limit=1)] == ["a"]
    assert executor.has_ready()
    assert [i.call_id for i in executor.pop_ready(limit=5)] == ["b", "c"]
    assert executor.pop_ready(limit=1) == [] and not executor.has_ready()
    with pytest.raises(ValueError, match="limit"):
        executor.pop_ready(limit=0)
