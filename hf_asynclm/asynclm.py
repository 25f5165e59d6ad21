"""`AsyncLM`: asynchronous function calling for any transformers causal LM, in one object.

Example:

```python
>>> from hf_asynclm import AsyncLM
>>> from hf_asynclm.testing import tiny_tokenizer, tiny_llama
>>> tok = tiny_tokenizer(); model = tiny_llama(tok)
>>> def get_weather(city: str) -> dict:
...     '''Current weather.
...
...     Args:
...         city: The city.
...     '''
...     return {"city": city, "temp_c": 18}
>>> alm = AsyncLM(model, tok, tools=[get_weather])
>>> result = alm.generate("Weather in Oslo?", max_new_tokens=8, do_sample=False)
>>> result.stats.generated_tokens <= 8, result.stats.forward_passes <= result.stats.generated_tokens + 1
(True, True)
>>> out = model.generate(**tok("Hi", return_tensors="pt"), custom_generate=alm.custom_generate, max_new_tokens=4)
>>> out.shape[0]
1

```
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from transformers import LogitsProcessorList

from .call_grammar import CallGrammarProcessor, ConstrainCalls, check_constrain_calls, check_no_repeat_calls
from .data.bfcl import check_plan_layout
from .name_completion import NameCompletionProcessor, check_complete_names, check_quote_numbers
from .cml import marker_token_ids, visible_text
from .executor.executor import ToolExecutor
from .executor.registry import ToolRegistry
from .generation import (
    MODES,
    GenerationSession,
    GenerationStats,
    InterruptAt,
    Mode,
    SessionControl,
    check_interrupt_at,
    check_max_cml_errors,
    cml_decode_loop,
)
from .prompting import build_prompt
from .streamer import CMLIteratorStreamer, StreamEvent
from .virtual_time import VirtualClock

logger = logging.getLogger(__name__)

#: Folder of the checkpoint shipped inside the package (the default model).
DEFAULT_CHECKPOINT = Path(__file__).parent / "checkpoints" / "cml-tiny"


def shipped_checkpoints() -> dict[str, Path]:
    """Checkpoints that ship inside the package, by name (``cml-tiny``, and
    ``gemma-3-270m-cml`` when present: a LoRA adapter whose base comes from the
    ``hf-asynclm[gemma]`` extra). ``AsyncLM.from_pretrained(name)`` loads them offline."""
    root = DEFAULT_CHECKPOINT.parent
    if not root.is_dir():
        return {}
    return {
        p.name: p
        for p in sorted(root.iterdir())
        if p.is_dir() and ((p / "config.json").is_file() or (p / "adapter_config.json").is_file())
    }


@dataclass
class AsyncResult:
    """What one asynchronous generation produced.

    Attributes:
        text: the user-visible text (CML blocks removed).
        raw_text: everything after the prompt, CML blocks and injected interrupts included.
        calls: one record per call (id, name, arguments, times, result or error, status).
        timeline: every event with its monotonic timestamp.
        stats: counters (forward passes, generated / injected tokens, trap time, wall time).
        sequences: token ids of prompt + generated + injected tokens, shape ``[1, n]``.
        prompt_length: number of prompt tokens at the start of ``sequences``.
        interrupts: the interrupts injected, in order.
        leftover_interrupts: results that were ready but never injected (generation ended).
        malformed: blocks that broke the protocol.
        mode: the mode the generation ran in.
    """

    text: str
    raw_text: str
    calls: list[Any]
    timeline: list[StreamEvent]
    stats: GenerationStats
    sequences: torch.Tensor
    prompt_length: int
    interrupts: list[Any] = field(default_factory=list)
    leftover_interrupts: list[Any] = field(default_factory=list)
    malformed: list[Any] = field(default_factory=list)
    mode: str = "async"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary (for ``--json`` output and benchmark files)."""
        return {
            "mode": self.mode,
            "text": self.text,
            "raw_text": self.raw_text,
            "calls": [_record_dict(c) for c in self.calls],
            "stats": self.stats.to_dict(),
            "timeline": [e.to_dict() for e in self.timeline],
            "malformed": [{"raw": b.raw, "error": b.error} for b in self.malformed],
        }


