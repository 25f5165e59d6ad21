"""BFCL task source: loading (fixture in the real layout), conversion, multi-step tasks, split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from hf_asynclm.bench.ast_match import match_task
from hf_asynclm.data import bfcl
from hf_asynclm.data.tasks import PlannedCall, Task

MINI = Path(__file__).parent / "data" / "bfcl_mini"


def _walk(obj: Any):
    if isinstance(obj, dict):
        yield obj
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)


def _types(tools: list[dict]) -> set[str]:
    return {d["type"] for d in _walk(tools) if isinstance(d.get("type"), str)}


# --------------------------------------------------------------------------- locating


def test_data_dir_missing_says_how_to_install(monkeypatch):
    monkeypatch.delenv(bfcl.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(bfcl.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError) as exc:
        bfcl.bfcl_data_dir()
    msg = str(exc.value)
    assert "pip install --no-deps bfcl-eval==2026.3.23" in msg
    assert "gorilla-llm/Berkeley-Function-Calling-Leaderboard" in msg


def test_data_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv(bfcl.DATA_DIR_ENV, str(MINI))
    assert bfcl.bfcl_data_dir() == MINI
    assert len(bfcl.load_category("parallel")) == 2
    monkeypatch.setenv(bfcl.DATA_DIR_ENV, str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError):
        bfcl.bfcl_data_dir()


def test_highest_version_file_wins(tmp_path):
    shutil.copytree(MINI, tmp_path / "d")
    d = tmp_path / "d"
    # an older version with one entry only; "live_parallel" must not be taken for "parallel"
    line = (d / "BFCL_v4_parallel.json").read_text().splitlines()[0]
    (d / "BFCL_v3_parallel.json").write_text(line + "\n")
    assert len(bfcl.load_category("parallel", data_dir=d)) == 2
    (d / "BFCL_v4_parallel.json").unlink()
    assert len(bfcl.load_category("parallel", data_dir=d)) == 1
    assert len(bfcl.load_category("live_parallel", data_dir=d)) == 1


def test_unknown_category_lists_available():
    with pytest.raises(ValueError, match="available"):
        bfcl.load_category("irrelevance", data_dir=MINI)
    assert "multi_turn_base" in bfcl.available_categories(MINI)


def test_bad_json_line_is_reported(tmp_path):
    shutil.copytree(MINI, tmp_path / "d")
    (tmp_path / "d" / "BFCL_v4_parallel.json").write_text('{"id": "parallel_0",\n')
    with pytest.raises(ValueError, match="BFCL_v4_parallel.json:1"):
        bfcl.load_category("parallel", data_dir=tmp_path / "d")


# --------------------------------------------------------------------------- loading


def test_load_category_joins_possible_answers():
    entries = bfcl.load_category("parallel", data_dir=MINI)
    assert [e["id"] for e in entries] == ["parallel_0", "parallel_1"]
    assert entries[0]["ground_truth"][1] == {"spotify.play": {"artist": ["Maroon 5"], "duration": [15]}}
    assert entries[0]["function"][0]["parameters"]["type"] == "dict"  # raw, unconverted


def test_load_multi_turn_fills_functions_from_classes():
    entries = bfcl.load_category("multi_turn_base", data_dir=MINI)
    names = [f["name"] for f in entries[0]["function"]]
    assert "cd" in names and "post_tweet" in names  # GorillaFileSystem + TwitterAPI
    assert "cp" not in names  # excluded_function
    assert [f["name"] for f in entries[1]["function"]] == ["add", "mean"]
    assert isinstance(entries[0]["ground_truth"][0], list)  # turns of call strings


# --------------------------------------------------------------------------- to_task


def test_to_task_parallel():
    t = bfcl.to_task(bfcl.load_category("parallel", data_dir=MINI)[0], "parallel")
    assert t.task_id == "parallel_0" and t.source == "bfcl" and t.category == "parallel"
    assert t.messages == [{"role": "user", "content": "Play songs from Taylor Swift and Maroon 5, for 20 and 15 minutes respectively, on Spotify."}]
    assert [(c.call_id, c.name, c.arguments, c.depends_on) for c in t.calls] == [
        ("c1", "spotify.play", {"artist": "Taylor Swift", "duration": 20}, []),
        ("c2", "spotify.play", {"artist": "Maroon 5", "duration": 15}, []),
    ]
    tool = t.tools[0]
    assert tool["type"] == "function" and tool["function"]["name"] == "spotify.play"
    assert tool["function"]["parameters"]["type"] == "object"
    assert t.meta["bfcl_id"] == "parallel_0" and len(t.meta["ground_truth"]) == 2
    assert Task.from_dict(json.loads(json.dumps(t.to_dict()))) == t  # JSON round trip


def test_to_task_dict_params_and_optionals():
    t = bfcl.to_task(bfcl.load_category("parallel", data_dir=MINI)[1], "parallel")
    assert t.calls[0].arguments == {
        "user_id": 43523,
        "update_info": {"name": "John", "email": "john@example.com"},
        "database": "CustomerInfo",  # first allowed value that is not ""
    }
    t = bfcl.to_task(bfcl.load_category("parallel_multiple", data_dir=MINI)[0], "parallel_multiple")
    # "type" is in the ground truth (optional) but not in the schema: left out
    assert t.calls[1].arguments == {"account": "00125648", "transactions": [], "starting_balance": 0.0}
    t = bfcl.to_task(bfcl.load_category("live_parallel_multiple", data_dir=MINI)[0])
    assert t.calls[1].arguments == {"drink_id": "123", "new_preferences": {"size": "large", "milk_type": "almond"}}


def test_to_task_first_allowed_rules():
    fn = {"name": "f", "description": "", "parameters": {"type": "dict", "properties": {
        p: {"type": "integer"} for p in ("a", "b", "c", "d", "e")}, "required": ["a"]}}
    entry = {"id": "simple_python_9", "question": [[{"role": "user", "content": "x"}]], "function": [fn],
             "ground_truth": [{"f": {"a": ["", 1, 2], "b": [""], "c": ["", None], "d": [None], "e": [3]}}]}
    t = bfcl.to_task(entry)
    assert t.category == "simple_python"  # inferred from the id
    # "" skipped; only-"" omitted; None with "" allowed is an omitted optional; a lone None is kept
    assert t.calls[0].arguments == {"a": 1, "d": None, "e": 3}


def test_tools_are_json_schema_recursively():
    for cat in ("simple_python", "parallel", "parallel_multiple", "live_parallel_multiple", "multi_turn_base"):
        for t in bfcl.load_tasks(cat, data_dir=MINI):
            types = _types(t.tools)
            assert not types & {"dict", "float", "tuple", "any"}, (cat, types)
    t = bfcl.load_tasks("parallel_multiple", data_dir=MINI)[0]
    tx = t.tools[1]["function"]["parameters"]["properties"]["transactions"]
    assert tx["items"]["type"] == "object" and tx["items"]["properties"]["amount"]["type"] == "number"
    assert tx["default"] == []  # data kept as is
    mt = bfcl.load_tasks("multi_turn_base", data_dir=MINI)[0]
    cd = next(x["function"] for x in mt.tools if x["function"]["name"] == "cd")
    assert cd["return"]["type"] == "object"  # BFCL "response" -> "return"


def test_tools_render_in_a_chat_template():
    from transformers.utils.chat_template_utils import render_jinja_template

    t = bfcl.load_tasks("parallel", data_dir=MINI)[1]
    template = "{% for tool in tools %}{{ tool.function.name }}:{{ tool.function.parameters | tojson }}\n{% endfor %}"
    rendered, _ = render_jinja_template(conversations=[t.messages], tools=t.tools, chat_template=template)
    assert rendered[0].startswith("update_user_info:")


def test_to_task_live_keeps_system_message():
    t = bfcl.load_tasks("live_parallel", data_dir=MINI)[0]
    assert t.task_id == "live_parallel_0-0-0" and t.category == "live_parallel"
    assert [m["role"] for m in t.messages] == ["system", "user"]
    assert [c.arguments for c in t.calls] == [{"timezone": "Asia/Tokyo", "format": "24h"}, {"timezone": "America/Lima", "format": "24h"}]


def test_to_task_multi_turn_builds_chain():
    tasks = bfcl.load_tasks("multi_turn_base", data_dir=MINI)
    t = tasks[0]
    assert t.messages == [{"role": "user", "content": "Move 'final_report.pdf' within document directory to 'temp' directory in document. Make sure to create the directory."}]
    assert [(c.call_id, c.body(), c.depends_on) for c in t.calls] == [
        ("c1", 'cd(folder="document")', []),
        ("c2", 'mkdir(dir_name="temp")', ["c1"]),
        ("c3", 'mv(source="final_report.pdf", destination="temp")', ["c2"]),
    ]
    assert t.meta["turns"] == 2 and t.meta["involved_classes"] == ["GorillaFileSystem", "TwitterAPI"]
    assert t.meta["ground_truth_calls"][0] == "cd(folder='document')"
    assert t.meta["ground_truth"][2] == {"mv": {"source": ["final_report.pdf"], "destination": ["temp"]}}
    assert "GorillaFileSystem" in t.meta["initial_config"]
    # positional arguments are named from the schema
    assert tasks[2].calls[0].arguments == {"city": "Rivermist"}
    assert tasks[1].calls[0].arguments == {"numbers": [3.0, 5.0, 10.0]}


def test_fixture_tasks_match_their_own_ground_truth():
    for cat in bfcl.CATEGORIES:
        for t in bfcl.load_tasks(cat, data_dir=MINI):
            r = match_task([(c.name, c.arguments) for c in t.calls], t)
            assert r.valid, (t.task_id, r.errors)


# --------------------------------------------------------------------------- parse_call


def test_parse_call():
    assert bfcl.parse_call("add(a=2.5,b=6.0)") == ("add", {"a": 2.5, "b": 6.0})
    assert bfcl.parse_call(" a.b.c(x=-1, y=[1, (2, 3)], z={'k': None}) ") == ("a.b.c", {"x": -1, "y": [1, (2, 3)], "z": {"k": None}})
    with pytest.raises(ValueError, match="not a literal"):
        bfcl.parse_call("rm(path=__import__('os').getcwd())")
    with pytest.raises(ValueError, match="not a call"):
        bfcl.parse_call("x + 1")
    with pytest.raises(ValueError, match="schema"):
        bfcl.parse_call("sort('a.txt')")
    with pytest.raises(ValueError, match="kwargs"):
        bfcl.parse_call("f(**{'a': 1})")
    with pytest.raises(ValueError, match="cannot parse"):
        bfcl.parse_call("f(a=")
    fn = [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": {}}}}}]
    with pytest.raises(ValueError, match="positional"):
        bfcl.parse_call("f(1, 2)", fn)
    with pytest.raises(ValueError, match="twice"):
        bfcl.parse_call("f(1, a=2)", fn)


# --------------------------------------------------------------------------- multi-step parallel


def _pool() -> list[Task]:
    return bfcl.load_tasks("multi_turn_base", data_dir=MINI)


def test_multistep_parallel_tasks_join_three_chains():
    pool = _pool()
    tasks = bfcl.multistep_parallel_tasks(6, seed=1, pool=pool)
    assert len(tasks) == 6
    by_id = {p.task_id: p for p in pool}
    for k, t in enumerate(tasks):
        assert t.task_id == f"multistep_parallel_{k}" and t.category == "multistep_parallel"
        parts = t.meta["parts"]
        assert len(parts) == 3 and len(set(parts)) == 3
        assert [c.call_id for c in t.calls] == [f"c{i}" for i in range(1, len(t.calls) + 1)]
        assert len(t.calls) == sum(len(by_id[p].calls) for p in parts)
        # three independent chains: each call depends on the previous one of its own chain
        for chain in t.meta["chains"]:
            assert t.call(chain[0]).depends_on == []
            for prev, cur in zip(chain, chain[1:]):
                assert t.call(cur).depends_on == [prev]
        assert sorted(c for ch in t.meta["chains"] for c in ch) == sorted(c.call_id for c in t.calls)
        assert [c.name for c in t.calls] == [c.name for p in parts for c in by_id[p].calls]
        # one user message with the three requests
        assert len(t.messages) == 1 and t.messages[0]["role"] == "user"
        for p in parts:
            assert by_id[p].messages[0]["content"] in t.messages[0]["content"]
        names = [x["function"]["name"] for x in t.tools]
        assert len(names) == len(set(names))
        assert set(names) == {x["function"]["name"] for p in parts for x in by_id[p].tools}
        # the fixture always allows three chains with no API class in common
        classes = [c for cl in t.meta["involved_classes"] for c in cl]
        assert len(classes) == len(set(classes))
        t.topological_order()  # a valid DAG
        assert match_task([(c.name, c.arguments) for c in t.calls], t).valid


def test_multistep_parallel_tasks_seeded_and_even():
    pool = _pool()
    a = bfcl.multistep_parallel_tasks(8, seed=3, pool=pool)
    b = bfcl.multistep_parallel_tasks(8, seed=3, pool=pool)
    assert [t.to_dict() for t in a] == [t.to_dict() for t in b]
    assert [t.meta["parts"] for t in bfcl.multistep_parallel_tasks(8, seed=4, pool=pool)] != [t.meta["parts"] for t in a]
    # without the class preference, the shuffled walk uses every chain evenly
    from collections import Counter

    uses = Counter(p for t in bfcl.multistep_parallel_tasks(8, seed=3, pool=pool, disjoint_classes=False) for p in t.meta["parts"])
    assert set(uses) == {p.task_id for p in pool} and max(uses.values()) - min(uses.values()) <= 1


def test_multistep_parallel_tasks_limits():
    pool = _pool()
    with pytest.raises(ValueError, match="at least 3"):
        bfcl.multistep_parallel_tasks(1, seed=0, pool=pool, max_chain=2)  # only 2 chains have <= 2 calls
    tasks = bfcl.multistep_parallel_tasks(3, seed=0, pool=pool, max_chain=3, per_task=2)
    assert all(len(t.meta["parts"]) == 2 for t in tasks)


def test_multistep_from_data_dir():
    tasks = bfcl.multistep_parallel_tasks(2, seed=0, data_dir=MINI)
    assert len(tasks) == 2 and all(len(t.meta["parts"]) == 3 for t in tasks)


# --------------------------------------------------------------------------- cheat sheet


def test_with_cheat_sheet():
    t = bfcl.load_tasks("parallel", data_dir=MINI)[0]
    c = bfcl.with_cheat_sheet(t, {"c1": 300, "c2": 120})
    assert c.messages[0]["content"] == t.messages[0]["content"] + (
        '\nPlan: c1 spotify.play(artist="Taylor Swift", duration=20) ~300ms; '
        'c2 spotify.play(artist="Maroon 5", duration=15) ~120ms'
    )
    assert [x.latency_s for x in c.calls] == [0.3, 0.12]
    assert t.calls[0].latency_s is None and "Plan:" not in t.messages[0]["content"]  # original untouched
    assert c.meta["cheat_sheet"] is True


def test_with_cheat_sheet_chain_and_latency_from_calls():
    t = Task("t", "synthetic", "chain", [{"role": "user", "content": "go"}, {"role": "assistant", "content": "ok"}], [],
             [PlannedCall("c1", "get_x", {"a": 1}, latency_s=0.25), PlannedCall("c2", "get_y", {"b": "z"}, ["c1"])])
    c = bfcl.with_cheat_sheet(t)
    assert c.messages[0]["content"] == 'go\nPlan: c1 get_x(a=1) ~250ms; c2 get_y(b="z") after c1'
    assert c.messages[1]["content"] == "ok"


# --------------------------------------------------------------------------- split


def _tasks(n: int, cat: str) -> list[Task]:
    return [Task(f"{cat}_{i}", "bfcl", cat, [], [], []) for i in range(n)]


def test_split_ratio_held_out_and_seed():
    tasks = _tasks(40, "parallel") + _tasks(20, "multiple") + _tasks(5, "live_parallel") + _tasks(3, "live_parallel_multiple")
    train, ev = bfcl.split(tasks, seed=0)
    assert len(train) == 10 + 5 and len(ev) == 30 + 15 + 8
    ids_t, ids_e = {t.task_id for t in train}, {t.task_id for t in ev}
    assert not ids_t & ids_e and len(ids_t | ids_e) == len(tasks)
    assert all(t.category not in bfcl.HELD_OUT_CATEGORIES for t in train)
    assert {"live_parallel", "live_parallel_multiple"} <= bfcl.HELD_OUT_CATEGORIES
    # input order kept, seeded
    order = [t.task_id for t in tasks]
    assert [t.task_id for t in ev] == sorted((t.task_id for t in ev), key=order.index)
    again = bfcl.split(tasks, seed=0)
    assert [t.task_id for t in again[1]] == [t.task_id for t in ev]
    other = bfcl.split(tasks, seed=1)
    assert [t.task_id for t in other[1]] != [t.task_id for t in ev]
    assert bfcl.split(tasks, seed=0, eval_fraction=0.0)[0] == [t for t in tasks if t.category not in bfcl.HELD_OUT_CATEGORIES]
    with pytest.raises(ValueError):
        bfcl.split(tasks, seed=0, eval_fraction=1.5)


def test_a_tasks_side_does_not_depend_on_the_other_categories():
    """Data building splits one category at a time, evaluation several at once: same sides."""
    par, mul, simple = _tasks(40, "parallel"), _tasks(20, "multiple"), _tasks(30, "simple_python")
    _, ev_all = bfcl.split(par + mul + simple, seed=0)
    ev_each = set()
    for cat in (simple, par, mul):
        ev_each |= {t.task_id for t in bfcl.split(cat, seed=0)[1]}
    assert {t.task_id for t in ev_all} == ev_each


def test_data_built_with_any_seed_holds_no_evaluation_task(tmp_path):
    """`data build --source bfcl --seed N` samples with N but always splits with --split-seed
    (default 0), the split `hf-asynclm eval` and the benchmarks hold out."""
    import json

    from click.testing import CliRunner

    from hf_asynclm_cli.data_cmd import data

    cats = [c for c in bfcl.available_categories(MINI) if c != "multi_turn_base"]
    tasks = [bfcl.to_task(e, c) for c in cats for e in bfcl.load_category(c, MINI)]
    _, ev = bfcl.split(tasks, seed=0)
    eval_ids = {t.task_id for t in ev}
    assert eval_ids
    seen = set()
    for seed in (0, 1, 2, 5, 7):
        out = tmp_path / f"b{seed}.jsonl"
        r = CliRunner().invoke(data, ["build", "--out", str(out), "--n", "200", "--seed", str(seed), "--source", "bfcl",
                                      "--data-dir", str(MINI), "--modes", "async", "--max-tokens", "0"])
        assert r.exit_code == 0, r.output
        ids = {json.loads(line)["task_id"] for line in out.read_text().splitlines()}
        assert not ids & eval_ids, sorted(ids & eval_ids)
        seen |= ids
    assert seen  # something was built
    # another split seed is another split (on purpose only)
    r = CliRunner().invoke(data, ["build", "--out", str(tmp_path / "x.jsonl"), "--n", "200", "--seed", "1", "--split-seed", "1",
                                  "--source", "bfcl", "--data-dir", str(MINI), "--modes", "async", "--max-tokens", "0"])
    assert r.exit_code == 0, r.output


def test_plan_latencies_rounded_or_exact(tmp_path):
    """`--plan-latencies exact` writes the cheat sheet's latencies to the millisecond (as
    `hf-asynclm eval` draws them), `rounded` (the default) to 10 ms above 100 ms; same tasks."""
    import json
    import re

    from click.testing import CliRunner

    from hf_asynclm_cli.data_cmd import data

    def build(*extra):
        out = tmp_path / f"p{len(extra)}.jsonl"
        r = CliRunner().invoke(data, ["build", "--out", str(out), "--n", "200", "--seed", "3", "--source", "bfcl",
                                      "--data-dir", str(MINI), "--modes", "async", "--max-tokens", "0",
                                      "--cheat-sheet", "1.0", "--split", "eval", *extra])  # the mini fixture's larger side
        assert r.exit_code == 0, r.output
        examples = [json.loads(line) for line in out.read_text().splitlines()]
        plans = [[m["content"] for m in ex["messages"] if m["role"] == "user"][-1].split("\nPlan: ")[1] for ex in examples]
        return [ex["task_id"] for ex in examples], [int(x) for p in plans for x in re.findall(r"~(\d+)ms", p)]

    ids_r, rounded = build()
    ids_e, exact = build("--plan-latencies", "exact")
    assert ids_r == ids_e and len(rounded) == len(exact) > 100
    assert all(1 <= x <= 1000 for x in rounded + exact)
    assert all(x % 10 == 0 for x in rounded if x >= 100)
    assert sum(x % 10 != 0 for x in exact if x >= 100) > len(exact) // 2
    assert all(abs(a - b) <= 5 for a, b in zip(rounded, exact))  # the same draws, rounded or not
    bad = CliRunner().invoke(data, ["build", "--out", str(tmp_path / "x.jsonl"), "--source", "bfcl", "--data-dir", str(MINI),
                                    "--plan-latencies", "approx"])
    assert bad.exit_code != 0 and "approx" in bad.output


def test_latency_range_option(tmp_path):
    """`--latency-ms LOW,HIGH` draws the cheat sheet's latencies, the tools' and the execution
    times from that range (the same tasks, the same draws scaled); bad ranges are refused."""
    import json
    import re

    from click.testing import CliRunner

    from hf_asynclm_cli.data_cmd import data

    def build(*extra):
        out = tmp_path / f"l{len(extra)}.jsonl"
        r = CliRunner().invoke(data, ["build", "--out", str(out), "--n", "200", "--seed", "3", "--source", "bfcl",
                                      "--data-dir", str(MINI), "--modes", "async", "--max-tokens", "0",
                                      "--cheat-sheet", "1.0", "--split", "eval", "--plan-latencies", "exact", *extra])
        assert r.exit_code == 0, r.output
        return [json.loads(line) for line in out.read_text().splitlines()]

    def plan_ms(ex):
        plan = [m["content"] for m in ex["messages"] if m["role"] == "user"][-1].split("\nPlan: ")[1]
        return [int(x) for x in re.findall(r"~(\d+)ms", plan)]

    default, narrow = build(), build("--latency-ms", "30,500")
    assert [e["task_id"] for e in default] == [e["task_id"] for e in narrow]
    d_ms = [x for e in default for x in plan_ms(e)]
    n_ms = [x for e in narrow for x in plan_ms(e)]
    assert len(d_ms) == len(n_ms) > 100
    assert all(30 <= x <= 500 for x in n_ms) and max(d_ms) > 600
    # one uniform draw per latency, mapped onto the new range: the order of the draws is kept
    assert all(abs((a - 1) / 999 * 470 + 30 - b) <= 1 for a, b in zip(d_ms, n_ms))
    for ex in narrow:
        expected = ex["meta"]["expected_ms"]
        assert all(30 <= v <= 500 for v in expected.values())
        assert sorted(round(v) for v in expected.values()) == sorted(plan_ms(ex))  # the prompt shows what runs
        tool_ms = [f["function"]["x-latency-ms"] for f in ex["tools"]]
        assert tool_ms and all(30 <= x <= 500 for x in tool_ms)
    for bad in ("0,10", "500,30", "abc", "1,70000"):
        r = CliRunner().invoke(data, ["build", "--out", str(tmp_path / "x.jsonl"), "--source", "bfcl",
                                      "--data-dir", str(MINI), "--latency-ms", bad])
        assert r.exit_code != 0 and "LOW,HIGH" in r.output, (bad, r.output)


def test_latency_range_synthetic_tools():
    """Synthetic tasks outside the demo prompt get tool latencies from ``latency_range_ms``;
    the default range keeps the tasks exactly as before."""
    from hf_asynclm.data.synthetic import generate_tasks

    base = generate_tasks(40, seed=5, demo_prompt_p=0.0)
    again = generate_tasks(40, seed=5, demo_prompt_p=0.0, latency_range_ms=(1, 1000))
    narrow = generate_tasks(40, seed=5, demo_prompt_p=0.0, latency_range_ms=(200, 250))
    assert [t.tools for t in base] == [t.tools for t in again]
    assert [t.messages for t in base] == [t.messages for t in narrow]
    lat = [f["function"]["x-latency-ms"] for t in narrow for f in t.tools]
    assert lat and all(200 <= x <= 250 for x in lat)
    with pytest.raises(ValueError, match="latency_range_ms"):
        generate_tasks(1, latency_range_ms=(5, 1))


# --------------------------------------------------------------------------- real data


def test_real_bfcl_package_counts():
    pytest.importorskip("bfcl_eval")
    root = bfcl.bfcl_data_dir()
    expected = {
        "simple_python": 400,
        "multiple": 200,
        "parallel": 200,
        "parallel_multiple": 200,
        "live_parallel": 16,
        "live_parallel_multiple": 24,
        "multi_turn_base": 200,
    }
    for cat, n in expected.items():
        tasks = bfcl.load_tasks(cat, data_dir=root)
        assert len(tasks) == n, cat
        assert all(t.calls for t in tasks), cat
        if cat.startswith("multi_turn"):
            assert all(1 <= len(t.calls) <= 7 for t in tasks)
        for t in tasks:
            assert not _types(t.tools) & {"dict", "float", "tuple", "any"}
            r = match_task([(c.name, c.arguments) for c in t.calls], t)
            assert r.valid, (t.task_id, r.errors)
    assert all(len(t.calls) >= 2 for t in bfcl.load_tasks("parallel", data_dir=root))
    ms = bfcl.multistep_parallel_tasks(10, seed=0, data_dir=root)
    assert all(len(t.meta["parts"]) == 3 for t in ms)


def test_data_build_bfcl_categories_picks_tasks_and_keeps_the_default_draw(tmp_path):
    """`data build --bfcl-categories parallel,parallel_multiple` builds traces of those categories
    only (the same tasks of them as the full draw); naming every category is the default draw, and
    the option is checked (unknown names, non-BFCL sources)."""
    import json

    from click.testing import CliRunner

    from hf_asynclm_cli.data_cmd import bfcl_tasks, data

    base = ["build", "--n", "200", "--seed", "4", "--source", "bfcl", "--data-dir", str(MINI), "--modes", "async",
            "--max-tokens", "0", "--cheat-sheet", "1.0", "--split", "eval"]  # the mini fixture's larger side

    def build(name, *extra):
        out = tmp_path / name
        r = CliRunner().invoke(data, [*base, "--out", str(out), *extra])
        assert r.exit_code == 0, r.output
        return [json.loads(line) for line in out.read_text().splitlines()]

    everything = build("all.jsonl")
    picked = build("par.jsonl", "--bfcl-categories", "parallel,parallel_multiple")
    assert {ex["category"] for ex in everything} > {"parallel", "parallel_multiple"}
    assert picked and {ex["category"] for ex in picked} <= {"parallel", "parallel_multiple"}
    # the same tasks of those categories as the full draw holds (one side of the split)
    par_ids = {ex["task_id"] for ex in everything if ex["category"] in ("parallel", "parallel_multiple")}
    assert {ex["task_id"] for ex in picked} == par_ids
    # naming every category is the default draw, line for line
    every = "simple_python,multiple,parallel,parallel_multiple,multi_turn_base,multistep_parallel"
    assert build("every.jsonl", "--bfcl-categories", every) == everything
    multistep = build("ms.jsonl", "--bfcl-categories", "multistep_parallel")
    assert multistep and {ex["category"] for ex in multistep} == {"multistep_parallel"}

    for extra, words in ((["--bfcl-categories", "parallel,live_simple"], "unknown BFCL category(s) live_simple"),
                         (["--bfcl-categories", " , "], "unknown BFCL category(s) (none)")):
        r = CliRunner().invoke(data, [*base, "--out", str(tmp_path / "bad.jsonl"), *extra])
        assert r.exit_code == 2 and words in r.output, r.output
    r = CliRunner().invoke(data, ["build", "--out", str(tmp_path / "s.jsonl"), "--n", "5", "--bfcl-categories", "parallel"])
    assert r.exit_code == 2 and "use it with --source bfcl or both" in r.output, r.output
    with pytest.raises(ValueError, match="unknown BFCL training categories live_simple"):
        bfcl_tasks(5, 0, data_dir=str(MINI), categories=["live_simple"])
    with pytest.raises(ValueError, match=r"unknown BFCL training categories \(none\)"):
        bfcl_tasks(5, 0, data_dir=str(MINI), categories=[])
