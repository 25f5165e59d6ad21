"""``hf-asynclm bench``: the latency, accuracy and runtime-overhead benchmarks.

Nothing heavy is imported at module import time (``hf-asynclm --help`` stays fast).

Example:

```python
>>> from click.testing import CliRunner
>>> from hf_asynclm_cli.bench_cmd import bench
>>> result = CliRunner().invoke(bench, ["--help"])
>>> result.exit_code, all(c in result.output for c in ("latency", "accuracy", "overhead"))
(0, True)

```
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import click

from .common import one_line

WORKLOADS = ("bfcl-parallel", "bfcl-multistep-parallel", "synthetic")  # hf_asynclm.bench.latency.WORKLOADS
BENCH_MODES = ("sync", "sync-cached", "sync-parallel", "async")
DEFAULT_OUT = Path("benchmarks") / "results"
DEBUG_ENV = "HF_ASYNCLM_DEBUG"

LATENCY_EPILOG = """\b
Examples:
  # the paper's conditions: 5 ms per token, 59 ms (local) and 310 ms (cloud) per request
  hf-asynclm bench latency --workload bfcl-parallel --workload bfcl-multistep-parallel \\
      --n 30 --emulate-tpot-ms 5 --emulate-ttft-ms 59 --emulate-ttft-ms 310
\b
  # the shipped checkpoint deciding by itself (cheat sheet in the prompt), real CPU decode
  hf-asynclm bench latency --policy model --workload bfcl-parallel --n 20
