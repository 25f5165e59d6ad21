"""BFCL AST matching: hand-made cases and near misses."""

from __future__ import annotations

import pytest

from hf_asynclm.bench.ast_match import (
    check_call,
    ground_truth_from_calls,
    match_calls,
    match_task,
    standardize_string,
)
from hf_asynclm.data.bfcl import to_tool
from hf_asynclm.data.tasks import PlannedCall, Task


def _fn(name, props, required):
    return {"name": name, "description": "", "parameters": {"type": "dict", "properties": props, "required": required}}


PLAY = _fn("spotify.play", {"artist": {"type": "string"}, "duration": {"type": "integer"}}, ["artist", "duration"])
AREA = _fn(
    "calc_area",
    {
        "base": {"type": "integer"},
        "height": {"type": "float"},
        "unit": {"type": "string"},
        "verbose": {"type": "boolean"},
    },
    ["base", "height"],
)
AREA_GT = {"calc_area": {"base": [10], "height": [5.0], "unit": ["cm", "centimeters", ""], "verbose": ["", False]}}
PLAY_GT = [
    {"spotify.play": {"artist": ["Taylor Swift"], "duration": [20]}},
    {"spotify.play": {"artist": ["Maroon 5"], "duration": [15]}},
]


def simple(name, args, gt=AREA_GT, fns=(AREA,)):
    return match_calls([(name, args)], [gt], list(fns), "simple_python")


# --------------------------------------------------------------------------- simple


def test_exact_match_and_optionals_omitted():
    assert simple("calc_area", {"base": 10, "height": 5.0}).valid
    assert simple("calc_area", {"base": 10, "height": 5.0, "unit": "cm", "verbose": False}).valid


def test_int_accepted_for_float_but_not_float_for_int():
    assert simple("calc_area", {"base": 10, "height": 5}).valid
    r = simple("calc_area", {"base": 10.0, "height": 5.0})
    assert not r.valid and r.error_type == "type_error"


def test_bool_is_not_an_integer_and_string_is_not_a_number():
    r = simple("calc_area", {"base": True, "height": 5.0})
    assert not r.valid and r.error_type == "type_error"
    r = simple("calc_area", {"base": "10", "height": 5.0})
    assert not r.valid and r.error_type == "type_error"


def test_wrong_value():
    r = simple("calc_area", {"base": 11, "height": 5.0})
    assert not r.valid and r.error_type == "value_error" and "base" in r.errors[0]


def test_missing_required():
    r = simple("calc_area", {"base": 10})
    assert not r.valid and r.error_type == "missing_required" and "'height'" in r.errors[0]


def test_extra_param_unknown_to_schema_or_ground_truth():
    r = simple("calc_area", {"base": 10, "height": 5.0, "color": "red"})
    assert not r.valid and r.error_type == "unexpected_param"
    gt = {"calc_area": {"base": [10], "height": [5.0]}}  # "unit" is in the schema but not the answer
    r = simple("calc_area", {"base": 10, "height": 5.0, "unit": "cm"}, gt=gt)
    assert not r.valid and r.error_type == "unexpected_param"


def test_missing_param_that_the_ground_truth_requires():
    gt = {"calc_area": {"base": [10], "height": [5.0], "unit": ["cm"]}}  # not optional here
    r = simple("calc_area", {"base": 10, "height": 5.0}, gt=gt)
    assert not r.valid and r.error_type == "missing_optional"


def test_string_normalisation():
    assert simple("calc_area", {"base": 10, "height": 5.0, "unit": " CM "}).valid
    assert simple("calc_area", {"base": 10, "height": 5.0, "unit": "Centi-Meters"}).valid
    assert not simple("calc_area", {"base": 10, "height": 5.0, "unit": "mm"}).valid
    assert standardize_string("April 1, 2024") == standardize_string("april 1 2024") == "april12024"
    assert standardize_string("it's") == 'it"s'
    assert standardize_string("a*b^c/d.e_f-g,h") == "abcdefgh"


