"""Remote engines: asynchronous function calling on TGI and OpenAI-compatible servers.

Serving engines cannot inject tokens into a running request, so :class:`RemoteAsyncLM`
streams the model's text into the CML monitor and the tool executor, and at a safe point with
results ready (or on a trap) closes the stream and re-submits the prompt extended by the
generated text and the interrupts (the engine's prefix cache makes that cheap).

* :class:`RemoteAsyncLM` -- ``generate`` / ``stream`` / ``interrupt`` / ``cancel``, the API of
  :class:`~hf_asynclm.AsyncLM` (also reachable as ``AsyncLM.remote(endpoint, backend=...)``).
* :class:`TGIBackend` -- Text Generation Inference via ``huggingface_hub.InferenceClient``.
* :class:`OpenAICompletionsBackend` -- ``/v1/completions`` of vLLM, SGLang, llama.cpp,
  ``transformers serve``.
* :class:`RemoteEngineError` -- every failure, with the endpoint in its message.

Example:

```python
>>> from hf_asynclm.remote import RemoteAsyncLM
>>> rlm = RemoteAsyncLM("http://127.0.0.1:8000", backend="openai", model="cml-tiny")
>>> rlm.backend.url
'http://127.0.0.1:8000/v1/completions'
>>> result = rlm.generate("Weather in Oslo?", max_new_tokens=64, temperature=0)  # doctest: +SKIP

```
"""

from .backends import (
    BACKENDS,
    OpenAICompletionsBackend,
    RemoteBackend,
    RemoteEngineError,
    SegmentRequest,
    SegmentStream,
    StreamChunk,
    TGIBackend,
    completions_url,
    make_backend,
)
from .remote_lm import RemoteAsyncLM, RemoteSession, render_plain_prompt

__all__ = [
    "BACKENDS",
    "OpenAICompletionsBackend",
    "RemoteAsyncLM",
    "RemoteBackend",
    "RemoteEngineError",
    "RemoteSession",
    "SegmentRequest",
    "SegmentStream",
    "StreamChunk",
    "TGIBackend",
    "completions_url",
    "make_backend",
    "render_plain_prompt",
]
