"""Constrained decoding of CML blocks: :class:`CallGrammarProcessor`.

A model that writes CML can still write a block the runtime cannot run: a tool that does not
exist, an argument the tool does not take, a string where the tool wants a number, a missing
``)``. With ``constrain_calls="schema"`` the runtime only lets the model pick tokens that keep
the open block a valid call of one of *its* tools (the idea of grammar-constrained decoding in
TGI, vLLM or llama.cpp, specialised to CML and the tools' JSON schemas):

* ``[CALL]`` is followed by an id and ``[HEAD]`` (or, fire and forget, directly by the call);
* the call is ``name(key=value, ...)`` with ``name`` one of the tools, each ``key`` one of its
  parameters (each at most once), each value a literal of the parameter's JSON type (an
  ``enum`` is one of its values) or the id of an earlier call (a reference the executor
  resolves); ``)`` only once every required parameter is there; ``[END]`` only after ``)``;
* ``[TRAP]`` is followed by ``[END]``; ``[HEAD]`` and ``[END]`` never appear outside a block;
  nothing else (EOS, other markers, special tokens) is allowed inside one.

With ``constrain_calls="grounded"`` every string and number in the arguments must also be copied
from the conversation so far (prompt, tools, the model's own text and the results before the
block; not the CML markers themselves: no value is ``"CALL"`` for having seen ``[CALL]``) or from
the called tool's own schema (descriptions, defaults; never another tool's: ``get_time(city="Number")``
does not stand for ``book_hotel`` documenting "Number of nights"): the value has to appear there
whole, starting and ending where a word (a number) starts and ends, so that ``"Bankrupt"`` does
not stand for ``"Bankruptcy"`` nor ``1000`` for ``1000000000.0``. ``True``/``False``/``None``,
``enum`` values and references to earlier calls need no copy. It is for tasks whose values are
all in the context (extraction-style requests, the BFCL plan in the prompt); a value that must be
computed or translated (``"EUR"`` for "euros") cannot be written under it, except in a string
parameter whose schema marks it free text (``"x-free-text": true``, :data:`FREE_TEXT_KEY`; e.g. a
message body, ``text="Booked, seat 6C"`` composed from a result): its value is held to the schema
rule alone, and to at most :data:`MAX_FREE_TEXT_CHARS` characters. ``Tool.from_callable(fn, free_text=["text"])`` sets the mark.

Under both settings a parameter's JSON schema may say more about its values than their type
(:class:`ValueRule`): ``pattern`` (``"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"`` for a date), ``minLength`` /
``maxLength``, ``minimum`` / ``maximum`` (and their exclusive forms). Grounded, the two hold
together: a value is only begun where some copy from the context both may end and keeps the rule
(``destination="San Francisco"`` must close where the request goes on "San Francisco flight on
...", as the name pattern allows no lower-case word there). The demo tools declare such rules
(:data:`hf_asynclm.demo_tools.VALUE_RULES`).

With ``no_repeat_calls`` (:class:`CallChecker`'s ``earlier_calls``) the model may also not write a call
it has already written in this generation: where the last argument would make the call a repeat,
that value is not offered, so the model turns to another one. What constraints cannot do is choose
for the model: a call left out is still the model's decision. Tokens are checked lazily, most likely first: the processor keeps the valid
tokens among the ``candidates`` most likely ones (greedy decoding takes the best valid token;
sampling samples among those), scanning further down the ranking only when none of them is
valid. Where none of the ``max_scan`` most likely tokens is valid either (a model with a large
vocabulary that has talked itself into a corner, e.g. Gemma after ``[HEAD] co``), it looks through
the whole vocabulary, indexed once by each token's first character, for the best valid tokens;
only where no token at all is valid does it leave the scores alone (the runtime then answers the
broken block with an error interrupt, as without constraints). The processor is stateless: it
reads the open block from ``input_ids`` at every step, so it works inside hf-asynclm's decode
loop (with interrupts and resampled tokens) and in a plain ``model.generate`` alike. It needs
the five markers as single tokens (:func:`~hf_asynclm.cml.add_cml_tokens`).

Example:

```python
>>> from hf_asynclm.call_grammar import CallChecker
>>> schema = {"name": "get_weather", "parameters": {"type": "object",
...     "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}
>>> checker = CallChecker([schema])
>>> [checker.check(body).name for body in ('get_wea', 'get_weather(city="Par', 'get_weather(city="Paris")')]
['PREFIX', 'PREFIX', 'COMPLETE']
>>> [checker.check(body).name for body in ('get_time(', 'get_weather(town=', 'get_weather(days="3"', 'get_weather(days=3)')]
['INVALID', 'INVALID', 'INVALID', 'INVALID']
>>> again = CallChecker([schema], earlier_calls=[("get_weather", {"city": "Paris"})])  # no_repeat_calls
>>> [again.check(body).name for body in ('get_weather(city="Paris")', 'get_weather(city="Paris", days=3)')]
['INVALID', 'COMPLETE']

```
"""

from __future__ import annotations

import enum
import functools
import logging
import re
import weakref
from typing import Any, Iterable, Literal, Mapping, NoReturn, Sequence

import regex
import torch
from transformers import LogitsProcessor

from .cml import MARKERS, marker_token_ids
from .executor.executor import RESERVED_IDS
from .executor.parsing import CallParseError, Ref, parse_call
from .executor.registry import _TYPE_ALIASES

logger = logging.getLogger(__name__)

ConstrainCalls = Literal["off", "schema", "grounded"]
#: The settings of ``AsyncLM(constrain_calls=...)``: no constraint, calls valid for the tools' schemas,
#: or valid calls whose string and number values are copied from the context.
CONSTRAIN_CALLS: tuple[str, ...] = ("off", "schema", "grounded")

#: Key of a string parameter's JSON schema that marks its value free text: under
#: ``constrain_calls="grounded"`` the value need not be copied from the context (a message body the
#: model composes, ``"Booked, seat 6C"``); the schema rule still holds. ``Tool.from_callable(...,
#: free_text=[...])`` sets it.
FREE_TEXT_KEY = "x-free-text"
#: Longest value of a free-text parameter, in characters: then it must end (where ``no_repeat_calls``
#: refuses to end a message the model already sent, it would otherwise write on inside it for ever).
MAX_FREE_TEXT_CHARS = 200

#: Longest run of whitespace allowed between the parts of a call (a model looping on spaces
#: inside a block cannot go on for ever).
MAX_SPACES = 2
#: Deepest nesting of lists / dicts in an argument value.
MAX_DEPTH = 8
#: Most bytes of one character a block may wait for (UTF-8 takes at most four: three pending).
MAX_PENDING_BYTES = 3
#: Longest number literal (a model looping on ``0000...`` cannot go on for ever).
MAX_NUMBER_CHARS = 32

_NAME_CHARS = re.compile(r"[A-Za-z0-9_.]*")
_IDENT_CHARS = re.compile(r"[A-Za-z0-9_]*")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER_PREFIX = re.compile(r"-?\d*(?:\.\d*)?(?:[eE][+-]?\d*)?")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
#: A number in running text (``constrain_calls="grounded"``): not glued to a word or another number.
_NUMBER_IN_TEXT = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?!\d)(?!\.\d)")
_PREHEAD_PARTS = re.compile(r"([ \t\n]*)([A-Za-z0-9_.]*)([ \t\n]*)")
_SPACES = " \t\n"
#: Longest call id (a model looping on id characters cannot go on for ever).
MAX_ID_CHARS = 16
_KEYWORDS = ("True", "False", "None")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}
#: Cache: tokenizer -> (its length, token ids by first character), for the whole-vocabulary search.
_FIRST_CHAR_INDEX: weakref.WeakKeyDictionary[Any, tuple[int, dict[str, torch.Tensor]]] = weakref.WeakKeyDictionary()


