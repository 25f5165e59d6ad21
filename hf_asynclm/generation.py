"""The asynchronous decode loop, as a transformers ``custom_generate`` callable.

``model.generate(**inputs, custom_generate=fn)`` prepares everything as usual (generation
config, cache, masks, positions, logits processors, stopping criteria, streamer) and then
hands the loop to :func:`cml_decode_loop` through the function an
:class:`~hf_asynclm.asynclm.AsyncLM` exposes as ``alm.custom_generate``. At every step the loop

1. runs the caller's logits processors (sampling warpers, penalties ...) and masks ``[INTR]``;
2. samples a token (greedy or multinomial, as the generation config says);
3. feeds it to the CML monitor; a complete ``[CALL] ... [END]`` starts on the executor at
   once (``async``), after a wait for its result (``sync``) or at the next trap (``sync-parallel``);
   a ``[TRAP] [END]`` pauses until a result is ready;
4. at a safe point (outside any block) takes every ready interrupt and feeds
   ``[sampled token] + [interrupt tokens]`` in ONE forward pass (the ride-along), so an
   interrupt costs no extra forward pass.

Where interrupts may go in is the session's ``interrupt_at``: ``"token"`` (the paper: any safe
point, possibly inside a word) or ``"word"`` (right after a block's ``[END]``, or else before the
next token that starts a word: whitespace or a marker; the simulator's traces put interrupts
only there, so small CML models keep their sentence). With ``"word"``, when the sampled token
starts a word while interrupts wait, that token is dropped, the interrupts are prefilled (one
forward pass) and the model chooses its next word again, having read them, as in its training
traces; this costs one forward pass per group of held interrupts more than the ride-along. An
interrupt is never held back more than ``WORD_WAIT_MAX_TOKENS`` tokens (it then rides along
wherever the model is).

``"sentence"`` paces the results for models trained on paced traces (``hf-asynclm data build
--interrupt-at sentence``): one interrupt at a time, right after a block's ``[END]`` or where a
word starts after a sentence end (``.``, ``?``, ``!``), and only once the model has ended a
sentence or written a trap since the previous one went in (a trap always takes the next one).
The model answers each result before the next arrives, so the result it quotes is the nearest
one: the easiest lookup for a small model. Nor does a result break into a **burst of calls**: at
the end of a call block with a result ready, the loop looks one or two tokens ahead (the model's
most likely next token, after a whitespace token if that comes first); while the model goes on
with another ``[CALL]``, the result waits (also one that became ready while the whitespace
between ``[END]`` and that ``[CALL]`` was written), and it goes in right after the ``[END]`` of the burst's
last call (the whitespace token looked at is taken back out of the cache first; a cache that
cannot take it back, e.g. a sliding-window layer already full, gets the result at once instead).
A small model then writes the calls of a list in one go and does not lose its place in it; the
price is that a call the held result makes possible comes after the burst, not inside it.
``"sentence-eager"`` is the paced rule without that hold (a result may go in between two calls):
the rule before 2026-12-02, which the shipped cml-tiny's training traces follow; kept to compare
and to rebuild those traces. Held at most ``SENTENCE_WAIT_MAX_TOKENS`` tokens, then it
goes in where the next word starts (or, in a word longer than ``WORD_WAIT_MAX_TOKENS`` tokens, inside it).
Async mode only: in ``sync`` and ``sync-parallel`` mode results go in where the model waits for
them (as in the simulator's sync traces), with the ``"word"`` rule.

``max_new_tokens`` counts only tokens the model generated; the returned sequence holds what
the model conditioned on: prompt, generated and injected tokens, in order.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
from transformers import StoppingCriteriaList
from transformers.generation.stopping_criteria import MaxLengthCriteria

from .cache_inject import CacheDriver, TrapCachePolicy
from .cml import PACED_INTERRUPT_AT, PROTOCOL_ERROR_ID, TRAP_ID, USER_ID, Block, TextEvent, ends_sentence, format_error
from .monitor import CMLMonitor
from .streamer import CMLStreamer, StreamEvent

logger = logging.getLogger(__name__)

Mode = Literal["async", "sync", "sync-parallel"]
MODES: tuple[str, ...] = ("async", "sync", "sync-parallel")
InterruptAt = Literal["token", "word", "sentence", "sentence-eager"]
INTERRUPT_AT: tuple[str, ...] = ("token", "word", "sentence", "sentence-eager")
#: ``interrupt_at="word"``: ready interrupts held back this many tokens go in at the next safe point
WORD_WAIT_MAX_TOKENS = 24

#: ``interrupt_at="sentence"``: the same cap, for interrupts held back until a sentence ends
SENTENCE_WAIT_MAX_TOKENS = 48

_WAIT_SLICE_S = 0.05  # waits wake this often to notice a cancellation


@dataclass
class GenerationStats:
    """Counters of one generation.

    Attributes:
        forward_passes: model forward calls (prefill included).
        prompt_tokens: tokens of the prompt.
        generated_tokens: tokens the model sampled and kept.
        resampled_tokens: ``interrupt_at="word"``: sampled tokens dropped because interrupts went
            in before them (the model chose again having read them).
        injected_tokens: interrupt tokens the runtime fed.
        burst_holds: ``interrupt_at="sentence"``: call blocks after which ready results waited
            because the model went on with another call (one look-ahead forward pass each, two
            where a whitespace token comes before the ``[CALL]``).
        interrupts: interrupts injected.
        trap_wait_s: time decoding was paused in traps (and draining at EOS).
        sync_wait_s: time spent blocked on calls in ``sync`` / ``sync-parallel`` mode.
        wall_s: wall time of the decode loop.
        ttft_s: time from the start of the loop to the first sampled token.
        stop_reason: ``eos``, ``max_new_tokens``, ``stopping_criteria``, ``cancelled`` or
            ``cml_errors`` (the model wrote ``max_cml_errors`` malformed blocks in a row).
    """

    forward_passes: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    resampled_tokens: int = 0
    injected_tokens: int = 0
    burst_holds: int = 0
    interrupts: int = 0
    trap_wait_s: float = 0.0
    sync_wait_s: float = 0.0
    wall_s: float = 0.0
    ttft_s: float = 0.0
    stop_reason: str = ""
    #: remote engines: requests sent after the first to continue the same generation
    resubmissions: int = 0
    #: remote engines: time to first token of each streamed segment (request), in seconds
    segment_ttft_s: list[float] = field(default_factory=list)
    #: remote engines: backend, endpoint, retries, resumes, ``dropped_chars`` (text a chunk of several tokens
    #: held past a trap or a sync call, written without the result, dropped) and one summary per segment
    remote: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _Recorder(CMLStreamer):
    """The session's own streamer: keeps every event and forwards it to the user's streamer."""

    def __init__(self, tokenizer: Any, user_streamer: Any | None) -> None:
        super().__init__(tokenizer, skip_prompt=True)
        self.user = user_streamer

    def on_stream_event(self, event: StreamEvent) -> None:
        if self.user is not None and hasattr(self.user, "on_event") and not isinstance(self.user, _Recorder):
            # CMLStreamer subclasses decode tokens themselves; pass only runtime events
            if event.kind not in ("text", "call_written", "malformed", "done", "interrupt"):
                self.user.on_event(event)


class GenerationSession:
    """Runtime state of ONE generation: executor, monitor, events, counters.

    Created by :class:`~hf_asynclm.asynclm.AsyncLM` for each ``generate`` call; user code
    talks to it through ``AsyncLM.interrupt`` / ``AsyncLM.cancel``.

    Args:
        tokenizer: the model's tokenizer.
        executor: a :class:`~hf_asynclm.executor.ToolExecutor`.
        mode: ``async``, ``sync`` or ``sync-parallel``.
        trap_timeout_s: longest pause in a trap (an error interrupt then goes in).
        drain_on_eos: when the model ends while calls it named are still running, wait for
            them and inject their results instead of ending (nothing is lost).
        owns_executor: close the executor when the generation ends.
        trap_cache_policy: ``keep`` the KV cache in place during traps or ``offload`` it to CPU.
        interrupt_at: ``"token"`` (any safe point) or ``"word"`` (only at word boundaries and
            right after a block; see the module docstring).
        max_cml_errors: stop the generation (``stop_reason="cml_errors"``) after this many
            malformed blocks in a row, each answered by an error interrupt, with no valid block
            between them: a model stuck in a loop of broken CML. ``None``: never stop for that.
    """

    def __init__(
        self,
        tokenizer: Any,
        executor: Any,
        mode: Mode = "async",
        trap_timeout_s: float = 60.0,
        drain_on_eos: bool = True,
        owns_executor: bool = True,
        trap_cache_policy: TrapCachePolicy = "keep",
        interrupt_at: InterruptAt = "token",
        max_cml_errors: int | None = 8,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
        self.interrupt_at = check_interrupt_at(interrupt_at)
        self.max_cml_errors = check_max_cml_errors(max_cml_errors)
        self.cml_errors_in_a_row = 0
        self.tokenizer = tokenizer
        self.executor = executor
        self.mode = mode
        self.trap_timeout_s = trap_timeout_s
        self.drain_on_eos = drain_on_eos
        self.owns_executor = owns_executor
        self.trap_cache_policy = trap_cache_policy
        self.stats = GenerationStats()
        self.blocks: list[Block] = []
        self.injected: list[Any] = []
        self.leftover_interrupts: list[Any] = []
        self.sequences: torch.Tensor | None = None
        self.prompt_length = 0
        self._deferred: list[Block] = []
        self._finished_reported: set[int] = set()
        self._cancel = threading.Event()
        self._recorder: _Recorder | None = None
        self._early_events: list[StreamEvent] = []
        self.started = threading.Event()
        self.finished = threading.Event()

    # control from other threads ----------------------------------------------------------------
    def interrupt(self, text: str) -> None:
        """Queue ``[INTR] user [HEAD] text [END]``; it goes in at the next safe point."""
        self.executor.push_interrupt(USER_ID, " ".join(str(text).split()))
        self._emit(StreamEvent("user_interrupt", time.monotonic(), text=text, call_id=USER_ID))

    def cancel(self) -> None:
        """Stop the generation at the next step (calls in flight are cancelled)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # events ------------------------------------------------------------------------------------
    @property
    def events(self) -> list[StreamEvent]:
        return self._recorder.events if self._recorder is not None else []

    def _emit(self, event: StreamEvent) -> None:
        if self._recorder is not None:
            self._recorder.on_event(event)
        else:  # e.g. a user interrupt sent before the loop attached its recorder
            self._early_events.append(event)

    def attach_recorder(self, recorder: Any) -> None:
        """Give the session the streamer that records its events (earlier events are replayed)."""
        self._recorder = recorder
        early, self._early_events = self._early_events, []
        for event in early:
            recorder.on_event(event)

    # block handling ----------------------------------------------------------------------------
    @property
    def stuck_on_cml_errors(self) -> bool:
        """The model wrote ``max_cml_errors`` malformed blocks in a row."""
        return self.max_cml_errors is not None and self.cml_errors_in_a_row >= self.max_cml_errors

    def handle_block(self, block: Block, driver: CacheDriver) -> None:
        self.blocks.append(block)
        self.cml_errors_in_a_row = self.cml_errors_in_a_row + 1 if block.kind in ("malformed", "interrupt") else 0
        if block.kind == "call":
            if self.mode == "sync-parallel":
                self._deferred.append(block)
            else:
                record = self._submit(block)
                if self.mode == "sync":
                    self._wait_call(record)
        elif block.kind == "trap":
            self.trap(driver)
        elif block.kind == "malformed":
            target = block.call_id if block.call_id and block.call_id.isidentifier() else PROTOCOL_ERROR_ID
            self.executor.push_interrupt(target, format_error("CMLSyntaxError", block.error or "malformed block"), is_error=True)
        # an [INTR] block can only come from the model spelling it around the mask: report it
        elif block.kind == "interrupt":
            self.executor.push_interrupt(
                PROTOCOL_ERROR_ID, format_error("CMLSyntaxError", "the model may not write [INTR] blocks"), is_error=True
            )

    def _submit(self, block: Block) -> Any:
        record = self.executor.submit(block.call_id, block.body)
        self._emit(
            StreamEvent(
                "call_started",
                record.submitted_at,
                text=block.body,
                call_id=block.call_id,
                name=record.name,
                data={"arguments": record.arguments, "status": record.status},
            )
        )
        return record

    def _wait(self, predicate_wait: Any, timeout: float | None) -> bool:
        """Wait in slices until ``predicate_wait(slice)`` is true, the timeout, or a cancel."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.cancelled:
            remaining = _WAIT_SLICE_S if deadline is None else min(_WAIT_SLICE_S, deadline - time.monotonic())
            if remaining <= 0:
                return False
            if predicate_wait(remaining):
                return True
        return False

    def _wait_call(self, record: Any) -> None:
        t0 = time.monotonic()
        self._wait(lambda s: self.executor.wait_for(record, s), None)
        self.stats.sync_wait_s += time.monotonic() - t0

    def _start_deferred(self) -> list[Any]:
        records = [self._submit(b) for b in self._deferred]
        self._deferred = []
        return records

    def trap(self, driver: CacheDriver, reason: str = "trap") -> None:
        """Pause until at least one interrupt is ready (sync-parallel: until the bundle returns)."""
        t0 = time.monotonic()
        self._emit(StreamEvent("trap", t0, data={"reason": reason}))
        if self.mode == "sync-parallel" and self._deferred:
            records = self._start_deferred()
            for record in records:
                self._wait(lambda s, r=record: self.executor.wait_for(r, s), None)
            waited = time.monotonic() - t0
            self.stats.sync_wait_s += waited
        elif not self.executor.has_ready():
            if not self.executor.pending_ids():
                if reason == "trap":
                    self.executor.push_interrupt(
                        TRAP_ID, format_error("TrapError", "nothing is in flight: no result will arrive"), is_error=True
                    )
            else:
                if self.trap_cache_policy == "offload":
                    driver.offload()
                ok = self._wait(self.executor.wait_ready, self.trap_timeout_s)
                if not ok and not self.cancelled and reason == "trap":
                    self.executor.push_interrupt(
                        TRAP_ID,
                        format_error("TrapTimeoutError", f"no result arrived within {self.trap_timeout_s:g} s"),
                        is_error=True,
                    )
            waited = time.monotonic() - t0
            self.stats.trap_wait_s += waited
        else:
            waited = 0.0
        self._emit(StreamEvent("resume", time.monotonic(), data={"waited_s": waited, "reason": reason}))

    def owes_results(self) -> bool:
        """Calls the model named are still running, deferred or un-injected."""
        return bool(self._deferred) or bool(self.executor.pending_ids()) or self.executor.has_ready()

    def take_interrupts(self, limit: int | None = None) -> list[Any]:
        interrupts = self.executor.pop_ready(limit)
        for intr in interrupts:
            record = getattr(intr, "record", None)
            if record is not None:
                self._report_finished(record)
        return interrupts

    def _report_finished(self, record: Any) -> None:
        if id(record) in self._finished_reported:
            return
        self._finished_reported.add(id(record))
        self._emit(
            StreamEvent(
                "call_finished",
                record.finished_at or time.monotonic(),
                call_id=record.call_id,
                name=record.name,
                data={"status": record.status, "result": record.result_text, "error": record.error},
            )
        )

    def finish(self) -> None:
        """Cancel what is still running and report every call's final state."""
        self.leftover_interrupts = self.executor.drain_ready()
        self.executor.cancel_all("generation ended")
        for record in list(self.executor.calls):
            if record.finished_at is not None or record.status in ("cancelled", "timeout", "error", "done"):
                self._report_finished(record)
        if self.owns_executor:
            self.executor.close(wait=False)


