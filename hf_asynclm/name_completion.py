"""Names and numbers in the model's text are quoted whole: :class:`NameCompletionProcessor`.

A small CML model quoting its results often stops inside a name it copies: ``"Kuala: Genim Inn"``
for Kuala Lumpur, ``"Gugrei-Kathm: FL584"`` for Kathmandu, ``"San Francisco to Hong: RX305"``.
The grounded call constraint (:mod:`hf_asynclm.call_grammar`) keeps such cuts out of call
arguments; this processor keeps them out of the visible text. Where the text the model is
writing (outside CML blocks) ends in the start of a name from the conversation, a name the
conversation never ends there, the model may not end it there: a token that stops the name
(punctuation, a space followed by something else, a marker, EOS) is refused unless it goes on
with the name (``" Lumpur"``). Within the first word of a name, a token that goes on with letters
is refused only once the model has written :data:`SPELL_FROM` letters of the name that are no
word of the conversation themselves (``"Kathm"`` of Kathmandu may go on with ``"andu"``, not
``"ou"``; ``"Booked"`` may follow ``"Book"`` where the request says "Book Ann on a flight", a
word of the conversation; ``"Auc"`` may go on with any letters): the processor does not spell a
short word for the model; from the second word on (``"Kuala Lu"``) the model has taken up the name and its letters
must follow it.

With ``numbers=True`` (the runtime's ``quote_numbers``) numbers are held too, and more strictly, as a
model that quotes its results has no number of its own to write (:class:`NumberIndex`): a number the model writes in its visible text
(digits, perhaps a decimal part; not digits glued to a word before them, as in ``"PX409"``, nor
ones a letter follows, as in ``"19B"``) must be one of the conversation's numbers: each digit has
to go on with one of them, or with a word of the conversation that starts with digits (the seat
``"19B"``), so ``"579.0"`` is refused where the result said ``579.5``; and the number may only end
where one of them ends (``"57"`` may not stand for ``579.5``). A ``"."`` after digits may be a
decimal point or end the sentence.

What counts as a name: a run of capitalised words in the conversation so far (the prompt with its
tools, and the calls and results of the generation: :func:`quotable_text`; the model's own
visible text is no source, so a word it made up or cut, ``"Donear"``, never becomes a name it has
to spell again), lower-case name particles allowed between them (``"Rio de Janeiro"``), digits
allowed inside a word (``"PX409"``). Numbers come from the same text. A run that starts a sentence may also
be its first word alone (``"Book Nurun Traikre on a flight"``: ``"Book"`` is a whole word there),
and every run is also a name from each of its later words on. The text being written is checked
from a capitalised word start; words of one letter (``"A"``, ``"I"``) are never held.

Example:

```python
>>> from hf_asynclm.name_completion import NameIndex
>>> names = NameIndex("Hotel in Kuala Lumpur, then Hong Kong. Weather in Auckland?")
>>> names.cut("Kuala"), names.cut("Hong "), names.cut("Auck"), names.cut("Auckland"), names.cut("Hotel")
(True, True, True, False, False)
>>> names.may_follow("Kuala", ":"), names.may_follow("Kuala", " Lumpur:"), names.may_follow("Auck", "l")
(False, True, True)
>>> names.may_follow("Auck", "ou"), names.may_follow("Auc", "ou")  # spelt from SPELL_FROM letters on
(False, True)
>>> from hf_asynclm.name_completion import NumberIndex
>>> numbers = NumberIndex('{"symbol": "FWT", "price": 579.5} FWT: $')
>>> numbers.may_write("FWT: $579", "."), numbers.may_write("FWT: $579.", "0"), numbers.may_write("FWT: $579.", "5.")
(True, False, True)

```
"""

from __future__ import annotations

import bisect
import re
from typing import Any

import torch
from transformers import LogitsProcessor

from .call_grammar import _NAME_PARTICLES as _PARTICLES  # the grounded call rule's particles: one list
from .call_grammar import check_bool_setting
from .cml import CALL, END, INTR