def check_constrain_calls(value: str) -> str:
    """Return ``value`` when it is a valid ``constrain_calls`` setting, else raise ``ValueError``."""
    if value not in CONSTRAIN_CALLS:
        raise ValueError(f"unknown constrain_calls {value!r}: use one of {', '.join(CONSTRAIN_CALLS)}")
    return value


def check_bool_setting(name: str, value: Any) -> bool:
    """Return ``value`` when it is a valid on/off runtime setting ``name`` (a bool), else raise ``TypeError``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_no_repeat_calls(value: Any) -> bool:
    """Return ``value`` when it is a valid ``no_repeat_calls`` setting (a bool), else raise ``TypeError``."""
    return check_bool_setting("no_repeat_calls", value)


class Status(enum.Enum):
    """How a call body relates to the grammar."""

    INVALID = 0  #: no continuation makes it a valid call
    PREFIX = 1  #: some continuation does
    COMPLETE = 2  #: a whole, valid call (``[END]`` may follow)


class _Invalid(Exception):
    pass


class _Incomplete(Exception):
    pass


_JSON_TYPES = {"string", "integer", "number", "boolean", "array", "object", "null"}


def _types(schema: Mapping[str, Any] | None) -> set[str]:
    """The JSON types a value may have (empty: any). Python spellings (``float``, ``dict``) are
    read as JSON ones; an unknown type (``any``) allows any value."""
    if not schema:
        return set()
    t = schema.get("type")
    if t is None:
        return set()
    types = {_TYPE_ALIASES.get(str(x).lower(), str(x).lower()) for x in ([t] if isinstance(t, str) else t)}
    return types if types <= _JSON_TYPES else set()


def _function_schema(schema: Mapping[str, Any]) -> Mapping[str, Any]:
    return schema.get("function", schema) if isinstance(schema.get("function"), Mapping) else schema


#: Longest grounded value :meth:`Grounding.completes` looks for (characters after the value's start).
MAX_RULED_VALUE_CHARS = 96


@functools.lru_cache(maxsize=256)
def _compiled_pattern(pattern: str) -> "regex.Pattern[str]":
    return regex.compile(pattern)


class ValueRule:
    """What a parameter's JSON schema says about its values beyond their type: ``pattern`` (a
    regular expression the string must contain a match of, as JSON Schema reads it: anchor it
    with ``^...$`` for the whole value), ``minLength`` / ``maxLength``, and for numbers
    ``minimum`` / ``maximum`` / ``exclusiveMinimum`` / ``exclusiveMaximum``. The call constraint
    holds values to it (``constrain_calls="schema"`` and ``"grounded"``).

    Example:

    ```python
    >>> from hf_asynclm.call_grammar import ValueRule
    >>> date = ValueRule({"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"})
    >>> date.fits("2027-04-06"), date.fits("250ms"), date.may_start("2027-0"), date.may_start("2027 ")
    (True, False, True, False)
    >>> nights = ValueRule({"type": "integer", "minimum": 1, "maximum": 30})
    >>> nights.fits_number(7), nights.fits_number(2028), nights.number_may_start("20"), nights.number_may_start("203")
    (True, False, True, False)

    ```

    Raises:
        ValueError: the pattern is not a valid regular expression, or a bound is not a number.
    """

    def __init__(self, schema: Mapping[str, Any] | None) -> None:
        schema = schema or {}
        pattern = schema.get("pattern")
        try:
            self.pattern = _compiled_pattern(pattern) if isinstance(pattern, str) else None
        except regex.error as exc:
            raise ValueError(f"the pattern {pattern!r} of a tool parameter is not a valid regular expression: {exc}") from None
        self.min_length = int(schema.get("minLength") or 0)
        max_length = schema.get("maxLength")
        self.max_length = int(max_length) if isinstance(max_length, (int, float)) and not isinstance(max_length, bool) else None
        self.low, self.low_open = self._bound(schema, "minimum", "exclusiveMinimum")
        self.high, self.high_open = self._bound(schema, "maximum", "exclusiveMaximum")
        #: What the rule is made of (equal rules, equal keys).
        self.key = (pattern if isinstance(pattern, str) else None, self.min_length, self.max_length,
                    self.low, self.low_open, self.high, self.high_open)

    @staticmethod
    def _bound(schema: Mapping[str, Any], key: str, exclusive: str) -> tuple[float | None, bool]:
        value, open_ = schema.get(key), False
        ex = schema.get(exclusive)
        if isinstance(ex, bool):  # draft 4: a flag on the bound
            open_ = ex
        elif ex is not None:
            value, open_ = ex, True
        if value is None:
            return None, False
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} / {exclusive} of a tool parameter must be a number, got {value!r}")
        return float(value), open_

    @property
    def on_strings(self) -> bool:
        """Whether the rule says anything about strings."""
        return self.pattern is not None or self.min_length > 0 or self.max_length is not None

    @property
    def on_numbers(self) -> bool:
        """Whether the rule says anything about numbers."""
        return self.low is not None or self.high is not None

    def fits(self, value: str) -> bool:
        """Whether the whole string ``value`` keeps the rule."""
        if len(value) < self.min_length or (self.max_length is not None and len(value) > self.max_length):
            return False
        return self.pattern is None or self.pattern.search(value) is not None

    def may_start(self, prefix: str) -> bool:
        """Whether some string that keeps the rule starts with ``prefix``."""
        if self.max_length is not None and len(prefix) > self.max_length:
            return False
        return self.pattern is None or self.pattern.search(prefix, partial=True) is not None

    def fits_number(self, value: float) -> bool:
        """Whether the number ``value`` is within the bounds."""
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def number_may_start(self, literal: str) -> bool:
        """Whether some number within the bounds may be written starting with ``literal`` (a sound
        check: digits added to a whole number only take it further from zero)."""
        if not self.on_numbers or not re.fullmatch(r"-?\d+", literal):
            return True
        value = float(literal)
        if value >= 0 and self.high is not None and value > self.high and literal != "0":
            return False
        if value <= 0 and literal.startswith("-") and self.low is not None and value < self.low:
            return False
        return True


_DOC_KEYS = ("description", "default", "examples", "title")
#: The markers' text in a decoded context (``constrain_calls="grounded"`` copies no value from it).
_MARKER_TEXT = re.compile("|".join(re.escape(m) for m in MARKERS))


def _documentation(value: Any, documenting: bool = False) -> list[str]:
    """The texts and numbers a schema documents (under ``description``, ``default``, ``examples``,
    ``title``), which ``constrain_calls="grounded"`` lets values copy."""
    if isinstance(value, Mapping):
        return [t for k, v in value.items() for t in _documentation(v, documenting or k in _DOC_KEYS)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _documentation(v, documenting)]
    if documenting and not isinstance(value, bool) and isinstance(value, (str, int, float)):
        return [str(value)]
    return []


def _word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


# a name goes on after a value: a space, then a capitalised word ("San| Francisco", "Liverpool| F.C."),
# maybe after a lower-case name particle ("Rio| de Janeiro", "Frankfurt| am Main")
_NAME_PARTICLES = ("de", "del", "della", "da", "do", "dos", "das", "di", "du", "la", "le", "am", "an", "der", "den", "van", "von", "y")
_NAME_GOES_ON = re.compile(r" (?:(?:" + "|".join(_NAME_PARTICLES) + r") )?[A-Z](?:[a-z]|\.)")
# the value's last word is capitalised ("San", "Kaiste Moumaik"), not all capitals or lower case
_LAST_WORD_CAPITALISED = re.compile(r"(?:^|\s)[A-Z][a-z]*$")
# or the value ends on a name particle after a capitalised word ("Rio de| Janeiro"): cut inside the name too
_ENDS_ON_NAME_PARTICLE = re.compile(r"(?:^|\s)[A-Z][a-z]*\s(?:" + "|".join(_NAME_PARTICLES) + r")$")
_CAPITALISED_WORD_GOES_ON = re.compile(r" [A-Z](?:[a-z]|\.)")


#: What an argument value is compared by (``no_repeat``): numbers by value (``8 == 8.0``) but not
#: with booleans, lists and tuples alike, references by the call they name.
_Canonical = Any


def canonical_value(value: Any) -> _Canonical:
    """A hashable stand-in for an argument value, equal for values that make the same call."""
    if isinstance(value, bool) or value is None:
        return ("const", value)
    if isinstance(value, (int, float)):
        return ("num", float(value))
    if isinstance(value, str):
        return ("str", value)
    if isinstance(value, Ref):
        return ("ref", value.call_id)
    if isinstance(value, (list, tuple)):
        return ("seq", tuple(canonical_value(v) for v in value))
    if isinstance(value, dict):
        items = [(canonical_value(k), canonical_value(v)) for k, v in value.items()]
        return ("map", tuple(sorted(items, key=repr)))
    return ("other", repr(value))


def is_free_text(schema: Mapping[str, Any] | None) -> bool:
    """Whether a parameter's schema marks its value free text (``"x-free-text": true``): exempt from
    grounding under ``constrain_calls="grounded"``."""
    return isinstance(schema, Mapping) and schema.get(FREE_TEXT_KEY) is True


def _switch_only(types: set[str]) -> bool:
    """A parameter that only takes ``True`` / ``False`` (/ ``None``)."""
    return bool(types) and types <= {"boolean", "null"}


def _canonical_call(name: str, kwargs: Mapping[str, Any]) -> tuple[str, frozenset]:
    return name, frozenset((k, canonical_value(v)) for k, v in kwargs.items())


class Grounding:
    """The text argument values must be copied from (``constrain_calls="grounded"``), and the
    checks a :class:`CallChecker` makes against it. A string value must occur in the text with
    no word character right before or after it where its own first or last character is a word
    character (``"Rome"`` in ``"Rome, Italy"``, not ``"Rom"``), not end inside a name (where its
    last word is capitalised and the text goes on with a space and a capitalised word: ``"San"``
    of ``"San Francisco"``, ``"New York"`` of ``"New York City"``, ``"Rio"`` or ``"Rio de"`` of
    ``"Rio de Janeiro"``: a lower-case name particle may come between), and not begin or end with
    whitespace. A number must be one of the text's numbers as written (``120.5``, ``-3``,
    ``1e-06``; a whole number written ``500000.0`` may also be written ``500000``); an integer
    argument only takes whole numbers.

    Example:

    ```python
    >>> from hf_asynclm.call_grammar import Grounding
    >>> g = Grounding('Find flights to Rome, Italy for 120.5 USD, 3 seats')
    >>> g.string("Rome"), g.string("Rome, Italy"), g.string("Rom"), g.string("Paris")
    (True, True, False, False)
    >>> g.string_prefix("Rom"), g.number("120.5"), g.number("120"), g.number_prefix("12")
    (True, True, False, True)
    >>> g.number_prefix("12", integer=True), g.number("3", integer=True)
    (False, True)

    ```
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self._memo: dict[tuple[Any, ...], bool] = {}
        # a literal with a leading zero ("07" of a date) cannot be written in a call: Python reads none
        numbers = {n for n in _NUMBER_IN_TEXT.findall(text) if not re.match(r"-?0\d", n)}
        numbers |= {n.split(".")[0] for n in numbers if re.fullmatch(r"-?\d+\.0+", n)}
        self._numbers = numbers
        self._integers = {n for n in numbers if re.fullmatch(r"-?\d+", n)}

    def _check(self, kind: str, value: str, excluded: tuple[str, ...] = ()) -> bool:
        key = (kind, value, excluded)
        known = self._memo.get(key)
        if known is None:
            known = self._memo[key] = self._search(kind, value, excluded)
        return known

    def _search(self, kind: str, value: str, excluded: tuple[str, ...] = ()) -> bool:
        """Whether some occurrence of ``value`` in the text suits ``kind``: ``string`` (a whole
        value), ``prefix`` (the start of one) or ``non_ascii`` (the start of one that goes on with a
        character beyond ASCII). Occurrences where one of the ``excluded`` values starts are passed
        over."""
        g = self.text
        start = g.find(value)
        while start >= 0:
            end = start + len(value)
            if not self._starts_at(value, start, excluded):
                pass
            elif kind == "string" and not self._ends_at(value, end):
                pass
            elif kind == "non_ascii" and (end >= len(g) or g[end].isascii()):
                pass
            elif kind == "prefix" and value[-1].isspace() and not g[end:].strip():
                pass  # nothing left to end it with (no value ends with whitespace)
            else:
                return True
            start = g.find(value, start + 1)
        return False

    def _starts_at(self, value: str, start: int, excluded: tuple[str, ...] = ()) -> bool:
        """Whether a value ``value`` may start at ``start`` of the text."""
        g = self.text
        if start > 0 and value and _word_char(g[start - 1]) and _word_char(value[0]):
            return False  # entered in the middle of a word
        return not any(g.startswith(x, start) for x in excluded)  # where a value that would repeat a call is written

    def _ends_at(self, value: str, end: int) -> bool:
        """Whether the whole value ``value`` may end at ``end`` of the text."""
        g = self.text
        if end < len(g) and _word_char(g[end]) and _word_char(value[-1]):
            return False  # cut off in the middle of a word
        if _NAME_GOES_ON.match(g, end) and _LAST_WORD_CAPITALISED.search(value):
            return False  # cut off inside a name ("San" of "San Francisco")
        if _CAPITALISED_WORD_GOES_ON.match(g, end) and _ENDS_ON_NAME_PARTICLE.search(value):
            return False  # cut off inside a name, after its particle ("Rio de" of "Rio de Janeiro")
        return True

    def completes(self, prefix: str, rule: "ValueRule", excluded: tuple[str, ...] = ()) -> bool:
        """Whether some whole string value that starts with ``prefix`` may be written (as
        :meth:`string` says) and keeps ``rule`` (at most :data:`MAX_RULED_VALUE_CHARS` long, within
        one line of the text): the two constraints together, so that a value is not begun that
        only one of them would let end."""
        if not rule.may_start(prefix):
            return False
        key = ("completes", prefix, excluded, rule.key)
        known = self._memo.get(key)
        if known is None:
            known = self._memo[key] = self._completes(prefix, rule, excluded)
        return known

    def _completes(self, prefix: str, rule: "ValueRule", excluded: tuple[str, ...]) -> bool:
        g = self.text
        start = g.find(prefix) if prefix else 0
        while 0 <= start < len(g):
            if not prefix and (g[start].isspace() or not self._starts_at(g[start], start, excluded)):
                start += 1
                continue
            if prefix and not self._starts_at(prefix, start, excluded):
                start = g.find(prefix, start + 1)
                continue
            line_end = g.find("\n", start)
            last = min(len(g) if line_end < 0 else line_end, start + MAX_RULED_VALUE_CHARS)
            for end in range(start + max(len(prefix), 1), last + 1):
                value = g[start:end]
                if not rule.may_start(value):
                    if rule.pattern is None or rule.pattern.pattern.startswith("^"):
                        break  # anchored: no longer value can keep the rule either
                    continue
                if (
                    value == value.strip() and value not in excluded and rule.fits(value) and self._ends_at(value, end)
                ):
                    return True
            start = g.find(prefix, start + 1) if prefix else start + 1
        return False

    def string(self, value: str, excluded: tuple[str, ...] = ()) -> bool:
        """Whether the string ``value`` may be written whole (the empty string always may; no
        value starts or ends with whitespace). With ``excluded``, the value must be none of them
        and be found where none of them starts (no piece of a value that would repeat a call)."""
        if value in excluded:
            return False
        return value == "" or (value == value.strip() and self._check("string", value, excluded))

    def string_prefix(self, value: str, excluded: tuple[str, ...] = ()) -> bool:
        """Whether a string value may start with ``value`` (see :meth:`string` for ``excluded``)."""
        if value == "":  # the empty string, or any value
            return "" not in excluded or any(self._check("prefix", c, excluded) for c in self._first_chars)
        return not value[0].isspace() and self._check("prefix", value, excluded)

    @functools.cached_property
    def _first_chars(self) -> frozenset[str]:
        return frozenset(ch for ch in self.text if not ch.isspace())

    def non_ascii_follows(self, value: str, excluded: tuple[str, ...] = ()) -> bool:
        """Whether a string value starting with ``value`` may go on with a character beyond ASCII
        (a token that ends inside such a character can only be checked this way)."""
        return self._check("non_ascii", value, excluded)

    def number(self, literal: str, integer: bool = False, excluded: frozenset[float] = frozenset()) -> bool:
        """Whether the number ``literal`` (as written) may be written whole (and is none of the
        ``excluded`` values)."""
        return literal in (self._integers if integer else self._numbers) and float(literal) not in excluded

    def number_prefix(
        self, literal: str, integer: bool = False, excluded: frozenset[float] = frozenset(), rule: "ValueRule | None" = None
    ) -> bool:
        """Whether a number literal may start with ``literal`` (and, with a ``rule``, end within its bounds)."""
        return any(
            n.startswith(literal) and float(n) not in excluded and (rule is None or rule.fits_number(float(n)))
            for n in (self._integers if integer else self._numbers)
        )


