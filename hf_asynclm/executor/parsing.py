"""Parse the body of a ``[CALL]`` block and bind its arguments to a tool's JSON schema.

A call body is one Python call expression with literal arguments, e.g.
``get_weather(city="Paris", days=3)``. It is read with :func:`ast.parse` and walked node by
node: model output is **never** passed to ``eval`` or ``exec``. A bare name that is not
``True``/``False``/``None`` names an earlier call (``book(city=w1)``) and becomes a :class:`Ref`
that the executor replaces by that call's result.

Example:

```python
>>> from hf_asynclm.executor import Ref, parse_call
>>> parse_call('book(w1, nights=-2, tags=["a", ("b", 1.5)], extra=None)')
ParsedCall(name='book', args=[Ref(call_id='w1')], kwargs={'nights': -2, 'tags': ['a', ('b', 1.5)], 'extra': None})

```
"""

from __future__ import annotations

import ast
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Container, Iterator, Mapping

from .registry import _TYPE_ALIASES

if TYPE_CHECKING:
    from .registry import Tool

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_BODY_CHARS",
    "ArgumentError",
    "CallParseError",
    "ParsedCall",
    "Ref",
    "bind_arguments",
    "check_value",
    "parse_call",
]

#: Longest call body :func:`parse_call` accepts, in characters.
MAX_BODY_CHARS = 20_000

_ALLOWED = (
    "literals (str, int, float, bool, None, and lists, tuples, dicts and sets of them) or the id of an earlier call"
)

# what each disallowed node is called in error messages
_NODE_NAMES: dict[str, str] = {
    "Call": "a function call",
    "Attribute": "attribute access",
    "JoinedStr": "an f-string",
    "FormattedValue": "an f-string",
    "Lambda": "a lambda",
    "ListComp": "a comprehension",
    "SetComp": "a comprehension",
    "DictComp": "a comprehension",
    "GeneratorExp": "a generator expression",
    "BinOp": "an operator expression",
    "BoolOp": "a boolean operator",
    "UnaryOp": "an operator expression",
    "Compare": "a comparison",
    "Subscript": "a subscript",
    "Slice": "a slice",
    "IfExp": "a conditional expression",
    "NamedExpr": "an assignment expression",
    "Starred": "*-unpacking",
    "Await": "await",
    "Yield": "yield",
    "YieldFrom": "yield",
}


class CallParseError(ValueError):
    """A call body that is not one call with literal arguments.

    Example:

    ```python
    >>> from hf_asynclm.executor import CallParseError, parse_call
    >>> try:
    ...     parse_call("f(x=__import__('os'))")
    ... except CallParseError as e:
    ...     print(str(e).split(":")[0])
    a function call is not allowed in argument 'x'

    ```
    """


class ArgumentError(ValueError):
    """Arguments that do not fit the tool's schema (unknown, missing, duplicate or mistyped).

    Example:

    ```python
    >>> from hf_asynclm.executor import ArgumentError, Tool, bind_arguments, parse_call
    >>> tool = Tool.from_schema({"name": "f", "parameters": {"type": "object",
    ...     "properties": {"n": {"type": "integer"}}, "required": ["n"]}}, handler=lambda n: n)
    >>> try:
    ...     bind_arguments(parse_call("f(n=True)"), tool)
    ... except ArgumentError as e:
    ...     print(e)
    f(): argument 'n' must be an integer, got boolean True

    ```
    """


@dataclass(frozen=True)
class Ref:
    """An argument that names an earlier call: ``book(city=w1)`` holds ``Ref("w1")``.

    Example:

    ```python
    >>> from hf_asynclm.executor import Ref, parse_call
    >>> parse_call("book(city=w1)").kwargs["city"] == Ref("w1")
    True

    ```
    """

    call_id: str