_WORD = r"[A-Z][A-Za-z0-9]*"
_RUN = re.compile(rf"(?<![A-Za-z0-9]){_WORD}(?: (?:(?:{'|'.join(_PARTICLES)}) )?{_WORD})*(?![A-Za-z0-9])")
_LATER_WORD = re.compile(rf" (?:(?:{'|'.join(_PARTICLES)}) )?(?={_WORD})")
_SENTENCE_END = set(".!?>\n")
#: How many characters at the end of the text are searched for the start of a name.
TAIL_CHARS = 64
#: From how many letters of a name's first word on (a start that is no word of the conversation)
#: the letters that follow must be the name's.
SPELL_FROM = 4
_WORDS = re.compile(r"[A-Za-z0-9]+")


def check_complete_names(value: Any) -> bool:
    """Return ``value`` when it is a valid ``complete_names`` setting (a bool), else raise ``TypeError``."""
    return check_bool_setting("complete_names", value)


def check_quote_numbers(value: Any) -> bool:
    """Return ``value`` when it is a valid ``quote_numbers`` setting (a bool), else raise ``TypeError``."""
    return check_bool_setting("quote_numbers", value)


class NameIndex:
    """The names of a text (see the module docstring) and the two checks the processor makes.

    Args:
        text: the conversation so far, before the name being written.
    """

    def __init__(self, text: str) -> None:
        names: set[str] = set()
        for m in _RUN.finditer(text):
            run = m.group(0)
            names.add(run)
            for later in _LATER_WORD.finditer(run):  # "Nurun Traikre" of "Book Nurun Traikre"
                names.add(run[later.end():])
            before = text[: m.start()].rstrip(" ")
            if not before or before[-1] in _SENTENCE_END or before.endswith("|>"):
                names.add(run.split(" ", 1)[0])  # a sentence's first word may stand alone
        self.names = frozenset(names)
        self._sorted = sorted(self.names)
        self._words = frozenset(_WORDS.findall(text))

    def _starting_with(self, prefix: str) -> list[str]:
        i = bisect.bisect_left(self._sorted, prefix)
        out = []
        while i < len(self._sorted) and self._sorted[i].startswith(prefix):
            out.append(self._sorted[i])
            i += 1
        return out

    def cut(self, written: str) -> bool:
        """Whether ``written`` (from a capitalised word start to the end of the text) stops inside
        every name it starts: it starts a name longer than itself and is no name itself."""
        if written.rstrip(" ") in self.names:
            return False
        return any(len(n) > len(written) for n in self._starting_with(written))

    def may_follow(self, written: str, piece: str) -> bool:
        """Whether ``piece`` may follow the cut name start ``written``: ``written + piece`` is
        still the start of a name, or starts with a whole name that ends there, or (while
        ``written`` is one word, shorter than :data:`SPELL_FROM` letters or a word of the
        conversation) ``piece`` goes on with that word in letters or digits."""
        if not piece:
            return False
        if (
            " " not in written and written[-1:].isalnum() and piece[0].isalnum()
            and (len(written) < SPELL_FROM or written in self._words)
        ):
            return True
        text = written + piece
        if self._starting_with(text):
            return True
        return any(text.startswith(n) and not text[len(n)].isalnum() for n in self._starting_with(written) if len(n) < len(text))


#: A number of the context: digits, perhaps a decimal part, not glued to a word (``"PX409"``, ``"19B"``
#: and ``"780ms"`` hold none).
_NUMBER = re.compile(r"(?<![A-Za-z0-9.])[0-9]+(?:\.[0-9]+)?(?![A-Za-z0-9])")
#: A word of the context that starts with a digit: a number, or a code such as ``"19B"`` (while its
#: digits are written they may go on with it).
_DIGIT_WORD = re.compile(r"(?<![A-Za-z0-9.])[0-9]+(?:\.[0-9]+)?[A-Za-z0-9]*")
#: A number being written in the model's text: not glued to a word (or number) before it; a
#: trailing ``"."`` may be a decimal point still waiting for its digits.
_NUMBER_RUN = re.compile(r"(?<![A-Za-z0-9.])[0-9]+(?:\.[0-9]*)?")
#: How many characters at the end of the text are searched for the number being written.
NUMBER_TAIL_CHARS = 32