class CallChecker:
    """Check a call body (``name(key=value, ...)``, what follows ``[HEAD]``) against the tools'
    JSON schemas, as a prefix: :meth:`check` says whether it is a whole valid call, the start of
    one, or neither.

    Args:
        schemas: tool schemas (OpenAI style ``{"type": "function", "function": {...}}`` or the
            inner ``{"name", "parameters"}``), e.g. ``ToolRegistry.schemas()``.
        call_ids: ids of earlier calls, which a value may name (a reference).
        grounding: when given, string and number values must be copied from it (see
            :class:`Grounding`; ``constrain_calls="grounded"``).
        own_docs: with a text ``grounding``, each tool's values may also be copied from that
            tool's own documentation (its schema's descriptions, defaults, examples, titles),
            never from another tool's: ``get_time(city="Number")`` does not stand because
            ``book_hotel`` documents "Number of nights".
        earlier_calls: when given, ``(name, arguments)`` of calls already made, none of which may
            be made again (``no_repeat_calls``): a call with the same tool and the same arguments
            is invalid, and where the last argument's value would make one, that value is not
            offered (under grounding, neither is any value found where it is written, so that the
            model turns to another value rather than a piece of this one).
    """

    def __init__(
        self,
        schemas: Iterable[Mapping[str, Any]],
        call_ids: Iterable[str] = (),
        grounding: str | Grounding | None = None,
        earlier_calls: Iterable[tuple[str, Mapping[str, Any]]] = (),
        own_docs: bool = False,
    ) -> None:
        self.tools: dict[str, Mapping[str, Any]] = {}
        self._rules: dict[int, tuple[Mapping[str, Any], ValueRule]] = {}  # by id of the parameter's schema
        docs: dict[str, str] = {}
        for schema in schemas:
            fn = _function_schema(schema)
            name = fn.get("name")
            if not isinstance(name, str) or not name:
                raise ValueError(f"a tool schema without a name: {schema!r}")
            self.tools[name] = fn.get("parameters") or {}
            docs[name] = "\n".join(_documentation(fn))
            for prop in (self.tools[name].get("properties") or {}).values():
                if isinstance(prop, Mapping):
                    try:
                        self.rule(prop)
                    except ValueError as exc:
                        raise ValueError(f"tool {name!r}: {exc}") from None
        self._docs = docs
        self._set_context(call_ids, grounding, earlier_calls, own_docs)

    def _set_context(
        self,
        call_ids: Iterable[str],
        grounding: str | Grounding | None,
        earlier_calls: Iterable[tuple[str, Mapping[str, Any]]],
        own_docs: bool,
    ) -> None:
        if own_docs and not isinstance(grounding, str):
            raise ValueError("own_docs needs the grounding as text (the context the tools' documentation is added to)")
        self.call_ids = tuple(call_ids)
        self.grounding = Grounding(grounding) if isinstance(grounding, str) and not own_docs else grounding
        self.earlier_calls = {_canonical_call(name, kwargs) for name, kwargs in earlier_calls}
        self._context = grounding if own_docs else None
        self._tool_grounding: dict[str, Grounding] = {}

    def with_context(
        self,
        call_ids: Iterable[str] = (),
        grounding: str | Grounding | None = None,
        earlier_calls: Iterable[tuple[str, Mapping[str, Any]]] = (),
        own_docs: bool = False,
    ) -> "CallChecker":
        """A checker of the same tools for another context (the arguments of :class:`CallChecker`):
        what the schemas give (tools, their documentation, value rules) is reused, not rebuilt."""
        other = CallChecker.__new__(CallChecker)
        other.tools, other._docs, other._rules = self.tools, self._docs, self._rules
        other._set_context(call_ids, grounding, earlier_calls, own_docs)
        return other

    _NO_RULE = ValueRule(None)

    def rule(self, schema: Mapping[str, Any] | None) -> ValueRule:
        """The :class:`ValueRule` of a parameter's schema (cached on the checker)."""
        if not schema:
            return self._NO_RULE
        found = self._rules.get(id(schema))
        if found is None or found[0] is not schema:
            found = self._rules[id(schema)] = (schema, ValueRule(schema))
        return found[1]

    def grounding_for(self, tool: str | None) -> Grounding | None:
        """What the values of ``tool``'s arguments must be copied from (None: anything goes)."""
        if self._context is None:
            return self.grounding  # type: ignore[return-value]
        found = self._tool_grounding.get(tool or "")
        if found is None:
            docs = self._docs.get(tool or "", "")
            found = self._tool_grounding[tool or ""] = Grounding(f"{self._context}\n{docs}" if docs else self._context)
        return found

    def without_earlier_calls(self) -> "CallChecker":
        """This checker without the rule against repeated calls (its groundings shared)."""
        relaxed = CallChecker.__new__(CallChecker)
        relaxed.__dict__.update(self.__dict__)
        relaxed.earlier_calls = set()
        return relaxed

    # public -------------------------------------------------------------------------------------
    def check(self, body: str) -> Status:
        """:class:`Status` of ``body`` (leading and trailing whitespace allowed)."""
        try:
            _Parse(self, body).body()
        except _Incomplete:
            return Status.PREFIX
        except _Invalid:
            return Status.INVALID
        return Status.COMPLETE

    def writable(self, schema: Mapping[str, Any] | None, tool: str | None = None) -> bool:
        """Whether some value may be written for a parameter of this schema (of ``tool``): always,
        except where values must be grounded and the parameter takes only numbers the context
        lacks, or strings whose rule (pattern, lengths) no piece of the context keeps, or both
        (a date pattern where the conversation names no date); a reference to an earlier call is
        always a value, and so is any value of an enum or a free-text parameter."""
        grounding = self.grounding_for(tool)
        if grounding is None or self.call_ids:
            return True
        types = _types(schema)
        if not types or types - {"integer", "number", "string"} or (schema or {}).get("enum") or is_free_text(schema):
            return True
        rule = self.rule(schema)
        if "string" in types and (not rule.on_strings or grounding.completes("", rule)):
            return True
        numbers = types & {"integer", "number"}
        return bool(numbers) and grounding.number_prefix("", integer="number" not in numbers, rule=rule)

    def callable(self, name: str) -> bool:
        """Whether the tool ``name`` can be called: each of its required parameters is :meth:`writable`."""
        params = self.tools[name]
        props: Mapping[str, Any] = params.get("properties") or {}
        return all(self.writable(props.get(key), name) for key in params.get("required") or [])

    def repeats(self, name: str, values: Mapping[str, _Canonical]) -> bool:
        """Whether ``name`` with these (canonical) argument values is one of the earlier calls."""
        return (name, frozenset(values.items())) in self.earlier_calls

    def repeating_values(self, name: str, values: Mapping[str, _Canonical], key: str) -> list[_Canonical]:
        """The (canonical) values of ``key`` that, written after ``values``, would make an earlier call."""
        out = []
        for other, args in self.earlier_calls:
            if other != name or len(args) != len(values) + 1:
                continue
            found = dict(args)
            if key in found and all(k in found and found[k] == v for k, v in values.items()):
                out.append(found[key])
        return out

    def in_string(self, body: str) -> bool:
        """True when ``body`` is a valid start of a call that ends inside a string value (where
        a character cut between two tokens may stand)."""
        parse = _Parse(self, body)
        try:
            parse.body()
        except _Incomplete:
            if not parse.in_string or parse.string_enum:
                return False
            if parse.string_free:
                return len(parse.string_text) < MAX_FREE_TEXT_CHARS
            grounding = self.grounding_for(parse.tool)
            if grounding is None:
                return True
            return grounding.non_ascii_follows(parse.string_text, parse.string_excluded)
        except _Invalid:
            return False
        return False


