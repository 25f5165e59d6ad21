"""Synthetic tool-use tasks with real data flow, for training CML checkpoints.

Tasks are built over a catalogue of tools: the demo tools of :mod:`hf_asynclm.demo_tools`
(so a checkpoint trained on this data works with the CLI's default tools) and a few generic
ones (:func:`get_stock`, :func:`get_distance`, :func:`send_message`). Every call's result is
computed by the tool's own (pure, hash-seeded) function, see :func:`tool_result`, and a later
call's argument may be a value copied out of an earlier call's **result** (the flight code
that ``find_flight`` returned goes into ``book_flight(code=...)``).

Shapes (the task's ``category``):

* ``single``: one call;
* ``parallel``: 2-4 independent calls (one tool for several values, or different tools);
* ``chain``: 2-3 calls, each fed by the previous result;
* ``mixed``: two chains side by side, or a chain next to 1-2 independent calls.

Values (cities, names, dates, titles, codes, amounts) come from large random pools: random
syllable names ("Varnok"), random dates and numbers, and a list of real cities; results are
random-looking too. A value's split (``train`` or ``eval``) is a stable hash of the value
(:func:`value_split`), so tasks generated for evaluation never share a city, name, date or
code with the training tasks (:func:`train_eval_split`). Small closed sets (currencies,
numbers of nights) are shared.

Every task carries its final answer: ``task.answer`` is the canonical text and
``task.meta["answer_parts"]`` the same text cut into one sentence per call, each with the
ids of the calls whose results it quotes (``needs``); the simulator writes a sentence only
after those results have arrived. ``task.meta["followup"]`` is an optional extra request
("Also get the time in Lima.") that the simulator can send as a user interrupt.

Tool schemas carry ``"x-latency-ms"``: a fresh random latency per task and tool (so that the
model learns to read it, for the LPT rule), or, in part of the tasks, the whole demo catalogue
with the demo tools' real latencies (exactly the prompt the CLI builds).

Example:

```python
>>> from hf_asynclm.data.synthetic import generate_tasks, tool_result
>>> tasks = generate_tasks(4, seed=1, shapes=["chain"])
>>> t = tasks[0]
>>> t.category, len(t.calls) >= 2, bool(t.calls[1].depends_on)
('chain', True, True)
>>> first, second = t.calls[0], t.calls[1]
>>> any(v in second.arguments.values() for v in tool_result(first).values())  # real data flow
True
>>> generate_tasks(4, seed=1, shapes=["chain"])[0] == t                       # seeded
True

```
"""

from __future__ import annotations

import copy
import functools
import random
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from .. import demo_tools as dt
from ..demo_tools import random_code, random_name, seeded_rng
from ..executor.registry import add_value_rules, mark_free_text
from .tasks import PlannedCall, Task

__all__ = [
    "SHAPES",
    "REAL_CITIES",
    "catalogue",
    "catalogue_schemas",
    "generate_tasks",
    "get_distance",
    "get_stock",
    "send_message",
    "tool_result",
    "train_eval_split",
    "value_split",
]

#: Task shapes and their default weights.
SHAPES: dict[str, float] = {"single": 0.2, "parallel": 0.3, "chain": 0.3, "mixed": 0.2}

# ---------------------------------------------------------------------------------------------
# Generic tools (synthetic data only; pure and hash-seeded like the demo tools)
# ---------------------------------------------------------------------------------------------


def get_stock(symbol: str) -> dict:
    """Latest price of a stock in USD.

    Args:
        symbol: Ticker symbol, e.g. "ACME".
    """
    rng = seeded_rng("stock", symbol)
    return {"symbol": symbol, "price": round(rng.uniform(2, 900), 2)}


def get_distance(origin: str, destination: str) -> dict:
    """Road distance between two cities.

    Args:
        origin: Start city.
        destination: End city.
    """
    a, b = sorted([origin.strip().lower(), destination.strip().lower()])
    return {"km": seeded_rng("distance", a, b).randint(12, 4800)}


def send_message(to: str, text: str) -> dict:
    """Send a short text message.

    Args:
        to: Recipient name.
        text: Message text.
    """
    return {"id": random_code(seeded_rng("message", to, text), 4), "sent": True}