@dataclass
class ParsedCall:
    """A parsed call: the tool name, positional and keyword arguments.

    Values are Python literals or :class:`Ref` (possibly nested inside lists, tuples and dict
    values).

    Example:

    ```python
    >>> from hf_asynclm.executor import parse_call
    >>> call = parse_call("math.hypot(3, y=[w1, w2])")
    >>> call.name, call.args, call.refs()
    ('math.hypot', [3], ['w1', 'w2'])

    ```
    """

    name: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)

    def refs(self) -> list[str]:
        """Ids of the earlier calls this call refers to, in order, without repeats."""
        seen: dict[str, None] = {}
        for value in [*self.args, *self.kwargs.values()]:
            for ref in _iter_refs(value):
                seen.setdefault(ref.call_id, None)
        return list(seen)


def _iter_refs(value: Any) -> Iterator[Ref]:
    if isinstance(value, Ref):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _iter_refs(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _iter_refs(item)


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


def parse_call(body: str) -> ParsedCall:
    """Parse one call expression with literal arguments, without evaluating anything.

    Allowed argument values: ``str``, ``int``, ``float``, ``bool``, ``None``, a number with a
    sign (``-3``, ``+1.5``), lists, tuples, dicts and sets of those (``set()`` for the empty
    set), and bare names of earlier
    calls (which become :class:`Ref`). The called name may be dotted (``math.sqrt``).

    Args:
        body: The text between ``[HEAD]`` (or ``[CALL]``) and ``[END]``.

    Returns:
        The :class:`ParsedCall`.

    Raises:
        CallParseError: the body is not exactly one such call (the message says what is not
            allowed and where), or it is longer than :data:`MAX_BODY_CHARS`.

    Example:

    ```python
    >>> from hf_asynclm.executor import parse_call
    >>> parse_call('get_weather("Paris", units={"temp": "C"})')
    ParsedCall(name='get_weather', args=['Paris'], kwargs={'units': {'temp': 'C'}})

    ```
    """
    if not isinstance(body, str):
        raise CallParseError(f"a call body must be a string, got {type(body).__name__}")
    if len(body) > MAX_BODY_CHARS:
        raise CallParseError(f"the call body is {len(body)} characters long; the limit is {MAX_BODY_CHARS}")
    text = body.strip()
    if not text:
        raise CallParseError("empty call body: write one call like name(arg=value)")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        where = f" (column {exc.offset})" if exc.offset else ""
        raise CallParseError(f"not a valid Python call: {exc.msg}{where}") from None
    except (ValueError, RecursionError, MemoryError, OverflowError) as exc:
        raise CallParseError(f"not a valid Python call: {type(exc).__name__}: {exc}") from None

    node = tree.body
    if not isinstance(node, ast.Call):
        what = "a tuple (write one call per block)" if isinstance(node, ast.Tuple) else _describe_node(node)
        raise CallParseError(f"expected one call like name(arg=value), got {what}")
    name = _callee_name(node.func)
    args: list[Any] = []
    for i, arg in enumerate(node.args):
        if isinstance(arg, ast.Starred):
            raise CallParseError(f"*-unpacking is not allowed in the arguments of {name}(): pass each value")
        args.append(_literal(arg, f"positional argument {i + 1}"))
    kwargs: dict[str, Any] = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise CallParseError(f"**-unpacking is not allowed in the arguments of {name}(): write key=value")
        if kw.arg in kwargs:
            raise CallParseError(f"argument {kw.arg!r} is given more than once")
        kwargs[kw.arg] = _literal(kw.value, f"argument {kw.arg!r}")
    return ParsedCall(name=name, args=args, kwargs=kwargs)


def _callee_name(func: ast.expr) -> str:
    parts: list[str] = []
    node = func
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        raise CallParseError(
            f"the called function must be a plain or dotted name like get_weather(...) or math.sqrt(...), "
            f"got {_describe_node(func)}"
        )
    parts.append(node.id)
    return ".".join(reversed(parts))


def _describe_node(node: ast.AST) -> str:
    kind = type(node).__name__
    if kind in _NODE_NAMES:
        return _NODE_NAMES[kind]
    if isinstance(node, ast.Constant):
        return f"a {type(node.value).__name__} literal"
    if isinstance(node, ast.Name):
        return f"the name {node.id!r}"
    return f"a {kind} expression"


def _literal(node: ast.expr, where: str) -> Any:
    if isinstance(node, ast.Constant):
        value = node.value
        if value is None or isinstance(value, (str, bool, int, float)):
            return value
        kind = type(value).__name__
        raise CallParseError(f"a {kind} literal is not allowed in {where}: arguments must be {_ALLOWED}")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = node.operand
        if (
            isinstance(operand, ast.Constant)
            and isinstance(operand.value, (int, float))
            and not isinstance(operand.value, bool)
        ):
            return -operand.value if isinstance(node.op, ast.USub) else operand.value
        raise CallParseError(f"a sign is only allowed before a number, in {where}: arguments must be {_ALLOWED}")
    if isinstance(node, ast.Name):
        return Ref(node.id)
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_literal(_no_starred(item, where), where) for item in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Set):
        items = [_literal(_no_starred(item, where), where) for item in node.elts]
        _no_refs(items, where, "a set element")
        try:
            return set(items)
        except TypeError:
            raise CallParseError(
                f"set elements must be hashable (str, number, bool, None, tuple), in {where}"
            ) from None
    if isinstance(node, ast.Dict):
        out: dict[Any, Any] = {}
        for key_node, value_node in zip(node.keys, node.values):
            if key_node is None:
                raise CallParseError(f"**-unpacking is not allowed in {where}: write the dict out")
            key = _literal(key_node, where)
            _no_refs([key], where, "a dict key")
            try:
                out[key] = _literal(value_node, where)
            except TypeError:
                raise CallParseError(
                    f"dict keys must be hashable (str, number, bool, None, tuple), in {where}"
                ) from None
        return out
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "set" and not (
        node.args or node.keywords
    ):
        return set()  # the only way to write an empty set (and what repr() gives)
    raise CallParseError(f"{_describe_node(node)} is not allowed in {where}: arguments must be {_ALLOWED}")


