"""Demo tools: deterministic fake data, get_json_schema-compatible, simulated latency."""

from __future__ import annotations

import inspect
import json
import time

import pytest
from transformers.utils import get_json_schema

from hf_asynclm import demo_tools as dt

ARGS = {
    "get_weather": {"city": "Paris"},
    "get_time": {"city": "Tokyo"},
    "find_flight": {"origin": "Oslo", "destination": "Lima", "date": "2027-03-02"},
    "flight_status": {"code": "QX481"},
    "book_flight": {"code": "QX481", "passenger": "Ana Varo"},
    "find_hotel": {"city": "Rome"},
    "book_hotel": {"hotel_id": "HT482", "nights": 3},
    "get_calendar": {"date": "2027-01-04"},
    "add_event": {"title": "Dentist", "date": "2027-01-04", "time": "10:30"},
    "convert_currency": {"amount": 412, "from_currency": "USD", "to_currency": "EUR"},
}


def test_catalogue_names_and_latencies():
    lat = dt.demo_tool_latencies_ms()
    names = [f.__name__ for f in dt.demo_tools(simulate_latency=False)]
    assert names == list(lat) == list(ARGS)
    assert 8 <= len(names) <= 12
    assert all(isinstance(v, int) and 50 <= v <= 1000 for v in lat.values())


@pytest.mark.parametrize("name", list(ARGS))
def test_deterministic_json_results(name):
    a = dt.demo_result(name, ARGS[name])
    b = dt.demo_result(name, dict(ARGS[name]))
    assert a == b
    assert isinstance(a, dict) and a
    json.dumps(a)  # JSON-shaped
    assert len(json.dumps(a)) < 90  # short values: traces stay short


def test_any_arguments_work_and_differ():
    cities = ["Zyx", "Ñuñoa", "a" * 40, "", "Tesmira"]
    temps = {dt.get_weather(c)["temp_c"] for c in cities}
    assert len(temps) > 1
    assert dt.get_weather("Paris") == dt.get_weather(city="Paris")
    assert dt.get_weather("paris")["temp_c"] == dt.get_weather("Paris")["temp_c"]  # case-insensitive seed
    assert dt.get_weather("paris")["city"] == "paris"  # echoes what it was asked
    assert dt.convert_currency(10, "XYZ", "ABC")["amount"] > 0


def test_outputs_feed_other_tools():
    flight = dt.find_flight("Oslo", "Lima", "2027-03-02")
    assert len(flight["code"]) == 5 and flight["code"][:2].isalpha() and flight["code"][2:].isdigit()
    assert "ref" in dt.book_flight(flight["code"], "Ana Varo")
    dest = dt.flight_status(flight["code"])["dest"]
    assert dt.get_weather(dest)["city"] == dest
    hotel = dt.find_hotel("Rome")
    assert dt.book_hotel(hotel["id"], 3)["total"] == 3 * hotel["price"]  # consistent across tools
    capped = dt.find_hotel("Rome", max_price=100)
    assert capped["price"] <= 100
    free = dt.get_calendar("2027-01-04")["free"]
    assert dt.add_event("Dentist", "2027-01-04", free)["ok"] is True
    assert dt.convert_currency(100, "EUR", "EUR") == {"amount": 100.0, "rate": 1.0}


@pytest.mark.parametrize("simulate", [False, True])
def test_get_json_schema_compatible(simulate):
    for fn in dt.demo_tools(simulate_latency=simulate, latency_scale=0.0):
        schema = get_json_schema(fn)
        f = schema["function"]
        assert f["name"] == fn.__name__
        assert f["description"]
        params = list(inspect.signature(fn).parameters)
        assert list(f["parameters"]["properties"]) == params
        for p in f["parameters"]["properties"].values():
            assert p.get("description")
    enum = get_json_schema(dt.convert_currency)["function"]["parameters"]["properties"]["to_currency"]["enum"]
    assert enum == list(dt.CURRENCIES)


def test_schemas_carry_latency():
    schemas = dt.demo_tool_schemas()
    lat = dt.demo_tool_latencies_ms()
    assert {s["function"]["name"]: s["function"]["x-latency-ms"] for s in schemas} == lat
    schemas[0]["function"]["name"] = "changed"
    assert dt.demo_tool_schemas()[0]["function"]["name"] == "get_weather"  # a fresh copy


def test_simulated_latency_really_sleeps():
    tools = {f.__name__: f for f in dt.demo_tools(simulate_latency=True, latency_scale=0.1)}
    t0 = time.perf_counter()
    out = tools["get_time"]("Oslo")  # 80 ms * 0.1
    took = time.perf_counter() - t0
    assert out == dt.get_time("Oslo")
    assert took >= 0.008
    t0 = time.perf_counter()
    dt.get_time("Oslo")
    assert time.perf_counter() - t0 < 0.008  # the module's functions do not sleep
    assert tools["find_flight"].latency_ms == 60


def test_unknown_tool():
    with pytest.raises(KeyError, match="no demo tool"):
        dt.demo_result("nope", {})
