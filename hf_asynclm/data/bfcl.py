"""BFCL (Berkeley Function Calling Leaderboard) as a source of :class:`~hf_asynclm.data.tasks.Task` s.

The data comes from the ``bfcl-eval`` package, installed without its (huge) dependencies::

    pip install --no-deps bfcl-eval==2026.3.23

Nothing of ``bfcl_eval`` is imported: the package is only located (``importlib.util.find_spec``)
and its ``data/`` folder read. Layout (bfcl-eval 2026.3.23)::

    data/BFCL_v4_<category>.json                  one JSON object per line: id, question, function
    data/possible_answer/BFCL_v4_<category>.json  id, ground_truth
    data/multi_turn_func_doc/<class file>.json     schemas of the multi-turn API classes

Single-turn categories become tasks of independent calls (``parallel``: several calls of one
function, ``parallel_multiple``: of several). ``multi_turn_base`` samples become chains: the
first turn's ground-truth calls, each depending on the one before (the paper's 1-5 dependent
calls per sample); :func:`multistep_parallel_tasks` joins three such chains into one task, the
paper's multi-step parallel workload.

Known data slips (bfcl-eval 2026.3.23): a few ground-truth values break their own schema
(``simple_python_307`` passes ``venue=True`` to a string parameter, ``parallel_multiple_94``
sorts strings in an integer array, two live entries use values outside an ``enum``), and two
``parallel_multiple`` answers list an optional parameter the schema lacks (left out here).

Example:

```python
>>> from hf_asynclm.data.bfcl import to_task, with_cheat_sheet
>>> entry = {"id": "parallel_0",
...     "question": [[{"role": "user", "content": "Play Taylor Swift for 20 min and Maroon 5 for 15."}]],
...     "function": [{"name": "spotify.play", "description": "Play songs.", "parameters": {"type": "dict",
...         "properties": {"artist": {"type": "string"}, "duration": {"type": "integer"}},
...         "required": ["artist", "duration"]}}],
...     "ground_truth": [{"spotify.play": {"artist": ["Taylor Swift"], "duration": [20]}},
...                      {"spotify.play": {"artist": ["Maroon 5"], "duration": [15]}}]}
>>> task = to_task(entry, "parallel")
>>> [c.body() for c in task.calls]
['spotify.play(artist="Taylor Swift", duration=20)', 'spotify.play(artist="Maroon 5", duration=15)']
>>> task.tools[0]["function"]["parameters"]["type"]
'object'
>>> with_cheat_sheet(task, {"c1": 300, "c2": 120}).messages[-1]["content"].splitlines()[-1]
'Plan: c1 spotify.play(artist="Taylor Swift", duration=20) ~300ms; c2 spotify.play(artist="Maroon 5", duration=15) ~120ms'

```
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import logging
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hf_asynclm.data.tasks import PlannedCall, Task

logger = logging.getLogger(__name__)

__all__ = [
    "CATEGORIES",
    "HELD_OUT_CATEGORIES",
    "MULTISTEP_CATEGORY",
    "MULTI_TURN_CLASS_FILES",
    "DATA_DIR_ENV",
    "bfcl_data_dir",
    "available_categories",
    "load_category",
    "load_tasks",
    "to_task",
    "to_tool",
    "parse_call",
    "join_chains",
    "multistep_parallel_tasks",
    "PLAN_LAYOUTS",
    "check_plan_layout",
    "with_cheat_sheet",
    "split",
]

#: The categories the project uses (others load too, if their files exist).
CATEGORIES: tuple[str, ...] = (
    "simple_python",
    "multiple",
    "parallel",
    "parallel_multiple",
    "live_parallel",
    "live_parallel_multiple",
    "multi_turn_base",
)
#: Whole categories kept for evaluation only (never split into training).
HELD_OUT_CATEGORIES: frozenset[str] = frozenset({"live_parallel", "live_parallel_multiple"})
#: Category of the tasks :func:`multistep_parallel_tasks` builds.
MULTISTEP_CATEGORY = "multistep_parallel"
#: Multi-turn API classes -> their schema file in ``multi_turn_func_doc/`` (as in bfcl-eval).
MULTI_TURN_CLASS_FILES: dict[str, str] = {
    "GorillaFileSystem": "gorilla_file_system.json",
    "MathAPI": "math_api.json",
    "MessageAPI": "message_api.json",
    "TwitterAPI": "posting_api.json",
    "TicketAPI": "ticket_api.json",
    "TradingBot": "trading_bot.json",
    "TravelAPI": "travel_booking.json",
    "VehicleControlAPI": "vehicle_control.json",
    "WebSearchAPI": "web_search.json",
    "MemoryAPI_kv": "memory_kv.json",
    "MemoryAPI_vector": "memory_vector.json",
    "MemoryAPI_rec_sum": "memory_rec_sum.json",
}
#: Environment variable that points at a BFCL data folder (overrides the installed package).
DATA_DIR_ENV = "BFCL_DATA_DIR"

_INSTALL_HINT = (
    "BFCL data not found. Install it with `pip install --no-deps bfcl-eval==2026.3.23` "
    "(data only; --no-deps skips its huge provider SDK dependencies), or download the Hub dataset "
    "gorilla-llm/Berkeley-Function-Calling-Leaderboard and pass its folder as data_dir= "
    f"(or set {DATA_DIR_ENV})."
)
_FILE_RE = re.compile(r"^BFCL_v(\d+)_(.+)\.json$")
_SKIP = object()


# ---------------------------------------------------------------------------------------------
# Locating and loading
# ---------------------------------------------------------------------------------------------


def bfcl_data_dir() -> Path:
    """The BFCL data folder: ``$BFCL_DATA_DIR``, else ``data/`` of the installed ``bfcl_eval``.

    The package is located, not imported (importing it pulls in provider SDKs).

    Raises:
        FileNotFoundError: with install instructions, when no data folder is found.
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        path = Path(env)
        if path.is_dir():
            return path
        raise FileNotFoundError(f"{DATA_DIR_ENV}={env!r} is not a folder. {_INSTALL_HINT}")
    try:
        spec = importlib.util.find_spec("bfcl_eval")
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(loc) / "data"
        if path.is_dir():
            return path
    raise FileNotFoundError(_INSTALL_HINT)