_GENERIC: tuple[tuple[Callable[..., dict], int], ...] = ((get_stock, 200), (get_distance, 150), (send_message, 100))
#: String parameters whose values the model composes rather than copies (``"x-free-text"``: exempt
#: from ``constrain_calls="grounded"``): a message body such as ``"Booked, seat 6C"``.
_FREE_TEXT: dict[str, tuple[str, ...]] = {"send_message": ("text",)}
#: What the generic tools' parameters accept beyond their type (see ``demo_tools.VALUE_RULES``).
_VALUE_RULES: dict[str, dict[str, dict[str, Any]]] = {
    "get_stock": {"symbol": {"pattern": r"^[A-Z][A-Z0-9.]{0,5}$"}},
    "get_distance": {"origin": {"pattern": dt.NAME_PATTERN}, "destination": {"pattern": dt.NAME_PATTERN}},
    "send_message": {"to": {"pattern": dt.NAME_PATTERN}},
}

# ---------------------------------------------------------------------------------------------
# Value pools
# ---------------------------------------------------------------------------------------------

REAL_CITIES: tuple[str, ...] = (
    "Paris", "Tokyo", "London", "New York", "Berlin", "Rome", "Madrid", "Lisbon", "Oslo", "Lima",
    "Cairo", "Nairobi", "Lagos", "Accra", "Dakar", "Tunis", "Algiers", "Casablanca", "Addis Ababa",
    "Kampala", "Kigali", "Luanda", "Harare", "Lusaka", "Maputo", "Durban", "Cape Town", "Windhoek",
    "Dublin", "Edinburgh", "Cardiff", "Amsterdam", "Brussels", "Luxembourg", "Zurich", "Geneva",
    "Vienna", "Prague", "Warsaw", "Krakow", "Budapest", "Bratislava", "Ljubljana", "Zagreb",
    "Belgrade", "Sofia", "Bucharest", "Athens", "Istanbul", "Ankara", "Helsinki", "Stockholm",
    "Copenhagen", "Reykjavik", "Tallinn", "Riga", "Vilnius", "Kyiv", "Tbilisi", "Yerevan", "Baku",
    "Tehran", "Baghdad", "Amman", "Beirut", "Riyadh", "Doha", "Dubai", "Muscat", "Karachi",
    "Lahore", "Delhi", "Mumbai", "Chennai", "Kolkata", "Dhaka", "Kathmandu", "Colombo", "Bangkok",
    "Hanoi", "Manila", "Jakarta", "Singapore", "Kuala Lumpur", "Seoul", "Busan", "Osaka", "Kyoto",
    "Beijing", "Shanghai", "Shenzhen", "Taipei", "Hong Kong", "Ulaanbaatar", "Sydney", "Melbourne",
    "Perth", "Auckland", "Wellington", "Suva", "Honolulu", "Anchorage", "Vancouver", "Seattle",
    "Toronto", "Montreal", "Chicago", "Boston", "Denver", "Austin", "Dallas", "Houston", "Miami",
    "Atlanta", "Phoenix", "San Diego", "Los Angeles", "San Francisco", "Mexico City", "Havana",
    "Bogota", "Quito", "Caracas", "Santiago", "Buenos Aires", "Montevideo", "Asuncion", "La Paz",
    "Sao Paulo", "Rio de Janeiro", "Recife", "Manaus", "Panama City", "San Jose", "Kingston",
    "Marseille", "Lyon", "Nice", "Munich", "Hamburg", "Cologne", "Milan", "Naples", "Venice",
    "Porto", "Seville", "Valencia", "Barcelona", "Bergen", "Gothenburg", "Aarhus", "Antwerp",
)

#: Values that always belong to the training split (the CLI's demo prompts use them).
PINNED_TRAIN: frozenset[str] = frozenset({"paris", "tokyo", "london", "new york", "berlin", "rome"})

_TITLE_NOUNS = (
    "Lunch", "Dinner", "Coffee", "Call", "Meeting", "Review", "Demo", "Interview", "Yoga",
    "Dentist", "Doctor", "Haircut", "Gym", "Standup", "Sync", "Workshop", "Lecture", "Concert",
    "Movie", "Run", "Tennis", "Piano", "Study", "Drinks", "Brunch", "Checkup", "Training",
)
_MESSAGE_BASES = ("Running late", "On my way", "Call me", "See you at", "Meet at", "Landing at", "Done by", "Back at")
_PRICE_CAPS = (100, 120, 150, 180, 200, 250, 300)


def value_split(value: Any) -> str:
    """``"eval"`` for about one value in five (stable hash of the lowercased text), else ``"train"``.

    ```python
    >>> value_split("Paris")  # pinned: the CLI's demo prompts use it
    'train'

    ```
    """
    text = str(value).strip().lower()
    if text in PINNED_TRAIN:
        return "train"
    return "eval" if zlib.crc32(text.encode()) % 5 == 0 else "train"


