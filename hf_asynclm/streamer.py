"""Streamers for asynchronous generation: visible text apart from CML, and runtime events.

:class:`CMLStreamer` is a transformers ``BaseStreamer``. It receives the tokens the model
samples (``put``), the interrupt tokens the runtime injects (``put_injected``) and the
runtime's events (``on_event``: call started, call finished, trap, ...). It separates the
user-visible text from CML blocks and turns everything into :class:`StreamEvent` objects, each
with a monotonic timestamp, delivered to :meth:`CMLStreamer.on_stream_event`.

* :class:`CMLTextStreamer` prints the visible text as it comes, like ``TextStreamer``.
* :class:`CMLIteratorStreamer` is an iterator of events for UIs (generation in another thread).

Example:

```python
>>> from hf_asynclm.streamer import CMLStreamer
>>> from hf_asynclm.testing import tiny_tokenizer
>>> import torch
>>> tok = tiny_tokenizer()
>>> s = CMLStreamer(tok)
>>> s.put(torch.tensor([tok.encode("prompt")]))          # the prompt comes first, skipped
>>> for tid in tok.encode('Checking. [CALL] w1 [HEAD] get_weather(city="Oslo") [END] Done.'):
...     s.put(torch.tensor([tid]))
>>> s.end()
>>> s.visible_text
'Checking.  Done.'
>>> [e.kind for e in s.events if e.kind != "text"]
['call_written', 'done']

```
"""

from __future__ import annotations

import logging
import queue
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, TextIO

import torch
from transformers.generation.streamers import BaseStreamer

from .cml import Block, TextEvent
from .monitor import CMLMonitor

logger = logging.getLogger(__name__)

#: Kinds of :class:`StreamEvent`.
EVENT_KINDS = (
    "text",  # visible text written by the model
    "call_written",  # the model finished writing a call block
    "call_started",  # the executor started a call
    "call_finished",  # a call returned, failed or timed out (its interrupt is ready)
    "interrupt",  # an interrupt was injected into the model's context
    "user_interrupt",  # a person's message was queued
    "trap",  # the model trapped: decoding pauses
    "resume",  # decoding resumes after a trap or a synchronous wait
    "malformed",  # a block that breaks CML
    "done",  # generation ended
)


@dataclass
class StreamEvent:
    """One thing that happened during a generation.

    Attributes:
        kind: one of :data:`EVENT_KINDS`.
        time: ``time.monotonic()`` when it happened.
        text: visible text (``text``), the interrupt as injected (``interrupt``), the block
            as written (``call_written``, ``malformed``), the message (``user_interrupt``).
        call_id: the call it is about, if any.
        name: the tool's name, if known.
        data: details (arguments, result, error, wait time, stop reason ...).
    """

    kind: str
    time: float
    text: str = ""
    call_id: str | None = None
    name: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "time": self.time,
            "text": self.text,
            "call_id": self.call_id,
            "name": self.name,
            "data": self.data,
        }


