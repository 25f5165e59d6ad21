"""Benchmark outputs: JSON files, markdown tables, and the timeline picture of one task.

Example:

```python
>>> from hf_asynclm.bench.report import fmt_ratio
>>> fmt_ratio({"median": 1.62, "p10": 1.3, "p90": 2.05, "n": 10})
'1.62x [1.30, 2.05]'

```
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "write_json",
    "fmt_ratio",
    "latency_markdown",
    "latency_overview_markdown",
    "plot_timeline",
    "plot_timeline_detail",
    "timeline_results",
    "overhead_markdown",
    "accuracy_markdown",
]

_MODE_LABEL = {
    "sync": "sync (plain transformers loop)",
    "sync-cached": "sync-cached (hf-asynclm sync)",
    "sync-parallel": "sync-parallel (hf-asynclm)",
    "async": "async (hf-asynclm)",
}


def _clean(value: Any) -> Any:
    """NaN / inf become None (JSON has no NaN); floats keep 6 significant decimals (microseconds)."""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return None
        return round(value, 6)
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(data: Any, path: str | Path) -> Path:
    """Write ``data`` as indented JSON (NaN as null) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _clean(data)
    if isinstance(data, dict) and isinstance(data.get("tasks"), list):
        # everything but the per-task records indented; one line per task record (small files, readable diffs)
        head = {k: v for k, v in data.items() if k != "tasks"}
        body = json.dumps(head, indent=1, ensure_ascii=False)[:-2]
        tasks = ",\n  ".join(json.dumps(t, ensure_ascii=False) for t in data["tasks"])
        text = body + (',\n "tasks": [\n  ' + tasks + "\n ]\n}" if data["tasks"] else ',\n "tasks": []\n}')
    else:
        text = json.dumps(data, indent=1, ensure_ascii=False)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def _num(x: Any, fmt: str = "{:.3f}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return fmt.format(x)


def fmt_ratio(stats: Mapping[str, Any] | None) -> str:
    """``median x [p10, p90]`` of a speedup statistic."""
    if not stats or not stats.get("n"):
        return "n/a"
    return f"{stats['median']:.2f}x [{stats['p10']:.2f}, {stats['p90']:.2f}]"


def _paper_key(report: Mapping[str, Any]) -> str | None:
    workload = report["config"]["workload"]
    ttft = report["config"].get("ttft_ms")
    if workload == "bfcl-parallel" and ttft is not None:
        return "bfcl-parallel/cloud" if ttft >= 200 else "bfcl-parallel/local"
    if workload == "bfcl-multistep-parallel":
        return "bfcl-multistep-parallel"
    return None


def latency_markdown(report: Mapping[str, Any], title: str | None = None) -> str:
    """A markdown section for one latency report."""
    from .latency import PAPER_FIGURES, describe_left_out

    cfg = report["config"]
    s = report["summary"]
    modes = [m for m in ("sync", "sync-cached", "sync-parallel", "async") if m in s["modes"]]
    env = report.get("environment", {})
    lines = [
        f"### {title or cfg['workload']}: {cfg['policy']} policy, {report['condition']}",
        "",
        f"- model: {report['model']}" + ("; " + "; ".join(report.get("model_notes") or []) if report.get("model_notes") else "")
        + (f"; interrupts at {report['interrupt_at']} boundaries" if report.get("interrupt_at") else ""),
        f"- tasks: {s['n_tasks']} ({report['workload'].get('source', cfg['workload'])}; split {cfg['split']}, "
        f"split seed {cfg['split_seed']}; seed {cfg['seed']}); tool latency scale {cfg['latency_scale']:g}"
        + (f"; {describe_left_out(report['skipped_tasks'], cfg['max_new_tokens'] if cfg['policy'] == 'model' else 0)}"
           if report.get("skipped_tasks") else ""),
        f"- run: {env.get('date', '?')}, {env.get('cpu_count', '?')} CPU cores, torch threads {env.get('torch_threads', '?')}, "
        f"load average {_load(env)}",
        "",
        "| mode | latency median (s) | p10 - p90 (s) | ideal median (s) | efficiency median (min) | efficiency aggregate | strict efficiency | requests | decode step / forward (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in modes:
        ms = s["modes"][m]
        lat = ms["latency_s"]
        eff = ms["efficiency"]
        lines.append(
            f"| {_MODE_LABEL[m]} | {_num(lat['median'])} | {_num(lat['p10'])} - {_num(lat['p90'])} | {_num(ms['ideal_s']['median'])} "
            f"| {_num(eff['median'])} ({_num(eff['min'])}) | {_num(ms['efficiency_aggregate'])} | {_num(ms['efficiency_model']['median'])} "
            f"| {_num(ms['requests']['median'], '{:.0f}')} | {_num(ms['step_ms_median']['median'], '{:.2f}')} / {_num(ms['forward_ms_median']['median'], '{:.2f}')} |"
        )
    lines += [
        "",
        "Efficiency = ideal / measured, per task; the ideal is the mode's schedule simulated with the G (writing time of each "
        "call on the timeline), E (execution time) and time to first token measured in the same run and no system overhead. "
        "Strict efficiency counts only forward-pass time as model time (the per-token work of the decode loop becomes overhead).",
        "",
        "| speedup (median [p10, p90]) | measured | ideal (same run) |",
        "|---|---|---|",
    ]
    for key, st in s["speedups"].items():
        lines.append(f"| {key} | {fmt_ratio(st)} | {fmt_ratio(s['ideal_speedups'].get(key))} |")
    paper = _paper_key(report)
    if paper:
        p = PAPER_FIGURES[paper]
        ours = s["speedups"].get(f"async/{p['over']}")
        lines += [
            "",
            f"Paper (AsyncLM section 6): **{p['speedup']}x** async over {p['over']} ({p['conditions']}). "
            f"Ours: **{fmt_ratio(ours)}**.",
        ]
    c = s["calls"]
    lines += [
        "",
        f"Calls per task {_num(c['per_task']['mean'], '{:.1f}')}; tokens per call (CML block) median {_num(c['tokens_per_call']['median'], '{:.0f}')}; "
        f"G (writing time) median {_num(c['G_s']['median'])} s; E (execution) median {_num(c['E_s']['median'])} s.",
    ]
    proj = s.get("projection")
    if proj:
        sp = proj["speedups"]
        lines.append(
            f"Projection (latency model only, not measured): with calls of ~{_num(proj['tokens_per_call']['median'], '{:.0f}')} tokens "
            f"(len(body)/4 + 4, about what a large-vocabulary tokenizer writes) instead of ours, and the execution times measured here, "
            f"the ideal async speedups would be {fmt_ratio(sp.get('async/sync'))} over sync, {fmt_ratio(sp.get('async/sync-cached'))} over "
            f"sync-cached and {fmt_ratio(sp.get('async/sync-parallel'))} over sync-parallel."
        )
    work = [
        f"{m} {ms['calls_run']}/{ms['calls_due']}" + (f" ({ms['errors']} refused or failed)" if ms.get("errors") else "")
        for m, ms in s["modes"].items()
        if "calls_run" in ms
    ]
    if work:
        unrun = {m: ms.get("unrun_tokens", 0) for m, ms in s["modes"].items()}
        line = "Work done, calls run of the calls due: " + ", ".join(work) + "."
        if any(unrun.values()):
            line += (
                " Tokens written in blocks that started nothing (malformed, unfinished, refused; counted as model time in the ideal): "
                + ", ".join(f"{m} {n}" for m, n in unrun.items()) + "."
            )
        if len({ms["calls_run"] for ms in s["modes"].values() if "calls_run" in ms}) > 1:
            line += " The modes did not do the same work: compare latencies with that in mind."
        lines.append(line)
    if "async" in s["modes"]:
        a = s["modes"]["async"]
        lines.append(
            f"async: CML tokens per task (markers, ids, traps) median {_num(a['cml_tokens']['median'], '{:.0f}')}, "
            f"trap tokens {_num(a['trap_tokens']['median'], '{:.0f}')}, extra generated tokens vs sync "
            f"{_num(s.get('cml_extra_tokens_async_vs_sync', {}).get('median'), '{:.0f}')}; injected tokens {_num(a['injected_tokens']['median'], '{:.0f}')}; "
            f"dispatch ([END] sampled -> tool started) median {_num(a['dispatch_ms']['median'], '{:.2f}')} ms, max {_num(a['dispatch_ms']['max'], '{:.2f}')} ms "
            f"(first call of a generation {_num(a.get('dispatch_first_ms', {}).get('median'), '{:.2f}')} ms, later calls {_num(a.get('dispatch_later_ms', {}).get('median'), '{:.2f}')} ms); "
            f"decode step median {_num(a['step_ms_median']['median'], '{:.2f}')} ms of which forward {_num(a['forward_ms_median']['median'], '{:.2f}')} ms; "
            f"gap measured - ideal median {_num(a['gap_s']['median'] * 1e3 if a['gap_s']['median'] is not None else None, '{:.1f}')} ms; "
            f"tasks where the simulated ideal wrote the calls in another order than the run: {a.get('ideal_order_mismatches', 'n/a')}."
        )
    return "\n".join(lines) + "\n"


def _load(env: Mapping[str, Any]) -> str:
    a, b = env.get("loadavg_start"), env.get("loadavg_end")
    if not a:
        return "n/a"
    out = f"{a[0]:.1f} at start"
    if b:
        out += f", {b[0]:.1f} at end"
    return out


def report_model_name(report: Mapping[str, Any]) -> str:
    """The short model name of a latency report (reports written before ``model_name`` existed:
    the label's first word)."""
    name = report.get("model_name")
    if name:
        return str(name)
    label = str(report.get("model") or "")
    return "tiny-random" if label.startswith("tiny random") else label.split(" (")[0] or "unknown"


def latency_stem(report: Mapping[str, Any]) -> str:
    """File stem of a latency report: ``latency_<workload>_<policy>_<condition>``.

    With the model policy the model's name joins the policy (``model-cml-tiny``): the numbers
    are the model's, and two models' runs must not overwrite each other. So it does for the
    oracle policy under real decode (``oracle-random-llama-1b``), whose times are the model's
    decode times; under emulated decode the oracle's numbers do not depend on the model, and
    its stems carry none.
    """
    cfg = report["config"]
    tpot, ttft = cfg.get("tpot_ms"), cfg.get("ttft_ms")
    condition = "real" if tpot is None else f"emu{tpot:g}ms-ttft{ttft:g}ms"
    policy = cfg["policy"]
    if policy == "model" or tpot is None:
        policy = f"{policy}-{report_model_name(report)}"
    return f"latency_{cfg['workload']}_{policy}_{condition}"


def latency_overview_markdown(reports: Sequence[Mapping[str, Any]]) -> str:
    """One table over several latency reports (workload x condition), with the paper's figures."""
    from .latency import PAPER_FIGURES

    lines = [
        "| workload | policy | model | condition | n | async / sync | async / sync max | async / sync-cached | async / sync-parallel | sync-parallel / sync | async efficiency median (min) | paper (async / sync) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        cfg, s = r["config"], r["summary"]
        sp = s["speedups"]
        a = s["modes"].get("async", {})
        eff = a.get("efficiency", {})
        paper = _paper_key(r)
        pfig = f"{PAPER_FIGURES[paper]['speedup']}x" if paper else "-"
        if paper == "bfcl-multistep-parallel":
            pfig = f"up to {PAPER_FIGURES[paper]['speedup']}x"
        lines.append(
            f"| {cfg['workload']} | {cfg['policy']} | {report_model_name(r)} | {r['condition']} | {s['n_tasks']} | {fmt_ratio(sp.get('async/sync'))} "
            f"| {_num((sp.get('async/sync') or {}).get('max'), '{:.2f}x')} "
            f"| {fmt_ratio(sp.get('async/sync-cached'))} | {fmt_ratio(sp.get('async/sync-parallel'))} | {fmt_ratio(sp.get('sync-parallel/sync'))} "
            f"| {_num(eff.get('median'))} ({_num(eff.get('min'))}) | {pfig} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Timeline picture
# ---------------------------------------------------------------------------------------------

# call colours avoid the grey / red / green of prefill, traps and text
_CALL_COLORS = ("#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#393b79", "#ad494a", "#637939", "#7b4173", "#3182bd")
_KIND_COLOR = {"prefill": "#9e9e9e", "text": "#4caf50", "eos": "#4caf50", "trap": "#e53935", "malformed": "#000000", "open": "#000000"}


def timeline_results(task_row: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """One task's runs in the ``AsyncResult.to_dict()`` shape :mod:`hf_asynclm.timeline_plot` draws, by mode label."""
    out: dict[str, dict[str, Any]] = {}
    for m in ("sync", "sync-cached", "sync-parallel", "async"):
        if m not in task_row["modes"]:
            continue
        tl = task_row["modes"][m]["timeline"]
        events: list[dict[str, Any]] = []
        for s, e, kind in tl["waits"]:
            if kind.startswith("trap"):
                reason = kind.split(":", 1)[1] if ":" in kind else "trap"
                events.append({"kind": "trap", "time": s, "data": {"reason": reason}})
                events.append({"kind": "resume", "time": e, "data": {"waited_s": e - s}})
        for t, cid, err in tl.get("injections", []):
            events.append({"kind": "interrupt", "time": t, "call_id": cid, "data": {"is_error": err}})
        events.append({"kind": "done", "time": tl["total"], "data": {}})
        calls = [
            {"call_id": c["call_id"], "name": c["name"], "status": c["status"], "submitted_at": c["submitted"] if c["submitted"] is not None else c["started"],
             "started_at": c["started"], "finished_at": c["finished"]}
            for c in tl["calls"]
        ]
        # the plain loop and hf-asynclm's sync mode both block on each call: drawn as sync waits
        out[_MODE_LABEL[m]] = {"mode": "sync" if m in ("sync", "sync-cached") else m, "stats": {"wall_s": tl["total"]}, "timeline": events, "calls": calls}
    return out


def plot_timeline(task_row: Mapping[str, Any], path: str | Path, title: str | None = None) -> Path:
    """The timeline PNG of one task, one row per mode, drawn by :func:`hf_asynclm.timeline_plot.plot_timeline`.

    Falls back to :func:`plot_timeline_detail` when that module is not available.
    """
    try:
        from ..timeline_plot import plot_timeline as _plot
    except ImportError:
        return plot_timeline_detail(task_row, path, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _plot(timeline_results(task_row), path, title=title)


def plot_timeline_detail(task_row: Mapping[str, Any], path: str | Path, title: str | None = None) -> Path:
    """One task's runs in detail, one row per mode: what the model was writing at each moment
    (time to first token of each request, each call's tokens in the call's colour, trap
    tokens, answer), when decoding was paused, and each call's execution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    modes = [m for m in ("sync", "sync-cached", "sync-parallel", "async") if m in task_row["modes"]]
    call_ids: list[str] = []
    for m in modes:
        for c in task_row["modes"][m]["timeline"]["calls"]:
            if c["call_id"] not in call_ids:
                call_ids.append(c["call_id"])
    color = {cid: _CALL_COLORS[i % len(_CALL_COLORS)] for i, cid in enumerate(call_ids)}
    lane_h = 0.8
    rows_per_mode = 1 + len(call_ids)
    fig_h = 1.0 + 0.28 * rows_per_mode * len(modes)
    fig, ax = plt.subplots(figsize=(12, max(3.0, fig_h)))
    yticks, ylabels = [], []
    y = 0.0
    t_max = 0.0
    for m in reversed(modes):
        tl = task_row["modes"][m]["timeline"]
        t_max = max(t_max, tl["total"])
        # call lanes
        for j, cid in enumerate(reversed(call_ids)):
            for c in tl["calls"]:
                if c["call_id"] == cid:
                    ax.broken_barh([(c["started"], c["finished"] - c["started"])], (y, lane_h), facecolors=[color[cid]], alpha=0.55, edgecolor="none")
            yticks.append(y + lane_h / 2)
            ylabels.append(f"  run {cid}")
            y += 1
        # decode lane
        for s, e, kind in tl["waits"]:
            ax.broken_barh([(s, e - s)], (y, lane_h), facecolors="white", edgecolor="#bdbdbd", hatch="///", linewidth=0.5)
        for start, end, kind, label in tl["segments"]:
            if end <= start:
                continue
            if kind == "call":
                fc = color.get(label, "#1e88e5") if label else "#1e88e5"
            else:
                fc = _KIND_COLOR.get(kind, "#4caf50")
            ax.broken_barh([(start, end - start)], (y, lane_h), facecolors=[fc], edgecolor="none")
        ax.plot([tl["total"], tl["total"]], [y - len(call_ids), y + lane_h], color="black", linewidth=1)
        ax.text(tl["total"], y + lane_h / 2, f" {tl['total'] * 1e3:.0f} ms", va="center", fontsize=8)
        yticks.append(y + lane_h / 2)
        ylabels.append(f"{m}: decode")
        y += 1.6
    ax.set_yticks(yticks)
    ax.set_yticklabels(ylabels, fontsize=8)
    ax.set_xlim(0, t_max * 1.12)
    ax.set_xlabel("time since the request (s)")
    ax.set_title(title or f"task {task_row['task_id']}", fontsize=10)
    handles = [
        Patch(facecolor="#9e9e9e", label="time to first token (request)"),
        Patch(facecolor="#1e88e5", label="writing a call (colour = call)"),
        Patch(facecolor="#e53935", label="[TRAP] tokens"),
        Patch(facecolor="#4caf50", label="answer text"),
        Patch(facecolor="white", edgecolor="#bdbdbd", hatch="///", label="decoding paused (waiting)"),
    ]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=5, fontsize=7, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Overhead and accuracy
# ---------------------------------------------------------------------------------------------


def overhead_markdown(report: Mapping[str, Any]) -> str:
    """Markdown of a ``bench overhead`` report (its sections)."""
    env = report.get("environment", {})
    a, b, c = report["text"], report["interrupt"], report["dispatch"]
    lines = [
        f"### Runtime overhead ({report['model']})",
        "",
        f"- run: {env.get('date', '?')}, {env.get('cpu_count', '?')} CPU cores, torch threads {env.get('torch_threads', '?')}, load average {_load(env)}",
        "",
        f"**(a) Text without calls** ({a['new_tokens']} new tokens, greedy, {a['reps']} interleaved repetitions, prompt {a['prompt_tokens']} tokens):",
        "",
        "| loop | tokens/s median | per token (ms) |",
        "|---|---|---|",
        f"| plain `model.generate` | {a['plain_tokens_per_s']:.1f} | {1e3 / a['plain_tokens_per_s']:.3f} |",
        f"| hf-asynclm loop (`custom_generate`) | {a['asynclm_tokens_per_s']:.1f} | {1e3 / a['asynclm_tokens_per_s']:.3f} |",
        "",
        f"Ratio hf-asynclm / plain: **{a['ratio']:.3f}** (median of per-repetition ratios {a['ratio_median_of_pairs']:.3f}; target >= 0.97: "
        f"{'met' if a['ratio'] >= 0.97 else 'NOT met'}).",
        "",
        f"**(b) Interrupt cost** (context {b['context_tokens']} tokens, {b['reps']} repetitions, medians; one decode step = {b['decode_step_ms']:.3f} ms):",
        "",
        "| interrupt tokens | ride-along step (ms) | added by riding along (ms) | added / decode step | stop + re-enter `generate` with the cache (ms) | added (ms) | added / decode step | tokenising the interrupt (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in b["rows"]:
        lines.append(
            f"| {row['k']} | {row['ride_along_ms']:.3f} | {row['ride_along_added_ms']:.3f} | {row['ride_along_rel']:.2f} "
            f"| {row['reenter_ms']:.3f} | {row['reenter_added_ms']:.3f} | {row['reenter_rel']:.2f} | {row['tokenize_ms']:.3f} |"
        )
    lines += [
        "",
        f"**(c) Dispatch latency** ([END] sampled -> tool function starts; {c['n_calls']} calls in {c['generations']} generations, tools are no-ops):",
        "",
        "| tool kind | decoding | median (ms) | p99 (ms) | max (ms) | first call of a generation, median (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for row in c["rows"]:
        lines.append(
            f"| {row['tool']} | {row['decode']} | {row['median_ms']:.3f} | {row['p99_ms']:.3f} | {row['max_ms']:.3f} | {_num(row.get('first_median_ms'), '{:.3f}')} |"
        )
    lines += ["", f"Target: median under 1 ms: {c['verdict']}."]
    d = report.get("constrained")
    if d:
        step = b["decode_step_ms"]
        lines += [
            "",
            f"**(d) Constrained calls** (`constrain_calls=\"schema\"`: the logits processor per step, on the model's own logits "
            f"over two calls of the demo tools after a {d['prompt_tokens']}-token prompt; {d['reps']} passes, medians):",
            "",
            "| where | steps per pass | processor (ms) | / decode step ({:.3f} ms) |".format(step),
            "|---|---|---|---|",
            f"| inside call blocks | {d['steps_inside']} | {d['inside_median_ms']:.3f} (p99 {d['inside_p99_ms']:.3f}) | {d['inside_median_ms'] / step:.2f} |",
            f"| outside blocks | {d['steps_outside']} | {d['outside_median_ms']:.3f} | {d['outside_median_ms'] / step:.2f} |",
        ]
        if "grounded_inside_median_ms" in d:
            lines.append(
                f"| inside call blocks, `\"grounded\"` | {d['steps_inside']} | {d['grounded_inside_median_ms']:.3f} "
                f"(p99 {d['grounded_inside_p99_ms']:.3f}) | {d['grounded_inside_median_ms'] / step:.2f} |"
            )
        if "names_outside_median_ms" in d:
            lines += [
                f"| outside blocks, `complete_names` (its own processor) | {d['steps_outside']} | {d['names_outside_median_ms']:.3f} "
                f"(p99 {d['names_outside_p99_ms']:.3f}) | {d['names_outside_median_ms'] / step:.2f} |",
                f"| inside call blocks, `complete_names` | {d['steps_inside']} | {d['names_inside_median_ms']:.3f} | "
                f"{d['names_inside_median_ms'] / step:.2f} |",
            ]
        if "quoted_outside_median_ms" in d:
            lines.append(
                f"| outside blocks, `complete_names` and `quote_numbers` | {d['steps_outside']} | "
                f"{d['quoted_outside_median_ms']:.3f} (p99 {d['quoted_outside_p99_ms']:.3f}) | "
                f"{d['quoted_outside_median_ms'] / step:.2f} |"
            )
        refused = [f"Tokens of those valid calls the processor refused: {d['rejected']} (must be 0)"]
        for key, what in (("grounded_rejected", 'with `"grounded"`'), ("names_rejected", "tokens `complete_names` refused"),
                          ("quoted_rejected", "with `quote_numbers` too")):
            if key in d:
                refused.append(f"{what}: {d[key]} (must be 0)")
        lines += ["", "; ".join(refused) + "."]
    elif "constrained" in report:
        lines += ["", "**(d) Constrained calls**: not measured (the CML markers are not single tokens in this tokenizer)."]
    return "\n".join(lines) + "\n"


def accuracy_markdown(report: Mapping[str, Any]) -> str:
    """Markdown of a ``bench accuracy`` report."""
    cfg = report["config"]
    lines = [
        f"### BFCL AST accuracy ({report['model']})",
        "",
        f"- {report['environment'].get('date', '?')}; {cfg['n']} tasks per category (split {cfg['split']}), cheat sheet "
        f"{'in the prompt' if cfg['cheat_sheet'] else 'not given'}; greedy, max {cfg['max_new_tokens']} new tokens",
        "",
        "| category | mode | n | AST accuracy | valid CML blocks | tasks with all blocks valid | calls per task |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['category']} | {row['mode']} | {row['n']} | {_num(row['accuracy'])} | {_num(row['valid_block_rate'])} "
            f"| {_num(row['valid_task_rate'])} | {_num(row['calls_per_task'], '{:.2f}')} |"
        )
    skipped = report.get("skipped_tasks") or []
    if skipped:
        by_cat: dict[str, list[int]] = {}
        for x in skipped:
            by_cat.setdefault(x["category"], []).append(x["prompt_tokens"])
        lines += ["", "Left out (prompt plus the generation budget beyond the model's context of "
                  f"{skipped[0]['context']} positions; a model writes noise there): "
                  + ", ".join(f"{c} {len(v)} task(s), prompts {min(v)}-{max(v)} tokens" for c, v in by_cat.items()) + "."]
    return "\n".join(lines) + "\n"
