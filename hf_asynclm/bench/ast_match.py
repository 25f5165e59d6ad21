"""BFCL AST matching: are the calls a model emitted among the answers BFCL accepts?

A re-implementation of the rules of BFCL's AST checker
(``bfcl_eval/eval_checker/ast_eval/ast_checker.py``, bfcl-eval 2026.3.23) for Python calls,
without importing it (that module imports every provider SDK). The rules:

- **Count.** ``simple*`` categories: exactly one call. ``multiple*``: as many calls as ground
  truth calls (one), checked against the first. ``parallel*`` (and here ``multi_turn*`` and
  ``multistep*``): as many calls as ground-truth calls, in any order, each ground-truth call
  matched to a distinct emitted call.
- **Name.** The emitted name equals the ground-truth name. BFCL replaces ``.`` with ``_`` in
  the expected name for models whose API forbids dots (``spotify.play`` -> ``spotify_play``);
  with ``underscore_to_dot=True`` (the default) both spellings are accepted.
- **Parameters.** Every parameter the function lists as required is present; every emitted
  parameter is both in the function's schema and in the ground truth ("unexpected parameter"
  otherwise); every ground-truth parameter whose allowed values do not include ``""`` is
  present ("" marks an optional parameter).
- **Types.** The value's Python type must be exactly the schema type (``bool`` is not an
  ``integer``); an ``int`` is accepted where a ``float`` is expected; a tuple where a
  ``tuple`` is expected is compared as a list; array items are type-checked one level deep.
  When the ground truth's values have another type than the schema says (BFCL's "variable"
  case, e.g. ``None`` for an optional integer), a value of the ground truth's type is accepted
  and compared as is.
- **Values.** Strings are compared after BFCL's standardisation (spaces and ``,./-_*^``
  removed, lowercased, ``'`` -> ``"``); lists element-wise in order with their string
  elements standardised; dicts key by key (one level, keys with ``""`` allowed may be
  absent); lists of dicts dict by dict; anything else with ``==`` against the allowed values.

One deliberate difference: for unordered categories BFCL matches greedily (each ground-truth
call takes the first emitted call that fits), which can reject an answer that a full
assignment accepts (it happens in the real data: ``parallel_178`` allows "Microsoft" or
"Apple" for its first call); here a perfect bipartite matching is searched, so the result is
valid whenever *some* one-to-one assignment works. Pass ``greedy=True`` for BFCL's exact
behaviour (checked against BFCL's checker on ~42,000 perturbed calls of the real data).

``functions`` may be BFCL's raw schemas (``"type": "dict"``) or the chat-template form
``{"type": "function", "function": {...}}`` with JSON-schema types (``object``, ``number``;
a property without ``type`` counts as BFCL's ``any``), as :func:`hf_asynclm.data.bfcl.to_task`
writes them.

Example:

```python
>>> from hf_asynclm.bench.ast_match import match_calls
>>> fn = [{"name": "spotify.play", "parameters": {"type": "dict", "properties": {
...     "artist": {"type": "string"}, "duration": {"type": "integer"}}, "required": ["artist", "duration"]}}]
>>> gt = [{"spotify.play": {"artist": ["Taylor Swift"], "duration": [20]}},
...       {"spotify.play": {"artist": ["Maroon 5"], "duration": [15]}}]
>>> match_calls([("spotify.play", {"artist": "maroon 5", "duration": 15}),
...              ("spotify.play", {"artist": "Taylor Swift", "duration": 20})], gt, fn, "parallel").valid
True
>>> r = match_calls([("spotify.play", {"artist": "Taylor Swift", "duration": "20"}),
...                  ("spotify.play", {"artist": "Maroon 5", "duration": 15})], gt, fn, "parallel")
>>> r.valid, r.error_type
(False, 'cannot_find_match')

```
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "MatchResult",
    "match_calls",
    "match_task",
    "check_call",
    "standardize_string",
    "ground_truth_from_calls",
]

#: BFCL type names -> Python types (``any`` is treated as a string, as BFCL does).
PYTHON_TYPE_MAPPING: dict[str, type] = {
    "string": str,
    "integer": int,
    "float": float,
    "boolean": bool,
    "array": list,
    "tuple": list,
    "dict": dict,
    "any": str,
}
#: JSON-schema type names (chat-template tools) -> BFCL type names.
_JSON_TO_BFCL: dict[str, str] = {"object": "dict", "number": "float", "null": "any"}
_NESTED_TYPES = ("array", "tuple")
_STANDARDIZE_RE = re.compile(r"[ \,\.\/\-\_\*\^]")
_MAX_SEARCH_STEPS = 200_000


@dataclass
class MatchResult:
    """Outcome of a match: ``valid`` and, when not, human-readable ``errors``.

    ``error_type`` names the first rule that failed (``wrong_count``, ``wrong_func_name``,
    ``missing_required``, ``unexpected_param``, ``type_error``, ``value_error``,
    ``missing_optional``, ``cannot_find_match``, ``unknown_function``, ``order``).
    ``assignment`` maps each ground-truth index to the emitted index it matched (valid only).
    """

    valid: bool
    errors: list[str] = field(default_factory=list)
    error_type: str | None = None
    assignment: dict[int, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.valid


class _Fail(Exception):
    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message


# ---------------------------------------------------------------------------------------------
# Normalisation helpers
# ---------------------------------------------------------------------------------------------


def standardize_string(text: str) -> str:
    """BFCL's string standardisation: drop spaces and ``,./-_*^``, lowercase, ``'`` -> ``"``.

    Example:

    ```python
    >>> standardize_string("April 1, 2024") == standardize_string("april 1 2024")
    True
    >>> standardize_string("New-York_City")
    'newyorkcity'

    ```
    """
    return _STANDARDIZE_RE.sub("", text).lower().replace("'", '"')


def _unwrap_function(fn: Mapping[str, Any]) -> Mapping[str, Any]:
    if fn.get("type") == "function" and isinstance(fn.get("function"), Mapping):
        return fn["function"]
    return fn


def _find_function(functions: Sequence[Mapping[str, Any]], name: str) -> Mapping[str, Any] | None:
    for fn in functions:
        fn = _unwrap_function(fn)
        if fn.get("name") == name:
            return fn
    return None


def _bfcl_type(schema: Mapping[str, Any] | None) -> str:
    """The BFCL type name of a property schema (JSON-schema names mapped back)."""
    if not schema:
        return "any"
    t = schema.get("type")
    if isinstance(t, list):  # ["integer", "null"] -> integer
        t = next((x for x in t if x != "null"), None)
    if t is None:
        return "any"
    t = _JSON_TO_BFCL.get(t, t)
    return t if t in PYTHON_TYPE_MAPPING else "any"


def _possible_answer_type(allowed: Sequence[Any]) -> type | None:
    for answer in allowed:
        if answer != "":
            return type(answer)
    return None


def _expected_names(name: str, underscore_to_dot: bool) -> set[str]:
    names = {name}
    if underscore_to_dot and "." in name:
        names.add(name.replace(".", "_"))
    return names


# ---------------------------------------------------------------------------------------------
# Value checkers (BFCL's type_checker / string_checker / list_checker / dict_checker)
# ---------------------------------------------------------------------------------------------


def _type_check(param: str, value: Any, allowed: Sequence[Any], type_name: str, expected: type, nested: type | None) -> bool:
    """Return ``is_variable``; raise :class:`_Fail` on a type error."""
    pa_type = _possible_answer_type(allowed)
    is_variable = pa_type is not None and pa_type is not expected
    if type(value) is expected:
        if nested is None:
            return is_variable
        for item in allowed:
            ok = True
            if isinstance(item, list):
                for v in value:
                    try:
                        _type_check(param, v, item, nested.__name__, nested, None)
                    except _Fail:
                        ok = False
                        break
            if ok:
                return is_variable
        raise _Fail(
            "type_error",
            f"Nested type checking failed for parameter {param!r}. Expected outer type {type_name} with inner "
            f"type {nested.__name__}. Parameter value: {value!r}.",
        )
    if pa_type is not None and type(value) is pa_type:
        return True
    raise _Fail(
        "type_error",
        f"Incorrect type for parameter {param!r}. Expected type {type_name}, got {type(value).__name__}. "
        f"Parameter value: {value!r}.",
    )


def _std(v: Any) -> Any:
    return standardize_string(v) if isinstance(v, str) else v


def _check_string(param: str, value: str, allowed: Sequence[Any]) -> None:
    if _std(value) not in [standardize_string(a) for a in allowed if isinstance(a, str)]:
        raise _Fail("value_error", f"Invalid value for parameter {param!r}: {value!r}. Expected one of {list(allowed)}. Case insensitive.")


def _check_list(param: str, value: Sequence[Any], allowed: Sequence[Any]) -> None:
    out = [_std(v) for v in value]
    options = []
    for a in allowed:
        if isinstance(a, (list, tuple)):
            options.append([_std(v) for v in a])
        elif a == "":
            options.append([])  # BFCL iterates over "" and gets []: an empty list passes for optional params
    if out not in options:
        raise _Fail("value_error", f"Invalid value for parameter {param!r}: {list(value)!r}. Expected one of {list(allowed)}.")


def _check_dict(param: str, value: Mapping[str, Any], allowed: Sequence[Any]) -> None:
    error: _Fail | None = None
    for option in allowed:
        if option == "" or not isinstance(option, Mapping):
            continue
        error = None
        for key, v in value.items():
            if key not in option:
                error = _Fail("value_error", f"Unexpected dict key parameter: {key!r} in {param!r}.")
                break
            std_allowed = [_std(a) for a in option[key]]
            if _std(v) not in std_allowed:
                error = _Fail("value_error", f"Invalid value for parameter {key!r} in {param!r}: {v!r}. Expected one of {std_allowed}.")
                break
        if error is None:
            for key, vals in option.items():
                if key not in value and "" not in vals:
                    error = _Fail("value_error", f"Missing dict key parameter: {key!r} in {param!r}.")
                    break
        if error is None:
            return
    raise error or _Fail("value_error", f"Invalid value for parameter {param!r}: {value!r}. Expected one of {list(allowed)}.")


def _check_list_of_dicts(param: str, value: Sequence[Any], allowed: Sequence[Any]) -> None:
    error: _Fail | None = None
    for option in allowed:
        option = [] if option == "" else option
        if not isinstance(option, (list, tuple)) or len(option) != len(value):
            error = _Fail("value_error", f"Wrong number of dictionaries in the list for parameter {param!r}.")
            continue
        try:
            for v, o in zip(value, option):
                if not isinstance(v, Mapping):
                    raise _Fail("type_error", f"Expected a dict inside {param!r}, got {type(v).__name__}.")
                _check_dict(param, v, [o])
        except _Fail as exc:
            error = exc
            continue
        return
    raise error or _Fail("value_error", f"Invalid value for parameter {param!r}: {value!r}.")


# ---------------------------------------------------------------------------------------------
# One call
# ---------------------------------------------------------------------------------------------


def _check_call(name: str, args: Mapping[str, Any], function: Mapping[str, Any], answer: Mapping[str, Any], underscore_to_dot: bool) -> None:
    (gt_name, allowed_by_param), = answer.items()
    params = function.get("parameters") or {}
    props: Mapping[str, Any] = params.get("properties") or {}
    required: Sequence[str] = params.get("required") or []

    if name not in _expected_names(gt_name, underscore_to_dot):
        raise _Fail("wrong_func_name", f"Function name {gt_name!r} not found in model output (got {name!r}).")
    for p in required:
        if p not in args:
            raise _Fail("missing_required", f"Missing required parameter: {p!r}.")
    for p, value in args.items():
        if p not in props or p not in allowed_by_param:
            raise _Fail("unexpected_param", f"Unexpected parameter: {p!r}.")
        allowed = allowed_by_param[p]
        type_name = _bfcl_type(props[p])
        expected = PYTHON_TYPE_MAPPING[type_name]
        nested = None
        if type_name in _NESTED_TYPES:
            items = props[p].get("items")
            if isinstance(items, Mapping):
                nested = PYTHON_TYPE_MAPPING[_bfcl_type(items)]
        if type_name == "tuple" and type(value) is tuple:
            value = list(value)
        if type_name == "float" and type(value) is int:
            value = float(value)
        is_variable = _type_check(p, value, allowed, type_name, expected, nested)
        if not is_variable:
            if expected is dict:
                _check_dict(p, value, allowed)
                continue
            if expected is list and nested is dict:
                _check_list_of_dicts(p, value, allowed)
                continue
            if expected is str:
                _check_string(p, value, allowed)
                continue
            if expected is list:
                _check_list(p, value, allowed)
                continue
        if value not in allowed:
            raise _Fail("value_error", f"Invalid value for parameter {p!r}: {value!r}. Expected one of {list(allowed)}.")
    for p, allowed in allowed_by_param.items():
        if p not in args and "" not in allowed:
            raise _Fail("missing_optional", f"Optional parameter {p!r} not provided and not marked as optional.")


def check_call(
    name: str,
    args: Mapping[str, Any],
    answer: Mapping[str, Any],
    functions: Sequence[Mapping[str, Any]],
    *,
    underscore_to_dot: bool = True,
) -> MatchResult:
    """Check one emitted call against one ground-truth call ``{name: {param: [allowed, ...]}}``.

    Example:

    ```python
    >>> fn = [{"name": "area", "parameters": {"type": "dict", "properties": {
    ...     "radius": {"type": "float"}, "unit": {"type": "string"}}, "required": ["radius"]}}]
    >>> check_call("area", {"radius": 2}, {"area": {"radius": [2.0], "unit": ["cm", ""]}}, fn).valid
    True
    >>> check_call("area", {"radius": 2, "color": "red"}, {"area": {"radius": [2.0]}}, fn).errors
    ["Unexpected parameter: 'color'."]

    ```
    """
    if len(answer) != 1:
        raise ValueError(f"a ground-truth call has exactly one function name, got {list(answer)}")
    gt_name = next(iter(answer))
    function = _find_function(functions, gt_name)
    if function is None:
        return MatchResult(False, [f"Function {gt_name!r} of the ground truth is not among the functions."], "unknown_function")
    try:
        _check_call(name, args, function, answer, underscore_to_dot)
    except _Fail as exc:
        return MatchResult(False, [exc.message], exc.error_type)
    return MatchResult(True, assignment={0: 0})


# ---------------------------------------------------------------------------------------------
# Several calls
# ---------------------------------------------------------------------------------------------


def _unordered(category: str) -> bool:
    return "parallel" in category or category.startswith(("multi_turn", "multistep"))


def match_calls(
    emitted: Sequence[tuple[str, Mapping[str, Any]]],
    ground_truth: Sequence[Mapping[str, Any]],
    functions: Sequence[Mapping[str, Any]],
    category: str,
    *,
    underscore_to_dot: bool = True,
    dependencies: Sequence[Sequence[int]] | None = None,
    greedy: bool = False,
) -> MatchResult:
    """Match emitted calls against BFCL ground truth with the rules of BFCL's AST checker.

    Args:
        emitted: the calls the model made, as ``(name, arguments)`` in emission order.
        ground_truth: BFCL possible answers: one ``{name: {param: [allowed values]}}`` per call.
        functions: the function schemas (BFCL raw form or chat-template tools).
        category: BFCL category; decides the counting rule (see the module docstring).
        underscore_to_dot: also accept ``a_b`` for an expected ``a.b``.
        dependencies: optional, for unordered categories: ``dependencies[i]`` lists the
            ground-truth indices that call ``i`` depends on; the emitted call matched to ``i``
            must then come after those matched to its dependencies (chains of
            ``multi_turn``/``multistep`` tasks).
        greedy: unordered categories without dependencies: match like BFCL (each
            ground-truth call, in order, takes the first free emitted call that fits) instead
            of searching a full one-to-one assignment.

    Returns:
        A :class:`MatchResult`; ``assignment`` maps ground-truth index -> emitted index.
    """
    emitted = list(emitted)
    gt = list(ground_truth)
    if not _unordered(category):
        if "multiple" in category:
            if len(emitted) != len(gt):
                return MatchResult(False, [f"Wrong number of functions: expected {len(gt)}, got {len(emitted)}."], "wrong_count")
        elif len(emitted) != 1:
            return MatchResult(False, [f"Wrong number of functions: expected 1, got {len(emitted)}."], "wrong_count")
        if not gt:
            raise ValueError("empty ground truth")
        name, args = emitted[0]
        return check_call(name, args, gt[0], functions, underscore_to_dot=underscore_to_dot)

    if len(emitted) != len(gt):
        return MatchResult(False, [f"Wrong number of functions: expected {len(gt)}, got {len(emitted)}."], "wrong_count")
    # compatibility matrix: which emitted call fits which ground-truth call
    ok: list[list[bool]] = []
    reasons: list[list[str]] = []
    for answer in gt:
        row, why = [], []
        for name, args in emitted:
            r = check_call(name, args, answer, functions, underscore_to_dot=underscore_to_dot)
            if r.error_type == "unknown_function":
                return r
            row.append(r.valid)
            why.append(r.errors[0] if r.errors else "")
        ok.append(row)
        reasons.append(why)

    errors = []
    for i, row in enumerate(ok):
        if not any(row):
            gt_name = next(iter(gt[i]))
            detail = "; ".join(f"emitted #{j}: {reasons[i][j]}" for j in range(len(emitted)))
            errors.append(f"No emitted call matches ground-truth call #{i} ({gt_name}). {detail}")
    if errors:
        return MatchResult(False, errors, "cannot_find_match")

    if dependencies is None:
        assignment = _greedy(ok) if greedy else _bipartite(ok)
        if assignment is None:
            how = "the greedy (BFCL) assignment fails" if greedy else "no one-to-one assignment exists"
            return MatchResult(
                False,
                [f"Every ground-truth call fits some emitted call, but {how} (a duplicated call?)."],
                "cannot_find_match",
            )
        return MatchResult(True, assignment=assignment)

    if len(dependencies) != len(gt):
        raise ValueError("dependencies must have one entry per ground-truth call")
    assignment = _ordered_assignment(ok, dependencies)
    if assignment is None:
        if _bipartite(ok) is None:
            return MatchResult(False, ["No one-to-one assignment of emitted to ground-truth calls exists."], "cannot_find_match")
        return MatchResult(False, ["The calls match, but not in an order that respects the dependencies."], "order")
    return MatchResult(True, assignment=assignment)


def _greedy(ok: list[list[bool]]) -> dict[int, int] | None:
    """BFCL's matching: ground-truth calls in order, each takes the first free emitted call."""
    assignment: dict[int, int] = {}
    for i, row in enumerate(ok):
        j = next((j for j, fits in enumerate(row) if fits and j not in assignment.values()), None)
        if j is None:
            return None
        assignment[i] = j
    return assignment


