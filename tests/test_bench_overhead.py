"""bench overhead runs and reports its three sections (tiny sizes)."""

from __future__ import annotations

import math

from hf_asynclm.bench.latency import load_bench_model
from hf_asynclm.bench.overhead import OverheadConfig, run_overhead
from hf_asynclm.bench.report import overhead_markdown


def test_overhead_sections() -> None:
    cfg = OverheadConfig(new_tokens=6, reps=2, interrupt_tokens=(4, 16), context_tokens=24, calls=3, generations=1, threads=1, emulated_tpot_ms=1.0)
    report = run_overhead(cfg, load_bench_model("random"))
    text, intr, disp = report["text"], report["interrupt"], report["dispatch"]
    assert text["plain_tokens_per_s"] > 0 and text["asynclm_tokens_per_s"] > 0 and text["ratio"] > 0
    assert len(text["plain_s"]) == len(text["asynclm_s"]) == 2
    assert [r["k"] for r in intr["rows"]] == [4, 16] and intr["decode_step_ms"] > 0
    assert all(r["ride_along_ms"] > 0 and r["reenter_ms"] > 0 for r in intr["rows"])
    assert len(disp["rows"]) == 4 and all(r["n"] == 3 and not math.isnan(r["median_ms"]) and r["median_ms"] >= 0 for r in disp["rows"])
    md = overhead_markdown(report)
    for section in ("(a) Text without calls", "(b) Interrupt cost", "(c) Dispatch latency", "(d) Constrained calls"):
        assert section in md
    grammar = report["constrained"]
    assert grammar["rejected"] == 0 and grammar["grounded_rejected"] == 0  # every token of the valid demo calls is allowed
    assert grammar["grounded_inside_median_ms"] > 0 and '"grounded"' in md
    assert grammar["steps_inside"] > 10 and grammar["steps_outside"] > 3 and grammar["inside_median_ms"] > 0
    # complete_names' processor, timed over the same steps, refuses none of the text's tokens
    assert grammar["names_rejected"] == 0 and grammar["names_outside_median_ms"] > 0 and "`complete_names`" in md
    assert grammar["quoted_rejected"] == 0 and grammar["quoted_outside_median_ms"] > 0 and "`quote_numbers`" in md
