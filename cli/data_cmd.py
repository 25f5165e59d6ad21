"""``hf-asynclm data``: build CML training data (simulated traces, JSONL).

Wired into the app with ``app.add_command(data)`` (see ``cli/main.py``).

Example:

```python
>>> from click.testing import CliRunner
>>> from hf_asynclm_cli.data_cmd import data
>>> result = CliRunner().invoke(data, ["build", "--out", "x.jsonl", "--n", "0"])
>>> result.exit_code, "--n" in result.output
(2, True)

```
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any, Callable, Iterable

import click

logger = logging.getLogger(__name__)

_MODES = ("async", "sync", "sync-parallel")
#: BFCL categories used for training data (the live ones are held out for evaluation).
_BFCL_CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "multi_turn_base")
#: What ``data build --bfcl-categories`` takes: the categories above and the multi-step parallel tasks
#: joined from ``multi_turn_base`` first turns.
BFCL_TRAIN_CATEGORIES = _BFCL_CATEGORIES + ("multistep_parallel",)


def _parse_modes(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in value.split(",") if m.strip())
    bad = [m for m in modes if m not in _MODES]
    if bad or not modes:
        raise click.BadParameter(f"unknown mode(s) {', '.join(bad) or '(none)'}; choose from {', '.join(_MODES)}")
    return tuple(dict.fromkeys(modes))


def _comma_choices(what: str, load_allowed: Callable[[], Iterable[str]]) -> Callable[..., list[str] | None]:
    """A click callback that splits a comma list and checks each name against ``load_allowed()``
    (imported lazily, so ``--help`` stays fast)."""

    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
        if not value:
            return None
        allowed = list(load_allowed())
        names = [s.strip() for s in value.split(",") if s.strip()]
        bad = [s for s in names if s not in allowed]
        if bad or not names:
            raise click.BadParameter(f"unknown {what}(s) {', '.join(bad) or '(none)'}; choose from {', '.join(allowed)}")
        return names

    return parse


def _parse_ms_range(value: str, check: Any, rule: str, example: str) -> tuple[float, float]:
    """``LOW,HIGH`` (or one number for a fixed value) checked by ``check``; a usage error otherwise."""
    parts = [p.strip() for p in str(value).split(",")]
    if len(parts) == 1:
        parts = parts * 2  # one number: LOW = HIGH
    try:
        return check([float(p) for p in parts])
    except ValueError as exc:
        raise click.BadParameter(f"expected LOW,HIGH in ms with {rule} (e.g. {example}), got {value!r}") from exc


def _parse_tpot(ctx: click.Context, param: click.Parameter, value: str) -> tuple[float, float]:
    from hf_asynclm.data.simulate import check_tpot_range

    return _parse_ms_range(value, check_tpot_range, "0 < LOW <= HIGH", "5,30")


def _parse_drill_calls(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    """``N`` or ``LOW,HIGH`` calls per drill (2-8); a usage error otherwise."""
    if value is None:
        return None
    from hf_asynclm.data.drills import MAX_DRILL_CALLS

    parts = [p.strip() for p in str(value).split(",")]
    try:
        low, high = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, -1)
    except ValueError:
        low, high = 0, -1
    if not 2 <= low <= high <= MAX_DRILL_CALLS:
        raise click.BadParameter(f"expected N or LOW,HIGH calls with 2 <= LOW <= HIGH <= {MAX_DRILL_CALLS} (e.g. 4 or 2,4), got {value!r}")
    return low, high


def _parse_latency(ctx: click.Context, param: click.Parameter, value: str) -> tuple[float, float]:
    from hf_asynclm.data.simulate import check_latency_range

    return _parse_ms_range(value, check_latency_range, "1 <= LOW <= HIGH <= 60000", "1,1000")


def _shapes() -> Iterable[str]:
    from hf_asynclm.data.synthetic import SHAPES

    return SHAPES


def _drill_kinds() -> Iterable[str]:
    from hf_asynclm.data.drills import DRILL_KINDS, EXTRA_DRILL_KINDS

    return DRILL_KINDS + EXTRA_DRILL_KINDS


def bfcl_tasks(
    n: int, seed: int, split: str = "train", data_dir: str | None = None, cheat_sheet: float = 0.5, split_seed: int = 0,
    plan_latencies: str = "rounded",
    latency_range_ms: tuple[float, float] | None = None,
    plan_layout: str = "call-first",
    categories: Iterable[str] | None = None,
) -> list[Any]:
    """Up to ``n`` BFCL tasks of ``split`` (seeded sample): the single-turn categories, the
    first turns of ``multi_turn_base`` and multi-step parallel tasks joined from those
    (``categories``: only those of :data:`BFCL_TRAIN_CATEGORIES`; ``None``: all, the draw data
    built before the option had).

    The train/eval split is ``bfcl.split(tasks, seed=split_seed)``, the same one evaluation
    and the benchmarks use (their ``--split-seed``, default 0), whatever ``seed`` samples: data
    built with any ``seed`` never holds an evaluation task.

    A share ``cheat_sheet`` of them get the plan with per-call latencies in the prompt
    (``bfcl.with_cheat_sheet``); the latencies (drawn from ``latency_range_ms``, default
    1-1000 ms; ``plan_latencies="rounded"``: to 10 ms above 100 ms, ``"exact"``: to the
    millisecond) become the calls' ``latency_s``, which the simulator then uses as both
    expected and execution time. ``plan_layout`` is how the plan writes each call
    (``bfcl.PLAN_LAYOUTS``).

    Raises ``ImportError`` when ``hf_asynclm.data.bfcl`` is missing and ``FileNotFoundError``
    when the BFCL data is; ``ValueError`` for an unknown category.
    """
    from hf_asynclm.data import bfcl
    from hf_asynclm.data.simulate import DEFAULT_LATENCY_RANGE_MS, check_latency_range, sample_latency_ms

    wanted = set(BFCL_TRAIN_CATEGORIES if categories is None else categories)
    unknown = sorted(wanted - set(BFCL_TRAIN_CATEGORIES))
    if unknown or not wanted:
        raise ValueError(f"unknown BFCL training categories {', '.join(unknown) or '(none)'}; choose from "
                         f"{', '.join(BFCL_TRAIN_CATEGORIES)}")

    low, high = check_latency_range(DEFAULT_LATENCY_RANGE_MS if latency_range_ms is None else latency_range_ms)
    if plan_latencies not in ("rounded", "exact"):
        raise ValueError(f"plan_latencies must be 'rounded' or 'exact', got {plan_latencies!r}")
    exact = plan_latencies == "exact"
    rng = random.Random(f"bfcl:{seed}:{split}")
    available = set(bfcl.available_categories(data_dir))
    if not available & set(_BFCL_CATEGORIES):
        raise FileNotFoundError(f"no BFCL data files in {data_dir or bfcl.bfcl_data_dir()}")
    pool: list[Any] = []
    multi_turn: list[Any] = []
    for cat in _BFCL_CATEGORIES:
        if cat not in wanted and not (cat == "multi_turn_base" and "multistep_parallel" in wanted):
            continue
        if cat not in available:
            logger.warning("BFCL category %s not found; skipped", cat)
            continue
        tasks = [bfcl.to_task(e, cat) for e in bfcl.load_category(cat, data_dir)]
        train, ev = bfcl.split(tasks, seed=split_seed)
        part = train if split == "train" else ev
        if cat in wanted:
            pool.extend(part)
        if cat == "multi_turn_base":
            multi_turn = part
    if "multistep_parallel" in wanted and len([t for t in multi_turn if 1 <= len(t.calls) <= 5]) >= 3:
        pool.extend(bfcl.multistep_parallel_tasks(max(1, n // 5), seed, pool=multi_turn))
    pool = [t for t in pool if t.calls]
    rng.shuffle(pool)
    out = []
    for t in pool[:n]:
        if rng.random() < cheat_sheet:
            t = bfcl.with_cheat_sheet(t, {c.call_id: sample_latency_ms(rng, low, high, exact=exact) for c in t.calls},
                                      layout=plan_layout)
        out.append(t)
    return out


@click.group("data")
def data() -> None:
    """Build CML training data: simulated async / sync traces of tool-use tasks."""


@data.command(
    "build",
    epilog="""\b