class SessionControl:
    """``interrupt`` / ``cancel`` / ``generating`` for an object that runs one session at a time.

    The owner sets ``self._lock`` (a ``threading.Lock``) and ``self._session`` (the running
    session or None).
    """

    _lock: threading.Lock
    _session: Any

    def interrupt(self, text: str) -> None:
        """Send a user interrupt to the generation in progress (thread-safe).

        It goes in as ``[INTR] user [HEAD] text [END]`` at the next safe point.
        Raises ``RuntimeError`` when nothing is generating.
        """
        with self._lock:
            session = self._session
        if session is None:
            raise RuntimeError(
                f"no generation in progress: {type(self).__name__}.interrupt works while generate/stream runs"
            )
        session.interrupt(text)

    def cancel(self) -> bool:
        """Stop the generation in progress at its next step; True when one was running."""
        with self._lock:
            session = self._session
        if session is None:
            return False
        session.cancel()
        return True

    @property
    def generating(self) -> bool:
        """True while a generation runs."""
        return self._session is not None


def check_interrupt_at(value: str) -> str:
    """Return ``value`` when it is a valid ``interrupt_at`` setting, else raise ``ValueError``."""
    if value not in INTERRUPT_AT:
        raise ValueError(f"unknown interrupt_at {value!r}: use one of {', '.join(INTERRUPT_AT)}")
    return value


