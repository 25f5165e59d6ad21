"""Timeline pictures of generations: when the model decoded, when each call ran, what went in when.

:func:`plot_timeline` draws one row per generation (typically one per mode: ``sync``,
``sync-parallel``, ``async``) on a common time axis that starts at each generation's start:

* the **decode** lane: bars where the model was generating, gaps where it was paused
  (shaded: trap waits; grey: synchronous waits for a call);
* the **call** lanes below it: one bar per call, from the moment its tool started to the
  moment it returned (red: failed or timed out, grey: cancelled), labelled with the call id
  and tool name;
* markers on the decode lane: ``▼`` an interrupt injected (green: a person's message, red: an
  error), ``|`` a trap.

It accepts :class:`~hf_asynclm.asynclm.AsyncResult` objects or their ``to_dict()`` form (what
``hf-asynclm run --json`` prints and benchmarks store), so saved runs can be drawn later.
Needs matplotlib (``pip install 'hf-asynclm[bench]'``); it uses the Agg canvas directly and
never touches pyplot's global state.

Example:

```python
>>> import tempfile, pathlib
>>> from hf_asynclm.timeline_plot import plot_timeline, timeline_rows
>>> run = {"mode": "async", "stats": {"wall_s": 1.0}, "timeline": [
...     {"kind": "trap", "time": 10.4, "data": {}}, {"kind": "resume", "time": 10.6, "data": {"waited_s": 0.2}},
...     {"kind": "interrupt", "time": 10.6, "call_id": "w1", "data": {"is_error": False}},
...     {"kind": "done", "time": 11.0, "data": {}}],
...     "calls": [{"call_id": "w1", "name": "get_weather", "status": "done",
...                "submitted_at": 10.1, "started_at": 10.1, "finished_at": 10.5}]}
>>> row = timeline_rows([run])[0]
>>> [(round(a, 2), round(b, 2)) for a, b in row.decode]
[(0.0, 0.4), (0.6, 1.0)]
>>> with tempfile.TemporaryDirectory() as d:
...     path = plot_timeline({"async": run}, pathlib.Path(d) / "t.png")
...     path.stat().st_size > 1000
True

```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["CallSpan", "TimelineRow", "plot_timeline", "timeline_rows"]

_DECODE = "#4C72B0"
_CALL = "#DD8452"
_CALL_ERROR = "#C44E52"
_CALL_CANCELLED = "#AAAAAA"
_TRAP = "#F2B5B5"
_SYNC_WAIT = "#DDDDDD"
_INTR = "#222222"
_USER = "#2CA02C"


@dataclass
class CallSpan:
    """One call on the time axis (seconds from the generation's start)."""

    call_id: str | None
    name: str | None
    start: float
    end: float
    status: str
    lane: int = 0


@dataclass
class TimelineRow:
    """What one generation looks like on the time axis (seconds from its start)."""

    label: str
    end: float
    decode: list[tuple[float, float]] = field(default_factory=list)
    trap_waits: list[tuple[float, float]] = field(default_factory=list)
    sync_waits: list[tuple[float, float]] = field(default_factory=list)
    calls: list[CallSpan] = field(default_factory=list)
    interrupts: list[tuple[float, str, bool]] = field(default_factory=list)  # time, call id, is_error
    traps: list[float] = field(default_factory=list)

    @property
    def lanes(self) -> int:
        return 1 + max((c.lane for c in self.calls), default=-1)


def _as_dict(result: Any) -> dict[str, Any]:
    if isinstance(result, Mapping):
        return dict(result)
    if hasattr(result, "to_dict"):
        return result.to_dict()
    raise TypeError(f"cannot draw a {type(result).__name__}: pass an AsyncResult or its to_dict()")


def _merge(spans: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(s for s in spans if s[1] > s[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _subtract(whole: tuple[float, float], holes: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out, cursor = [], whole[0]
    for a, b in holes:
        if a > cursor:
            out.append((cursor, min(a, whole[1])))
        cursor = max(cursor, b)
    if cursor < whole[1]:
        out.append((cursor, whole[1]))
    return [s for s in out if s[1] > s[0]]


def _row(label: str, data: dict[str, Any]) -> TimelineRow:
    events = sorted(data.get("timeline") or [], key=lambda e: e.get("time", 0.0))
    calls = data.get("calls") or []
    wall = float((data.get("stats") or {}).get("wall_s") or 0.0)
    times = [e["time"] for e in events] + [c[k] for c in calls for k in ("submitted_at", "finished_at") if c.get(k)]
    done = [e["time"] for e in events if e.get("kind") == "done"]
    end_abs = done[-1] if done else (max(times) if times else wall)
    t0 = end_abs - wall if wall > 0 else (min(times) if times else 0.0)
    end = end_abs - t0
    row = TimelineRow(label=label, end=end)

    open_trap: float | None = None
    for e in events:
        t = e["time"] - t0
        kind = e.get("kind")
        if kind == "trap":
            open_trap = t
            if (e.get("data") or {}).get("reason", "trap") == "trap":
                row.traps.append(t)
        elif kind == "resume" and open_trap is not None:
            row.trap_waits.append((open_trap, t))
            open_trap = None
        elif kind == "interrupt":
            row.interrupts.append((t, e.get("call_id") or "", bool((e.get("data") or {}).get("is_error"))))
    if open_trap is not None:
        row.trap_waits.append((open_trap, end))

    lane_ends: list[float] = []
    for c in sorted(calls, key=lambda c: c.get("started_at") or c.get("submitted_at") or 0.0):
        begin = c.get("started_at") or c.get("submitted_at")
        if begin is None:
            continue
        start = begin - t0
        stop = (c["finished_at"] - t0) if c.get("finished_at") else end
        lane = next((i for i, free_at in enumerate(lane_ends) if free_at <= start), len(lane_ends))
        if lane == len(lane_ends):
            lane_ends.append(stop)
        else:
            lane_ends[lane] = stop
        row.calls.append(CallSpan(c.get("call_id"), c.get("name"), start, max(stop, start), str(c.get("status")), lane))
        if data.get("mode") == "sync" and c.get("submitted_at") and c.get("finished_at"):
            row.sync_waits.append((c["submitted_at"] - t0, c["finished_at"] - t0))

    row.trap_waits = _merge(row.trap_waits)
    row.sync_waits = _merge(row.sync_waits)
    row.decode = _subtract((0.0, end), _merge(row.trap_waits + row.sync_waits))
    return row


def timeline_rows(results: Any, labels: Sequence[str] | None = None) -> list[TimelineRow]:
    """The rows :func:`plot_timeline` draws, for ``results`` (see there)."""
    if isinstance(results, Mapping) and "timeline" not in results:
        items = [(str(k), _as_dict(v)) for k, v in results.items()]
    else:
        seq = [results] if isinstance(results, Mapping) or hasattr(results, "to_dict") else list(results)
        dicts = [_as_dict(r) for r in seq]
        items = [(str(d.get("mode") or f"run {i + 1}"), d) for i, d in enumerate(dicts)]
    if labels is not None:
        if len(labels) != len(items):
            raise ValueError(f"{len(labels)} labels for {len(items)} results")
        items = [(label, d) for label, (_, d) in zip(labels, items)]
    return [_row(label, d) for label, d in items]


def plot_timeline(
    results: Any,
    path: str | Path,
    *,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Draw ``results`` as a timeline PNG (or any format matplotlib knows, by suffix).

    Args:
        results: one result, a list of results, or a ``{label: result}`` mapping; each an
            :class:`~hf_asynclm.asynclm.AsyncResult` or its ``to_dict()``.
        path: file to write.
        labels: row labels (default: each result's mode, or the mapping's keys).
        title: figure title (default: the wall time of each row).
        dpi: resolution.

    Returns:
        The path written.
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("timeline plots need matplotlib: pip install 'hf-asynclm[bench]'") from exc

    rows = timeline_rows(results, labels)
    if not rows:
        raise ValueError("nothing to draw: no results given")
    lane_h, gap = 0.8, 0.7
    heights = [1 + r.lanes for r in rows]
    total = sum(heights) * lane_h + gap * (len(rows) - 1)
    x_end = max(r.end for r in rows) or 1.0

    fig = Figure(figsize=(11, 1.2 + 0.42 * total), dpi=dpi)
    ax = fig.add_subplot(1, 1, 1)
    yticks, ylabels = [], []
    y = 0.0
    for row, n in zip(rows, heights):
        decode_y = y
        ax.broken_barh([(a, b - a) for a, b in row.decode], (decode_y - 0.3, 0.6), facecolors=_DECODE)
        ax.broken_barh([(a, b - a) for a, b in row.trap_waits], (decode_y - 0.3, 0.6), facecolors=_TRAP, hatch="//", edgecolor="#C44E52", linewidth=0)
        ax.broken_barh([(a, b - a) for a, b in row.sync_waits], (decode_y - 0.3, 0.6), facecolors=_SYNC_WAIT)
        for t in row.traps:
            ax.plot([t, t], [decode_y - 0.38, decode_y + 0.38], color="#C44E52", linewidth=1.5)
        for t, cid, is_error in row.interrupts:
            color = _CALL_ERROR if is_error else _USER if cid == "user" else _INTR
            ax.plot([t], [decode_y - 0.42], marker="v", color=color, markersize=7, linestyle="none")
        yticks.append(decode_y)
        ylabels.append(f"{row.label} · decode")
        for call in row.calls:
            cy = y + (1 + call.lane) * lane_h
            color = _CALL if call.status == "done" else _CALL_CANCELLED if call.status == "cancelled" else _CALL_ERROR
            width = max(call.end - call.start, x_end / 400)
            ax.broken_barh([(call.start, width)], (cy - 0.25, 0.5), facecolors=color)
            label = " ".join(p for p in (call.call_id, call.name) if p)
            ax.text(call.start + width + x_end / 200, cy, label, va="center", fontsize=7)
        for lane in range(row.lanes):
            yticks.append(y + (1 + lane) * lane_h)
            ylabels.append("calls" if lane == 0 else "")
        ax.text(row.end, decode_y - 0.45, f" {row.end:.2f}s", va="bottom", fontsize=8, color="#444444")
        y += n * lane_h + gap

    ax.set_yticks(yticks)
    ax.set_yticklabels(ylabels, fontsize=8)
    ax.set_ylim(y - gap + 0.2, -0.9)  # first row at the top
    ax.set_xlim(0, x_end * 1.12)
    ax.set_xlabel("time since the start of the generation (s)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title or "  ·  ".join(f"{r.label}: {r.end:.2f}s" for r in rows), fontsize=10)
    legend = [
        Patch(facecolor=_DECODE, label="decoding"),
        Patch(facecolor=_TRAP, hatch="//", edgecolor="#C44E52", label="trap wait"),
        Patch(facecolor=_SYNC_WAIT, label="sync wait"),
        Patch(facecolor=_CALL, label="call running"),
        Patch(facecolor=_CALL_ERROR, label="call failed"),
        Line2D([], [], marker="v", color=_INTR, linestyle="none", label="result injected"),
        Line2D([], [], marker="v", color=_USER, linestyle="none", label="user interrupt"),
        Line2D([], [], color="#C44E52", label="trap"),
    ]
    ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.18 - 0.6 / max(total, 1)), ncol=4, fontsize=7, frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    return path
