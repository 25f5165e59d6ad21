"""Emulated decode speed: make a model's forward passes cost a fixed time.

Benchmarks compare latencies under the paper's conditions (5 ms per output token, 59 ms or
310 ms to the first token) on whatever machine is at hand. :func:`emulate_speed` wraps
``model.forward`` (with ``functools.wraps``, so ``generate`` still sees its signature): a
forward pass that starts a request (the cache is empty: a prefill) takes at least
``ttft_ms``; every other forward pass (a decode step, with or without riding-along interrupt
tokens) takes at least ``tpot_ms`` plus ``prefill_ms_per_token`` for each token beyond the
first. The real computation still runs; the wrapper only sleeps for the rest of the time.
This is a clearly labelled stand-in, not a measurement of a real accelerator.

Example:

```python
>>> import time
>>> from hf_asynclm.emulation import emulate_speed
>>> from hf_asynclm.testing import tiny_tokenizer, tiny_llama
>>> tok = tiny_tokenizer(); model = tiny_llama(tok)
>>> with emulate_speed(model, tpot_ms=20, ttft_ms=50):
...     t0 = time.perf_counter()
...     _ = model.generate(**tok("Hi", return_tensors="pt"), max_new_tokens=5, min_new_tokens=5, do_sample=False)
...     elapsed = time.perf_counter() - t0
>>> elapsed >= 0.05 + 4 * 0.02
True

```
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from typing import Any, Iterator


@dataclass(frozen=True)
class SpeedProfile:
    """Costs of an emulated engine, in milliseconds."""

    tpot_ms: float = 5.0
    ttft_ms: float = 59.0
    prefill_ms_per_token: float = 0.0

    @property
    def label(self) -> str:
        return f"emulated: {self.tpot_ms:g} ms/token, {self.ttft_ms:g} ms/request"


#: The paper's conditions (AsyncLM §6): local Llama and a cloud API, 5 ms per token.
PAPER_LOCAL = SpeedProfile(tpot_ms=5.0, ttft_ms=59.0)
PAPER_CLOUD = SpeedProfile(tpot_ms=5.0, ttft_ms=310.0)


def _cache_length(args: tuple, kwargs: dict[str, Any]) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length())
    except Exception:  # pragma: no cover - exotic caches
        return 0


def _input_length(args: tuple, kwargs: dict[str, Any]) -> int:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        embeds = kwargs.get("inputs_embeds")
        return int(embeds.shape[1]) if embeds is not None else 1
    return int(ids.shape[-1])


@contextlib.contextmanager
def emulate_speed(
    model: Any, tpot_ms: float = 5.0, ttft_ms: float = 59.0, prefill_ms_per_token: float = 0.0
) -> Iterator[SpeedProfile]:
    """Within the block, ``model``'s forward passes cost the given times (at least)."""
    profile = SpeedProfile(tpot_ms, ttft_ms, prefill_ms_per_token)
    original = model.forward

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        n = _input_length(args, kwargs)
        if _cache_length(args, kwargs) == 0:
            target = profile.ttft_ms
        else:
            target = profile.tpot_ms + profile.prefill_ms_per_token * max(0, n - 1)
        out = original(*args, **kwargs)
        remaining = target / 1000.0 - (time.perf_counter() - t0)
        if remaining > 0:
            time.sleep(remaining)
        return out

    had_instance_forward = "forward" in vars(model)
    model.forward = forward
    try:
        yield profile
    finally:
        if had_instance_forward:
            model.forward = original
        else:
            del model.forward
