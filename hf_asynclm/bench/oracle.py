"""The oracle policy: a reactive logits processor that writes the ideal CML schedule of a task.

The oracle drives a real model's forward passes (every token still costs a real, or
emulated, decode step) but decides each token itself, from the task's plan and from what has
really happened so far: at each step it reads the ids that entered the context since its
last step (the token it forced, plus any interrupt the runtime injected) and parses the
injected ``[INTR] id [HEAD] value [END]`` blocks. At each block boundary it picks the next
block:

* ``async``: the ready call (every call it depends on has its result in context) with the
  longest expected latency (LPT; ties in task order); when no call is ready but results are
  owed, ``[TRAP] [END]``; when everything has returned, the answer and EOS.
* ``sync-parallel``: every ready call, in task order (a wave), then ``[TRAP] [END]`` (the
  wave starts at the trap and all its results come back together); next wave; answer.
* ``sync``: the ready calls one by one in task order (the runtime, or the plain loop of the
  ``sync`` baseline, injects each result before the next token); answer.

Dependent calls are written with their values copied in (the planned arguments, which are
the values the results carry), and only once the results they depend on are in context:
the oracle never writes something it could not know yet. It reacts to real arrivals, so its
schedule is the ideal one for the execution times that actually happen. It never writes
EOS while results are owed, and works across several ``generate`` calls (the ``sync``
baseline re-enters ``generate`` with the whole sequence after each result).

Example:

```python
>>> import torch
>>> from hf_asynclm.bench.oracle import OraclePolicy
>>> from hf_asynclm.data.tasks import PlannedCall, Task
>>> from hf_asynclm.testing import tiny_tokenizer
>>> tok = tiny_tokenizer()
>>> task = Task("t", "bfcl", "parallel", [], [], [PlannedCall("c1", "f", {"x": 1}), PlannedCall("c2", "f", {"x": 2})])
>>> oracle = OraclePolicy(tok, task, "async", {"c1": 0.1, "c2": 0.3})
>>> ids = torch.zeros(1, 4, dtype=torch.long)
>>> for _ in range(40):
...     scores = oracle(ids, torch.zeros(1, len(tok)))
...     ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], dim=-1)
...     if oracle.log and oracle.log[-1][0] == "trap":
...         break
>>> oracle.log   # longest first, then a trap: nothing else can be written
[('call', 'c2'), ('call', 'c1'), ('trap', None)]

```
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..cml import format_call, format_trap, marker_token_ids, parse_blocks
from ..data.tasks import Task

logger = logging.getLogger(__name__)

__all__ = ["OraclePolicy", "ORACLE_MODES", "DEFAULT_ANSWER"]

#: Modes the oracle writes for (the ``sync`` baseline uses ``sync``).
ORACLE_MODES: tuple[str, ...] = ("async", "sync", "sync-parallel")
#: The short answer written once every result is in context (the same in every mode).
DEFAULT_ANSWER = " Done."


class OraclePolicy:
    """A logits processor that forces the ideal CML schedule of ``task``, reacting to real results.

    Args:
        tokenizer: the model's tokenizer (CML markers should be single tokens).
        task: the task; its planned calls (ids, arguments, ``depends_on``) are what it writes.
        mode: ``async``, ``sync`` or ``sync-parallel``.
        expected_latency_s: expected execution time per call id (the LPT key in ``async``).
        answer: text written after the last result, followed by EOS.

    Attributes:
        log: ``(kind, call_id)`` of each block it decided to write, in order (``call``,
            ``trap``, ``answer``).
        trap_ready: at each trap decision, the number of calls that were writable (always 0).
        results: ids of the interrupts it has seen in its context, in arrival order.
    """

    def __init__(
        self,
        tokenizer: Any,
        task: Task,
        mode: str,
        expected_latency_s: Mapping[str, float] | None = None,
        answer: str = DEFAULT_ANSWER,
    ) -> None:
        if mode not in ORACLE_MODES:
            raise ValueError(f"unknown oracle mode {mode!r}; use one of {', '.join(ORACLE_MODES)}")
        self.tokenizer = tokenizer
        self.task = task
        self.mode = mode
        self.expected = dict(expected_latency_s or {})
        self.answer = answer
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the tokenizer has no EOS token: the oracle cannot end its answer")
        markers = marker_token_ids(tokenizer)
        self._intr_id = markers.intr
        self._order = {c.call_id: i for i, c in enumerate(task.calls)}
        self._pending = list(task.topological_order())
        self._written: list[str] = []
        self._in_context: set[str] = set()
        self._queue: list[int] = []
        self._seen: int | None = None
        self._last_forced: int | None = None
        self._piece_cache: dict[str, list[int]] = {}
        self.log: list[tuple[str, str | None]] = []
        self.trap_ready: list[int] = []
        self.results: list[str] = []
        self.done = False

    # ------------------------------------------------------------------------------------
    @property
    def owed(self) -> list[str]:
        """Ids of calls written whose results are not in context yet."""
        return [cid for cid in self._written if cid not in self._in_context]

    def ready(self) -> list[Any]:
        """Planned calls not written yet whose dependencies' results are all in context."""
        return [c for c in self._pending if all(d in self._in_context for d in c.depends_on)]

    def max_tokens(self) -> int:
        """An upper bound of the tokens this oracle writes (a ``max_new_tokens`` budget)."""
        calls = sum(len(self._encode(format_call(c.body(), c.call_id))) for c in self.task.calls)
        traps = len(self._encode(format_trap())) * (2 * len(self.task.calls) + 2)
        return calls + traps + len(self._encode(self.answer)) + 8

    # ------------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        ids = self._piece_cache.get(text)
        if ids is None:
            ids = list(self.tokenizer.encode(text, add_special_tokens=False))
            self._piece_cache[text] = ids
        return ids

    def _observe(self, input_ids: torch.Tensor) -> None:
        """Read what entered the context since the last step: our own token and interrupts."""
        n = int(input_ids.shape[-1])
        if self._seen is None:  # first step: the prompt
            self._seen = n
            return
        if n <= self._seen:
            return
        new = input_ids[0, self._seen :].tolist()
        self._seen = n
        if self._last_forced is not None and new and new[0] == self._last_forced:
            new = new[1:]  # the token we forced last step
        if not new:
            return
        if self._intr_id is not None and self._intr_id not in new:
            return  # fast path: no interrupt marker came in
        text = self.tokenizer.decode(new, skip_special_tokens=False)
        for block in parse_blocks(text):
            if block.kind == "interrupt" and block.call_id:
                if block.call_id in self._written and block.call_id not in self._in_context:
                    self._in_context.add(block.call_id)
                    self.results.append(block.call_id)

    def _plan(self) -> None:
        """Decide the next block and queue its tokens."""
        ready = self.ready()
        if ready:
            if self.mode == "async":
                call = max(ready, key=lambda c: (self.expected.get(c.call_id, 0.0), -self._order[c.call_id]))
            else:
                call = min(ready, key=lambda c: self._order[c.call_id])
            self._pending.remove(call)
            self._written.append(call.call_id)
            self._queue = list(self._encode(format_call(call.body(), call.call_id)))
            self.log.append(("call", call.call_id))
            return
        if self.owed:
            self.trap_ready.append(len(ready))
            self._queue = list(self._encode(format_trap()))
            self.log.append(("trap", None))
            return
        if self._pending:  # unreachable dependencies: write them anyway rather than hang
            call = self._pending.pop(0)
            self._written.append(call.call_id)
            self._queue = list(self._encode(format_call(call.body(), call.call_id)))
            self.log.append(("call", call.call_id))
            return
        self._queue = list(self._encode(self.answer)) + [self.eos_id]
        self.log.append(("answer", None))
        self.done = True

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._observe(input_ids)
        if not self._queue:
            if self.done:
                self._queue = [self.eos_id]
            else:
                self._plan()
        token = self._queue.pop(0)
        self._last_forced = token
        forced = torch.full_like(scores, -float("inf"))
        forced[..., token] = 0.0
        return forced

    def written_order(self) -> list[str]:
        """Call ids in the order they were written."""
        return [cid for kind, cid in self.log if kind == "call" and cid is not None]


def lpt_order(calls: Sequence[Any], expected_latency_s: Mapping[str, float]) -> list[str]:
    """Independent calls longest-first (ties in task order): the order ``async`` writes them."""
    order = {c.call_id: i for i, c in enumerate(calls)}
    return [c.call_id for c in sorted(calls, key=lambda c: (-expected_latency_s.get(c.call_id, 0.0), order[c.call_id]))]