def test_wrong_function_name_and_count():
    r = simple("calc_volume", {"base": 10, "height": 5.0})
    assert not r.valid and r.error_type == "wrong_func_name"
    r = match_calls([("calc_area", {"base": 10, "height": 5.0})] * 2, [AREA_GT], [AREA], "simple_python")
    assert not r.valid and r.error_type == "wrong_count"
    r = match_calls([], [AREA_GT], [AREA], "simple_python")
    assert not r.valid and r.error_type == "wrong_count"


def test_dot_in_name_underscore_variant():
    gt = {"spotify.play": {"artist": ["Taylor Swift"], "duration": [20]}}
    args = {"artist": "Taylor Swift", "duration": 20}
    assert match_calls([("spotify.play", args)], [gt], [PLAY], "simple").valid
    assert match_calls([("spotify_play", args)], [gt], [PLAY], "simple").valid
    assert not match_calls([("spotify_play", args)], [gt], [PLAY], "simple", underscore_to_dot=False).valid
    assert not match_calls([("spotify-play", args)], [gt], [PLAY], "simple").valid


def test_unknown_function_in_ground_truth():
    r = match_calls([("x", {})], [{"x": {}}], [AREA], "simple")
    assert not r.valid and r.error_type == "unknown_function"


def test_none_default_is_the_variable_case():
    fn = _fn("f", {"depth": {"type": "integer"}}, [])
    gt = {"f": {"depth": ["", None]}}
    assert simple("f", {}, gt=gt, fns=[fn]).valid
    assert simple("f", {"depth": None}, gt=gt, fns=[fn]).valid  # a None of the ground truth's type
    r = simple("f", {"depth": 3}, gt=gt, fns=[fn])
    assert not r.valid and r.error_type == "value_error"


# --------------------------------------------------------------------------- lists, tuples, dicts


LISTS = _fn(
    "f",
    {
        "nums": {"type": "array", "items": {"type": "integer"}},
        "names": {"type": "array", "items": {"type": "string"}},
        "point": {"type": "tuple", "items": {"type": "float"}},
    },
    ["nums"],
)


def test_lists_elementwise_in_order_with_string_normalisation():
    gt = {"f": {"nums": [[1, 2, 3]], "names": [["New York", "Paris"], ""], "point": [[1.0, 2.0], ""]}}
    assert simple("f", {"nums": [1, 2, 3]}, gt, [LISTS]).valid
    assert simple("f", {"nums": [1, 2, 3], "names": ["new york", "PARIS"]}, gt, [LISTS]).valid
    assert not simple("f", {"nums": [3, 2, 1]}, gt, [LISTS]).valid  # order matters
    assert not simple("f", {"nums": [1, 2]}, gt, [LISTS]).valid
    r = simple("f", {"nums": [1, "2", 3]}, gt, [LISTS])  # nested type check
    assert not r.valid and r.error_type == "type_error"
    assert simple("f", {"nums": [1, 2, 3], "point": (1.0, 2.0)}, gt, [LISTS]).valid  # tuple compared as list
    assert not simple("f", {"nums": (1, 2, 3)}, gt, [LISTS]).valid  # but not for an array
    assert simple("f", {"nums": [1, 2, 3], "names": []}, gt, [LISTS]).valid  # BFCL: [] passes where "" allowed


DICTS = _fn(
    "update",
    {
        "info": {"type": "dict", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}},
        "rows": {"type": "array", "items": {"type": "dict"}},
    },
    ["info"],
)


