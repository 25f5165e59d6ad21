"""Tools the model may call: a name, a JSON schema for the prompt, and the Python code to run.

A :class:`Tool` is built from a documented Python function (the schema comes from
``transformers.utils.get_json_schema``, like ``apply_chat_template(tools=[fn])`` does) or from
an existing schema plus a handler (BFCL and OpenAI-style tool lists). A :class:`ToolRegistry`
holds the tools of a session by name.

Example:

```python
>>> from hf_asynclm.executor import ToolRegistry
>>> def get_weather(city: str) -> dict:
...     '''Current weather in a city.
...
...     Args:
...         city: Name of the city.
...     '''
...     return {"city": city, "temp_c": 18}
>>> registry = ToolRegistry([get_weather])
>>> registry.get("get_weather").schema["function"]["parameters"]["required"]
['city']

```
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

logger = logging.getLogger(__name__)

__all__ = ["Tool", "ToolRegistry", "UnknownToolError", "normalize_schema"]

# JSON-schema type names as other tool formats spell them (BFCL writes "dict", "float", "tuple").
_TYPE_ALIASES: dict[str, str] = {
    "dict": "object",
    "float": "number",
    "tuple": "array",
    "list": "array",
    "str": "string",
    "int": "integer",
    "bool": "boolean",
}


class UnknownToolError(KeyError):
    """No tool of that name is registered. The message lists the tools that are."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


def _is_coroutine_callable(fn: Callable[..., Any]) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # objects with an ``async def __call__``
    return call is not None and inspect.iscoroutinefunction(call)


def _is_valid_tool_name(name: str) -> bool:
    # identifiers, or dotted identifiers such as BFCL's "math.factorial"
    return bool(name) and all(part.isidentifier() for part in name.split("."))


def _normalize_types(node: Any) -> Any:
    """Map non-standard type names (``dict``, ``float``, ``tuple``) to JSON-schema ones, recursively."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "type" and isinstance(value, str):
                out[key] = _TYPE_ALIASES.get(value.lower(), value.lower())
            elif key == "type" and isinstance(value, list):
                out[key] = [_TYPE_ALIASES.get(v.lower(), v.lower()) if isinstance(v, str) else v for v in value]
            elif key in ("properties", "$defs", "definitions") and isinstance(value, dict):
                out[key] = {k: _normalize_types(v) for k, v in value.items()}
            elif key in ("enum", "default", "const", "examples", "required"):
                out[key] = value  # data, not schema
            else:
                out[key] = _normalize_types(value)
        return out
    if isinstance(node, list):
        return [_normalize_types(v) for v in node]
    return node


def normalize_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``schema`` in the ``{"type": "function", "function": {...}}`` form, types normalized.

    Accepts the bare function dict (``{"name", "description", "parameters"}``) or the wrapped
    form. Object types written ``"dict"`` (BFCL), ``"float"`` and ``"tuple"`` become ``"object"``,
    ``"number"`` and ``"array"``. A missing ``parameters`` becomes an empty object schema. The
    input is not modified.

    Raises:
        ValueError: the schema has no function name, or its name is not an identifier
            (dotted names like ``math.sqrt`` are fine).

    Example:

    ```python
    >>> from hf_asynclm.executor import normalize_schema
    >>> params = {"type": "dict", "properties": {"x": {"type": "float"}}}
    >>> schema = normalize_schema({"name": "f", "parameters": params})
    >>> schema["type"], schema["function"]["parameters"]
    ('function', {'type': 'object', 'properties': {'x': {'type': 'number'}}})

    ```
    """
    if not isinstance(schema, Mapping):
        raise ValueError(f"a tool schema must be a dict, got {type(schema).__name__}")
    function = schema.get("function") if "function" in schema else schema
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ValueError(
            "a tool schema needs a function name: pass {'type': 'function', 'function': {'name': ..., "
            "'description': ..., 'parameters': {...}}} or the inner function dict"
        )
    name = function["name"]
    if not _is_valid_tool_name(name):
        raise ValueError(
            f"tool name {name!r} cannot be written in a call: use a Python identifier "
            "(or dotted identifiers such as 'math.sqrt')"
        )
    function = copy.deepcopy(dict(function))
    parameters = function.get("parameters")
    if parameters is None:
        function["parameters"] = {"type": "object", "properties": {}}
    elif not isinstance(parameters, Mapping):
        kind = type(parameters).__name__
        raise ValueError(f"the 'parameters' of tool {name!r} must be a JSON-schema object, got {kind}")
    else:
        function["parameters"] = _normalize_types(parameters)
    return {"type": "function", "function": function}