class Pools:
    """Random values for one split (``train``, ``eval`` or ``all``), drawn with ``rng``."""

    def __init__(self, rng: random.Random, split: str = "train", real_city_p: float = 0.35) -> None:
        if split not in ("train", "eval", "all"):
            raise ValueError(f"split must be 'train', 'eval' or 'all', not {split!r}")
        self.rng = rng
        self.split = split
        self.real_city_p = real_city_p

    def _draw(self, make: Callable[[], Any], exclude: Iterable[Any] = ()) -> Any:
        excluded = {str(e).lower() for e in exclude}
        for _ in range(1000):
            v = make()
            if str(v).lower() in excluded:
                continue
            if self.split == "all" or value_split(v) == self.split:
                return v
        raise RuntimeError("could not draw a value for the split")  # pragma: no cover

    def city(self, exclude: Iterable[str] = ()) -> str:
        r = self.rng
        return self._draw(lambda: r.choice(REAL_CITIES) if r.random() < self.real_city_p else random_name(r), exclude)

    def person(self, exclude: Iterable[str] = ()) -> str:
        r = self.rng
        return self._draw(lambda: f"{random_name(r, 2, 2)} {random_name(r, 2, 2)}", exclude)

    def first_name(self, exclude: Iterable[str] = ()) -> str:
        return self._draw(lambda: random_name(self.rng, 2, 2), exclude)

    def date(self, exclude: Iterable[str] = ()) -> str:
        r = self.rng
        return self._draw(lambda: f"{r.randint(2026, 2029)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}", exclude)

    def clock(self) -> str:
        return f"{self.rng.randint(7, 21):02d}:{self.rng.randrange(0, 60, 5):02d}"

    def title(self, exclude: Iterable[str] = ()) -> str:
        r = self.rng
        return self._draw(lambda: f"{r.choice(_TITLE_NOUNS)} with {random_name(r, 2, 2)}", exclude)

    def code(self, exclude: Iterable[str] = ()) -> str:
        return self._draw(lambda: random_code(self.rng), exclude)

    def symbol(self, exclude: Iterable[str] = ()) -> str:
        r = self.rng
        return self._draw(lambda: "".join(r.choice("ABCDEFGHKLMNPRSTVWXZ") for _ in range(r.randint(3, 4))), exclude)

    def amount(self) -> int:
        return self._draw(lambda: self.rng.randint(5, 5000))

    def currency(self, exclude: Iterable[str] = ()) -> str:
        ex = set(exclude)
        return self.rng.choice([c for c in dt.CURRENCIES if c not in ex])

    def nights(self) -> int:
        return self.rng.randint(1, 9)

    def message(self) -> str:
        return self._draw(lambda: f"{self.rng.choice(_MESSAGE_BASES)} {self.clock()}")


# ---------------------------------------------------------------------------------------------
# Catalogue
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolSpec:
    """A tool of the catalogue and how tasks talk about it.

    ``asks``: one-call requests (full sentences); ``verbs``: imperative clauses for requests
    that combine several calls; ``multi``: requests for one tool over several values of
    ``multi_arg`` (``{list}`` is "A, B and C"); ``answer``: the answer sentence, formatted with
    the call's arguments (also as ``arg_<name>``) and its result.
    """

    name: str
    fn: Callable[..., dict]
    prefix: str
    latency_ms: int
    make_args: Callable[[Pools], dict[str, Any]]
    asks: tuple[str, ...]
    verbs: tuple[str, ...]
    answer: str
    multi: tuple[str, ...] = ()
    multi_arg: str | None = None
    demo: bool = True


def _two_cities(p: Pools) -> tuple[str, str]:
    a = p.city()
    return a, p.city(exclude=[a])


def _flight_args(p: Pools) -> dict[str, Any]:
    o, d = _two_cities(p)
    return {"origin": o, "destination": d, "date": p.date()}


def _hotel_args(p: Pools) -> dict[str, Any]:
    args: dict[str, Any] = {"city": p.city()}
    if p.rng.random() < 0.25:
        args["max_price"] = p.rng.choice(_PRICE_CAPS)
    return args


def _convert_args(p: Pools) -> dict[str, Any]:
    a = p.currency()
    return {"amount": p.amount(), "from_currency": a, "to_currency": p.currency(exclude=[a])}


def _distance_args(p: Pools) -> dict[str, Any]:
    o, d = _two_cities(p)
    return {"origin": o, "destination": d}


