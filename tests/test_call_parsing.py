"""Call-body parsing (ast only, never eval) and argument binding against JSON schemas."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_asynclm.executor import (
    MAX_BODY_CHARS,
    ArgumentError,
    CallParseError,
    ParsedCall,
    Ref,
    Tool,
    bind_arguments,
    check_value,
    parse_call,
)

# ---------------------------------------------------------------------------------------------
# parse_call: accepted forms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, expected",
    [
        ("f()", ParsedCall("f", [], {})),
        ('get_weather(city="Paris")', ParsedCall("get_weather", [], {"city": "Paris"})),
        ("f('a', 1, 2.5, True, False, None)", ParsedCall("f", ["a", 1, 2.5, True, False, None], {})),
        ("f(x=-3, y=+2, z=-0.5, w=-1e3)", ParsedCall("f", [], {"x": -3, "y": 2, "z": -0.5, "w": -1000.0})),
        ("f([1, [2, (3, {'k': {4, 5}})]])", ParsedCall("f", [[1, [2, (3, {"k": {4, 5}})]]], {})),
        (
            "f(d={1: 'a', (1, 2): None, -1: [], 'x': {}})",
            ParsedCall("f", [], {"d": {1: "a", (1, 2): None, -1: [], "x": {}}}),
        ),
        ("f((), (1,), [])", ParsedCall("f", [(), (1,), []], {})),
        ("f(set(), {})", ParsedCall("f", [set(), {}], {})),
        ("  f(1)  \n", ParsedCall("f", [1], {})),
        ('f("a" "b")', ParsedCall("f", ["ab"], {})),
        ("math.sqrt(2)", ParsedCall("math.sqrt", [2], {})),
        ("a.b.c_d(x=1)", ParsedCall("a.b.c_d", [], {"x": 1})),
        ("book(city=w1)", ParsedCall("book", [], {"city": Ref("w1")})),
        (
            "book(w1, days=[w2, 3], m={'k': w3})",
            ParsedCall("book", [Ref("w1")], {"days": [Ref("w2"), 3], "m": {"k": Ref("w3")}}),
        ),
        ("f(\n  x=1,\n  y=2,\n)", ParsedCall("f", [], {"x": 1, "y": 2})),
    ],
)
def test_parse_call_accepts(body: str, expected: ParsedCall) -> None:
    assert parse_call(body) == expected


def test_parse_call_types_exact() -> None:
    call = parse_call("f(1, 1.0, True, (1,), [1], {1}, {'a': 1})")
    assert [type(v) for v in call.args] == [int, float, bool, tuple, list, set, dict]


def test_refs_listed_in_order_without_repeats() -> None:
    assert parse_call("f(b, x=[a, b], y={'k': c})").refs() == ["b", "a", "c"]
    assert parse_call("f(1)").refs() == []


# ---------------------------------------------------------------------------------------------
# parse_call: rejected forms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, fragment",
    [
        ("", "empty call body"),
        ("   ", "empty call body"),
        ("f(", "not a valid Python call"),
        ("f(1) g(2)", "not a valid Python call"),
        ("f(1); g(2)", "not a valid Python call"),
        ("import os", "not a valid Python call"),
        ("x = f(1)", "not a valid Python call"),
        ("f", "expected one call"),
        ("42", "expected one call"),
        ("f(1), g(2)", "one call per block"),
        ("f(1) + 1", "expected one call"),
        ("f(x=g(1))", "a function call is not allowed in argument 'x'"),
        ("f(__import__('os').system('rm -rf /'))", "a function call is not allowed in positional argument 1"),
        ("f(x=os.environ)", "attribute access is not allowed"),
        ("f(x=f'{a}')", "an f-string is not allowed"),
        ("f(x=lambda: 1)", "a lambda is not allowed"),
        ("f(x=[i for i in y])", "a comprehension is not allowed"),
        ("f(x={i: 1 for i in y})", "a comprehension is not allowed"),
        ("f(x=(i for i in y))", "a generator expression is not allowed"),
        ("f(**kw)", "**-unpacking is not allowed"),
        ("f(*args)", "*-unpacking is not allowed"),
        ("f(x=[*a])", "*-unpacking is not allowed"),
        ("f(x={**a})", "**-unpacking is not allowed"),
        ("f(x=1 + 2)", "an operator expression is not allowed"),
        ("f(x=2 ** 100000)", "an operator expression is not allowed"),
        ("f(x='a' * 10**9)", "an operator expression is not allowed"),
        ("f(x=-y)", "a sign is only allowed before a number"),
        ("f(x=--1)", "a sign is only allowed before a number"),
        ("f(x=-True)", "a sign is only allowed before a number"),
        ("f(x=not 1)", "an operator expression is not allowed"),
        ("f(x=~1)", "an operator expression is not allowed"),
        ("f(x=a[0])", "a subscript is not allowed"),
        ("f(x=1 if a else 2)", "a conditional expression is not allowed"),
        ("f(x=(y := 1))", "an assignment expression is not allowed"),
        ("f(x=1 < 2)", "a comparison is not allowed"),
        ("f(x=a and b)", "a boolean operator is not allowed"),
        ("f(x=b'raw')", "a bytes literal is not allowed"),
        ("f(x=1j)", "a complex literal is not allowed"),
        ("f(x=...)", "a ellipsis literal is not allowed"),
        ("f(x={[1]: 2})", "hashable"),
        ("f(x={[1], 2})", "hashable"),
        ("f(x={w1: 2})", "cannot be a dict key"),
        ("f(x={w1})", "cannot be a set element"),
        ("f(x=1, x=2)", "given more than once"),
        ("f(x=set([1]))", "a function call is not allowed"),
        ("f(x=list())", "a function call is not allowed"),
        ("f()()", "plain or dotted name"),
        ("(lambda: 1)()", "plain or dotted name"),
        ("f[0](1)", "plain or dotted name"),
        ("'s'.join(1)", "plain or dotted name"),
        ("f(x=await g())", "await is not allowed"),
        ("f(\x00)", "not a valid Python call"),
        ("f(x=" + "1" * 5000 + ")", "not a valid Python call"),
        ("f(" + "[" * 300 + "]" * 300 + ")", "not a valid Python call"),
        ("f(" + "-" * 5000 + "1)", "not a valid Python call"),
    ],
)
def test_parse_call_rejects(body: str, fragment: str) -> None:
    with pytest.raises(CallParseError) as info:
        parse_call(body)
    assert fragment in str(info.value)


def test_parse_call_rejects_too_long_body() -> None:
    body = "f(x=" + repr("a" * MAX_BODY_CHARS) + ")"
    with pytest.raises(CallParseError, match="limit is"):
        parse_call(body)
    parse_call("f(x=" + repr("a" * (MAX_BODY_CHARS - 10)) + ")")  # just under: fine


def test_parse_call_rejects_non_string() -> None:
    with pytest.raises(CallParseError, match="must be a string"):
        parse_call(None)  # type: ignore[arg-type]


def test_parse_call_never_evaluates(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    def forbidden(*args, **kwargs):
        raise AssertionError("eval/exec must never be called")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    assert parse_call("f(x=[1, {'a': (2,)}], y=w1)").kwargs["y"] == Ref("w1")
    with pytest.raises(CallParseError):
        parse_call("f(x=__import__('os').system('echo hacked'))")


# ---------------------------------------------------------------------------------------------
# property tests
# ---------------------------------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
_hashables = st.recursive(_scalars, lambda inner: st.tuples(inner, inner), max_leaves=4)
_literals = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.lists(inner, max_size=4).map(tuple)
    | st.dictionaries(_hashables, inner, max_size=4)
    | st.frozensets(_hashables, max_size=4).map(set),
    max_leaves=12,
)
_names = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True).filter(lambda s: s not in {"True", "False", "None"})


def _same_structure(a, b) -> bool:
    """Equality that also compares types (1 vs True vs 1.0) and float signs."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_structure(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a.keys()) == list(b.keys()) and all(_same_structure(a[k], b[k]) for k in a)
    return a == b


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["f", "get_weather", "math.sqrt", "a.b.c"]),
    args=st.lists(_literals, max_size=3),
    kwargs=st.dictionaries(_names, _literals, max_size=4),
)
def test_parse_call_round_trips_literals(name, args, kwargs) -> None:
    keywords = [k for k in kwargs if k.isidentifier() and not __import__("keyword").iskeyword(k)]
    kwargs = {k: kwargs[k] for k in keywords}
    body = f"{name}(" + ", ".join([repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]) + ")"
    parsed = parse_call(body)
    assert parsed.name == name
    assert _same_structure(parsed.args, list(args))
    assert _same_structure(parsed.kwargs, kwargs)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_parse_call_arbitrary_text_only_raises_call_parse_error(text: str) -> None:
    try:
        parse_call(text)
    except CallParseError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="f(x)=-+[]{},:'\"0123456789.ejwab *_lambda", max_size=60))