@dataclass
class Tool:
    """A callable tool: its name, its JSON schema (what the model sees) and its handler.

    Build one with :meth:`from_callable` (schema from the function's type hints and Google-style
    docstring) or :meth:`from_schema` (an existing schema plus any callable). ``handler`` may be a
    plain function (run in a worker thread) or an ``async def`` (awaited on the executor's event
    loop); ``is_async`` is computed from it. ``timeout_s`` overrides the executor's timeout for
    this tool.

    Example:

    ```python
    >>> from hf_asynclm.executor import Tool
    >>> async def add(a: int, b: int = 1) -> int:
    ...     '''Add two numbers.
    ...
    ...     Args:
    ...         a: First number.
    ...         b: Second number.
    ...     '''
    ...     return a + b
    >>> tool = Tool.from_callable(add, timeout_s=2.0, latency_ms=5)
    >>> tool.name, tool.is_async, tool.parameter_names, tool.latency_ms
    ('add', True, ['a', 'b'], 5)

    ```
    """

    name: str
    schema: dict[str, Any]
    handler: Callable[..., Any]
    is_async: bool = field(init=False)
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if not callable(self.handler):
            raise TypeError(f"the handler of tool {self.name!r} must be callable, got {type(self.handler).__name__}")
        self.schema = normalize_schema(self.schema)
        if self.schema["function"]["name"] != self.name:
            self.schema["function"]["name"] = self.name
        if not _is_valid_tool_name(self.name):
            raise ValueError(f"tool name {self.name!r} cannot be written in a call: use a Python identifier")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"timeout_s of tool {self.name!r} must be positive or None, got {self.timeout_s}")
        self.is_async = _is_coroutine_callable(self.handler)

    # constructors ------------------------------------------------------------------------
    @classmethod
    def from_callable(
        cls,
        fn: Callable[..., Any],
        name: str | None = None,
        timeout_s: float | None = None,
        latency_ms: float | None = None,
        free_text: Sequence[str] = (),
    ) -> "Tool":
        """Build a tool from a function with type hints and a Google-style docstring.

        Args:
            fn: The function (sync or ``async def``).
            name: Name the model calls it by (default: the function's name).
            timeout_s: Per-tool timeout, overriding the executor's.
            latency_ms: Expected execution time, shown to the model as ``"x-latency-ms"``.
            free_text: String parameters whose values the model composes rather than copies (a
                message body): marked ``"x-free-text": true``, so that ``constrain_calls="grounded"``
                holds them to the schema alone.

        Raises:
            ValueError: ``get_json_schema`` cannot describe the function (the message says what
                its docstring or signature lacks), or a ``free_text`` name is not one of its string
                parameters.
        """
        from transformers.utils import get_json_schema

        fn_name = getattr(fn, "__name__", type(fn).__name__)
        try:
            schema = get_json_schema(fn)
        except Exception as exc:  # TypeHintParsingException, DocstringParsingException, ...
            raise ValueError(
                f"cannot build a tool schema for function {fn_name!r}: {exc}. A tool function needs a type hint "
                "on every parameter and a Google-style docstring: a one-line description, then an 'Args:' "
                "section with one 'name: description' entry per parameter. Or build the tool with "
                "Tool.from_schema(schema, handler)."
            ) from exc
        schema["function"].pop("return", None)  # not part of the chat-template schema format
        if name is not None:
            schema["function"]["name"] = name
        if latency_ms is not None:
            schema["function"]["x-latency-ms"] = latency_ms
        mark_free_text(schema, free_text)
        return cls(name=schema["function"]["name"], schema=schema, handler=fn, timeout_s=timeout_s)

    @classmethod
    def from_schema(
        cls,
        schema: Mapping[str, Any],
        handler: Callable[..., Any],
        *,
        timeout_s: float | None = None,
    ) -> "Tool":
        """Build a tool from a JSON schema and a handler.

        Args:
            schema: ``{"type": "function", "function": {...}}`` or the bare function dict;
                BFCL's ``"type": "dict"`` is accepted for objects.
            handler: Called with the call's arguments as keywords.
            timeout_s: Per-tool timeout, overriding the executor's.
        """
        normalized = normalize_schema(schema)
        return cls(name=normalized["function"]["name"], schema=normalized, handler=handler, timeout_s=timeout_s)

    # views -------------------------------------------------------------------------------
    @property
    def function(self) -> dict[str, Any]:
        """The inner function dict of the schema (``name``, ``description``, ``parameters``)."""
        return self.schema["function"]

    @property
    def parameters(self) -> dict[str, Any]:
        """The JSON schema of the arguments (an object schema)."""
        return self.schema["function"]["parameters"]

    @property
    def parameter_names(self) -> list[str]:
        """Parameter names in schema order (the order positional arguments bind to)."""
        return list((self.parameters.get("properties") or {}).keys())

    @property
    def latency_ms(self) -> float | None:
        """Expected execution time from ``"x-latency-ms"``, if the schema gives one."""
        return self.function.get("x-latency-ms", self.schema.get("x-latency-ms"))


