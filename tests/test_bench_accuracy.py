"""bench accuracy: AST matching of the calls a (here scripted) model writes, and the rate of valid CML."""

from __future__ import annotations

import pytest

from hf_asynclm.bench.accuracy import AccuracyConfig, load_category_tasks, run_accuracy
from hf_asynclm.bench.latency import load_bench_model
from hf_asynclm.bench.oracle import OraclePolicy
from hf_asynclm.bench.report import accuracy_markdown
from hf_asynclm.cml import format_call
from hf_asynclm.data.tasks import PlannedCall
from hf_asynclm.testing import ScriptedPolicy

MINI = "tests/data/bfcl_mini"


@pytest.fixture(scope="module")
def bm():
    return load_bench_model("random")


def test_oracle_scores_perfectly_in_both_modes(bm) -> None:
    cfg = AccuracyConfig(categories=("parallel", "multistep_parallel"), n=1, latency_scale=0.02, data_dir=MINI, split="all", threads=1)
    oracle = lambda task, mode, tools: OraclePolicy(bm.tokenizer, task, mode, tools.planned_latencies())  # noqa: E731
    report = run_accuracy(cfg, bm, policy=oracle)
    assert {(r["category"], r["mode"]) for r in report["rows"]} == {(c, m) for c in cfg.categories for m in ("sync", "async")}
    for r in report["rows"]:
        assert r["accuracy"] == 1.0 and r["valid_block_rate"] == 1.0 and r["valid_task_rate"] == 1.0, r
    assert "| parallel | async | 1 | 1.000 |" in accuracy_markdown(report)


def test_near_misses_and_broken_blocks_are_scored(bm) -> None:
    task = load_category_tasks("parallel", 1, data_dir=MINI, split="all")[0]
    c1, c2 = task.calls[0], task.calls[1]
    key, value = next(iter(c2.arguments.items()))
    args = dict(c2.arguments)
    args[key] = value + 1000 if isinstance(value, int) else "Nowhere"  # right type, wrong value
    wrong = PlannedCall("c2", c2.name, args).body()
    scripts = {
        # right first call, a wrong value in the second: a near miss
        "near": [format_call(c1.body(), "c1"), format_call(wrong, "c2"), " [TRAP] [END]", " done"],
        # an unknown function and a block with two [HEAD]s
        "broken": [format_call("no_such_tool(x=1)", "c1"), " [CALL] c2 [HEAD] a [HEAD] b [END]", " done"],
    }
    for name, script in scripts.items():
        cfg = AccuracyConfig(categories=("parallel",), n=1, modes=("async",), latency_scale=0.02, data_dir=MINI, split="all", threads=1)
        report = run_accuracy(cfg, bm, policy=lambda task, mode, tools, s=script: ScriptedPolicy(bm.tokenizer, s), tasks={"parallel": [task]})
        row = report["rows"][0]
        assert row["accuracy"] == 0.0
        if name == "near":
            assert row["valid_block_rate"] == 1.0  # well-formed CML, valid calls: just the wrong value
            assert report["tasks"][0]["error_type"] in ("cannot_find_match", "value_error")
        else:
            assert row["valid_block_rate"] == 0.0 and row["valid_task_rate"] == 0.0


def test_config_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown modes"):
        AccuracyConfig(modes=("sync-cached",))
    with pytest.raises(ValueError, match="category"):
        AccuracyConfig(categories=())


def test_tasks_beyond_the_models_context_are_left_out_and_said() -> None:
    small = load_bench_model("random")  # its own copy: the context is changed below
    cfg = AccuracyConfig(categories=("parallel", "multistep_parallel"), n=1, latency_scale=0.02, data_dir=MINI, split="all",
                         threads=1, max_new_tokens=4, modes=("sync",), cheat_sheet=True)
    # the multi-step prompt (three joined samples and their cheat sheet, ~690 tokens) is the longer one
    small.model.config.max_position_embeddings = 600
    report = run_accuracy(cfg, small)
    assert [x["category"] for x in report["skipped_tasks"]] == ["multistep_parallel"]
    assert report["skipped_tasks"][0]["prompt_tokens"] + 4 > 600
    assert [r["category"] for r in report["rows"]] == ["parallel"]
    md = accuracy_markdown(report)
    assert "Left out" in md and "context of 600 positions" in md and "multistep_parallel 1 task(s)" in md