def _category_files(data_dir: Path) -> dict[str, Path]:
    """category -> file, the highest BFCL version when several exist."""
    found: dict[str, tuple[int, Path]] = {}
    if not data_dir.is_dir():
        return {}
    for p in data_dir.iterdir():
        m = _FILE_RE.match(p.name)
        if m and p.is_file():
            version, name = int(m.group(1)), m.group(2)
            if name not in found or version > found[name][0]:
                found[name] = (version, p)
    return {name: p for name, (_, p) in found.items()}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({exc.msg})") from exc
    return out


def available_categories(data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Categories that have a data file in ``data_dir`` (default :func:`bfcl_data_dir`)."""
    root = Path(data_dir) if data_dir is not None else bfcl_data_dir()
    return sorted(_category_files(root))


def _multi_turn_functions(root: Path, classes: Iterable[str], excluded: Iterable[str], cache: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    excluded = set(excluded)
    funcs: list[dict[str, Any]] = []
    seen: set[str] = set()
    for cls in classes:
        fname = MULTI_TURN_CLASS_FILES.get(cls)
        if fname is None:
            raise ValueError(f"unknown multi-turn class {cls!r}; known: {sorted(MULTI_TURN_CLASS_FILES)}")
        if fname not in cache:
            path = root / "multi_turn_func_doc" / fname
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing (multi-turn schemas of {cls})")
            cache[fname] = _read_jsonl(path)
        for fn in cache[fname]:
            if fn["name"] in excluded or fn["name"] in seen:
                continue
            seen.add(fn["name"])
            funcs.append(copy.deepcopy(fn))
    return funcs


def load_category(name: str, data_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Raw BFCL entries of a category, each joined with its possible answer.

    Each entry is BFCL's JSON object (``id``, ``question``, ``function``, ...) plus
    ``ground_truth`` from ``possible_answer/`` when the category has answers. Multi-turn
    entries carry no ``function``: it is filled in from ``multi_turn_func_doc/`` (the
    ``involved_classes`` minus ``excluded_function``).

    Args:
        name: category, e.g. ``parallel`` or ``multi_turn_base`` (file ``BFCL_v4_<name>.json``;
            the highest version present is used).
        data_dir: a BFCL data folder (default :func:`bfcl_data_dir`).

    Raises:
        FileNotFoundError: no data folder.
        ValueError: no file for this category.
    """
    root = Path(data_dir) if data_dir is not None else bfcl_data_dir()
    files = _category_files(root)
    if name not in files:
        raise ValueError(f"no BFCL file for category {name!r} in {root}; available: {sorted(files)}")
    entries = _read_jsonl(files[name])
    answers_files = _category_files(root / "possible_answer")
    if name in answers_files:
        answers = {a["id"]: a["ground_truth"] for a in _read_jsonl(answers_files[name])}
        missing = 0
        for e in entries:
            if e["id"] in answers:
                e["ground_truth"] = answers[e["id"]]
            else:
                missing += 1
        if missing:
            logger.warning("BFCL %s: %d entries have no possible answer", name, missing)
    if name.startswith("multi_turn"):
        cache: dict[str, list[dict[str, Any]]] = {}
        for e in entries:
            if "function" not in e:
                e["function"] = _multi_turn_functions(root, e.get("involved_classes", []), e.get("excluded_function", []), cache)
    logger.debug("loaded %d BFCL entries of %s from %s", len(entries), name, files[name])
    return entries


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------

_TYPE_MAP = {"dict": "object", "float": "number", "tuple": "array"}
_DATA_KEYS = frozenset({"default", "enum", "example", "examples", "const"})


def _convert_schema(schema: Any) -> Any:
    """BFCL schema -> JSON schema: ``dict`` -> ``object``, ``float`` -> ``number``, ``tuple`` ->
    ``array``, ``any`` -> no type; recursive through properties, items and combinators."""
    if isinstance(schema, list):
        return [_convert_schema(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "type" and isinstance(value, str):
            if value == "any":
                continue
            out[key] = _TYPE_MAP.get(value, value)
        elif key == "properties" and isinstance(value, Mapping):
            out[key] = {p: _convert_schema(s) for p, s in value.items()}
        elif key in _DATA_KEYS:
            out[key] = copy.deepcopy(value)
        elif isinstance(value, (Mapping, list)) and key in ("items", "additionalProperties", "anyOf", "oneOf", "allOf", "not"):
            out[key] = _convert_schema(value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def to_tool(function: Mapping[str, Any]) -> dict[str, Any]:
    """A BFCL function schema in the chat-template form ``{"type": "function", "function": {...}}``.

    Types become JSON-schema types (``dict`` -> ``object``, ``float`` -> ``number``,
    ``tuple`` -> ``array``, ``any`` -> untyped). A multi-turn ``response`` schema becomes
    ``return`` (as ``transformers.utils.get_json_schema`` names it).

    Example:

    ```python
    >>> to_tool({"name": "f", "description": "d", "parameters": {"type": "dict",
    ...     "properties": {"p": {"type": "dict", "properties": {"x": {"type": "float"}}}}, "required": []}})
    {'type': 'function', 'function': {'name': 'f', 'description': 'd', 'parameters': {'type': 'object', 'properties': {'p': {'type': 'object', 'properties': {'x': {'type': 'number'}}}}, 'required': []}}}

    ```
    """
    fn: dict[str, Any] = {"name": function["name"], "description": function.get("description", "")}
    params = function.get("parameters") or {"type": "dict", "properties": {}, "required": []}
    fn["parameters"] = _convert_schema(params)
    fn["parameters"].setdefault("type", "object")
    if "response" in function:
        fn["return"] = _convert_schema(function["response"])
    return {"type": "function", "function": fn}


def _first_allowed(allowed: Any, schema: Mapping[str, Any] | None) -> Any:
    """The first allowed value that is not ``""`` (``_SKIP`` for an optional parameter left out)."""
    if not isinstance(allowed, list):
        return copy.deepcopy(allowed)
    values = [v for v in allowed if not (isinstance(v, str) and v == "")]
    if not values:
        return _SKIP
    if len(values) < len(allowed) and all(v is None for v in values):
        return _SKIP  # optional with a None default: leave it out rather than pass null
    value = values[0]
    schema = schema or {}
    t = schema.get("type")
    if t == "dict" and isinstance(value, Mapping):
        return _resolve_dict(value, schema)
    items = schema.get("items") if isinstance(schema.get("items"), Mapping) else {}
    if t == "array" and items.get("type") == "dict" and isinstance(value, list):
        return [_resolve_dict(v, items) if isinstance(v, Mapping) else copy.deepcopy(v) for v in value]
    return copy.deepcopy(value)


def _resolve_dict(value: Mapping[str, Any], schema: Mapping[str, Any]) -> dict[str, Any]:
    props = schema.get("properties") or {}
    out = {}
    for key, allowed in value.items():
        v = _first_allowed(allowed, props.get(key))
        if v is not _SKIP:
            out[key] = v
    return out


def _arguments(params: Mapping[str, Any], function: Mapping[str, Any] | None) -> dict[str, Any]:
    props = ((function or {}).get("parameters") or {}).get("properties") or {}
    args = {}
    for p, allowed in params.items():
        if function is not None and p not in props and isinstance(allowed, list) and "" in allowed:
            continue  # BFCL data slip: an optional ground-truth parameter the schema lacks
        v = _first_allowed(allowed, props.get(p))
        if v is not _SKIP:
            args[p] = v
    return args


def _call_name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_call_name(node.value)}.{node.attr}"
    raise ValueError(f"not a function name: {ast.dump(node)}")


def parse_call(text: str, functions: Sequence[Mapping[str, Any]] | None = None) -> tuple[str, dict[str, Any]]:
    """Parse one call expression such as ``"cd(folder='x')"`` with ``ast`` (never ``eval``).

    Positional arguments are named after the function's parameters, in schema order
    (``functions`` needed then). Values must be literals.

    Example:

    ```python
    >>> parse_call("mv(source='a.txt', destination='tmp')")
    ('mv', {'source': 'a.txt', 'destination': 'tmp'})
    >>> parse_call("sort('report.txt')", [{"name": "sort", "parameters": {"properties": {"file_name": {}}}}])
    ('sort', {'file_name': 'report.txt'})

    ```

    Raises:
        ValueError: not a single call with literal arguments, or positional arguments that
        cannot be named.
    """
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as exc:
        raise ValueError(f"cannot parse call {text!r}: {exc.msg}") from exc
    if not isinstance(node, ast.Call):
        raise ValueError(f"not a call: {text!r}")
    name = _call_name(node.func)
    args: dict[str, Any] = {}
    if node.args:
        fn = next((f.get("function", f) for f in functions or [] if f.get("function", f).get("name") == name), None)
        if fn is None:
            raise ValueError(f"{text!r}: positional arguments need the schema of {name!r}")
        names = list(((fn.get("parameters") or {}).get("properties") or {}).keys())
        if len(node.args) > len(names):
            raise ValueError(f"{text!r}: {len(node.args)} positional arguments for {len(names)} parameters")
        for pname, arg in zip(names, node.args):
            if isinstance(arg, ast.Starred):
                raise ValueError(f"{text!r}: *args are not supported")
            args[pname] = _literal(arg, text)
    for kw in node.keywords:
        if kw.arg is None:
            raise ValueError(f"{text!r}: **kwargs are not supported")
        if kw.arg in args:
            raise ValueError(f"{text!r}: argument {kw.arg!r} given twice")
        args[kw.arg] = _literal(kw.value, text)
    return name, args


def _literal(node: ast.expr, text: str) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError) as exc:
        raise ValueError(f"{text!r}: argument is not a literal: {ast.unparse(node)}") from exc


def _infer_category(entry_id: str) -> str:
    m = re.match(r"^(.*?)_\d+(?:-\d+)*$", entry_id)
    if not m:
        raise ValueError(f"cannot infer the category of BFCL id {entry_id!r}: pass category=")
    return m.group(1)


def to_task(entry: Mapping[str, Any], category: str | None = None) -> Task:
    """One BFCL entry (as :func:`load_category` returns it) as a :class:`Task`.

    - ``messages``: the first turn's messages.
    - ``tools``: the entry's functions, chat-template form (:func:`to_tool`).
    - ``calls``: one :class:`PlannedCall` per ground-truth call, ids ``c1, c2, ...``;
      arguments take for each parameter the first allowed value that is not ``""``
      (optional parameters whose only allowed values are ``""`` or ``None``, or that the
      function's schema lacks, are left out).
      Multi-turn entries: the first turn's calls (parsed with ``ast``), each depending on the
      one before.
    - ``meta``: ``bfcl_id``, ``ground_truth`` (possible-answer form, one per call, for
      :mod:`hf_asynclm.bench.ast_match`); multi-turn also ``ground_truth_calls`` (the
      strings), ``initial_config``, ``involved_classes``, ``turns``.

    Args:
        entry: a BFCL entry with ``ground_truth`` joined in.
        category: its category (default: inferred from the id).
    """
    category = category or _infer_category(str(entry["id"]))
    if "ground_truth" not in entry:
        raise ValueError(f"BFCL entry {entry.get('id')!r} has no ground_truth (load it with load_category)")
    functions = list(entry.get("function") or [])
    by_name = {f["name"]: f for f in functions}
    messages = copy.deepcopy(list(entry["question"][0])) if entry.get("question") else []
    tools = [to_tool(f) for f in functions]
    meta: dict[str, Any] = {"bfcl_id": entry["id"]}
    calls: list[PlannedCall] = []
    if category.startswith("multi_turn"):
        first = list(entry["ground_truth"][0]) if entry["ground_truth"] else []
        gt: list[dict[str, Any]] = []
        for k, text in enumerate(first, 1):
            name, args = parse_call(text, functions)
            if name not in by_name:
                logger.warning("BFCL %s: call %r uses a function not in its classes", entry["id"], text)
            calls.append(PlannedCall(f"c{k}", name, args, depends_on=[f"c{k - 1}"] if k > 1 else []))
            gt.append({name: {p: [v] for p, v in args.items()}})
        meta.update(
            ground_truth=gt,
            ground_truth_calls=first,
            initial_config=copy.deepcopy(entry.get("initial_config", {})),
            involved_classes=list(entry.get("involved_classes", [])),
            turns=len(entry.get("question", [])),
        )
    else:
        for k, answer in enumerate(entry["ground_truth"], 1):
            if len(answer) != 1:
                raise ValueError(f"BFCL {entry['id']}: a ground-truth call names one function, got {list(answer)}")
            (name, params), = answer.items()
            calls.append(PlannedCall(f"c{k}", name, _arguments(params, by_name.get(name))))
        meta["ground_truth"] = copy.deepcopy(list(entry["ground_truth"]))
    return Task(task_id=str(entry["id"]), source="bfcl", category=category, messages=messages, tools=tools, calls=calls, meta=meta)


def load_tasks(category: str, data_dir: str | os.PathLike[str] | None = None) -> list[Task]:
    """:func:`load_category` then :func:`to_task` on every entry."""
    return [to_task(e, category) for e in load_category(category, data_dir)]


# ---------------------------------------------------------------------------------------------
# Multi-step parallel tasks
# ---------------------------------------------------------------------------------------------


def _user_text(task: Task) -> str:
    parts = []
    for m in task.messages:
        if m.get("role") == "user":
            c = m.get("content")
            parts.append(c if isinstance(c, str) else json.dumps(c))
    return "\n".join(parts)


def join_chains(parts: Sequence[Task], task_id: str, category: str = MULTISTEP_CATEGORY) -> Task:
    """Join tasks into one: calls renumbered ``c1..cN`` (dependencies follow), user messages
    concatenated into one user message, tools united by name (first definition wins).

    ``meta`` keeps ``parts`` (the joined task ids), ``chains`` (the new ids of each part's
    calls), ``ground_truth`` (concatenated, when every part has one) and per-part
    ``initial_configs`` / ``involved_classes``.
    """
    calls: list[PlannedCall] = []
    chains: list[list[str]] = []
    tools: list[dict[str, Any]] = []
    tool_names: set[str] = set()
    gts: list[Any] | None = []
    n = 0
    for part in parts:
        mapping: dict[str, str] = {}
        for c in part.topological_order():
            n += 1
            mapping[c.call_id] = f"c{n}"
        # keep the part's own call order, renumbered
        for c in part.calls:
            calls.append(
                PlannedCall(mapping[c.call_id], c.name, copy.deepcopy(c.arguments), [mapping[d] for d in c.depends_on], c.latency_s)
            )
        chains.append([mapping[c.call_id] for c in part.calls])
        for tool in part.tools:
            name = tool.get("function", tool).get("name")
            if name in tool_names:
                continue
            tool_names.add(name)
            tools.append(copy.deepcopy(tool))
        gt = part.meta.get("ground_truth")
        if gts is not None and gt is not None and len(gt) == len(part.calls):
            gts.extend(copy.deepcopy(gt))
        else:
            gts = None
    calls.sort(key=lambda c: int(c.call_id[1:]))
    message = {"role": "user", "content": "\n".join(_user_text(p) for p in parts)}
    meta: dict[str, Any] = {
        "parts": [p.task_id for p in parts],
        "chains": chains,
        "initial_configs": [copy.deepcopy(p.meta.get("initial_config", {})) for p in parts],
        "involved_classes": [list(p.meta.get("involved_classes", [])) for p in parts],
    }
    if gts is not None:
        meta["ground_truth"] = gts
    return Task(task_id=task_id, source=parts[0].source if parts else "bfcl", category=category, messages=[message], tools=tools, calls=calls, meta=meta)


def multistep_parallel_tasks(
    n: int,
    seed: int,
    *,
    pool: Sequence[Task] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    per_task: int = 3,
    max_chain: int = 5,
    disjoint_classes: bool = True,
) -> list[Task]:
    """The paper's multi-step parallel workload: each task joins ``per_task`` (3) chains.

    Chains are first-turn samples of ``multi_turn_base`` with 1 to ``max_chain`` calls. The
    pool is walked in a seeded shuffled order (reshuffled when used up), so samples are used
    evenly; within a task, samples are distinct and, with ``disjoint_classes``, preferably
    use different API classes (two file-system chains in one task would share state).

    Args:
        n: number of tasks.
        seed: random seed.
        pool: the chains to draw from (e.g. the eval side of a :func:`split` of
            ``load_tasks("multi_turn_base")``, so that train and eval share no sample);
            default all of ``multi_turn_base``.
        data_dir: BFCL data folder when ``pool`` is None.
        per_task: chains per task.
        max_chain: longest chain kept.
        disjoint_classes: prefer chains with no API class in common.
    """
    if pool is None:
        pool = load_tasks("multi_turn_base", data_dir)
    chains = [t for t in pool if 1 <= len(t.calls) <= max_chain]
    if len(chains) < per_task:
        raise ValueError(f"need at least {per_task} chains of 1-{max_chain} calls, the pool has {len(chains)}")
    rng = random.Random(seed)
    queue: list[int] = []

    def refill() -> None:
        order = list(range(len(chains)))
        rng.shuffle(order)
        queue.extend(order)

    def take(ok: Any) -> int | None:
        for attempt in range(2):
            for j, idx in enumerate(queue):
                if ok(idx):
                    return queue.pop(j)
            if attempt == 0:
                refill()
        return None

    def classes(i: int) -> set[str]:
        return set(chains[i].meta.get("involved_classes", []))

    tasks = []
    for k in range(n):
        picked: list[int] = []
        used: set[str] = set()
        for _ in range(per_task):
            idx = None
            if disjoint_classes:
                idx = take(lambda i: i not in picked and not (classes(i) & used))
            if idx is None:
                idx = take(lambda i: i not in picked)
            assert idx is not None  # len(chains) >= per_task
            picked.append(idx)
            used |= classes(idx)
        tasks.append(join_chains([chains[i] for i in picked], f"{MULTISTEP_CATEGORY}_{k}"))
    return tasks


# ---------------------------------------------------------------------------------------------
# Cheat sheet and split
# ---------------------------------------------------------------------------------------------


#: How :func:`with_cheat_sheet` writes each planned call: ``"call-first"`` (``c1 f(a=1) ~300ms``: every
#: checkpoint up to cml-tiny v28, gemma-3-270m-cml) or ``"time-first"`` (``~300ms c1 f(a=1)``: the expected
#: time right before the call id, so that a small model finds the id of the longest call next to its time,
#: however long the call's arguments are; cml-tiny since v35).
PLAN_LAYOUTS = ("call-first", "time-first")


def check_plan_layout(layout: str) -> str:
    """Return ``layout`` when it is one of :data:`PLAN_LAYOUTS`, else raise ``ValueError``.

    >>> check_plan_layout("time-first")
    'time-first'
    >>> check_plan_layout("time")
    Traceback (most recent call last):
    ...
    ValueError: unknown plan layout 'time': use call-first or time-first
    """
    if layout not in PLAN_LAYOUTS:
        raise ValueError(f"unknown plan layout {layout!r}: use {' or '.join(PLAN_LAYOUTS)}")
    return layout


def with_cheat_sheet(task: Task, latencies_ms: Mapping[str, int] | None = None, layout: str = "call-first") -> Task:
    """A copy of ``task`` whose last user message ends with the plan of its ground-truth calls.

    As the paper did for its latency runs: ``"\\nPlan: c1 get_x(a=1) ~300ms; c2 get_y(b=2)
    ~120ms after c1"``. Latencies come from ``latencies_ms`` (by call id; also stored in the
    copy's ``latency_s``), else from the calls' ``latency_s``, else are not shown. ``layout``
    (:data:`PLAN_LAYOUTS`) ``"time-first"`` writes each time before its call id instead:
    ``"\\nPlan: ~300ms c1 get_x(a=1); ~120ms c2 get_y(b=2) after c1"``; a checkpoint records the
    layout it was trained on (``AsyncLM.plan_layout``).

    Example:

    ```python
    >>> from hf_asynclm.data.tasks import PlannedCall, Task
    >>> t = Task("t", "demo", "parallel", [{"role": "user", "content": "Go."}], [],
    ...          [PlannedCall("c1", "f", {"a": 1}), PlannedCall("c2", "g", {}, depends_on=["c1"])])
    >>> with_cheat_sheet(t, {"c1": 300, "c2": 120}, layout="time-first").messages[-1]["content"]
    'Go.\\nPlan: ~300ms c1 f(a=1); ~120ms c2 g() after c1'

    ```
    """
    check_plan_layout(layout)
    new = copy.deepcopy(task)
    parts = []
    for c in new.calls:
        ms: float | None = None
        if latencies_ms is not None and c.call_id in latencies_ms:
            ms = latencies_ms[c.call_id]
            c.latency_s = ms / 1000.0
        elif c.latency_s is not None:
            ms = c.latency_s * 1000.0
        text = f"{c.call_id} {c.body()}"
        if ms is not None:
            text = f"~{round(ms)}ms {text}" if layout == "time-first" else f"{text} ~{round(ms)}ms"
        if c.depends_on:
            text += f" after {', '.join(c.depends_on)}"
        parts.append(text)
    plan = "\nPlan: " + "; ".join(parts)
    for m in reversed(new.messages):
        if m.get("role") == "user":
            if isinstance(m.get("content"), str):
                m["content"] += plan
            elif isinstance(m.get("content"), list):
                m["content"].append({"type": "text", "text": plan})
            else:
                m["content"] = plan.lstrip("\n")
            break
    else:
        new.messages.append({"role": "user", "content": plan.lstrip("\n")})
    new.meta["cheat_sheet"] = True
    if layout != "call-first":
        new.meta["plan_layout"] = layout
    return new


def split(
    tasks: Sequence[Task],
    seed: int,
    eval_fraction: float = 0.75,
    held_out: Iterable[str] = HELD_OUT_CATEGORIES,
) -> tuple[list[Task], list[Task]]:
    """Seeded (train, eval) split, 25 % / 75 % by default as in the paper.

    Split per category (each keeps the ratio; ``round(n * eval_fraction)`` go to eval), each
    category shuffled by its own seeded generator, so a task lands on the same side whichever
    other categories are split with it (data building splits one category at a time,
    evaluation several at once); tasks of ``held_out`` categories all go to eval. Both lists
    keep the input order.

    Example:

    ```python
    >>> ts = [Task(f"t{i}", "bfcl", "parallel", [], [], []) for i in range(8)] + [Task("l", "bfcl", "live_parallel", [], [], [])]
    >>> train, ev = split(ts, seed=0)
    >>> len(train), len(ev), "l" in [t.task_id for t in ev]
    (2, 7, True)

    ```
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError("eval_fraction must be in [0, 1]")
    held = set(held_out)
    by_cat: dict[str, list[int]] = {}
    for i, t in enumerate(tasks):
        by_cat.setdefault(t.category, []).append(i)
    eval_idx: set[int] = set()
    for cat in sorted(by_cat):
        idx = by_cat[cat]
        if cat in held:
            eval_idx.update(idx)
            continue
        shuffled = list(idx)
        random.Random(f"bfcl-split:{seed}:{cat}").shuffle(shuffled)  # per category: same split whatever else is passed
        eval_idx.update(shuffled[: round(len(idx) * eval_fraction)])
    train = [t for i, t in enumerate(tasks) if i not in eval_idx]
    ev = [t for i, t in enumerate(tasks) if i in eval_idx]
    return train, ev
