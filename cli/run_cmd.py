"""``hf-asynclm run PROMPT``: one generation with asynchronous function calling, shown live.

The visible text streams as the model writes it; each call gets a line when it starts, when
it returns and when its result is injected, with times relative to the start::

    Let me check both cities.
      ↳ w1 get_weather(city="Paris") started +0.21s
      ↳ w2 get_weather(city="Oslo") started +0.33s
      ✓ w1 returned in 0.30s → {"city": "Paris", "temp_c": 18, "sky": "sunny"}
      ⇢ injected w1 (+0.52s)
    Paris is sunny at 18 °C ...
    async · 1.84s wall · 61 tokens (+38 injected) · 62 forward passes · 2 calls · trap 0.12s · stop: eos

Example:

```python
>>> from click.testing import CliRunner
>>> from hf_asynclm_cli.run_cmd import run
>>> result = CliRunner().invoke(run, ["Hi", "--tools", "/no/such/tools.py"])
>>> result.exit_code, result.output.strip()
(1, 'Error: tools file not found: /no/such/tools.py')

```
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from .common import (
    LiveDisplay,
    ModelSettings,
    describe_alm,
    load_alm,
    load_tools,
    make_console,
    model_options,
    result_json,
    stream_generation,
    summary_text,
    user_errors,
)

EPILOG = """\b
Examples:
  hf-asynclm run "What's the weather in Paris and in Oslo?"
  hf-asynclm run "Find a flight NYC to Rome on 2026-12-04 and a hotel there" --mode sync
  hf-asynclm run "Weather in Lima and Cairo?" --compare --timeline timeline.png
  hf-asynclm run "Weather in Lima?" --tools my_tools.py --model my-org/cml-gemma-270m --json > result.json
  hf-asynclm run "Weather in Lima?" --backend tgi --endpoint http://127.0.0.1:8080
  echo "What time is it in Tokyo?" | hf-asynclm run -
\b
--compare runs the same prompt with the same seed and tools in sync then async mode and
prints both wall times and the speedup; --emulate-tpot-ms 5 --emulate-ttft-ms 59 reproduce
the paper's decode speed on any machine (an emulation, labelled as such).
"""


@click.command("run", epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("prompt")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the result (AsyncResult.to_dict()) as JSON, and nothing else on stdout.")
@click.option(
    "--timeline",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE.png",
    help="Draw the timeline (decoding, each call's execution, interrupts, traps) to FILE.png (needs matplotlib).",
)
@click.option("--compare", is_flag=True, help="Run sync, then async (same prompt, seed and tools); show both times and the speedup.")
@click.option("--script", default=None, hidden=True, help="Test/demo aid: force the model to write this text (CML included), then stop.")
@click.pass_context
def run(ctx: click.Context, prompt: str, as_json: bool, timeline: Path | None, compare: bool, script: str | None, **options: Any) -> None:
    """Answer PROMPT with asynchronous function calling, streaming the text and the calls live.

    PROMPT "-" reads the prompt from stdin. By default the shipped cml-tiny checkpoint answers
    with the built-in demo tools (weather, flights, hotels, calendar ...).
    """
    settings = ModelSettings.pop_from(options)
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise click.UsageError("the prompt is empty")
    if compare and ctx.get_parameter_source("mode") is not ParameterSource.DEFAULT:
        raise click.UsageError("--compare runs sync and async; leave out --mode")
    if script is not None and settings.backend != "local":
        raise click.UsageError("--script drives a local model only")
    if timeline is not None and not timeline.parent.is_dir():
        raise click.UsageError(f"--timeline: folder {str(timeline.parent)!r} does not exist")

    tools = load_tools(settings.tools)
    alm = load_alm(settings, tools)
    console = make_console()
    modes = ["sync", "async"] if compare else [settings.mode]
    if not as_json:
        console.print(describe_alm(alm, settings), style="dim")

    results: dict[str, Any] = {}
    for mode in modes:
        if compare and not as_json:
            console.rule(mode, style="dim")
        display = None if as_json else LiveDisplay(console, mode=mode)
        extra: dict[str, Any] = {}
        if script is not None:
            from transformers import LogitsProcessorList

            from hf_asynclm.testing import ScriptedPolicy

            extra["logits_processor"] = LogitsProcessorList([ScriptedPolicy(alm.tokenizer, [script])])
        try:
            result = stream_generation(alm, prompt, settings, display, mode=mode, **extra)
        except KeyboardInterrupt:  # the generation was cancelled on the way out of stream_generation
            click.echo("\ncancelled", err=True)
            ctx.exit(130)
        if result is None:
            raise click.ClickException("the generation ended without a result")
        results[mode] = result
        if not as_json:
            console.print(summary_text(result), style="bold")

    speedup = None
    if compare:
        sync_s, async_s = results["sync"].stats.wall_s, results["async"].stats.wall_s
        speedup = sync_s / async_s if async_s > 0 else float("inf")
        if not as_json:
            _print_comparison(console, results, speedup)

    if timeline is not None:
        from hf_asynclm.timeline_plot import plot_timeline

        with user_errors(f"cannot draw the timeline to {timeline}"):
            try:
                plot_timeline(results, timeline)
            except ImportError as exc:
                raise click.ClickException(str(exc)) from None
        click.echo(f"timeline written to {timeline}", err=as_json)

    if as_json:
        if compare:
            payload: Any = {"sync": result_json(results["sync"]), "async": result_json(results["async"]), "speedup": speedup}
        else:
            payload = result_json(results[modes[0]])
        click.echo(json.dumps(payload, indent=2))


def _print_comparison(console: Any, results: dict[str, Any], speedup: float) -> None:
    from rich.table import Table

    table = Table(title="sync vs async (same prompt, seed and tools)", title_style="bold", box=None, pad_edge=False)
    for column in ("mode", "wall", "tokens", "forward passes", "calls", "waiting"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for mode, r in results.items():
        s = r.stats
        table.add_row(mode, f"{s.wall_s:.2f}s", str(s.generated_tokens), str(s.forward_passes), str(len(r.calls)), f"{s.trap_wait_s + s.sync_wait_s:.2f}s")
    console.print()
    console.print(table)
    console.print(f"speedup: {speedup:.2f}x (sync {results['sync'].stats.wall_s:.2f}s → async {results['async'].stats.wall_s:.2f}s)", style="bold")
