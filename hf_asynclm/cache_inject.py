"""Growing a KV cache by more than one token per step: the "ride-along" injection.

Interrupts are prefilled in the same forward pass as the next decode step: the input is
``[last sampled token] + [interrupt tokens]`` and the cache, the position ids and the
attention mask grow by ``1 + k``. :class:`CacheDriver` owns the cache of one generation and
does exactly that; the logits it returns are those a single forward pass over the whole text
would give at the last position (tested for Llama and for Gemma 3's sliding-window layers).

It also implements the trap-time cache policy of the paper's trap handler: while decoding is
paused, the cache may stay where it is (``keep``) or move to CPU memory (``offload``) to free
accelerator memory for other work, and come back when the wait ends.

Example:

```python
>>> import torch
>>> from hf_asynclm.cache_inject import CacheDriver
>>> from hf_asynclm.testing import tiny_tokenizer, tiny_llama
>>> tok = tiny_tokenizer(); model = tiny_llama(tok)
>>> ids = torch.tensor([tok.encode("The weather in Paris")])
>>> driver = CacheDriver(model)
>>> logits = driver.forward(ids)                      # prefill
>>> logits = driver.forward(ids[:, :3])               # one step with two extra tokens riding along
>>> driver.seq_length == ids.shape[1] + 3, driver.forward_calls
(True, 2)

```
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Literal

import torch

logger = logging.getLogger(__name__)

TrapCachePolicy = Literal["keep", "offload"]


def cache_argument_name(model: Any) -> str:
    """Name of the forward argument that takes the cache (``cache`` since transformers 5.24,
    ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    if "cache" in params:
        return "cache"
    return "past_key_values"


def new_dynamic_cache(model: Any) -> Any:
    """An empty ``DynamicCache`` suited to ``model`` (sliding layers included)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older signature
        return DynamicCache()


class CacheDriver:
    """Runs forward passes of one sequence over a growing KV cache.

    Args:
        model: a causal LM.
        cache: the cache to extend (``None``: a new ``DynamicCache``).
        attention_mask: the 2-D mask of what the cache already holds plus what comes next
            (``None`` when it is all ones; then no mask is passed, as transformers does).
        next_position: position id of the next token (default: the cache length).
    """

    def __init__(
        self,
        model: Any,
        cache: Any | None = None,
        attention_mask: torch.Tensor | None = None,
        next_position: int | None = None,
    ) -> None:
        self.model = model
        self.cache = cache if cache is not None else new_dynamic_cache(model)
        self.cache_arg = cache_argument_name(model)
        params = inspect.signature(model.forward).parameters
        self._keeps_logits = "logits_to_keep" in params
        self.attention_mask = attention_mask
        self.next_position = int(next_position) if next_position is not None else self.cache.get_seq_length()
        self.forward_calls = 0
        self._offloaded: list[tuple[Any, str, torch.device]] | None = None
        self._device = model.device

    @property
    def seq_length(self) -> int:
        """Number of tokens the cache holds."""
        return int(self.cache.get_seq_length())

    @property
    def device(self) -> torch.device:
        """The model's device (read once: ``model.device`` walks the parameters)."""
        return self._device

    def forward(self, input_ids: torch.LongTensor, position_ids: torch.LongTensor | None = None) -> torch.Tensor:
        """Feed ``input_ids`` (shape ``[1, n]``) and return the logits at the last position (float32)."""
        if self._offloaded is not None:
            self.restore()
        n = input_ids.shape[1]
        if n == 0:
            raise ValueError("CacheDriver.forward needs at least one token")
        device = self.device
        if position_ids is None:
            position_ids = torch.arange(self.next_position, self.next_position + n, device=device).unsqueeze(0)
        kwargs: dict[str, Any] = {
            self.cache_arg: self.cache,
            "position_ids": position_ids.to(device),
            "use_cache": True,
        }
        if self.attention_mask is not None:
            needed = self.seq_length + n
            have = self.attention_mask.shape[1]
            if have < needed:
                pad = torch.ones(1, needed - have, dtype=self.attention_mask.dtype, device=self.attention_mask.device)
                self.attention_mask = torch.cat([self.attention_mask, pad], dim=1)
            kwargs["attention_mask"] = self.attention_mask[:, :needed].to(device)
        if self._keeps_logits:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=input_ids.to(device), return_dict=True, **kwargs)
        self.forward_calls += 1
        self.next_position = int(position_ids[0, -1]) + 1
        new_cache = getattr(out, self.cache_arg, None) or getattr(out, "past_key_values", None)
        if new_cache is not None:
            self.cache = new_cache
        return out.logits[:, -1, :].to(dtype=torch.float32)

    def can_rollback(self, n: int = 1) -> bool:
        """Whether :meth:`rollback` can take the last ``n`` tokens back out exactly: every layer
        of the cache can crop, and no sliding-window layer is so full that it has already
        dropped what it would have to restore."""
        layers = getattr(self.cache, "layers", None)
        if not layers or self.seq_length < n:
            return False
        for layer in layers:
            if not hasattr(layer, "crop"):
                return False
            window = getattr(layer, "sliding_window", None)
            if window is not None and layer.get_seq_length() + n >= int(window) - 1:
                return False
        return True

    def rollback(self, n: int) -> None:
        """Take the last ``n`` tokens fed back out of the cache (a look-ahead not taken): the next
        :meth:`forward` continues as if they had never been fed. Raises ``ValueError`` where
        :meth:`can_rollback` says no (nothing is changed then)."""
        if n <= 0:
            return
        if not self.can_rollback(n):
            raise ValueError(f"this cache cannot take back its last {n} token(s) ({type(self.cache).__name__})")
        self.cache.crop(-n)
        self.next_position -= n

    # trap-time policy -------------------------------------------------------------------------
    def offload(self) -> None:
        """Move the cache tensors to CPU memory (no-op on CPU models)."""
        if self._offloaded is not None or self.device.type == "cpu":
            return
        moved: list[tuple[Any, str, torch.device]] = []
        for layer in getattr(self.cache, "layers", []):
            for attr in ("keys", "values"):
                t = getattr(layer, attr, None)
                if isinstance(t, torch.Tensor) and t.device.type != "cpu":
                    moved.append((layer, attr, t.device))
                    setattr(layer, attr, t.to("cpu", non_blocking=True))
        self._offloaded = moved
        logger.debug("offloaded %d cache tensors to CPU", len(moved))

    def restore(self) -> None:
        """Bring offloaded cache tensors back to their device."""
        if self._offloaded is None:
            return
        for layer, attr, device in self._offloaded:
            setattr(layer, attr, getattr(layer, attr).to(device))
        self._offloaded = None
