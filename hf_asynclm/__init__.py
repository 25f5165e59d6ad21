"""hf-asynclm: asynchronous LLM function calling for Hugging Face transformers.

The model writes a call in CML (``[CALL] id [HEAD] fn(args) [END]``), keeps generating while
the call runs in the background, and receives the result as an interrupt
(``[INTR] id [HEAD] value [END]``) injected into its KV cache at the next safe point.

```python
from hf_asynclm import AsyncLM
alm = AsyncLM.from_pretrained()            # the shipped cml-tiny checkpoint, offline
result = alm.generate("What's the weather in Paris and Tokyo?", max_new_tokens=200)
print(result.text, result.stats)
```
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

# Lazy imports keep `import hf_asynclm` light (the CLI's --help must not load torch).
_EXPORTS = {
    "AsyncLM": "asynclm",
    "AsyncResult": "asynclm",
    "DEFAULT_CHECKPOINT": "asynclm",
    "CMLLogitsProcessor": "processors",
    "CMLMonitor": "monitor",
    "CMLStreamer": "streamer",
    "CMLTextStreamer": "streamer",
    "CMLIteratorStreamer": "streamer",
    "StreamEvent": "streamer",
    "GenerationSession": "generation",
    "GenerationStats": "generation",
    "ToolExecutor": "executor",
    "ToolRegistry": "executor",
    "Tool": "executor",
    "add_cml_tokens": "cml",
    "format_call": "cml",
    "format_interrupt": "cml",
    "format_trap": "cml",
    "parse_blocks": "cml",
    "VirtualClock": "virtual_time",
}

if TYPE_CHECKING:  # pragma: no cover
    from .asynclm import DEFAULT_CHECKPOINT, AsyncLM, AsyncResult
    from .cml import add_cml_tokens, format_call, format_interrupt, format_trap, parse_blocks
    from .executor import Tool, ToolExecutor, ToolRegistry
    from .generation import GenerationSession, GenerationStats
    from .monitor import CMLMonitor
    from .processors import CMLLogitsProcessor
    from .streamer import CMLIteratorStreamer, CMLStreamer, CMLTextStreamer, StreamEvent
    from .virtual_time import VirtualClock


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_asynclm' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = sorted(_EXPORTS) + ["__version__"]