_SPECS: tuple[ToolSpec, ...] = (
    ToolSpec(
        "get_weather", dt.get_weather, "w", 300, lambda p: {"city": p.city()},
        asks=("What's the weather in {city}?", "Weather in {city}?", "How is the weather in {city}?"),
        verbs=("get the weather in {city}", "check the weather in {city}"),
        answer="{city}: {temp_c} C, {sky}.",
        multi=("What's the weather in {list}?", "Weather in {list}?", "How is the weather in {list}?"),
        multi_arg="city",
    ),
    ToolSpec(
        "get_time", dt.get_time, "t", 80, lambda p: {"city": p.city()},
        asks=("What time is it in {city}?", "Local time in {city}?"),
        verbs=("get the time in {city}", "tell me the local time in {city}"),
        answer="{city}: {time}.",
        multi=("What time is it in {list}?", "Local time in {list}?"),
        multi_arg="city",
    ),
    ToolSpec(
        "find_flight", dt.find_flight, "f", 600, _flight_args,
        asks=("Find a flight from {origin} to {destination} on {date}.", "Any flight {origin} to {destination} on {date}?"),
        verbs=("find a flight from {origin} to {destination} on {date}",),
        answer="{origin}-{destination}: {code} at {dep}, ${price}.",
    ),
    ToolSpec(
        "flight_status", dt.flight_status, "s", 250, lambda p: {"code": p.code()},
        asks=("Where does flight {code} land?", "Status of flight {code}?"),
        verbs=("check flight {code}", "get the status of flight {code}"),
        answer="{code} lands in {dest}, gate {gate}.",
        multi=("Where do flights {list} land?", "Status of flights {list}?"),
        multi_arg="code",
    ),
    ToolSpec(
        "book_flight", dt.book_flight, "b", 450, lambda p: {"code": p.code(), "passenger": p.person()},
        asks=("Book flight {code} for {passenger}.", "Get {passenger} a seat on {code}."),
        verbs=("book flight {code} for {passenger}",),
        answer="{passenger} is on {code}: ref {ref}, seat {seat}.",
    ),
    ToolSpec(
        "find_hotel", dt.find_hotel, "h", 500, _hotel_args,
        asks=("Find a hotel in {city}{cap}.", "Any hotel in {city}{cap}?"),
        verbs=("find a hotel in {city}{cap}",),
        answer="{city}: {name}, ${price} a night.",
        multi=("Find hotels in {list}.",),
        multi_arg="city",
    ),
    ToolSpec(
        "book_hotel", dt.book_hotel, "r", 400, lambda p: {"hotel_id": p.code(), "nights": p.nights()},
        asks=("Book {nights} nights at hotel {hotel_id}.",),
        verbs=("book {nights} nights at hotel {hotel_id}",),
        answer="Booked {nights} nights at {hotel_id}: ref {ref}, ${total}.",
    ),
    ToolSpec(
        "get_calendar", dt.get_calendar, "c", 120, lambda p: {"date": p.date()},
        asks=("What's on my calendar on {date}?", "Am I free on {date}?"),
        verbs=("check my calendar on {date}",),
        answer="{date}: {events} events, free at {free}.",
        multi=("What's on my calendar on {list}?",),
        multi_arg="date",
    ),
    ToolSpec(
        "add_event", dt.add_event, "e", 200,
        lambda p: {"title": p.title(), "date": p.date(), "time": p.clock()},
        asks=("Add {title} on {date} at {time}.", "Put {title} in my calendar on {date} at {time}."),
        verbs=("add {title} on {date} at {time}",),
        answer="Added {title} on {date} at {time}: {id}.",
    ),
    ToolSpec(
        "convert_currency", dt.convert_currency, "x", 150, _convert_args,
        asks=("Convert {amount} {from_currency} to {to_currency}.", "How much is {amount} {from_currency} in {to_currency}?"),
        verbs=("convert {amount} {from_currency} to {to_currency}",),
        answer="{arg_amount} {from_currency} = {amount} {to_currency}.",
    ),
    ToolSpec(
        "get_stock", get_stock, "k", 200, lambda p: {"symbol": p.symbol()},
        asks=("Price of {symbol} stock?", "How much is {symbol} trading at?"),
        verbs=("get the {symbol} stock price",),
        answer="{symbol}: ${price}.",
        multi=("Prices of {list}?", "Stock prices of {list}?"),
        multi_arg="symbol",
        demo=False,
    ),
    ToolSpec(
        "get_distance", get_distance, "d", 150, _distance_args,
        asks=("How far is {origin} from {destination}?", "Distance from {origin} to {destination}?"),
        verbs=("get the distance from {origin} to {destination}",),
        answer="{origin} to {destination}: {km} km.",
        demo=False,
    ),
    ToolSpec(
        "send_message", send_message, "m", 100, lambda p: {"to": p.first_name(), "text": p.message()},
        asks=("Text {to}: {text}.", "Send {to} a message: {text}."),
        verbs=("text {to} '{text}'",),
        answer="Sent to {to}: {id}.",
        demo=False,
    ),
)
_BY_NAME: dict[str, ToolSpec] = {s.name: s for s in _SPECS}


