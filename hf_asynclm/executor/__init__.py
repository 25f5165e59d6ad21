"""Tool execution for asynchronous function calling: registry, call parsing, concurrent executor.

* :class:`ToolRegistry` / :class:`Tool` -- the tools and their JSON schemas.
* :func:`parse_call` / :func:`bind_arguments` -- read a ``[CALL]`` body safely (``ast``, never
  ``eval``) and check it against the tool's schema.
* :class:`ToolExecutor` -- run calls in the background (threads for sync tools, one asyncio loop
  for async ones) and queue their results as interrupts.

Example:

```python
>>> from hf_asynclm.executor import ToolExecutor
>>> async def double(x: int) -> int:
...     '''Double a number.
...
...     Args:
...         x: The number.
...     '''
...     return 2 * x
>>> with ToolExecutor([double], timeout_s=5) as executor:
...     first = executor.submit("a", "double(21)")
...     second = executor.submit("b", "double(a)")      # uses the result of call a
...     executor.wait_for(second, timeout=5)
...     print([i.text() for i in executor.pop_ready()])
True
['[INTR] a [HEAD] 42 [END]', '[INTR] b [HEAD] 84 [END]']

```
"""

from .executor import ANONYMOUS_ERROR_ID, FINAL_STATUSES, RESERVED_IDS, CallRecord, Interrupt, ToolExecutor
from .parsing import (
    MAX_BODY_CHARS,
    ArgumentError,
    CallParseError,
    ParsedCall,
    Ref,
    bind_arguments,
    check_value,
    parse_call,
)
from .registry import Tool, ToolRegistry, UnknownToolError, normalize_schema

__all__ = [
    "ANONYMOUS_ERROR_ID",
    "FINAL_STATUSES",
    "MAX_BODY_CHARS",
    "RESERVED_IDS",
    "ArgumentError",
    "CallParseError",
    "CallRecord",
    "Interrupt",
    "ParsedCall",
    "Ref",
    "Tool",
    "ToolExecutor",
    "ToolRegistry",
    "UnknownToolError",
    "bind_arguments",
    "check_value",
    "normalize_schema",
    "parse_call",
]