class NumberIndex:
    """The numbers of a text (see the module docstring) and the check the processor makes.

    Args:
        text: the conversation so far, before the number being written.
    """

    def __init__(self, text: str) -> None:
        self.numbers = frozenset(_NUMBER.findall(text))
        self._sorted = sorted(self.numbers | set(_DIGIT_WORD.findall(text)))

    def _starts(self, prefix: str) -> bool:
        i = bisect.bisect_left(self._sorted, prefix)
        return i < len(self._sorted) and self._sorted[i].startswith(prefix)

    def may_write(self, tail: str, piece: str) -> bool:
        """Whether ``piece`` (``""`` for a special token, which ends the text) may follow ``tail``
        (the end of the model's text): each number it writes or goes on with starts a number (or a
        code that starts with digits, ``"19B"``) of the text given, and each one it ends is one."""
        text = tail + piece
        for m in _NUMBER_RUN.finditer(text):
            if m.end() < len(tail) or (m.start() == 0 and len(tail) >= NUMBER_TAIL_CHARS):
                continue  # written before (and held then), or cut by the tail's start
            run = m.group(0)
            ends = m.end() < len(text) or not piece  # something follows, or a special token ends the text
            if m.end() < len(text) and text[m.end()].isalpha():
                continue  # a code or a unit ("19B", "780ms"): not a number
            if ends:
                if run.rstrip(".") not in self.numbers:
                    return False  # the number ends here
            elif not (self._starts(run) or (run.endswith(".") and run[:-1] in self.numbers)):
                return False  # it goes on, but no number of the text starts so
        return True


_OPEN_NUMBER = re.compile(_NUMBER_RUN.pattern + "$")


def _open_number(text: str) -> int:
    """Where the number the text ends in starts (``len(text)`` where it ends in none)."""
    m = _OPEN_NUMBER.search(text, max(0, len(text) - NUMBER_TAIL_CHARS))
    return len(text) if m is None else m.start()


_SEGMENT = re.compile(r"[A-Za-z0-9 ]*$")
#: A CML block the generation holds: a call the model wrote (its values are checked by the call
#: constraint) or an interrupt the runtime injected (a result).
_BLOCK = re.compile(rf"(?:{re.escape(CALL)}|{re.escape(INTR)}).*?(?:{re.escape(END)}|\Z)", re.DOTALL)


def quotable_text(text: str, prompt_chars: int = 0) -> str:
    """What names and numbers may be quoted from: ``text`` up to ``prompt_chars`` (the prompt,
    tools included) and, after it, only the CML call and interrupt blocks (the model's calls and
    the results injected; one still open at the end as far as it goes), one per line. The
    model's own visible text is left out: a name it wrote is the conversation's only where the
    conversation has it too, and a cut or a made-up word it wrote (``"Donear"``) must not become
    a name it then has to go on spelling.

    ```python
    >>> from hf_asynclm.name_completion import quotable_text
    >>> text = 'Weather in Rome? [CALL] w1 [HEAD] get_weather(city="Rome") [END] Rom [INTR] w1 [HEAD] 21 C [END] Ro'
    >>> quotable_text(text, prompt_chars=17).splitlines()
    ['Weather in Rome? ', '[CALL] w1 [HEAD] get_weather(city="Rome") [END]', '[INTR] w1 [HEAD] 21 C [END]']

    ```
    """
    if prompt_chars >= len(text):
        return text
    opened = max(text.rfind(CALL, 0, prompt_chars), text.rfind(INTR, 0, prompt_chars))
    if opened > text.rfind(END, 0, prompt_chars):
        prompt_chars = opened  # a prompt that ends inside a block: the block is read whole below
    blocks = _BLOCK.findall(text, prompt_chars)
    return "\n".join([text[:prompt_chars], *blocks])


