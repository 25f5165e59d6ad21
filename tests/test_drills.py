"""Copy drills: shape, value split, determinism, and that training reads them."""

from __future__ import annotations

import json
import re

import pytest

from hf_asynclm.cml import parse_blocks
from hf_asynclm.data.drills import DRILL_KINDS, copy_drills
from hf_asynclm.data.synthetic import value_split


def _model_text(d: dict) -> str:
    return "".join(s["text"] for s in d["segments"] if s["role"] == "model")


def _context(d: dict) -> str:
    return " ".join(m["content"] for m in d["messages"]) + " " + " ".join(
        s["text"] for s in d["segments"] if s["role"] == "inject"
    )


def test_every_kind_and_the_trace_format():
    drills = copy_drills(30, seed=3)
    assert {d["category"] for d in drills} == set(DRILL_KINDS)
    for d in drills:
        assert d["mode"] == "drill" and d["source"] == "drill"
        assert d["segments"][0]["role"] == "model" and d["segments"][-1]["role"] == "model"
        assert all(s["role"] in ("model", "inject") for s in d["segments"])


def test_every_value_the_model_writes_is_in_its_context():
    # a drill trains copying only: every word/number the model writes after the call is given before
    # (plan drills write calls copied from the plan and end with a fixed "Done.": their own test)
    for d in copy_drills(300, seed=1, kinds=["echo", "pick", "result", "calls"]):
        context = _context(d)
        answer = d["segments"][-1]["text"]
        for token in re.findall(r"[A-Za-z]+\d+|\d[\d:-]*\d|[A-Z][a-z]{2,}", answer):
            assert token in context, (token, d)


def test_result_drills_call_lookup_with_a_value_from_the_request_and_wait():
    for d in (x for x in copy_drills(60, seed=2) if x["category"] == "result"):
        assert [t["function"]["name"] for t in d["tools"]] == ["lookup"]
        blocks = parse_blocks(d["segments"][0]["text"])
        assert [b.kind for b in blocks] == ["call", "trap"]
        key = re.fullmatch(r'lookup\(key="([^"]+)"\)', blocks[0].body).group(1)
        assert key in d["messages"][0]["content"]
        call_id = blocks[0].call_id
        assert d["segments"][1]["text"].startswith(f"[INTR] {call_id} [HEAD]")


def test_drills_are_seeded():
    a, b = copy_drills(50, seed=7), copy_drills(50, seed=7)
    assert a == b and a != copy_drills(50, seed=8)
    with pytest.raises(ValueError):
        copy_drills(-1)


def test_eval_split_values_never_appear_in_training_drills():
    train_text = " ".join(_context(d) + _model_text(d) for d in copy_drills(400, seed=0, split="train"))
    eval_codes = {c for d in copy_drills(400, seed=0, split="eval") for c in re.findall(r"\b[A-Z]{2}\d{3}\b", _context(d))}
    assert eval_codes and all(value_split(c) == "eval" for c in eval_codes)
    assert not any(re.search(rf"\b{c}\b", train_text) for c in eval_codes)