def test_parse_call_call_like_text_only_raises_call_parse_error(text: str) -> None:
    try:
        parse_call("f(" + text + ")")
    except CallParseError:
        pass


# ---------------------------------------------------------------------------------------------
# bind_arguments
# ---------------------------------------------------------------------------------------------


def _tool(properties: dict, required=(), name="f", **params) -> Tool:
    parameters = {"type": "object", "properties": properties, "required": list(required), **params}
    schema = {"name": name, "parameters": parameters}
    return Tool.from_schema(schema, handler=lambda **kw: kw)


def _bind(body: str, tool: Tool, results=None, **kw):
    return bind_arguments(parse_call(body), tool, results, **kw)


WEATHER = _tool(
    {"city": {"type": "string"}, "days": {"type": "integer"}, "units": {"type": "string", "enum": ["C", "F"]}},
    ["city"],
    "get_weather",
)


def test_bind_positional_follow_schema_order() -> None:
    assert _bind('get_weather("Paris", 3)', WEATHER) == {"city": "Paris", "days": 3}
    assert _bind('get_weather("Paris", units="F")', WEATHER) == {"city": "Paris", "units": "F"}


@pytest.mark.parametrize(
    "body, fragment",
    [
        ('get_weather("Paris", 3, "C", 4)', "takes at most 3 positional arguments (city, days, units) but 4 were"),
        ('get_weather("Paris", city="Rome")', "got multiple values for argument 'city'"),
        ('get_weather(city="Paris", town="x")', "unexpected argument 'town'; it accepts: city, days, units"),
        ("get_weather(days=3)", "missing required argument 'city'"),
        ('get_weather(city="Paris", days=True)', "argument 'days' must be an integer, got boolean True"),
        ('get_weather(city="Paris", days=2.0)', "argument 'days' must be an integer, got number 2.0"),
        ('get_weather(city="Paris", days="3")', "argument 'days' must be an integer, got string '3'"),
        ("get_weather(city=None)", "argument 'city' must be a string, got null None"),
        ('get_weather(city="Paris", units="K")', "argument 'units' must be one of 'C', 'F'; got 'K'"),
    ],
)
def test_bind_errors(body: str, fragment: str) -> None:
    with pytest.raises(ArgumentError) as info:
        _bind(body, WEATHER)
    assert fragment in str(info.value)
    assert str(info.value).startswith("get_weather()")


