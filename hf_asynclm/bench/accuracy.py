"""BFCL accuracy of a CML checkpoint: AST matching of the calls it emits, sync vs async.

For each category, tasks of the held-out side of the split run through
:class:`~hf_asynclm.asynclm.AsyncLM` in each mode (``sync`` and ``async`` by default) with
simulated tools (:mod:`hf_asynclm.bench.tools`). The calls the model wrote (every
``[CALL]`` block of its output, parsed with ``ast``) are matched against BFCL's possible
answers with :func:`~hf_asynclm.bench.ast_match.match_task`: function name, required
parameters, each value among the allowed ones, types; for parallel categories in any order.

It also reports the rate of valid CML: the share of blocks the model wrote (calls, traps,
anything malformed) that are well formed and, for calls, parse and bind to a known tool's
schema (the executor accepted them).

Example (a scripted "model": the oracle writes the ground truth, so every task matches):

```python
>>> from hf_asynclm.bench.accuracy import AccuracyConfig, run_accuracy
>>> from hf_asynclm.bench.latency import load_bench_model
>>> from hf_asynclm.bench.oracle import OraclePolicy
>>> bm = load_bench_model("random")
>>> cfg = AccuracyConfig(categories=("parallel",), n=1, latency_scale=0.02, data_dir="tests/data/bfcl_mini", threads=1)
>>> oracle = lambda task, mode, tools: OraclePolicy(bm.tokenizer, task, mode, tools.planned_latencies())
>>> report = run_accuracy(cfg, bm, policy=oracle)
>>> [(r["mode"], r["accuracy"], r["valid_block_rate"]) for r in report["rows"]]
[('sync', 1.0, 1.0), ('async', 1.0, 1.0)]

```
"""

from __future__ import annotations

import logging
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..cml import parse_blocks
from ..data.tasks import Task
from .ast_match import match_task
from .tools import ToolSet

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_CATEGORIES", "PROTOCOL_ERRORS", "AccuracyConfig", "load_category_tasks", "emitted_calls", "score_run", "run_accuracy"]

#: Categories scored by default (``multistep_parallel``: three joined multi-turn chains).
DEFAULT_CATEGORIES: tuple[str, ...] = ("parallel", "live_parallel", "parallel_multiple", "live_parallel_multiple", "multistep_parallel")
#: Error types of interrupts that mean a call block broke the protocol or the schema.
PROTOCOL_ERRORS = ("CMLSyntaxError", "CallParseError", "UnknownToolError", "ArgumentError", "InvalidIdError", "DuplicateIdError")


@dataclass
class AccuracyConfig:
    """Settings of ``bench accuracy``."""

    categories: tuple[str, ...] = DEFAULT_CATEGORIES
    n: int = 30
    seed: int = 0
    split: str = "eval"
    split_seed: int = 0
    modes: tuple[str, ...] = ("sync", "async")
    cheat_sheet: bool = False
    max_new_tokens: int = 384
    latency_scale: float = 0.1
    data_dir: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        from ..generation import MODES

        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"unknown modes {bad}; choose from {', '.join(MODES)}")
        if self.n < 1:
            raise ValueError("n must be at least 1")
        if self.split not in ("eval", "train", "all"):
            raise ValueError("split must be eval, train or all")
        if not self.categories:
            raise ValueError("give at least one category")

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def load_category_tasks(
    category: str,
    n: int,
    seed: int = 0,
    *,
    split: str = "eval",
    split_seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
) -> list[Task]:
    """Up to ``n`` tasks of a BFCL category from the ``split`` side (seeded sample)."""
    from ..data import bfcl

    def side(tasks: list[Task]) -> list[Task]:
        if split == "all":
            return tasks
        train, ev = bfcl.split(tasks, seed=split_seed)
        return ev if split == "eval" else train

    if category == bfcl.MULTISTEP_CATEGORY:
        return bfcl.multistep_parallel_tasks(n, seed, pool=side(bfcl.load_tasks("multi_turn_base", data_dir)))
    tasks = [t for t in side(bfcl.load_tasks(category, data_dir)) if t.calls]
    rng = random.Random(f"accuracy:{category}:{seed}")
    order = list(range(len(tasks)))
    rng.shuffle(order)
    return [tasks[i] for i in sorted(order[:n])]