def check_max_cml_errors(value: int | None) -> int | None:
    """Return ``value`` when it is a valid ``max_cml_errors`` (>= 1 or None), else raise ``ValueError``."""
    if value is not None and value < 1:
        raise ValueError(f"max_cml_errors must be >= 1 or None, got {value}")
    return value


def _eos_ids(generation_config: Any) -> set[int]:
    eos = getattr(generation_config, "_eos_token_tensor", None)
    if eos is None:
        eos = generation_config.eos_token_id
    if eos is None:
        return set()
    if isinstance(eos, torch.Tensor):
        return {int(x) for x in eos.flatten().tolist()}
    if isinstance(eos, int):
        return {eos}
    return {int(x) for x in eos}


def _token_budget(generation_config: Any, prompt_len: int) -> float:
    if getattr(generation_config, "max_new_tokens", None) is not None:
        return int(generation_config.max_new_tokens)
    if getattr(generation_config, "max_length", None) is not None:
        return max(0, int(generation_config.max_length) - prompt_len)
    return math.inf


def _output(generation_config: Any, sequences: torch.Tensor, scores: tuple | None, cache: Any) -> Any:
    if not getattr(generation_config, "return_dict_in_generate", False):
        return sequences
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    names = {f.name for f in fields(GenerateDecoderOnlyOutput)}
    kwargs: dict[str, Any] = {"sequences": sequences}
    if scores is not None:
        kwargs["scores"] = scores
    kwargs["cache" if "cache" in names else "past_key_values"] = cache
    return GenerateDecoderOnlyOutput(**kwargs)


