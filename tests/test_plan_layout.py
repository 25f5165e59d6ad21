"""The layout of cheat-sheet plans (``call-first``: ``c1 f(a=1) ~300ms``; ``time-first``: ``~300ms c1 f(a=1)``):
written by ``with_cheat_sheet``, the drills and ``data build``, recorded by ``train``, read back by
``AsyncLM``, ``eval`` and ``bench`` so that a model always sees plans the way it was trained."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from click.testing import CliRunner

from hf_asynclm import AsyncLM
from hf_asynclm.data.bfcl import PLAN_LAYOUTS, check_plan_layout, with_cheat_sheet
from hf_asynclm.data.drills import PLAN_KINDS, DrillOptions, copy_drills, plan_tasks
from hf_asynclm.data.tasks import PlannedCall, Task

CALL_FIRST = re.compile(r"(c\d+) (.+?) ~(\d+)ms(?: after ([c\d, ]+))?$")
TIME_FIRST = re.compile(r"~(\d+)ms (c\d+) (.+?)(?: after ([c\d, ]+))?$")


def _entries(text: str, layout: str) -> list[tuple[str, str, int, str | None]]:
    """(id, body, ms, after) of each plan entry, parsed in ``layout``."""
    plan = text.rsplit("\nPlan: ", 1)[1] if "\nPlan: " in text else text.split("Plan: ", 1)[1]
    out = []
    for part in plan.split("; "):
        if layout == "call-first":
            cid, body, ms, after = CALL_FIRST.match(part).groups()
        else:
            ms, cid, body, after = TIME_FIRST.match(part).groups()
        out.append((cid, body, int(ms), after))
    return out


def _task() -> Task:
    calls = [PlannedCall("c1", "get_weather", {"city": "Paris - Lyon", "days": 3}),
             PlannedCall("c2", "book", {"when": "~5ms"}, depends_on=["c1"]),
             PlannedCall("c3", "ping", {})]
    return Task("t", "demo", "parallel", [{"role": "user", "content": "Plan my trip."}], [], calls)


def test_both_layouts_write_the_same_entries_and_time_first_puts_the_time_before_the_id():
    lat = {"c1": 420, "c2": 95, "c3": 7}
    original = _task()
    a = with_cheat_sheet(original, lat)
    b = with_cheat_sheet(original, lat, layout="time-first")
    assert a.messages[-1]["content"].endswith(
        'Plan: c1 get_weather(city="Paris - Lyon", days=3) ~420ms; c2 book(when="~5ms") ~95ms after c1; c3 ping() ~7ms')
    assert b.messages[-1]["content"] == (
        'Plan my trip.\nPlan: ~420ms c1 get_weather(city="Paris - Lyon", days=3); ~95ms c2 book(when="~5ms") after c1; '
        "~7ms c3 ping()")
    # every call once, with its time and dependencies, whatever the layout; the task itself is untouched
    for t in (a, b):
        assert [c.latency_s for c in t.calls] == [0.42, 0.095, 0.007]
    assert original == _task()
    assert b.meta == {"cheat_sheet": True, "plan_layout": "time-first"} and a.meta == {"cheat_sheet": True}
    # a plan without times (no latency known) reads the same in both layouts
    assert with_cheat_sheet(_task(), layout="time-first").messages == with_cheat_sheet(_task()).messages


def test_unknown_layouts_are_refused_everywhere_with_the_choices(tmp_path):
    from hf_asynclm.training.train import TrainConfig

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(copy_drills(1, kinds=["plan"])[0]) + "\n")
    assert PLAN_LAYOUTS == ("call-first", "time-first") and check_plan_layout("call-first") == "call-first"
    for make in (lambda: with_cheat_sheet(_task(), layout="time"), lambda: DrillOptions(plan_layout="time"),
                 lambda: copy_drills(2, kinds=["plan"], plan_layout="time"), lambda: plan_tasks(2, layout="time"),
                 lambda: TrainConfig(data=str(data), plan_layout="time").validate()):
        with pytest.raises(ValueError, match="unknown plan layout 'time': use call-first or time-first"):
            make()
    with pytest.raises(ValueError, match="none of them is in"):
        copy_drills(2, kinds=["echo", "pick"], plan_layout="time-first")


def test_time_first_drills_differ_from_the_default_ones_only_in_the_plan():
    kinds = list(PLAN_KINDS)
    default = copy_drills(90, seed=5, kinds=kinds)
    assert default == copy_drills(90, seed=5, kinds=kinds, plan_layout="call-first")  # the default is unchanged
    timed = copy_drills(90, seed=5, kinds=kinds, plan_layout="time-first")
    for a, b in zip(default, timed):
        assert a["segments"] == b["segments"] and a["tools"] == b["tools"] and a["category"] == b["category"]
        assert b["meta"] == {**a["meta"], "plan_layout": "time-first"}
        ask_a, ask_b = a["messages"][0]["content"], b["messages"][0]["content"]
        assert ask_a.split("\nPlan: ")[0] == ask_b.split("\nPlan: ")[0]
        assert _entries(ask_a, "call-first") == _entries(ask_b, "time-first")
    # the other kinds hold no plan: the option leaves them alone
    mixed = copy_drills(12, seed=1, kinds=["echo", "plan", "result"], plan_layout="time-first")
    plain = copy_drills(12, seed=1, kinds=["echo", "plan", "result"])
    assert [d for d in mixed if d["category"] != "plan"] == [
        {**d, "meta": {**d["meta"], "plan_layout": "time-first"}} for d in plain if d["category"] != "plan"]


def test_held_out_plan_tasks_in_either_layout_are_the_same_tasks():
    for arguments in (True, False):
        a = plan_tasks(20, seed=4, arguments=arguments)
        b = plan_tasks(20, seed=4, arguments=arguments, layout="time-first")
        assert [t.calls for t in a] == [t.calls for t in b] and [t.tools for t in a] == [t.tools for t in b]
        for ta, tb in zip(a, b):
            assert _entries(ta.messages[-1]["content"], "call-first") == _entries(tb.messages[-1]["content"], "time-first")


def test_simulated_traces_record_the_layout_of_their_cheat_sheet():
    from hf_asynclm.data.simulate import simulate

    lat = {"c1": 420, "c2": 95, "c3": 7}
    timed = simulate(with_cheat_sheet(_task(), lat, layout="time-first"), "async", seed=0)
    plain = simulate(with_cheat_sheet(_task(), lat), "async", seed=0)
    assert timed["meta"]["plan_layout"] == "time-first" and "plan_layout" not in plain["meta"]
    assert timed["segments"] == plain["segments"]  # the same calls in the same order: only the prompt differs


def test_cli_data_build_writes_the_layout_asked_for(tmp_path):
    from hf_asynclm_cli.main import app

    out = tmp_path / "d.jsonl"
    runner = CliRunner()
    r = runner.invoke(app, ["data", "build", "--source", "drills", "--n", "6", "--drill-kinds", "rank,variants",
                            "--plan-layout", "time-first", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert [json.loads(x) for x in out.read_text().splitlines()] == copy_drills(
        6, seed=0, kinds=["rank", "variants"], plan_layout="time-first")
    for bad, words in ((["--source", "synthetic", "--plan-layout", "time-first"], "--source bfcl, both or drills"),
                       (["--plan-layout", "sideways"], "'sideways' is not one of")):
        res = runner.invoke(app, ["data", "build", "--n", "2", *bad, "--out", str(out)])
        assert res.exit_code == 2 and words in res.output, res.output


def test_cli_choices_are_the_librarys_layouts():
    from hf_asynclm_cli.data_cmd import build
    from hf_asynclm_cli.eval_cmd import eval_command
    from hf_asynclm_cli.train_cmd import train_command

    for command in (build, eval_command, train_command):
        assert tuple(next(p for p in command.params if p.name == "plan_layout").type.choices) == PLAN_LAYOUTS


def test_training_records_the_layout_and_refuses_data_of_another(tmp_path):
    from hf_asynclm.training.train import TRAINING_RECORD, TrainConfig, train

    data = tmp_path / "drills.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in copy_drills(24, seed=0, kinds=["plan", "echo"],
                                                                       plan_layout="time-first")))

    def micro(out, **kw):
        return TrainConfig.from_preset("micro", data=str(data), output_dir=str(tmp_path / out), logging_steps=1,
                                       disable_tqdm=True, max_steps=2, save_steps=100, **kw)

    with pytest.raises(ValueError, match=r"24 training traces were built with --plan-layout time-first.*pass --plan-layout time-first"):
        train(micro("wrong"))
    out = train(micro("right", plan_layout="time-first"))
    record = json.loads((out / TRAINING_RECORD).read_text())
    assert record["runtime"]["plan_layout"] == "time-first"
    assert AsyncLM.from_pretrained(out).plan_layout == "time-first"  # the recorded layout is applied
    assert AsyncLM.from_pretrained(out, plan_layout="call-first").plan_layout == "call-first"  # the caller wins


@pytest.fixture(scope="module")
def call_first_checkpoint(tmp_path_factory):
    """The shipped weights, with a record that holds no plan layout (call-first, as every checkpoint
    made before the option: eval and bench must follow it)."""
    from hf_asynclm.asynclm import DEFAULT_CHECKPOINT

    folder = tmp_path_factory.mktemp("ckpt") / "cf"
    shutil.copytree(DEFAULT_CHECKPOINT, folder)
    path = folder / "cml_training.json"
    record = json.loads(path.read_text())
    assert record["runtime"].pop("plan_layout") == "time-first"
    path.write_text(json.dumps(record))
    return folder


def test_the_shipped_model_reads_time_first_plans():
    alm = AsyncLM.from_pretrained()
    assert alm.plan_layout == "time-first"
    assert AsyncLM.from_pretrained(plan_layout="call-first").plan_layout == "call-first"  # the caller wins
    with pytest.raises(ValueError, match="unknown plan layout"):
        AsyncLM(alm.model, alm.tokenizer, plan_layout="diagonal")


@pytest.mark.parametrize("flags, model, layout", [
    ([], None, "time-first"),  # the shipped cml-tiny
    (["--plan-layout", "call-first"], None, "call-first"),
    ([], "cf", "call-first"),
    (["--plan-layout", "time-first"], "cf", "time-first"),
])
def test_eval_writes_plans_in_the_checkpoints_layout_unless_told(flags, model, layout, call_first_checkpoint, monkeypatch, tmp_path):
    import hf_asynclm.evaluation as evaluation
    from hf_asynclm_cli.eval_cmd import eval_command

    seen = []
    real = evaluation.evaluate_bfcl

    def spy(model_, tokenizer, tasks, **kw):
        seen.extend(tasks)
        return real(model_, tokenizer, tasks, **kw)

    monkeypatch.setattr(evaluation, "evaluate_bfcl", spy)
    args = ["--synthetic", "0", "--plan-drills", "2", "--clock", "virtual", "--max-new-tokens", "4", *flags]
    if model:
        args += ["--model", str(call_first_checkpoint)]
    r = CliRunner().invoke(eval_command, args)
    assert r.exit_code == 0, r.output
    assert len(seen) == 2
    for t in seen:
        entries = _entries(t.messages[-1]["content"], layout)
        assert [e[0] for e in entries] == [c.call_id for c in t.calls]


def test_bench_models_carry_the_checkpoints_layout(call_first_checkpoint):
    from hf_asynclm.bench.latency import _messages, load_bench_model

    assert load_bench_model(str(call_first_checkpoint)).plan_layout == "call-first"
    assert load_bench_model().plan_layout == "time-first"
    assert load_bench_model("random").plan_layout == "call-first"

    class Toolset:
        def planned_latencies(self):
            return {"c1": 0.42, "c2": 0.095, "c3": 0.007}

    text = _messages(_task(), "model", Toolset(), "time-first")[-1]["content"]
    assert [e[:3] for e in _entries(text, "time-first")] == [
        ("c1", 'get_weather(city="Paris - Lyon", days=3)', 420), ("c2", 'book(when="~5ms")', 95), ("c3", "ping()", 7)]
    assert _messages(_task(), "oracle", Toolset(), "time-first") == _task().messages
