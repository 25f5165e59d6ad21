"""The evaluation command: scoring rules, and a scripted perfect policy scores 100 %."""

from __future__ import annotations

import json
import math
import re

import pytest
from click.testing import CliRunner

from hf_asynclm.data.simulate import simulate
from hf_asynclm.data.synthetic import generate_tasks
from hf_asynclm.evaluation import evaluate_synthetic, format_report, score_synthetic
from hf_asynclm.prompting import CML_CHAT_TEMPLATE, CML_MAX_NEW_TOKENS
from hf_asynclm.testing import ScriptedPolicy, tiny_llama, tiny_tokenizer


def _scripted(tok):
    def processors_for(task):
        trace = simulate(task, "async", seed=0)
        return [ScriptedPolicy(tok, [s["text"] for s in trace["segments"] if s["role"] == "model"])]

    return processors_for


def test_scripted_simulator_policy_scores_perfectly():
    tok = tiny_tokenizer()
    tok.chat_template = CML_CHAT_TEMPLATE
    model = tiny_llama(tok)
    tasks = generate_tasks(4, seed=3, split="eval")
    report = evaluate_synthetic(model, tok, tasks, max_new_tokens=400, latency_scale=0.02, processors_for=_scripted(tok))
    assert report.n == 4
    assert report.cml_validity == 1.0
    assert report.success_rate == 1.0, [t for t in report.tasks if not t.success]
    assert "task success | 100.0%" in format_report(report)
    # each task keeps its transcript: the model's calls with the results that went in, in place
    for score, task in zip(report.tasks, tasks):
        assert score.transcript.count("[CALL]") == len(task.calls)
        assert score.transcript.count("[INTR]") >= len(task.calls)  # (a trap that came late gets an error interrupt)
        for call in task.calls:
            assert f"[INTR] {call.call_id} [HEAD]" in score.transcript


def test_the_constraints_let_a_perfect_policy_through():
    """Schema-checked calls that may not repeat an earlier call, and names held whole, do not
    stand in the way of the plan (no plan makes the same call twice or cuts a name); the report
    says which settings ran."""
    tok = tiny_tokenizer()
    tok.chat_template = CML_CHAT_TEMPLATE
    tasks = generate_tasks(6, seed=5, split="eval")
    report = evaluate_synthetic(
        tiny_llama(tok), tok, tasks, max_new_tokens=400, latency_scale=0.02, processors_for=_scripted(tok),
        constrain_calls="schema", no_repeat_calls=True, complete_names=True,
    )
    assert report.success_rate == 1.0, [t for t in report.tasks if not t.success]
    assert report.extra["no_repeat_calls"] is True and report.extra["complete_names"] is True
    text = format_report(report)
    assert "| no_repeat_calls | on |" in text and "| constrain_calls | schema |" in text and "| complete_names | on |" in text


def test_in_simulated_time_a_report_is_the_same_on_every_run():
    """--clock virtual: the tools return at once and results go in by the simulated clock, so
    a model's report does not depend on how fast the machine (or the tools) are; a scripted
    perfect policy still scores 100 %."""
    tok = tiny_tokenizer()
    tok.chat_template = CML_CHAT_TEMPLATE
    model = tiny_llama(tok, seed=4)
    tasks = generate_tasks(3, seed=7, split="eval")
    reports = [
        evaluate_synthetic(model, tok, tasks, max_new_tokens=40, clock="virtual", tpot_range_ms=(5, 30))
        for _ in range(2)
    ]
    strip = lambda r: [(t.task_id, t.emitted, t.success, t.blocks) for t in r.tasks]  # noqa: E731
    assert strip(reports[0]) == strip(reports[1])
    assert reports[0].extra["clock"] == "virtual" and reports[0].extra["tpot_range_ms"] == "5-30"
    perfect = evaluate_synthetic(model, tok, tasks, max_new_tokens=400, processors_for=_scripted(tok), clock="virtual")
    assert perfect.success_rate == 1.0, [t for t in perfect.tasks if not t.success]
    with pytest.raises(ValueError, match="clock"):
        evaluate_synthetic(model, tok, tasks, clock="sundial")