def mark_free_text(schema: Mapping[str, Any], names: Iterable[str]) -> None:
    """Mark string parameters of a tool schema (``{"type": "function", "function": {...}}`` or the
    bare function dict) free text, in place: ``"x-free-text": true`` on each, which exempts its
    values from ``constrain_calls="grounded"`` (see :data:`hf_asynclm.call_grammar.FREE_TEXT_KEY`).

    Raises:
        ValueError: a name is not a parameter of the tool, or not a string parameter.

    Example:

    ```python
    >>> from hf_asynclm.executor.registry import mark_free_text
    >>> schema = {"name": "send_message", "parameters": {"type": "object", "properties": {
    ...     "to": {"type": "string"}, "text": {"type": "string"}}}}
    >>> mark_free_text(schema, ["text"])
    >>> schema["parameters"]["properties"]["text"]
    {'type': 'string', 'x-free-text': True}

    ```
    """
    function = schema.get("function", schema)
    props = (function.get("parameters") or {}).get("properties") or {}
    for name in names:
        prop = props.get(name)
        if not isinstance(prop, dict):
            raise ValueError(
                f"free_text names {name!r}, which is not a parameter of tool {function.get('name')!r} "
                f"(its parameters: {', '.join(props) or 'none'})"
            )
        types = prop.get("type")
        if "string" not in (types if isinstance(types, list) else [types]):
            raise ValueError(
                f"free_text names {name!r} of tool {function.get('name')!r}, a parameter of type {types!r}: "
                "only string parameters can be free text"
            )
        prop["x-free-text"] = True


def add_value_rules(schema: Mapping[str, Any], rules: Mapping[str, Mapping[str, Any]]) -> None:
    """Add JSON-schema keywords that say what a tool's parameters accept beyond their type
    (``pattern``, ``minLength`` / ``maxLength``, ``minimum`` / ``maximum``, ...), in place, per
    parameter name; the call constraint holds values to them (:class:`hf_asynclm.call_grammar.ValueRule`).

    Raises:
        ValueError: a name is not a parameter of the tool.

    Example:

    ```python
    >>> from hf_asynclm.executor.registry import add_value_rules
    >>> schema = {"name": "get_calendar", "parameters": {"type": "object", "properties": {"date": {"type": "string"}}}}
    >>> add_value_rules(schema, {"date": {"pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}})
    >>> schema["parameters"]["properties"]["date"]["pattern"]
    '^[0-9]{4}-[0-9]{2}-[0-9]{2}$'

    ```
    """
    function = schema.get("function", schema)
    props = (function.get("parameters") or {}).get("properties") or {}
    for name, rule in rules.items():
        prop = props.get(name)
        if not isinstance(prop, dict):
            raise ValueError(
                f"value rules name {name!r}, which is not a parameter of tool {function.get('name')!r} "
                f"(its parameters: {', '.join(props) or 'none'})"
            )
        prop.update(rule)


ToolLike = Union[Tool, Callable[..., Any], "tuple[Mapping[str, Any], Callable[..., Any]]"]