def _no_starred(node: ast.expr, where: str) -> ast.expr:
    if isinstance(node, ast.Starred):
        raise CallParseError(f"*-unpacking is not allowed in {where}: write the items out")
    return node


def _no_refs(values: list[Any], where: str, what: str) -> None:
    for value in values:
        if next(_iter_refs(value), None) is not None:
            raise CallParseError(f"the id of an earlier call cannot be {what}, in {where}")


# ---------------------------------------------------------------------------------------------
# Binding and type checks
# ---------------------------------------------------------------------------------------------

_JSON_LIKE_NAMES = {"true": "True", "false": "False", "null": "None", "none": "None"}


def bind_arguments(
    parsed: ParsedCall,
    tool: "Tool",
    results: Mapping[str, Any] | None = None,
    *,
    known_ids: Container[str] | None = None,
) -> dict[str, Any]:
    """Bind a parsed call to ``tool``'s schema and check every value's type.

    Positional arguments bind to the schema's properties in order. Unknown arguments, missing
    required ones, an argument given twice and too many positional arguments are errors.
    :class:`Ref` values are replaced by ``results[call_id]`` (the earlier call's Python result).
    With ``results=None``, refs are left in place and their checks deferred (``known_ids``, when
    given, still rejects refs to ids that were never used).

    Supported JSON-schema keywords: ``type`` (``string``, ``integer`` -- ``bool`` is not an
    integer --, ``number``, ``boolean``, ``array``, ``object``, ``null``, ``any``; a list of types;
    BFCL's ``dict``, ``float`` and ``tuple``), ``nullable``, ``enum``, ``items``, ``prefixItems``,
    ``properties``, ``required``, ``additionalProperties``, ``anyOf``/``oneOf``/``allOf``,
    ``minimum``/``maximum``. A parameter without ``type`` accepts anything.

    Args:
        parsed: The output of :func:`parse_call`.
        tool: The tool being called.
        results: Results of earlier calls by id, for refs.
        known_ids: Ids that refs may name, checked when ``results`` is None.

    Returns:
        ``{parameter: value}`` in the order written, ready for ``tool.handler(**kwargs)``.

    Raises:
        ArgumentError: with a message naming the tool, the argument and what is wrong.

    Example:

    ```python
    >>> from hf_asynclm.executor import Tool, bind_arguments, parse_call
    >>> tool = Tool.from_schema({"name": "book", "parameters": {"type": "object", "properties": {
    ...     "city": {"type": "string"}, "nights": {"type": "integer"}}, "required": ["city"]}},
    ...     handler=lambda city, nights=1: None)
    >>> bind_arguments(parse_call("book(w1, nights=2)"), tool, results={"w1": "Paris"})
    {'city': 'Paris', 'nights': 2}

    ```
    """
    fname = f"{tool.name}()"
    params = tool.parameters
    props: Mapping[str, Any] = params.get("properties") or {}
    names = list(props)
    required = [r for r in (params.get("required") or []) if isinstance(r, str)]
    extra = params.get("additionalProperties", False)

    if len(parsed.args) > len(names):
        takes = f"at most {len(names)} positional argument{'s' if len(names) != 1 else ''}"
        listing = f" ({', '.join(names)})" if names else ""
        raise ArgumentError(f"{fname} takes {takes}{listing} but {len(parsed.args)} were given")
    bound: dict[str, Any] = dict(zip(names, parsed.args))
    for key, value in parsed.kwargs.items():
        if key in bound:
            raise ArgumentError(f"{fname} got multiple values for argument {key!r}")
        if key not in props and not extra:
            accepts = ", ".join(names) if names else "no arguments"
            raise ArgumentError(f"{fname} got an unexpected argument {key!r}; it accepts: {accepts}")
        bound[key] = value
    missing = [r for r in required if r not in bound]
    if missing:
        listing = ", ".join(repr(m) for m in missing)
        raise ArgumentError(f"{fname} is missing required argument{'s' if len(missing) > 1 else ''} {listing}")

    origins: dict[str, str] = {}
    for key, value in bound.items():
        for ref in _iter_refs(value):
            _check_ref(ref, key, fname, results if results is not None else known_ids)
            origins.setdefault(key, ref.call_id)
        if results is not None and key in origins:
            bound[key] = _substitute(value, results)

    for key, value in bound.items():
        schema = props.get(key) if key in props else (extra if isinstance(extra, Mapping) else None)
        if schema is None:
            continue
        try:
            check_value(value, schema, f"argument {key!r}")
        except ArgumentError as exc:
            origin = f" (the result of {origins[key]})" if key in origins and results is not None else ""
            raise ArgumentError(f"{fname}: {exc}{origin}") from None
    return bound