def _bipartite(ok: list[list[bool]]) -> dict[int, int] | None:
    """Perfect matching ground truth -> emitted (Kuhn's augmenting paths)."""
    owner: dict[int, int] = {}  # emitted index -> ground-truth index

    def augment(i: int, seen: set[int]) -> bool:
        for j, fits in enumerate(ok[i]):
            if fits and j not in seen:
                seen.add(j)
                if j not in owner or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    for i in range(len(ok)):
        if not augment(i, set()):
            return None
    return {i: j for j, i in owner.items()}


def _ordered_assignment(ok: list[list[bool]], deps: Sequence[Sequence[int]]) -> dict[int, int] | None:
    """Backtracking assignment where each call comes after the calls it depends on."""
    n = len(ok)
    dependents: list[list[int]] = [[] for _ in range(n)]
    for i, ds in enumerate(deps):
        for d in ds:
            if not 0 <= d < n:
                raise ValueError(f"dependency index {d} out of range")
            dependents[d].append(i)
    assign: dict[int, int] = {}
    used: set[int] = set()
    steps = 0

    def consistent(i: int, j: int) -> bool:
        if any(d in assign and assign[d] >= j for d in deps[i]):
            return False
        return not any(k in assign and assign[k] <= j for k in dependents[i])

    def search(i: int) -> bool:
        nonlocal steps
        if i == n:
            return True
        for j, fits in enumerate(ok[i]):
            steps += 1
            if steps > _MAX_SEARCH_STEPS:
                return False
            if fits and j not in used and consistent(i, j):
                assign[i] = j
                used.add(j)
                if search(i + 1):
                    return True
                del assign[i]
                used.discard(j)
        return False

    if search(0):
        return dict(assign)
    if steps > _MAX_SEARCH_STEPS:
        logger.warning("ordered assignment search gave up after %d steps", _MAX_SEARCH_STEPS)
    return None


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------


