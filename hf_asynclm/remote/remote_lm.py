"""`RemoteAsyncLM`: asynchronous function calling on a remote serving engine.

Serving engines (TGI, vLLM, SGLang, llama.cpp, ``transformers serve``) cannot inject tokens
into a running request. The remote loop therefore streams the model's text into the same CML
monitor and :class:`~hf_asynclm.executor.ToolExecutor` as the local runtime, and

* starts each call the moment its ``[END]`` streams in (``async``), waits for it (``sync``) or
  bundles calls until the next trap (``sync-parallel``);
* at a safe point (outside any block) with interrupts ready, or on a trap, closes the stream and
  **re-submits** the prompt extended by the generated text and the interrupts
  (``[INTR] id [HEAD] value [END]``). Engines with a prefix cache then only process the new
  part. This is the paper's "Async-Naive" cloud variant.

Each request is a *segment*; ``result.stats`` counts the re-submissions
(``stats.resubmissions``) and each segment's time to first token (``stats.segment_ttft_s``),
and ``stats.remote`` holds a summary per segment, the retries and the resumptions.

Faults: client errors (4xx) raise a :class:`~hf_asynclm.remote.backends.RemoteEngineError`
naming the endpoint, without retry; server errors (5xx, 429), refused connections and server
error events are retried with exponential backoff (``max_retries``) while no token of the
segment arrived; a stream that fails after some tokens is resumed from the text received
(``max_resumes``), which is safe because the next prompt holds that text; a server silent for
``timeout_s`` raises. Whatever happens, calls in flight are cancelled and the executor closed.

Example:

```python
>>> from hf_asynclm.remote import RemoteAsyncLM
>>> def get_weather(city: str) -> dict:
...     '''Current weather.
...
...     Args:
...         city: The city.
...     '''
...     return {"city": city, "temp_c": 18}
>>> rlm = RemoteAsyncLM("http://127.0.0.1:8080", backend="tgi", tools=[get_weather])
>>> rlm.backend.name
'tgi'
>>> result = rlm.generate("Weather in Oslo?", max_new_tokens=128)   # doctest: +SKIP
>>> result.text, result.stats.resubmissions, result.stats.segment_ttft_s   # doctest: +SKIP
('Oslo: 18 C.', 1, [0.041, 0.012])

```
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

from ..cml import Block, CMLParser, TextEvent, format_trap
from ..executor.executor import ToolExecutor
from ..executor.registry import ToolRegistry
from ..generation import MODES, GenerationSession, Mode, SessionControl
from ..prompting import build_prompt, cml_system_prompt
from ..streamer import StreamEvent
from .backends import RemoteEngineError, SegmentRequest, StreamChunk, make_backend

logger = logging.getLogger(__name__)

__all__ = ["RemoteAsyncLM", "RemoteSession"]

_SLICE_S = 0.05  # the loop wakes this often to notice interrupts, cancellation and silence
_END = "[END]"
_TRAP_STOP = format_trap()  # "[TRAP] [END]"


# ---------------------------------------------------------------------------------------------
# session
# ---------------------------------------------------------------------------------------------


class _EventLog:
    """Keeps every event of a remote generation and hands each to an optional listener."""

    def __init__(self, listener: Callable[[StreamEvent], None] | None = None) -> None:
        self.events: list[StreamEvent] = []
        self.listener = listener

    def on_event(self, event: StreamEvent) -> None:
        self.events.append(event)
        if self.listener is not None:
            try:
                self.listener(event)
            except Exception:  # a UI callback must never break generation
                logger.exception("stream event listener failed")


class _TextMonitor:
    """The text side of :class:`~hf_asynclm.monitor.CMLMonitor`, for use without a tokenizer."""

    def __init__(self) -> None:
        self.parser = CMLParser()

    @property
    def in_block(self) -> bool:
        return self.parser.in_block

    @property
    def at_safe_point(self) -> bool:
        return self.parser.at_safe_point

    def feed_text(self, text: str) -> list[Any]:
        return self.parser.feed(text)

    def reset_context(self) -> None:
        pass

    def flush(self) -> list[Any]:
        return self.parser.flush()


def _make_monitor(tokenizer: Any | None) -> Any:
    if tokenizer is None:
        return _TextMonitor()
    from ..monitor import CMLMonitor

    return CMLMonitor(tokenizer)


class RemoteSession(GenerationSession):
    """Runtime state of ONE remote generation (executor, events, counters, pending waits).

    The local :class:`~hf_asynclm.generation.GenerationSession` with two changes: a trap, or a
    call in ``sync`` mode, is only *noted* when its block streams in (the stream is closed
    before the wait, see :meth:`settle`), and :meth:`cancel` also stops the open stream.
    """

    def __init__(
        self,
        executor: ToolExecutor,
        mode: Mode = "async",
        trap_timeout_s: float = 60.0,
        drain_on_eos: bool = True,
        tokenizer: Any | None = None,
        listener: Callable[[StreamEvent], None] | None = None,
    ) -> None:
        super().__init__(
            tokenizer, executor, mode=mode, trap_timeout_s=trap_timeout_s, drain_on_eos=drain_on_eos, owns_executor=True
        )
        self.attach_recorder(_EventLog(listener))
        self.trap_pending = False
        self.sync_waits: list[Any] = []
        self.raw_text = ""
        self.prompt = ""
        self._pump: "_Pump | None" = None
        self._pump_lock = threading.Lock()

    def cancel(self) -> None:
        """Stop the generation now: the open stream is closed, calls in flight are cancelled."""
        super().cancel()
        with self._pump_lock:
            pump = self._pump
        if pump is not None:
            pump.stop()

    def handle_block(self, block: Block, driver: Any = None) -> None:
        """Act on a complete block (calls start here; traps and sync waits wait in :meth:`settle`)."""
        if block.kind == "trap":
            self.blocks.append(block)
            self.trap_pending = True
        elif block.kind == "call" and self.mode == "sync":
            self.blocks.append(block)
            self.sync_waits.append(self._submit(block))
        else:
            super().handle_block(block, driver)

    def needs_cut(self) -> bool:
        """Something must go into the context (or be waited for) before the model goes on."""
        return self.trap_pending or bool(self.sync_waits) or self.executor.has_ready()

    def settle(self) -> None:
        """With the stream closed: wait for sync calls, then serve a pending trap."""
        waits, self.sync_waits = self.sync_waits, []
        for record in waits:
            self._wait_call(record)
        if self.trap_pending:
            self.trap_pending = False
            self.trap(None)  # type: ignore[arg-type]  # trap_cache_policy "keep": no cache to touch

    def _set_pump(self, pump: "_Pump | None") -> None:
        with self._pump_lock:
            self._pump = pump
        if pump is not None and self.cancelled:
            pump.stop()


# ---------------------------------------------------------------------------------------------
# one streaming request, read in a thread
# ---------------------------------------------------------------------------------------------


class _Pump:
    """Opens one stream and reads it in a daemon thread into a queue.

    The loop never blocks on the network: it polls the queue, so a user interrupt, a
    cancellation or a silent server is noticed within a slice whatever the server does.
    """

    def __init__(self, backend: Any, request: SegmentRequest) -> None:
        self.backend = backend
        self.request = request
        self.queue: "queue.Queue[tuple[str, Any]]" = queue.Queue()
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._stream: Any = None
        self.thread = threading.Thread(target=self._run, name="hf-asynclm-remote-stream", daemon=True)

    def start(self) -> "_Pump":
        self.thread.start()
        return self

    def _run(self) -> None:
        stream = None
        try:
            stream = self.backend.open(self.request)
            with self._lock:
                self._stream = stream
            if self._stopped.is_set():
                return
            for chunk in stream:
                if self._stopped.is_set():
                    return
                self.queue.put(("chunk", chunk))
            self.queue.put(("end", None))
        except BaseException as exc:  # handed to the loop's thread
            if not self._stopped.is_set():
                self.queue.put(("error", exc))
        finally:
            if stream is not None:
                try:
                    stream.close()
                except Exception:
                    logger.debug("error while closing a stream", exc_info=True)

    def stop(self) -> None:
        """Stop reading (from any thread); the server sees the request end."""
        self._stopped.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            abort = getattr(stream, "abort", None)
            try:
                if abort is not None:
                    abort()
            except Exception:
                logger.debug("error while aborting a stream", exc_info=True)


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------


def render_plain_prompt(
    prompt_or_messages: str | Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] = (), system_prompt: bool | str = True
) -> str:
    """A text prompt for a server without a tokenizer at hand: CML system prompt, then the request.

    A string is used as it is, after the system prompt. Messages become a plain transcript
    (``User: ...``) that ends with ``Assistant:``.

    Example:

    ```python
    >>> from hf_asynclm.remote.remote_lm import render_plain_prompt
    >>> print(render_plain_prompt([{"role": "user", "content": "Hi"}], tools=(), system_prompt=False))
    User: Hi
    Assistant:

    ```
    """
    sys_text = ""
    if tools and system_prompt:
        sys_text = system_prompt if isinstance(system_prompt, str) else cml_system_prompt(tools)
    if isinstance(prompt_or_messages, str):
        return f"{sys_text}\n\n{prompt_or_messages}" if sys_text else prompt_or_messages
    lines: list[str] = []
    messages = [dict(m) for m in prompt_or_messages]
    if sys_text and not any(m.get("role") == "system" for m in messages):
        lines.append(f"System: {sys_text}")
    for m in messages:
        role = str(m.get("role", "user"))
        lines.append(f"{role.capitalize()}: {m.get('content', '')}")
    lines.append("Assistant:")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the facade
# ---------------------------------------------------------------------------------------------


class RemoteAsyncLM(SessionControl):
    """Asynchronous function calling on a remote engine, with the API of :class:`~hf_asynclm.AsyncLM`.

    Args:
        endpoint: the server's URL, e.g. ``http://127.0.0.1:8080``.
        backend: ``"tgi"`` (``InferenceClient.text_generation``, TGI's streaming route) or
            ``"openai"`` (``/v1/completions``: vLLM, SGLang, llama.cpp, ``transformers serve``),
            or a backend object with ``open(SegmentRequest)``.
        tokenizer: the served model's tokenizer, optional: renders chat messages with its chat
            template (as :class:`~hf_asynclm.AsyncLM` does) and counts prompt and interrupt
            tokens. Without one, prompts are plain text with the CML system prompt.
        tools: callables, ``Tool`` objects, ``(schema, handler)`` pairs or a ``ToolRegistry``.
        mode: ``async`` (default), ``sync`` or ``sync-parallel``.
        model: the ``model`` field of OpenAI requests (the model name the server knows).
        timeout_s: longest silence of the server (before the first token, or between two)
            before the generation fails with a timeout.
        max_retries: attempts after a retryable failure (5xx, 429, connection refused, server
            error event) that happened before any token of the segment arrived.
        max_resumes: re-submissions after streams that failed midway, per generation.
        retry_backoff_s: first backoff; it doubles at each retry (capped at 30 s).
        server_stops: ask the server to stop at ``[TRAP] [END]`` (``[END]`` in ``sync`` mode)
            itself. Default: when the backend keeps stop strings in its output (TGI). Without
            it the loop closes the stream when it reads the block.
        call_timeout_s, trap_timeout_s, max_result_chars, max_in_flight, max_workers,
            system_prompt, drain_on_eos: as for :class:`~hf_asynclm.AsyncLM`.
        token: bearer token for the server (``api_key`` for OpenAI servers).
        headers: more HTTP headers.
        extra_body: more JSON fields of every OpenAI request (e.g.
            ``{"skip_special_tokens": False}`` on vLLM when the CML markers are special tokens).
        backend_kwargs: more keyword arguments for the backend class.

    Example:

    ```python
    >>> from hf_asynclm import AsyncLM
    >>> rlm = AsyncLM.remote("http://127.0.0.1:8000", backend="openai", model="my-cml-model", mode="sync")
    >>> rlm.mode, rlm.backend.url
    ('sync', 'http://127.0.0.1:8000/v1/completions')
    >>> for event in rlm.stream("Weather in Oslo?", max_new_tokens=64):   # doctest: +SKIP
    ...     print(event.kind, event.text)

    ```
    """

    def __init__(
        self,
        endpoint: str,
        backend: str | Any = "tgi",
        tokenizer: Any | None = None,
        tools: Iterable[Any] | ToolRegistry | None = None,
        mode: Mode = "async",
        *,
        model: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        max_resumes: int = 3,
        retry_backoff_s: float = 0.5,
        server_stops: bool | None = None,
        call_timeout_s: float = 30.0,
        trap_timeout_s: float = 60.0,
        max_result_chars: int = 4096,
        max_in_flight: int = 32,
        max_workers: int = 8,
        system_prompt: bool | str = True,
        drain_on_eos: bool = True,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        extra_body: dict[str, Any] | None = None,
        backend_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
        if timeout_s is None or timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if max_retries < 0 or max_resumes < 0:
            raise ValueError("max_retries and max_resumes must be >= 0")
        self.endpoint = endpoint
        if isinstance(backend, str):
            options: dict[str, Any] = {"timeout_s": timeout_s, "headers": headers, "model": model}
            if backend == "openai":
                options.update(api_key=token, extra_body=extra_body)
            else:
                options.update(token=token)
            options.update(backend_kwargs or {})
            self.backend = make_backend(endpoint, backend, **options)
        else:
            if not hasattr(backend, "open"):
                raise TypeError("backend must be 'tgi', 'openai' or an object with open(SegmentRequest)")
            self.backend = backend
        self.tokenizer = tokenizer
        self.registry = ToolRegistry.coerce(tools)
        self.mode: Mode = mode
        self.model = model
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.max_resumes = int(max_resumes)
        self.retry_backoff_s = float(retry_backoff_s)
        self.server_stops = bool(getattr(self.backend, "stop_in_output", False)) if server_stops is None else bool(server_stops)
        self.call_timeout_s = call_timeout_s
        self.trap_timeout_s = trap_timeout_s
        self.max_result_chars = max_result_chars
        self.max_in_flight = max_in_flight
        self.max_workers = max_workers
        self.system_prompt = system_prompt
        self.drain_on_eos = drain_on_eos
        self._session: RemoteSession | None = None
        self._lock = threading.Lock()
        self.last_session: RemoteSession | None = None

    def __repr__(self) -> str:
        return f"RemoteAsyncLM({self.backend!r}, mode={self.mode!r}, tools={self.registry.names})"

    # sessions ----------------------------------------------------------------------------------
    def new_session(self, mode: Mode | None = None, listener: Callable[[StreamEvent], None] | None = None) -> RemoteSession:
        """A fresh runtime session (executor, monitor state, counters) for one generation."""
        if mode is not None and mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
        executor = ToolExecutor(
            self.registry,
            timeout_s=self.call_timeout_s,
            max_workers=self.max_workers,
            max_in_flight=self.max_in_flight,
            max_result_chars=self.max_result_chars,
        )
        return RemoteSession(
            executor,
            mode=mode or self.mode,
            trap_timeout_s=self.trap_timeout_s,
            drain_on_eos=self.drain_on_eos,
            tokenizer=self.tokenizer,
            listener=listener,
        )

    def render_prompt(self, prompt_or_messages: str | Sequence[dict[str, Any]]) -> str:
        """The text sent to the server for a prompt or chat messages (tools included).

        With a tokenizer: :func:`~hf_asynclm.prompting.build_prompt`, minus a leading BOS
        token text (servers add their own). Without: :func:`render_plain_prompt`.
        """
        schemas = self.registry.schemas()
        if self.tokenizer is None:
            return render_plain_prompt(prompt_or_messages, schemas, self.system_prompt)
        prompt = build_prompt(self.tokenizer, prompt_or_messages, schemas, self.system_prompt)
        bos = getattr(self.tokenizer, "bos_token", None)
        if bos and prompt.startswith(bos):
            prompt = prompt[len(bos) :]
        return prompt

    # generation --------------------------------------------------------------------------------
    def generate(
        self,
        prompt_or_messages: str | Sequence[dict[str, Any]],
        *,
        max_new_tokens: int = 256,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        mode: Mode | None = None,
        extra_body: dict[str, Any] | None = None,
        on_event: Callable[[StreamEvent], None] | None = None,
    ) -> Any:
        """Generate with asynchronous function calling on the remote engine.

        Args:
            prompt_or_messages: a prompt string or chat messages.
            max_new_tokens: tokens the model may generate, over all segments (injected
                interrupts do not count).
            temperature: sampling temperature (None: the server's default; 0: greedy).
            top_p: nucleus sampling (None: the server's default).
            seed: the server sampler's seed.
            stop: stop strings: generation ends when the model writes one.
            mode: override the instance's mode for this call.
            extra_body: more JSON fields for this call's OpenAI requests.
            on_event: called with each :class:`~hf_asynclm.streamer.StreamEvent` as it happens.

        Returns:
            An :class:`~hf_asynclm.asynclm.AsyncResult` (``stats.resubmissions``,
            ``stats.segment_ttft_s`` and ``stats.remote`` describe the segments).

        Raises:
            RemoteEngineError: the server failed beyond what retries and resumptions cover.
        """
        session = self.new_session(mode, listener=on_event)
        with self._lock:
            if self._session is not None:
                raise RuntimeError("a generation is already running on this RemoteAsyncLM: use one instance per thread")
            self._session = session
        try:
            self._run(
                session,
                self.render_prompt(prompt_or_messages),
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                stop=list(stop or []),
                extra=dict(extra_body or {}),
            )
        finally:
            with self._lock:
                self._session = None
                self.last_session = session
        return self.result_of(session)

    def stream(self, prompt_or_messages: str | Sequence[dict[str, Any]], **kwargs: Any) -> Iterator[StreamEvent]:
        """Generate in a background thread and yield :class:`~hf_asynclm.streamer.StreamEvent` objects.

        Takes the keyword arguments of :meth:`generate`. The last event is ``done``; its
        ``data["result"]`` holds the :class:`~hf_asynclm.asynclm.AsyncResult`. An exception of
        the generation is re-raised here. Closing the iterator early cancels the generation.
        """
        events: "queue.Queue[StreamEvent]" = queue.Queue()
        outcome: dict[str, Any] = {}
        done_sent = threading.Event()
        user_listener = kwargs.pop("on_event", None)

        def forward(event: StreamEvent) -> None:
            if event.kind == "done":
                done_sent.set()
            if user_listener is not None:
                user_listener(event)
            events.put(event)

        def run() -> None:
            try:
                outcome["result"] = self.generate(prompt_or_messages, on_event=forward, **kwargs)
            except BaseException as exc:  # re-raised in the caller's thread
                outcome["error"] = exc
                if not done_sent.is_set():  # it failed before the loop started
                    events.put(StreamEvent("done", time.monotonic(), data={"error": repr(exc)}))

        thread = threading.Thread(target=run, name="hf-asynclm-remote-generate", daemon=True)
        thread.start()
        try:
            while True:
                event = events.get()
                if event.kind == "done":
                    thread.join()
                    if "error" in outcome:
                        raise outcome["error"]
                    event.data["result"] = outcome["result"]
                    yield event
                    return
                yield event
        finally:
            if thread.is_alive():
                self.cancel()
                thread.join(timeout=30)

    # results -----------------------------------------------------------------------------------
    def result_of(self, session: RemoteSession) -> Any:
        """Build the :class:`~hf_asynclm.asynclm.AsyncResult` of a finished session."""
        import torch

        from ..asynclm import AsyncResult

        events = session.events
        text = "".join(e.text for e in events if e.kind == "text")
        prompt_length = 0
        sequences = torch.zeros(1, 0, dtype=torch.long)
        if self.tokenizer is not None:
            prompt_ids = self.tokenizer.encode(session.prompt, add_special_tokens=False)
            raw_ids = self.tokenizer.encode(session.raw_text, add_special_tokens=False) if session.raw_text else []
            prompt_length = len(prompt_ids)
            sequences = torch.tensor([prompt_ids + raw_ids], dtype=torch.long)
        return AsyncResult(
            text=text,
            raw_text=session.raw_text,
            calls=list(session.executor.calls),
            timeline=sorted(events, key=lambda e: e.time),
            stats=session.stats,
            sequences=sequences,
            prompt_length=prompt_length,
            interrupts=list(session.injected),
            leftover_interrupts=list(session.leftover_interrupts),
            malformed=[b for b in session.blocks if b.kind == "malformed"],
            mode=session.mode,
        )

    # the loop ----------------------------------------------------------------------------------
    def _own_stops(self, mode: str) -> list[str]:
        if not self.server_stops:
            return []
        return [_END] if mode == "sync" else [_TRAP_STOP]

    def _count_tokens(self, text: str) -> int:
        if self.tokenizer is None or not text:
            return 0
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def _feed(self, session: RemoteSession, monitor: Any, text: str) -> None:
        """Feed model text to the monitor; emit text / block events and act on blocks."""
        now = time.monotonic()
        for event in monitor.feed_text(text):
            self._on_cml_event(session, event, now)

    def _on_cml_event(self, session: RemoteSession, event: Any, now: float) -> None:
        if isinstance(event, TextEvent):
            session._emit(StreamEvent("text", now, text=event.text))
        elif isinstance(event, Block):
            if event.kind == "call":
                session._emit(StreamEvent("call_written", now, text=event.raw, call_id=event.call_id, data={"body": event.body}))
            elif event.kind == "malformed":
                session._emit(StreamEvent("malformed", now, text=event.raw, call_id=event.call_id, data={"error": event.error}))
            session.handle_block(event)

    def _inject(self, session: RemoteSession, monitor: Any) -> int:
        """Append every ready interrupt to the context; return how many went in."""
        interrupts = session.take_interrupts()
        if not interrupts:
            return 0
        text = "".join(i.text() for i in interrupts)
        session.raw_text += text
        session.injected.extend(interrupts)
        session.stats.interrupts += len(interrupts)
        session.stats.injected_tokens += self._count_tokens(text)
        monitor.reset_context()
        now = time.monotonic()
        for intr in interrupts:
            session._emit(StreamEvent("interrupt", now, text=intr.text(), call_id=intr.call_id, data={"is_error": intr.is_error}))
        return len(interrupts)

    def _backoff(self, session: RemoteSession, attempt: int) -> None:
        delay = min(30.0, self.retry_backoff_s * (2 ** (attempt - 1)))
        deadline = time.monotonic() + delay
        while not session.cancelled and time.monotonic() < deadline:
            time.sleep(min(_SLICE_S, max(0.0, deadline - time.monotonic())))

    def _run(
        self,
        session: RemoteSession,
        prompt: str,
        *,
        max_new_tokens: int,
        temperature: float | None,
        top_p: float | None,
        seed: int | None,
        stop: list[str],
        extra: dict[str, Any],
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        t_start = time.monotonic()
        stats = session.stats
        session.prompt = prompt
        session.started.set()
        monitor = _make_monitor(self.tokenizer)
        own_stops = self._own_stops(session.mode)
        user_stops = [s for s in stop if s]
        longest_stop = max((len(s) for s in user_stops), default=0)
        segments: list[dict[str, Any]] = []
        stats.remote = {
            "backend": getattr(self.backend, "name", type(self.backend).__name__),
            "endpoint": self.endpoint,
            "segments": segments,
            "retries": 0,
            "resumes": 0,
            "dropped_chars": 0,
        }
        generated = 0
        retries = 0  # consecutive failed attempts with no token received
        resumes = 0
        recent = ""  # tail of the model's own text since the last injection (stop-string search)
        first_token = True
        stop_reason = ""
        failure: BaseException | None = None

        try:
            while True:
                if session.cancelled:
                    stop_reason = "cancelled"
                    break
                if session.stuck_on_cml_errors:  # the model loops on broken CML: do not re-submit forever
                    stop_reason = "cml_errors"
                    break
                remaining = max_new_tokens - generated
                if remaining <= 0:
                    stop_reason = "max_new_tokens"
                    break
                request = SegmentRequest(
                    prompt=prompt + session.raw_text,
                    max_new_tokens=remaining,
                    stop=own_stops + user_stops,
                    temperature=temperature,
                    top_p=top_p,
                    seed=seed,
                    extra=extra,
                )
                seg: dict[str, Any] = {
                    "index": len(segments),
                    "prompt_chars": len(request.prompt),
                    "tokens": 0,
                    "ttft_s": None,
                    "end": "",
                }
                segments.append(seg)
                t_seg = time.monotonic()
                pump = _Pump(self.backend, request)
                session._set_pump(pump)
                pump.start()
                last_activity = t_seg
                seg_tokens = 0
                end = ""
                finish: StreamChunk | None = None
                error: BaseException | None = None
                user_stop_hit = False
                try:
                    while True:
                        if session.cancelled:
                            end = "cancelled"
                            break
                        try:
                            kind, item = pump.queue.get(timeout=_SLICE_S)
                        except queue.Empty:
                            now = time.monotonic()
                            if monitor.at_safe_point and session.needs_cut():
                                end = "cut"
                                break
                            if now - last_activity > self.timeout_s:
                                what = "before the first token" if seg_tokens == 0 else "between two tokens"
                                error = RemoteEngineError(
                                    f"no answer for {self.timeout_s:g} s {what} (read timeout)",
                                    endpoint=self.endpoint,
                                    kind="timeout",
                                )
                                end = "error"
                                break
                            continue
                        last_activity = time.monotonic()
                        if kind == "error":
                            error = item
                            end = "error"
                            break
                        if kind == "end":
                            error = RemoteEngineError(
                                "the stream ended without a finish reason", endpoint=self.endpoint, kind="cut", retryable=True
                            )
                            end = "error"
                            break
                        chunk: StreamChunk = item
                        if chunk.tokens or chunk.text:
                            if seg["ttft_s"] is None:
                                seg["ttft_s"] = last_activity - t_seg
                                stats.segment_ttft_s.append(seg["ttft_s"])
                            if first_token:
                                first_token = False
                                stats.ttft_s = last_activity - t_start
                        seg_tokens += chunk.tokens
                        generated += chunk.tokens
                        text = chunk.text
                        if chunk.stop_string and not (recent + text).endswith(chunk.stop_string):
                            text += chunk.stop_string  # the server dropped the stop string: the model wrote it
                        if text and user_stops:
                            window = recent[-(longest_stop - 1) :] if longest_stop > 1 else ""
                            cut_at = _first_stop_end(window + text, user_stops, len(window))
                            if cut_at is not None:
                                text = text[: cut_at - len(window)]
                                user_stop_hit = True
                        # A chunk may hold several tokens (transformers serve 5.25, vLLM / SGLang stream
                        # intervals): fed one block end at a time, so that what the model wrote after a trap
                        # (or a call in sync mode) in the same chunk, without its result, is dropped, as a
                        # local run never samples it.
                        pieces = _split_after_block_ends(session.raw_text, text) if text else []
                        for k, piece in enumerate(pieces):
                            session.raw_text += piece
                            recent = (recent + piece)[-max(longest_stop, 1) * 4 :]
                            self._feed(session, monitor, piece)
                            if k + 1 < len(pieces) and (session.trap_pending or session.sync_waits):
                                dropped = "".join(pieces[k + 1 :])
                                stats.remote["dropped_chars"] += len(dropped)
                                logger.debug("dropped %r: written after a wait, in the same chunk", dropped)
                                end = "cut"
                                break
                        if end == "cut":
                            break
                        if user_stop_hit:
                            end = "stop_sequence"
                            break
                        if chunk.finish_reason is not None:
                            finish = chunk
                            end = "finish"
                            break
                        if monitor.at_safe_point and session.needs_cut():
                            end = "cut"
                            break
                finally:
                    pump.stop()
                    session._set_pump(None)
                if finish is not None and finish.generated_tokens is not None and finish.generated_tokens >= seg_tokens:
                    generated += finish.generated_tokens - seg_tokens  # the server's own count wins
                    seg_tokens = finish.generated_tokens
                if finish is not None and finish.prompt_tokens is not None and not stats.prompt_tokens:
                    stats.prompt_tokens = int(finish.prompt_tokens)
                seg["tokens"] = seg_tokens
                seg["wall_s"] = time.monotonic() - t_seg
                stats.generated_tokens = generated
                if seg_tokens:
                    retries = 0

                # --- why did the segment end, and what next? ---------------------------------
                if end == "cancelled":
                    seg["end"] = stop_reason = "cancelled"
                    break
                if end == "stop_sequence":
                    seg["end"] = stop_reason = "stop_sequence"
                    break
                if end == "error":
                    exc = error if isinstance(error, RemoteEngineError) else _wrap(error, self.endpoint)
                    seg["end"] = f"error:{exc.kind}"
                    seg["error"] = str(exc)
                    if session.cancelled:
                        stop_reason = "cancelled"
                        break
                    if exc.retryable and seg_tokens > 0:
                        resumes += 1
                        stats.remote["resumes"] = resumes
                        if resumes > self.max_resumes:
                            raise RemoteEngineError(
                                f"streams failed midway {resumes} times (max_resumes={self.max_resumes}); last: {exc.detail}",
                                endpoint=self.endpoint,
                                status=exc.status,
                                kind=exc.kind,
                            ) from exc
                        logger.warning("%s; resuming from the %d characters received", exc, len(session.raw_text))
                        stats.resubmissions += 1
                        if self._cut_and_inject(session, monitor):
                            recent = ""
                        continue
                    if exc.retryable and retries < self.max_retries:
                        retries += 1
                        stats.remote["retries"] = stats.remote["retries"] + 1
                        logger.warning("%s; retry %d/%d", exc, retries, self.max_retries)
                        self._backoff(session, retries)
                        continue
                    if exc.retryable and retries:
                        raise RemoteEngineError(
                            f"{exc.detail} (after {retries} retries)", endpoint=self.endpoint, status=exc.status, kind=exc.kind
                        ) from exc
                    raise exc
                if end == "cut":
                    seg["end"] = "cut"
                    session.settle()
                    if self._inject(session, monitor):
                        recent = ""
                    stats.resubmissions += 1
                    continue
                # end == "finish": the server ended the segment
                assert finish is not None
                reason = finish.finish_reason
                tail = session.raw_text
                own_stop_end = any(tail.endswith(s) for s in own_stops) or (
                    reason == "stop_sequence" and not any(tail.endswith(s) for s in user_stops) and bool(own_stops)
                )
                seg["end"] = str(reason)
                if any(tail.endswith(s) for s in user_stops) or (reason == "stop_sequence" and not own_stop_end):
                    stop_reason = "stop_sequence"
                    break
                if session.trap_pending or session.sync_waits or own_stop_end:
                    # the server stopped at our own stop string (a trap, or a call in sync mode)
                    if monitor.at_safe_point:
                        session.settle()
                        if self._inject(session, monitor):
                            recent = ""
                    if seg_tokens == 0 and not session.needs_cut():
                        stop_reason = "eos"
                        break
                    stats.resubmissions += 1
                    continue
                if reason == "length":
                    if generated >= max_new_tokens:
                        stop_reason = "max_new_tokens"
                        break
                    if seg_tokens == 0:
                        stop_reason = "length"
                        break
                    stats.resubmissions += 1  # the server capped the request below our budget
                    continue
                # eos (or an OpenAI "stop" that names no stop string)
                if session.drain_on_eos and not monitor.in_block and session.owes_results():
                    session.settle()
                    session.trap(None, reason="eos")  # type: ignore[arg-type]
                    if monitor.at_safe_point and self._inject(session, monitor) and not session.cancelled:
                        recent = ""
                        stats.resubmissions += 1
                        continue
                stop_reason = "eos"
                break
        except BaseException as exc:
            failure = exc
            stop_reason = stop_reason or "error"
            raise
        finally:
            now = time.monotonic()
            for event in monitor.flush():
                if isinstance(event, TextEvent):
                    session._emit(StreamEvent("text", now, text=event.text))
                elif isinstance(event, Block):
                    session.blocks.append(event)
                    if event.kind == "malformed":
                        session._emit(StreamEvent("malformed", now, text=event.raw, call_id=event.call_id, data={"error": event.error}))
            session.finish()
            stats.stop_reason = stop_reason
            if not stats.prompt_tokens:
                stats.prompt_tokens = self._count_tokens(prompt)
            stats.wall_s = time.monotonic() - t_start
            data: dict[str, Any] = {"stop_reason": stop_reason}
            if failure is not None:
                data["error"] = repr(failure)
            session._emit(StreamEvent("done", time.monotonic(), data=data))
            session.finished.set()

    def _cut_and_inject(self, session: RemoteSession, monitor: Any) -> int:
        """After a stream failed midway: serve what is pending if the text is at a safe point."""
        if monitor.at_safe_point and session.needs_cut():
            session.settle()
            return self._inject(session, monitor)
        return 0


def _split_after_block_ends(before: str, text: str) -> list[str]:
    """``text`` cut right after each ``[END]`` that ends inside it and before its last character
    (one that began in the tail of ``before`` too); the pieces join to ``text``.

    >>> _split_after_block_ends("", "a [TRAP] [END] b [END] c")
    ['a [TRAP] [END]', ' b [END]', ' c']
    >>> _split_after_block_ends("x [TRAP] [EN", "D] more")
    ['D]', ' more']
    >>> _split_after_block_ends("", "no block [END]")
    ['no block [END]']
    """
    window = before[-(len(_END) - 1) :]
    joined = window + text
    cuts: list[int] = []
    at = joined.find(_END)
    while at >= 0:
        end = at + len(_END) - len(window)
        if 0 < end < len(text):
            cuts.append(end)
        at = joined.find(_END, at + 1)
    pieces: list[str] = []
    prev = 0
    for cut in cuts:
        pieces.append(text[prev:cut])
        prev = cut
    pieces.append(text[prev:])
    return pieces


def _first_stop_end(text: str, stops: list[str], start: int) -> int | None:
    """End index of the earliest stop string in ``text`` that ends after ``start``."""
    best: int | None = None
    for s in stops:
        idx = text.find(s, max(0, start - len(s) + 1))
        while idx != -1 and idx + len(s) <= start:
            idx = text.find(s, idx + 1)
        if idx != -1:
            end = idx + len(s)
            if best is None or end < best:
                best = end
    return best


def _wrap(exc: BaseException | None, endpoint: str) -> RemoteEngineError:
    if isinstance(exc, RemoteEngineError):
        return exc
    return RemoteEngineError(f"{type(exc).__name__}: {exc}", endpoint=endpoint, kind="error", retryable=False)

