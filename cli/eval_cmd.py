"""``hf-asynclm eval``: score a CML checkpoint on held-out tasks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from .common import DEFAULT_MAX_NEW_TOKENS


@click.command("eval")
@click.option("--model", "model_path", default=None, help="Checkpoint folder or Hub repo id (default: the shipped cml-tiny).")
@click.option("--synthetic", "n_synthetic", type=click.IntRange(min=0), default=100, show_default=True, help="Held-out synthetic tasks.")
@click.option("--bfcl", "n_bfcl", type=click.IntRange(min=0), default=0, show_default=True, help="BFCL tasks (eval split, cheat sheet in the prompt).")
@click.option(
    "--plan-drills", "n_plan", type=click.IntRange(min=0), default=0, show_default=True,
    help="Held-out plan drills: cheat-sheet tasks over made-up tools with 2-4 independent calls each, scored like "
    "--bfcl (calls right, LPT order per number of calls, traps): a direct measure of writing the longest call first.",
)
@click.option(
    "--plan-arguments/--no-plan-arguments", "plan_arguments", default=True, show_default=True,
    help="--plan-drills: calls with arguments (as the 'plan' drills), or tools without parameters (the 'rank' drills: "
    "only the expected times tell the order).",
)
@click.option(
    "--plan-close-times", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
    help="--plan-drills: the share of tasks whose expected times all lie in one window of 20-120 ms (the hard "
    "case of the LPT order: only the last digits differ); 0 keeps the tasks of every earlier evaluation.",
)
@click.option(
    "--plan-layout", type=click.Choice(["call-first", "time-first"]), default=None,
    help="How the cheat-sheet plans of --bfcl and --plan-drills write each call: call-first (c1 f(a=1) ~300ms) or "
    "time-first (~300ms c1 f(a=1)). Default: what the checkpoint records, else call-first.",
)
@click.option("--bfcl-categories", default="simple_python,multiple,parallel,parallel_multiple", show_default=True)
@click.option("--modes", default="async", show_default=True, help="Comma-separated modes to run (async,sync,sync-parallel).")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option(
    "--max-new-tokens", type=click.IntRange(min=1), default=DEFAULT_MAX_NEW_TOKENS, show_default=True,
    help="Token budget of each task (tokens the model writes). Tasks that run out count as 'cut by token limit'.",
)
@click.option("--latency-scale", type=click.FloatRange(min=0.0), default=0.1, show_default=True, help="--clock wall: tools sleep their prompt latency times this.")
@click.option(
    "--clock", type=click.Choice(["wall", "virtual"]), default="wall", show_default=True,
    help="wall: tools really sleep and results go in where the model is when they return (varies from run to run). "
    "virtual: simulated time, as in the training traces (each token costs --tpot-ms, each call its prompt latency; "
    "tools return at once): the same report on every run and machine.",
)
@click.option("--tpot-ms", default="5,30", show_default=True, metavar="LOW,HIGH",
              help="--clock virtual: simulated time per token, drawn per task from this range (ms).")
@click.option(
    "--interrupt-at", type=click.Choice(["token", "word", "sentence", "sentence-eager"]), default=None,
    help="Where results go in: any safe point (token), only at word boundaries and after blocks (word), or paced, "
    "one at a time after a burst of calls or a sentence end (sentence; sentence-eager: also between two calls, "
    "the rule before 2026-12-02). "
    "Default: what the checkpoint records (word or sentence for checkpoints made by hf-asynclm train), else token.",
)
@click.option(
    "--constrain-calls", type=click.Choice(["off", "schema", "grounded"]), default=None,
    help="Constrained decoding of call blocks: off, or schema (only calls of the task's tools with arguments of "
    "their types, new ids), or grounded (schema, and string and number values copied from the conversation or the "
    "tools' schemas). Default: what the checkpoint records, else off.",
)
@click.option(
    "--no-repeat-calls/--repeat-calls", "no_repeat_calls", default=None,
    help="Never let the model repeat a call it has made in this generation (same tool and arguments): with constrained "
    "calls, the value that would repeat one is not offered. Default: what the checkpoint records, else allowed.",
)
@click.option(
    "--complete-names/--no-complete-names", "complete_names", default=None,
    help="Never let the model end a name from the conversation early in its text (\"Kuala\" for Kuala Lumpur). "
    "Default: what the checkpoint records, else off.",
)
@click.option(
    "--quote-numbers/--no-quote-numbers", "quote_numbers", default=None,
    help="Never let the model write a number its conversation lacks in its text (\"579.0\" where a result said 579.5). "
    "Default: what the checkpoint records, else off.",
)
@click.option(
    "--exclude-tasks", "exclude_files", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="BFCL: leave out tasks a checkpoint trained on: training traces (JSONL with task_id) or a JSON list of "
    "task ids. Repeatable.",
)
@click.option(
    "--bfcl-results", "bfcl_results", type=click.Choice(["status", "trace"]), default="status", show_default=True,
    help="What the BFCL calls return: status, {\"status\": \"ok\", \"id\": \"r12345\"} (a shape no training trace holds), "
    "or trace, {\"result\": \"<code>\"} (the shape the simulator gives such calls in the training traces).",
)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="BFCL data folder.")
@click.option("--device", default=None, metavar="DEVICE", help="Device of the model (cpu, cuda, cuda:1, mps). Default: cpu.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the full report as JSON.")
def eval_command(
    model_path: str | None,
    n_synthetic: int,
    n_bfcl: int,
    n_plan: int,
    plan_arguments: bool,
    plan_close_times: float,
    plan_layout: str | None,
    bfcl_categories: str,
    modes: str,
    seed: int,
    max_new_tokens: int,
    latency_scale: float,
    clock: str,
    tpot_ms: str,
    interrupt_at: str | None,
    constrain_calls: str | None,
    no_repeat_calls: bool | None,
    complete_names: bool | None,
    quote_numbers: bool | None,
    bfcl_results: str,
    exclude_files: tuple[Path, ...],
    data_dir: Path | None,
    device: str | None,
    out: Path | None,
) -> None:
    """Print CML validity and task success of a checkpoint on held-out tasks.

    \b
    Examples:
      hf-asynclm eval --synthetic 200
      hf-asynclm eval --synthetic 200 --clock virtual      # the same report on every run
      hf-asynclm eval --model out/gemma-3-270m-cml --synthetic 0 --bfcl 200 --modes sync,async
      hf-asynclm eval --synthetic 0 --plan-drills 200 --clock virtual   # LPT order on made-up tools
    """
    from rich.console import Console
    from rich.progress import Progress

    console = Console()
    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    bad = [m for m in mode_list if m not in ("async", "sync", "sync-parallel")]
    if bad or not mode_list:
        raise click.UsageError(f"unknown mode(s) {bad}: use async, sync, sync-parallel")
    if n_synthetic == 0 and n_bfcl == 0 and n_plan == 0:
        raise click.UsageError("nothing to evaluate: give --synthetic N, --bfcl N and/or --plan-drills N")
    from hf_asynclm.data.simulate import check_tpot_range

    try:
        tpot_range = check_tpot_range(tpot_ms.split(","))
    except ValueError as exc:
        raise click.UsageError(f"--tpot-ms: {exc}") from None
    clocked = {"clock": clock, "tpot_range_ms": tpot_range}

    from hf_asynclm import AsyncLM
    from hf_asynclm.asynclm import check_device
    from hf_asynclm.evaluation import evaluate_bfcl, evaluate_synthetic, format_report

    if device is not None:
        try:
            check_device(device)
        except ValueError as exc:
            raise click.UsageError(f"--device: {exc}") from None

    try:
        alm = AsyncLM.from_pretrained(
            model_path, interrupt_at=interrupt_at, constrain_calls=constrain_calls, no_repeat_calls=no_repeat_calls,
            complete_names=complete_names, quote_numbers=quote_numbers, plan_layout=plan_layout, device=device,
        )
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot load model {model_path or '(default)'}: {str(exc).splitlines()[0]}") from None

    reports = []

    def run_tasks(evaluate: Any, tasks: list, label: str, **settings: Any) -> None:
        """``evaluate`` the tasks once per mode with the runtime's settings, a progress bar each."""
        for mode in mode_list:
            bar = progress.add_task(f"{label} ({mode})", total=len(tasks))
            reports.append(
                evaluate(
                    alm.model, alm.tokenizer, tasks, mode=mode, max_new_tokens=max_new_tokens,
                    latency_scale=latency_scale, progress=lambda k, b=bar: progress.advance(b, k),
                    interrupt_at=alm.interrupt_at, constrain_calls=alm.constrain_calls,
                    no_repeat_calls=alm.no_repeat_calls, complete_names=alm.complete_names,
                    quote_numbers=alm.quote_numbers, **settings, **clocked,
                )
            )

    with Progress(console=console, transient=True) as progress:
        if n_synthetic:
            from hf_asynclm.data.synthetic import generate_tasks

            run_tasks(evaluate_synthetic, generate_tasks(n_synthetic, seed=seed, split="eval"), "synthetic")
        if n_bfcl:
            from hf_asynclm.data import bfcl

            try:
                all_tasks = []
                for cat in [c.strip() for c in bfcl_categories.split(",") if c.strip()]:
                    all_tasks += bfcl.load_tasks(cat, data_dir=data_dir)
            except (FileNotFoundError, KeyError, ValueError) as exc:
                raise click.ClickException(str(exc).splitlines()[0]) from None
            _, eval_tasks = bfcl.split(all_tasks, seed=0)
            excluded = _task_ids(exclude_files)
            if excluded:
                before = len(eval_tasks)
                eval_tasks = [t for t in eval_tasks if t.task_id not in excluded]
                console.print(f"left out {before - len(eval_tasks)} of {before} BFCL eval tasks listed in --exclude-tasks")
            import random

            rng = random.Random(seed)
            rng.shuffle(eval_tasks)
            chosen = []
            for t in eval_tasks[:n_bfcl]:
                lat = {c.call_id: rng.randint(30, 500) for c in t.calls}
                chosen.append(bfcl.with_cheat_sheet(t, lat, layout=alm.plan_layout))
            run_tasks(evaluate_bfcl, chosen, "bfcl", result_format=bfcl_results)
        if n_plan:
            from hf_asynclm.data.drills import plan_tasks

            plans = plan_tasks(n_plan, seed=seed, split="eval", arguments=plan_arguments, close_times=plan_close_times,
                               layout=alm.plan_layout)
            name = ("plan-drills" if plan_arguments else "rank-drills") + ("-close" if plan_close_times else "")
            run_tasks(evaluate_bfcl, plans, name, result_format=bfcl_results, name=name)
    for report in reports:
        console.print(format_report(report))
        console.print()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps([r.to_dict() for r in reports], indent=1, default=str))
        console.print(f"report written to {out}")


def _task_ids(files: tuple[Path, ...]) -> set[str]:
    """Task ids in JSON lists of ids or in JSONL traces (their ``task_id``)."""
    ids: set[str] = set()
    for path in files:
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, list):
            ids |= {str(x) for x in data}
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                ids.add(str(json.loads(line)["task_id"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise click.BadParameter(f"{path}:{n} is neither a JSON list of task ids nor a trace with task_id",
                                         param_hint="--exclude-tasks") from None
    return ids
