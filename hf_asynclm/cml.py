"""CML, the in-context protocol of asynchronous function calling.

Five markers frame every block::

    [CALL] w1 [HEAD] get_weather(city="Paris") [END]     # the model starts a call
    [CALL] log_event(kind="x") [END]                      # fire and forget (no id)
    [INTR] w1 [HEAD] {"temp_c": 18} [END]                 # the runtime injects a result
    [INTR] user [HEAD] make it Thursday [END]             # a person speaks mid-generation
    [TRAP] [END]                                          # the model waits for a result

This module formats blocks, parses them incrementally from text that arrives in arbitrary
pieces (:class:`CMLParser`), and adds the markers to a tokenizer as special tokens
(:func:`add_cml_tokens`).

Example:

```python
>>> from hf_asynclm.cml import Block, CMLParser, TextEvent, format_call
>>> text = "Let me check. " + format_call('get_weather(city="Paris")', call_id="w1") + " Done."
>>> parser = CMLParser()
>>> events = []
>>> for i in range(0, len(text), 3):          # feed it three characters at a time
...     events += parser.feed(text[i : i + 3])
>>> events += parser.flush()
>>> [type(e).__name__ for e in events if not isinstance(e, TextEvent)]
['BlockOpened', 'Block']
>>> blocks = [e for e in events if isinstance(e, Block)]
>>> blocks[0].kind, blocks[0].call_id, blocks[0].body
('call', 'w1', 'get_weather(city="Paris")')

```
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Literal, Union

logger = logging.getLogger(__name__)

CALL = "[CALL]"
INTR = "[INTR]"
TRAP = "[TRAP]"
HEAD = "[HEAD]"
END = "[END]"

#: All five markers, in a fixed order (the order their token ids are added in).
MARKERS: tuple[str, ...] = (CALL, INTR, TRAP, HEAD, END)
#: Markers that open a block, and the kind of block each opens.
OPENERS: dict[str, str] = {CALL: "call", INTR: "interrupt", TRAP: "trap"}

BlockKind = Literal["call", "interrupt", "trap", "malformed"]

#: Id of the interrupts that carry what a person (or another agent) says mid-generation.
USER_ID = "user"
#: Id of error interrupts about the protocol itself (stray ``[END]``, broken blocks).
PROTOCOL_ERROR_ID = "cml"
#: Id of the error interrupt answering a trap that has nothing to wait for.
TRAP_ID = "trap"


class CMLSyntaxError(ValueError):
    """A block that does not follow CML (stray ``[END]``, unterminated block, bad id)."""


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------


def format_call(body: str, call_id: str | None = None) -> str:
    """Format a call block: ``[CALL] id [HEAD] body [END]`` (or ``[CALL] body [END]`` without id)."""
    if call_id is None:
        return f"{CALL} {body} {END}"
    return f"{CALL} {call_id} {HEAD} {body} {END}"


def format_interrupt(call_id: str, value: str) -> str:
    """Format an interrupt block: ``[INTR] id [HEAD] value [END]``."""
    return f"{INTR} {call_id} {HEAD} {value} {END}"


def format_trap() -> str:
    """Format a trap block: ``[TRAP] [END]``."""
    return f"{TRAP} {END}"


#: The ``interrupt_at`` settings that pace results (the runtime's and the simulator's): ``"sentence"``
#: (results wait for the end of a burst of calls) and ``"sentence-eager"`` (the rule before 2026-12-02).
PACED_INTERRUPT_AT: tuple[str, ...] = ("sentence", "sentence-eager")

#: What ends a sentence of visible text: where paced interrupts (``interrupt_at="sentence"``) may go in.
SENTENCE_ENDS: tuple[str, ...] = (".", "?", "!")


def ends_sentence(text: str) -> bool:
    """True when ``text`` ends a sentence: its last non-space character is ``.``, ``?`` or ``!``.
    The simulator's paced traces and the runtime's ``interrupt_at="sentence"`` share this rule.

    Example:

    ```python
    >>> from hf_asynclm.cml import ends_sentence
    >>> ends_sentence("Rome: 17 C, windy. "), ends_sentence("Rome:"), ends_sentence("$695.57")
    (True, False, False)

    ```
    """
    return text.rstrip().endswith(SENTENCE_ENDS)


def format_error(exc_type: str, message: str) -> str:
    """The value of an error interrupt: ``error: <Type>: <message>``."""
    message = " ".join(str(message).split())  # one line: no newline may break the block
    return f"error: {exc_type}: {message}"


def serialize_result(value: Any, max_chars: int | None = None) -> str:
    """Serialise a tool result for an interrupt: JSON when possible, ``repr`` otherwise.

    Strings are passed as they are. Results longer than ``max_chars`` are cut and end with a
    marker that says how much was dropped, e.g. ``...[truncated 1048000 chars]``.
    Markers inside the result are defused (``[END]`` becomes ``[END ]``) so that a result can
    never close or open a block.
    """
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=_json_default)
        except (TypeError, ValueError):
            text = repr(value)
    text = defuse_markers(text)
    if max_chars is not None and len(text) > max_chars:
        dropped = len(text) - max_chars
        text = f"{text[:max_chars]}...[truncated {dropped} chars]"
    return text


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    if hasattr(obj, "__dict__") and not callable(obj):
        return {k: v for k, v in vars(obj).items() if not k.startswith("_")}
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def defuse_markers(text: str) -> str:
    """Make CML markers inside data inert (``[END]`` -> ``[END ]``)."""
    for marker in MARKERS:
        if marker in text:
            text = text.replace(marker, marker[:-1] + " ]")
    return text


def is_valid_id(call_id: str) -> bool:
    """Ids follow Python identifier rules (``w1``, ``flight_2``)."""
    return call_id.isidentifier()


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextEvent:
    """Text outside any block: what the user sees."""

    text: str


@dataclass(frozen=True)
class BlockOpened:
    """An opening marker was read: the parser is now inside a block (critical section)."""

    kind: str


@dataclass(frozen=True)
class Block:
    """A complete block.

    ``kind`` is ``call``, ``interrupt``, ``trap`` or ``malformed``; ``call_id`` is the text
    before ``[HEAD]`` (None when there is no ``[HEAD]``); ``body`` the text after it;
    ``raw`` the block as written; ``error`` says what is wrong with a malformed block.
    """

    kind: BlockKind
    call_id: str | None
    body: str
    raw: str
    error: str | None = None


CMLEvent = Union[TextEvent, BlockOpened, Block]


def _split_block(kind: str, content: str, raw: str) -> Block:
    if HEAD in content:
        ident, body = content.split(HEAD, 1)
        ident = ident.strip()
        body = body.strip()
        if HEAD in body:
            return Block("malformed", ident or None, body, raw, f"more than one {HEAD} in a block")
        if kind == "trap":
            return Block("malformed", ident or None, body, raw, f"{TRAP} takes no {HEAD}")
        if not ident:
            return Block("malformed", None, body, raw, f"empty id before {HEAD}")
        if not is_valid_id(ident):
            return Block("malformed", ident, body, raw, f"invalid id {ident!r}: ids follow Python identifier rules")
        return Block(kind, ident, body, raw)  # type: ignore[arg-type]
    body = content.strip()
    if kind == "trap" and body:
        return Block("malformed", None, body, raw, f"{TRAP} takes no body")
    if kind == "interrupt":
        return Block("malformed", None, body, raw, f"{INTR} needs an id and {HEAD}")
    return Block(kind, None, body, raw)  # type: ignore[arg-type]


class CMLParser:
    """Incremental CML parser over text that arrives in arbitrary pieces.

    Feed it decoded text as it streams in; it returns events in order: visible text, the
    opening of a block and complete blocks. Markers split across pieces (``"[CA"`` + ``"LL]"``)
    or glued to neighbours (``"][END]"``, ``"[END]\\n"``) are recognised; only a suffix that
    could still become a marker is held back. Cutting the same text at any points gives the
    same events (texts merged).

    Malformed input never raises: a stray ``[END]``, a new opener inside an open block, or a
    block still open at :meth:`flush` produce a ``Block`` of kind ``"malformed"``.
    """

    def __init__(self) -> None:
        self._pending = ""  # text not yet consumed (may end with a partial marker)
        self._open_kind: str | None = None
        self._open_marker = ""
        self._content: list[str] = []

    # state -------------------------------------------------------------------------------
    @property
    def in_block(self) -> bool:
        """True inside a block: the critical section where no interrupt may be injected."""
        return self._open_kind is not None

    @property
    def open_kind(self) -> str | None:
        """Kind of the open block (``call``, ``interrupt``, ``trap``) or None."""
        return self._open_kind

    @property
    def holding(self) -> bool:
        """True when the parser holds back text that may be the start of a marker."""
        return bool(self._pending)

    @property
    def at_safe_point(self) -> bool:
        """Outside any block and not in the middle of a possible marker."""
        return self._open_kind is None and not self._pending

    @property
    def tail(self) -> str:
        """The held-back text (a possible partial marker)."""
        return self._pending

    # feeding -----------------------------------------------------------------------------
    def feed(self, text: str) -> list[CMLEvent]:
        """Consume ``text`` and return the events it completes."""
        self._pending += text
        events: list[CMLEvent] = []
        while self._pending:
            idx = self._pending.find("[")
            if idx < 0:
                self._emit_text(self._pending, events)
                self._pending = ""
                break
            if idx > 0:
                self._emit_text(self._pending[:idx], events)
                self._pending = self._pending[idx:]
            marker = next((m for m in MARKERS if self._pending.startswith(m)), None)
            if marker is not None:
                self._pending = self._pending[len(marker) :]
                self._on_marker(marker, events)
                continue
            if any(m.startswith(self._pending) for m in MARKERS):
                break  # could still become a marker: wait for more text
            self._emit_text("[", events)
            self._pending = self._pending[1:]
        return events

    def flush(self) -> list[CMLEvent]:
        """End of stream: release held-back text and report a block left open as malformed."""
        events: list[CMLEvent] = []
        if self._pending:
            self._emit_text(self._pending, events)
            self._pending = ""
        if self._open_kind is not None:
            raw = self._open_marker + "".join(self._content)
            content = "".join(self._content)
            ident = content.split(HEAD, 1)[0].strip() if HEAD in content else None
            events.append(Block("malformed", ident or None, content.strip(), raw, f"unterminated {self._open_marker} block"))
            self._close()
        return events

    # internals ---------------------------------------------------------------------------
    def _emit_text(self, text: str, events: list[CMLEvent]) -> None:
        if not text:
            return
        if self._open_kind is not None:
            self._content.append(text)
            return
        if events and isinstance(events[-1], TextEvent):
            events[-1] = TextEvent(events[-1].text + text)
        else:
            events.append(TextEvent(text))

    def _on_marker(self, marker: str, events: list[CMLEvent]) -> None:
        if marker in OPENERS:
            if self._open_kind is not None:
                raw = self._open_marker + "".join(self._content)
                events.append(
                    Block("malformed", None, "".join(self._content).strip(), raw, f"{marker} inside an open {self._open_marker} block")
                )
                self._close()
            self._open_kind = OPENERS[marker]
            self._open_marker = marker
            self._content = []
            events.append(BlockOpened(self._open_kind))
        elif marker == HEAD:
            if self._open_kind is None:
                self._emit_text(HEAD, events)  # a lone [HEAD] outside a block is just text
            else:
                self._content.append(HEAD)
        else:  # END
            if self._open_kind is None:
                events.append(Block("malformed", None, "", END, f"{END} with no open block"))
                return
            content = "".join(self._content)
            events.append(_split_block(self._open_kind, content, self._open_marker + content + END))
            self._close()

    def _close(self) -> None:
        self._open_kind = None
        self._open_marker = ""
        self._content = []


def parse_blocks(text: str) -> list[Block]:
    """Parse a whole text and return its blocks (malformed ones included)."""
    parser = CMLParser()
    events = parser.feed(text) + parser.flush()
    return [e for e in events if isinstance(e, Block)]


def visible_text(text: str) -> str:
    """The text outside any block (what the user sees), blocks removed."""
    parser = CMLParser()
    events = parser.feed(text) + parser.flush()
    return "".join(e.text for e in events if isinstance(e, TextEvent))


# ---------------------------------------------------------------------------------------------
# Tokenizer support
# ---------------------------------------------------------------------------------------------


@dataclass
class MarkerIds:
    """Token ids of the markers when each is a single token in the tokenizer (else None)."""

    call: int | None = None
    intr: int | None = None
    trap: int | None = None
    head: int | None = None
    end: int | None = None
    by_id: dict[int, str] = field(default_factory=dict)

    @property
    def single_token(self) -> bool:
        """True when all five markers are single tokens (the fast path)."""
        return len(self.by_id) == len(MARKERS)


def marker_token_ids(tokenizer: Any) -> MarkerIds:
    """Find the token id of each marker that the tokenizer holds as one token."""
    ids = MarkerIds()
    vocab = tokenizer.get_vocab()
    for name, marker in zip(("call", "intr", "trap", "head", "end"), MARKERS):
        tid = vocab.get(marker)
        if tid is not None:
            setattr(ids, name, int(tid))
            ids.by_id[int(tid)] = marker
    return ids


def add_cml_tokens(tokenizer: Any, model: Any | None = None) -> int:
    """Add the five CML markers to ``tokenizer`` as special tokens and resize ``model``.

    New embedding rows (and output rows, when untied) are set to the mean of the existing
    rows, which keeps the model's first predictions sane. Returns the number of tokens added.

    Example:

    ```python
    >>> from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    >>> from hf_asynclm.cml import add_cml_tokens, marker_token_ids
    >>> from hf_asynclm.testing import tiny_tokenizer
    >>> tok = tiny_tokenizer(with_markers=False)
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    >>> add_cml_tokens(tok, model)
    5
    >>> marker_token_ids(tok).single_token, model.get_input_embeddings().weight.shape[0] == len(tok)
    (True, True)

    ```
    """
    existing = marker_token_ids(tokenizer)
    missing = [m for m in MARKERS if m not in existing.by_id.values()]
    added = tokenizer.add_tokens(missing, special_tokens=True) if missing else 0
    if model is not None and added:
        import torch

        old_in = model.get_input_embeddings().weight.data.clone()
        out_layer = model.get_output_embeddings()
        old_out = out_layer.weight.data.clone() if out_layer is not None else None
        n_old = old_in.shape[0]
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            if emb.shape[0] > n_old:
                emb[n_old:] = old_in.mean(dim=0, keepdim=True)
            out_layer = model.get_output_embeddings()
            if out_layer is not None and old_out is not None and out_layer.weight is not emb:
                if out_layer.weight.shape[0] > n_old:
                    out_layer.weight[n_old:] = old_out.mean(dim=0, keepdim=True)
    logger.debug("added %d CML marker tokens", added)
    return added
