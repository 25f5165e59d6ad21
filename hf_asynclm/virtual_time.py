"""Simulated time for reproducible runs: :class:`VirtualClock`.

In async mode a result goes in where the model happens to be when the tool returns, so the
same greedy run on the same machine can end differently from one run to the next (a few
points of task success on 100 synthetic tasks), and differently again on a faster machine.
A :class:`VirtualClock` takes wall-clock time out of the run, as the trace simulator
(:mod:`hf_asynclm.data.simulate`) does: every generated token costs ``tpot_s`` of simulated time,
injected tokens cost nothing (they ride along), and a call's result is *due* ``latency_s(name,
arguments)`` after the call was written. The executor holds a finished result back until the
clock reaches its due time, waits (in real time) for a tool still running when its result is due,
and hands results over in due order; a trap (or the model's EOS
while results are owed) moves the clock to the next due result at once, after waiting, in real
time, only for a tool that is still running. Tools should therefore return quickly: their real
run time no longer counts.

Same checkpoint, same prompts and greedy decoding: the same text and the same calls on every run,
on any machine (``hf-asynclm eval --clock virtual``).

Example:

```python
>>> from hf_asynclm.executor import ToolExecutor
>>> from hf_asynclm.virtual_time import VirtualClock
>>> def slow(x: int) -> int:
...     '''Slow tool.
...
...     Args:
...         x: A number.
...     '''
...     return x
>>> def fast(x: int) -> int:
...     '''Fast tool.
...
...     Args:
...         x: A number.
...     '''
...     return x
>>> clock = VirtualClock(tpot_s=0.01, latency_s=lambda name, args: 0.5 if name == "slow" else 0.05)
>>> ex = ToolExecutor([slow, fast], clock=clock)
>>> _ = ex.submit("s1", "slow(x=1)"); _ = ex.submit("f1", "fast(x=2)")
>>> ex.wait_all(5)
True
>>> ex.has_ready()  # both returned, neither is due at t=0
False
>>> clock.tick(10)  # ten tokens later: 0.1 s
>>> [i.call_id for i in ex.pop_ready()]
['f1']
>>> ex.wait_ready(5), round(clock.now, 3), [i.call_id for i in ex.pop_ready()]  # a trap: on to s1's due time
(True, 0.5, ['s1'])
>>> ex.close()

```
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Mapping

__all__ = ["VirtualClock"]


class VirtualClock:
    """A clock that moves only with the model's tokens and with traps (see the module docstring).

    Use it as a :class:`~hf_asynclm.executor.ToolExecutor`'s ``clock`` (``AsyncLM.new_session(
    virtual_clock=...)`` does): the executor then gates results by their due time.

    Args:
        tpot_s: simulated seconds per generated token (> 0).
        latency_s: the simulated run time of a call, from the tool's name and its bound
            arguments (>= 0).
    """

    def __init__(self, tpot_s: float, latency_s: Callable[[str | None, Mapping[str, Any]], float]) -> None:
        if not tpot_s > 0:
            raise ValueError(f"tpot_s must be positive, got {tpot_s!r}")
        self.tpot_s = float(tpot_s)
        self.latency_s = latency_s
        self._now = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        """The simulated time now, in seconds since the start."""
        return self._now

    @property
    def now(self) -> float:
        """The simulated time now, in seconds since the start."""
        return self._now

    def tick(self, tokens: int = 1) -> None:
        """``tokens`` generated tokens' worth of time passes."""
        with self._lock:
            self._now += tokens * self.tpot_s

    def advance_to(self, when: float) -> None:
        """Move the clock forward to ``when`` (never back)."""
        with self._lock:
            self._now = max(self._now, when)

    def call_latency(self, name: str | None, arguments: Mapping[str, Any]) -> float:
        """``latency_s(name, arguments)``, checked (a negative or non-number latency is an error)."""
        value = float(self.latency_s(name, arguments))
        if not value >= 0:
            raise ValueError(f"latency_s({name!r}, ...) gave {value!r}: a latency is a number of seconds >= 0")
        return value

    def __repr__(self) -> str:
        return f"VirtualClock(now={self._now:.3f}s, tpot_s={self.tpot_s})"