def test_bind_missing_several_and_no_parameters() -> None:
    tool = _tool({"a": {"type": "integer"}, "b": {"type": "integer"}}, ["a", "b"])
    with pytest.raises(ArgumentError, match="missing required arguments 'a', 'b'"):
        _bind("f()", tool)
    empty = _tool({})
    assert _bind("f()", empty) == {}
    with pytest.raises(ArgumentError, match="takes at most 0 positional arguments but 1 were given"):
        _bind("f(1)", empty)
    with pytest.raises(ArgumentError, match="accepts: no arguments"):
        _bind("f(x=1)", empty)


@pytest.mark.parametrize(
    "schema, good, bad",
    [
        ({"type": "string"}, ["", "x"], [1, None, True, ["x"]]),
        ({"type": "integer"}, [0, -5, 10**20], [True, False, 1.0, "1", None]),
        ({"type": "number"}, [0, 1.5, -2], [True, "1.5", None]),
        ({"type": "float"}, [0, 1.5], [False]),
        ({"type": "boolean"}, [True, False], [0, 1, "true", None]),
        ({"type": "null"}, [None], [0, "", False]),
        ({"type": "array"}, [[], [1, "a"], (1,)], [{}, "abc", {1}]),
        ({"type": "tuple", "items": {"type": "integer"}}, [(1, 2), [3]], [(1, "2"), [True]]),
        ({"type": "array", "items": {"type": "string"}}, [["a", "b"]], [["a", 1]]),
        ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]}, [[1, "a"], (2, "b")], [[0.5]]),
        ({"type": "object"}, [{}, {"a": 1}], [[], "x", None]),
        (
            {"type": "dict", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
            [{"a": 1, "b": 2}],
            [{"a": "1"}, {"b": 1}],
        ),
        ({"type": "object", "additionalProperties": {"type": "integer"}}, [{"a": 1}], [{"a": "x"}]),
        ({"type": ["integer", "string"]}, [1, "a"], [1.5, None, True]),
        ({"type": "integer", "nullable": True}, [1, None], ["a"]),
        ({"type": "integer", "minimum": 1, "maximum": 3}, [1, 3], [0, 4]),
        ({"enum": [1, 2, "a"]}, [1, 2, "a"], [True, 3, "b", 1.5]),
        ({"type": "any"}, [1, None, [1], {"a": object()}], []),
        ({}, [1, None, "x", [1], {}], []),
        ({"anyOf": [{"type": "integer"}, {"type": "array", "items": {"type": "integer"}}]}, [1, [1, 2]], ["x", ["x"]]),
    ],
)
def test_check_value_types(schema, good, bad) -> None:
    tool = _tool({"v": schema})
    for value in good:
        check_value(value, tool.parameters["properties"]["v"])
    for value in bad:
        with pytest.raises(ArgumentError):
            check_value(value, tool.parameters["properties"]["v"])