def test_random_model_fails_and_scoring_catches_near_misses():
    tok = tiny_tokenizer()
    tok.chat_template = CML_CHAT_TEMPLATE
    tasks = generate_tasks(2, seed=3, split="eval")
    report = evaluate_synthetic(tiny_llama(tok), tok, tasks, max_new_tokens=20, latency_scale=0.0)
    assert report.success_rate == 0.0
    task = tasks[0]
    calls = [(c.name, dict(c.arguments)) for c in task.calls]
    answer = task.answer
    assert score_synthetic(task, calls, answer).success
    wrong = [(n, {k: (v + "x" if isinstance(v, str) else v) for k, v in a.items()}) for n, a in calls]
    assert not score_synthetic(task, wrong, answer).calls_right
    assert not score_synthetic(task, calls[:-1], answer).success
    assert score_synthetic(task, calls, answer).value_recall == 1.0
    assert 0.0 <= score_synthetic(task, wrong, answer).value_recall < 1.0
    assert not score_synthetic(task, calls, answer[: len(answer) // 2]).answer_right


def test_eval_cli_bad_input():
    from hf_asynclm_cli.eval_cmd import eval_command

    runner = CliRunner()
    r = runner.invoke(eval_command, ["--synthetic", "0", "--bfcl", "0"])
    assert r.exit_code != 0 and "nothing to evaluate" in r.output
    r = runner.invoke(eval_command, ["--modes", "fast"])
    assert r.exit_code != 0 and "unknown mode" in r.output
    r = runner.invoke(eval_command, ["--model", "/no/such/dir", "--synthetic", "1"])
    assert r.exit_code != 0 and "Traceback" not in r.output and "cannot load model" in r.output
    for bad in ("30,5", "5", "0,3", "a,b"):
        r = runner.invoke(eval_command, ["--clock", "virtual", "--tpot-ms", bad])
        assert r.exit_code == 2 and "--tpot-ms" in r.output, r.output
    r = runner.invoke(eval_command, ["--clock", "sundial"])
    assert r.exit_code == 2 and "sundial" in r.output
    r = runner.invoke(eval_command, ["--bfcl-results", "xml"])
    assert r.exit_code == 2 and "--bfcl-results" in r.output
    r = runner.invoke(eval_command, ["--device", "gpu", "--synthetic", "1"])
    assert r.exit_code == 2 and "--device: unknown device 'gpu'" in r.output


def test_eval_cli_leaves_out_tasks_the_checkpoint_trained_on(tmp_path):
    import json
    from pathlib import Path

    from hf_asynclm_cli.eval_cmd import eval_command

    mini = Path(__file__).parent / "data" / "bfcl_mini"
    args = ["--synthetic", "0", "--bfcl", "50", "--data-dir", str(mini), "--bfcl-categories", "parallel,simple_python",
            "--modes", "sync", "--max-new-tokens", "2", "--latency-scale", "0"]
    runner = CliRunner()
    r = runner.invoke(eval_command, [*args, "--out", str(tmp_path / "all.json")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "all.json").read_text())[0]
    all_ids = [t["task_id"] for t in report["tasks"]]
    assert len(all_ids) >= 2
    # each BFCL task keeps what the shipped model wrote (two tokens here)
    assert all(isinstance(t["transcript"], str) for t in report["tasks"]) and any(t["transcript"] for t in report["tasks"])
    # the runtime settings the checkpoint records, unless the command line says otherwise
    assert report["extra"]["constrain_calls"] == "grounded" and report["extra"]["interrupt_at"] == "sentence"
    assert report["extra"]["complete_names"] is True
    r = runner.invoke(eval_command, [*args, "--constrain-calls", "off", "--no-complete-names", "--out", str(tmp_path / "off.json")])
    assert r.exit_code == 0, r.output
    off = json.loads((tmp_path / "off.json").read_text())[0]["extra"]
    assert off["constrain_calls"] == "off" and off["complete_names"] is False
    # a JSON list of ids, and JSONL traces with task_id, both work and combine
    (tmp_path / "ids.json").write_text(json.dumps(all_ids[:1]))
    (tmp_path / "traces.jsonl").write_text(json.dumps({"task_id": all_ids[1], "mode": "async"}) + "\n")
    r = runner.invoke(eval_command, [*args, "--out", str(tmp_path / "rest.json"), "--exclude-tasks", str(tmp_path / "ids.json"),
                                     "--exclude-tasks", str(tmp_path / "traces.jsonl")])
    assert r.exit_code == 0, r.output
    assert "left out 2 of" in r.output
    rest = [t["task_id"] for t in json.loads((tmp_path / "rest.json").read_text())[0]["tasks"]]
    assert set(rest) == set(all_ids) - set(all_ids[:2])
    (tmp_path / "bad.jsonl").write_text("not json\n")
    r = runner.invoke(eval_command, [*args, "--exclude-tasks", str(tmp_path / "bad.jsonl")])
    assert r.exit_code == 2 and "--exclude-tasks" in r.output and "Traceback" not in r.output


def test_the_default_budget_fits_every_reference_answer():
    """The evaluation's default token budget is larger than what the simulator's reference
    traces write for held-out parallel and mixed tasks (counted with the shipped tokenizer), so a
    right answer is never cut off; 256, the old default, was not (many mixed answers are longer)."""
    from hf_asynclm.asynclm import DEFAULT_CHECKPOINT
    from hf_asynclm_cli.eval_cmd import eval_command
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEFAULT_CHECKPOINT)
    tasks = generate_tasks(150, seed=9, shapes=["parallel", "mixed"], split="eval")
    written = []
    for i, task in enumerate(tasks):
        trace = simulate(task, "async", seed=i, tokenizer=tok, interrupt_at="sentence")
        written.append(sum(len(tok(s["text"], add_special_tokens=False).input_ids) for s in trace["segments"] if s["role"] == "model"))
    assert max(written) < CML_MAX_NEW_TOKENS, max(written)
    assert sum(w > 256 for w in written) > len(written) // 10
    default = next(p.default for p in eval_command.params if p.name == "max_new_tokens")
    assert default == CML_MAX_NEW_TOKENS
    # and what a user gets without asking: the CLI's run/chat default and the shipped checkpoints' own budget
    from hf_asynclm_cli.run_cmd import run

    run_default = next(p.default for p in run.params if p.name == "max_new_tokens")
    assert run_default == CML_MAX_NEW_TOKENS
    for name in ("cml-tiny", "gemma-3-270m-cml"):
        config = json.loads((DEFAULT_CHECKPOINT.parent / name / "generation_config.json").read_text())
        assert config["max_new_tokens"] == CML_MAX_NEW_TOKENS, name


def test_a_report_counts_the_tasks_that_ran_out_of_tokens():
    tok = tiny_tokenizer()
    tok.chat_template = CML_CHAT_TEMPLATE
    model = tiny_llama(tok)
    tasks = generate_tasks(3, seed=3, split="eval")
    short = evaluate_synthetic(model, tok, tasks, max_new_tokens=12, processors_for=_scripted(tok), clock="virtual")
    assert [t.stop_reason for t in short.tasks] == ["max_new_tokens"] * 3
    assert all(t.new_tokens == 12 for t in short.tasks) and short.success_rate == 0.0
    assert short.extra["cut_by_token_limit"] == 1.0 and short.extra["max_new_tokens"] == 12
    text = format_report(short)
    assert "| max_new_tokens | 12 |" in text and "| cut by token limit | 100.0% |" in text
    enough = evaluate_synthetic(model, tok, tasks, max_new_tokens=400, processors_for=_scripted(tok), clock="virtual")
    assert enough.extra["cut_by_token_limit"] == 0.0 and enough.success_rate == 1.0
    assert all(t.stop_reason == "eos" and 0 < t.new_tokens < 400 for t in enough.tasks)


@pytest.mark.parametrize("result_format, keys", [("status", {"status", "id"}), ("trace", {"result"})])
def test_bfcl_calls_return_the_result_format_asked_for(result_format, keys):
    """``evaluate_bfcl(result_format=...)``: the results injected have that shape ("trace": the
    simulator's own, as in the training traces), the scores do not depend on it, and the report
    says which was used; an unknown format is refused."""
    from pathlib import Path

    from hf_asynclm.data import bfcl
    from hf_asynclm.data.simulate import generic_result
    from hf_asynclm.evaluation import bfcl_result, evaluate_bfcl

    tok = tiny_tokenizer()
    tok.chat_template = CML_CHAT_TEMPLATE
    model = tiny_llama(tok)
    mini = Path(__file__).parent / "data" / "bfcl_mini"
    tasks = [bfcl.with_cheat_sheet(t, {c.call_id: 50 for c in t.calls}) for t in bfcl.load_tasks("parallel", data_dir=mini)[:2]]
    report = evaluate_bfcl(model, tok, tasks, max_new_tokens=300, processors_for=_scripted(tok), clock="virtual",
                           result_format=result_format)
    assert report.success_rate == 1.0 and report.extra["result_format"] == result_format
    for task, score in zip(tasks, report.tasks):
        injected = [json.loads(m) for m in re.findall(r"\[INTR\] \w+ \[HEAD\] (\{.*?\}) \[END\]", score.transcript)]
        assert len(injected) == len(task.calls) and all(set(r) == keys for r in injected), score.transcript
    call = tasks[0].calls[0]
    assert bfcl_result(call.name, dict(call.arguments), "trace") == generic_result(call.name, call.arguments)
    with pytest.raises(ValueError, match="unknown BFCL result format"):
        evaluate_bfcl(model, tok, tasks, result_format="xml")


def test_eval_cli_plan_drills(tmp_path):
    """``hf-asynclm eval --plan-drills N``: a report per mode named for the kind of plan, with the
    LPT order rate (the shipped model, a few tokens per task)."""
    from hf_asynclm_cli.eval_cmd import eval_command

    for flags, name in ((["--plan-arguments"], "plan-drills"), (["--no-plan-arguments"], "rank-drills"),
                        (["--plan-close-times", "1"], "plan-drills-close")):
        out = tmp_path / f"{name}.json"
        r = CliRunner().invoke(eval_command, ["--synthetic", "0", "--plan-drills", "3", *flags,
                                     "--clock", "virtual", "--max-new-tokens", "20", "--out", str(out)])
        assert r.exit_code == 0, r.output
        (report,) = json.loads(out.read_text())
        assert report["name"] == name and report["n"] == 3 and "lpt_order_rate" in report["extra"]
        assert all("[CALL]" in t["transcript"] for t in report["tasks"])
        assert f"### {name} (async, n=3)" in r.output


def test_the_cli_choices_are_the_librarys_settings():
    """The CLI spells its choices out (it imports no library module at start-up): they must be the
    library's own lists."""
    from hf_asynclm.data.simulate import GENERIC_RESULTS
    from hf_asynclm.evaluation import BFCL_RESULT_FORMATS
    from hf_asynclm_cli.data_cmd import build
    from hf_asynclm_cli.eval_cmd import eval_command

    def choices(command, name):
        return tuple(next(p for p in command.params if p.name == name).type.choices)

    assert choices(eval_command, "bfcl_results") == BFCL_RESULT_FORMATS
    assert choices(build, "generic_results") == GENERIC_RESULTS


def test_plan_drill_tasks_score_the_lpt_order_per_number_of_calls():
    """``plan_tasks`` are cheat-sheet tasks ``evaluate_bfcl`` scores: a policy writing the
    simulator's trace (longest expected time first) keeps the LPT order in every task; one writing
    the plan's order keeps it exactly where the plan's times do not rise, counted per number of calls."""
    from hf_asynclm.cml import format_call, format_trap
    from hf_asynclm.data.drills import plan_tasks
    from hf_asynclm.evaluation import evaluate_bfcl
    from hf_asynclm.testing import ScriptedPolicy

    tok = tiny_tokenizer()
    tok.chat_template = CML_CHAT_TEMPLATE
    model = tiny_llama(tok)
    tasks = plan_tasks(8, seed=3)
    lpt = evaluate_bfcl(model, tok, tasks, max_new_tokens=400, processors_for=_scripted(tok), clock="virtual", name="plan-drills")
    assert lpt.name == "plan-drills" and lpt.success_rate == 1.0, [t for t in lpt.tasks if not t.success]
    assert lpt.extra["lpt_order_rate"] == 1.0 and lpt.extra["trap_rate"] == 1.0

    def in_plan_order(task):
        calls = " ".join(format_call(c.body(), call_id=c.call_id) for c in task.calls)
        return [ScriptedPolicy(tok, [calls + " " + format_trap()] + [" " + format_trap()] * (len(task.calls) - 1) + [" Done."])]

    plain = evaluate_bfcl(model, tok, tasks, max_new_tokens=400, processors_for=in_plan_order, clock="virtual")
    falling = {t.task_id: all(a.latency_s >= b.latency_s for a, b in zip(t.calls, t.calls[1:])) for t in tasks}
    assert plain.success_rate == 1.0  # the calls are right in any order
    assert [s.lpt_ok for s in plain.tasks] == [falling[t.task_id] for t in tasks]
    assert 0.0 < plain.extra["lpt_order_rate"] < 1.0
    assert plain.extra["lpt_order_rate_calls_right"] == plain.extra["lpt_order_rate"]  # every task's calls are right
    for k in {len(t.calls) for t in tasks}:
        same = [falling[t.task_id] for t in tasks if len(t.calls) == k]
        assert plain.extra[f"lpt_order_rate_calls_right_{k}_calls"] == sum(same) / len(same)
    k = len(tasks[0].calls)
    rate = plain.extra[f"lpt_order_rate_calls_right_{k}_calls"]
    assert f"| lpt order rate calls right {k} calls | {rate:.1%} |" in format_report(plain)

    def only_the_longest(task):  # leaves calls out: keeps the order vacuously, its calls are not right
        c = max(task.calls, key=lambda c: c.latency_s)
        return [ScriptedPolicy(tok, [format_call(c.body(), call_id=c.call_id) + " " + format_trap(), " Done."])]

    short = evaluate_bfcl(model, tok, tasks, max_new_tokens=400, processors_for=only_the_longest, clock="virtual")
    assert short.success_rate == 0.0 and short.extra["lpt_order_rate"] == 1.0
    assert math.isnan(short.extra["lpt_order_rate_calls_right"])
    assert not any(k.startswith("lpt_order_rate_calls_right_") for k in short.extra)