def _check_ref(ref: Ref, key: str, fname: str, ids: Container[str] | None) -> None:
    if ids is None or ref.call_id in ids:
        return
    lower = ref.call_id.lower()
    if lower in _JSON_LIKE_NAMES:
        hint = f"; for the literal write {_JSON_LIKE_NAMES[lower]}"
    elif lower in ("nan", "inf", "infinity"):
        hint = "; non-finite numbers cannot be passed"
    else:
        hint = "; to pass a string, put it in quotes"
    raise ArgumentError(
        f"{fname}: argument {key!r} names {ref.call_id!r}, which is not the id of an earlier call{hint}"
    )


def _substitute(value: Any, results: Mapping[str, Any]) -> Any:
    if isinstance(value, Ref):
        return results[value.call_id]
    if isinstance(value, list):
        return [_substitute(v, results) for v in value]
    if isinstance(value, tuple):
        return tuple(_substitute(v, results) for v in value)
    if isinstance(value, dict):
        return {k: _substitute(v, results) for k, v in value.items()}
    return value


_ARTICLES = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "a boolean",
             "array": "an array (list)", "object": "an object (dict)", "null": "null (None)"}


def _json_type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{_json_type_name(value)} {text}"


def _matches_type(value: Any, type_name: str) -> bool:
    if type_name == "string":
        return isinstance(value, str)
    if type_name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if type_name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if type_name == "boolean":
        return isinstance(value, bool)
    if type_name == "array":
        return isinstance(value, (list, tuple))
    if type_name == "object":
        return isinstance(value, dict)
    if type_name == "null":
        return value is None
    logger.debug("unknown JSON-schema type %r: not checked", type_name)
    return True