class _Parse:
    """A recursive-descent reader of one call body that raises ``_Incomplete`` where the text
    ends before the call does, and ``_Invalid`` at the first character no call can have."""

    def __init__(self, checker: CallChecker, text: str) -> None:
        self.c = checker
        self.s = text
        self.i = 0
        self.in_string = False  # the text ended inside a string value ...
        self.string_enum = False  # ... of an enum
        self.string_text = ""  # ... after these characters
        self.string_excluded: tuple[str, ...] = ()  # ... which may not become one of these
        self.string_free = False  # ... of a free-text parameter (not grounded)
        self.tool: str | None = None  # the tool called, once its name is read

    # characters ---------------------------------------------------------------------------------
    def peek(self) -> str:
        if self.i >= len(self.s):
            raise _Incomplete
        return self.s[self.i]

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            raise _Invalid
        self.i += 1

    def spaces(self) -> None:
        start = self.i
        while self.i < len(self.s) and self.s[self.i] in _SPACES:
            self.i += 1
        if self.i - start > MAX_SPACES:
            raise _Invalid

    def separator(self, close: str) -> None:
        """After an argument or item: ``,`` and spaces, or ``close`` (left for the caller to read)."""
        self.spaces()
        if self.peek() == ",":
            self.i += 1
            self.spaces()
        elif self.peek() != close:
            raise _Invalid

    def read(self, pattern: re.Pattern[str]) -> str:
        m = pattern.match(self.s, self.i)
        text = m.group(0) if m else ""
        self.i += len(text)
        return text

    # the call -----------------------------------------------------------------------------------
    def body(self) -> None:
        self.spaces()
        name = self.read(_NAME_CHARS)
        if self.i >= len(self.s):
            if any(t.startswith(name) and self.c.callable(t) for t in self.c.tools):
                raise _Incomplete
            raise _Invalid
        if name not in self.c.tools or not self.c.callable(name):
            raise _Invalid
        self.tool = name
        self.expect("(")
        params = self.c.tools[name]
        props: Mapping[str, Any] = params.get("properties") or {}
        open_keys = not props or params.get("additionalProperties") is True
        required = set(params.get("required") or [])
        used: set[str] = set()
        values: dict[str, _Canonical] = {}
        self.spaces()
        while True:
            if self.peek() == ")":
                if not required <= used or (self.c.earlier_calls and self.c.repeats(name, values)):
                    raise _Invalid
                self.i += 1
                self.spaces()
                if self.i < len(self.s):
                    raise _Invalid
                return
            key = self.read(_IDENT_CHARS)
            if self.i >= len(self.s):
                if open_keys or any(k.startswith(key) and k not in used and self.c.writable(v, name) for k, v in props.items()):
                    raise _Incomplete
                raise _Invalid
            if not _IDENT.fullmatch(key) or key in used or (key not in props and not open_keys):
                raise _Invalid
            if key in props and not self.c.writable(props[key], name):
                raise _Invalid  # grounded: no value of its type is in the context
            used.add(key)
            excluded: list[_Canonical] = []
            if self.c.earlier_calls and not open_keys and not any(
                k not in used and self.c.writable(v, name) for k, v in props.items()
            ):  # the last argument: no value that makes an earlier call
                excluded = self.c.repeating_values(name, values, key)
                if excluded and not self.some_value(props.get(key), _types(props.get(key)), excluded):
                    raise _Invalid  # every value it may take would repeat a call
            self.spaces()
            self.expect("=")
            self.spaces()
            values[key] = self.value(props.get(key), depth=0, excluded=excluded)
            self.separator(")")

    # values -------------------------------------------------------------------------------------
    def value(self, schema: Mapping[str, Any] | None, depth: int, excluded: Sequence[_Canonical] = ()) -> _Canonical:
        """Read one value; return it (:func:`canonical_value`). It may not be one of ``excluded``."""
        if depth > MAX_DEPTH:
            raise _Invalid
        types = _types(schema)
        ch = self.peek()
        if ch in "\"'":
            if types and "string" not in types:
                raise _Invalid
            return self.string(schema, tuple(v[1] for v in excluded if v[0] == "str"))
        if ch == "-" or ch.isdigit():
            if types and not types & {"integer", "number"}:
                raise _Invalid
            return self.number(
                bool(types) and "number" not in types, frozenset(v[1] for v in excluded if v[0] == "num"), self.c.rule(schema)
            )
        if ch.isalpha() or ch == "_":
            return self.word(types, excluded)
        if ch in "[(":
            if types and "array" not in types:
                raise _Invalid
            return self.sequence("]" if ch == "[" else ")", (schema or {}).get("items"), depth)
        if ch == "{":
            if types and "object" not in types:
                raise _Invalid
            return self.mapping(depth)
        raise _Invalid

    def some_value(self, schema: Mapping[str, Any] | None, types: set[str], excluded: Sequence[_Canonical]) -> bool:
        """Whether a value of this parameter that is none of ``excluded`` may be written."""
        if not types or types & {"array", "object"}:
            return True
        if not _switch_only(types) and any(("ref", c) not in excluded for c in self.c.call_ids):
            return True
        grounding = self.c.grounding_for(self.tool)
        if "string" in types:
            strings = tuple(v[1] for v in excluded if v[0] == "str")
            enum = [v for v in (schema or {}).get("enum") or () if isinstance(v, str)]
            if enum:
                if any(v not in strings for v in enum):
                    return True
            elif grounding is None or is_free_text(schema) or grounding.string_prefix("", strings):
                return True
        if types & {"integer", "number"}:
            numbers = frozenset(v[1] for v in excluded if v[0] == "num")
            if grounding is None or grounding.number_prefix("", "number" not in types, numbers, self.c.rule(schema)):
                return True
        consts = [True, False] if "boolean" in types else []
        consts += [None] if "null" in types else []
        return any(("const", c) not in excluded for c in consts)

    def string(self, schema: Mapping[str, Any] | None, excluded: tuple[str, ...] = ()) -> _Canonical:
        quote = self.peek()
        self.i += 1
        chars: list[str] = []
        enum_values = [v for v in (schema or {}).get("enum") or () if isinstance(v, str) and v not in excluded]
        is_enum = any(isinstance(v, str) for v in (schema or {}).get("enum") or ())
        free = not is_enum and is_free_text(schema)
        grounding = None if is_enum or free else self.c.grounding_for(self.tool)
        rule = None if is_enum else self.c.rule(schema)
        if rule is not None and not rule.on_strings:
            rule = None
        while True:
            if self.i >= len(self.s):
                self.open_string("".join(chars), enum_values, is_enum, excluded, grounding, rule=rule)
            ch = self.s[self.i]
            self.i += 1
            if ch == "\\":
                if free and len(chars) >= MAX_FREE_TEXT_CHARS:
                    raise _Invalid
                if self.i >= len(self.s):  # what the escape stands for is not known yet
                    self.open_string("".join(chars), enum_values, is_enum, excluded, grounding, escape=True, rule=rule)
                # Python's reading: a known escape is its character, any other keeps the backslash
                chars.append(_ESCAPES.get(self.s[self.i], "\\" + self.s[self.i]))
                self.i += 1
            elif ch == quote:
                text = "".join(chars)
                if is_enum and text not in enum_values:
                    raise _Invalid
                if text in excluded:
                    raise _Invalid
                if grounding is not None and not grounding.string(text, excluded):
                    raise _Invalid
                if rule is not None and not rule.fits(text):
                    raise _Invalid
                return ("str", text)
            elif ch == "\n" or (free and len(chars) >= MAX_FREE_TEXT_CHARS):
                raise _Invalid
            else:
                chars.append(ch)

    def open_string(
        self,
        text: str,
        enum_values: list[str],
        is_enum: bool,
        excluded: tuple[str, ...],
        grounding: Grounding | None,
        escape: bool = False,
        rule: ValueRule | None = None,
    ) -> NoReturn:
        """The text ends inside a string value whose characters so far are ``text`` (and, with
        ``escape``, a backslash whose character is still to come): ``_Incomplete`` where some
        value may still follow (one of the ``enum_values`` of an enum, or one ``grounding`` holds:
        the checker's, or None for a free-text parameter), else ``_Invalid``."""
        self.in_string, self.string_enum, self.string_text = True, is_enum, text
        self.string_excluded = excluded
        self.string_free = not is_enum and grounding is None
        starts = [text + e for e in (*_ESCAPES.values(), "\\")] if escape else [text]
        if is_enum:
            ok = any(v.startswith(t) for v in enum_values for t in starts)
        elif grounding is not None and rule is not None:
            ok = any(grounding.completes(t, rule, excluded) for t in starts)
        elif grounding is not None:
            ok = any(grounding.string_prefix(t, excluded) for t in starts)
        else:
            ok = rule is None or any(rule.may_start(t) for t in starts)
        raise _Incomplete if ok else _Invalid

    def number(self, integer: bool, excluded: frozenset[float] = frozenset(), rule: ValueRule | None = None) -> _Canonical:
        text = self.read(_NUMBER_PREFIX)
        if not text or (integer and any(c in text for c in ".eE")) or len(text) > MAX_NUMBER_CHARS:
            raise _Invalid
        digits = text.lstrip("-")
        if len(digits) > 1 and digits[0] == "0" and digits[1].isdigit():
            raise _Invalid  # Python reads no leading zeros (``011``)
        grounding = self.c.grounding_for(self.tool)
        rule = rule if rule is not None and rule.on_numbers else None
        if self.i >= len(self.s):
            if grounding is not None and not grounding.number_prefix(text, integer, excluded, rule):
                raise _Invalid
            if rule is not None and not rule.number_may_start(text):
                raise _Invalid
            raise _Incomplete
        if not _NUMBER.fullmatch(text) or float(text) in excluded:
            raise _Invalid
        if grounding is not None and not grounding.number(text, integer, excluded):
            raise _Invalid
        if rule is not None and not rule.fits_number(float(text)):
            raise _Invalid
        return ("num", float(text))

    def word(self, types: set[str], excluded: Sequence[_Canonical] = ()) -> _Canonical:
        """``True`` / ``False`` / ``None`` or the id of an earlier call."""
        word = self.read(_IDENT_CHARS)
        keywords = [k for k in _KEYWORDS if not types or (k == "None" and "null" in types) or (k != "None" and "boolean" in types)]
        values = {k: ("const", {"True": True, "False": False, "None": None}[k]) for k in keywords}
        if not (excluded and _switch_only(types)):  # no reference stands in for a used True / False
            values.update({c: ("ref", c) for c in self.c.call_ids})
        values = {w: v for w, v in values.items() if v not in excluded}
        if self.i >= len(self.s):
            if any(w.startswith(word) for w in values):
                raise _Incomplete
            raise _Invalid
        if word in values:
            return values[word]  # a literal of the right type, or a reference (its type is the earlier result's)
        raise _Invalid

    def sequence(self, close: str, items: Mapping[str, Any] | None, depth: int) -> _Canonical:
        self.i += 1
        self.spaces()
        found = []
        while True:
            if self.peek() == close:
                self.i += 1
                return ("seq", tuple(found))
            found.append(self.value(items, depth + 1))
            self.separator(close)

    def mapping(self, depth: int) -> _Canonical:
        self.i += 1
        self.spaces()
        found = []
        while True:
            if self.peek() == "}":
                self.i += 1
                return ("map", tuple(sorted(found, key=repr)))
            key = self.value(None, depth + 1)
            self.spaces()
            self.expect(":")
            self.spaces()
            found.append((key, self.value(None, depth + 1)))
            self.separator("}")