def test_dicts_key_by_key():
    gt = {"update": {"info": [{"name": ["John"], "age": [30, ""]}], "rows": [[{"x": [1]}, {"x": [2], "y": ["", "a"]}], ""]}}
    assert simple("update", {"info": {"name": "john"}}, gt, [DICTS]).valid
    assert simple("update", {"info": {"name": "John", "age": 30}}, gt, [DICTS]).valid
    r = simple("update", {"info": {"name": "John", "email": "j@x"}}, gt, [DICTS])
    assert not r.valid and "email" in r.errors[0]
    assert not simple("update", {"info": {"age": 30}}, gt, [DICTS]).valid  # missing key
    assert not simple("update", {"info": {"name": "Jim"}}, gt, [DICTS]).valid
    assert simple("update", {"info": {"name": "John"}, "rows": [{"x": 1}, {"x": 2, "y": "A"}]}, gt, [DICTS]).valid
    assert not simple("update", {"info": {"name": "John"}, "rows": [{"x": 2}, {"x": 1}]}, gt, [DICTS]).valid
    assert not simple("update", {"info": {"name": "John"}, "rows": [{"x": 1}]}, gt, [DICTS]).valid


def test_chat_template_tools_are_accepted():
    tools = [to_tool(AREA), to_tool(DICTS)]
    assert tools[0]["function"]["parameters"]["properties"]["height"]["type"] == "number"
    assert simple("calc_area", {"base": 10, "height": 5}, fns=tools).valid  # number: int ok
    assert not simple("calc_area", {"base": 10.0, "height": 5}, fns=tools).valid
    gt = {"update": {"info": [{"name": ["John"]}]}}
    assert simple("update", {"info": {"name": "John"}}, gt, tools).valid
    assert not simple("update", {"info": "John"}, gt, tools).valid


# --------------------------------------------------------------------------- multiple / parallel


def test_multiple_checks_one_call_of_the_right_function():
    fns = [PLAY, AREA]
    assert match_calls([("calc_area", {"base": 10, "height": 5.0})], [AREA_GT], fns, "multiple").valid
    r = match_calls([("spotify.play", {"artist": "x", "duration": 1})], [AREA_GT], fns, "multiple")
    assert not r.valid and r.error_type == "wrong_func_name"
    r = match_calls([("calc_area", {"base": 10, "height": 5.0})] * 2, [AREA_GT], fns, "live_multiple")
    assert not r.valid and r.error_type == "wrong_count"


def test_parallel_any_order():
    a = ("spotify.play", {"artist": "Taylor Swift", "duration": 20})
    b = ("spotify.play", {"artist": "Maroon 5", "duration": 15})
    r = match_calls([b, a], PLAY_GT, [PLAY], "parallel")
    assert r.valid and r.assignment == {0: 1, 1: 0}
    assert match_calls([a, b], PLAY_GT, [PLAY], "live_parallel").valid


def test_parallel_duplicated_call_is_rejected():
    a = ("spotify.play", {"artist": "Taylor Swift", "duration": 20})
    r = match_calls([a, a], PLAY_GT, [PLAY], "parallel")
    assert not r.valid and r.error_type == "cannot_find_match" and "#1" in r.errors[0]
    b = ("spotify.play", {"artist": "Maroon 5", "duration": 15})
    r = match_calls([a, b, a], PLAY_GT, [PLAY], "parallel")
    assert not r.valid and r.error_type == "wrong_count"


def test_parallel_identical_ground_truth_calls_need_two_emitted_calls():
    gt = [{"spotify.play": {"artist": ["Adele"], "duration": [5]}}] * 2
    a = ("spotify.play", {"artist": "Adele", "duration": 5})
    assert match_calls([a, a], gt, [PLAY], "parallel").valid
    r = match_calls([a, ("spotify.play", {"artist": "Adele", "duration": 6})], gt, [PLAY], "parallel")
    assert not r.valid


def test_parallel_full_assignment_beats_greedy():
    # emitted #0 fits both ground-truth calls, #1 only the first: greedy (BFCL) would give #0 to
    # ground truth 0 and fail; a full assignment exists
    gt = [
        {"spotify.play": {"artist": ["Adele", "Muse"], "duration": [5]}},
        {"spotify.play": {"artist": ["Adele"], "duration": [5]}},
    ]
    r = match_calls([("spotify.play", {"artist": "Adele", "duration": 5}), ("spotify.play", {"artist": "Muse", "duration": 5})], gt, [PLAY], "parallel")
    assert r.valid and r.assignment == {0: 1, 1: 0}
    r = match_calls([("spotify.play", {"artist": "Adele", "duration": 5}), ("spotify.play", {"artist": "Muse", "duration": 5})], gt, [PLAY], "parallel", greedy=True)
    assert not r.valid and "greedy" in r.errors[0]
    assert match_calls([("spotify.play", {"artist": "Muse", "duration": 5}), ("spotify.play", {"artist": "Adele", "duration": 5})], gt, [PLAY], "parallel", greedy=True).valid