class CMLStreamer(BaseStreamer):
    """Base streamer: decodes sampled tokens, separates visible text from CML, records events.

    Args:
        tokenizer: the model's tokenizer.
        skip_prompt: ignore the first ``put`` (the prompt), as ``TextStreamer`` does.

    Subclasses override :meth:`on_stream_event`. All events are also kept in ``events``.
    """

    def __init__(self, tokenizer: Any, skip_prompt: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.monitor = CMLMonitor(tokenizer, mask_text_intr=False)
        self.events: list[StreamEvent] = []
        self._next_is_prompt = True
        self._ended = False

    # BaseStreamer ----------------------------------------------------------------------------
    def put(self, value: torch.Tensor) -> None:
        """Receive sampled tokens (the first call, 2-D, is the prompt)."""
        if self._next_is_prompt:
            self._next_is_prompt = False
            if self.skip_prompt:
                return
        if value.dim() > 1:
            if value.shape[0] != 1:
                raise ValueError("CMLStreamer follows one sequence (batch size 1)")
            value = value[0]
        for tid in value.tolist():
            self._handle(self.monitor.feed_token(tid))

    def put_decoded(self, cml_events: list[Any]) -> None:
        """Receive the CML events of sampled tokens that the caller's own
        :class:`~hf_asynclm.monitor.CMLMonitor` already decoded (the hf-asynclm loop does this
        for its recorder, so that each token is decoded once, not twice). Use either this or
        :meth:`put` for the sampled tokens of a generation, never both."""
        self._next_is_prompt = False
        self._handle(cml_events)

    def put_injected(self, token_ids: torch.Tensor, interrupts: list[Any]) -> None:
        """Receive the tokens of injected interrupts (called by the hf-asynclm loop)."""
        self.monitor.reset_context()
        now = time.monotonic()
        for intr in interrupts:
            self._emit(StreamEvent("interrupt", now, text=intr.text(), call_id=intr.call_id, data={"is_error": intr.is_error}))

    def on_event(self, event: StreamEvent) -> None:
        """Receive a runtime event (call started / finished, trap, resume ...)."""
        self._emit(event)

    def end(self, flushed: list[Any] | None = None) -> None:
        """End of generation: flush held-back text and emit ``done``.

        ``flushed``: the final events of the caller's monitor, when tokens came through
        :meth:`put_decoded` (default: this streamer's own monitor is flushed)."""
        if self._ended:
            return
        self._ended = True
        self._handle(self.monitor.flush() if flushed is None else flushed)
        self._emit(StreamEvent("done", time.monotonic()))

    # helpers ---------------------------------------------------------------------------------
    @property
    def visible_text(self) -> str:
        """All visible text so far."""
        return "".join(e.text for e in self.events if e.kind == "text")

    def _handle(self, cml_events: list[Any]) -> None:
        now = time.monotonic()
        for ev in cml_events:
            if isinstance(ev, TextEvent):
                self._emit(StreamEvent("text", now, text=ev.text))
            elif isinstance(ev, Block):
                if ev.kind == "call":
                    self._emit(StreamEvent("call_written", now, text=ev.raw, call_id=ev.call_id, data={"body": ev.body}))
                elif ev.kind == "malformed":
                    self._emit(StreamEvent("malformed", now, text=ev.raw, call_id=ev.call_id, data={"error": ev.error}))
                # traps are reported by the runtime (with their wait); interrupts by put_injected

    def _emit(self, event: StreamEvent) -> None:
        self.events.append(event)
        try:
            self.on_stream_event(event)
        except Exception:  # a UI callback must never break generation
            logger.exception("stream event handler failed")

    def on_stream_event(self, event: StreamEvent) -> None:
        """Override to react to each event."""


class CMLTextStreamer(CMLStreamer):
    """Prints the visible text as it is generated (and, with ``show_calls``, a line per call event).

    Example:

    ```python
    >>> from hf_asynclm.streamer import CMLTextStreamer
    >>> from hf_asynclm.testing import tiny_tokenizer
    >>> import io, torch
    >>> tok = tiny_tokenizer(); out = io.StringIO()
    >>> s = CMLTextStreamer(tok, file=out)
    >>> s.put(torch.tensor([tok.encode("prompt")]))
    >>> for tid in tok.encode("Hello [TRAP] [END] there"):
    ...     s.put(torch.tensor([tid]))
    >>> s.end(); out.getvalue()
    'Hello  there\\n'

    ```
    """

    def __init__(self, tokenizer: Any, skip_prompt: bool = True, file: TextIO | None = None, show_calls: bool = False) -> None:
        super().__init__(tokenizer, skip_prompt=skip_prompt)
        self.file = file if file is not None else sys.stdout
        self.show_calls = show_calls

    def on_stream_event(self, event: StreamEvent) -> None:
        if event.kind == "text":
            self.file.write(event.text)
            self.file.flush()
        elif event.kind == "done":
            self.file.write("\n")
            self.file.flush()
        elif self.show_calls and event.kind in ("call_started", "call_finished", "interrupt", "trap"):
            self.file.write(f"\n  <{event.kind} {event.call_id or ''}>\n")
            self.file.flush()


class CMLIteratorStreamer(CMLStreamer):
    """Events as an iterator, for UIs that run generation in another thread.

    Args:
        timeout: seconds to wait for the next event before ``queue.Empty`` is raised
            (``None``: wait forever).

    Example:

    ```python
    >>> from hf_asynclm.streamer import CMLIteratorStreamer
    >>> from hf_asynclm.testing import tiny_tokenizer
    >>> import torch
    >>> tok = tiny_tokenizer(); s = CMLIteratorStreamer(tok, timeout=5)
    >>> s.put(torch.tensor([tok.encode("prompt")])); s.put(torch.tensor(tok.encode("Hi"))); s.end()
    >>> events = list(s)
    >>> events[-1].kind, "".join(e.text for e in events)
    ('done', 'Hi')

    ```
    """

    def __init__(self, tokenizer: Any, skip_prompt: bool = True, timeout: float | None = None) -> None:
        super().__init__(tokenizer, skip_prompt=skip_prompt)
        self.queue: "queue.Queue[StreamEvent]" = queue.Queue()
        self.timeout = timeout

    def on_stream_event(self, event: StreamEvent) -> None:
        self.queue.put(event)

    def __iter__(self) -> Iterator[StreamEvent]:
        while True:
            event = self.queue.get(timeout=self.timeout)
            yield event
            if event.kind == "done":
                return