def _same(a: Any, b: Any) -> bool:
    """Enum membership without ``True == 1`` (or ``"1" == 1``) confusions."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def check_value(value: Any, schema: Mapping[str, Any], path: str = "value") -> None:
    """Check ``value`` against a JSON schema; :class:`Ref` values (unresolved) are skipped.

    Raises:
        ArgumentError: the value does not fit; the message starts with ``path``.

    Example:

    ```python
    >>> from hf_asynclm.executor import check_value
    >>> check_value([1, 2], {"type": "array", "items": {"type": "integer"}})
    >>> check_value([1, "2"], {"type": "array", "items": {"type": "integer"}}, "argument 'xs'")
    Traceback (most recent call last):
    ...
    hf_asynclm.executor.parsing.ArgumentError: argument 'xs'[1] must be an integer, got string '2'

    ```
    """
    if isinstance(value, Ref) or not isinstance(schema, Mapping):
        return
    if schema.get("nullable") and value is None:
        return
    for combinator in ("anyOf", "oneOf"):
        options = schema.get(combinator)
        if isinstance(options, list) and options:
            errors = []
            for option in options:
                try:
                    check_value(value, option, path)
                    break
                except ArgumentError as exc:
                    errors.append(str(exc))
            else:
                raise ArgumentError(f"{path} fits none of the allowed forms: " + "; ".join(errors))
    for option in schema.get("allOf") or []:
        check_value(value, option, path)

    raw_types = schema.get("type")
    if raw_types is not None:
        types = [raw_types] if isinstance(raw_types, str) else [t for t in raw_types if isinstance(t, str)]
        types = [_TYPE_ALIASES.get(t.lower(), t.lower()) for t in types]
        if "any" in types or not types:
            matched = None
        else:
            matched = next((t for t in types if _matches_type(value, t)), "")
            if not matched:
                wanted = " or ".join(_ARTICLES.get(t, t) for t in types)
                raise ArgumentError(f"{path} must be {wanted}, got {_show(value)}")
    else:
        matched = None

    if "enum" in schema and isinstance(schema["enum"], list):
        if not any(_same(value, option) for option in schema["enum"]):
            options = ", ".join(repr(o) for o in schema["enum"][:20])
            raise ArgumentError(f"{path} must be one of {options}; got {value!r}")

    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(schema.get("minimum"), (int, float)) and value < schema["minimum"]:
            raise ArgumentError(f"{path} must be >= {schema['minimum']}, got {value!r}")
        if isinstance(schema.get("maximum"), (int, float)) and value > schema["maximum"]:
            raise ArgumentError(f"{path} must be <= {schema['maximum']}, got {value!r}")

    if isinstance(value, (list, tuple)) and matched in ("array", None):
        prefix = schema.get("prefixItems")
        if isinstance(prefix, list):
            for i, (item, item_schema) in enumerate(zip(value, prefix)):
                check_value(item, item_schema, f"{path}[{i}]")
            rest_schema = schema.get("items")
            rest = value[len(prefix) :]
        else:
            rest_schema = schema.get("items")
            rest = value
        offset = len(value) - len(rest)
        if rest_schema is False and rest:
            raise ArgumentError(f"{path} must have at most {offset} items, got {len(value)}")
        if isinstance(rest_schema, Mapping):
            for i, item in enumerate(rest):
                check_value(item, rest_schema, f"{path}[{offset + i}]")
        low, high = schema.get("minItems"), schema.get("maxItems")
        if isinstance(low, int) and len(value) < low:
            raise ArgumentError(f"{path} must have at least {low} items, got {len(value)}")
        if isinstance(high, int) and len(value) > high:
            raise ArgumentError(f"{path} must have at most {high} items, got {len(value)}")

    if isinstance(value, dict) and matched in ("object", None):
        props = schema.get("properties")
        props = props if isinstance(props, Mapping) else {}
        for key in schema.get("required") or []:
            if key not in value:
                raise ArgumentError(f"{path} is missing the key {key!r}")
        additional = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                check_value(item, props[key], f"{path}[{key!r}]")
            elif additional is False and props:
                raise ArgumentError(f"{path} has an unexpected key {key!r}; allowed keys: {', '.join(props)}")
            elif isinstance(additional, Mapping):
                check_value(item, additional, f"{path}[{key!r}]")
