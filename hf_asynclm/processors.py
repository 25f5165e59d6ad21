"""`CMLLogitsProcessor`: the CML token monitor as a transformers logits processor.

Inside hf-asynclm's own decode loop the monitor runs at every step. The processor also works
on its own inside a plain ``model.generate(logits_processor=[...])``: it masks ``[INTR]``,
tracks the critical section and starts every complete ``[CALL] ... [END]`` block on its
executor. What it cannot do there is inject results (transformers' loop feeds one token per
step); use ``AsyncLM`` or ``custom_generate`` for that.

A logits processor only sees the ids at the next step. Pass :meth:`CMLLogitsProcessor.as_stopping_criteria`
too and calls start right after their ``[END]`` is sampled (stopping criteria run right after
sampling), one forward pass earlier.

Example:

```python
>>> from transformers import LogitsProcessorList, StoppingCriteriaList
>>> from hf_asynclm.processors import CMLLogitsProcessor
>>> from hf_asynclm.testing import tiny_tokenizer, tiny_llama
>>> tok = tiny_tokenizer(); model = tiny_llama(tok)
>>> def get_weather(city: str) -> dict:
...     '''Weather now.
...
...     Args:
...         city: The city.
...     '''
...     return {"city": city, "temp_c": 18}
>>> with CMLLogitsProcessor(tok, tools=[get_weather]) as proc:
...     out = model.generate(**tok("Hi", return_tensors="pt"), max_new_tokens=5, do_sample=False,
...                          logits_processor=LogitsProcessorList([proc]),
...                          stopping_criteria=StoppingCriteriaList([proc.as_stopping_criteria()]))
...     n_calls = len(proc.executor.calls)   # a random model writes no call
>>> n_calls
0

```
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import torch
from transformers import LogitsProcessor, StoppingCriteria

from .cml import PROTOCOL_ERROR_ID, Block, CMLEvent, format_error
from .monitor import CMLMonitor

logger = logging.getLogger(__name__)

BlockHandler = Callable[[Block], None]


class CMLLogitsProcessor(LogitsProcessor):
    """Mask ``[INTR]``, follow CML blocks and dispatch complete calls.

    Args:
        tokenizer: the model's tokenizer.
        tools: tools for a new :class:`~hf_asynclm.executor.ToolExecutor` (callables,
            ``Tool`` objects or a registry). Ignored when ``executor`` is given.
        executor: an executor to dispatch calls on (its owner closes it).
        on_block: called with every complete block (calls, traps, malformed) in addition to the
            default dispatch of calls; useful for logging or custom policies.
        dispatch: start calls on the executor (default True).
        executor_kwargs: options for a new executor (``timeout_s``, ``max_result_chars`` ...).
    """

    def __init__(
        self,
        tokenizer: Any,
        tools: Iterable[Any] | None = None,
        executor: Any | None = None,
        on_block: BlockHandler | None = None,
        dispatch: bool = True,
        **executor_kwargs: Any,
    ) -> None:
        self.monitor = CMLMonitor(tokenizer)
        self._owns_executor = executor is None and dispatch
        if executor is None and dispatch:
            from .executor.executor import ToolExecutor

            executor = ToolExecutor(tools, **executor_kwargs)
        self.executor = executor
        self.on_block = on_block
        self.dispatch = dispatch
        self.blocks: list[Block] = []
        self._seen: int | None = None

    # the monitor's state, exposed -----------------------------------------------------------
    @property
    def in_critical_section(self) -> bool:
        """True while the model is inside a block (no interrupt may go in)."""
        return self.monitor.in_block

    @property
    def at_safe_point(self) -> bool:
        """True where an interrupt may be injected."""
        return self.monitor.at_safe_point

    # feeding --------------------------------------------------------------------------------
    def observe(self, input_ids: torch.LongTensor) -> list[CMLEvent]:
        """Feed the ids appended since the last call (the first call only records the prompt)."""
        if input_ids.shape[0] != 1:
            raise ValueError(
                f"CMLLogitsProcessor follows one sequence; got a batch of {input_ids.shape[0]}. "
                "Generate one prompt at a time."
            )
        length = input_ids.shape[1]
        if self._seen is None:
            self._seen = length
            return []
        events: list[CMLEvent] = []
        for tid in input_ids[0, self._seen :].tolist():
            events += self.feed_token(tid)
        self._seen = length
        return events

    def feed_token(self, token_id: int) -> list[CMLEvent]:
        """Feed one sampled token and handle the blocks it completes."""
        events = self.monitor.feed_token(token_id)
        for event in events:
            if isinstance(event, Block):
                self.handle_block(event)
        return events

    def handle_block(self, block: Block) -> None:
        """Default handling of a complete block: start calls, report malformed blocks."""
        self.blocks.append(block)
        if self.on_block is not None:
            self.on_block(block)
        if not self.dispatch or self.executor is None:
            return
        if block.kind == "call":
            self.executor.submit(block.call_id, block.body)
        elif block.kind == "malformed":
            target = block.call_id if block.call_id and block.call_id.isidentifier() else PROTOCOL_ERROR_ID
            self.executor.push_interrupt(target, format_error("CMLSyntaxError", block.error or "malformed block"), is_error=True)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.observe(input_ids)
        return self.monitor.mask_scores(scores)

    def as_stopping_criteria(self) -> StoppingCriteria:
        """A stopping criterion that feeds sampled tokens at once (never stops generation)."""
        return _ObserveCriteria(self)

    # lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the executor if this processor created it."""
        if self._owns_executor and self.executor is not None:
            self.executor.close()

    def __enter__(self) -> "CMLLogitsProcessor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _ObserveCriteria(StoppingCriteria):
    def __init__(self, processor: CMLLogitsProcessor) -> None:
        self.processor = processor

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        self.processor.observe(input_ids)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