def _record_dict(record: Any) -> dict[str, Any]:
    keys = ("call_id", "name", "arguments", "body", "status", "submitted_at", "started_at", "finished_at", "result_text", "error")
    out = {}
    for k in keys:
        v = getattr(record, k, None)
        try:
            import json

            json.dumps(v)
        except (TypeError, ValueError):
            v = repr(v)
        out[k] = v
    return out


def _streamer_of_calling_generate() -> Any | None:
    """The ``streamer`` passed to the ``generate`` call that invoked ``custom_generate``.

    transformers (5.2x) gives a callable ``custom_generate`` only the keyword arguments its
    signature adds, so the caller's streamer (which already received the prompt) does not reach
    the loop. It is still a local of ``GenerationMixin.generate`` two frames up: take it from
    there, and only from there.
    """
    import inspect

    frame = inspect.currentframe()
    try:
        caller = frame.f_back.f_back if frame is not None and frame.f_back is not None else None
        while caller is not None:
            if caller.f_code.co_name == "generate" and "streamer" in caller.f_locals and "decoding_method" in caller.f_locals:
                return caller.f_locals["streamer"]
            caller = caller.f_back
        return None
    finally:
        del frame


#: Constructor settings a checkpoint may record in ``cml_training.json`` -> ``"runtime"``.
_RUNTIME_SETTINGS: dict[str, Callable[[Any], Any]] = {
    "interrupt_at": check_interrupt_at,
    "constrain_calls": check_constrain_calls,
    "no_repeat_calls": check_no_repeat_calls,
    "complete_names": check_complete_names,
    "quote_numbers": check_quote_numbers,
    "plan_layout": check_plan_layout,
}


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device`, or a ``ValueError`` that says why this machine cannot use it.

    >>> check_device("cpu")
    device(type='cpu')
    >>> check_device("gpu")
    Traceback (most recent call last):
    ...
    ValueError: unknown device 'gpu': use cpu, cuda, cuda:N or mps
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, but no GPU answers"
            raise ValueError(f"device {str(device)!r}: no CUDA GPU is available to this torch ({torch.__version__}, {build})")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: this torch has no MPS (Apple GPU) support here")
    return dev


def checkpoint_runtime_defaults(folder: str | Path) -> dict[str, Any]:
    """Runtime settings a checkpoint folder records for itself (``cml_training.json`` ->
    ``"runtime"``), checked; ``{}`` when it records none.

    ``hf-asynclm train`` records ``{"interrupt_at": "word", "constrain_calls": "schema"}``: its
    traces only put interrupts between words or right after a block, and its markers are single
    tokens (calls can be held to the tools' schemas; ``--constrain-calls`` records another setting,
    e.g. the shipped cml-tiny's ``"grounded"``, ``--no-repeat-calls`` adds ``"no_repeat_calls": true``,
    ``--complete-names`` adds ``"complete_names": true``, ``--quote-numbers`` ``"quote_numbers": true``,
    ``--plan-layout time-first`` ``"plan_layout": "time-first"``
    and ``--interrupt-at sentence`` records paced interrupts, for a model trained on paced traces). A value this version does not know is left out
    with a warning (the constructor's default applies).

    Example:

    ```python
    >>> from hf_asynclm.asynclm import DEFAULT_CHECKPOINT, checkpoint_runtime_defaults
    >>> checkpoint_runtime_defaults(DEFAULT_CHECKPOINT)
    {'interrupt_at': 'sentence', 'constrain_calls': 'grounded', 'no_repeat_calls': True, 'complete_names': True, 'plan_layout': 'time-first'}

    ```
    """
    from .hub import read_training_record

    try:
        runtime = read_training_record(folder).get("runtime") or {}
    except Exception as exc:  # an unreadable record must not stop loading the weights
        logger.warning("ignoring the training record of %s: %s", folder, exc)
        return {}
    out: dict[str, Any] = {}
    for name, value in (runtime.items() if isinstance(runtime, dict) else ()):
        check = _RUNTIME_SETTINGS.get(name)
        if check is None:
            logger.warning("%s records an unknown runtime setting %r: ignored", folder, name)
            continue
        try:
            out[name] = check(value)
        except (TypeError, ValueError) as exc:
            logger.warning("%s records %s=%r, which is not valid (%s): ignored", folder, name, value, exc)
    return out


class AsyncLM(SessionControl):
    """A transformers causal LM with asynchronous function calling.

    Args:
        model: a causal LM (``PreTrainedModel``; a ``PeftModel`` works too).
        tokenizer: its tokenizer.
        tools: callables (documented, type-hinted), ``Tool`` objects, ``(schema, handler)``
            pairs or a ``ToolRegistry``.
        mode: ``async`` (default), ``sync`` or ``sync-parallel`` (see the README).
        call_timeout_s: longest run of one call before it becomes an error interrupt.
        trap_timeout_s: longest pause in a trap.
        max_result_chars: interrupts longer than this are truncated with a marker.
        max_in_flight: calls running at once (more wait their turn).
        max_workers: threads for synchronous tools.
        system_prompt: for models whose chat template does not know CML: ``True`` adds the
            default CML system prompt with tools and examples, a string replaces it, ``False``
            adds nothing.
        drain_on_eos: wait for owed results when the model ends early (see
            :class:`~hf_asynclm.generation.GenerationSession`).
        trap_cache_policy: ``keep`` or ``offload`` the KV cache during traps.
        interrupt_at: where results may go in: ``"token"`` (any safe point, the paper's rule)
            or ``"word"`` (right after a block, else only where a word starts: small CML models
            trained on the simulator's traces keep their sentence) or ``"sentence"`` (paced: one
            result at a time, after a burst of calls or a sentence end, each answered before the
            next; for models trained on paced traces) or ``"sentence-eager"`` (paced, but a result
            may also go in between two calls: the rule before 2026-12-02); see
            :mod:`hf_asynclm.generation`.
        max_cml_errors: stop after this many malformed CML blocks in a row (a model looping on
            broken CML; ``stop_reason="cml_errors"``); ``None`` never stops for that.
        constrain_calls: constrained decoding of call blocks (:mod:`hf_asynclm.call_grammar`):
            ``"off"``, ``"schema"`` (only calls of these tools, with arguments of their types
            and new call ids) or ``"grounded"`` (``"schema"``, and every string and number value
            copied from the conversation or the tools' schemas). Needs the markers as single tokens.
        no_repeat_calls: with ``constrain_calls`` on, never let the model write a call it has
            already written in this generation (same tool, same arguments): where the last
            argument would repeat one, the model is steered to another value (see
            :class:`~hf_asynclm.call_grammar.CallChecker`). For small models that lose track of
            which items of a list they have asked for; leave it off where a tool is polled.
        complete_names: never let the model end a name from the conversation early in its
            visible text (``"Kuala"`` for Kuala Lumpur, ``"Hong"`` for Hong Kong): a token that
            would stop it there is refused (:class:`~hf_asynclm.name_completion.NameCompletionProcessor`).
            For small models that quote their results; works without the CML markers as tokens.
        quote_numbers: never let the model write a number in its visible text that the
            conversation lacks: each digit must go on with one of the conversation's numbers and
            a number may only end where one of them ends (``"579.0"`` is refused where a result
            said ``579.5``; the same processor, ``numbers=True``). For small models whose answers
            only quote results; not for a model that computes (a sum, a date) in its answer.
        plan_layout: how cheat-sheet plans for this model write each call
            (:data:`~hf_asynclm.data.bfcl.PLAN_LAYOUTS`): ``"call-first"`` (``c1 f(a=1) ~300ms``) or
            ``"time-first"`` (``~300ms c1 f(a=1)``). The runtime never writes a plan itself; prompt
            builders (:func:`~hf_asynclm.data.bfcl.with_cheat_sheet`, ``hf-asynclm eval`` and ``bench``)
            read it, so that a model sees plans in the layout it was trained on.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        tools: Iterable[Any] | ToolRegistry | None = None,
        mode: Mode = "async",
        *,
        call_timeout_s: float = 30.0,
        trap_timeout_s: float = 60.0,
        max_result_chars: int = 4096,
        max_in_flight: int = 32,
        max_workers: int = 8,
        system_prompt: bool | str = True,
        drain_on_eos: bool = True,
        trap_cache_policy: str = "keep",
        interrupt_at: InterruptAt = "token",
        max_cml_errors: int | None = 8,
        constrain_calls: ConstrainCalls = "off",
        no_repeat_calls: bool = False,
        complete_names: bool = False,
        quote_numbers: bool = False,
        plan_layout: str = "call-first",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
        self.interrupt_at: InterruptAt = check_interrupt_at(interrupt_at)  # type: ignore[assignment]
        self.max_cml_errors = check_max_cml_errors(max_cml_errors)
        self.constrain_calls: ConstrainCalls = check_constrain_calls(constrain_calls)  # type: ignore[assignment]
        if self.constrain_calls != "off" and not marker_token_ids(tokenizer).single_token:
            raise ValueError(
                f"constrain_calls={constrain_calls!r} needs the CML markers as single tokens; add them with "
                "hf_asynclm.cml.add_cml_tokens(tokenizer, model) or pass constrain_calls='off'"
            )
        self.no_repeat_calls = check_no_repeat_calls(no_repeat_calls)
        if self.no_repeat_calls and self.constrain_calls == "off":
            raise ValueError("no_repeat_calls=True works through constrained decoding: pass constrain_calls='schema' or 'grounded'")
        self.complete_names = check_complete_names(complete_names)
        self.quote_numbers = check_quote_numbers(quote_numbers)
        self.plan_layout = check_plan_layout(plan_layout)
        self.model = model
        self.tokenizer = tokenizer
        self.registry = ToolRegistry.coerce(tools)
        self.mode: Mode = mode
        self.call_timeout_s = call_timeout_s
        self.trap_timeout_s = trap_timeout_s
        self.max_result_chars = max_result_chars
        self.max_in_flight = max_in_flight
        self.max_workers = max_workers
        self.system_prompt = system_prompt
        self.drain_on_eos = drain_on_eos
        self.trap_cache_policy = trap_cache_policy
        self._session: GenerationSession | None = None
        self._lock = threading.Lock()
        self.last_session: GenerationSession | None = None

    # construction -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | Path | None = None,
        tools: Iterable[Any] | ToolRegistry | None = None,
        mode: Mode = "async",
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool | None = None,
        endpoint: str | None = None,
        device: str | torch.device | None = None,
        dtype: Any = None,
        **kwargs: Any,
    ) -> "AsyncLM":
        """Load a CML checkpoint (a local folder or a Hub repo id) with its tokenizer.

        Without ``path_or_repo`` the checkpoint shipped in the package (``cml-tiny``) is used,
        so everything works offline; the name of another shipped checkpoint
        (:func:`shipped_checkpoints`) loads that one. Hub downloads go through ``huggingface_hub``
        (``revision``, ``token``, ``cache_dir``, ``local_files_only`` / ``HF_HUB_OFFLINE``,
        ``endpoint`` / ``HF_ENDPOINT``). LoRA adapters (``adapter_config.json``) are loaded on top
        of their base model with ``peft``. Remaining keyword arguments go to the
        :class:`AsyncLM` constructor; settings the checkpoint records for the runtime
        (:func:`checkpoint_runtime_defaults`: ``interrupt_at="word"`` and ``constrain_calls="schema"``
        for checkpoints trained by ``hf-asynclm train``) apply where those arguments leave them out or
        pass ``None``. ``device`` (``"cuda"``, ``"cuda:1"``, ...) moves the model there, after
        :func:`check_device` says the machine has it; half-precision weights stay half precision
        on a GPU and run in float32 on a CPU unless ``dtype`` says otherwise.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if device is not None:
            device = check_device(device)  # before any weights load
        if path_or_repo is None:
            if not (DEFAULT_CHECKPOINT / "config.json").exists():
                raise FileNotFoundError(
                    f"the default checkpoint is missing from {DEFAULT_CHECKPOINT}; reinstall hf-asynclm "
                    "or pass a checkpoint path / Hub repo id"
                )
            folder = DEFAULT_CHECKPOINT
        elif isinstance(path_or_repo, str) and not Path(path_or_repo).exists() and path_or_repo in (shipped := shipped_checkpoints()):
            folder = shipped[path_or_repo]
        else:
            from .hub import resolve_checkpoint

            folder = resolve_checkpoint(
                path_or_repo,
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                endpoint=endpoint,
            )
        folder = Path(folder)
        load_kwargs: dict[str, Any] = {}
        if dtype is not None:
            load_kwargs["dtype"] = dtype
        if (folder / "adapter_config.json").exists() and not (folder / "config.json").exists():
            try:
                from .training.train import load_trained
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise ImportError(f"{folder} holds a LoRA adapter: install peft (pip install 'hf-asynclm[train]')") from exc
            # the base, resized to the CML tokenizer, with the adapter merged for plain-speed decoding
            model, tokenizer = load_trained(folder, merge=True, **load_kwargs)
        else:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, **load_kwargs)
        if device is not None:
            model = model.to(device)
        if dtype is None and model.device.type == "cpu" and model.dtype in (torch.float16, torch.bfloat16):
            model = model.float()  # half-precision weights (smaller to ship) run in float32 on a CPU
        model.eval()
        recorded = checkpoint_runtime_defaults(folder)
        from_record = set()
        for name in _RUNTIME_SETTINGS:  # None or left out: what the checkpoint records, else the constructor's default
            if kwargs.get(name) is None:
                kwargs.pop(name, None)
                if name in recorded:
                    kwargs[name] = recorded[name]
                    from_record.add(name)
                    logger.info("%s: %s=%r, as the checkpoint records", folder.name, name, recorded[name])
        if "no_repeat_calls" in from_record and kwargs.get("constrain_calls", "off") == "off":
            kwargs.pop("no_repeat_calls")  # the caller turned constraints off: this one goes with them
        return cls(model, tokenizer, tools=tools, mode=mode, **kwargs)

    # sessions ----------------------------------------------------------------------------------
    def new_session(self, mode: Mode | None = None, virtual_clock: VirtualClock | None = None) -> GenerationSession:
        """A fresh runtime session (executor, monitor, counters) for one generation.

        ``virtual_clock``: run it in simulated time (:mod:`hf_asynclm.virtual_time`): results go
        in where the simulated clock says, the same on every run (give each generation a new
        clock). Pass the session to ``model.generate(..., custom_generate=alm.custom_generate,
        asynclm_session=session)`` and read the result with :meth:`result_of`.
        """
        executor = ToolExecutor(
            self.registry,
            timeout_s=self.call_timeout_s,
            max_workers=self.max_workers,
            max_in_flight=self.max_in_flight,
            max_result_chars=self.max_result_chars,
            **({"clock": virtual_clock} if virtual_clock is not None else {}),
        )
        return GenerationSession(
            self.tokenizer,
            executor,
            mode=mode or self.mode,
            trap_timeout_s=self.trap_timeout_s,
            drain_on_eos=self.drain_on_eos,
            owns_executor=True,
            trap_cache_policy=self.trap_cache_policy,  # type: ignore[arg-type]
            interrupt_at=self.interrupt_at,
            max_cml_errors=self.max_cml_errors,
        )

    @property
    def custom_generate(self) -> Callable[..., Any]:
        """The decode loop for ``model.generate(..., custom_generate=alm.custom_generate)``.

        Works in pipelines too: ``pipe(prompt, custom_generate=alm.custom_generate)``. Pass
        ``asynclm_mode="sync"`` to ``generate`` to pick a mode per call.
        """
        alm = self

        def custom_generate(
            model: Any,
            input_ids: torch.LongTensor,
            logits_processor: Any,
            stopping_criteria: Any,
            generation_config: Any,
            synced_gpus: bool = False,
            streamer: Any | None = None,
            asynclm_session: GenerationSession | None = None,
            asynclm_mode: str | None = None,
            asynclm_streamer: Any | None = None,
            **model_kwargs: Any,
        ) -> Any:
            session = asynclm_session or alm.new_session(asynclm_mode)  # type: ignore[arg-type]
            if asynclm_streamer is not None:
                streamer = asynclm_streamer
                streamer.put(input_ids.cpu())  # generate() did not see this streamer: give it the prompt
            elif streamer is None:
                streamer = _streamer_of_calling_generate()
            front: list[Any] = []
            if alm.constrain_calls != "off":
                front.append(CallGrammarProcessor(
                    alm.tokenizer, alm.registry.schemas(), grounded=alm.constrain_calls == "grounded",
                    no_repeat=alm.no_repeat_calls,
                ))
            if alm.complete_names or alm.quote_numbers:
                front.append(NameCompletionProcessor(alm.tokenizer, names=alm.complete_names, numbers=alm.quote_numbers))
            if front:  # first, so that sampling warpers work on the allowed tokens only
                logits_processor = LogitsProcessorList([*front, *(logits_processor or [])])
            with alm._lock:
                alm._session = session
            try:
                return cml_decode_loop(
                    session, model, input_ids, logits_processor, stopping_criteria, generation_config, streamer, **model_kwargs
                )
            finally:
                with alm._lock:
                    alm._session = None
                    alm.last_session = session

        return custom_generate

    # generation --------------------------------------------------------------------------------
    def encode_prompt(self, prompt_or_messages: str | Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Tokenise a prompt or chat messages with the tools (see :func:`~hf_asynclm.prompting.build_prompt`)."""
        prompt = build_prompt(self.tokenizer, prompt_or_messages, self.registry.schemas(), self.system_prompt)
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        enc = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=not templated)
        device = getattr(self.model, "device", torch.device("cpu"))
        return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def generate(
        self,
        prompt_or_messages: str | Sequence[dict[str, Any]],
        *,
        mode: Mode | None = None,
        streamer: Any | None = None,
        virtual_clock: VirtualClock | None = None,
        **generation_kwargs: Any,
    ) -> AsyncResult:
        """Generate with asynchronous function calling.

        Args:
            prompt_or_messages: a prompt string or chat messages.
            mode: override the instance's mode for this call.
            streamer: a transformers streamer (a :class:`~hf_asynclm.streamer.CMLStreamer`
                also receives call / interrupt / trap events).
            virtual_clock: run in simulated time (a new
                :class:`~hf_asynclm.virtual_time.VirtualClock` per call): results go in where
                the simulated clock says, so greedy runs repeat exactly.
            **generation_kwargs: anything ``model.generate`` takes (``max_new_tokens``,
                ``do_sample``, ``temperature``, ``top_p``, ``repetition_penalty``,
                ``generation_config``, ``logits_processor``, ``stopping_criteria`` ...).
        """
        if mode is not None and mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
        inputs = self.encode_prompt(prompt_or_messages)
        session = self.new_session(mode, virtual_clock=virtual_clock)
        self.model.generate(
            **inputs,
            custom_generate=self.custom_generate,
            asynclm_session=session,
            asynclm_streamer=streamer,
            **generation_kwargs,
        )
        return self.result_of(session)

    def result_of(self, session: GenerationSession) -> AsyncResult:
        """Build the :class:`AsyncResult` of a finished session."""
        seq = session.sequences if session.sequences is not None else torch.zeros(1, 0, dtype=torch.long)
        raw = self.tokenizer.decode(seq[0, session.prompt_length :], skip_special_tokens=False)
        for special in (self.tokenizer.eos_token, self.tokenizer.pad_token):
            if special and raw.endswith(special):
                raw = raw[: -len(special)]
        events = session.events
        text = "".join(e.text for e in events if e.kind == "text") if events else visible_text(raw)
        malformed = [b for b in session.blocks if b.kind == "malformed"]
        return AsyncResult(
            text=text,
            raw_text=raw,
            calls=list(session.executor.calls),
            timeline=sorted(events, key=lambda e: e.time),
            stats=session.stats,
            sequences=seq,
            prompt_length=session.prompt_length,
            interrupts=list(session.injected),
            leftover_interrupts=list(session.leftover_interrupts),
            malformed=malformed,
            mode=session.mode,
        )

    def stream(
        self, prompt_or_messages: str | Sequence[dict[str, Any]], *, mode: Mode | None = None, **generation_kwargs: Any
    ) -> Iterator[StreamEvent]:
        """Generate in a background thread and yield :class:`StreamEvent` objects as they happen.

        The last event is ``done``; its ``data["result"]`` holds the :class:`AsyncResult`.
        An exception raised by the generation is re-raised here.
        """
        streamer = CMLIteratorStreamer(self.tokenizer)
        inputs = self.encode_prompt(prompt_or_messages)
        session = self.new_session(mode)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self.model.generate(
                    **inputs,
                    custom_generate=self.custom_generate,
                    asynclm_session=session,
                    asynclm_streamer=streamer,
                    **generation_kwargs,
                )
            except BaseException as exc:  # re-raised in the caller's thread
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, name="hf-asynclm-generate", daemon=True)
        thread.start()
        try:
            for event in streamer:
                if event.kind == "done":
                    thread.join()
                    if failure:
                        raise failure[0]
                    event.data["result"] = self.result_of(session)
                yield event
                if event.kind == "done":
                    return
        finally:
            if thread.is_alive():
                session.cancel()
                thread.join(timeout=30)

    @classmethod
    def remote(cls, endpoint: str, backend: str = "tgi", **kwargs: Any) -> "RemoteAsyncLM":
        """Asynchronous function calling on a remote serving engine, with this class's API.

        Returns a :class:`~hf_asynclm.remote.RemoteAsyncLM` (``generate``, ``stream``,
        ``interrupt``, ``cancel``) that streams from ``endpoint`` and re-submits the prompt
        with the interrupts at safe points.

        Args:
            endpoint: the server, e.g. ``http://127.0.0.1:8080``.
            backend: ``"tgi"`` (Text Generation Inference through ``InferenceClient``) or
                ``"openai"`` (``/v1/completions``: vLLM, SGLang, llama.cpp, ``transformers serve``).
            **kwargs: :class:`~hf_asynclm.remote.RemoteAsyncLM` options (``tokenizer``, ``tools``,
                ``mode``, ``model``, ``timeout_s``, ``max_retries`` ...).

        Example:

        ```python
        >>> from hf_asynclm import AsyncLM
        >>> rlm = AsyncLM.remote("http://127.0.0.1:8080", backend="tgi", mode="sync")
        >>> type(rlm).__name__, rlm.mode
        ('RemoteAsyncLM', 'sync')

        ```
        """
        from .remote import RemoteAsyncLM

        return RemoteAsyncLM(endpoint, backend=backend, **kwargs)