Examples:
  hf-asynclm data build --out data/train.jsonl --n 20000 --seed 0
  hf-asynclm data build --out data/eval.jsonl --n 300 --seed 1 --split eval --modes async
  hf-asynclm data build --out data/mix.jsonl --n 5000 --source both --tokenizer out/cml-tiny

\b
Each line is one trace: {"task_id", "mode", "source", "category", "messages", "tools",
"segments", "meta"}; see hf_asynclm.data.simulate. --n counts tasks per source; every
task gives one trace per mode.
""",
)
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="JSONL file to write.")
@click.option("--n", "n", type=click.IntRange(min=1), default=1000, show_default=True, help="Tasks per source.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of tasks and timings.")
@click.option(
    "--source", type=click.Choice(["synthetic", "bfcl", "both", "drills"]), default="synthetic", show_default=True,
    help="Where tasks come from ('drills': --n copy drills, see hf_asynclm.data.drills; no simulation)."
)
@click.option(
    "--modes", default=",".join(_MODES), show_default=True, callback=_parse_modes, help="Comma-separated trace modes."
)
@click.option(
    "--split", type=click.Choice(["train", "eval"]), default="train", show_default=True,
    help="Synthetic: which half of the value pools; BFCL: which side of the seeded split.",
)
@click.option("--shapes", default=None, callback=_comma_choices("shape", _shapes), help="Synthetic task shapes, comma-separated (default: all).")
@click.option(
    "--drill-kinds", default=None, callback=_comma_choices("drill kind", _drill_kinds),
    help="Drills: kinds to generate in turn, comma-separated (default: the five of DRILL_KINDS; 'order', 'rank' and 'variants' only when named; see hf_asynclm.data.drills).",
)
@click.option(
    "--drill-calls", default=None, callback=_parse_drill_calls, metavar="N|LOW,HIGH",
    help="Drills: the number of calls (2-8) of each calls, plan, rank, variants and order drill, or a range "
    "LOW,HIGH (default: plan 1-4, the others 2-4).",
)
@click.option(
    "--drill-close-times", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
    help="Drills: the share of plan, rank, variants and order drills whose expected times all lie in one "
    "window of 20-120 ms (2 ms apart at least), so that only their last digits tell the LPT order.",
)
@click.option(
    "--tokenizer", "tokenizer_path", default=None, metavar="PATH",
    help="Tokenizer (folder or Hub id) to count tokens for timing and --max-tokens. Default: ~4 chars per token.",
)
@click.option(
    "--max-tokens", type=click.IntRange(min=0), default=512, show_default=True,
    help="Drop traces longer than this (prompt + trace); 0 keeps all.",
)
@click.option(
    "--user-interrupt-rate", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
    help="Share of async traces with a user interrupt (an extra request mid-task).",
)
@click.option(
    "--jitter", type=click.FloatRange(0.0, 0.99), default=0.25, show_default=True,
    help="Execution time = expected time x U(1-jitter, 1+jitter).",
)
@click.option(
    "--demo-prompt", type=click.FloatRange(0.0, 1.0), default=0.3, show_default=True,
    help="Synthetic: share of prompts listing all demo tools with their real latencies.",
)
@click.option(
    "--cheat-sheet", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
    help="BFCL: share of tasks with the plan and per-call latencies in the prompt.",
)
@click.option(
    "--plan-latencies", type=click.Choice(["rounded", "exact"]), default="rounded", show_default=True,
    help="BFCL: the cheat sheet's per-call latencies rounded to 10 ms above 100 ms (~380ms), or exact to the "
    "millisecond (~387ms, as measured latencies and `hf-asynclm eval`'s cheat sheets are).",
)
@click.option(
    "--plan-layout", type=click.Choice(["call-first", "time-first"]), default="call-first", show_default=True,
    help="BFCL cheat sheets and plan, rank and variants drills: how the plan writes each call, call-first "
    "(c1 f(a=1) ~300ms) or time-first (~300ms c1 f(a=1)). Train a model on one layout and record it "
    "(hf-asynclm train --plan-layout) so that eval and bench write its plans that way.",
)
@click.option(
    "--latency-ms", "latency_ms", default="1,1000", show_default=True, callback=_parse_latency, metavar="LOW,HIGH",
    help="Expected call latencies, drawn from U(LOW, HIGH) ms: BFCL cheat sheets, synthetic tools outside the "
    "demo catalogue (whose latencies are its own) and any tool without one.",
)
@click.option(
    "--tpot-ms", "tpot_ms", default="5,30", show_default=True, callback=_parse_tpot, metavar="LOW,HIGH",
    help="Simulated time per output token, drawn per task from U(LOW, HIGH) ms. Raise it for a slow "
    "decoder (a 270M model on a CPU writes ~90 ms per token), so results also arrive between calls.",
)
@click.option(
    "--split-seed", type=int, default=0, show_default=True,
    help="BFCL: seed of the train/eval split (the one `hf-asynclm eval` and `bench` hold out; keep it fixed across --seed).",
)
@click.option(
    "--interrupt-at", type=click.Choice(["word", "sentence", "sentence-eager"]), default="word", show_default=True,
    help="Async traces: where results go in. word: every ready result at the first word boundary or "
    "block end; sentence: paced, one at a time, after a burst of calls or a sentence end, each answered "
    "before the next (the runtime's interrupt_at='sentence'); sentence-eager: paced, but a result may also "
    "go in between two calls (traces written before 2026-12-02).",
)
@click.option(
    "--generic-results", type=click.Choice(["code", "varied"]), default="code", show_default=True,
    help="Results of tools the simulator has no implementation of (BFCL's): code, always {\"result\": \"<code>\"}; "
    "varied, one of several shapes per call (hf_asynclm.data.simulate.VARIED_RESULT_SHAPES), so that a model goes on "
    "after results of any shape. Neither uses the keys of the evaluation's default BFCL result.",
)
@click.option(
    "--bfcl-categories", default=None, callback=_comma_choices("BFCL category", lambda: BFCL_TRAIN_CATEGORIES),
    help=f"BFCL: only tasks of these categories, comma-separated (default: all of {', '.join(BFCL_TRAIN_CATEGORIES)}).",
)
@click.option("--data-dir", default=None, metavar="DIR", help="BFCL data folder (default: the installed bfcl-eval).")
@click.option("--stats", "stats_path", default=None, type=click.Path(dir_okay=False, path_type=Path), help="Also write the stats as JSON.")
def build(
    out: Path,
    n: int,
    seed: int,
    source: str,
    modes: tuple[str, ...],
    split: str,
    shapes: list[str] | None,
    drill_kinds: list[str] | None,
    drill_calls: tuple[int, int] | None,
    drill_close_times: float,
    tokenizer_path: str | None,
    max_tokens: int,
    user_interrupt_rate: float,
    jitter: float,
    demo_prompt: float,
    cheat_sheet: float,
    plan_latencies: str,
    plan_layout: str,
    latency_ms: tuple[float, float],
    tpot_ms: tuple[float, float],
    split_seed: int,
    interrupt_at: str,
    generic_results: str,
    bfcl_categories: list[str] | None,
    data_dir: str | None,
    stats_path: Path | None,
) -> None:
    """Simulate tasks in each mode and write the traces as JSONL."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from hf_asynclm.data.simulate import build_dataset
    from hf_asynclm.data.synthetic import generate_tasks

    console = Console(stderr=True)
    tokenizer = None
    if tokenizer_path:
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        except Exception as exc:  # noqa: BLE001 - any loading failure is a usage error here
            raise click.ClickException(f"cannot load tokenizer {tokenizer_path!r}: {exc}") from exc

    if source != "drills" and (drill_calls is not None or drill_close_times):
        raise click.UsageError("--drill-calls and --drill-close-times shape copy drills: use them with --source drills")
    if source not in ("bfcl", "both") and bfcl_categories:
        raise click.UsageError("--bfcl-categories picks BFCL tasks: use it with --source bfcl or both")
    if source == "synthetic" and plan_layout != "call-first":
        raise click.UsageError("--plan-layout writes cheat-sheet plans (BFCL tasks and drills): use it with --source "
                               "bfcl, both or drills")
    if source == "drills":
        from hf_asynclm.data.drills import copy_drills

        try:
            drills = copy_drills(n, seed=seed, split=split, kinds=drill_kinds, calls=drill_calls,
                                 close_times=drill_close_times, plan_layout=plan_layout)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("w", encoding="utf-8") as fh:
                for d in drills:
                    fh.write(json.dumps(d) + "\n")
        except OSError as exc:
            raise click.ClickException(f"cannot write {out}: {exc}") from exc
        click.echo(f"wrote {len(drills)} copy drills to {out}")
        return

    tasks: list[Any] = []
    if source in ("synthetic", "both"):
        tasks += generate_tasks(
            n, seed=seed, shapes=shapes, split=split, demo_prompt_p=demo_prompt, latency_range_ms=latency_ms
        )
    if source in ("bfcl", "both"):
        try:
            found = bfcl_tasks(n, seed, split=split, data_dir=data_dir, cheat_sheet=cheat_sheet, split_seed=split_seed,
                               plan_latencies=plan_latencies, latency_range_ms=latency_ms, plan_layout=plan_layout,
                               categories=bfcl_categories)
        except (ImportError, FileNotFoundError, ValueError) as exc:
            if source == "bfcl":
                raise click.ClickException(f"BFCL tasks unavailable: {exc}") from exc
            console.print(f"[yellow]BFCL skipped: {exc}[/yellow]")
            found = []
        if source == "bfcl" and not found:
            raise click.ClickException("no BFCL tasks found")
        tasks += found

    with Progress(
        TextColumn("[bold]simulating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=False
    ) as bar:
        job = bar.add_task("tasks", total=len(tasks))
        try:
            stats = build_dataset(
                tasks,
                out,
                modes=modes,
                seed=seed,
                tokenizer=tokenizer,
                user_interrupt_rate=user_interrupt_rate,
                jitter=jitter,
                max_tokens=max_tokens or None,
                progress=lambda k: bar.advance(job, k),
                tpot_range_ms=tpot_ms,
                latency_range_ms=latency_ms,
                interrupt_at=interrupt_at,
                generic_results=generic_results,
            )
        except OSError as exc:
            raise click.ClickException(f"cannot write {out}: {exc}") from exc
    if stats_path is not None:
        stats_path.parent.mkdir(parents=True, exist_ok=True)
        stats_path.write_text(json.dumps(stats, indent=2))
    by_mode = ", ".join(
        f"{m}: {s['n']} (mean {s['mean_latency_ms']} ms)" for m, s in stats["by_mode"].items()
    )
    click.echo(f"wrote {stats['n_examples']} traces of {stats['n_tasks']} tasks to {out}")
    click.echo(f"  {by_mode}")
    if stats.get("mean_sync_over_async"):
        click.echo(f"  sync / async simulated latency: {stats['mean_sync_over_async']}x")
    if stats.get("n_too_long"):
        click.echo(f"  dropped {stats['n_too_long']} traces longer than {max_tokens} tokens")
    if stats.get("n_rejected"):
        click.echo(f"  rejected {stats['n_rejected']} traces that broke a rule: {stats['violations'][:3]}", err=True)
    if stats["n_examples"] == 0:
        raise click.ClickException("no trace was written")


@data.command(
    "tokenizer",
    epilog="""\b
Example:
  hf-asynclm data tokenizer --data data/drills.jsonl,data/syn_async.jsonl --out out/cml-tokenizer
\b
The same tokenizer `hf-asynclm train` builds from its --data when it trains from scratch;
build it once to share it between training stages (train --tokenizer DIR).
""",
)
@click.option("--data", "data_files", required=True, multiple=True, metavar="FILE[,FILE]",
              help="Traces (JSONL) to learn the merges from; repeat or separate with commas.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to save the tokenizer in.")
@click.option("--vocab-size", type=click.IntRange(min=268), default=512, show_default=True, help="Tokens in all (256 bytes + special tokens + merges).")
@click.option("--digit-group", type=click.IntRange(min=1, max=3), default=1, show_default=True, help="Digits per token at most.")
def tokenizer_command(data_files: tuple[str, ...], out: Path, vocab_size: int, digit_group: int) -> None:
    """Train the CML byte-level BPE tokenizer of a from-scratch model on traces."""
    from hf_asynclm.training.dataset import ExampleError, example_texts, read_jsonl, split_paths
    from hf_asynclm.training.tokenizer import build_cml_tokenizer

    paths = [str(p) for p in split_paths(data_files)]
    try:
        examples = read_jsonl(paths)
    except (ExampleError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    if not examples:
        raise click.ClickException(f"no examples in {', '.join(paths)}")
    tok = build_cml_tokenizer([t for ex in examples for t in example_texts(ex)], vocab_size=vocab_size, digit_group=digit_group)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(out)
    except OSError as exc:
        raise click.ClickException(f"cannot write {out}: {exc}") from None
    click.echo(f"saved a {len(tok)}-token CML tokenizer to {out} (learnt from {len(examples)} traces)")