class CallGrammarProcessor(LogitsProcessor):
    """Allow only tokens that keep CML blocks valid calls of the given tools (see the module
    docstring).

    Args:
        tokenizer: the model's tokenizer; the five CML markers must be single tokens.
        tools: tool schemas (``ToolRegistry.schemas()`` or OpenAI-style dicts).
        candidates: how many of the most likely tokens to keep the valid ones of.
        max_scan: how far down the ranking to look when none of those is valid, before looking
            through the whole vocabulary (by first character).
        grounded: also require string and number values to be copied from the text before the
            block or from the tools' schemas (``constrain_calls="grounded"``, see :class:`Grounding`).
        no_repeat: never write a call this generation has already written (same tool, same
            arguments; ``no_repeat_calls``): the value of the last argument that would repeat one
            is not offered, so the model writes another (see :class:`CallChecker`); where every way
            on is a repeat, the repeat is let through rather than breaking the block
            (:attr:`repeats_allowed` counts those steps). A model that must poll (call the same
            thing twice on purpose) needs this off.

    Example:

    ```python
    >>> import torch
    >>> from hf_asynclm.call_grammar import CallGrammarProcessor
    >>> from hf_asynclm.testing import tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> schema = {"name": "get_weather", "parameters": {"type": "object",
    ...     "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    >>> proc = CallGrammarProcessor(tok, [schema])
    >>> ids = torch.tensor([tok.encode("[CALL] w1 [HEAD] get_weather(", add_special_tokens=False)])
    >>> scores = torch.zeros(1, len(tok))
    >>> allowed = [tok.decode([t]) for t in torch.nonzero(proc(ids, scores)[0] > -1e9).flatten().tolist()]
    >>> len(allowed) > 0 and all("city".startswith(a.strip()) for a in allowed)
    True

    ```
    """

    def __init__(
        self,
        tokenizer: Any,
        tools: Sequence[Mapping[str, Any]],
        candidates: int = 16,
        max_scan: int = 2048,
        grounded: bool = False,
        no_repeat: bool = False,
    ) -> None:
        markers = marker_token_ids(tokenizer)
        if not markers.single_token:
            raise ValueError(
                "constrained CML decoding needs the five markers as single tokens; add them with "
                "hf_asynclm.cml.add_cml_tokens(tokenizer, model) (CML checkpoints have them)"
            )
        if candidates < 1 or max_scan < candidates:
            raise ValueError(f"need 1 <= candidates <= max_scan, got {candidates} and {max_scan}")
        self.tokenizer = tokenizer
        self.schemas = list(tools)
        self._tools_checker = CallChecker(self.schemas)  # fails now on a bad schema; each block's checker derives from it
        self.candidates = candidates
        self.max_scan = max_scan
        self.grounded = grounded
        self.no_repeat = no_repeat
        self.markers = markers
        self._blocked = set(getattr(tokenizer, "all_special_ids", []) or []) - set(markers.by_id)
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None:
            self._blocked.add(int(eos))
        self._context: tuple[int, int, CallChecker] | None = None  # (hash of the text before, block start, checker)
        self._prompt: tuple[int, ...] | None = None  # the first input of the sequence followed: its prompt
        self._scan: tuple | None = None  # the last step: (sequence id, length, last tokens, state, after)
        #: Steps at which no token was valid (scores left alone).
        self.dead_ends = 0
        #: Steps at which the valid tokens were found only by the whole-vocabulary search.
        self.vocabulary_searches = 0
        #: Steps (``no_repeat``) at which only a repeated call could go on, and was let through.
        self.repeats_allowed = 0
        self._relaxed_cache: tuple[CallChecker, CallChecker] | None = None

    # ---------------------------------------------------------------------------------------
    def _checker(self, ids: list[int], start: int) -> CallChecker:
        """The checker of the block starting at ``start`` (call ids written before it), cached."""
        key = (hash(tuple(ids[:start])), start)
        if self._context is not None and self._context[:2] == key:
            return self._context[2]
        grounding = None
        if self.grounded:
            # the CML markers are the protocol's syntax, never a value to copy ("CALL", "END")
            # and what the called tool's own documentation says (CallChecker's own_docs)
            grounding = _MARKER_TEXT.sub("\n", self.tokenizer.decode(ids[:start], skip_special_tokens=False))
        call_ids, bodies = self._blocks_before(ids, start, with_bodies=self.no_repeat)
        earlier: list[tuple[str, dict[str, Any]]] = []
        for body in bodies:
            try:
                parsed = parse_call(body)
            except CallParseError:
                continue
            if not parsed.args:
                earlier.append((parsed.name, parsed.kwargs))
        checker = self._tools_checker.with_context(call_ids, grounding, earlier, own_docs=grounding is not None)
        self._context = (*key, checker)
        return checker

    def _relaxed(self, checker: CallChecker) -> CallChecker:
        """``checker`` without the rule against repeated calls (cached for the open block)."""
        if self._relaxed_cache is None or self._relaxed_cache[0] is not checker:
            self._relaxed_cache = (checker, checker.without_earlier_calls())
        return self._relaxed_cache[1]

    def _blocks_before(self, ids: list[int], start: int, with_bodies: bool = True) -> tuple[list[str], list[str]]:
        """Ids and (``with_bodies``) bodies of the call blocks written before ``start`` by this
        generation (after the prompt): a prompt's example or an earlier turn names no call the
        executor knows."""
        prompt_len = self._prompt_length(ids)
        m = self.markers
        call_ids: list[str] = []
        bodies: list[str] = []
        call = body = None  # where the open block's [CALL] is and where its body starts
        for pos in range(start):
            tid = ids[pos]
            if tid == m.call:
                call, body = pos, pos + 1
            elif tid == m.head and call is not None and body == call + 1:
                if pos >= prompt_len:
                    call_id = self.tokenizer.decode(ids[call + 1 : pos], skip_special_tokens=False).strip()
                    if _IDENT.fullmatch(call_id):
                        call_ids.append(call_id)
                body = pos + 1
            elif tid == m.end and call is not None and body is not None:
                if with_bodies and body > prompt_len:
                    bodies.append(self.tokenizer.decode(ids[body:pos], skip_special_tokens=False))
                call = body = None
            elif tid in m.by_id:
                call = body = None
        return call_ids, bodies

    def _prompt_length(self, ids: list[int]) -> int:
        """Length of the prompt ``ids`` began with (0: not the sequence this processor followed)."""
        prompt = self._prompt
        return len(prompt) if prompt is not None and tuple(ids[: len(prompt)]) == prompt else 0

    def _state_during_generation(self, ids: list[int]) -> tuple[str, int]:
        """:meth:`_state`, scanning only the tokens added since the last step when ``ids`` extends
        the sequence of the last step (its start and its last tokens are the same)."""
        key = (hash(tuple(ids[:64])),)
        last = self._scan
        if last is not None and last[0] == key and len(ids) >= last[1] and tuple(ids[max(0, last[1] - 8) : last[1]]) == last[2]:
            found = self._state(ids, stop=last[1])
            state, after = found if found is not None else (last[3], last[4])
        else:
            state, after = self._state(ids) or ("outside", len(ids))
        self._scan = (key, len(ids), tuple(ids[max(0, len(ids) - 8) :]), state, after)
        return state, after

    def _state(self, ids: list[int], stop: int = 0) -> Any:
        """("outside" | "trap" | "prehead" | "body", index after the block's last marker), from the
        last marker at or after ``stop``; ``None`` when there is none there (with ``stop=0``:
        ``("outside", len(ids))``)."""
        m = self.markers
        for pos in range(len(ids) - 1, stop - 1, -1):
            tid = ids[pos]
            if tid not in m.by_id:
                continue
            if tid == m.end or tid == m.intr:
                return "outside", pos + 1
            if tid == m.trap:
                return "trap", pos + 1
            if tid == m.call:
                return "prehead", pos + 1
            if tid == m.head:
                return "body", pos + 1
        return ("outside", len(ids)) if stop == 0 else None

    def allowed(self, ids: list[int], token: int) -> bool:
        """Whether ``token`` may follow ``ids`` (one sequence)."""
        state, after = self._state(ids)
        return self._allowed(ids, state, after, self._block_checker(ids, state, after), token)

    def _block_checker(self, ids: list[int], state: str, after: int) -> CallChecker | None:
        """The checker of the open call block (``None`` outside one or in a trap)."""
        if state not in ("prehead", "body"):
            return None
        return self._checker(ids, after - 1 if state == "prehead" else self._block_start(ids, after))

    def _allowed(self, ids: list[int], state: str, after: int, checker: CallChecker | None, token: int) -> bool:
        m = self.markers
        if state == "outside":
            return token not in (m.head, m.end)
        if token in self._blocked or (token in m.by_id and token not in (m.head, m.end)):
            return False
        if state == "trap":
            if token == m.end:
                return True
            return token not in m.by_id and not self.tokenizer.decode(ids[after:] + [token]).strip()
        assert checker is not None
        if token == m.head:
            text = self.tokenizer.decode(ids[after:])
            call_id = text.strip()
            return (
                state == "prehead" and "(" not in text and _IDENT.fullmatch(call_id) is not None
                and call_id not in checker.call_ids and call_id not in RESERVED_IDS
            )
        if token == m.end:
            text = self.tokenizer.decode(ids[after:])
            if state == "prehead" and "(" not in text:
                return False
            return checker.check(text) is Status.COMPLETE
        return self._text_ok(state, self.tokenizer.decode(ids[after:] + [token]), checker)

    def _text_ok(self, state: str, text: str, checker: CallChecker) -> bool:
        """Whether ``text`` (what follows the open block's last marker, no marker in it) keeps a
        ``prehead`` or ``body`` block valid."""
        partial_char = text.endswith("\ufffd")  # a character cut between tokens: only inside a string
        stripped = text.rstrip("\ufffd")
        if len(text) - len(stripped) > MAX_PENDING_BYTES:
            return False  # no character takes more bytes: these never make one
        text = stripped
        if state == "prehead" and "(" not in text:
            return not partial_char and self._prehead_ok(text, checker)
        if partial_char:
            return checker.in_string(text)
        return checker.check(text) is not Status.INVALID

    @staticmethod
    def _prehead_ok(text: str, checker: CallChecker) -> bool:
        """What follows ``[CALL]`` before ``[HEAD]`` or ``(``: a new call id, or the start of a
        tool's name (fire and forget)."""
        m = _PREHEAD_PARTS.fullmatch(text)
        if m is None:
            return False
        lead, word, trail = m.groups()
        if len(lead) > MAX_SPACES or len(trail) > MAX_SPACES or (trail and not word):
            return False
        if trail and (word in checker.call_ids or word in RESERVED_IDS):
            return False  # an id must be new, and not one the runtime keeps for itself
        if any(name.startswith(word) for name in checker.tools):
            return True
        if not (word == "" or _IDENT.fullmatch(word)) or len(word) > MAX_ID_CHARS:
            return False
        # past the id of an earlier call (``m1`` -> ``m1...``), only digits make a new one
        stems = [c for c in checker.call_ids if word.startswith(c) and word != c]
        return not stems or word[len(max(stems, key=len)) :].isdigit()

    def _block_start(self, ids: list[int], after_head: int) -> int:
        pos = after_head - 1
        while pos >= 0 and ids[pos] != self.markers.call:
            pos -= 1
        return max(pos, 0)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[0] != 1:
            raise ValueError(f"CallGrammarProcessor follows one sequence; got a batch of {input_ids.shape[0]}")
        ids = input_ids[0].tolist()
        if not self._prompt_length(ids):
            self._prompt = tuple(ids)  # the first step of a sequence sees its prompt
        state, after = self._state_during_generation(ids)
        if state == "outside":
            out = scores.clone()
            out[0, [self.markers.head, self.markers.end]] = float("-inf")
            return out
        checker = self._block_checker(ids, state, after)
        top = torch.topk(scores[0], min(self.max_scan, scores.shape[-1]))
        valid = self._best_valid(ids, state, after, checker, top.indices.tolist(), top.values.tolist())
        if not valid:
            valid = self._search_vocabulary(ids, state, after, checker, scores[0], checked=top.indices)
            self.vocabulary_searches += bool(valid)
        if not valid and checker is not None and checker.earlier_calls:
            # every way on repeats a call: a repeated call is still better than a broken block
            checker = self._relaxed(checker)
            valid = self._best_valid(ids, state, after, checker, top.indices.tolist(), top.values.tolist())
            valid = valid or self._search_vocabulary(ids, state, after, checker, scores[0], checked=top.indices)
            self.repeats_allowed += bool(valid)
        if not valid:
            self.dead_ends += 1
            logger.debug("no valid token inside the block %r", self.tokenizer.decode(ids[-32:]))
            return scores
        out = torch.full_like(scores, float("-inf"))
        out[0, valid] = scores[0, valid]
        return out

    # -- whole-vocabulary search ----------------------------------------------------------------
    def _first_char_index(self) -> dict[str, torch.Tensor]:
        """Token ids by the first character of their text (markers and blocked tokens left out),
        built at the first search and cached per tokenizer (2.4 s for Gemma's 262k tokens; a search
        after that takes a few ms)."""
        cached = _FIRST_CHAR_INDEX.get(self.tokenizer)
        if cached is not None and cached[0] == len(self.tokenizer):
            return cached[1]
        skip = set(self.markers.by_id) | self._blocked
        groups: dict[str, list[int]] = {}
        pieces = self.tokenizer.batch_decode([[t] for t in range(len(self.tokenizer))])
        for token, piece in enumerate(pieces):
            if token not in skip:
                groups.setdefault(piece[:1], []).append(token)
        index = {c: torch.tensor(ts, dtype=torch.long) for c, ts in groups.items()}
        _FIRST_CHAR_INDEX[self.tokenizer] = (len(self.tokenizer), index)
        return index

    def _search_vocabulary(
        self, ids: list[int], state: str, after: int, checker: CallChecker | None, scores: torch.Tensor,
        checked: torch.Tensor,
    ) -> list[int]:
        """The best valid tokens of the whole vocabulary (at most ``candidates``), for a step where
        none of the ``max_scan`` most likely (``checked``, not checked again) is valid.

        Only tokens whose first character may come next are checked (each character of the
        vocabulary's first characters tried once on the text so far; characters beyond ASCII only
        inside a free string, the one place the grammar lets them stand), best score first.
        """
        index = self._first_char_index()
        m = self.markers
        if state == "trap":
            keys = [c for c in index if c.isspace()]
            pool = [torch.tensor([m.end])]
        else:
            assert checker is not None
            text = self.tokenizer.decode(ids[after:]).rstrip("\ufffd")
            in_string = state == "body" and checker.in_string(text)
            keys = [  # tokens that decode to nothing are left out: they would keep any block "valid"
                c for c in index
                if c and ((c.isascii() and self._text_ok(state, text + c, checker)) or (not c.isascii() and in_string))
            ]
            pool = [torch.tensor([m.head, m.end])]
        pool += [index[c] for c in keys]
        tokens = torch.cat(pool).to(scores.device)  # the index lives on the CPU, the scores where the model runs
        tokens = tokens[~torch.isin(tokens, checked.to(scores.device))]
        values, order = torch.sort(scores[tokens], descending=True, stable=True)
        return self._best_valid(ids, state, after, checker, tokens[order].tolist(), values.tolist())

    def _best_valid(
        self, ids: list[int], state: str, after: int, checker: CallChecker | None, ranked: list[int], values: list[float]
    ) -> list[int]:
        """The valid tokens among the first ``candidates`` of ``ranked`` (best first, with their
        scores ``values``), or, where none of those is, the first valid one further down."""
        valid: list[int] = []
        for rank, (token, value) in enumerate(zip(ranked, values)):
            if (rank >= self.candidates and valid) or value == float("-inf"):
                break
            if self._allowed(ids, state, after, checker, token):
                valid.append(token)
        return valid