def _name_starts(text: str) -> list[str]:
    """Ends of ``text`` that may be a name being written, longest first: from each capitalised
    word start within its last run of words and spaces (at most :data:`TAIL_CHARS` long)."""
    tail = text[-(TAIL_CHARS + 1):]
    segment = _SEGMENT.search(tail).group(0)  # type: ignore[union-attr]
    first = 0 if len(segment) < len(tail) else 1  # a segment as long as the tail may start inside a word
    return [segment[i:] for i in range(first, len(segment)) if segment[i].isupper() and (i == 0 or segment[i - 1] == " ")]


class NameCompletionProcessor(LogitsProcessor):
    """Refuse tokens that end a name from the conversation early (``names``), or write a number it
    lacks (``numbers``), in the model's visible text (see the module docstring). It reads the text from
    ``input_ids`` at every step, so it works in hf-asynclm's decode loop (with injected results)
    and in a plain ``model.generate``. Inside CML blocks it does nothing (the call constraint's
    business). The first ids it sees for a batch row are that row's prompt (ids that do not start
    with them begin a new one): use one processor per generation, as ``AsyncLM`` does, or
    :meth:`reset` it, since a next turn's prompt that extends the last one would otherwise be
    taken for generated text.

    Args:
        tokenizer: the model's tokenizer.
        candidates: how many of the most likely tokens to keep the allowed ones of.
        max_scan: how far down the ranking to look when none of those is allowed; where none of
            these is, the scores are left alone.
        names: hold names whole (:class:`NameIndex`; the runtime's ``complete_names``).
        numbers: hold numbers to the conversation's (:class:`NumberIndex`; the runtime's ``quote_numbers``).

    Example:

    ```python
    >>> import torch
    >>> from hf_asynclm.name_completion import NameCompletionProcessor
    >>> from hf_asynclm.testing import tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> proc = NameCompletionProcessor(tok)
    >>> ids = tok.encode("Hotel in Kuala Lumpur? Kuala", add_special_tokens=False)
    >>> colon = tok.convert_tokens_to_ids(":")
    >>> proc.allowed(ids, colon)
    False
    >>> ids = tok.encode('{"price": 579.5} FWT: $579.', add_special_tokens=False)
    >>> zero, five = tok.convert_tokens_to_ids("0"), tok.convert_tokens_to_ids("5")
    >>> proc.allowed(ids, zero), NameCompletionProcessor(tok, numbers=True).allowed(ids, zero)
    (True, False)

    ```
    """

    def __init__(
        self, tokenizer: Any, candidates: int = 16, max_scan: int = 512, names: bool = True, numbers: bool = False
    ) -> None:
        if candidates < 1 or max_scan < candidates:
            raise ValueError(f"need 1 <= candidates <= max_scan, got {candidates} and {max_scan}")
        if not (names or numbers):
            raise ValueError("nothing to hold: pass names=True, numbers=True or both")
        self.names = names
        self.tokenizer = tokenizer
        self.candidates = candidates
        self.max_scan = max_scan
        self.numbers = numbers
        # the last index of each kind and the quotable text it was built from: that text only
        # changes where a block ends (the model's own text is no part of it), so most steps reuse it
        self._indexes: dict[type, tuple[str, Any]] = {}
        self._prompts: dict[int, tuple[tuple[int, ...], int | None]] = {}  # row -> (prompt ids, their length in characters)
        self._pieces: dict[int, str] = {}
        self._special = set(getattr(tokenizer, "all_special_ids", []) or [])
        #: Steps at which a token was refused for ending a name early or misquoting a number.
        self.steps_held = 0

    def _piece(self, token: int) -> str:
        piece = self._pieces.get(token)
        if piece is None:
            piece = "" if token in self._special else self.tokenizer.decode([token])
            self._pieces[token] = piece
        return piece

    def _name_state(self, text: str, prompt_chars: int) -> tuple[str, NameIndex] | None:
        """``(written, index)`` where the text ends in a cut name start, else None."""
        if not (text[-1:].isalnum() or text[-1:] == " "):
            return None
        for written in _name_starts(text):
            if len(written.strip()) < 2:
                continue
            before = text[: len(text) - len(written)]
            index = self._index(NameIndex, quotable_text(before, prompt_chars))
            if index.cut(written):
                return written, index
            if any(n.startswith(written) for n in index.names):
                return None  # it starts a name that may end here
        return None

    def reset(self) -> None:
        """Forget the prompts seen: the next ids of each row are a new generation's prompt."""
        self._prompts.clear()
        self._indexes.clear()

    def _index(self, kind: type, quotable: str) -> Any:
        """The ``kind`` index (:class:`NameIndex` or :class:`NumberIndex`) of ``quotable``, cached."""
        cached = self._indexes.get(kind)
        if cached is None or cached[0] != quotable:
            cached = self._indexes[kind] = (quotable, kind(quotable))
        return cached[1]

    def _prompt(self, row: int, ids: list[int]) -> tuple[tuple[int, ...], int | None]:
        """``(prompt ids, their length in characters or None before it is needed)`` of the
        sequence ``ids`` goes on: the first input seen for a row is its prompt; ids that do not
        start with it begin a new sequence, whose prompt they are."""
        prompt = self._prompts.get(row)
        if prompt is None or len(ids) < len(prompt[0]) or tuple(ids[: len(prompt[0])]) != prompt[0]:
            prompt = self._prompts[row] = (tuple(ids), None)
        return prompt

    def _checks(self, ids: list[int], row: int = 0) -> list[Any] | None:
        """The checks a next token must pass (each ``piece -> bool``), or None inside a CML block."""
        prompt_ids, prompt_chars = self._prompt(row, ids)
        if not self.numbers:  # names only: no name is open unless the text ends in a letter, digit or space
            last = self.tokenizer.decode(ids[-8:])[-1:]
            if not (last.isalnum() or last == " "):
                return None
        text = self.tokenizer.decode(ids)
        if prompt_chars is None:
            prompt_chars = len(self.tokenizer.decode(list(prompt_ids)))
            self._prompts[row] = (prompt_ids, prompt_chars)
        if text.rfind(CALL) > text.rfind(END):
            return None  # inside a call block
        checks: list[Any] = []
        state = self._name_state(text, prompt_chars) if self.names else None
        if state is not None:
            written, index = state
            checks.append(lambda piece: index.may_follow(written, piece))
        if self.numbers:
            numbers = self._index(NumberIndex, quotable_text(text[: _open_number(text)], prompt_chars))
            tail = text[-NUMBER_TAIL_CHARS:]
            checks.append(lambda piece: numbers.may_write(tail, piece))
        return checks

    def allowed(self, ids: list[int], token: int, row: int = 0) -> bool:
        """Whether ``token`` may follow ``ids`` (row ``row`` of the batch; the first ids seen for a
        row are its prompt)."""
        piece = self._piece(token)
        return all(check(piece) for check in self._checks(ids, row) or ())

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row in range(input_ids.shape[0]):
            checks = self._checks(input_ids[row].tolist(), row)
            if not checks:
                continue
            order = torch.argsort(scores[row], descending=True)[: self.max_scan].tolist()
            keep = []
            for rank, token in enumerate(order):
                piece = self._piece(token)
                if all(check(piece) for check in checks):
                    keep.append(token)
                    if len(keep) >= self.candidates or (keep and rank >= self.candidates):
                        break
            if not keep:
                continue
            if keep[0] != order[0]:
                self.steps_held += 1
            mask = torch.full_like(scores[row], float("-inf"))
            mask[keep] = 0.0
            scores[row] = scores[row] + mask
        return scores
