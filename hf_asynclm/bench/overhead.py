"""``bench overhead``: what the hf-asynclm runtime costs, measured against plain transformers.

Four sections, each in one run with the same model and settings:

(a) **Text without calls.** Tokens per second of ``model.generate(..., custom_generate=
    alm.custom_generate)`` divided by plain ``model.generate``: same prompt, greedy,
    ``min_new_tokens = max_new_tokens`` so both write exactly as many tokens, the CML markers
    suppressed in both (``suppress_tokens``) so that no call can start, repetitions
    interleaved (plain, hf-asynclm, plain, ... alternating which goes first). Target >= 0.97.
(b) **Interrupt cost.** Over a cache of ``context_tokens`` tokens: one decode step (a
    1-token forward through :class:`~hf_asynclm.cache_inject.CacheDriver`, as the loop does)
    against a ride-along step carrying ``k`` interrupt tokens (a ``1 + k``-token forward),
    and against the alternative without hf-asynclm: stop ``generate``, append the interrupt
    and re-enter ``generate(input_ids=full, past_key_values=cache)`` for the next token.
    Both are reported as time added to the decode step they replace, in milliseconds and in
    decode steps; plus the time to tokenise the interrupt text.
(c) **Dispatch latency.** From the sampling of a call's ``[END]`` (the moment the logits
    processors returned at that step) to the tool function starting
    (``CallRecord.started_at``), over ``generations x calls`` no-op calls, for ``async def``
    and plain (thread-pool) tools, with the decode thread computing (real decode) and mostly
    sleeping (decode emulated at 5 ms/token, like an accelerator). Target: median < 1 ms.
(d) **Constrained calls.** Time of the ``constrain_calls="schema"`` logits processor
    (:mod:`hf_asynclm.call_grammar`) per step, inside call blocks and outside, on the model's
    own logits teacher-forced over two calls of the demo tools; set against (b)'s decode step;
    and inside blocks with ``"grounded"`` (values copied from the prompt). Every token of those
    valid calls must be allowed in both (``rejected`` = ``grounded_rejected`` = 0).

Example (tiny sizes):

```python
>>> from hf_asynclm.bench.latency import load_bench_model
>>> from hf_asynclm.bench.overhead import OverheadConfig, run_overhead
>>> cfg = OverheadConfig(new_tokens=8, reps=1, interrupt_tokens=(8,), context_tokens=16, calls=2, generations=1, threads=1,
...                      emulated_tpot_ms=1.0)
>>> report = run_overhead(cfg, load_bench_model("random"))
>>> sorted(k for k in ("text", "interrupt", "dispatch", "constrained") if k in report)
['constrained', 'dispatch', 'interrupt', 'text']

```
"""

from __future__ import annotations

import contextlib
import gc
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..cml import format_call, format_interrupt, marker_token_ids

logger = logging.getLogger(__name__)

__all__ = ["OverheadConfig", "run_overhead", "text_throughput", "interrupt_cost", "dispatch_latency", "constrained_cost"]

_PROMPT = (
    "The weather in Paris is mild today. Let me check the flights and the hotels for you. "
    "I found 3 hotels. The answer is 42. Book it on Thursday at 10:30."
)