_NO_CALL, _AFTER_CALL, _IN_BURST = "no call", "after a call", "in a burst"  # the decode loop's ``calls``


def cml_decode_loop(
    session: GenerationSession,
    model: Any,
    input_ids: torch.LongTensor,
    logits_processor: Any,
    stopping_criteria: Any,
    generation_config: Any,
    streamer: Any | None = None,
    **model_kwargs: Any,
) -> Any:
    """Run asynchronous generation for one sequence (see the module docstring)."""
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"hf-asynclm generates one sequence at a time; got a batch of {input_ids.shape[0]}. "
            "Call generate once per prompt (each generation has its own calls and interrupts)."
        )
    if getattr(generation_config, "num_beams", 1) not in (None, 1):
        raise ValueError("hf-asynclm does not support beam search (num_beams > 1): tool calls cannot be undone")
    t_start = time.monotonic()
    tokenizer = session.tokenizer
    recorder = _Recorder(tokenizer, streamer)
    recorder.put(input_ids.cpu())  # the prompt (skipped)
    session.attach_recorder(recorder)
    session.started.set()
    if len(getattr(session.executor, "tools", ()) or ()):
        session.executor.start()  # no thread start-up cost on the first call's dispatch
    monitor = CMLMonitor(tokenizer)
    stats = session.stats
    scores_out: tuple | None = () if getattr(generation_config, "output_scores", False) else None

    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    attention_mask = model_kwargs.get("attention_mask")
    position_ids = model_kwargs.get("position_ids")
    driver = CacheDriver(model, cache, attention_mask)
    prompt_len = input_ids.shape[1]
    session.prompt_length = prompt_len
    stats.prompt_tokens = prompt_len
    past = driver.seq_length
    if past >= prompt_len:  # keep at least one token to feed
        driver.cache.crop(-(past - prompt_len + 1))
        past = driver.seq_length
    start_pos = int(position_ids[0, past]) if position_ids is not None and position_ids.shape[1] > past else past
    driver.next_position = start_pos

    budget = _token_budget(generation_config, prompt_len)
    criteria = StoppingCriteriaList([c for c in (stopping_criteria or []) if not isinstance(c, MaxLengthCriteria)])
    eos_ids = _eos_ids(generation_config)
    do_sample = bool(getattr(generation_config, "do_sample", False))
    device = input_ids.device

    word_boundaries = session.interrupt_at == "word" or session.interrupt_at in PACED_INTERRUPT_AT
    # paced delivery is for async mode: sync modes inject each result (or wave) where they wait for it
    sentences = session.interrupt_at in PACED_INTERRUPT_AT and session.mode == "async"
    hold_bursts = sentences and session.interrupt_at == "sentence"  # results wait for the end of a burst of calls
    sentence_open = False  # sentence mode: visible text since the last block or sentence end
    may_deliver = True  # sentence mode: no interrupt delivered since the last sentence end or trap
    per_delivery = 1 if sentences else None  # sentence mode: one interrupt at a time
    wait_max = SENTENCE_WAIT_MAX_TOKENS if sentences else WORD_WAIT_MAX_TOKENS
    # past the sentence cap a held interrupt still waits for a word to start (at most the word cap more)
    hold_max = wait_max + WORD_WAIT_MAX_TOKENS if sentences else wait_max
    virtual_clock = getattr(session.executor, "virtual_clock", None)  # simulated time: tokens move it
    held = False  # word mode: at a safe point with interrupts held back until a word starts
    held_for = 0  # tokens the ready interrupts have been held back
    # where the model is among its calls: _NO_CALL (text or a trap since the last call block, or none
    # yet), _AFTER_CALL (only whitespace since a call block's [END]: a [CALL] now goes on with its
    # burst) or _IN_BURST (the same, and sentence mode holds the ready results for the burst's end)
    calls = _NO_CALL
    held_after_call = False  # sentence mode: held right after a call block's [END]
    call_token = monitor.markers.call

    try:
        logits = driver.forward(input_ids[:, past:])
        generated = 0
        while True:
            if session.cancelled:
                stats.stop_reason = "cancelled"
                break
            scores = logits_processor(input_ids, logits) if logits_processor is not None else logits
            scores = monitor.mask_scores(scores)
            if scores_out is not None:
                scores_out += (scores,)
            if do_sample:
                probs = torch.nn.functional.softmax(scores, dim=-1)
                token = int(torch.multinomial(probs, num_samples=1)[0, 0])
            else:
                token = int(torch.argmax(scores, dim=-1)[0])
            generated += 1
            stats.generated_tokens = generated
            if virtual_clock is not None:
                virtual_clock.tick()
            if generated == 1:
                stats.ttft_s = time.monotonic() - t_start
            token_t = torch.tensor([[token]], dtype=input_ids.dtype, device=device)

            if token in eos_ids and session.drain_on_eos and generated < budget and not monitor.in_block and session.owes_results():
                # The model wants to stop but results it asked for are still owed: wait for them and
                # let it go on with them in context (the EOS is not kept).
                session.trap(driver, reason="eos")
                interrupts = session.take_interrupts(per_delivery)
                may_deliver = False
                if interrupts and not session.cancelled:
                    input_ids, feed = _append_interrupts(session, recorder, streamer, input_ids, interrupts)
                    monitor.reset_context()
                    logits = driver.forward(feed)
                    continue

            if (
                held
                and token not in eos_ids
                and monitor.starts_word(token)
                and (not sentences or held_for >= wait_max or (may_deliver and not sentence_open))
            ):
                if calls == _IN_BURST and token == call_token:
                    interrupts = []  # the burst goes on: the results wait for its end
                elif hold_bursts and calls == _AFTER_CALL and token == call_token:
                    # a result that became ready while the whitespace after [END] was written waits too
                    interrupts = []
                    calls = _IN_BURST
                    stats.burst_holds += 1
                elif hold_bursts and held_after_call and session.executor.has_ready() and _continues_with_call(
                    driver, input_ids, token, logits_processor, call_token, tokenizer
                ):
                    interrupts = []  # results that came while [END] was written wait for the burst too
                    calls = _IN_BURST
                    stats.burst_holds += 1
                else:
                    interrupts = session.take_interrupts(per_delivery)
                if interrupts:
                    # a word starts: the interrupts go in here, and the model picks the word again
                    # having read them (the token sampled without them is dropped)
                    generated -= 1
                    stats.generated_tokens = generated
                    stats.resampled_tokens += 1
                    input_ids, feed = _append_interrupts(session, recorder, streamer, input_ids, interrupts)
                    monitor.reset_context()
                    held = False
                    held_for = 0
                    may_deliver = False
                    logits = driver.forward(feed)
                    continue
            held = False
            held_after_call = False

            input_ids = torch.cat([input_ids, token_t], dim=-1)
            cml_events = monitor.feed_token(token)
            recorder.put_decoded(cml_events)  # decoded once, by the loop's monitor
            if streamer is not None:
                streamer.put(token_t[0].cpu())
            for event in cml_events:
                if (isinstance(event, Block) and event.kind != "call") or (isinstance(event, TextEvent) and event.text.strip()):
                    calls = _NO_CALL  # text or a trap ends a burst of calls
                elif isinstance(event, Block) and calls == _NO_CALL:
                    calls = _AFTER_CALL  # a call block (within a burst, the burst goes on)
                if isinstance(event, Block):
                    session.handle_block(event, driver)
                    sentence_open = False
                    if event.kind == "trap":
                        may_deliver = True
                elif sentences and isinstance(event, TextEvent) and event.text.strip():
                    sentence_open = not ends_sentence(event.text)
                    if not sentence_open:
                        may_deliver = True

            if token in eos_ids:
                stats.stop_reason = "eos"
                break
            if session.stuck_on_cml_errors:
                logger.warning("stopping: %d malformed CML blocks in a row", session.cml_errors_in_a_row)
                stats.stop_reason = "cml_errors"
                break
            if generated >= budget:
                stats.stop_reason = "max_new_tokens"
                break
            if len(criteria) and bool(criteria(input_ids, scores).any()):
                stats.stop_reason = "stopping_criteria"
                break

            feed = token_t
            if monitor.at_safe_point:
                after_block = any(isinstance(e, Block) for e in cml_events)
                after_call = any(isinstance(e, Block) and e.kind == "call" for e in cml_events)
                if word_boundaries and held_for < hold_max and (not after_block or (sentences and not may_deliver)):
                    # inside or at the end of a word (sentence mode: of a sentence, or after a block
                    # while the last interrupt is still unanswered): wait for the next word to start
                    held = True
                    held_for = held_for + 1 if session.executor.has_ready() else 0
                else:
                    if hold_bursts and after_call and session.executor.has_ready():
                        # paced, at the end of a call: while the model goes on writing calls (a
                        # burst: the calls it could write before), the ready results wait for its end
                        logits = driver.forward(feed)
                        ahead = logits_processor(input_ids, logits) if logits_processor is not None else logits
                        if _continues_with_call(
                            driver, input_ids, int(torch.argmax(ahead, dim=-1)[0]), logits_processor, call_token, tokenizer
                        ):
                            calls = _IN_BURST
                            stats.burst_holds += 1
                            continue
                        feed = None  # fed: the interrupts go in right after it
                    interrupts = session.take_interrupts(per_delivery)
                    if interrupts:
                        input_ids, extra = _append_interrupts(session, recorder, streamer, input_ids, interrupts)
                        feed = extra if feed is None else torch.cat([feed, extra], dim=-1)
                        monitor.reset_context()
                        may_deliver = False
                    elif sentences:
                        # sentence mode, right after a block, nothing ready yet: one that becomes ready
                        # by the next token still goes in before it (its traces: "[END][INTR] ..."),
                        # unless that token goes on with another call
                        held = True
                        held_after_call = after_call
                    held_for = 0
            if feed is not None:
                logits = driver.forward(feed)
    finally:
        stats.forward_passes = driver.forward_calls
        flushed = monitor.flush()
        for event in flushed:
            if isinstance(event, Block):
                session.blocks.append(event)
        session.finish()
        recorder.end(flushed)
        if streamer is not None:
            streamer.end()
        stats.wall_s = time.monotonic() - t_start
        session.sequences = input_ids
        session.finished.set()
    return _output(generation_config, input_ids, scores_out, driver.cache)