\b
Each workload x condition writes latency_<workload>_<policy>_<condition>.json / .md and a
timeline PNG of its median task to --out (the model policy names the model too:
latency_bfcl-parallel_model-cml-tiny_real.json, and so does the oracle on real decode:
latency_bfcl-parallel_oracle-random-llama-1b_real.json); a combined table goes to latency_summary.md
(oracle) or latency_summary_model.md (model policy, one row per model).
"""


def _run_guarded(fn: Callable[[], Any]) -> Any:
    """Turn user errors into one-line click errors (tracebacks with HF_ASYNCLM_DEBUG=1)."""
    if os.environ.get(DEBUG_ENV):
        return fn()
    try:
        return fn()
    except (FileNotFoundError, ValueError, OSError, ImportError) as exc:
        raise click.ClickException(one_line(exc)) from exc


def _parse_csv(choices: Sequence[str]) -> Callable[[click.Context, click.Parameter, str | None], tuple[str, ...] | None]:
    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        items = tuple(v.strip() for v in value.split(",") if v.strip())
        bad = [v for v in items if v not in choices]
        if bad or not items:
            raise click.BadParameter(f"{', '.join(bad) or 'nothing given'}: choose from {', '.join(choices)}")
        return items

    return parse


def _parse_sizes(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: give comma-separated token counts, e.g. 8,32,128") from None
    if not sizes or any(s < 1 for s in sizes):
        raise click.BadParameter("token counts must be positive")
    return sizes


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _progress(console: Any) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[current]}"),
        console=console,
    )


@click.group("bench", context_settings={"help_option_names": ["-h", "--help"]})
def bench() -> None:
    """Benchmarks: latency against the synchronous baselines, BFCL accuracy, runtime overhead."""


@bench.command("latency", epilog=LATENCY_EPILOG)
@click.option("--workload", "workloads", multiple=True, type=click.Choice(WORKLOADS), default=("bfcl-parallel",), show_default=True, help="Workload (repeat for several).")
@click.option("--n", type=click.IntRange(min=1), default=20, show_default=True, help="Tasks per workload.")
@click.option("--seed", type=int, default=0, show_default=True, help="Task sampling and tool-latency seed.")
@click.option("--split", type=click.Choice(["eval", "train", "all"]), default="eval", show_default=True, help="BFCL side of the train/eval split (eval: held out from training).")
@click.option("--split-seed", type=int, default=0, show_default=True, help="Seed of the train/eval split (the one the training data used).")
@click.option("--policy", type=click.Choice(["oracle", "model"]), default="oracle", show_default=True, help="oracle: the ideal schedule forced token by token; model: the checkpoint decides (cheat sheet in the prompt).")
@click.option("--model", "model_spec", default=None, metavar="PATH|HUB_ID|random", help="Checkpoint (default: the shipped cml-tiny, else a tiny random Llama).")
@click.option("--modes", default=None, callback=_parse_csv(BENCH_MODES), help=f"Comma-separated modes [{','.join(BENCH_MODES)}].")
@click.option("--emulate-tpot-ms", "tpot_ms", type=click.FloatRange(min=0), default=None, help="Emulated time per decode step (ms).")
@click.option("--emulate-ttft-ms", "ttft_ms", type=click.FloatRange(min=0), multiple=True, help="Emulated time per request / prefill (ms); repeat for several conditions.")
@click.option("--latency-scale", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True, help="Multiply every tool latency.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=512, show_default=True, help="Generation budget of the model policy.")
@click.option("--data-dir", default=None, metavar="DIR", help="BFCL data folder (default: the installed bfcl-eval).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--device", default=None, metavar="DEVICE", help="Device of the model (cpu, cuda, cuda:1); default: cpu. Times on a GPU are read after its queued work finishes.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT, show_default=True, help="Output folder.")
@click.option("--no-warmup", is_flag=True, help="Skip the unrecorded warm-up task.")
def latency_command(
    workloads: tuple[str, ...],
    n: int,
    seed: int,
    split: str,
    split_seed: int,
    policy: str,
    model_spec: str | None,
    modes: tuple[str, ...] | None,
    tpot_ms: float | None,
    ttft_ms: tuple[float, ...],
    latency_scale: float,
    max_new_tokens: int,
    data_dir: str | None,
    threads: int | None,
    device: str | None,
    out_dir: Path,
    no_warmup: bool,
) -> None:
    """Latency of sync, sync-cached, sync-parallel and async on the same tasks, their ideal, and the speedups."""
    if (tpot_ms is None) != (not ttft_ms):
        raise click.UsageError("emulation needs both --emulate-tpot-ms and --emulate-ttft-ms")
    console = _console()

    def run() -> None:
        from hf_asynclm.bench.latency import LatencyConfig, load_bench_model, median_task, run_latency
        from hf_asynclm.bench.report import latency_markdown, latency_overview_markdown, latency_stem, report_model_name, plot_timeline, plot_timeline_detail, write_json

        conditions: list[tuple[float | None, float | None]] = [(tpot_ms, t) for t in ttft_ms] if tpot_ms is not None else [(None, None)]
        configs = [
            LatencyConfig(
                workload=w, n=n, seed=seed, split=split, split_seed=split_seed, policy=policy,
                modes=modes or BENCH_MODES, tpot_ms=tp, ttft_ms=tt, latency_scale=latency_scale,
                max_new_tokens=max_new_tokens, data_dir=data_dir, warmup=not no_warmup, threads=threads,
            )
            for w in workloads
            for tp, tt in conditions
        ]
        bm = load_bench_model(model_spec, device=device)
        console.print(f"model: {bm.label}")
        for note in bm.notes:
            console.print(f"[yellow]note: {note}[/yellow]")
        reports = []
        out_dir.mkdir(parents=True, exist_ok=True)
        with _progress(console) as bar:
            for cfg in configs:
                job = bar.add_task(f"{cfg.workload} ({cfg.condition})", total=cfg.n, current="")
                report = run_latency(cfg, bm, progress=lambda i, total, tid, job=job: bar.update(job, completed=i, total=total, current=tid))
                stem = latency_stem(report)
                task = median_task(report)
                report["timeline_task"] = task["task_id"]
                write_json(report, out_dir / f"{stem}.json")
                md = latency_markdown(report)
                png = plot_timeline(task, out_dir / f"{stem}_timeline.png", title=f"{cfg.workload}, {cfg.condition}: task {task['task_id']}")
                detail = plot_timeline_detail(task, out_dir / f"{stem}_timeline_detail.png", title=f"{cfg.workload}, {cfg.condition}: task {task['task_id']} (what the model writes)")
                md += f"\nTimeline of task {task['task_id']} (median async/sync speedup): ![timeline]({png.name}) ![detail]({detail.name})\n"
                (out_dir / f"{stem}.md").write_text(md, encoding="utf-8")
                reports.append(report)
                bar.console.print(md, markup=False, highlight=False, soft_wrap=True)
        # the summary covers every report of this policy in --out (earlier commands included)
        stems = {latency_stem(r) for r in reports}
        pattern = "latency_*_oracle[_-]*.json" if policy == "oracle" else "latency_*_model-*_*.json"
        for path in sorted(out_dir.glob(pattern)):
            if path.stem not in stems:
                try:
                    reports.append(json.loads(path.read_text(encoding="utf-8")))
                except (OSError, ValueError):
                    continue
        order = {w: i for i, w in enumerate(WORKLOADS)}
        reports.sort(key=lambda r: (order.get(r["config"]["workload"], 9), report_model_name(r), r["config"].get("ttft_ms") or 0))
        overview = latency_overview_markdown(reports)
        name = "latency_summary.md" if policy == "oracle" else f"latency_summary_{policy}.md"
        (out_dir / name).write_text(overview, encoding="utf-8")
        click.echo(overview)
        click.echo(f"wrote {len(configs)} report(s) to {out_dir}")

    _run_guarded(run)


@bench.command("accuracy")
@click.option("--model", "model_spec", default=None, metavar="PATH|HUB_ID|random", help="Checkpoint (default: the shipped cml-tiny).")
@click.option("--category", "categories", multiple=True, default=None, help="BFCL category (repeat; default parallel, live_parallel, parallel_multiple, live_parallel_multiple, multistep_parallel).")
@click.option("--n", type=click.IntRange(min=1), default=30, show_default=True, help="Tasks per category.")
@click.option("--seed", type=int, default=0, show_default=True, help="Task sampling seed.")
@click.option("--split", type=click.Choice(["eval", "train", "all"]), default="eval", show_default=True, help="Side of the train/eval split.")
@click.option("--split-seed", type=int, default=0, show_default=True, help="Seed of the train/eval split.")
@click.option("--modes", default="sync,async", show_default=True, callback=_parse_csv(("sync", "sync-parallel", "async")), help="Runtime modes to compare.")
@click.option("--cheat-sheet/--no-cheat-sheet", default=False, show_default=True, help="Put the ground-truth plan in the prompt.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=384, show_default=True)
@click.option("--latency-scale", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True, help="Tool latencies (x the 30-500 ms distribution).")
@click.option("--data-dir", default=None, metavar="DIR", help="BFCL data folder.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--device", default=None, metavar="DEVICE", help="Device of the model (cpu, cuda, cuda:1); default: cpu. Times on a GPU are read after its queued work finishes.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT, show_default=True)
def accuracy_command(
    model_spec: str | None,
    categories: tuple[str, ...],
    n: int,
    seed: int,
    split: str,
    split_seed: int,
    modes: tuple[str, ...],
    cheat_sheet: bool,
    max_new_tokens: int,
    latency_scale: float,
    data_dir: str | None,
    threads: int | None,
    device: str | None,
    out_dir: Path,
) -> None:
    """BFCL AST accuracy of the calls a checkpoint emits, per category, sync vs async; rate of valid CML."""
    console = _console()

    def run() -> None:
        from hf_asynclm.bench.accuracy import DEFAULT_CATEGORIES, AccuracyConfig, run_accuracy
        from hf_asynclm.bench.latency import load_bench_model
        from hf_asynclm.bench.report import accuracy_markdown, write_json

        cfg = AccuracyConfig(
            categories=tuple(categories) or DEFAULT_CATEGORIES, n=n, seed=seed, split=split, split_seed=split_seed,
            modes=modes, cheat_sheet=cheat_sheet, max_new_tokens=max_new_tokens, latency_scale=latency_scale, data_dir=data_dir,
            threads=threads,
        )
        bm = load_bench_model(model_spec, device=device)
        console.print(f"model: {bm.label}")
        with _progress(console) as bar:
            job = bar.add_task("accuracy", total=None, current="")
            report = run_accuracy(cfg, bm, progress=lambda i, total, tid: bar.update(job, completed=i, total=total, current=tid))
        out_dir.mkdir(parents=True, exist_ok=True)
        tag = Path(bm.path).name if bm.path else "random"
        write_json(report, out_dir / f"accuracy_{tag}.json")
        md = accuracy_markdown(report)
        (out_dir / f"accuracy_{tag}.md").write_text(md, encoding="utf-8")
        click.echo(md)

    _run_guarded(run)


@bench.command("overhead")
@click.option("--model", "model_spec", default=None, metavar="PATH|HUB_ID|random", help="Checkpoint (default: the shipped cml-tiny, else a tiny random Llama).")
@click.option("--new-tokens", type=click.IntRange(min=2), default=128, show_default=True, help="(a) tokens generated per repetition.")
@click.option("--reps", type=click.IntRange(min=1), default=7, show_default=True, help="Repetitions of (a) and (b).")
@click.option("--interrupt-tokens", default="8,32,128", show_default=True, callback=_parse_sizes, help="(b) interrupt sizes in tokens.")
@click.option("--context-tokens", type=click.IntRange(min=1), default=256, show_default=True, help="(b) tokens in the cache before the interrupt.")
@click.option("--calls", "n_calls", type=click.IntRange(min=1), default=20, show_default=True, help="(c) calls per generation.")
@click.option("--generations", type=click.IntRange(min=1), default=5, show_default=True, help="(c) generations per tool kind.")
@click.option("--emulate-tpot-ms", "tpot_ms", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True, help="(c) emulated decode step for the 'decode thread sleeps' rows.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--device", default=None, metavar="DEVICE", help="Device of the model (cpu, cuda, cuda:1); default: cpu. Times on a GPU are read after its queued work finishes.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT, show_default=True)
def overhead_command(
    model_spec: str | None,
    new_tokens: int,
    reps: int,
    interrupt_tokens: tuple[int, ...],
    context_tokens: int,
    n_calls: int,
    generations: int,
    tpot_ms: float,
    threads: int | None,
    device: str | None,
    out_dir: Path,
) -> None:
    """Runtime overhead: (a) tokens/s vs plain generate, (b) interrupt cost, (c) dispatch latency, (d) constrained calls."""
    console = _console()

    def run() -> None:
        from hf_asynclm.bench.latency import load_bench_model
        from hf_asynclm.bench.overhead import OverheadConfig, run_overhead
        from hf_asynclm.bench.report import overhead_markdown, write_json

        cfg = OverheadConfig(
            new_tokens=new_tokens, reps=reps, interrupt_tokens=interrupt_tokens, context_tokens=context_tokens,
            calls=n_calls, generations=generations, threads=threads, emulated_tpot_ms=tpot_ms,
        )
        bm = load_bench_model(model_spec, device=device)
        console.print(f"model: {bm.label}")
        with _progress(console) as bar:
            job = bar.add_task("overhead", total=4, current="")
            report = run_overhead(cfg, bm, progress=lambda i, section: bar.update(job, completed=i, current=section))
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(report, out_dir / "overhead.json")
        md = overhead_markdown(report)
        (out_dir / "overhead.md").write_text(md, encoding="utf-8")
        click.echo(md)

    _run_guarded(run)