@dataclass
class OverheadConfig:
    """Settings of ``bench overhead``."""

    new_tokens: int = 128
    reps: int = 7
    interrupt_tokens: tuple[int, ...] = (8, 32, 128)
    context_tokens: int = 256
    calls: int = 20
    generations: int = 5
    threads: int | None = None
    emulated_tpot_ms: float = 5.0

    def __post_init__(self) -> None:
        if self.new_tokens < 2 or self.reps < 1 or self.context_tokens < 1 or self.calls < 1 or self.generations < 1:
            raise ValueError("new_tokens >= 2, reps, context_tokens, calls and generations >= 1")
        if not self.interrupt_tokens or any(k < 1 for k in self.interrupt_tokens):
            raise ValueError("interrupt sizes must be positive")

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def _pct(values: Sequence[float], q: float) -> float:
    vals = sorted(values)
    if not vals:
        return float("nan")
    pos = (len(vals) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def _marker_ids(tokenizer: Any) -> list[int]:
    return sorted(marker_token_ids(tokenizer).by_id)


# ---------------------------------------------------------------------------------------------
# (a) text without calls
# ---------------------------------------------------------------------------------------------


def text_throughput(bm: Any, new_tokens: int, reps: int) -> dict[str, Any]:
    """Tokens/s of the hf-asynclm loop and of plain ``generate`` (interleaved), and their ratio."""
    from ..asynclm import AsyncLM
    from .latency import synchronize

    model, tok = bm.model, bm.tokenizer
    alm = AsyncLM(model, tok, tools=[])
    inputs = tok(_PROMPT, return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    kwargs: dict[str, Any] = {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    }
    suppress = _marker_ids(tok)
    if suppress:
        kwargs["suppress_tokens"] = suppress

    def plain() -> tuple[float, int]:
        t0 = time.perf_counter()
        out = model.generate(**inputs, **kwargs)
        synchronize(out.device)
        return time.perf_counter() - t0, int(out.shape[1] - inputs["input_ids"].shape[1])

    def ours() -> tuple[float, int]:
        t0 = time.perf_counter()
        out = model.generate(**inputs, custom_generate=alm.custom_generate, **kwargs)
        synchronize(out.device)
        return time.perf_counter() - t0, int(out.shape[1] - inputs["input_ids"].shape[1])

    plain()
    ours()  # warm-up
    t_plain: list[float] = []
    t_ours: list[float] = []
    pairs: list[float] = []
    for r in range(reps):
        gc.collect()
        first, second = (plain, ours) if r % 2 == 0 else (ours, plain)
        a, na = first()
        b, nb = second()
        (tp, np_), (to, no) = ((a, na), (b, nb)) if first is plain else ((b, nb), (a, na))
        if np_ != new_tokens or no != new_tokens:
            raise RuntimeError(f"expected {new_tokens} new tokens from both loops, got plain {np_}, hf-asynclm {no}")
        t_plain.append(tp)
        t_ours.append(to)
        pairs.append(tp / to)
    plain_tps = new_tokens / statistics.median(t_plain)
    ours_tps = new_tokens / statistics.median(t_ours)
    return {
        "new_tokens": new_tokens,
        "reps": reps,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "suppressed_tokens": suppress,
        "plain_s": t_plain,
        "asynclm_s": t_ours,
        "plain_tokens_per_s": plain_tps,
        "asynclm_tokens_per_s": ours_tps,
        "ratio": ours_tps / plain_tps,
        "ratio_median_of_pairs": statistics.median(pairs),
    }


# ---------------------------------------------------------------------------------------------
# (b) interrupt cost
# ---------------------------------------------------------------------------------------------


def _interrupt_text(tok: Any, k: int) -> tuple[str, list[int]]:
    """An interrupt block of (at least, then cut to exactly) ``k`` tokens."""
    words = "temp_c 18 sunny wind 12 km/h humidity 40 % pressure 1013 hPa".split()
    value = ""
    i = 0
    while True:
        text = format_interrupt("w1", value)
        ids = tok.encode(text, add_special_tokens=False)
        if len(ids) >= k:
            return text, ids[:k]
        value = (value + " " + words[i % len(words)]).strip()
        i += 1


def _crop(cache: Any, length: int) -> None:
    n = int(cache.get_seq_length())
    if n > length:
        cache.crop(-(n - length))


def interrupt_cost(bm: Any, sizes: Sequence[int], context_tokens: int, reps: int) -> dict[str, Any]:
    """Time a ride-along step and a stop + re-enter of ``generate`` add to a decode step."""
    from ..cache_inject import CacheDriver, cache_argument_name
    from .latency import synchronize

    model, tok = bm.model, bm.tokenizer
    device = model.device
    base = tok.encode(_PROMPT, add_special_tokens=False)
    ctx = (base * (context_tokens // max(1, len(base)) + 1))[:context_tokens]
    ctx_ids = torch.tensor([ctx], dtype=torch.long, device=device)
    driver = CacheDriver(model)
    driver.forward(ctx_ids)
    L = driver.seq_length
    last = torch.tensor([[base[0]]], dtype=torch.long)
    cache_kw = cache_argument_name(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def ride(extra: list[int]) -> float:
        feed = torch.tensor([[int(last[0, 0])] + extra], dtype=torch.long, device=device)
        synchronize(device)
        t0 = time.perf_counter()
        driver.forward(feed)
        synchronize(device)
        dt = time.perf_counter() - t0
        _crop(driver.cache, L)
        driver.next_position = L
        return dt

    def reenter(extra: list[int]) -> float:
        full = torch.cat([ctx_ids, torch.tensor([[int(last[0, 0])] + extra], dtype=torch.long, device=device)], dim=-1)
        synchronize(device)
        t0 = time.perf_counter()
        model.generate(
            input_ids=full, attention_mask=torch.ones_like(full), max_new_tokens=1, do_sample=False, pad_token_id=pad,
            **{cache_kw: driver.cache},
        )
        synchronize(device)
        dt = time.perf_counter() - t0
        _crop(driver.cache, L)
        driver.next_position = L
        return dt

    texts = {k: _interrupt_text(tok, k) for k in sizes}
    for k in sizes:  # warm-up
        ride(texts[k][1])
        reenter(texts[k][1])
    decode: list[float] = []
    ride_t: dict[int, list[float]] = {k: [] for k in sizes}
    re_t: dict[int, list[float]] = {k: [] for k in sizes}
    tok_t: dict[int, list[float]] = {k: [] for k in sizes}
    for _ in range(reps):
        for k in sizes:
            decode.append(ride([]))
            ride_t[k].append(ride(texts[k][1]))
            re_t[k].append(reenter(texts[k][1]))
            t0 = time.perf_counter()
            tok.encode(texts[k][0], add_special_tokens=False)
            tok_t[k].append(time.perf_counter() - t0)
    step = statistics.median(decode)
    rows = []
    for k in sizes:
        r = statistics.median(ride_t[k])
        g = statistics.median(re_t[k])
        rows.append(
            {
                "k": k,
                "ride_along_ms": r * 1e3,
                "ride_along_added_ms": (r - step) * 1e3,
                "ride_along_rel": (r - step) / step,
                "reenter_ms": g * 1e3,
                "reenter_added_ms": (g - step) * 1e3,
                "reenter_rel": (g - step) / step,
                "tokenize_ms": statistics.median(tok_t[k]) * 1e3,
            }
        )
    return {"context_tokens": L, "reps": reps, "decode_step_ms": step * 1e3, "rows": rows}


# ---------------------------------------------------------------------------------------------
# (c) dispatch latency
# ---------------------------------------------------------------------------------------------


async def ping(x: int) -> int:
    """A no-op tool (``async def``).

    Args:
        x: a number.
    """
    return x


def ping_sync(x: int) -> int:
    """A no-op tool (plain function: runs in the executor's thread pool).

    Args:
        x: a number.
    """
    return x


def dispatch_latency(bm: Any, calls: int, generations: int, emulated_tpot_ms: float) -> dict[str, Any]:
    """[END] sampled -> tool started, for async and thread-pool tools, with real and emulated decode."""
    from transformers import LogitsProcessorList

    from ..asynclm import AsyncLM
    from ..emulation import emulate_speed
    from ..testing import ScriptedPolicy
    from .latency import _StepClock

    tok = bm.tokenizer
    end_id = marker_token_ids(tok).end
    rows = []
    samples: dict[str, list[float]] = {}
    for decode in ("real", "emulated"):
        emu = emulate_speed(bm.model, emulated_tpot_ms, emulated_tpot_ms) if decode == "emulated" else contextlib.nullcontext()
        with emu:
            for tool in (ping, ping_sync):
                fname = tool.__name__
                lat: list[float] = []
                first: list[float] = []
                submit: list[float] = []
                for g in range(generations + 1):  # the first generation warms up
                    pieces = []
                    for i in range(calls):
                        pieces.append(format_call(f"{fname}(x={i})", call_id=f"p{i}"))
                        pieces.append(" ok")
                    policy = ScriptedPolicy(tok, pieces)
                    clock = _StepClock(policy)
                    alm = AsyncLM(bm.model, tok, tools=[tool], call_timeout_s=10)
                    result = alm.generate("Ping.", logits_processor=LogitsProcessorList([clock]), max_new_tokens=len(policy.tokens) + 2, do_sample=False)
                    seq = result.sequences[0].tolist()
                    ends = [clock.exit[k] for k, pos in enumerate(clock.lengths) if pos < len(seq) and seq[pos] == end_id]
                    if g == 0:
                        continue
                    for j, (record, t_end) in enumerate(zip(result.calls, ends)):
                        if record.started_at is None:
                            continue
                        lat.append(record.started_at - t_end)
                        submit.append(record.submitted_at - t_end)
                        if j == 0:
                            first.append(record.started_at - t_end)
                kind = "async def" if tool is ping else "def (thread pool)"
                label = f"real {'GPU' if bm.model.device.type == 'cuda' else 'CPU'} decode" if decode == "real" else f"emulated {emulated_tpot_ms:g} ms/token (decode thread sleeps)"
                samples[f"{kind} / {label}"] = lat
                rows.append(
                    {
                        "tool": kind,
                        "decode": label,
                        "n": len(lat),
                        "median_ms": statistics.median(lat) * 1e3 if lat else float("nan"),
                        "p99_ms": _pct(lat, 0.99) * 1e3 if lat else float("nan"),
                        "max_ms": max(lat) * 1e3 if lat else float("nan"),
                        "first_median_ms": statistics.median(first) * 1e3 if first else None,
                        "submit_median_ms": statistics.median(submit) * 1e3 if submit else float("nan"),
                    }
                )
    main = rows[0]["median_ms"] if rows else float("nan")
    verdict = "met" if all(r["median_ms"] < 1.0 for r in rows) else ("met for " + ", ".join(f"{r['tool']} / {r['decode']}" for r in rows if r["median_ms"] < 1.0) if any(r["median_ms"] < 1.0 for r in rows) else "NOT met")
    return {"n_calls": calls * generations, "generations": generations, "rows": rows, "median_ms": main, "verdict": verdict}


# ---------------------------------------------------------------------------------------------
# (d) constrained calls
# ---------------------------------------------------------------------------------------------

#: What (d) feeds after the prompt: text, two calls of the demo tools, text.
_CONSTRAINED_TEXT = (
    'Let me look. [CALL] w1 [HEAD] get_weather(city="Paris") [END] '
    '[CALL] h1 [HEAD] find_hotel(city="Rio de Janeiro", max_price=250) [END] Both are on their way: a room under $250.'
)


def constrained_cost(bm: Any, reps: int) -> dict[str, Any] | None:
    """Time :class:`~hf_asynclm.call_grammar.CallGrammarProcessor` per decode step, inside and
    outside call blocks, on the model's own logits (teacher-forced over ``_CONSTRAINED_TEXT``
    after a prompt with the demo tools); ``None`` when the markers are not single tokens.

    Also a correctness check: every token of those valid calls must be allowed (``rejected``).
    The same for :class:`~hf_asynclm.name_completion.NameCompletionProcessor` (``complete_names``)
    over the same steps: ``names_*`` (none of those tokens ends a name early: ``names_rejected``),
    and with ``quote_numbers`` too (``numbers=True``): ``quoted_*`` (none of those numbers is refused).
    """
    from ..asynclm import AsyncLM
    from ..call_grammar import CallGrammarProcessor
    from ..demo_tools import demo_tools
    from ..name_completion import NameCompletionProcessor
    from .latency import synchronize

    model, tok = bm.model, bm.tokenizer
    if not marker_token_ids(tok).single_token:
        return None
    alm = AsyncLM(model, tok, tools=demo_tools())
    prompt = alm.encode_prompt("Weather in Paris, and a hotel in Rio de Janeiro under $250?")["input_ids"][0].tolist()
    ids = prompt + tok.encode(_CONSTRAINED_TEXT, add_special_tokens=False)
    with torch.inference_mode():
        logits = model(torch.tensor([ids], device=model.device)).logits[0].float()  # where generation has them
    schemas = alm.registry.schemas()
    report: dict[str, Any] = {"reps": reps, "prompt_tokens": len(prompt)}
    positions = range(len(prompt), len(ids))
    grammar = CallGrammarProcessor(tok, schemas)  # only to tell the steps apart, once
    outside_at = {pos: grammar._state(ids[:pos])[0] == "outside" for pos in positions}

    def timed(make_proc: Callable[[], Any]) -> tuple[list[float], list[float], int]:
        """Per-step times inside and outside blocks over ``reps`` passes, and the number of the
        text's own tokens the processor refused (its verdict, whatever the ranking)."""
        inside: list[float] = []
        outside: list[float] = []
        rejected = 0
        for _ in range(reps):
            proc = make_proc()  # a fresh one per pass, as per generation
            for pos in positions:
                seq = torch.tensor([ids[:pos]], device=logits.device)
                scores = logits[pos - 1 : pos].clone()
                synchronize(logits.device)
                t0 = time.perf_counter()
                proc(seq, scores)
                synchronize(logits.device)
                (outside if outside_at[pos] else inside).append(time.perf_counter() - t0)
                rejected += not proc.allowed(ids[:pos], ids[pos])
        return inside, outside, rejected

    for grounded in (False, True):
        inside, outside, rejected = timed(lambda: CallGrammarProcessor(tok, schemas, grounded=grounded))
        key = "grounded_" if grounded else ""  # "grounded": the values of those calls are copied from the prompt
        report.update({
            f"{key}inside_median_ms": statistics.median(inside) * 1e3,
            f"{key}inside_p99_ms": _pct(inside, 0.99) * 1e3,
            f"{key}rejected": rejected,
        })
        if not grounded:  # the steps and the time outside blocks are the same in both settings
            report.update({
                "steps_inside": len(inside) // reps,
                "steps_outside": len(outside) // reps,
                "outside_median_ms": statistics.median(outside) * 1e3,
            })
    inside, outside, rejected = timed(lambda: NameCompletionProcessor(tok))
    report.update({
        "names_inside_median_ms": statistics.median(inside) * 1e3,
        "names_outside_median_ms": statistics.median(outside) * 1e3,
        "names_outside_p99_ms": _pct(outside, 0.99) * 1e3,
        "names_rejected": rejected,
    })
    inside, outside, rejected = timed(lambda: NameCompletionProcessor(tok, numbers=True))
    report.update({
        "quoted_outside_median_ms": statistics.median(outside) * 1e3,
        "quoted_outside_p99_ms": _pct(outside, 0.99) * 1e3,
        "quoted_rejected": rejected,
    })
    return report


# ---------------------------------------------------------------------------------------------


def run_overhead(config: OverheadConfig, bm: Any | None = None, progress: Callable[[int, str], None] | None = None) -> dict[str, Any]:
    """Run the four sections; return a JSON-serialisable report."""
    from .latency import _environment, load_bench_model, torch_threads

    bm = bm or load_bench_model()
    with torch_threads(config.threads), torch.inference_mode():
        env = _environment(bm.model.device)
        text = text_throughput(bm, config.new_tokens, config.reps)
        if progress:
            progress(1, "text")
        intr = interrupt_cost(bm, config.interrupt_tokens, config.context_tokens, config.reps)
        if progress:
            progress(2, "interrupts")
        disp = dispatch_latency(bm, config.calls, config.generations, config.emulated_tpot_ms)
        if progress:
            progress(3, "dispatch")
        grammar = constrained_cost(bm, config.reps)
        if progress:
            progress(4, "constrained calls")
    return {
        "benchmark": "overhead",
        "config": config.to_dict(),
        "model": bm.label,
        "model_notes": bm.notes,
        "environment": env,
        "text": text,
        "interrupt": intr,
        "dispatch": disp,
        "constrained": grammar,
    }
