"""Run the model's calls in the background and queue their results as interrupts.

:class:`ToolExecutor` is the runtime half of asynchronous function calling: the decode loop
hands it each complete ``[CALL]`` block with :meth:`~ToolExecutor.submit` (which returns at
once) and keeps generating; finished calls become :class:`Interrupt` objects that the loop
collects with :meth:`~ToolExecutor.pop_ready` at its next safe point, or waits for with
:meth:`~ToolExecutor.wait_ready` on a trap.

Design:

* One asyncio event loop in one daemon thread (started on the first submit) runs every call.
  ``async def`` tools are awaited on it; plain functions run in a ``ThreadPoolExecutor``
  (threads named ``hf-asynclm-tool_N``).
* A call's timeout counts only its own run, not the time it waits for a free slot or for the
  calls it refers to (those waits are bounded by the executor's ``timeout_s`` on their own).
* ``max_in_flight`` bounds the calls running at once; the rest queue in submission order.
* Bad model input (unparsable body, unknown tool, bad arguments, reused id) never raises: it
  becomes an error interrupt, ``error: <Type>: <message>``, and generation goes on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..cml import (
    PROTOCOL_ERROR_ID,
    TRAP_ID,
    USER_ID,
    defuse_markers,
    format_error,
    format_interrupt,
    is_valid_id,
    serialize_result,
)
from ..virtual_time import VirtualClock
from .parsing import ArgumentError, CallParseError, ParsedCall, bind_arguments, parse_call
from .registry import Tool, ToolRegistry, UnknownToolError

logger = logging.getLogger(__name__)

__all__ = ["ANONYMOUS_ERROR_ID", "FINAL_STATUSES", "RESERVED_IDS", "CallRecord", "Interrupt", "ToolExecutor"]

#: Statuses of a call that has finished (it will not change again).
FINAL_STATUSES = frozenset({"done", "error", "timeout", "cancelled"})
#: Id of the error interrupts of calls written without an id (fire and forget).
ANONYMOUS_ERROR_ID = "error"
#: With a virtual clock, how long (real seconds) to wait for a running call whose result is already due.
VIRTUAL_SETTLE_TIMEOUT_S = 30.0
#: Ids the runtime uses for its own interrupts: a call may not take them.
RESERVED_IDS = frozenset({USER_ID, PROTOCOL_ERROR_ID, TRAP_ID, ANONYMOUS_ERROR_ID})

# characters that str.splitlines() breaks on, escaped so that a result stays on one line
_LINE_BREAKS = {
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\v"): "\\x0b",
    ord("\f"): "\\x0c",
    0x1C: "\\x1c",
    0x1D: "\\x1d",
    0x1E: "\\x1e",
    0x85: "\\x85",
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}
_SKIPPED = object()  # a sync call cancelled before its thread picked it up


@dataclass
class CallRecord:
    """Everything known about one submitted call.

    ``status`` goes ``queued`` -> ``running`` -> one of ``done``, ``error``, ``timeout``,
    ``cancelled``. Times come from the executor's clock (``time.monotonic`` by default):
    ``started_at`` is taken immediately before the tool function runs. ``result`` is the raw
    Python object the tool returned (what references to this call receive), ``result_text`` its
    serialised form (the interrupt value), ``error`` ``"<Type>: <message>"`` for failures.

    Example:

    ```python
    >>> from hf_asynclm.executor import CallRecord
    >>> record = CallRecord(call_id="w1", body="f()", submitted_at=1.0)
    >>> record.status, record.finished, record.dispatch_latency_s
    ('queued', False, None)

    ```
    """

    call_id: str | None
    body: str
    name: str | None = None
    arguments: dict[str, Any] | None = None
    status: str = "queued"
    submitted_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    result: Any = field(default=None, repr=False)
    result_text: str | None = field(default=None, repr=False)
    error: str | None = None
    depends_on: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """True once the call is done, failed, timed out or was cancelled."""
        return self.status in FINAL_STATUSES

    @property
    def dispatch_latency_s(self) -> float | None:
        """Seconds from submission to the start of the tool function (None if it never started)."""
        return None if self.started_at is None else self.started_at - self.submitted_at

    @property
    def duration_s(self) -> float | None:
        """Seconds the tool ran (None unless it started and finished)."""
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at


@dataclass
class Interrupt:
    """A value to inject into the model's context: ``[INTR] call_id [HEAD] value [END]``.

    ``value`` is one line: a serialised result, ``error: <Type>: <message>``, or what a person
    said. ``record`` is the call it answers (None for user and protocol interrupts).

    Example:

    ```python
    >>> from hf_asynclm.executor import Interrupt
    >>> Interrupt("user", "make it Thursday", is_error=False, created_at=0.0).text()
    '[INTR] user [HEAD] make it Thursday [END]'

    ```
    """

    call_id: str
    value: str
    is_error: bool = False
    created_at: float = 0.0
    record: CallRecord | None = field(default=None, repr=False)

    def text(self) -> str:
        """The interrupt block as the model reads it."""
        return format_interrupt(self.call_id, self.value)


class _CallFailed(Exception):
    """Internal: a call failed for a reason that is not the tool's own exception."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message