def test_parallel_multiple_mixed_functions_with_a_near_miss():
    fns = [PLAY, AREA]
    gt = [PLAY_GT[0], AREA_GT]
    good = [("calc_area", {"base": 10, "height": 5}), ("spotify.play", {"artist": "taylor swift", "duration": 20})]
    assert match_calls(good, gt, fns, "parallel_multiple").valid
    bad = [("calc_area", {"base": 10, "height": 5, "unit": "inch"}), ("spotify.play", {"artist": "Taylor Swift", "duration": 20})]
    r = match_calls(bad, gt, fns, "parallel_multiple")
    assert not r.valid and "calc_area" in r.errors[0] and "unit" in r.errors[0]


# --------------------------------------------------------------------------- chains / tasks


def _chain_task(category="multi_turn_base"):
    fs = [
        _fn("cd", {"folder": {"type": "string"}}, ["folder"]),
        _fn("mkdir", {"dir_name": {"type": "string"}}, ["dir_name"]),
        _fn("add", {"a": {"type": "float"}, "b": {"type": "float"}}, ["a", "b"]),
    ]
    calls = [
        PlannedCall("c1", "cd", {"folder": "document"}),
        PlannedCall("c2", "mkdir", {"dir_name": "temp"}, ["c1"]),
        PlannedCall("c3", "add", {"a": 1.0, "b": 2.0}),
    ]
    return Task("t", "bfcl", category, [], [to_tool(f) for f in fs], calls)


def test_match_task_chain_order_enforced():
    t = _chain_task()
    cd, mk, add = ("cd", {"folder": "document"}), ("mkdir", {"dir_name": "temp"}), ("add", {"a": 1, "b": 2})
    assert match_task([cd, mk, add], t).valid
    assert match_task([add, cd, mk], t).valid  # independent call anywhere
    r = match_task([mk, cd, add], t)
    assert not r.valid and r.error_type == "order"
    assert match_task([mk, cd, add], t, enforce_dependencies=False).valid
    r = match_task([cd, mk], t)
    assert not r.valid and r.error_type == "wrong_count"


def test_match_task_uses_meta_ground_truth():
    t = _chain_task("parallel")
    t.meta["ground_truth"] = ground_truth_from_calls(t.calls)
    t.meta["ground_truth"][0]["cd"]["folder"] = ["document", "docs"]
    assert match_task([("cd", {"folder": "docs"}), ("mkdir", {"dir_name": "temp"}), ("add", {"a": 1.0, "b": 2.0})], t).valid
    assert ground_truth_from_calls([PlannedCall("c1", "cd", {"folder": "x"})]) == [{"cd": {"folder": ["x"]}}]


def test_dependencies_validation():
    gt = ground_truth_from_calls(_chain_task().calls)
    fns = _chain_task().tools
    emitted = [("cd", {"folder": "document"}), ("mkdir", {"dir_name": "temp"}), ("add", {"a": 1.0, "b": 2.0})]
    with pytest.raises(ValueError):
        match_calls(emitted, gt, fns, "multi_turn_base", dependencies=[[]])
    with pytest.raises(ValueError):
        match_calls(emitted, gt, fns, "multi_turn_base", dependencies=[[], [7], []])
    assert match_calls(emitted, gt, fns, "multistep_parallel", dependencies=[[], [0], []]).valid


def test_check_call_single():
    r = check_call("calc_area", {"base": 10, "height": 5.0}, AREA_GT, [AREA])
    assert r and r.errors == []
    with pytest.raises(ValueError):
        check_call("calc_area", {}, {"a": {}, "b": {}}, [AREA])