def catalogue() -> dict[str, ToolSpec]:
    """The tools synthetic tasks use, by name (the demo tools first)."""
    return dict(_BY_NAME)


@functools.lru_cache(maxsize=1)
def _schemas() -> dict[str, dict[str, Any]]:
    from transformers.utils import get_json_schema

    out = {s["function"]["name"]: s for s in dt.demo_tool_schemas()}
    for fn, ms in _GENERIC:
        schema = get_json_schema(fn)
        schema["function"].pop("return", None)
        schema["function"]["x-latency-ms"] = ms
        mark_free_text(schema, _FREE_TEXT.get(fn.__name__, ()))
        add_value_rules(schema, _VALUE_RULES.get(fn.__name__, {}))
        out[fn.__name__] = schema
    return out


def catalogue_schemas() -> dict[str, dict[str, Any]]:
    """Tool schemas of the catalogue with their default ``x-latency-ms``, by name (a copy)."""
    return copy.deepcopy(_schemas())


def tool_result(call: PlannedCall) -> dict:
    """The result of a planned call, computed by the tool's pure function (no sleeping).

    ```python
    >>> from hf_asynclm.data.tasks import PlannedCall
    >>> tool_result(PlannedCall("w1", "get_weather", {"city": "Paris"}))["city"]
    'Paris'

    ```
    """
    try:
        spec = _BY_NAME[call.name]
    except KeyError:
        raise KeyError(f"{call.name!r} is not a tool of the synthetic catalogue") from None
    return spec.fn(**call.arguments)