def _continues_with_call(
    driver: CacheDriver, input_ids: torch.Tensor, token: int, logits_processor: Any, call_token: int | None, tokenizer: Any
) -> bool:
    """Paced delivery's look-ahead at the end of a call block: whether the model goes on with
    another call. ``token`` is its next token (chosen, not yet fed): ``[CALL]`` itself, or a
    whitespace token after which ``[CALL]`` is the most likely token. To see that, the whitespace
    token is fed and then taken back out of the cache; where the cache cannot take it back (a
    sliding-window layer about to drop old tokens), the answer is no."""
    if token == call_token:
        return True
    if call_token is None or tokenizer.decode([token], skip_special_tokens=False).strip() or not driver.can_rollback(2):
        return False
    ahead = torch.cat([input_ids, torch.tensor([[token]], dtype=input_ids.dtype, device=input_ids.device)], dim=-1)
    logits = driver.forward(ahead[:, -1:])
    scores = logits_processor(ahead, logits) if logits_processor is not None else logits
    driver.rollback(1)
    return int(torch.argmax(scores, dim=-1)[0]) == call_token


def _append_interrupts(
    session: GenerationSession, recorder: _Recorder, streamer: Any | None, input_ids: torch.Tensor, interrupts: list[Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    ids: list[int] = []
    for intr in interrupts:
        ids += session.tokenizer.encode(intr.text(), add_special_tokens=False)
    extra = torch.tensor([ids], dtype=input_ids.dtype, device=input_ids.device)
    session.injected.extend(interrupts)
    session.stats.injected_tokens += len(ids)
    session.stats.interrupts += len(interrupts)
    recorder.put_injected(extra[0].cpu(), interrupts)
    if streamer is not None:
        if hasattr(streamer, "put_injected"):
            streamer.put_injected(extra[0].cpu(), interrupts)
        else:
            streamer.put(extra[0].cpu())
    return torch.cat([input_ids, extra], dim=-1), extra