def _loop_main(loop: asyncio.AbstractEventLoop) -> None:
    # runs in the executor's thread; holds no reference to the executor (so it can be collected)
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.wait(pending, timeout=1.0))
            loop.run_until_complete(loop.shutdown_asyncgens())
        except Exception:  # pragma: no cover - best effort on the way out
            logger.debug("error while shutting the executor loop down", exc_info=True)
        finally:
            loop.close()


def _finalize(loop: asyncio.AbstractEventLoop, pool: concurrent.futures.ThreadPoolExecutor) -> None:
    # an executor that was never closed: stop its thread and pool when it is collected
    try:
        loop.call_soon_threadsafe(loop.stop)
    except RuntimeError:
        pass
    pool.shutdown(wait=False, cancel_futures=True)


class ToolExecutor:
    """Runs tool calls concurrently and queues their results as interrupts, in completion order.

    Args:
        tools: The tools: a :class:`ToolRegistry`, or anything :meth:`ToolRegistry.coerce` takes.
        timeout_s: Default time limit of one call's run (a tool's own ``timeout_s`` wins); also
            bounds the wait for referenced calls and for a free thread. None: no limit.
        max_workers: Threads for sync tools.
        max_in_flight: Calls running at once; the others queue.
        max_result_chars: Results longer than this are truncated (with a marker). None: no limit.
        anonymous_errors: Report failures of calls without an id as interrupts with id
            ``"error"`` (their successes are never reported).
        clock: Time source of the records' timestamps. A
            :class:`~hf_asynclm.virtual_time.VirtualClock` also gates the results: each is
            handed over only once the clock reaches its due time (submission + the clock's
            latency for the call), in due order, and :meth:`wait_ready` moves the clock on to
            the next due result (reproducible runs, see :mod:`hf_asynclm.virtual_time`).

    Example:

    ```python
    >>> from hf_asynclm.executor import ToolExecutor
    >>> def get_weather(city: str) -> dict:
    ...     '''Current weather in a city.
    ...
    ...     Args:
    ...         city: Name of the city.
    ...     '''
    ...     return {"city": city, "temp_c": 18}
    >>> executor = ToolExecutor([get_weather], timeout_s=5)
    >>> record = executor.submit("w1", 'get_weather(city="Paris")')
    >>> executor.wait_for(record, timeout=5)
    True
    >>> bad = executor.submit("w2", 'get_wether("Rome")')
    >>> for interrupt in executor.pop_ready():
    ...     print(interrupt.text())
    [INTR] w1 [HEAD] {"city": "Paris", "temp_c": 18} [END]
    [INTR] w2 [HEAD] error: UnknownToolError: no tool named 'get_wether'; known tools: get_weather [END]
    >>> executor.close()

    ```
    """

    def __init__(
        self,
        tools: Any = None,
        *,
        timeout_s: float | None = 30.0,
        max_workers: int = 8,
        max_in_flight: int = 32,
        max_result_chars: int | None = 4096,
        anonymous_errors: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive or None, got {timeout_s}")
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        if max_result_chars is not None and max_result_chars < 1:
            raise ValueError(f"max_result_chars must be positive or None, got {max_result_chars}")
        self.tools: ToolRegistry = ToolRegistry.coerce(tools)
        self.timeout_s = timeout_s
        self.max_workers = max_workers
        self.max_in_flight = max_in_flight
        self.max_result_chars = max_result_chars
        self.anonymous_errors = anonymous_errors
        self._clock = clock
        #: The :class:`~hf_asynclm.virtual_time.VirtualClock` gating results, or None (wall clock).
        self.virtual_clock: VirtualClock | None = clock if isinstance(clock, VirtualClock) else None
        self._due: dict[int, tuple[float, int]] = {}  # virtual clock: id(interrupt) -> (due time, order)
        self._not_waited_for: set[int] = set()  # virtual clock: id(record) of calls waited for in vain once
        self._latency: dict[int, float] = {}  # virtual clock: id(record) -> simulated run time

        #: Every call, in submission order.
        self.calls: list[CallRecord] = []
        self._by_id: dict[str, CallRecord] = {}
        self._unfinished: dict[int, CallRecord] = {}  # id(record) -> record, submission order
        self._ready: list[Interrupt] = []
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._cancel_reason = "cancelled"
        self._busy_threads = 0  # sync handlers running right now

        # started lazily on the first submit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._finalizer: weakref.finalize | None = None
        # used from the loop thread only
        self._run_slots: asyncio.Semaphore | None = None
        self._thread_slots: asyncio.Semaphore | None = None
        self._thread_releases = 0
        self._tasks: set[asyncio.Task] = set()
        self._waiters: dict[str, list[asyncio.Future]] = {}

    # ---------------------------------------------------------------------------------------
    # public API
    # ---------------------------------------------------------------------------------------
    def submit(self, call_id: str | None, body: str) -> CallRecord:
        """Start a call and return its record at once.

        Never raises for bad model input: an invalid or reused id, a body that does not parse,
        an unknown tool or bad arguments finish the call with status ``"error"`` and queue an
        error interrupt (for calls without id, under id ``"error"`` when ``anonymous_errors``).

        Args:
            call_id: The id written in the block (``w1``), or None for fire and forget.
            body: The call expression, e.g. ``get_weather(city="Paris")``.

        Raises:
            RuntimeError: the executor is closed.
        """
        submitted_at = self._clock()
        if self._closed:
            raise RuntimeError("this ToolExecutor is closed: create a new one to run more calls")
        text = body if isinstance(body, str) else repr(body)
        record = CallRecord(call_id=call_id, body=text, submitted_at=submitted_at)

        failure: tuple[str, str] | None = None
        parsed: ParsedCall | None = None
        tool: Tool | None = None
        id_ok = True
        if call_id is not None:
            if not isinstance(call_id, str) or not is_valid_id(call_id):
                id_ok = False
                failure = (
                    "InvalidIdError",
                    f"{call_id!r} is not a valid call id: ids follow Python identifier rules, e.g. w1",
                )
            elif call_id in RESERVED_IDS:
                id_ok = False
                failure = ("InvalidIdError", f"id {call_id!r} is reserved for the runtime: use another id, e.g. w1")
        if failure is None:
            try:
                parsed = parse_call(body)
                record.name = parsed.name
                tool = self.tools.get(parsed.name)
            except CallParseError as exc:
                failure = ("CallParseError", str(exc))
            except UnknownToolError as exc:
                failure = ("UnknownToolError", str(exc))

        with self._cond:
            if self._closed:
                raise RuntimeError("this ToolExecutor is closed: create a new one to run more calls")
            self.calls.append(record)
            if call_id is not None and id_ok:
                if call_id in self._by_id:
                    failure = ("DuplicateIdError", f"id {call_id!r} is already used")
                else:
                    self._by_id[call_id] = record  # even when the call fails: the id is taken
            if failure is None:
                assert parsed is not None and tool is not None
                if call_id is not None and call_id in parsed.refs():
                    failure = (
                        "ArgumentError",
                        f"{parsed.name}() refers to its own id {call_id!r}: "
                        "a call can only use the results of earlier calls",
                    )
                else:
                    try:
                        record.arguments = bind_arguments(parsed, tool, known_ids=self._by_id)
                    except ArgumentError as exc:
                        failure = ("ArgumentError", str(exc))
            if failure is not None:
                self._finish_locked(record, "error", error=failure)
                logger.debug("call %s rejected: %s: %s", call_id, *failure)
                return record
            record.depends_on = parsed.refs()  # type: ignore[union-attr]
            if self.virtual_clock is not None:  # its simulated run time, from the arguments as written
                self._latency[id(record)] = self.virtual_clock.call_latency(record.name, dict(record.arguments or {}))
            self._unfinished[id(record)] = record
            loop = self._start_locked()
            loop.call_soon_threadsafe(self._spawn, record, parsed, tool)
        return record

    def push_interrupt(self, call_id: str, value: str, is_error: bool = False) -> Interrupt:
        """Queue an interrupt that does not come from a call: user messages, protocol errors.

        ``value`` is made safe for a block: CML markers are defused and line breaks become
        spaces. Wakes up :meth:`wait_ready`, from any thread.

        Args:
            call_id: The interrupt's id, e.g. ``"user"`` or ``"cml"``.
            value: The text; for errors, use :func:`hf_asynclm.cml.format_error`.
            is_error: Mark it as an error interrupt.

        Raises:
            ValueError: ``call_id`` is not a valid id.
            RuntimeError: the executor is closed.
        """
        if not isinstance(call_id, str) or not is_valid_id(call_id):
            raise ValueError(
                f"{call_id!r} is not a valid interrupt id: ids follow Python identifier rules, e.g. 'user'"
            )
        text = " ".join(defuse_markers(str(value)).splitlines())
        with self._cond:
            if self._closed:
                raise RuntimeError("this ToolExecutor is closed: interrupts can no longer be queued")
            interrupt = Interrupt(call_id, text, is_error=is_error, created_at=self._clock())
            self._append_ready_locked(interrupt, None)
            self._cond.notify_all()
        return interrupt

    def has_ready(self) -> bool:
        """True when at least one interrupt is waiting to be popped (with a virtual clock: is due)."""
        if self.virtual_clock is None:
            return bool(self._ready)
        with self._cond:
            self._settle_locked()
            return bool(self._due_locked())

    def pop_ready(self, limit: int | None = None) -> list[Interrupt]:
        """Take the ready interrupts, in the order they became ready (with a virtual clock: the
        due ones, in due order); at most ``limit`` of them (the first ones) when it is given,
        the rest stay queued. Never blocks."""
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1 (or None for all), got {limit!r}")
        with self._cond:
            if self.virtual_clock is None:
                ready, self._ready = self._ready[:limit], self._ready[len(self._ready[:limit]):]
                return ready
            self._settle_locked()
            ready = self._due_locked()[:limit]
            taken = set(map(id, ready))
            self._ready = [i for i in self._ready if id(i) not in taken]
            for interrupt in ready:
                self._due.pop(id(interrupt), None)
            return ready

    def drain_ready(self) -> list[Interrupt]:
        """Take every queued interrupt, due or not (the end of a generation), in the order
        :meth:`pop_ready` would have handed them over."""
        with self._cond:
            ready, self._ready = self._ready, []
            if self.virtual_clock is not None:
                ready.sort(key=lambda i: self._due[id(i)])
                self._due.clear()
            return ready

    def wait_ready(self, timeout: float | None) -> bool:
        """Block until an interrupt is ready (True) or ``timeout`` seconds pass (False).

        Returns at once when one is already ready; returns False if the executor closes. With a
        virtual clock, a finished result that is due before every running call moves the clock
        on to its due time at once; only a running call that is due first is waited for.
        """
        clock = self.virtual_clock
        with self._cond:
            if clock is None:
                self._cond.wait_for(lambda: self._ready or self._closed, timeout)
                return bool(self._ready)
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                if self._due_locked():
                    return True
                first_ready = min((self._due[id(i)][0] for i in self._ready), default=None)
                first_running = min((self._running_due(r) for r in self._unfinished.values()), default=None)
                if first_ready is not None and (first_running is None or first_ready <= first_running):
                    clock.advance_to(first_ready)
                    return True
                if self._closed or first_running is None:
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)  # a running call finishes (real time)

    def wait_for(self, record: CallRecord, timeout: float | None) -> bool:
        """Block until ``record``'s call has finished (any status): True, or False on timeout.
        With a virtual clock, the clock then moves on to the call's due time."""
        with self._cond:
            done = bool(self._cond.wait_for(lambda: record.status in FINAL_STATUSES, timeout))
            if done and self.virtual_clock is not None:
                self.virtual_clock.advance_to(self._record_due(record))
            return done

    # virtual clock ------------------------------------------------------------------------------
    def _append_ready_locked(self, interrupt: Interrupt, record: CallRecord | None) -> None:
        self._ready.append(interrupt)
        if self.virtual_clock is not None:
            if record is None:  # user messages, protocol errors: due now, after the calls due now
                self._due[id(interrupt)] = (interrupt.created_at, len(self.calls) + len(self._due))
            else:
                self._due[id(interrupt)] = (self._record_due(record), self.calls.index(record))

    def _record_due(self, record: CallRecord) -> float:
        """When a call's result is due: at once for a call rejected before it ran."""
        assert self.virtual_clock is not None
        if record.started_at is None and record.status == "error":
            return record.submitted_at
        return self._running_due(record)

    def _running_due(self, record: CallRecord) -> float:
        """Submission (or, for a call that uses earlier results, the time they are due) + latency."""
        assert self.virtual_clock is not None
        start = record.submitted_at
        for dep in record.depends_on or ():
            earlier = self._by_id.get(dep)
            if earlier is not None and earlier is not record:
                start = max(start, self._record_due(earlier))
        return start + self._latency.get(id(record), 0.0)

    def _settle_locked(self) -> None:
        """Virtual clock: wait, in real time, for the calls still running whose result is already due,
        so that what is due never depends on how fast a tool really returned (a loaded machine
        would otherwise move a result later in the text). Bounded by ``VIRTUAL_SETTLE_TIMEOUT_S``."""
        assert self.virtual_clock is not None
        deadline = time.monotonic() + VIRTUAL_SETTLE_TIMEOUT_S
        while not self._closed:
            now = self.virtual_clock.now
            late = [r for r in self._unfinished.values() if id(r) not in self._not_waited_for and self._running_due(r) <= now]
            if not late:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                logger.warning("virtual clock: %s still running after %.0f s of real time, though due; going on without "
                               "waiting for it again", ", ".join(str(r.call_id) for r in late), VIRTUAL_SETTLE_TIMEOUT_S)
                self._not_waited_for.update(map(id, late))
                return
            self._cond.wait(remaining)

    def _due_locked(self) -> list[Interrupt]:
        """The ready interrupts whose due time has come, in due order."""
        assert self.virtual_clock is not None
        now = self.virtual_clock.now
        due = [i for i in self._ready if self._due[id(i)][0] <= now]
        return sorted(due, key=lambda i: self._due[id(i)])

    def wait_all(self, timeout: float | None = None) -> bool:
        """Block until no call is in flight: True, or False on timeout."""
        with self._cond:
            return bool(self._cond.wait_for(lambda: not self._unfinished, timeout))

    @property
    def in_flight(self) -> int:
        """Number of calls submitted and not finished (queued, waiting or running)."""
        return len(self._unfinished)

    def pending_ids(self) -> list[str]:
        """Ids of unfinished calls, which will each produce an interrupt (submission order); with
        a virtual clock also of finished calls whose result is not due yet."""
        with self._cond:
            if self.virtual_clock is not None:
                self._settle_locked()
            ids = [r.call_id for r in self._unfinished.values() if r.call_id is not None]
            if self.virtual_clock is not None:
                due = set(map(id, self._due_locked()))
                ids += [i.call_id for i in self._ready if id(i) not in due and i.record is not None]
            return ids

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def start(self) -> None:
        """Start the event-loop thread and one tool thread now, so the first call dispatches as fast
        as the later ones (otherwise they start lazily at the first :meth:`submit`)."""
        with self._cond:
            if self._closed:
                raise RuntimeError("this ToolExecutor is closed")
            loop = self._start_locked()
            pool = self._pool
        if pool is not None:
            pool.submit(int)  # spawns the pool's first worker thread
        running = threading.Event()
        try:
            loop.call_soon_threadsafe(running.set)
        except RuntimeError:  # closed meanwhile
            return
        running.wait(timeout=1.0)  # the loop is running: the first dispatch need not wait for it

    def cancel_all(self, reason: str = "generation ended") -> None:
        """Cancel every call still queued or running; no interrupt is queued for them.

        Async tools are cancelled; sync tools already running in a thread cannot be stopped:
        they are marked cancelled and their results are dropped when they return.
        """
        with self._cond:
            victims = list(self._unfinished.values())
            self._cancel_reason = reason
            for record in victims:
                self._finish_locked(record, "cancelled", error=("CancelledError", reason))
        if victims:
            logger.debug("cancelled %d call(s): %s", len(victims), reason)
            self._call_in_loop(self._cancel_tasks)

    def close(self, wait: bool = True, timeout: float | None = 5.0) -> None:
        """Cancel all calls, stop the event-loop thread and shut the thread pool. Idempotent.

        Args:
            wait: Wait for the executor's threads to end. A sync tool that is still running
                keeps its thread until it returns; ``close`` waits for it at most ``timeout``
                seconds, then logs a warning and returns.
            timeout: Bound of that wait (None: wait as long as it takes).
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self.cancel_all("executor closed")
        loop, thread, pool = self._loop, self._thread, self._pool
        if self._finalizer is not None:
            self._finalizer.detach()
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._stop_loop)
            except RuntimeError:  # loop already closed
                pass
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if not wait:
            return
        deadline = None if timeout is None else time.monotonic() + timeout

        def remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        current = threading.current_thread()
        workers = list(getattr(pool, "_threads", ())) if pool is not None else []
        if current is thread or current in workers:
            return  # close() called from inside a tool: its own thread cannot be joined
        if thread is not None:
            thread.join(remaining())
        if pool is not None:
            with self._cond:
                self._cond.wait_for(lambda: self._busy_threads == 0, remaining())
            for worker in workers:
                worker.join(remaining())
        if self._busy_threads:
            logger.warning(
                "ToolExecutor closed with %d tool thread(s) still running a tool; they end when the tool returns "
                "(give slow tools a timeout they honour)",
                self._busy_threads,
            )

    def __enter__(self) -> "ToolExecutor":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(tools={self.tools.names}, calls={len(self.calls)}, in_flight={self.in_flight}, "
            f"ready={len(self._ready)}, closed={self._closed})"
        )

    # ---------------------------------------------------------------------------------------
    # bookkeeping (any thread; `_locked` methods hold self._cond)
    # ---------------------------------------------------------------------------------------
    def _reply_id(self, record: CallRecord) -> str | None:
        if record.call_id is None:
            return ANONYMOUS_ERROR_ID if self.anonymous_errors else None
        if isinstance(record.call_id, str) and is_valid_id(record.call_id) and record.call_id not in RESERVED_IDS:
            return record.call_id
        return PROTOCOL_ERROR_ID

    def _finish_locked(
        self,
        record: CallRecord,
        status: str,
        *,
        result: Any = None,
        result_text: str | None = None,
        error: tuple[str, str] | None = None,
    ) -> bool:
        if record.status in FINAL_STATUSES:
            return False  # already finished (e.g. cancelled): a late result is dropped
        now = self._clock()
        record.status = status
        record.finished_at = now
        self._unfinished.pop(id(record), None)
        interrupt: Interrupt | None = None
        if status == "done":
            record.result = result
            record.result_text = result_text
            if record.call_id is not None:
                interrupt = Interrupt(record.call_id, result_text or "", False, now, record)
        else:
            error_type, message = error or ("Error", "unknown error")
            value = format_error(error_type, message)
            record.error = value[len("error: ") :]
            if status != "cancelled":
                reply_id = self._reply_id(record)
                if reply_id is not None:
                    interrupt = Interrupt(reply_id, value, True, now, record)
        if interrupt is not None:
            self._append_ready_locked(interrupt, record)
        self._cond.notify_all()
        if record.call_id is not None and self._loop is not None and self._by_id.get(record.call_id) is record:
            self._call_in_loop(self._wake_waiters, record.call_id)
        return True

    def _finish(self, record: CallRecord, status: str, **kwargs: Any) -> bool:
        with self._cond:
            return self._finish_locked(record, status, **kwargs)

    def _call_in_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        if threading.current_thread() is self._thread:
            fn(*args)
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed
            pass

    def _start_locked(self) -> asyncio.AbstractEventLoop:
        if self._loop is not None:
            return self._loop
        loop = asyncio.new_event_loop()
        self._run_slots = asyncio.Semaphore(self.max_in_flight)
        self._thread_slots = asyncio.Semaphore(self.max_workers)
        self._pool = concurrent.futures.ThreadPoolExecutor(self.max_workers, thread_name_prefix="hf-asynclm-tool")
        thread = threading.Thread(target=_loop_main, args=(loop,), name="hf-asynclm-loop", daemon=True)
        self._loop, self._thread = loop, thread
        thread.start()
        self._finalizer = weakref.finalize(self, _finalize, loop, self._pool)
        logger.debug("executor loop started (max_workers=%d, max_in_flight=%d)", self.max_workers, self.max_in_flight)
        return loop

    def _serialize(self, result: Any, tool_name: str) -> str:
        try:
            text = serialize_result(result)
        except Exception as exc:
            raise TypeError(f"the result of {tool_name} cannot be serialised: {exc}") from exc
        text = text.translate(_LINE_BREAKS)  # one line, whatever the tool returned
        return serialize_result(text, self.max_result_chars)

    # ---------------------------------------------------------------------------------------
    # the event loop side (runs in the loop thread)
    # ---------------------------------------------------------------------------------------
    def _spawn(self, record: CallRecord, parsed: ParsedCall, tool: Tool) -> None:
        if record.status != "queued":  # cancelled before it was dispatched
            return
        task = self._loop.create_task(self._run(record, parsed, tool))  # type: ignore[union-attr]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _wake_waiters(self, call_id: str) -> None:
        for future in self._waiters.pop(call_id, ()):
            if not future.done():
                future.set_result(None)

    def _cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def _stop_loop(self) -> None:
        self._cancel_tasks()
        self._loop.stop()  # type: ignore[union-attr]  # _loop_main lets cancelled tasks finish

    async def _run(self, record: CallRecord, parsed: ParsedCall, tool: Tool) -> None:
        timeout = tool.timeout_s if tool.timeout_s is not None else self.timeout_s
        try:
            kwargs = record.arguments or {}
            if record.depends_on:
                results = await self._await_dependencies(record)
                kwargs = bind_arguments(parsed, tool, results)
                record.arguments = kwargs
            async with self._run_slots:  # type: ignore[union-attr]
                if tool.is_async:
                    result, text = await self._run_async(record, tool, kwargs, timeout)
                else:
                    result, text = await self._run_sync(record, tool, kwargs, timeout)
                if result is _SKIPPED:
                    return
                self._finish(record, "done", result=result, result_text=text)
                logger.debug("call %s (%s) done in %.4f s", record.call_id, tool.name, record.duration_s or 0.0)
        except asyncio.CancelledError:
            self._finish(record, "cancelled", error=("CancelledError", self._cancel_reason))
            raise
        except _CallFailed as exc:
            status = "timeout" if exc.error_type == "TimeoutError" else "error"
            self._finish(record, status, error=(exc.error_type, exc.message))
            logger.debug("call %s (%s) failed: %s: %s", record.call_id, tool.name, exc.error_type, exc.message)
        except ArgumentError as exc:
            self._finish(record, "error", error=("ArgumentError", str(exc)))
        except Exception as exc:
            self._finish(record, "error", error=(type(exc).__name__, str(exc)))
            logger.debug("call %s (%s) raised", record.call_id, tool.name, exc_info=True)

    async def _await_dependencies(self, record: CallRecord) -> dict[str, Any]:
        loop = self._loop
        assert loop is not None
        deadline = None if self.timeout_s is None else loop.time() + self.timeout_s
        results: dict[str, Any] = {}
        for dep_id in record.depends_on:
            dep = self._by_id[dep_id]
            if dep.status not in FINAL_STATUSES:
                future = loop.create_future()
                self._waiters.setdefault(dep_id, []).append(future)
                remaining = None if deadline is None else max(0.0, deadline - loop.time())
                try:
                    await asyncio.wait_for(future, remaining)
                except asyncio.TimeoutError:
                    message = f"{dep_id} did not finish within {self.timeout_s:g} s"
                    raise _CallFailed("DependencyError", message) from None
            if dep.status == "done":
                results[dep_id] = dep.result
            elif dep.status == "cancelled":
                raise _CallFailed("DependencyError", f"{dep_id} was cancelled")
            else:
                raise _CallFailed("DependencyError", f"{dep_id} failed: {dep.error}")
        return results

    def _mark_running(self, record: CallRecord) -> bool:
        with self._cond:
            if record.status != "queued":
                return False
            record.status = "running"
            record.started_at = self._clock()
            return True

    async def _bounded(self, future: asyncio.Future, timeout: float | None, tool: Tool) -> Any:
        # like asyncio.wait_for, but a TimeoutError the tool raises itself stays the tool's error
        try:
            done, _ = await asyncio.wait((future,), timeout=timeout)
        finally:
            if not future.done():
                future.cancel()
        if not done:
            raise _CallFailed("TimeoutError", f"{tool.name} did not return within {timeout:g} s")
        return future.result()

    async def _run_async(
        self, record: CallRecord, tool: Tool, kwargs: Mapping[str, Any], timeout: float | None
    ) -> tuple[Any, str | None]:
        if not self._mark_running(record):
            return _SKIPPED, None
        task = asyncio.ensure_future(tool.handler(**kwargs))
        result = await self._bounded(task, timeout, tool)
        return result, self._serialize(result, tool.name)

    async def _run_sync(
        self, record: CallRecord, tool: Tool, kwargs: Mapping[str, Any], timeout: float | None
    ) -> tuple[Any, str | None]:
        await self._acquire_thread(tool)
        try:
            cfuture = self._pool.submit(self._call_in_thread, record, tool, kwargs)  # type: ignore[union-attr]
        except BaseException:
            self._release_thread()
            raise
        cfuture.add_done_callback(self._release_thread_threadsafe)
        result, text = await self._bounded(asyncio.wrap_future(cfuture), timeout, tool)
        if result is not _SKIPPED and inspect.isawaitable(result):  # a plain function returned a coroutine
            started = record.started_at if record.started_at is not None else self._clock()
            remaining = None if timeout is None else max(0.0, timeout - (self._clock() - started))
            result = await self._bounded(asyncio.ensure_future(result), remaining, tool)
            text = self._serialize(result, tool.name)
        return result, text

    def _call_in_thread(self, record: CallRecord, tool: Tool, kwargs: Mapping[str, Any]) -> tuple[Any, str | None]:
        # runs in a pool thread
        with self._cond:
            if record.status != "queued":
                return _SKIPPED, None
            self._busy_threads += 1
            record.status = "running"
            record.started_at = self._clock()
        try:
            result = tool.handler(**kwargs)
            if inspect.isawaitable(result):
                return result, None
            return result, self._serialize(result, tool.name)
        finally:
            with self._cond:
                self._busy_threads -= 1
                self._cond.notify_all()

    async def _acquire_thread(self, tool: Tool) -> None:
        slots = self._thread_slots
        assert slots is not None
        if not slots.locked():
            await slots.acquire()
            return
        # all threads busy: wait, but give up when none frees up for a whole timeout (hung tools)
        while True:
            mark = self._thread_releases
            try:
                await asyncio.wait_for(slots.acquire(), self.timeout_s)
                return
            except asyncio.TimeoutError:
                if self._thread_releases == mark:
                    raise _CallFailed(
                        "TimeoutError",
                        f"{tool.name} could not start within {self.timeout_s:g} s: all {self.max_workers} "
                        "tool threads are busy (raise max_workers, or give slow tools a timeout)",
                    ) from None

    def _release_thread(self) -> None:
        self._thread_releases += 1
        self._thread_slots.release()  # type: ignore[union-attr]

    def _release_thread_threadsafe(self, _future: concurrent.futures.Future) -> None:
        # called in the pool thread when the tool returns (or the future is cancelled unstarted)
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._release_thread)
        except RuntimeError:  # loop closed
            pass