# ---------------------------------------------------------------------------------------------
# Task building
# ---------------------------------------------------------------------------------------------


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _join(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _fields(call: PlannedCall, result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = dict(call.arguments)
    out.update({f"arg_{k}": v for k, v in call.arguments.items()})
    out.update(result)
    return out


#: Draws of fresh arguments before a task keeps a duplicate call (only when ``fixed`` pins them all).
_MAX_REDRAWS = 50


class _Builder:
    """Accumulates the calls and answer sentences of one task."""

    def __init__(self, pools: Pools) -> None:
        self.pools = pools
        self.rng = pools.rng
        self.calls: list[PlannedCall] = []
        self.parts: list[dict[str, Any]] = []
        self.results: dict[str, dict[str, Any]] = {}
        self._counts: dict[str, int] = {}

    def new_id(self, tool: str) -> str:
        prefix = _BY_NAME[tool].prefix
        self._counts[prefix] = self._counts.get(prefix, 0) + 1
        return f"{prefix}{self._counts[prefix]}"

    def add(self, tool: str, depends_on: Sequence[str] = (), **arguments: Any) -> str:
        call = PlannedCall(self.new_id(tool), tool, dict(arguments), depends_on=list(depends_on))
        result = tool_result(call)
        self.calls.append(call)
        self.results[call.call_id] = result
        self.parts.append({"text": _BY_NAME[tool].answer.format(**_fields(call, result)), "needs": [call.call_id]})
        return call.call_id

    def add_random(self, tool: str, **fixed: Any) -> str:
        """Add a call with random arguments (``fixed`` ones kept), never a copy of a call the
        task already has: the same request twice would have two identical answer sentences."""
        taken = [c.arguments for c in self.calls if c.name == tool]
        for _ in range(_MAX_REDRAWS):
            args = _BY_NAME[tool].make_args(self.pools)
            args.update(fixed)
            if args not in taken:
                break
        return self.add(tool, **args)

    def r(self, call_id: str) -> dict[str, Any]:
        return self.results[call_id]

    def pick(self, templates: Sequence[str], **fields: Any) -> str:
        return self.rng.choice(list(templates)).format(**fields)

    def phrase(self, kind: str, call: PlannedCall) -> str:
        """A request for one call: ``kind`` is ``asks`` (a sentence) or ``verbs`` (a clause)."""
        args = dict(call.arguments)
        cap = args.get("max_price")
        args["cap"] = f" under ${cap}" if cap else ""
        return self.pick(getattr(_BY_NAME[call.name], kind), **args)


def _ask_single(b: _Builder, tool: str) -> str:
    b.add_random(tool)
    return b.phrase("asks", b.calls[-1])


def _ask_parallel(b: _Builder, k: int) -> str:
    rng = b.rng
    multi_tools = [s.name for s in _SPECS if s.multi]
    if rng.random() < 0.5:  # one tool over k values: "What's the weather in Paris, Oslo and Lima?"
        spec = _BY_NAME[rng.choice(multi_tools)]
        values: list[Any] = []
        for _ in range(k):
            args = spec.make_args(b.pools)
            while args[spec.multi_arg] in values:
                args = spec.make_args(b.pools)
            values.append(args[spec.multi_arg])
            b.add(spec.name, **{spec.multi_arg: args[spec.multi_arg]})
        return rng.choice(spec.multi).format(list=_join([str(v) for v in values]))
    tools = [rng.choice(list(_BY_NAME)) for _ in range(k)]
    clauses = []
    for tool in tools:
        b.add_random(tool)
        clauses.append(b.phrase("verbs", b.calls[-1]))
    frame = rng.choice(("{a}.", "Please {b}.", "Can you {b}?", "I need you to {b}."))
    return frame.format(a=_cap(_join(clauses)), b=_join(clauses))


# Chains: each adds its calls to the builder and returns the request sentence.


def _chain_flight_book(b: _Builder) -> str:
    f = b.add_random("find_flight")
    a = b.calls[-1].arguments
    p = b.pools.person()
    b.add("book_flight", [f], code=b.r(f)["code"], passenger=p)
    return b.pick(
        (
            "Find a flight from {origin} to {destination} on {date} and book it for {p}.",
            "Book {p} on a flight from {origin} to {destination} on {date}.",
            "{p} flies {origin} to {destination} on {date}: find a flight and book it.",
        ),
        p=p,
        **a,
    )


def _chain_flight_convert(b: _Builder) -> str:
    f = b.add_random("find_flight")
    a = b.calls[-1].arguments
    cur = b.pools.currency(exclude=["USD"])
    b.add("convert_currency", [f], amount=b.r(f)["price"], from_currency="USD", to_currency=cur)
    return b.pick(
        (
            "Find a flight from {origin} to {destination} on {date} and give the price in {cur}.",
            "What does a {origin} to {destination} flight on {date} cost in {cur}?",
        ),
        cur=cur,
        **a,
    )


def _status_then(b: _Builder, tool: str) -> tuple[str, str]:
    """flight_status(code) -> tool(city=<dest from the status>); returns (status id, code)."""
    s = b.add_random("flight_status")
    code = b.calls[-1].arguments["code"]
    b.add(tool, [s], city=b.r(s)["dest"])
    return s, code


def _chain_status_weather(b: _Builder) -> str:
    _, code = _status_then(b, "get_weather")
    return b.pick(("What's the weather where flight {code} lands?", "Flight {code}: weather at its destination?"), code=code)


def _chain_status_time(b: _Builder) -> str:
    _, code = _status_then(b, "get_time")
    return b.pick(("What time is it where flight {code} lands?", "Local time where flight {code} lands?"), code=code)


def _chain_status_hotel(b: _Builder) -> str:
    _, code = _status_then(b, "find_hotel")
    return b.pick(("Find a hotel where flight {code} lands.", "I'm on flight {code}: find a hotel at its destination."), code=code)


def _chain_status_distance(b: _Builder) -> str:
    s = b.add_random("flight_status")
    code = b.calls[-1].arguments["code"]
    home = b.pools.city()
    b.add("get_distance", [s], origin=home, destination=b.r(s)["dest"])
    return b.pick(("How far from {home} does flight {code} land?", "Distance from {home} to where flight {code} lands?"), home=home, code=code)


def _chain_hotel_book(b: _Builder) -> str:
    h = b.add_random("find_hotel")
    a = b.calls[-1].arguments
    n = b.pools.nights()
    b.add("book_hotel", [h], hotel_id=b.r(h)["id"], nights=n)
    cap = f" under ${a['max_price']}" if a.get("max_price") else ""
    return b.pick(
        ("Find a hotel in {city}{cap} and book {n} nights.", "Book {n} nights at a hotel in {city}{cap}."),
        city=a["city"], cap=cap, n=n,
    )


def _chain_hotel_convert(b: _Builder) -> str:
    city = b.pools.city()
    h = b.add("find_hotel", city=city)
    cur = b.pools.currency(exclude=["USD"])
    b.add("convert_currency", [h], amount=b.r(h)["price"], from_currency="USD", to_currency=cur)
    return b.pick(("Find a hotel in {city} and give its price in {cur}.", "Hotel in {city}: nightly price in {cur}?"), city=city, cur=cur)


def _chain_calendar_event(b: _Builder) -> str:
    c = b.add_random("get_calendar")
    date = b.calls[-1].arguments["date"]
    title = b.pools.title()
    b.add("add_event", [c], title=title, date=date, time=b.r(c)["free"])
    return b.pick(
        ("Add {title} at my first free time on {date}.", "Find a free slot on {date} and add {title}."), title=title, date=date
    )


def _chain_stock_convert(b: _Builder) -> str:
    k = b.add_random("get_stock")
    sym = b.calls[-1].arguments["symbol"]
    cur = b.pools.currency(exclude=["USD"])
    b.add("convert_currency", [k], amount=b.r(k)["price"], from_currency="USD", to_currency=cur)
    return b.pick(("Price of {sym} stock in {cur}?", "What is {sym} trading at, in {cur}?"), sym=sym, cur=cur)


def _chain_hotel_book_convert(b: _Builder) -> str:
    city = b.pools.city()
    h = b.add("find_hotel", city=city)
    n = b.pools.nights()
    r = b.add("book_hotel", [h], hotel_id=b.r(h)["id"], nights=n)
    cur = b.pools.currency(exclude=["USD"])
    b.add("convert_currency", [r], amount=b.r(r)["total"], from_currency="USD", to_currency=cur)
    return b.pick(
        ("Book {n} nights at a hotel in {city} and give the total in {cur}.", "Hotel in {city} for {n} nights: book it, total in {cur}?"),
        city=city, n=n, cur=cur,
    )


def _chain_status_hotel_book(b: _Builder) -> str:
    s, code = _status_then(b, "find_hotel")
    h = b.calls[-1].call_id
    n = b.pools.nights()
    b.add("book_hotel", [h], hotel_id=b.r(h)["id"], nights=n)
    return b.pick(("Book {n} nights at a hotel where flight {code} lands.",), code=code, n=n)


def _chain_flight_book_text(b: _Builder) -> str:
    f = b.add_random("find_flight")
    a = b.calls[-1].arguments
    p = b.pools.person()
    bk = b.add("book_flight", [f], code=b.r(f)["code"], passenger=p)
    first = p.split()[0]
    b.add("send_message", [bk], to=first, text=f"Booked, seat {b.r(bk)['seat']}")
    return b.pick(
        ("Book {p} on a flight from {origin} to {destination} on {date} and text {first} the seat.",),
        p=p, first=first, **a,
    )


_CHAINS2: tuple[Callable[[_Builder], str], ...] = (
    _chain_flight_book, _chain_flight_convert, _chain_status_weather, _chain_status_time, _chain_status_hotel,
    _chain_status_distance, _chain_hotel_book, _chain_hotel_convert, _chain_calendar_event, _chain_stock_convert,
)
_CHAINS3: tuple[Callable[[_Builder], str], ...] = (
    _chain_hotel_book_convert, _chain_status_hotel_book, _chain_flight_book_text,
)


def _ask_chain(b: _Builder) -> str:
    chain = b.rng.choice(_CHAINS3) if b.rng.random() < 0.3 else b.rng.choice(_CHAINS2)
    return chain(b)


def _ask_mixed(b: _Builder) -> str:
    first = _ask_chain(b)
    if b.rng.random() < 0.5:
        second = _ask_chain(b)
    else:
        k = b.rng.randint(1, 2)
        second = " ".join(_ask_single(b, b.rng.choice(list(_BY_NAME))) for _ in range(k))
    return f"{first} {second}"


def _tool_schemas(
    b: _Builder,
    names: Sequence[str],
    demo_prompt_p: float,
    max_distractors: int,
    latency_range_ms: Sequence[float],
) -> list[dict[str, Any]]:
    """The task's tools: the demo catalogue with its real latencies (the CLI's prompt), or the
    needed tools plus a few distractors, shuffled, each with a fresh random latency."""
    from .simulate import sample_latency_ms

    rng = b.rng
    schemas = _schemas()
    needed = list(dict.fromkeys(names))
    if rng.random() < demo_prompt_p:
        tools = dt.demo_tool_schemas()  # a fresh copy
        extra = [n for n in needed if n not in {t["function"]["name"] for t in tools}]
        tools += [copy.deepcopy(schemas[n]) for n in extra]
        return tools
    others = [n for n in _BY_NAME if n not in needed]
    chosen = needed + rng.sample(others, rng.randint(0, min(max_distractors, len(others))))
    rng.shuffle(chosen)
    tools = []
    for name in chosen:
        schema = copy.deepcopy(schemas[name])
        schema["function"]["x-latency-ms"] = sample_latency_ms(rng, *latency_range_ms)
        tools.append(schema)
    return tools


def _followup(b: _Builder, tools: list[dict[str, Any]]) -> dict[str, Any]:
    """An extra request a user may send mid-task ("Also get the time in Lima.")."""
    names = [t["function"]["name"] for t in tools if t["function"]["name"] in _BY_NAME]
    tool = b.rng.choice(names)
    n_calls, n_parts = len(b.calls), len(b.parts)
    b.add_random(tool)
    call, part = b.calls[-1], b.parts[-1]
    del b.calls[n_calls:], b.parts[n_parts:]
    text = "Also " + b.phrase("verbs", call) + "."
    return {"text": text, "calls": [_call_dict(call)], "answer_parts": [part]}


def _call_dict(call: PlannedCall) -> dict[str, Any]:
    return {"call_id": call.call_id, "name": call.name, "arguments": dict(call.arguments),
            "depends_on": list(call.depends_on), "latency_s": call.latency_s}


def generate_tasks(
    n: int,
    seed: int = 0,
    shapes: Sequence[str] | dict[str, float] | None = None,
    split: str = "train",
    demo_prompt_p: float = 0.3,
    max_distractors: int = 3,
    latency_range_ms: Sequence[float] | None = None,
) -> list[Task]:
    """``n`` seeded synthetic tasks.

    ``shapes``: names from :data:`SHAPES` (equal weights) or a ``{shape: weight}`` dict
    (default :data:`SHAPES`). ``split``: ``train``, ``eval`` or ``all``: which values may
    appear (see :func:`value_split`). ``demo_prompt_p``: share of tasks whose prompt lists the
    whole demo catalogue with its real latencies; the others list the needed tools and up to
    ``max_distractors`` others, each with a random ``x-latency-ms`` drawn from
    ``latency_range_ms`` (default
    :data:`~hf_asynclm.data.simulate.DEFAULT_LATENCY_RANGE_MS`, 1-1000 ms).
    """
    from .simulate import DEFAULT_LATENCY_RANGE_MS, check_latency_range

    if latency_range_ms is None:
        latency_range_ms = DEFAULT_LATENCY_RANGE_MS
    latency_range_ms = check_latency_range(latency_range_ms)
    if n < 0:
        raise ValueError("n must be >= 0")
    if shapes is None:
        weights = dict(SHAPES)
    elif isinstance(shapes, dict):
        weights = dict(shapes)
    else:
        weights = {s: 1.0 for s in shapes}
    unknown = [s for s in weights if s not in SHAPES]
    if unknown or not weights:
        raise ValueError(f"unknown shapes {unknown}; choose from {list(SHAPES)}")
    rng = random.Random(f"synthetic:{seed}:{split}")
    names, w = list(weights), [weights[s] for s in weights]
    tasks = []
    for i in range(n):
        shape = rng.choices(names, w)[0]
        trng = random.Random(f"{seed}:{split}:{i}:{rng.random()}")
        b = _Builder(Pools(trng, split))
        if shape == "single":
            request = _ask_single(b, trng.choice(list(_BY_NAME)))
        elif shape == "parallel":
            request = _ask_parallel(b, trng.randint(2, 4))
        elif shape == "chain":
            request = _ask_chain(b)
        else:
            request = _ask_mixed(b)
        tools = _tool_schemas(b, [c.name for c in b.calls], demo_prompt_p, max_distractors, latency_range_ms)
        meta: dict[str, Any] = {
            "answer_parts": b.parts,
            "split": split,
            "followup": _followup(b, tools),
        }
        tasks.append(
            Task(
                task_id=f"syn-{split}-{seed}-{i}",
                source="synthetic",
                category=shape,
                messages=[{"role": "user", "content": request}],
                tools=tools,
                calls=b.calls,
                answer=" ".join(p["text"] for p in b.parts),
                meta=meta,
            )
        )
    return tasks


def train_eval_split(
    n_train: int, n_eval: int, seed: int = 0, shapes: Sequence[str] | dict[str, float] | None = None, **kwargs: Any
) -> tuple[list[Task], list[Task]]:
    """Training and evaluation tasks whose values never overlap.

    Training tasks draw values from the ``train`` half of every pool and evaluation tasks from
    the ``eval`` half (:func:`value_split`), with independent seeds.

    ```python
    >>> train, test = train_eval_split(20, 5, seed=0)
    >>> len(train), len(test), {t.meta["split"] for t in test}
    (20, 5, {'eval'})

    ```
    """
    train = generate_tasks(n_train, seed=seed, shapes=shapes, split="train", **kwargs)
    test = generate_tasks(n_eval, seed=seed, shapes=shapes, split="eval", **kwargs)
    return train, test