def _block_counts(raw_text: str) -> tuple[int, int]:
    """Blocks the model wrote (injected interrupts excluded): (total, well formed)."""
    blocks = [b for b in parse_blocks(raw_text) if b.kind != "interrupt"]
    return len(blocks), sum(1 for b in blocks if b.kind != "malformed")


def emitted_calls(records: Sequence[Any], functions: Sequence[Any]) -> list[tuple[str, dict[str, Any]]]:
    """The calls a generation made, as ``(name, arguments)`` in the order they were written.

    Arguments are the executor's bound values (references to earlier results substituted);
    a call the executor rejected is parsed from its body (``ast``, positional arguments named
    after the schema); one that does not parse counts as ``("<unparsable>", {})``.
    """
    from ..data.bfcl import parse_call as bfcl_parse_call

    out: list[tuple[str, dict[str, Any]]] = []
    for record in records:
        if record.name is not None and record.arguments is not None:
            out.append((record.name, dict(record.arguments)))
            continue
        try:
            out.append(bfcl_parse_call(record.body, [f.get("function", f) for f in functions]))
        except (ValueError, SyntaxError):
            out.append((record.name or "<unparsable>", {}))
    return out


def score_run(result: Any, task: Task) -> dict[str, Any]:
    """Score one generation (an :class:`~hf_asynclm.asynclm.AsyncResult`) against ``task``'s ground truth."""
    n_blocks, well_formed = _block_counts(result.raw_text)
    rejected = 0
    for record in result.calls:
        err = getattr(record, "error", None) or ""
        if record.status == "error" and err.split(":", 1)[0] in PROTOCOL_ERRORS:
            rejected += 1
    valid = max(0, well_formed - rejected)
    emitted = emitted_calls(result.calls, task.tools)
    match = match_task(emitted, task)
    return {
        "task_id": task.task_id,
        "category": task.category,
        "valid": bool(match.valid),
        "error_type": match.error_type,
        "errors": match.errors[:3],
        "emitted": [[n, a] for n, a in emitted],
        "expected": [[c.name, c.arguments] for c in task.calls],
        "blocks": n_blocks,
        "valid_blocks": valid,
        "stop_reason": result.stats.stop_reason,
        "generated_tokens": result.stats.generated_tokens,
    }


