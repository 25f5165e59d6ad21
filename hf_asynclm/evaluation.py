"""Evaluation of a CML checkpoint: protocol validity, task success, BFCL with a cheat sheet.

:func:`evaluate_synthetic` runs held-out synthetic tasks (values never seen in training)
through :class:`~hf_asynclm.asynclm.AsyncLM` with the catalogue's tools (they really sleep,
scaled by ``latency_scale``) and scores

* **CML validity**: the share of blocks the model wrote that are well formed and name a known
  tool with arguments that fit its schema;
* **task success**: the model made exactly the planned calls (names and argument values,
  values taken from earlier results included) and its visible answer contains every answer
  sentence, i.e. quotes the results.

:func:`evaluate_bfcl` runs BFCL tasks with the ground-truth "cheat sheet" in the prompt (as the
paper did for its latency runs) and scores BFCL AST accuracy of the emitted calls, whether
independent calls were written longest-first (LPT), and whether the model trapped to wait.

Both run on the wall clock by default (results go in where the model is when the sleeping tool
returns, which varies a little from run to run) or, with ``clock="virtual"``, in simulated time
(:mod:`hf_asynclm.virtual_time`): the same report on every run.

Example:

```python
>>> from hf_asynclm.evaluation import score_synthetic
>>> from hf_asynclm.data.tasks import PlannedCall, Task
>>> task = Task("t", "synthetic", "single", [], [], [PlannedCall("w1", "get_weather", {"city": "Oslo"})],
...             meta={"answer_parts": [{"text": "Oslo: 3 C.", "needs": ["w1"]}]})
>>> score_synthetic(task, emitted=[("get_weather", {"city": "Oslo"})], text="Oslo: 3 C.").success
True

```
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

from .data.tasks import Task
from .prompting import CML_MAX_NEW_TOKENS

logger = logging.getLogger(__name__)

#: Error types of interrupts that mean the model broke the protocol or the schema.
PROTOCOL_ERRORS = ("CMLSyntaxError", "CallParseError", "UnknownToolError", "ArgumentError", "InvalidIdError", "DuplicateIdError")


@dataclass
class TaskScore:
    """The score of one task."""

    task_id: str
    category: str
    success: bool
    calls_right: bool
    answer_right: bool
    blocks: int = 0
    valid_blocks: int = 0
    emitted: list[Any] = field(default_factory=list)
    expected: list[Any] = field(default_factory=list)
    value_recall: float = 0.0
    lpt_ok: bool | None = None
    trapped: bool | None = None
    wall_s: float = 0.0
    error: str | None = None
    #: The whole generation as it ran: what the model wrote with the interrupts it got, in
    #: place (``AsyncResult.raw_text``), to see why a task failed.
    transcript: str = ""
    #: Why the generation stopped (``eos``, ``max_new_tokens``, ...; ``GenerationStats.stop_reason``).
    stop_reason: str = ""
    #: Tokens the model wrote (``GenerationStats.generated_tokens``).
    new_tokens: int = 0


def _norm(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        return " ".join(value.split())
    if isinstance(value, (list, tuple)):
        return tuple(_norm(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _norm(v)) for k, v in value.items()))
    return repr(value)


def _call_key(name: str, args: dict[str, Any]) -> tuple:
    return (name, tuple(sorted((k, _norm(v)) for k, v in (args or {}).items())))


def _same_multiset(a: Iterable[tuple], b: Iterable[tuple]) -> bool:
    from collections import Counter

    return Counter(a) == Counter(b)


def value_recall(emitted: Sequence[tuple[str, dict[str, Any]]], expected: Sequence[tuple[str, dict[str, Any]]]) -> float:
    """Share of the expected ``(tool, argument, value)`` triples that some emitted call has: a
    finer signal than all-or-nothing task success (how much of the copying is right)."""
    from collections import Counter

    want = Counter((n, k, _norm(v)) for n, a in expected for k, v in a.items())
    have = Counter((n, k, _norm(v)) for n, a in emitted for k, v in (a or {}).items())
    total = sum(want.values())
    return sum((want & have).values()) / total if total else 1.0


def score_synthetic(task: Task, emitted: Sequence[tuple[str, dict[str, Any]]], text: str) -> TaskScore:
    """Score one synthetic task from the calls the model made and its visible text."""
    expected = [(c.name, c.arguments) for c in task.calls]
    calls_right = _same_multiset((_call_key(n, a) for n, a in emitted), (_call_key(n, a) for n, a in expected))
    visible = " ".join(text.split())
    parts = task.meta.get("answer_parts") or ([{"text": task.answer}] if task.answer else [])
    answer_right = all(" ".join(p["text"].split()) in visible for p in parts)
    return TaskScore(
        task_id=task.task_id,
        category=task.category,
        success=calls_right and answer_right,
        calls_right=calls_right,
        answer_right=answer_right,
        value_recall=value_recall(emitted, expected),
        emitted=[list(e) for e in emitted],
        expected=[list(e) for e in expected],
    )


def _latency_of(task: Task, name: str, call_id: str | None = None) -> float:
    if call_id is not None:
        for c in task.calls:
            if c.call_id == call_id and c.latency_s is not None:
                return c.latency_s * 1000.0
    for t in task.tools:
        f = t.get("function", t)
        if f.get("name") == name and f.get("x-latency-ms") is not None:
            return float(f["x-latency-ms"])
    return 100.0


def task_tools(task: Task, latency_scale: float = 0.1, result_fn: Callable[[str, dict], Any] | None = None) -> list[tuple[dict, Callable]]:
    """``(schema, handler)`` pairs for a task's tools: each sleeps its prompt latency × ``latency_scale``.

    Results come from ``result_fn(name, arguments)``; by default the synthetic catalogue's
    functions (for BFCL pass a generic result function).
    """
    if result_fn is None:
        from .data.synthetic import catalogue

        specs = catalogue()

        def result_fn(name: str, arguments: dict) -> Any:
            return specs[name].fn(**arguments)

    pairs = []
    for schema in task.tools:
        name = schema.get("function", schema)["name"]
        seconds = _latency_of(task, name) * latency_scale / 1000.0

        def handler(_name: str = name, _seconds: float = seconds, **kwargs: Any) -> Any:
            time.sleep(_seconds)
            return result_fn(_name, kwargs)  # type: ignore[misc]

        pairs.append((schema, handler))
    return pairs


def _block_validity(result: Any) -> tuple[int, int]:
    """(blocks the model wrote, valid ones): malformed blocks and calls that broke the
    protocol or the tool's schema are invalid; tools that fail at run time are not the model's fault."""
    written = _written_blocks(result)
    bad = sum(b.kind == "malformed" for b in written)
    bad += sum(1 for rec in result.calls if rec.error and rec.error.split(":", 1)[0] in PROTOCOL_ERRORS)
    return len(written), max(0, len(written) - bad)


def _model_text(result: Any) -> str:
    """What the model wrote (interrupt blocks removed)."""
    from .cml import CMLParser, Block, TextEvent

    parser = CMLParser()
    out = []
    for e in parser.feed(result.raw_text) + parser.flush():
        if isinstance(e, TextEvent):
            out.append(e.text)
        elif isinstance(e, Block) and e.kind != "interrupt":
            out.append(e.raw)
    return "".join(out)


def _emitted_calls(result: Any) -> list[tuple[str, dict[str, Any]]]:
    calls = []
    for rec in result.calls:
        if rec.name is not None and rec.arguments is not None:
            calls.append((rec.name, dict(rec.arguments)))
        elif rec.body:
            try:
                from .executor.parsing import parse_call

                parsed = parse_call(rec.body)
                calls.append((parsed.name, dict(parsed.kwargs)))
            except Exception:
                calls.append((rec.body, {}))
    return calls


@dataclass
class EvalReport:
    """Aggregated scores."""

    name: str
    mode: str
    n: int
    success_rate: float
    calls_right_rate: float
    answer_right_rate: float
    cml_validity: float
    per_category: dict[str, dict[str, float]]
    value_recall: float = math.nan
    extra: dict[str, Any] = field(default_factory=dict)
    tasks: list[TaskScore] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return d


def _aggregate(name: str, mode: str, scores: list[TaskScore], extra: dict[str, Any] | None = None) -> EvalReport:
    n = len(scores)
    blocks = sum(s.blocks for s in scores)
    valid = sum(s.valid_blocks for s in scores)
    cats: dict[str, list[TaskScore]] = {}
    for s in scores:
        cats.setdefault(s.category, []).append(s)

    def rate(xs: list[TaskScore], attr: str) -> float:
        return sum(bool(getattr(x, attr)) for x in xs) / len(xs) if xs else math.nan

    ran = [s for s in scores if s.stop_reason]
    cut = {"cut_by_token_limit": sum(s.stop_reason == "max_new_tokens" for s in ran) / len(ran)} if ran else {}
    return EvalReport(
        name=name,
        mode=mode,
        n=n,
        success_rate=rate(scores, "success"),
        calls_right_rate=rate(scores, "calls_right"),
        answer_right_rate=rate(scores, "answer_right"),
        cml_validity=valid / blocks if blocks else math.nan,
        value_recall=statistics.mean(s.value_recall for s in scores) if scores else math.nan,
        per_category={c: {"n": len(xs), "success": rate(xs, "success"), "calls_right": rate(xs, "calls_right")} for c, xs in sorted(cats.items())},
        extra={**(extra or {}), **cut},
        tasks=scores,
    )


def _run_task(
    model: Any,
    tokenizer: Any,
    task: Task,
    tools: list[tuple[dict, Callable]],
    mode: str,
    max_new_tokens: int,
    processors_for: Callable[[Task], list[Any]] | None,
    interrupt_at: str = "token",
    constrain_calls: str = "off",
    no_repeat_calls: bool = False,
    virtual_clock: Any | None = None,
    complete_names: bool = False,
    quote_numbers: bool = False,
) -> tuple[Any | None, float, str | None]:
    """Run one task greedily: (AsyncResult or None, wall seconds, error repr or None)."""
    from transformers import LogitsProcessorList

    from .asynclm import AsyncLM

    alm = AsyncLM(
        model, tokenizer, tools=tools, mode=mode, call_timeout_s=10, trap_timeout_s=10,
        interrupt_at=interrupt_at, constrain_calls=constrain_calls, no_repeat_calls=no_repeat_calls,  # type: ignore[arg-type]
        complete_names=complete_names, quote_numbers=quote_numbers,
    )
    extra = {"logits_processor": LogitsProcessorList(processors_for(task))} if processors_for else {}
    t0 = time.perf_counter()
    try:
        result = alm.generate(task.messages, max_new_tokens=max_new_tokens, do_sample=False, virtual_clock=virtual_clock, **extra)
    except Exception as exc:  # a broken task must not end the evaluation
        logger.exception("task %s failed", task.task_id)
        return None, time.perf_counter() - t0, repr(exc)
    return result, time.perf_counter() - t0, None


def evaluate_synthetic(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[Task],
    mode: str = "async",
    max_new_tokens: int = CML_MAX_NEW_TOKENS,
    latency_scale: float = 0.1,
    progress: Callable[[int], None] | None = None,
    processors_for: Callable[[Task], list[Any]] | None = None,
    interrupt_at: str = "token",
    constrain_calls: str = "off",
    no_repeat_calls: bool = False,
    clock: str = "wall",
    tpot_range_ms: Sequence[float] = (5.0, 30.0),
    complete_names: bool = False,
    quote_numbers: bool = False,
) -> EvalReport:
    """Run synthetic tasks and score them (see the module docstring).

    ``processors_for(task)`` may return extra logits processors for a task (tests use it to
    script a policy). ``interrupt_at``, ``constrain_calls``, ``no_repeat_calls``, ``complete_names`` and
    ``quote_numbers`` are the runtime's settings (``AsyncLM``). ``clock="virtual"`` runs each task in simulated time
    (:func:`task_clock`: ``tpot_range_ms`` per token, the tools' prompt latencies per call; the
    tools return at once), so the report is the same on every run and machine.
    """
    check_clock(clock)
    scores = []
    for task in tasks:
        scale, virtual_clock = _timing_of(task, clock, latency_scale, tpot_range_ms)
        result, wall, error = _run_task(
            model, tokenizer, task, task_tools(task, scale), mode, max_new_tokens,
            processors_for, interrupt_at, constrain_calls, no_repeat_calls, virtual_clock, complete_names, quote_numbers,
        )
        if result is None:
            scores.append(TaskScore(task.task_id, task.category, False, False, False, error=error))
            continue
        score = score_synthetic(task, _emitted_calls(result), result.text)
        score.blocks, score.valid_blocks = _block_validity(result)
        score.wall_s = wall
        score.transcript = result.raw_text
        score.stop_reason, score.new_tokens = result.stats.stop_reason, result.stats.generated_tokens
        scores.append(score)
        if progress is not None:
            progress(1)
    runtime = {
        "interrupt_at": interrupt_at, "constrain_calls": constrain_calls, "no_repeat_calls": no_repeat_calls,
        "complete_names": complete_names, "quote_numbers": quote_numbers, "max_new_tokens": max_new_tokens,
    }
    return _aggregate("synthetic", mode, scores, {**runtime, **_clock_settings(clock, latency_scale, tpot_range_ms)})


#: ``clock`` settings of the evaluation: real time (tools sleep) or simulated time.
CLOCKS: tuple[str, ...] = ("wall", "virtual")


def check_clock(value: str) -> str:
    """Return ``value`` when it is a valid evaluation ``clock``, else raise ``ValueError``."""
    if value not in CLOCKS:
        raise ValueError(f"unknown clock {value!r}: use one of {', '.join(CLOCKS)}")
    return value


def task_clock(task: Task, tpot_range_ms: Sequence[float] = (5.0, 30.0)) -> Any:
    """A :class:`~hf_asynclm.virtual_time.VirtualClock` for one task: a time per token drawn
    from ``tpot_range_ms`` (seeded by the task id, as the simulator draws one per trace), and per
    call the latency its prompt shows (the planned call's own latency where the task has one with
    the same name and arguments, e.g. BFCL's cheat sheet, else the tool's ``x-latency-ms``)."""
    import random

    from .data.simulate import check_tpot_range
    from .virtual_time import VirtualClock

    low, high = check_tpot_range(tpot_range_ms)
    tpot_ms = random.Random(f"eval-tpot:{task.task_id}").uniform(low, high)

    def latency_s(name: str | None, arguments: Any) -> float:
        for c in task.calls:
            if c.name == name and c.latency_s is not None and dict(c.arguments) == dict(arguments):
                return float(c.latency_s)
        return _latency_of(task, name or "") / 1000.0

    return VirtualClock(tpot_ms / 1000.0, latency_s)


def _timing_of(task: Task, clock: str, latency_scale: float, tpot_range_ms: Sequence[float]) -> tuple[float, Any]:
    """(how long the tools really sleep, per prompt latency; the task's virtual clock or None)."""
    if clock == "virtual":
        return 0.0, task_clock(task, tpot_range_ms)  # the clock keeps the time: tools return at once
    return latency_scale, None


def _clock_settings(clock: str, latency_scale: float, tpot_range_ms: Sequence[float]) -> dict[str, Any]:
    if clock == "virtual":
        return {"clock": "virtual", "tpot_range_ms": f"{tpot_range_ms[0]:g}-{tpot_range_ms[1]:g}"}
    return {"clock": "wall", "latency_scale": f"{latency_scale:g}"}


#: What BFCL tools return in :func:`evaluate_bfcl` (they have no implementation): ``"status"``,
#: ``{"status": "ok", "id": "r12345"}``, a shape no training trace holds (what every reported
#: BFCL number used unless it says otherwise), or ``"trace"``, ``{"result": "<code>"}``, the shape
#: the simulator gives such calls in the traces (:func:`hf_asynclm.data.simulate.generic_result`).
BFCL_RESULT_FORMATS: tuple[str, ...] = ("status", "trace")


def check_bfcl_result_format(value: str) -> str:
    """Return ``value`` when it is one of :data:`BFCL_RESULT_FORMATS`, else raise ``ValueError``."""
    if value not in BFCL_RESULT_FORMATS:
        raise ValueError(f"unknown BFCL result format {value!r}: use one of {', '.join(BFCL_RESULT_FORMATS)}")
    return value


def bfcl_result(name: str, arguments: dict, result_format: str = "status") -> Any:
    """The result of a BFCL call in the evaluation (deterministic in the call), in ``result_format``.

    ```python
    >>> from hf_asynclm.evaluation import bfcl_result
    >>> sorted(bfcl_result("f", {"a": 1})), sorted(bfcl_result("f", {"a": 1}, "trace"))
    (['id', 'status'], ['result'])

    ```
    """
    if check_bfcl_result_format(result_format) == "trace":
        from .data.simulate import generic_result

        return generic_result(name, arguments)
    import zlib

    h = zlib.crc32(repr((name, sorted(arguments.items(), key=lambda kv: kv[0]))).encode())
    return {"status": "ok", "id": f"r{h % 100000}"}


def evaluate_bfcl(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[Task],
    mode: str = "async",
    max_new_tokens: int = CML_MAX_NEW_TOKENS,
    latency_scale: float = 0.1,
    progress: Callable[[int], None] | None = None,
    processors_for: Callable[[Task], list[Any]] | None = None,
    interrupt_at: str = "token",
    constrain_calls: str = "off",
    no_repeat_calls: bool = False,
    clock: str = "wall",
    tpot_range_ms: Sequence[float] = (5.0, 30.0),
    complete_names: bool = False,
    quote_numbers: bool = False,
    result_format: str = "status",
    name: str = "bfcl",
) -> EvalReport:
    """Run BFCL tasks that carry a cheat sheet; score AST accuracy, LPT order and traps.

    Any cheat-sheet :class:`Task` works (e.g. :func:`hf_asynclm.data.drills.plan_tasks`; ``name``
    names the report). ``lpt_order_rate``: of the tasks with two or more planned calls, those whose
    independent calls were written longest expected time first (a task that leaves calls out
    can keep the order vacuously); ``lpt_order_rate_calls_right``: the same over the tasks whose
    calls are right, also per number of planned calls (``lpt_order_rate_calls_right_N_calls``).
    ``interrupt_at``, ``constrain_calls``, ``no_repeat_calls``, ``complete_names`` and ``quote_numbers`` are the runtime's settings (``AsyncLM``);
    ``clock`` as in :func:`evaluate_synthetic` (virtual: each call takes its cheat-sheet latency);
    ``result_format`` what the calls return (:data:`BFCL_RESULT_FORMATS`)."""
    from .bench.ast_match import match_task

    check_clock(clock)
    check_bfcl_result_format(result_format)
    scores = []
    for task in tasks:
        scale, virtual_clock = _timing_of(task, clock, latency_scale, tpot_range_ms)
        tools = task_tools(task, scale, lambda name, arguments: bfcl_result(name, arguments, result_format))
        result, wall, error = _run_task(
            model, tokenizer, task, tools, mode, max_new_tokens, processors_for, interrupt_at, constrain_calls,
            no_repeat_calls, virtual_clock, complete_names, quote_numbers,
        )
        if result is None:
            scores.append(TaskScore(task.task_id, task.category, False, False, False, error=error))
            continue
        emitted = _emitted_calls(result)
        match = match_task(emitted, task)
        blocks, valid = _block_validity(result)
        # LPT: independent calls in the order the model wrote them have non-increasing latency
        written = [r for r in result.calls if r.name is not None]
        independent = [r for r in written if not any(c.depends_on for c in task.calls if c.name == r.name)]
        lat = [_latency_for_record(task, r) for r in independent]
        lpt_ok = all(a >= b - 1e-9 for a, b in zip(lat, lat[1:]))
        trapped = any(b.kind == "trap" for b in _written_blocks(result))
        scores.append(
            TaskScore(
                task_id=task.task_id,
                category=task.category,
                success=bool(match.valid),
                calls_right=bool(match.valid),
                answer_right=True,
                blocks=blocks,
                valid_blocks=valid,
                emitted=[list(e) for e in emitted],
                expected=[[c.name, c.arguments] for c in task.calls],
                value_recall=value_recall(emitted, [(c.name, c.arguments) for c in task.calls]),
                lpt_ok=lpt_ok,
                trapped=trapped,
                wall_s=wall,
                transcript=result.raw_text,
                stop_reason=result.stats.stop_reason,
                new_tokens=result.stats.generated_tokens,
            )
        )
        if progress is not None:
            progress(1)
    lpt = [s.lpt_ok for s in scores if s.lpt_ok is not None and len(s.expected) > 1]
    # a task with a call left out can keep the order vacuously: also count only the tasks whose calls are right
    right: dict[int, list[bool]] = {}
    for s in scores:
        if s.lpt_ok is not None and len(s.expected) > 1 and s.calls_right:
            right.setdefault(len(s.expected), []).append(s.lpt_ok)
    lpt_right = [ok for v in right.values() for ok in v]
    traps = [s.trapped for s in scores if s.trapped is not None and len(s.expected) > 0]
    extra = {
        "lpt_order_rate": float(statistics.mean(lpt)) if lpt else math.nan,
        "lpt_order_rate_calls_right": float(statistics.mean(lpt_right)) if lpt_right else math.nan,
        **{f"lpt_order_rate_calls_right_{k}_calls": float(statistics.mean(v)) for k, v in sorted(right.items())},
        "trap_rate": float(statistics.mean(traps)) if traps else math.nan,
        "interrupt_at": interrupt_at,
        "constrain_calls": constrain_calls,
        "no_repeat_calls": no_repeat_calls,
        "complete_names": complete_names,
        "quote_numbers": quote_numbers,
        "max_new_tokens": max_new_tokens,
        "result_format": result_format,
        **_clock_settings(clock, latency_scale, tpot_range_ms),
    }
    return _aggregate(name, mode, scores, extra)


def _written_blocks(result: Any) -> list[Any]:
    from .cml import parse_blocks

    return [b for b in parse_blocks(_model_text(result)) if b.kind in ("call", "trap", "malformed")]


def _latency_for_record(task: Task, record: Any) -> float:
    for c in task.calls:
        if c.name == record.name and _call_key(c.name, c.arguments) == _call_key(record.name, record.arguments or {}):
            return _latency_of(task, c.name, c.call_id)
    return _latency_of(task, record.name)


def format_report(report: EvalReport) -> str:
    """A short markdown table of a report."""
    lines = [
        f"### {report.name} ({report.mode}, n={report.n})",
        "",
        "| metric | value |",
        "|---|---|",
        f"| task success | {report.success_rate:.1%} |",
        f"| calls right | {report.calls_right_rate:.1%} |",
    ]
    if report.name == "synthetic":
        lines.append(f"| answer uses results | {report.answer_right_rate:.1%} |")
    lines.append(f"| argument values right | {report.value_recall:.1%} |")
    lines.append(f"| valid CML blocks | {report.cml_validity:.1%} |")
    for k, v in report.extra.items():
        if isinstance(v, bool):  # a setting, not a rate
            lines.append(f"| {k} | {'on' if v else 'off'} |")
        elif isinstance(v, int):  # a count or a setting
            lines.append(f"| {k} | {v} |")
        elif isinstance(v, float):  # a rate
            lines.append(f"| {k.replace('_', ' ')} | {v:.1%} |")
        else:
            lines.append(f"| {k} | {v} |")
    lines += ["", "| category | n | success |", "|---|---|---|"]
    for c, d in report.per_category.items():
        lines.append(f"| {c} | {d['n']} | {d['success']:.1%} |")
    return "\n".join(lines)