class ToolRegistry:
    """The tools of a session, by name.

    Accepts :class:`Tool` objects, documented functions (see :meth:`Tool.from_callable`) and
    ``(schema, handler)`` pairs, in any mix.

    Example:

    ```python
    >>> from hf_asynclm.executor import ToolRegistry
    >>> schema = {"name": "math.sqrt", "description": "Square root.",
    ...           "parameters": {"type": "dict", "properties": {"x": {"type": "float"}}, "required": ["x"]}}
    >>> registry = ToolRegistry([(schema, lambda x: x ** 0.5)])
    >>> "math.sqrt" in registry, len(registry), registry.schemas()[0]["function"]["parameters"]["type"]
    (True, 1, 'object')
    >>> registry.get("sqrt")
    Traceback (most recent call last):
    ...
    hf_asynclm.executor.registry.UnknownToolError: no tool named 'sqrt'; known tools: math.sqrt

    ```
    """

    def __init__(self, tools: Iterable[ToolLike] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.add(tool)

    def add(
        self,
        tool_or_fn: ToolLike | Mapping[str, Any],
        handler: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        timeout_s: float | None = None,
        latency_ms: float | None = None,
        free_text: Sequence[str] = (),
        replace: bool = False,
    ) -> Tool:
        """Register a tool and return it.

        Args:
            tool_or_fn: A :class:`Tool`, a documented function, a ``(schema, handler)`` pair, or a
                schema dict (then pass ``handler``).
            handler: The handler, when ``tool_or_fn`` is a schema dict.
            name: Register a function under another name (functions only).
            timeout_s: Per-tool timeout (functions and schemas).
            latency_ms: Expected latency shown to the model (functions only).
            free_text: String parameters the model composes rather than copies, exempt from
                ``constrain_calls="grounded"`` (functions and schemas; see :func:`mark_free_text`).
            replace: Replace a tool of the same name instead of raising.

        Raises:
            ValueError: a tool of that name exists (and ``replace`` is False), or the input
                cannot be turned into a tool.
        """
        if isinstance(tool_or_fn, Tool):
            if name is not None or latency_ms is not None or free_text:
                raise ValueError(
                    "name=, latency_ms= and free_text= apply to functions (free_text= to schemas too); a Tool object "
                    "already has its schema: pass Tool.from_callable(..., free_text=...)"
                )
            tool = tool_or_fn
        elif isinstance(tool_or_fn, tuple):
            if len(tool_or_fn) != 2:
                raise ValueError(f"a tool tuple must be (schema, handler), got {len(tool_or_fn)} items")
            tool = Tool.from_schema(tool_or_fn[0], tool_or_fn[1], timeout_s=timeout_s)
            mark_free_text(tool.schema, free_text)
        elif isinstance(tool_or_fn, Mapping):
            if handler is None:
                raise ValueError("a schema dict needs a handler: registry.add(schema, handler)")
            tool = Tool.from_schema(tool_or_fn, handler, timeout_s=timeout_s)
            mark_free_text(tool.schema, free_text)
        elif callable(tool_or_fn):
            tool = Tool.from_callable(tool_or_fn, name=name, timeout_s=timeout_s, latency_ms=latency_ms, free_text=free_text)
        else:
            raise ValueError(
                f"cannot make a tool from {type(tool_or_fn).__name__}: pass a Tool, a documented function "
                "or a (schema, handler) pair"
            )
        if tool.name in self._tools and not replace:
            raise ValueError(f"a tool named {tool.name!r} is already registered; pass replace=True to replace it")
        self._tools[tool.name] = tool
        logger.debug("registered tool %s (async=%s)", tool.name, tool.is_async)
        return tool

    def get(self, name: str) -> Tool:
        """The tool called ``name``.

        Raises:
            UnknownToolError: (a ``KeyError``) no such tool; the message lists the known ones.
        """
        try:
            return self._tools[name]
        except (KeyError, TypeError):
            known = ", ".join(self._tools) or "(none)"
            raise UnknownToolError(f"no tool named {name!r}; known tools: {known}") from None

    def remove(self, name: str) -> Tool:
        """Unregister and return the tool called ``name`` (``UnknownToolError`` if absent)."""
        tool = self.get(name)
        del self._tools[name]
        return tool

    @property
    def names(self) -> list[str]:
        """Tool names in registration order."""
        return list(self._tools)

    def schemas(self) -> list[dict[str, Any]]:
        """The tools' schemas, for ``apply_chat_template(tools=...)`` or a system prompt."""
        return [tool.schema for tool in self._tools.values()]

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(list(self._tools.values()))

    def __len__(self) -> int:
        return len(self._tools)

    def __repr__(self) -> str:
        return f"ToolRegistry([{', '.join(self._tools)}])"

    @classmethod
    def coerce(
        cls,
        tools: "ToolRegistry | Iterable[ToolLike] | Mapping[str, Callable[..., Any]] | Callable[..., Any] | None",
    ) -> "ToolRegistry":
        """Turn what a user passes as ``tools=`` into a registry.

        ``None`` gives an empty registry, a registry is returned as it is, a ``{name: function}``
        mapping registers each function under its key, a single tool or function gives a
        registry of one, and any other iterable is passed to :class:`ToolRegistry`.
        """
        if tools is None:
            return cls()
        if isinstance(tools, ToolRegistry):
            return tools
        if isinstance(tools, Mapping):
            if isinstance(tools.get("function"), Mapping) or isinstance(tools.get("name"), str):
                raise ValueError("got a single schema dict: pass [(schema, handler)] to register it with its handler")
            registry = cls()
            for key, fn in tools.items():
                registry.add(fn, name=key) if not isinstance(fn, Tool) else registry.add(fn)
            return registry
        if isinstance(tools, Tool) or (callable(tools) and not isinstance(tools, type)):
            return cls([tools])
        if isinstance(tools, (str, bytes)):
            raise ValueError("tools must be functions, Tool objects or (schema, handler) pairs, not a string")
        return cls(tools)
