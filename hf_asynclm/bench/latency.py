"""The latency benchmark: hf-asynclm against the synchronous baselines, and against its ideal.

For every task of a workload, in ONE run, with the same model, prompt and tool latencies,
four modes are measured:

* ``sync``: the loop a transformers user writes today: ``model.generate`` until a call's
  ``[END]`` (a stop token), run the call in the calling thread, append its result as text
  (the same ``[INTR] id [HEAD] value [END]`` block the runtime injects) and call
  ``generate`` again with the whole sequence: the prompt is processed again, no cache is
  kept between calls (within a call ``generate`` uses its cache as usual). Nothing slows it
  on purpose: the stop is a token id, not a string search, when ``[END]`` is one token.
* ``sync-cached``: hf-asynclm's ``sync`` mode (one request; each result is injected into
  the kept KV cache).
* ``sync-parallel``: hf-asynclm's ``sync-parallel`` mode (calls start together at the trap).
* ``async``: hf-asynclm.

Policies: ``oracle`` (:class:`~hf_asynclm.bench.oracle.OraclePolicy` writes the ideal
schedule token by token while the real model's forward passes run) and ``model`` (the
checkpoint decides; the ground-truth plan is in the prompt, :func:`~hf_asynclm.data.bfcl.with_cheat_sheet`).

Decode speed: the real model on this machine, or :func:`~hf_asynclm.emulation.emulate_speed`
(``tpot_ms`` per decode step, ``ttft_ms`` per request: each ``generate`` call of the ``sync``
baseline is a request; hf-asynclm modes make one).

What is measured, per task and mode (all from the same run):

* the latency: wall time from the request (prompt encoding included) to the return of the
  last ``generate`` (results built);
* per step (one sampled token): when the logits processors ran, the forward pass that made
  its logits (start, end), which block the token belongs to;
* per call: ``G``, the time the model spent writing the call's tokens (the sum of its steps'
  durations on the timeline, pauses excluded), ``E``, its execution time
  (``CallRecord.finished_at - started_at``), and the dispatch latency (sampling of its
  ``[END]`` to the tool function starting).

The **ideal** latency of a mode's schedule is :func:`~hf_asynclm.bench.latency_model.ideal_schedule`
over the measured ``G`` and ``E`` (and the task's dependencies), plus the measured time to
first token and answer, with zero system overhead: no dispatch delay, no wake-up delay, no
trap tokens, nothing between tokens but the tokens. Whatever else the model wrote (blocks that
never ran: malformed, unfinished, or calls the executor refused) is model time too: it joins the
ideal as one more piece of writing that starts nothing (the plain loop: with the answer; the
runtime's modes: a call that runs in no time, which async may write while other calls run), so
a model that writes junk is not charged for it as system overhead. ``efficiency = ideal / measured``. A
stricter variant (``efficiency_model``) counts only forward-pass time as model time: the
per-token work of the decode loop (logits processors, sampling, CML monitor, streamers)
then counts as overhead too.

Example (a tiny random model, emulated 2 ms per token, two tasks of the mini BFCL fixture):

```python
>>> from hf_asynclm.bench.latency import LatencyConfig, load_bench_model, run_latency
>>> bm = load_bench_model("random")
>>> cfg = LatencyConfig(workload="bfcl-parallel", n=1, tpot_ms=2, ttft_ms=10, latency_scale=0.05,
...                     data_dir="tests/data/bfcl_mini", warmup=False, threads=1)
>>> report = run_latency(cfg, bm)
>>> sorted(report["tasks"][0]["modes"]) == sorted(["sync", "sync-cached", "sync-parallel", "async"])
True

```
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import gc
import logging
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..emulation import _cache_length
from ..cml import Block, BlockOpened, format_error, format_interrupt, marker_token_ids, serialize_result
from ..data.tasks import PlannedCall, Task
from .latency_model import SimCall, ideal_schedule
from .oracle import OraclePolicy
from .tools import ToolSet, validate_task_calls

logger = logging.getLogger(__name__)

__all__ = [
    "WORKLOADS",
    "BENCH_MODES",
    "POLICIES",
    "PAPER_FIGURES",
    "LatencyConfig",
    "BenchModel",
    "load_bench_model",
    "synchronize",
    "device_name",
    "load_workload",
    "run_latency",
    "summarize",
    "analyse_run",
    "RunTrace",
    "CallTiming",
    "median_task",
    "forward_clock",
    "torch_threads",
]

#: Workloads of ``bench latency``.
WORKLOADS: tuple[str, ...] = ("bfcl-parallel", "bfcl-multistep-parallel", "synthetic")
#: Modes, in the order they are reported.
BENCH_MODES: tuple[str, ...] = ("sync", "sync-cached", "sync-parallel", "async")
#: Policies.
POLICIES: tuple[str, ...] = ("oracle", "model")
#: The runtime mode behind each benchmark mode (``sync`` is the plain transformers loop).
RUNTIME_MODE = {"sync": "sync", "sync-cached": "sync", "sync-parallel": "sync-parallel", "async": "async"}

#: The paper's figures (AsyncLM, arXiv 2412.07017, section 6) and their conditions.
PAPER_FIGURES: dict[str, dict[str, Any]] = {
    "bfcl-parallel/local": {
        "speedup": 1.6,
        "over": "sync",
        "conditions": "BFCL parallel + live parallel; Llama on local GPUs (59 ms TTFT measured), 5 ms/token; tool latency 30-500 ms, mean 110 ms",
    },
    "bfcl-parallel/cloud": {
        "speedup": 2.1,
        "over": "sync",
        "conditions": "BFCL parallel + live parallel; GPT-4o API emulated: 310 ms TTFT, 5 ms/token; tool latency 30-500 ms, mean 110 ms",
    },
    "bfcl-multistep-parallel": {
        "speedup": 5.4,
        "over": "sync",
        "conditions": "three joined first-turn chains of BFCL multi_turn_base (1-5 dependent calls each); 'up to' 5.4x",
    },
}


# ---------------------------------------------------------------------------------------------
# Configuration, model, workloads
# ---------------------------------------------------------------------------------------------


@dataclass
class LatencyConfig:
    """Settings of one latency benchmark run (one workload, one decode-speed condition).

    Attributes:
        workload: one of :data:`WORKLOADS`.
        n: number of tasks.
        seed: task sampling and tool latency seed.
        split: ``eval`` (held out from training, the default), ``train`` or ``all``.
        split_seed: seed of the train/eval split (the one the training data used).
        policy: ``oracle`` or ``model``.
        modes: modes to run (default all of :data:`BENCH_MODES`).
        tpot_ms / ttft_ms: emulated decode speed (both None: the real model's speed).
        latency_scale: multiply every tool latency (1.0: the paper's 30-500 ms).
        max_new_tokens: generation budget of the ``model`` policy (the oracle sizes its own).
        data_dir: BFCL data folder (default: the installed ``bfcl-eval``).
        warmup: run the first task once in every mode, unrecorded, before measuring.
        answer: the oracle's answer text.
        threads: torch CPU threads during the run (None: leave as is). Tiny models on a
            shared CPU run fastest, and steadiest, with 1.
    """

    workload: str = "bfcl-parallel"
    n: int = 20
    seed: int = 0
    split: str = "eval"
    split_seed: int = 0
    policy: str = "oracle"
    modes: tuple[str, ...] = BENCH_MODES
    tpot_ms: float | None = None
    ttft_ms: float | None = None
    latency_scale: float = 1.0
    max_new_tokens: int = 512
    data_dir: str | None = None
    warmup: bool = True
    answer: str = " Done."
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise ValueError(f"unknown workload {self.workload!r}; choose from {', '.join(WORKLOADS)}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose from {', '.join(POLICIES)}")
        bad = [m for m in self.modes if m not in BENCH_MODES]
        if bad or not self.modes:
            raise ValueError(f"unknown modes {bad}; choose from {', '.join(BENCH_MODES)}")
        self.modes = tuple(m for m in BENCH_MODES if m in self.modes)
        if self.n < 1:
            raise ValueError("n must be at least 1")
        if self.split not in ("eval", "train", "all"):
            raise ValueError("split must be eval, train or all")
        if (self.tpot_ms is None) != (self.ttft_ms is None):
            raise ValueError("emulation needs both tpot_ms and ttft_ms")
        if self.tpot_ms is not None and (self.tpot_ms < 0 or self.ttft_ms < 0):  # type: ignore[operator]
            raise ValueError("emulated times must be non-negative")
        if self.latency_scale <= 0:
            raise ValueError("latency_scale must be positive")

    @property
    def emulated(self) -> bool:
        return self.tpot_ms is not None

    @property
    def condition(self) -> str:
        """A short label of the decode speed: ``emulated 5ms/tok 59ms TTFT`` or ``real``."""
        if not self.emulated:
            return "real decode"
        return f"emulated {self.tpot_ms:g} ms/token, {self.ttft_ms:g} ms/request"

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads (None: unchanged), then restore."""
    if n is None:
        yield
        return
    if n < 1:
        raise ValueError("threads must be at least 1")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the work queued on ``device`` (a no-op on a CPU).

    A CUDA forward pass returns before its kernels finish; the benchmarks call this before
    they read a clock, so that a time measured on a GPU is the time the work took.
    """
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


#: Llama 3.2 1B's shape (``config.json`` of ``meta-llama/Llama-3.2-1B``), for ``--model random-llama-1b``.
LLAMA_3_2_1B_SHAPE: dict[str, Any] = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


@dataclass
class BenchModel:
    """A model and tokenizer for the benchmarks, with a label saying which one it is."""

    model: Any
    tokenizer: Any
    label: str
    path: str | None = None
    notes: list[str] = field(default_factory=list)
    interrupt_at: str = "token"
    random_spec: str = "tiny-random"
    plan_layout: str = "call-first"  # how cheat-sheet plans are written for it (the checkpoint's record)

    @property
    def name(self) -> str:
        """Short name for file names and tables: the checkpoint's folder or repo name, else the random
        model's spec (``tiny-random``, ``random-llama-1b``)."""
        return Path(self.path.rstrip("/\\")).name if self.path else self.random_spec


def load_bench_model(spec: str | None = None, device: str | torch.device | None = None) -> BenchModel:
    """The benchmark model, on ``device`` (default: the CPU).

    ``None`` / ``"default"``: the shipped ``cml-tiny`` checkpoint when present, else a tiny
    random Llama (said in the label); ``"random"``: the tiny random Llama with the test
    tokenizer; ``"random-llama-1b"``: a Llama with Llama 3.2 1B's layers and random weights
    (the test tokenizer's vocabulary; bfloat16 on a GPU), for real decode times of a 1B model
    under the oracle policy, which needs no trained weights; anything else: a checkpoint folder
    or Hub id (:meth:`AsyncLM.from_pretrained`). A tokenizer without a chat template gets the CML
    template (noted).
    """
    from ..asynclm import DEFAULT_CHECKPOINT, AsyncLM, check_device
    from ..prompting import CML_CHAT_TEMPLATE

    notes: list[str] = []
    interrupt_at, plan_layout = "token", "call-first"
    target = check_device(device) if device is not None else torch.device("cpu")
    if spec in (None, "", "default"):
        if (DEFAULT_CHECKPOINT / "config.json").exists():
            spec = str(DEFAULT_CHECKPOINT)
        else:
            spec = "random"
            notes.append(f"the shipped checkpoint is missing from {DEFAULT_CHECKPOINT}: a tiny random Llama stands in")
    if spec in ("random", "tiny-random", "random-llama-1b"):
        from ..testing import tiny_llama, tiny_tokenizer

        tok = tiny_tokenizer()
        if spec == "random-llama-1b":
            with target:  # initialised where it runs: a billion random numbers are slow to make on a CPU
                model = tiny_llama(tok, max_position_embeddings=16384, **LLAMA_3_2_1B_SHAPE)
            if target.type != "cpu":
                model = model.to(torch.bfloat16)
            n_params = sum(p.numel() for p in model.parameters())
            cfg = model.config
            label = (f"random Llama of Llama 3.2 1B's shape ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {n_params / 1e9:.2f}B parameters, "
                     f"{str(model.dtype).replace('torch.', '')}; test tokenizer, {len(tok)} tokens)")
        else:
            model = tiny_llama(tok, max_position_embeddings=16384)
            label = "tiny random Llama (hf_asynclm.testing.tiny_llama, 2 layers, hidden 32; test tokenizer, 400 tokens)"
        model = model.to(target)
        path = None
    else:
        alm = AsyncLM.from_pretrained(spec, device=device)
        model, tok, interrupt_at, plan_layout = alm.model, alm.tokenizer, alm.interrupt_at, alm.plan_layout
        n_params = sum(p.numel() for p in model.parameters())
        label, path = f"{Path(str(spec)).name} ({type(model).__name__}, {n_params / 1e6:.1f}M parameters, vocabulary {len(tok)})", str(spec)
    if target.type != "cpu":
        label += f", on {device_name(target)}"
    if not getattr(tok, "chat_template", None):
        tok.chat_template = CML_CHAT_TEMPLATE
        notes.append("the tokenizer had no chat template: the CML chat template was set")
    if not marker_token_ids(tok).single_token:
        notes.append("CML markers are not single tokens in this tokenizer: the sync baseline stops on the string [END]")
    model.eval()
    random_spec = "random-llama-1b" if spec == "random-llama-1b" else "tiny-random"
    return BenchModel(model, tok, label, path, notes, interrupt_at, random_spec, plan_layout)


def device_name(device: torch.device | str) -> str:
    """``cuda:0 (NVIDIA H200)`` for a GPU, else the device's own name."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _sample(tasks: list[Task], n: int, seed: int, tag: str) -> list[Task]:
    rng = random.Random(f"bench:{tag}:{seed}")
    order = list(range(len(tasks)))
    rng.shuffle(order)
    return [tasks[i] for i in order[:n]]


def load_workload(
    name: str,
    n: int,
    seed: int = 0,
    *,
    split: str = "eval",
    split_seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
) -> tuple[list[Task], dict[str, Any]]:
    """``n`` tasks of a workload and a description of how they were drawn.

    * ``bfcl-parallel``: BFCL ``parallel`` + ``live_parallel`` (tasks of 2+ calls);
    * ``bfcl-multistep-parallel``: :func:`~hf_asynclm.data.bfcl.multistep_parallel_tasks`
      over ``multi_turn_base``;
    * ``synthetic``: :func:`~hf_asynclm.data.synthetic.generate_tasks` (shapes parallel,
      chain, mixed; the values of the ``eval`` half unless ``split="train"``).

    BFCL tasks come from the ``split`` side of :func:`~hf_asynclm.data.bfcl.split` with
    ``split_seed`` (the eval side, 75 %, plus the held-out ``live_*`` categories, is what
    training never saw); tasks whose ground truth breaks its own schema are left out.
    """
    info: dict[str, Any] = {"workload": name, "split": split, "split_seed": split_seed}
    if name == "synthetic":
        from ..data.synthetic import generate_tasks

        syn_split = "train" if split == "train" else "eval"
        tasks = generate_tasks(n, seed=seed, shapes=["parallel", "chain", "mixed"], split=syn_split)
        info["source"] = f"hf_asynclm.data.synthetic.generate_tasks(shapes=parallel,chain,mixed, split={syn_split})"
        return tasks, info
    from ..data import bfcl

    def side(tasks: list[Task]) -> list[Task]:
        if split == "all":
            return tasks
        train, ev = bfcl.split(tasks, seed=split_seed)
        return ev if split == "eval" else train

    skipped: dict[str, str] = {}
    if name == "bfcl-parallel":
        pool: list[Task] = []
        for cat in ("parallel", "live_parallel"):
            if cat not in bfcl.available_categories(data_dir):
                logger.warning("BFCL category %s missing; skipped", cat)
                continue
            pool += side(bfcl.load_tasks(cat, data_dir))
        ok = []
        for t in pool:
            why = validate_task_calls(t) if len(t.calls) >= 2 else "fewer than 2 calls"
            if why is None:
                ok.append(t)
            else:
                skipped[t.task_id] = why
        tasks = _sample(ok, n, seed, name)
        info["source"] = "BFCL parallel + live_parallel"
    elif name == "bfcl-multistep-parallel":
        chains = side(bfcl.load_tasks("multi_turn_base", data_dir))
        good = []
        for t in chains:
            why = validate_task_calls(t)
            if why is None:
                good.append(t)
            else:
                skipped[t.task_id] = why
        tasks = bfcl.multistep_parallel_tasks(n, seed, pool=good)
        info["source"] = "BFCL multi_turn_base, 3 first-turn chains (1-5 calls) per task"
    else:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    info["skipped_invalid"] = len(skipped)
    if skipped:
        info["skipped_examples"] = dict(list(skipped.items())[:5])
    return tasks, info


def _toolset(task: Task, config: "LatencyConfig") -> ToolSet:
    synthetic = task.source == "synthetic"
    return ToolSet(task, seed=config.seed, latency_scale=config.latency_scale, result_fn=_result_fn(task), latency_from_schema=synthetic)


def _result_fn(task: Task) -> Callable[[str, dict[str, Any]], Any] | None:
    if task.source != "synthetic":
        return None
    from ..data.synthetic import tool_result

    def result(name: str, arguments: dict[str, Any]) -> Any:
        return tool_result(PlannedCall("x", name, arguments))

    return result


# ---------------------------------------------------------------------------------------------
# Instrumentation
# ---------------------------------------------------------------------------------------------


class _StepClock:
    """A logits processor that timestamps every step (and runs the policy, if any)."""

    def __init__(self, policy: Any | None = None) -> None:
        self.policy = policy
        self.enter: list[float] = []
        self.exit: list[float] = []
        self.lengths: list[int] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.enter.append(time.monotonic())
        self.lengths.append(int(input_ids.shape[-1]))
        if self.policy is not None:
            scores = self.policy(input_ids, scores)
        self.exit.append(time.monotonic())
        return scores


@contextlib.contextmanager
def forward_clock(model: Any) -> Iterator[list[tuple[float, float, int, bool]]]:
    """Record ``(start, end, input tokens, prefill)`` of every forward pass of ``model`` in the block.

    Wraps the current ``forward`` (an emulation wrapper included) with ``functools.wraps``,
    so ``generate`` and the cache driver still see the real signature.
    """
    records: list[tuple[float, float, int, bool]] = []
    original = model.forward
    device = getattr(model, "device", torch.device("cpu"))
    on_gpu = device.type == "cuda"

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        prefill = _cache_length((), kwargs) == 0
        ids = kwargs.get("input_ids", args[0] if args else None)
        n = int(ids.shape[-1]) if ids is not None else 1
        t0 = time.monotonic()
        out = original(*args, **kwargs)
        if on_gpu:
            synchronize(device)  # the pass has run when its end is read
        records.append((t0, time.monotonic(), n, prefill))
        return out

    had_instance_forward = "forward" in vars(model)
    model.forward = forward
    try:
        yield records
    finally:
        if had_instance_forward:
            model.forward = original
        else:
            del model.forward


@dataclass
class CallTiming:
    """One call as it ran."""

    call_id: str | None
    name: str | None
    arguments: dict[str, Any] | None
    body: str
    status: str
    submitted: float | None
    started: float | None
    finished: float | None
    error: str | None = None


@dataclass
class RunTrace:
    """Raw measurements of one task in one mode."""

    mode: str
    t_start: float
    t_end: float
    request_starts: list[float]
    enter: list[float]
    exit: list[float]
    lengths: list[int]
    forwards: list[tuple[float, float, int, bool]]
    sequence: list[int]
    prompt_len: int
    waits: list[tuple[float, float, str]]
    calls: list[CallTiming]
    injected_tokens: int = 0
    stop_reason: str = ""
    policy_log: list[Any] = field(default_factory=list)
    emitted: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    malformed: int = 0
    text: str = ""
    injections: list[tuple[float, str, bool]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Running one task in one mode
# ---------------------------------------------------------------------------------------------


def _gen_kwargs(tokenizer: Any, max_new_tokens: int) -> dict[str, Any]:
    return {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    }


def run_asynclm(
    bm: BenchModel,
    messages: list[dict[str, Any]],
    toolset: ToolSet,
    mode: str,
    policy: Any | None,
    max_new_tokens: int,
    records: list[tuple[float, float, int, bool]],
) -> RunTrace:
    """One generation with :class:`~hf_asynclm.asynclm.AsyncLM` in ``sync-cached`` / ``sync-parallel`` / ``async`` mode."""
    from transformers import LogitsProcessorList

    from ..asynclm import AsyncLM

    # the model decides: the injection rule its checkpoint records; the oracle: the paper's rule
    interrupt_at = bm.interrupt_at if policy is None else "token"
    alm = AsyncLM(
        bm.model, bm.tokenizer, tools=toolset.registry(asynchronous=True), call_timeout_s=60, trap_timeout_s=60, interrupt_at=interrupt_at
    )
    clock = _StepClock(policy)
    waits: list[tuple[float, float, str]] = []
    records.clear()
    gc.collect()
    t_start = time.monotonic()
    inputs = alm.encode_prompt(messages)
    session = alm.new_session(RUNTIME_MODE[mode])  # type: ignore[arg-type]
    _instrument_waits(session, waits)
    bm.model.generate(
        **inputs,
        custom_generate=alm.custom_generate,
        asynclm_session=session,
        logits_processor=LogitsProcessorList([clock]),
        **_gen_kwargs(bm.tokenizer, max_new_tokens),
    )
    result = alm.result_of(session)
    t_end = time.monotonic()
    calls = [
        CallTiming(r.call_id, r.name, r.arguments, r.body, r.status, r.submitted_at, r.started_at, r.finished_at, r.error)
        for r in result.calls
    ]
    emitted = [(r.name, dict(r.arguments or {})) for r in result.calls if r.name is not None]
    injections = [(e.time, e.call_id or "", bool(e.data.get("is_error"))) for e in result.timeline if e.kind == "interrupt"]
    return RunTrace(
        mode=mode,
        t_start=t_start,
        t_end=t_end,
        request_starts=[t_start],
        enter=clock.enter,
        exit=clock.exit,
        lengths=clock.lengths,
        forwards=list(records),
        sequence=result.sequences[0].tolist(),
        prompt_len=result.prompt_length,
        waits=waits,
        calls=calls,
        injected_tokens=result.stats.injected_tokens,
        stop_reason=result.stats.stop_reason,
        policy_log=list(getattr(policy, "log", [])),
        emitted=emitted,
        malformed=len(result.malformed),
        text=result.text,
        injections=injections,
    )


def _instrument_waits(session: Any, waits: list[tuple[float, float, str]]) -> None:
    """Record when the decode loop is blocked (traps, sync waits): benchmark bookkeeping only."""
    trap = session.trap
    wait_call = session._wait_call

    def timed_trap(driver: Any, reason: str = "trap") -> None:
        t0 = time.monotonic()
        try:
            trap(driver, reason)
        finally:
            waits.append((t0, time.monotonic(), f"trap:{reason}"))

    def timed_wait_call(record: Any) -> None:
        t0 = time.monotonic()
        try:
            wait_call(record)
        finally:
            waits.append((t0, time.monotonic(), "sync"))

    session.trap = timed_trap
    session._wait_call = timed_wait_call


def run_sync_baseline(
    bm: BenchModel,
    messages: list[dict[str, Any]],
    toolset: ToolSet,
    policy: Any | None,
    max_new_tokens: int,
    records: list[tuple[float, float, int, bool]],
    max_requests: int | None = None,
) -> RunTrace:
    """The plain transformers loop: generate to ``[END]``, run the call, append its result, generate again."""
    from transformers import LogitsProcessorList

    from ..asynclm import AsyncLM
    from ..cml import CMLParser
    from ..executor.parsing import ArgumentError, CallParseError, bind_arguments, parse_call
    from ..executor.registry import ToolRegistry, UnknownToolError

    tok = bm.tokenizer
    model = bm.model
    markers = marker_token_ids(tok)
    registry: ToolRegistry = toolset.registry(asynchronous=False)
    alm = AsyncLM(model, tok, tools=registry)  # only to build the same prompt
    clock = _StepClock(policy)
    stop: dict[str, Any]
    if markers.end is not None:
        eos = model.generation_config.eos_token_id
        eos_list = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
        if tok.eos_token_id is not None and tok.eos_token_id not in eos_list:
            eos_list.append(tok.eos_token_id)
        stop = {"eos_token_id": eos_list + [markers.end]}
    else:
        stop = {"stop_strings": "[END]", "tokenizer": tok}
    eos_ids = {tok.eos_token_id} | set(stop.get("eos_token_id", []))
    eos_ids.discard(markers.end)
    waits: list[tuple[float, float, str]] = []
    calls: list[CallTiming] = []
    emitted: list[tuple[str, dict[str, Any]]] = []
    request_starts: list[float] = []
    records.clear()
    max_requests = max_requests or 4 * max(1, len(toolset.task.calls)) + 8
    gc.collect()
    t_start = time.monotonic()
    ids = alm.encode_prompt(messages)["input_ids"]
    prompt_len = int(ids.shape[1])
    generated = 0
    injected = 0
    malformed = 0
    stop_reason = "max_requests"
    parser = CMLParser()
    used_ids: set[str] = set()
    injections: list[tuple[float, str, bool]] = []
    while len(request_starts) < max_requests:
        request_starts.append(time.monotonic() if request_starts else t_start)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            logits_processor=LogitsProcessorList([clock]),
            **{**_gen_kwargs(tok, max_new_tokens - generated), **stop},
        )
        new = out[0, ids.shape[1] :].tolist()
        ids = out
        generated += len(new)
        if not new:
            stop_reason = "empty"
            break
        if new[-1] in eos_ids:
            stop_reason = "eos"
            break
        if generated >= max_new_tokens:
            stop_reason = "max_new_tokens"
            break
        blocks = [e for e in parser.feed(tok.decode(new, skip_special_tokens=False)) if isinstance(e, Block)]
        for block in blocks:
            if block.kind == "malformed":
                malformed += 1
        call = next((b for b in reversed(blocks) if b.kind == "call"), None)
        if call is None or (blocks and blocks[-1] is not call):
            continue  # a trap or something else: nothing to run, generate on
        submitted = time.monotonic()
        record = CallTiming(call.call_id, None, None, call.body, "error", submitted, None, None)
        calls.append(record)
        try:
            parsed = parse_call(call.body)
            record.name = parsed.name
            tool = registry.get(parsed.name)
            kwargs = bind_arguments(parsed, tool, known_ids=used_ids)
            record.arguments = kwargs
            emitted.append((parsed.name, dict(kwargs)))
            record.started = time.monotonic()
            value = tool.handler(**kwargs)
            text = serialize_result(value, 4096)
            record.status = "done"
        except (CallParseError, UnknownToolError, ArgumentError) as exc:
            text = format_error(type(exc).__name__, str(exc))
            record.error = text
        except Exception as exc:  # the tool raised
            text = format_error(type(exc).__name__, str(exc))
            record.error = text
        record.finished = time.monotonic()
        if record.started is not None:
            waits.append((record.started, record.finished, "tool"))
        if call.call_id:
            used_ids.add(call.call_id)
        extra = tok.encode(format_interrupt(call.call_id or "error", " ".join(text.splitlines())), add_special_tokens=False)
        injected += len(extra)
        ids = torch.cat([ids, torch.tensor([extra], dtype=ids.dtype, device=ids.device)], dim=-1)
        injections.append((time.monotonic(), call.call_id or "error", record.status != "done"))
    text_out = tok.decode(ids[0, prompt_len:], skip_special_tokens=True)
    t_end = time.monotonic()
    return RunTrace(
        mode="sync",
        t_start=t_start,
        t_end=t_end,
        request_starts=request_starts,
        enter=clock.enter,
        exit=clock.exit,
        lengths=clock.lengths,
        forwards=list(records),
        sequence=ids[0].tolist(),
        prompt_len=prompt_len,
        waits=waits,
        calls=calls,
        injected_tokens=injected,
        stop_reason=stop_reason,
        policy_log=list(getattr(policy, "log", [])),
        emitted=emitted,
        malformed=malformed,
        text=text_out,
        injections=injections,
    )


# ---------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------


def _overlap(a: float, b: float, intervals: Sequence[tuple[float, float, str]]) -> float:
    total = 0.0
    for s, e, _ in intervals:
        lo, hi = max(a, s), min(b, e)
        if hi > lo:
            total += hi - lo
    return total


def _dispatch_ref(trace: RunTrace, end_t: float) -> float:
    """When a call written at ``end_t`` should start: at once, except in ``sync-parallel``,
    where calls start at the next trap (the time that trap began)."""
    if trace.mode != "sync-parallel":
        return end_t
    later = [s for s, _, kind in trace.waits if s >= end_t and kind.startswith("trap")]
    return min(later) if later else end_t


def _segment(trace: RunTrace, tokenizer: Any) -> tuple[list[str], list[dict[str, Any]]]:
    """Classify each step's token: ``call`` / ``trap`` / ``malformed`` block, or ``text``."""
    from ..monitor import CMLMonitor

    markers = marker_token_ids(tokenizer)
    mon = CMLMonitor(tokenizer, mask_text_intr=False)
    eos_id = tokenizer.eos_token_id
    seq = trace.sequence
    classes = ["text"] * len(trace.lengths)
    blocks: list[dict[str, Any]] = []
    cur: list[int] = []
    prev_len: int | None = None
    for k, pos in enumerate(trace.lengths):
        tid = seq[pos] if pos < len(seq) else eos_id
        if prev_len is not None and pos != prev_len + 1:
            mon.reset_context()
        prev_len = pos
        if tid == eos_id or (markers.intr is not None and tid == markers.intr):
            # EOS, or a token the runtime dropped (an EOS while results were owed, or a word start
            # with interrupts waiting under interrupt_at="word"): an interrupt sits there
            classes[k] = "eos"
            if tid != eos_id:
                prev_len = None
            continue
        in_before = mon.in_block
        events = mon.feed_token(tid)
        assigned = False
        if in_before:
            cur.append(k)
            assigned = True
        for ev in events:
            if isinstance(ev, BlockOpened):
                cur = [k]
                assigned = True
            elif isinstance(ev, Block):
                if not assigned:
                    cur.append(k)
                    assigned = True
                blocks.append({"kind": ev.kind, "call_id": ev.call_id, "body": ev.body, "steps": list(cur)})
                for j in cur:
                    classes[j] = ev.kind
                cur = []
        if not assigned:
            classes[k] = "text"
        elif mon.in_block:
            classes[k] = "open"
    for j in cur:
        classes[j] = "malformed"
    return classes, blocks


def _pct(values: Sequence[float], q: float) -> float:
    vals = sorted(v for v in values if v is not None and not math.isnan(v))
    if not vals:
        return math.nan
    if len(vals) == 1:
        return vals[0]
    pos = (len(vals) - 1) * q
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def _stats(values: Sequence[float]) -> dict[str, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"n": 0, "median": math.nan, "p10": math.nan, "p90": math.nan, "min": math.nan, "max": math.nan, "mean": math.nan}
    return {
        "n": len(vals),
        "median": statistics.median(vals),
        "p10": _pct(vals, 0.1),
        "p90": _pct(vals, 0.9),
        "min": min(vals),
        "max": max(vals),
        "mean": statistics.fmean(vals),
    }


#: Id of the pseudo-call that stands for writing that started nothing (see the module docstring).
UNRUN_WRITING = "(unrun writing)"


def _ideal(mode: str, sims: list[SimCall], requests: list[float], answer_s: float, unrun_s: float = 0.0) -> float:
    return _ideal_schedule(mode, sims, requests, answer_s, unrun_s)[0]


def _ideal_schedule(mode: str, sims: list[SimCall], requests: list[float], answer_s: float, unrun_s: float = 0.0) -> tuple[float, list[str]]:
    """Ideal latency of ``mode``'s schedule and the order it writes the calls in.

    ``unrun_s``: time the model spent writing blocks that started nothing; serial writing like
    the answer (sync) or a call that runs in no time (the other modes; async may write it while
    other calls run).
    """
    if not requests:
        return math.nan, []
    if mode == "sync":  # the plain loop: every request pays its time to first token
        overhead = statistics.fmean(requests)
        sched = ideal_schedule(sims, "sync", request_overhead_s=overhead, answer_s=answer_s + unrun_s)
        # a block that started nothing still ended a request (its error went back as a result):
        # the requests beyond one per call that ran, plus the first, are the model's doing too
        extra = max(0, len(requests) - len(sims) - 1) if unrun_s > 0 else 0
        return sched.total_s + extra * overhead, sched.write_order
    if unrun_s > 0:
        sims = [*sims, SimCall(UNRUN_WRITING, unrun_s, 0.0)]
    sched = ideal_schedule(sims, RUNTIME_MODE[mode], answer_s=answer_s)
    return sched.total_s + requests[0], [c for c in sched.write_order if c != UNRUN_WRITING]


def analyse_run(trace: RunTrace, task: Task, tokenizer: Any, tpot_ms: float | None = None, ttft_ms: float | None = None) -> dict[str, Any]:
    """Metrics of one run: latency, per-call G / E / dispatch, the ideal latency and efficiency."""
    markers = marker_token_ids(tokenizer)
    K = len(trace.enter)
    classes, blocks = _segment(trace, tokenizer)
    # request of each step, and step durations on the timeline (pauses excluded)
    req_idx: list[int] = []
    r = 0
    for t in trace.enter:
        while r + 1 < len(trace.request_starts) and trace.request_starts[r + 1] <= t:
            r += 1
        req_idx.append(r)
    first = [k == 0 or req_idx[k] != req_idx[k - 1] for k in range(K)]
    dur: list[float] = []
    for k in range(K):
        prev = trace.request_starts[req_idx[k]] if first[k] else trace.enter[k - 1]
        dur.append(max(0.0, trace.enter[k] - prev - _overlap(prev, trace.enter[k], trace.waits)))
    aligned = len(trace.forwards) == K
    fwd = [f[1] - f[0] for f in trace.forwards] if aligned else [math.nan] * K
    if not aligned:
        logger.debug("%s: %d forward passes for %d steps: model-time metrics unavailable", trace.mode, len(trace.forwards), K)

    def total(steps: Sequence[int], values: Sequence[float]) -> float:
        return float(sum(values[k] for k in steps if not first[k]))

    # calls
    plan = {c.call_id: c for c in task.calls}
    block_of: dict[str, list[dict[str, Any]]] = {}  # id -> its call blocks in writing order (ids may repeat)
    for b in blocks:
        if b["kind"] == "call" and b["call_id"]:
            block_of.setdefault(b["call_id"], []).append(b)
    seq = trace.sequence
    call_rows = []
    sims_tl: list[SimCall] = []
    sims_model: list[SimCall] = []
    sims_nominal: list[SimCall] = []
    ran = [c for c in trace.calls if c.started is not None and c.finished is not None and c.call_id]
    ran_ids = {c.call_id for c in ran}
    ran_steps: set[int] = set()  # steps that wrote a call that ran
    seen_ids: dict[str, int] = {}
    for c in trace.calls:
        same_id = block_of.get(c.call_id or "")
        b = same_id.pop(0) if same_id else None
        steps = b["steps"] if b else []
        g_tl = total(steps, dur)
        g_model = total(steps, fwd)
        n_tok = len(steps)
        body_tok = 0
        if b and markers.head is not None:
            toks = [seq[trace.lengths[k]] for k in steps if trace.lengths[k] < len(seq)]
            if markers.head in toks:
                body_tok = max(0, len(toks) - toks.index(markers.head) - 2)
        end_t = trace.exit[steps[-1]] if steps else None
        e = (c.finished - c.started) if (c.started is not None and c.finished is not None) else None
        row = {
            "call_id": c.call_id,
            "name": c.name,
            "status": c.status,
            "tokens": n_tok,
            "body_tokens": body_tok,
            "G_s": g_tl,
            "G_model_s": g_model,
            "E_s": e,
            "write_start": (trace.enter[steps[0] - 1] if steps and steps[0] > 0 else trace.t_start) - trace.t_start if steps else None,
            "write_end": end_t - trace.t_start if end_t is not None else None,
            "submitted": c.submitted - trace.t_start if c.submitted is not None else None,
            "started": c.started - trace.t_start if c.started is not None else None,
            "finished": c.finished - trace.t_start if c.finished is not None else None,
            "dispatch_s": (c.started - _dispatch_ref(trace, end_t)) if (c.started is not None and end_t is not None) else None,
            "error": c.error,
        }
        call_rows.append(row)
        if c.call_id in ran_ids and e is not None:
            ran_steps.update(steps)
            p = plan.get(c.call_id)  # type: ignore[arg-type]
            deps = tuple(d for d in (p.depends_on if p is not None and p.name == c.name else []) if d in ran_ids)
            # a model may reuse an id across requests of the plain loop (nothing stops it there):
            # each call that ran still counts, under a distinct name
            seen_ids[c.call_id] = seen_ids.get(c.call_id, 0) + 1  # type: ignore[index]
            sim_id = c.call_id if seen_ids[c.call_id] == 1 else f"{c.call_id}#{seen_ids[c.call_id]}"  # type: ignore[index]
            sims_tl.append(SimCall(sim_id, g_tl, e, deps))  # type: ignore[arg-type]
            sims_model.append(SimCall(sim_id, g_model if not math.isnan(g_model) else 0.0, e, deps))  # type: ignore[arg-type]
            if tpot_ms is not None:
                n_nf = sum(1 for k in steps if not first[k])
                sims_nominal.append(SimCall(sim_id, n_nf * tpot_ms / 1000.0, e, deps))  # type: ignore[arg-type]

    text_steps = [k for k in range(K) if classes[k] in ("text", "eos")]
    trap_steps = [k for k in range(K) if classes[k] == "trap"]
    unrun_steps = [k for k in range(K) if classes[k] not in ("text", "eos", "trap") and k not in ran_steps]
    req_tl = [dur[k] for k in range(K) if first[k]]
    req_model = [fwd[k] for k in range(K) if first[k]]
    answer_tl = total(text_steps, dur)
    answer_model = total(text_steps, fwd)
    latency = trace.t_end - trace.t_start
    unrun_tl = total(unrun_steps, dur)
    ideal_tl, ideal_order = _ideal_schedule(trace.mode, sims_tl, req_tl, answer_tl, unrun_tl)
    ideal_model = _ideal(trace.mode, sims_model, req_model, answer_model, total(unrun_steps, fwd)) if aligned else math.nan
    ideal_nominal = math.nan
    if tpot_ms is not None and ttft_ms is not None:
        n_answer = sum(1 for k in text_steps if not first[k])
        n_unrun = sum(1 for k in unrun_steps if not first[k])
        ideal_nominal = _ideal(
            trace.mode, sims_nominal, [ttft_ms / 1000.0] * max(1, len(req_tl)), n_answer * tpot_ms / 1000.0, n_unrun * tpot_ms / 1000.0
        )

    # where the rest goes
    waits_s = sum(e - s for s, e, _ in trace.waits)
    wake = 0.0
    finishes = [c.finished for c in trace.calls if c.finished is not None]
    for s, e, _ in trace.waits:
        inside = [f for f in finishes if s <= f <= e]
        if inside:
            wake += e - max(inside)
    non_first = [k for k in range(K) if not first[k]]
    loop_s = sum(dur[k] - fwd[k] for k in non_first) if aligned else math.nan
    gen = [k for k in range(K)]
    call_tokens = sum(r["tokens"] for r in call_rows)
    body_tokens = sum(r["body_tokens"] for r in call_rows)
    trap_tokens = len(trap_steps)
    dispatch = [r["dispatch_s"] for r in call_rows if r["dispatch_s"] is not None]
    return {
        "mode": trace.mode,
        "latency_s": latency,
        "ideal_s": ideal_tl,
        "efficiency": ideal_tl / latency if latency > 0 else math.nan,
        "ideal_model_s": ideal_model,
        "efficiency_model": ideal_model / latency if latency > 0 and not math.isnan(ideal_model) else math.nan,
        "ideal_nominal_s": ideal_nominal,
        "efficiency_nominal": ideal_nominal / latency if latency > 0 and not math.isnan(ideal_nominal) else math.nan,
        "requests": len(trace.request_starts),
        "ttft_s": req_tl[0] if req_tl else math.nan,
        "request_overhead_s": statistics.fmean(req_tl) if req_tl else math.nan,
        "answer_s": answer_tl,
        "unrun_write_s": unrun_tl,
        "unrun_tokens": len(unrun_steps),
        "steps": K,
        "forward_passes": len(trace.forwards),
        "generated_tokens": len(gen),
        "injected_tokens": trace.injected_tokens,
        "call_tokens": call_tokens,
        "cml_tokens": call_tokens - body_tokens + trap_tokens,
        "trap_tokens": trap_tokens,
        "answer_tokens": len(text_steps),
        "trap_token_s": total(trap_steps, dur),
        "wait_s": waits_s,
        "wake_s": wake,
        "loop_s": loop_s,
        "loop_ms_per_step": (loop_s / len(non_first) * 1e3) if non_first and aligned else math.nan,
        "step_ms_median": statistics.median([dur[k] for k in non_first]) * 1e3 if non_first else math.nan,
        "forward_ms_median": statistics.median([fwd[k] for k in non_first]) * 1e3 if non_first and aligned else math.nan,
        "teardown_s": trace.t_end - trace.enter[-1] if K else math.nan,
        "dispatch_ms_median": statistics.median(dispatch) * 1e3 if dispatch else math.nan,
        "dispatch_ms_max": max(dispatch) * 1e3 if dispatch else math.nan,
        "calls": call_rows,
        "n_calls": len(ran),
        "errors": sum(1 for c in trace.calls if c.status != "done"),
        "malformed": trace.malformed,
        "stop_reason": trace.stop_reason,
        "write_order": [r["call_id"] for r in call_rows],
        # the simulated schedule writes the calls in the same order as the run did (False: a
        # near-tie of execution times or a late result made the simulation choose otherwise)
        "ideal_write_order": ideal_order,
        "ideal_order_matches": ideal_order == [r["call_id"] for r in call_rows if r["call_id"] in {s.call_id for s in sims_tl}],
        "policy_log": [list(x) if isinstance(x, tuple) else x for x in trace.policy_log],
        "timeline": _timeline(trace, classes, blocks, dur),
    }


def _timeline(trace: RunTrace, classes: list[str], blocks: list[dict[str, Any]], dur: list[float]) -> dict[str, Any]:
    """Compact segments for the timeline picture (times relative to the request)."""
    t0 = trace.t_start
    label_of: dict[int, str | None] = {}
    for b in blocks:
        for k in b["steps"]:
            label_of[k] = b["call_id"] if b["kind"] == "call" else None
    segs: list[list[Any]] = []
    for k in range(len(trace.enter)):
        end = trace.enter[k] - t0
        start = end - dur[k]
        kind = classes[k]
        if k == 0 or any(trace.enter[k - 1] < s <= trace.enter[k] for s in trace.request_starts[1:]):
            kind = "prefill"
        label = label_of.get(k) if kind == "call" else None
        if segs and segs[-1][2] == kind and segs[-1][3] == label and kind != "prefill" and abs(segs[-1][1] - start) < 2e-3:
            segs[-1][1] = end
            continue
        segs.append([start, end, kind, label])
    waits = [[s - t0, e - t0, kind] for s, e, kind in trace.waits]
    calls = [
        {"call_id": c.call_id, "name": c.name, "status": c.status, "submitted": c.submitted - t0 if c.submitted is not None else None,
         "started": c.started - t0, "finished": c.finished - t0}
        for c in trace.calls
        if c.started is not None and c.finished is not None
    ]
    injections = [[t - t0, cid, err] for t, cid, err in trace.injections]
    return {"segments": segs, "waits": waits, "calls": calls, "injections": injections, "total": trace.t_end - t0}


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def _messages(task: Task, policy: str, toolset: ToolSet, layout: str) -> list[dict[str, Any]]:
    if policy != "model":
        return task.messages
    from ..data.bfcl import with_cheat_sheet

    lat = {cid: round(s * 1000) for cid, s in toolset.planned_latencies().items()}
    return with_cheat_sheet(task, lat, layout=layout).messages


def run_task(
    bm: BenchModel,
    task: Task,
    config: LatencyConfig,
    records: list[tuple[float, float, int, bool]],
    order: Sequence[str] | None = None,
) -> dict[str, RunTrace]:
    """Run one task in every mode of ``config`` (in ``order``); return the raw traces."""
    toolset = _toolset(task, config)
    expected = toolset.planned_latencies()
    messages = _messages(task, config.policy, toolset, bm.plan_layout)
    out: dict[str, RunTrace] = {}
    for mode in order or config.modes:
        policy = None
        budget = config.max_new_tokens
        if config.policy == "oracle":
            policy = OraclePolicy(bm.tokenizer, task, RUNTIME_MODE[mode], expected, answer=config.answer)
            budget = policy.max_tokens()
        toolset.reset()
        if mode == "sync":
            out[mode] = run_sync_baseline(bm, messages, toolset, policy, budget, records)
        else:
            out[mode] = run_asynclm(bm, messages, toolset, mode, policy, budget, records)
    return out


def _environment(device: torch.device | str | None = None) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device_name(device) if device is not None else "cpu",
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except Exception:  # pragma: no cover
        pass
    try:
        env["loadavg_start"] = list(os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        pass
    return env


def model_context(model: Any) -> int | None:
    """Positions the model was built for (``max_position_embeddings``), or None when unknown."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def prompt_length(bm: BenchModel, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]]) -> int:
    """Tokens of the prompt the runtime builds for ``messages`` and ``tools`` (chat template included)."""
    from ..prompting import build_prompt

    return len(bm.tokenizer(build_prompt(bm.tokenizer, messages, tools), add_special_tokens=False)["input_ids"])


def beyond_context(bm: BenchModel, task: Task, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]], budget: int) -> dict[str, Any] | None:
    """``{"task_id", "prompt_tokens", "context"}`` when the prompt plus ``budget`` new tokens do not
    fit the model's context (beyond its positions a model writes noise, which a benchmark would
    score as the model's decision), else None (also when the context is unknown)."""
    context = model_context(bm.model)
    if context is None:
        return None
    n = prompt_length(bm, messages, tools)
    return {"task_id": task.task_id, "prompt_tokens": n, "context": context} if n + budget > context else None


def describe_left_out(left_out: Sequence[Mapping[str, Any]], budget: int = 0) -> str:
    """One phrase for :func:`beyond_context` records: ``"N task(s) left out: prompt (a-b tokens) +
    budget new tokens beyond the model's context of M positions"`` (``""`` for none)."""
    if not left_out:
        return ""
    sizes = sorted(x["prompt_tokens"] for x in left_out)
    extra = f" + {budget} new tokens" if budget else ""
    return (
        f"{len(left_out)} task(s) left out: prompt ({sizes[0]}-{sizes[-1]} tokens){extra} beyond "
        f"the model's context of {left_out[0]['context']} positions"
    )


def prompt_tokens(bm: BenchModel, task: Task, config: LatencyConfig) -> int:
    """Tokens of the prompt ``task`` gets in ``config`` (chat template, tools, cheat sheet)."""
    toolset = _toolset(task, config)
    return prompt_length(bm, _messages(task, config.policy, toolset, bm.plan_layout), toolset.registry().schemas())


def split_by_context(bm: BenchModel, tasks: Sequence[Task], config: LatencyConfig) -> tuple[list[Task], list[dict[str, Any]]]:
    """Tasks whose prompt plus the generation budget fit the model's context, and the others
    (:func:`beyond_context` records)."""
    budget = config.max_new_tokens if config.policy == "model" else 0
    keep, skipped = [], []
    for task in tasks:
        toolset = _toolset(task, config)
        out = beyond_context(bm, task, _messages(task, config.policy, toolset, bm.plan_layout), toolset.registry().schemas(), budget)
        if out is None:
            keep.append(task)
        else:
            skipped.append(out)
    return keep, skipped


def run_latency(
    config: LatencyConfig,
    bm: BenchModel | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    tasks: Sequence[Task] | None = None,
) -> dict[str, Any]:
    """Run the latency benchmark and return its report (a JSON-serialisable dict).

    Args:
        config: what to run.
        bm: the model (default :func:`load_bench_model`).
        progress: called as ``progress(done, total, task_id)`` after each task.
        tasks: run these tasks instead of loading ``config.workload``.
    """
    from ..emulation import emulate_speed

    bm = bm or load_bench_model()
    if tasks is None:
        tasks, info = load_workload(
            config.workload, config.n, config.seed, split=config.split, split_seed=config.split_seed, data_dir=config.data_dir
        )
    else:
        tasks, info = list(tasks), {"workload": config.workload, "source": "given"}
    if not tasks:
        raise ValueError(f"workload {config.workload!r} gave no tasks")
    tasks, skipped = split_by_context(bm, tasks, config)
    if skipped:
        message = describe_left_out(skipped, config.max_new_tokens if config.policy == "model" else 0)
        if not tasks:
            shortest = min(x["prompt_tokens"] for x in skipped)
            hint = "use a model with a longer context" if shortest >= skipped[0]["context"] else "lower --max-new-tokens or use a model with a longer context"
            raise ValueError(f"{message}: no task of {config.workload!r} left; {hint}")
        logger.warning(message)
    rows: list[dict[str, Any]] = []
    emu = emulate_speed(bm.model, config.tpot_ms, config.ttft_ms) if config.emulated else contextlib.nullcontext()
    gc.collect()
    gc.freeze()  # what is loaded now is never collected: collections between runs stay cheap
    with contextlib.ExitStack() as stack:
        stack.callback(gc.unfreeze)
        stack.enter_context(torch_threads(config.threads))
        stack.enter_context(torch.inference_mode())
        stack.enter_context(emu)
        records = stack.enter_context(forward_clock(bm.model))
        env = _environment(bm.model.device)
        if config.warmup:
            run_task(bm, tasks[0], config, records)
        for i, task in enumerate(tasks):
            shift = i % len(config.modes)
            order = list(config.modes[shift:]) + list(config.modes[:shift])  # spread drift over modes
            traces = run_task(bm, task, config, records, order)
            modes = {m: analyse_run(traces[m], task, bm.tokenizer, config.tpot_ms, config.ttft_ms) for m in config.modes}
            rows.append(
                {
                    "task_id": task.task_id,
                    "category": task.category,
                    "n_calls": len(task.calls),
                    "chains": task.meta.get("chains"),
                    "expected_latency_s": _toolset(task, config).planned_latencies(),
                    "modes": modes,
                    "projection": _projection(task, modes, config),
                }
            )
            if progress is not None:
                progress(i + 1, len(tasks), task.task_id)
    try:
        env["loadavg_end"] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        pass
    report = {
        "benchmark": "latency",
        "config": config.to_dict(),
        "condition": config.condition,
        "model": bm.label,
        "model_name": bm.name,
        "interrupt_at": bm.interrupt_at if config.policy == "model" else "token",
        "model_notes": bm.notes,
        "workload": info,
        "skipped_tasks": skipped,
        "environment": env,
        "tasks": rows,
    }
    report["summary"] = summarize(rows, config.modes)
    return report


def _projection(task: Task, modes: Mapping[str, Any], config: LatencyConfig) -> dict[str, float] | None:
    """Ideal latencies (latency model only) if each call were written in ``len(body) / 4 + 4``
    tokens (about what a large-vocabulary BPE tokenizer needs) at the emulated speed, with the
    execution times measured in this run: separates the effect of our small tokenizer from the system."""
    if not config.emulated or "async" not in modes:
        return None
    from .latency_model import _default_call_tokens

    E = {c["call_id"]: c["E_s"] for c in modes["async"]["calls"] if c["E_s"] is not None}
    if set(E) != {c.call_id for c in task.calls}:
        return None
    tpot, ttft = config.tpot_ms / 1000.0, config.ttft_ms / 1000.0  # type: ignore[operator]
    answer = modes["async"]["answer_tokens"] * tpot
    sims = [SimCall(c.call_id, _default_call_tokens(c.body()) * tpot, E[c.call_id], tuple(c.depends_on)) for c in task.calls]
    out = {}
    for m in BENCH_MODES:
        out[m] = _ideal(m, sims, [ttft] * (len(sims) + 1 if m == "sync" else 1), answer)
    out["tokens_per_call"] = statistics.fmean(_default_call_tokens(c.body()) for c in task.calls)
    return out


def _speedups(rows: Sequence[dict[str, Any]], base: str, mode: str, key: str = "latency_s") -> list[float]:
    out = []
    for r in rows:
        m = r["modes"]
        if base in m and mode in m and m[mode][key] and m[mode][key] > 0 and not math.isnan(m[mode][key]):
            out.append(m[base][key] / m[mode][key])
    return out


def summarize(rows: Sequence[dict[str, Any]], modes: Sequence[str]) -> dict[str, Any]:
    """Per-mode latency / efficiency statistics and speedups over each baseline."""
    summary: dict[str, Any] = {"n_tasks": len(rows), "modes": {}, "speedups": {}, "ideal_speedups": {}}
    for mode in modes:
        ms = [r["modes"][mode] for r in rows if mode in r["modes"]]
        lat = [m["latency_s"] for m in ms]
        ideal = [m["ideal_s"] for m in ms]
        summary["modes"][mode] = {
            "latency_s": _stats(lat),
            "ideal_s": _stats(ideal),
            "efficiency": _stats([m["efficiency"] for m in ms]),
            "efficiency_aggregate": (sum(ideal) / sum(lat)) if lat and sum(lat) > 0 else math.nan,
            "efficiency_model": _stats([m["efficiency_model"] for m in ms]),
            "efficiency_nominal": _stats([m["efficiency_nominal"] for m in ms]),
            "share_efficiency_ge_0_95": (sum(1 for m in ms if m["efficiency"] >= 0.95) / len(ms)) if ms else math.nan,
            "generated_tokens": _stats([m["generated_tokens"] for m in ms]),
            "cml_tokens": _stats([m["cml_tokens"] for m in ms]),
            "trap_tokens": _stats([m["trap_tokens"] for m in ms]),
            "injected_tokens": _stats([m["injected_tokens"] for m in ms]),
            "ttft_s": _stats([m["ttft_s"] for m in ms]),
            "requests": _stats([m["requests"] for m in ms]),
            "loop_ms_per_step": _stats([m["loop_ms_per_step"] for m in ms]),
            "step_ms_median": _stats([m["step_ms_median"] for m in ms]),
            "forward_ms_median": _stats([m["forward_ms_median"] for m in ms]),
            "dispatch_ms": _stats([c["dispatch_s"] * 1e3 for m in ms for c in m["calls"] if c["dispatch_s"] is not None]),
            "dispatch_first_ms": _stats([m["calls"][0]["dispatch_s"] * 1e3 for m in ms if m["calls"] and m["calls"][0]["dispatch_s"] is not None]),
            "dispatch_later_ms": _stats([c["dispatch_s"] * 1e3 for m in ms for c in m["calls"][1:] if c["dispatch_s"] is not None]),
            "trap_token_s": _stats([m["trap_token_s"] for m in ms]),
            "wake_s": _stats([m["wake_s"] for m in ms]),
            "teardown_s": _stats([m["teardown_s"] for m in ms]),
            "gap_s": _stats([m["latency_s"] - m["ideal_s"] for m in ms]),
            "errors": sum(m["errors"] for m in ms),
            "calls_run": sum(m["n_calls"] for m in ms),
            "calls_due": sum(r["n_calls"] for r in rows if mode in r["modes"]),
            "unrun_tokens": sum(m.get("unrun_tokens", 0) for m in ms),
            "ideal_order_mismatches": sum(1 for m in ms if m.get("ideal_order_matches") is False),
        }
    ref = "async" if "async" in modes else modes[0]  # calls as written in one request (no prefill inside a call)
    calls = [c for r in rows for c in r["modes"][ref]["calls"]]
    summary["calls"] = {
        "per_task": _stats([r["n_calls"] for r in rows]),
        "tokens_per_call": _stats([c["tokens"] for c in calls]),
        "G_s": _stats([c["G_s"] for c in calls if c["G_s"] is not None]),
        "E_s": _stats([c["E_s"] for c in calls if c["E_s"] is not None]),
    }
    for base in ("sync", "sync-cached", "sync-parallel"):
        if base not in modes:
            continue
        for mode in modes:
            if mode == base or BENCH_MODES.index(mode) < BENCH_MODES.index(base):
                continue
            key = f"{mode}/{base}"
            summary["speedups"][key] = _stats(_speedups(rows, base, mode))
            summary["ideal_speedups"][key] = _stats(_speedups(rows, base, mode, "ideal_s"))
    proj = [r["projection"] for r in rows if r.get("projection")]
    if proj:
        summary["projection"] = {
            "tokens_per_call": _stats([p["tokens_per_call"] for p in proj]),
            "speedups": {
                f"async/{b}": _stats([p[b] / p["async"] for p in proj if p["async"] > 0]) for b in ("sync", "sync-cached", "sync-parallel")
            },
        }
    if "async" in modes and "sync" in modes:
        extra = [r["modes"]["async"]["generated_tokens"] - r["modes"]["sync"]["generated_tokens"] for r in rows]
        summary["cml_extra_tokens_async_vs_sync"] = _stats(extra)
    return summary


def median_task(report: Mapping[str, Any], base: str = "sync", mode: str = "async", min_calls: int = 3) -> dict[str, Any]:
    """The task whose speedup of ``mode`` over ``base`` is the median (preferring tasks with ``min_calls``+ calls)."""
    rows = [r for r in report["tasks"] if base in r["modes"] and mode in r["modes"]]
    pool = [r for r in rows if r["n_calls"] >= min_calls] or rows
    pool = sorted(pool, key=lambda r: r["modes"][base]["latency_s"] / max(1e-9, r["modes"][mode]["latency_s"]))
    return pool[len(pool) // 2]