def run_accuracy(
    config: AccuracyConfig,
    bm: Any | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    policy: Callable[[Task, str, ToolSet], Any] | None = None,
    tasks: dict[str, Sequence[Task]] | None = None,
) -> dict[str, Any]:
    """Run ``bench accuracy``; return a JSON-serialisable report.

    Args:
        config: what to run.
        bm: the model (:class:`~hf_asynclm.bench.latency.BenchModel`; default the shipped one).
        progress: ``progress(done, total, task_id)`` after each generation.
        policy: ``policy(task, mode, toolset)`` returning a logits processor that drives the
            model (tests: a scripted or oracle policy); default none: the model decides.
        tasks: ``{category: tasks}`` instead of loading them.
    """
    from transformers import LogitsProcessorList

    from ..asynclm import AsyncLM
    from ..data.bfcl import with_cheat_sheet
    from .latency import _environment, beyond_context, describe_left_out, load_bench_model, torch_threads

    bm = bm or load_bench_model()
    if tasks is None:
        tasks = {
            c: load_category_tasks(c, config.n, config.seed, split=config.split, split_seed=config.split_seed, data_dir=config.data_dir)
            for c in config.categories
        }

    def prompt_of(task: Task, toolset: ToolSet) -> list[dict[str, Any]]:
        if not config.cheat_sheet:
            return task.messages
        lat = {cid: round(s * 1000 / config.latency_scale) for cid, s in toolset.planned_latencies().items()}
        return with_cheat_sheet(task, lat, layout=bm.plan_layout).messages

    # tasks whose prompt does not fit the model's context are left out, and said
    budget = config.max_new_tokens if policy is None else 0
    skipped: list[dict[str, Any]] = []
    kept: dict[str, list[Task]] = {}
    for category, cat_tasks in tasks.items():
        kept[category] = []
        for task in cat_tasks:
            toolset = ToolSet(task, seed=config.seed, latency_scale=config.latency_scale)
            out = beyond_context(bm, task, prompt_of(task, toolset), toolset.registry().schemas(), budget)
            if out is None:
                kept[category].append(task)
            else:
                skipped.append({**out, "category": category})
    tasks = kept
    if skipped:
        logger.warning("%s", describe_left_out(skipped, budget))
    total = sum(len(v) for v in tasks.values()) * len(config.modes)
    done = 0
    per_task: list[dict[str, Any]] = []
    with torch_threads(config.threads), torch.inference_mode():
        env = _environment(bm.model.device)
        for category, cat_tasks in tasks.items():
            for task in cat_tasks:
                toolset = ToolSet(task, seed=config.seed, latency_scale=config.latency_scale)
                messages = prompt_of(task, toolset)
                for mode in config.modes:
                    alm = AsyncLM(
                        bm.model, bm.tokenizer, tools=toolset.registry(), mode=mode, call_timeout_s=30, trap_timeout_s=30,  # type: ignore[arg-type]
                        interrupt_at=bm.interrupt_at if policy is None else "token",  # the checkpoint's rule when it decides
                    )
                    kwargs: dict[str, Any] = {"max_new_tokens": config.max_new_tokens, "do_sample": False}
                    if policy is not None:
                        proc = policy(task, mode, toolset)
                        kwargs["logits_processor"] = LogitsProcessorList([proc])
                        kwargs["max_new_tokens"] = max(config.max_new_tokens, getattr(proc, "max_tokens", lambda: 0)())
                    t0 = time.monotonic()
                    try:
                        result = alm.generate(messages, **kwargs)
                        row = score_run(result, task)
                    except Exception as exc:  # a crash is a failed task, reported, not a failed benchmark
                        logger.exception("task %s (%s) failed", task.task_id, mode)
                        row = {"task_id": task.task_id, "category": task.category, "valid": False, "error_type": "crash",
                               "errors": [repr(exc)], "emitted": [], "expected": [], "blocks": 0, "valid_blocks": 0}
                    row.update(mode=mode, category=category, wall_s=time.monotonic() - t0)
                    per_task.append(row)
                    done += 1
                    if progress is not None:
                        progress(done, total, f"{task.task_id} ({mode})")
    rows = []
    for category in tasks:
        for mode in config.modes:
            rs = [r for r in per_task if r["category"] == category and r["mode"] == mode]
            if not rs:
                continue
            blocks = sum(r["blocks"] for r in rs)
            rows.append(
                {
                    "category": category,
                    "mode": mode,
                    "n": len(rs),
                    "accuracy": sum(r["valid"] for r in rs) / len(rs),
                    "valid_block_rate": (sum(r["valid_blocks"] for r in rs) / blocks) if blocks else float("nan"),
                    "valid_task_rate": sum(1 for r in rs if r["blocks"] and r["valid_blocks"] == r["blocks"]) / len(rs),
                    "calls_per_task": statistics.fmean(len(r["emitted"]) for r in rs),
                    "error_types": _count(r["error_type"] for r in rs if not r["valid"]),
                }
            )
    return {
        "benchmark": "accuracy",
        "config": config.to_dict(),
        "model": bm.label,
        "model_notes": bm.notes,
        "environment": env,
        "skipped_tasks": skipped,
        "rows": rows,
        "tasks": per_task,
    }


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[str(item)] = out.get(str(item), 0) + 1
    return out