def test_nested_error_paths() -> None:
    tool = _tool({"cfg": {"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer"}}}}})
    with pytest.raises(ArgumentError, match=r"f\(\): argument 'cfg'\['xs'\]\[1\] must be an integer, got string 'b'"):
        _bind("f(cfg={'xs': [1, 'b']})", tool)


def test_bind_refs_substituted_from_results() -> None:
    result = {"temp_c": 18}
    tool = _tool({"city": {"type": "string"}, "data": {"type": "object"}, "many": {"type": "array"}})
    bound = _bind("f(w1, data=w2, many=[w1, 3])", tool, {"w1": "Paris", "w2": result})
    assert bound == {"city": "Paris", "data": result, "many": ["Paris", 3]}
    assert bound["data"] is result  # the Python object itself, not a copy


def test_bind_refs_checked_after_substitution() -> None:
    with pytest.raises(ArgumentError, match=r"argument 'city' must be a string, got object .* \(the result of w1\)"):
        _bind("get_weather(city=w1)", WEATHER, {"w1": {"temp_c": 18}})


def test_bind_refs_left_in_place_without_results() -> None:
    assert _bind("get_weather(city=w1, days=2)", WEATHER) == {"city": Ref("w1"), "days": 2}
    assert _bind("get_weather(city=w1)", WEATHER, known_ids={"w1"}) == {"city": Ref("w1")}
    with pytest.raises(ArgumentError, match="names 'w9', which is not the id of an earlier call; to pass a string"):
        _bind("get_weather(city=w9)", WEATHER, known_ids={"w1"})
    with pytest.raises(ArgumentError, match="not the id of an earlier call"):
        _bind("get_weather(city=w9)", WEATHER, {"w1": "Paris"})


def test_bind_json_style_literals_get_a_hint() -> None:
    tool = _tool({"flag": {"type": "boolean"}})
    with pytest.raises(ArgumentError, match="for the literal write True"):
        _bind("f(flag=true)", tool, known_ids=set())
    with pytest.raises(ArgumentError, match="for the literal write None"):
        _bind("f(flag=null)", tool, known_ids=set())


def test_bind_additional_properties_allowed_when_schema_says_so() -> None:
    tool = _tool({"a": {"type": "integer"}}, additionalProperties=True)
    assert _bind("f(a=1, b='x')", tool) == {"a": 1, "b": "x"}
    typed = _tool({"a": {"type": "integer"}}, additionalProperties={"type": "integer"})
    with pytest.raises(ArgumentError, match="argument 'b' must be an integer"):
        _bind("f(a=1, b='x')", typed)


def test_bfcl_style_schema() -> None:
    schema = {
        "name": "calculate_triangle_area",
        "description": "Area of a triangle.",
        "parameters": {
            "type": "dict",
            "properties": {
                "base": {"type": "integer", "description": "base"},
                "height": {"type": "float", "description": "height"},
                "unit": {"type": "string", "enum": ["cm", "m"], "default": "cm"},
                "sides": {"type": "tuple", "items": {"type": "integer"}},
            },
            "required": ["base", "height"],
        },
    }
    tool = Tool.from_schema(schema, handler=lambda **kw: kw)
    assert tool.parameters["type"] == "object"
    assert tool.parameters["properties"]["height"]["type"] == "number"
    bound = _bind("calculate_triangle_area(base=10, height=5, sides=(1, 2))", tool)
    assert bound == {"base": 10, "height": 5, "sides": (1, 2)}
    with pytest.raises(ArgumentError, match="'height' must be a number"):
        _bind("calculate_triangle_area(base=10, height='5')", tool)
