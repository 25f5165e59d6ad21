"""Built-in demo tools: travel and calendar helpers with deterministic fake data.

The CLI offers these tools when the user brings none, and the synthetic training tasks
(:mod:`hf_asynclm.data.synthetic`) are built over them, so a checkpoint trained on that
data knows them. They are plain Python functions with type hints and Google-style docstrings,
so :func:`transformers.utils.get_json_schema` turns each into a tool schema.

* Results are **deterministic functions of the arguments** (hash-seeded: the same arguments
  always give the same result; any arguments work, e.g. any city name) and look random:
  temperatures, codes like ``QX481``, prices, times.
* Some outputs feed other tools: ``find_flight`` gives a flight ``code`` for ``book_flight`` and
  ``flight_status``; ``flight_status`` gives the destination city (``dest``) for
  ``get_weather``/``get_time``/``find_hotel``; ``find_hotel`` gives an ``id`` for
  ``book_hotel`` and a ``price`` for ``convert_currency``; ``get_calendar`` gives a ``free``
  time for ``add_event``.
* Results that answer a question about a city echo the city, so that an interrupt says by
  itself which question it answers (``{"city": "Oslo", "temp_c": 4, "sky": "rain"}``).
* Each tool has a simulated latency (:func:`demo_tool_latencies_ms`). Calling the module's
  functions directly returns at once (the simulator uses them that way);
  :func:`demo_tools` returns versions that really sleep for that latency.

Example:

```python
>>> from hf_asynclm.demo_tools import get_weather, demo_tool_latencies_ms, demo_tool_schemas
>>> get_weather("Paris") == get_weather("Paris")
True
>>> sorted(get_weather("Paris"))
['city', 'sky', 'temp_c']
>>> demo_tool_latencies_ms()["get_weather"]
300
>>> demo_tool_schemas()[0]["function"]["x-latency-ms"]
300

```
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import random
import time
from typing import Any, Callable

__all__ = [
    "add_event",
    "book_flight",
    "book_hotel",
    "convert_currency",
    "demo_result",
    "demo_tool_latencies_ms",
    "demo_tool_schemas",
    "demo_tools",
    "find_flight",
    "find_hotel",
    "flight_status",
    "get_calendar",
    "get_time",
    "get_weather",
    "random_code",
    "random_name",
    "seeded_rng",
    "CURRENCIES",
]

#: Currency codes that ``convert_currency`` advertises (any 3-letter code works).
CURRENCIES: tuple[str, ...] = ("USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "NOK", "SEK", "INR")

_SKIES = ("sunny", "cloudy", "rain", "snow", "windy", "fog", "storm", "clear")
_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"  # no I/O: codes stay readable

# Syllables for random names ("Varnok", "Tesmira"): about 60**2..60**3 names, so values drawn
# for evaluation are almost never seen in training.
_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "st", "tr", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ei")
_CODAS = ("", "", "", "n", "r", "l", "s", "k", "m")


def seeded_rng(*parts: Any) -> random.Random:
    """A ``random.Random`` seeded from a stable hash of ``parts`` (strings compared case-insensitively)."""
    norm = [p.strip().lower() if isinstance(p, str) else p for p in parts]
    digest = hashlib.sha256(json.dumps(norm, sort_keys=True, default=str).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def random_name(rng: random.Random, min_syllables: int = 2, max_syllables: int = 3) -> str:
    """A pronounceable random name such as ``Varnok`` or ``Tesmira`` (capitalised)."""
    n = rng.randint(min_syllables, max_syllables)
    parts = []
    for i in range(n):
        coda = rng.choice(_CODAS) if i == n - 1 else ""
        parts.append(rng.choice(_ONSETS) + rng.choice(_VOWELS) + coda)
    return "".join(parts).capitalize()


def random_code(rng: random.Random, digits: int = 3) -> str:
    """A code of two capital letters and ``digits`` digits, e.g. ``QX481``."""
    return rng.choice(_LETTERS) + rng.choice(_LETTERS) + "".join(str(rng.randint(0, 9)) for _ in range(digits))


def _clock(rng: random.Random, first: int = 6, last: int = 22) -> str:
    return f"{rng.randint(first, last):02d}:{rng.randrange(0, 60, 5):02d}"


def _hotel_price(hotel_id: str) -> int:
    return seeded_rng("hotel-price", hotel_id).randint(60, 390)


def _rate(from_currency: str, to_currency: str) -> float:
    if from_currency.strip().upper() == to_currency.strip().upper():
        return 1.0
    # a per-currency value in USD; the pair's rate is the quotient, so rates are consistent
    def usd(c: str) -> float:
        return seeded_rng("usd-value", c.upper()).uniform(0.05, 1.6) if c.upper() != "USD" else 1.0

    return round(usd(from_currency) / usd(to_currency), 4)


# ---------------------------------------------------------------------------------------------
# The tools (pure: no sleeping). Docstrings are the tool descriptions the model sees.
# ---------------------------------------------------------------------------------------------


def get_weather(city: str) -> dict:
    """Current weather in a city.

    Args:
        city: City name, e.g. "Paris".
    """
    rng = seeded_rng("weather", city)
    temp = rng.randint(-8, 36)
    sky = rng.choice(_SKIES if temp < 2 else _SKIES[:3] + _SKIES[4:])  # no snow when warm
    return {"city": city, "temp_c": temp, "sky": sky}


def get_time(city: str) -> dict:
    """Local time in a city.

    Args:
        city: City name, e.g. "Tokyo".
    """
    rng = seeded_rng("time", city)
    return {"city": city, "time": _clock(rng, 0, 23)}


def find_flight(origin: str, destination: str, date: str) -> dict:
    """Find the best flight between two cities on a date.

    Args:
        origin: Departure city.
        destination: Arrival city.
        date: Travel date, YYYY-MM-DD.
    """
    rng = seeded_rng("flight", origin, destination, date)
    return {"code": random_code(rng), "dep": _clock(rng), "price": rng.randint(49, 980)}


def flight_status(code: str) -> dict:
    """Status of a flight: where it lands and its gate.

    Args:
        code: Flight code, e.g. "QX481".
    """
    rng = seeded_rng("status", code)
    return {"code": code, "dest": random_name(rng), "gate": rng.choice("ABCDEFG") + str(rng.randint(1, 40))}


def book_flight(code: str, passenger: str) -> dict:
    """Book a seat on a flight.

    Args:
        code: Flight code from find_flight.
        passenger: Passenger name.
    """
    rng = seeded_rng("book-flight", code, passenger)
    return {"ref": random_code(rng, 4), "seat": f"{rng.randint(1, 42)}{rng.choice('ABCDEF')}"}


def find_hotel(city: str, max_price: int | None = None) -> dict:
    """Find a hotel in a city.

    Args:
        city: City name.
        max_price: Highest price per night in USD.
    """
    rng = seeded_rng("hotel", city, max_price)
    for _ in range(64):  # any id works; pick one whose (id-determined) price fits the budget
        hotel_id = random_code(rng)
        if max_price is None or _hotel_price(hotel_id) <= max_price:
            break
    return {"id": hotel_id, "name": random_name(rng) + " Inn", "price": _hotel_price(hotel_id)}


def book_hotel(hotel_id: str, nights: int) -> dict:
    """Book a hotel room.

    Args:
        hotel_id: Hotel id from find_hotel.
        nights: Number of nights.
    """
    rng = seeded_rng("book-hotel", hotel_id, nights)
    return {"ref": random_code(rng, 4), "total": _hotel_price(hotel_id) * int(nights)}


def get_calendar(date: str) -> dict:
    """Calendar of a day: number of events and the first free time.

    Args:
        date: Day, YYYY-MM-DD.
    """
    rng = seeded_rng("calendar", date)
    return {"date": date, "events": rng.randint(0, 6), "free": _clock(rng, 8, 18)}


def add_event(title: str, date: str, time: str) -> dict:
    """Add an event to the calendar.

    Args:
        title: Event title.
        date: Day, YYYY-MM-DD.
        time: Start time, HH:MM.
    """
    rng = seeded_rng("event", title, date, time)
    return {"id": random_code(rng, 4), "ok": True}


def convert_currency(amount: float, from_currency: str, to_currency: str) -> dict:
    """Convert an amount of money between currencies.

    Args:
        amount: Amount to convert.
        from_currency: Currency code of the amount (choices: ["USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "NOK", "SEK", "INR"])
        to_currency: Target currency code (choices: ["USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "NOK", "SEK", "INR"])
    """
    rate = _rate(from_currency, to_currency)
    return {"amount": round(float(amount) * rate, 2), "rate": rate}


#: A place or a person: capitalised words, maybe joined by a short lower-case particle ("Rio de
#: Janeiro", "Dar es Salaam", "Ludwig van Beethoven").
NAME_PATTERN = r"^[A-Z][A-Za-z'.-]*(?: (?:(?:de|del|della|da|do|dos|das|di|du|des|la|le|el|al|es|am|an|der|den|van|von|y|upon|sur) )?[A-Z][A-Za-z'.-]*)*$"
DATE_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"
CLOCK_PATTERN = r"^(?:[01][0-9]|2[0-3]):[0-5][0-9]$"
CODE_PATTERN = r"^[A-Z0-9]{2}[0-9]{1,4}$"

#: What each demo tool's parameters accept beyond their type, as JSON schema keywords (``pattern``,
#: ``minimum``, ...): the call constraint holds the model's values to them
#: (:class:`hf_asynclm.call_grammar.ValueRule`).
VALUE_RULES: dict[str, dict[str, dict[str, Any]]] = {
    "get_weather": {"city": {"pattern": NAME_PATTERN}},
    "get_time": {"city": {"pattern": NAME_PATTERN}},
    "find_flight": {"origin": {"pattern": NAME_PATTERN}, "destination": {"pattern": NAME_PATTERN}, "date": {"pattern": DATE_PATTERN}},
    "flight_status": {"code": {"pattern": CODE_PATTERN}},
    "book_flight": {"code": {"pattern": CODE_PATTERN}, "passenger": {"pattern": NAME_PATTERN}},
    "find_hotel": {"city": {"pattern": NAME_PATTERN}, "max_price": {"minimum": 1}},
    "book_hotel": {"hotel_id": {"pattern": CODE_PATTERN}, "nights": {"minimum": 1, "maximum": 30}},
    "get_calendar": {"date": {"pattern": DATE_PATTERN}},
    "add_event": {"date": {"pattern": DATE_PATTERN}, "time": {"pattern": CLOCK_PATTERN}},
    "convert_currency": {"amount": {"exclusiveMinimum": 0}},
}

#: The demo tools in catalogue order, with their simulated latency in milliseconds.
_DEMO: tuple[tuple[Callable[..., dict], int], ...] = (
    (get_weather, 300),
    (get_time, 80),
    (find_flight, 600),
    (flight_status, 250),
    (book_flight, 450),
    (find_hotel, 500),
    (book_hotel, 400),
    (get_calendar, 120),
    (add_event, 200),
    (convert_currency, 150),
)
_BY_NAME: dict[str, Callable[..., dict]] = {fn.__name__: fn for fn, _ in _DEMO}


def demo_tool_latencies_ms() -> dict[str, int]:
    """Expected latency of each demo tool in milliseconds (what the tools sleep, and what the
    tool schemas advertise as ``x-latency-ms``)."""
    return {fn.__name__: ms for fn, ms in _DEMO}


def demo_result(name: str, arguments: dict[str, Any]) -> dict:
    """The result of demo tool ``name`` for ``arguments``, computed at once (no sleeping).

    ```python
    >>> demo_result("get_weather", {"city": "Oslo"}) == get_weather(city="Oslo")
    True

    ```
    """
    try:
        fn = _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no demo tool named {name!r}") from None
    return fn(**arguments)


def demo_tools(simulate_latency: bool = True, latency_scale: float = 1.0) -> list[Callable[..., dict]]:
    """The demo tools as callables, for an executor or ``AsyncLM(tools=...)``.

    With ``simulate_latency`` each call sleeps for the tool's latency times ``latency_scale``
    before returning; the callables keep their names, signatures and docstrings
    (``functools.wraps``), so ``get_json_schema`` works on them too.
    """
    if not simulate_latency:
        return [fn for fn, _ in _DEMO]
    out = []
    for fn, ms in _DEMO:
        out.append(_sleeping(fn, ms / 1000.0 * latency_scale))
    return out


def _sleeping(fn: Callable[..., dict], seconds: float) -> Callable[..., dict]:
    @functools.wraps(fn)
    def tool(*args: Any, **kwargs: Any) -> dict:
        time.sleep(seconds)
        return fn(*args, **kwargs)

    tool.latency_ms = round(seconds * 1000)  # type: ignore[attr-defined]
    return tool


@functools.lru_cache(maxsize=1)
def _schemas() -> tuple[dict[str, Any], ...]:
    from transformers.utils import get_json_schema

    from .executor.registry import add_value_rules

    out = []
    for fn, ms in _DEMO:
        schema = get_json_schema(fn)
        schema["function"].pop("return", None)  # never rendered; keeps the JSONL small
        schema["function"]["x-latency-ms"] = ms
        add_value_rules(schema, VALUE_RULES.get(fn.__name__, {}))
        out.append(schema)
    return tuple(out)


def demo_tool_schemas() -> list[dict[str, Any]]:
    """Tool schemas of the demo tools (``{"type": "function", "function": {...}}``) with their
    ``x-latency-ms``; a fresh copy on each call."""
    return copy.deepcopy(list(_schemas()))