def test_cli_writes_drills_that_tokenize(tmp_path):
    from click.testing import CliRunner

    from hf_asynclm.testing import tiny_tokenizer
    from hf_asynclm.training import tokenize_example
    from hf_asynclm_cli.main import app

    out = tmp_path / "drills.jsonl"
    result = CliRunner().invoke(app, ["data", "build", "--source", "drills", "--n", "12", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12
    from hf_asynclm.prompting import CML_CHAT_TEMPLATE

    tok = tiny_tokenizer()
    tok.chat_template = CML_CHAT_TEMPLATE
    for row in rows:
        item = tokenize_example(tok, row)
        assert any(label != -100 for label in item["labels"])


def test_cli_tokenizer_command_matches_the_one_train_builds(tmp_path):
    from click.testing import CliRunner
    from transformers import AutoTokenizer

    from hf_asynclm.cml import marker_token_ids
    from hf_asynclm.training.dataset import example_texts
    from hf_asynclm.training.tokenizer import build_cml_tokenizer
    from hf_asynclm_cli.main import app

    runner = CliRunner()
    drills = tmp_path / "drills.jsonl"
    assert runner.invoke(app, ["data", "build", "--source", "drills", "--n", "300", "--out", str(drills)]).exit_code == 0
    out = tmp_path / "tok"
    result = runner.invoke(app, ["data", "tokenizer", "--data", str(drills), "--out", str(out), "--vocab-size", "300"])
    assert result.exit_code == 0, result.output
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 300 and marker_token_ids(tok).single_token
    rows = [json.loads(line) for line in drills.read_text().splitlines()]
    same = build_cml_tokenizer([t for r in rows for t in example_texts(r)], vocab_size=300)
    assert tok.get_vocab() == same.get_vocab()
    bad = runner.invoke(app, ["data", "tokenizer", "--data", str(tmp_path / "missing.jsonl"), "--out", str(out)])
    assert bad.exit_code != 0 and "missing.jsonl" in bad.output


def _calls_of(segment_text: str) -> list:
    from hf_asynclm.executor.parsing import parse_call

    return [(b.call_id, parse_call(b.body)) for b in parse_blocks(segment_text) if b.kind == "call"]


def test_calls_drills_call_once_per_listed_key_in_order_and_report_each_result():
    drills = copy_drills(80, seed=4, kinds=["calls"])
    assert {d["category"] for d in drills} == {"calls"}
    for d in drills:
        calls = _calls_of(d["segments"][0]["text"])
        keys = [c.kwargs["key"] for _, c in calls]
        request = d["messages"][0]["content"]
        # every listed key exactly once, in the order the user gave them
        assert 2 <= len(keys) <= 4 and len(set(keys)) == len(keys)
        assert [request.index(k) for k in keys] == sorted(request.index(k) for k in keys)
        assert parse_blocks(d["segments"][0]["text"])[-1].kind == "trap"
        injected = [s for s in d["segments"] if s["role"] == "inject"]
        assert sorted(b.call_id for s in injected for b in parse_blocks(s["text"])) == sorted(cid for cid, _ in calls)
        # each interrupt is answered by the next model segment, quoting its key and value
        for inj, reply in zip(d["segments"][1::2], d["segments"][2::2]):
            payload = json.loads(parse_blocks(inj["text"])[0].body)
            key, (field, value) = payload.pop("key"), next(iter(payload.items()))
            assert reply["text"].startswith(f" {key}: {field} {value}.")
        assert "[TRAP]" not in d["segments"][-1]["text"]


@pytest.mark.parametrize("kind", ["plan", "rank", "variants"])
def test_plan_drills_copy_the_cheat_sheet_verbatim_in_lpt_order(kind):
    from hf_asynclm.executor.parsing import parse_call

    for d in copy_drills(120, seed=5, kinds=[kind]):
        request = d["messages"][0]["content"]
        plan = re.findall(r"(c\d) (.+?) ~(\d+)ms", request.split("\nPlan: ", 1)[1])
        bodies = {cid: body for cid, body, _ in plan}
        ms = {cid: int(t) for cid, _, t in plan}
        blocks = [b for b in parse_blocks(d["segments"][0]["text"]) if b.kind == "call"]
        # verbatim copies of the plan, longest expected time first (LPT)
        assert {b.call_id: b.body for b in blocks} == bodies
        assert [ms[b.call_id] for b in blocks] == sorted(ms.values(), reverse=True)
        # the tools declared cover every call, with the argument names they use
        declared = {t["function"]["name"]: set(t["function"]["parameters"]["properties"]) for t in d["tools"]}
        for b in blocks:
            call = parse_call(b.body)
            assert set(call.kwargs) == declared[call.name] and not call.args
        # results come back shortest first; the model traps until the last, then says Done.
        injected = [parse_blocks(s["text"])[0].call_id for s in d["segments"] if s["role"] == "inject"]
        assert [ms[c] for c in injected] == sorted(ms.values())
        replies = [s["text"] for s in d["segments"][2::2]]
        assert replies[:-1] == [" [TRAP] [END]"] * (len(replies) - 1) and replies[-1] == " Done."
        if kind == "rank":  # tools without parameters, one per call, times apart: only the times tell the order
            assert 2 <= len(blocks) <= 4 and all(b.body.endswith("()") for b in blocks)
            assert len(declared) == len(blocks) and not any(declared.values())
            assert min(abs(a - b) for a in ms.values() for b in ms.values() if a != b) >= 5 and len(set(ms.values())) == len(ms)
        if kind == "variants":  # calls to one tool that differ in the value of one argument, as BFCL's parallel requests
            calls = [parse_call(bodies[cid]) for cid in sorted(bodies)]
            main = [c for c in calls if c.name == calls[0].name]
            assert 2 <= len(calls) <= 4 and len(main) >= len(calls) - 1 and len({c.name for c in calls}) <= 2
            differ = {a for c in main[1:] for a in c.kwargs if c.kwargs[a] != main[0].kwargs[a]}
            assert len(differ) == 1
            (varied,) = differ
            assert len({json.dumps(c.kwargs[varied]) for c in main}) == len(main)
            assert len(set(ms.values())) == len(ms)


def test_drill_kinds_are_chosen_and_the_original_three_are_unchanged():
    three = copy_drills(30, seed=0, kinds=["echo", "pick", "result"])
    assert [d["category"] for d in three[:3]] == ["echo", "pick", "result"]
    assert [d["category"] for d in copy_drills(10, seed=0)][:5] == list(DRILL_KINDS)
    with pytest.raises(ValueError, match="unknown drill kinds"):
        copy_drills(3, kinds=["echo", "nope"])
    with pytest.raises(ValueError):
        copy_drills(3, kinds=[])


def test_cli_drill_kinds_option(tmp_path):
    from click.testing import CliRunner

    from hf_asynclm_cli.main import app

    out = tmp_path / "d.jsonl"
    runner = CliRunner()
    ok = runner.invoke(app, ["data", "build", "--source", "drills", "--n", "6", "--drill-kinds", "calls,plan,order", "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    assert [json.loads(x)["category"] for x in out.read_text().splitlines()] == ["calls", "plan", "order"] * 2
    bad = runner.invoke(app, ["data", "build", "--source", "drills", "--n", "6", "--drill-kinds", "calls,oops", "--out", str(out)])
    assert bad.exit_code != 0 and "oops" in bad.output


def test_order_drills_call_the_requested_tools_longest_expected_time_first():
    from hf_asynclm.executor.parsing import parse_call

    drills = copy_drills(150, seed=6, kinds=["order"])
    assert {d["category"] for d in drills} == {"order"}
    saw_distractor = saw_reordered = False
    for d in drills:
        latency = {t["function"]["name"]: t["function"]["x-latency-ms"] for t in d["tools"]}
        request = d["messages"][0]["content"]
        asked = re.findall(r"([\w.]+) for (.+?)(?:, | and |\.$)", request)
        blocks = [b for b in parse_blocks(d["segments"][0]["text"]) if b.kind == "call"]
        calls = [parse_call(b.body) for b in blocks]
        # every requested tool exactly once, with the value the user gave it, and nothing else
        assert sorted((c.name, next(iter(c.kwargs.values()))) for c in calls) == sorted(asked)
        assert all(not c.args and len(c.kwargs) == 1 for c in calls)
        # longest expected time first, and never a tie that would make the order ambiguous
        times = [latency[c.name] for c in calls]
        assert times == sorted(times, reverse=True) and len(set(times)) == len(times)
        assert len({b.call_id for b in blocks}) == len(blocks)
        saw_distractor |= len(d["tools"]) > len(calls)
        saw_reordered |= [c.name for c in calls] != [name for name, _ in asked]
        # results come back shortest first; each reply quotes the value asked with and the result
        injected = [parse_blocks(s["text"])[0] for s in d["segments"] if s["role"] == "inject"]
        by_id = {b.call_id: c for b, c in zip(blocks, calls)}
        assert [latency[by_id[b.call_id].name] for b in injected] == sorted(times)
        for b, reply in zip(injected, d["segments"][2::2]):
            (field, value), = json.loads(b.body).items()
            asked_with = next(iter(by_id[b.call_id].kwargs.values()))
            assert reply["text"].startswith(f" {asked_with}: {field} {value}.")
        assert "[TRAP]" not in d["segments"][-1]["text"]
    assert saw_distractor and saw_reordered


def test_order_drills_are_opt_in_and_render_the_times_in_the_prompt():
    from transformers import AutoTokenizer

    from hf_asynclm.asynclm import DEFAULT_CHECKPOINT
    from hf_asynclm.data.drills import EXTRA_DRILL_KINDS

    assert "order" in EXTRA_DRILL_KINDS and "order" not in DRILL_KINDS
    assert "order" not in {d["category"] for d in copy_drills(50, seed=0)}
    d = copy_drills(1, seed=2, kinds=["order"])[0]
    tok = AutoTokenizer.from_pretrained(DEFAULT_CHECKPOINT)
    prompt = tok.apply_chat_template(d["messages"], tools=d["tools"], tokenize=False, add_generation_prompt=True)
    for t in d["tools"]:
        assert f'{t["function"]["name"]}(' in prompt and f'~{t["function"]["x-latency-ms"]}ms' in prompt


def test_plan_tasks_are_held_out_cheat_sheet_tasks_with_the_calls_asked_for():
    from hf_asynclm.data.drills import plan_tasks

    tasks = plan_tasks(40, seed=1, calls=(2, 3))
    assert [t.task_id for t in tasks] == [f"plan-eval-1-{i}" for i in range(40)]
    assert {len(t.calls) for t in tasks} == {2, 3}
    for t in tasks:
        plan = t.messages[-1]["content"].split("\nPlan: ", 1)[1]
        assert plan == "; ".join(f"{c.call_id} {c.body()} ~{round(c.latency_s * 1000)}ms" for c in t.calls)
        assert all(0.02 <= c.latency_s <= 0.9 and not c.depends_on for c in t.calls)
        assert t.category == ("parallel_multiple" if len({c.name for c in t.calls}) > 1 else "parallel")
        assert {c.name for c in t.calls} <= {tool["function"]["name"] for tool in t.tools}
    again = plan_tasks(40, seed=1, calls=(2, 3))
    assert [t.messages for t in again] == [t.messages for t in tasks]  # the same on every run
    assert [t.messages for t in plan_tasks(5, seed=2)] != [t.messages for t in plan_tasks(5, seed=1)]
    bare = plan_tasks(10, seed=1, arguments=False)
    assert all(c.arguments == {} for t in bare for c in t.calls) and {len(t.calls) for t in bare} <= {2, 3, 4}
    with pytest.raises(ValueError, match="n must be"):
        plan_tasks(-1)
    with pytest.raises(ValueError, match="calls must be"):
        plan_tasks(3, calls=(3, 2))


def _plan_of(d: dict) -> dict[str, int]:
    """The cheat-sheet plan of a plan/rank/variants drill: call id -> expected ms."""
    return {cid: int(ms) for cid, ms in re.findall(r"(c\d) .+? ~(\d+)ms", d["messages"][0]["content"].split("\nPlan: ", 1)[1])}


def test_default_drills_are_byte_for_byte_those_every_recipe_was_built_from():
    # the README's recipes rebuild their drill files with `data build`; the options added later must
    # not move a single draw of the defaults (this digest was taken before --drill-calls existed)
    import hashlib

    from hf_asynclm.data.drills import EXTRA_DRILL_KINDS

    text = "".join(json.dumps(d) + "\n" for d in copy_drills(48, seed=5, kinds=DRILL_KINDS + EXTRA_DRILL_KINDS))
    assert hashlib.sha256(text.encode()).hexdigest() == "6c2a1217e3286d2f6b15943fd0126146e13438dc1c9f99f1ab67e8828e19b80b"
    assert copy_drills(48, seed=5, kinds=DRILL_KINDS + EXTRA_DRILL_KINDS, calls=None, close_times=0.0) == [
        json.loads(x) for x in text.splitlines()]


@pytest.mark.parametrize("calls,expected", [(4, {4}), ((2, 3), {2, 3}), ((6, 6), {6})])
def test_drill_calls_sets_the_number_of_calls_of_every_multi_call_kind(calls, expected):
    kinds = ["calls", "plan", "rank", "variants", "order", "echo"]
    drills = copy_drills(120, seed=9, kinds=kinds, calls=calls)
    for d in drills:
        n_calls = len([b for b in parse_blocks(d["segments"][0]["text"]) if b.kind == "call"])
        if d["category"] == "echo":
            assert n_calls == 0 and "calls" in d["meta"]  # kinds without calls are drawn as before
        else:
            assert n_calls in expected, (d["category"], n_calls)
    seen = {len([b for b in parse_blocks(d["segments"][0]["text"]) if b.kind == "call"]) for d in drills if d["category"] != "echo"}
    assert seen == expected
    assert all(d["meta"]["calls"] == list(calls if isinstance(calls, tuple) else (calls, calls)) for d in drills)


def test_close_times_put_every_expected_time_of_a_drill_in_one_narrow_window():
    for kind in ("plan", "rank", "variants"):
        drills = copy_drills(150, seed=10, kinds=[kind], calls=(2, 6), close_times=1.0)
        for d in drills:
            ms = _plan_of(d)
            k = len(ms)
            assert max(ms.values()) - min(ms.values()) <= max(120, 3 * k)
            assert 20 <= min(ms.values()) and max(ms.values()) <= 900
            assert min(abs(a - b) for a in ms.values() for b in ms.values() if a != b) >= 2 and len(set(ms.values())) == k
            # still written longest first, however close the times are
            blocks = [b for b in parse_blocks(d["segments"][0]["text"]) if b.kind == "call"]
            assert [ms[b.call_id] for b in blocks] == sorted(ms.values(), reverse=True)
            assert d["meta"]["close_times"] == 1.0
    for d in copy_drills(60, seed=10, kinds=["order"], calls=4, close_times=1.0):
        times = [t["function"]["x-latency-ms"] for t in d["tools"]]
        assert max(times) - min(times) <= 120 and len(set(times)) == len(times)


def test_close_times_is_a_share_and_spread_times_stay_as_they_were():
    drills = copy_drills(400, seed=11, kinds=["variants"], calls=4, close_times=0.5)
    spans = [max(ms.values()) - min(ms.values()) for ms in map(_plan_of, drills)]
    close = sum(s <= 120 for s in spans)
    # about half close (spread draws of four times over 20-900 ms fall within 120 ms only rarely)
    assert 150 <= close <= 260 and max(spans) > 400
    # the seeded draws are reproducible
    assert copy_drills(40, seed=11, kinds=["variants"], calls=4, close_times=0.5) == drills[:40]


def test_drill_options_reject_bad_values_with_a_clear_error():
    with pytest.raises(ValueError, match="close_times is a probability"):
        copy_drills(3, kinds=["plan"], close_times=1.5)
    with pytest.raises(ValueError, match="2 <= low <= high <= 8"):
        copy_drills(3, kinds=["plan"], calls=1)
    with pytest.raises(ValueError, match="2 <= low <= high <= 8"):
        copy_drills(3, kinds=["plan"], calls=(4, 3))
    with pytest.raises(ValueError, match="none of them is in"):
        copy_drills(3, kinds=["echo", "pick"], calls=3)
    with pytest.raises(ValueError, match="none of them is in"):
        copy_drills(3, kinds=["calls"], close_times=0.5)  # calls drills have no expected times


def test_cli_drill_calls_and_close_times(tmp_path):
    from click.testing import CliRunner

    from hf_asynclm_cli.main import app

    out = tmp_path / "d.jsonl"
    runner = CliRunner()
    base = ["data", "build", "--source", "drills", "--n", "8", "--drill-kinds", "variants", "--out", str(out)]
    ok = runner.invoke(app, base + ["--drill-calls", "4", "--drill-close-times", "1"])
    assert ok.exit_code == 0, ok.output
    drills = [json.loads(x) for x in out.read_text().splitlines()]
    assert drills == copy_drills(8, seed=0, kinds=["variants"], calls=4, close_times=1.0)
    assert all(len(_plan_of(d)) == 4 and d["meta"]["calls"] == [4, 4] for d in drills)
    for bad, words in ((["--drill-calls", "1"], "2 <= LOW <= HIGH <= 8"), (["--drill-calls", "a,b"], "LOW,HIGH"),
                       (["--drill-close-times", "2"], "0<=x<=1")):
        res = runner.invoke(app, base + bad)
        assert res.exit_code == 2 and words in res.output, res.output
    not_drills = runner.invoke(app, ["data", "build", "--n", "2", "--drill-calls", "3", "--out", str(out)])
    assert not_drills.exit_code == 2 and "--source drills" in not_drills.output
    no_kind = runner.invoke(app, ["data", "build", "--source", "drills", "--n", "2", "--drill-kinds", "echo",
                                  "--drill-close-times", "0.5", "--out", str(out)])
    assert no_kind.exit_code == 2 and "none of them" in no_kind.output


def test_plan_tasks_with_close_times():
    from hf_asynclm.data.drills import plan_tasks

    assert plan_tasks(30, seed=4) == plan_tasks(30, seed=4, close_times=0.0)
    for arguments in (True, False):
        for t in plan_tasks(40, seed=4, calls=(4, 4), arguments=arguments, close_times=1.0):
            ms = [round(c.latency_s * 1000) for c in t.calls]
            assert max(ms) - min(ms) <= 120 and len(set(ms)) == 4
    with pytest.raises(ValueError, match="probability"):
        plan_tasks(3, close_times=-0.1)