def ground_truth_from_calls(calls: Sequence[Any]) -> list[dict[str, dict[str, list[Any]]]]:
    """BFCL possible-answer form of planned calls: each argument's value is the only one allowed.

    Example:

    ```python
    >>> from hf_asynclm.data.tasks import PlannedCall
    >>> ground_truth_from_calls([PlannedCall("c1", "cd", {"folder": "docs"})])
    [{'cd': {'folder': ['docs']}}]

    ```
    """
    return [{c.name: {k: [v] for k, v in c.arguments.items()}} for c in calls]


def match_task(
    emitted: Sequence[tuple[str, Mapping[str, Any]]],
    task: Any,
    *,
    underscore_to_dot: bool = True,
    enforce_dependencies: bool = True,
) -> MatchResult:
    """Match emitted calls against a :class:`~hf_asynclm.data.tasks.Task`.

    Uses ``task.meta["ground_truth"]`` (BFCL possible answers, one per planned call, in the
    same order) when present, else the planned calls' literal arguments; the task's tools as
    functions and its category for the counting rule. With ``enforce_dependencies`` the
    planned calls' ``depends_on`` become ordering constraints.
    """
    gt = task.meta.get("ground_truth") if isinstance(task.meta, Mapping) else None
    if gt is None:
        gt = ground_truth_from_calls(task.calls)
    deps = None
    if enforce_dependencies and _unordered(task.category) and any(c.depends_on for c in task.calls):
        if len(gt) != len(task.calls):
            raise ValueError("ground truth and planned calls differ in length: cannot map dependencies")
        index = {c.call_id: i for i, c in enumerate(task.calls)}
        deps = [[index[d] for d in c.depends_on] for c in task.calls]
    return match_calls(emitted, gt, task.tools, task.category, underscore_to_dot=underscore_to_dot, dependencies=deps)
