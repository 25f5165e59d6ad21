"""Streaming clients of remote serving engines, behind one small interface.

A backend turns one :class:`SegmentRequest` (a prompt and sampling parameters) into a
:class:`SegmentStream` of :class:`StreamChunk` objects, and every failure into a
:class:`RemoteEngineError` that names the endpoint and says whether the request may be retried.
The asynchronous loop (:mod:`hf_asynclm.remote.remote_lm`) does the rest: it watches the text
for CML blocks, closes a stream to inject interrupts and re-submits a longer prompt.

Two backends:

* :class:`TGIBackend` -- Text Generation Inference, through
  ``huggingface_hub.InferenceClient(model=endpoint).text_generation(prompt, stream=True,
  details=True, ...)``. With a bare server URL the client posts to the server's root route,
  which TGI answers exactly as ``/generate_stream`` when the body says ``"stream": true``.
  Server-sent events carry one token each; the last one carries ``details`` (finish reason,
  token counts); errors arrive as ``{"error": ..., "error_type": ...}``.
* :class:`OpenAICompletionsBackend` -- any OpenAI-compatible ``/v1/completions`` server
  (vLLM, SGLang, llama.cpp server, ``transformers serve``): ``data: {...}`` events with
  ``choices[0].text``, ending with ``data: [DONE]`` or with a chunk that has a
  ``finish_reason``. It speaks HTTP through ``httpx2`` (the client ``huggingface_hub`` 2.x
  installs) or ``httpx`` (``huggingface_hub`` 1.x).

Example:

```python
>>> from hf_asynclm.remote.backends import SegmentRequest, make_backend
>>> backend = make_backend("http://127.0.0.1:8080", "tgi", timeout_s=30)
>>> backend.name, backend.endpoint
('tgi', 'http://127.0.0.1:8080')
>>> stream = backend.open(SegmentRequest("Hello", max_new_tokens=8))  # doctest: +SKIP
>>> "".join(chunk.text for chunk in stream)                            # doctest: +SKIP
' world, how are you?'

```
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

from ..cml import MARKERS

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "OpenAICompletionsBackend",
    "RemoteBackend",
    "RemoteEngineError",
    "SegmentRequest",
    "SegmentStream",
    "StreamChunk",
    "TGIBackend",
    "make_backend",
]

#: Finish reasons after normalisation: the model ended (``eos``), a stop string matched
#: (``stop_sequence``), the token limit of the request was reached (``length``), or the server
#: said ``stop`` without telling which of the first two happened (OpenAI-style servers).
FINISH_REASONS = ("eos", "stop_sequence", "length", "stop")

_ERROR_BODY_CHARS = 500


class RemoteEngineError(RuntimeError):
    """A remote engine failed: unreachable, HTTP error, error event, cut stream, timeout.

    The message always names the endpoint.

    Attributes:
        endpoint: the server's URL.
        status: the HTTP status code, when there was one.
        kind: ``connection``, ``http``, ``timeout``, ``stream_error``, ``cut``, ``protocol``
            or ``config``.
        retryable: True when the same request may succeed later (5xx, 429, connection errors,
            server-side generation errors, cut streams); False for client errors (4xx,
            validation), timeouts and configuration problems.

    Example:

    ```python
    >>> from hf_asynclm.remote import RemoteEngineError
    >>> err = RemoteEngineError("HTTP 503: overloaded", endpoint="http://gpu1:8080", status=503, retryable=True)
    >>> str(err)
    'http://gpu1:8080: HTTP 503: overloaded'
    >>> err.retryable, err.kind
    (True, 'http')

    ```
    """

    def __init__(
        self,
        message: str,
        *,
        endpoint: str,
        status: int | None = None,
        kind: str | None = None,
        retryable: bool = False,
    ) -> None:
        self.endpoint = endpoint
        self.status = status
        self.kind = kind or ("http" if status is not None else "error")
        self.retryable = retryable
        self.detail = message
        super().__init__(message if endpoint in message else f"{endpoint}: {message}")


@dataclass
class SegmentRequest:
    """One streaming request: a prompt and how to continue it.

    Attributes:
        prompt: the full text the model continues (prompt, generated text, interrupts).
        max_new_tokens: tokens the server may generate for this request.
        stop: stop strings the server should honour (the remote loop adds its own).
        temperature: sampling temperature; None or 0: greedy (the server's default for None).
        top_p: nucleus sampling; None: the server's default.
        seed: random seed of the server's sampler.
        extra: more JSON fields for the request body (OpenAI backend only), e.g.
            ``{"skip_special_tokens": False}`` for vLLM serving a checkpoint whose CML markers
            are special tokens.
    """

    prompt: str
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StreamChunk:
    """A piece of streamed output.

    Attributes:
        text: the text to append to the model's output ('' for tokens that carry no text, such
            as EOS).
        tokens: how many generated tokens this chunk stands for (0 for a bare final chunk).
        token_id: the token's id, when the server sends it (TGI).
        finish_reason: set on the last chunk: one of :data:`FINISH_REASONS`.
        stop_string: the stop string that ended the generation, when the server says which.
        generated_tokens: the server's count of generated tokens (last chunk, when sent).
        prompt_tokens: the server's count of prompt tokens (last chunk, when sent).
    """

    text: str
    tokens: int = 1
    token_id: int | None = None
    finish_reason: str | None = None
    stop_string: str | None = None
    generated_tokens: int | None = None
    prompt_tokens: int | None = None


class SegmentStream(Protocol):
    """An open streaming response: iterate it for :class:`StreamChunk` objects, then close it.

    Iteration raises :class:`RemoteEngineError` on failures. ``close`` (idempotent, from the
    thread that iterates) ends the HTTP request, which cancels generation on engines that watch
    for disconnects (TGI, vLLM). ``abort`` may be called from any other thread: the iteration
    then stops at once or at its next event.
    """

    def __iter__(self) -> Iterator[StreamChunk]: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class RemoteBackend(Protocol):
    """What the remote loop needs from a serving engine.

    Attributes:
        name: ``tgi`` or ``openai``.
        endpoint: the server URL, as given.
        stop_in_output: True when the server streams the text of a matched stop string (TGI,
            ``transformers serve``); False when it drops it (vLLM, SGLang, llama.cpp), in which
            case the loop only asks the server to stop where it can tell which string matched.
        max_stop_sequences: most stop strings one request may carry (None: no limit).
    """

    name: str
    endpoint: str
    stop_in_output: bool
    max_stop_sequences: int | None

    def open(self, request: SegmentRequest) -> SegmentStream: ...


def _http_module() -> Any:
    """The HTTP client library of the installed ``huggingface_hub``: ``httpx2``, else ``httpx``."""
    try:
        import httpx2

        return httpx2
    except ImportError:  # huggingface_hub 1.x
        import httpx

        return httpx


def _is_marker(text: str) -> bool:
    return text.strip() in MARKERS


def _retryable_status(status: int) -> bool:
    return status >= 500 or status in (408, 429)


def _classify_transport_error(exc: BaseException, endpoint: str, what: str) -> RemoteEngineError:
    """Map an httpx/httpx2 (or socket) exception to a RemoteEngineError."""
    name = type(exc).__name__
    if name in ("ConnectTimeout", "PoolTimeout"):
        return RemoteEngineError(f"cannot connect ({name}) while {what}: {exc}", endpoint=endpoint, kind="connection", retryable=True)
    if name in ("ReadTimeout", "WriteTimeout", "TimeoutException") or isinstance(exc, (socket.timeout, TimeoutError)):
        return RemoteEngineError(
            f"the server did not answer in time ({name}) while {what}: {exc}", endpoint=endpoint, kind="timeout", retryable=False
        )
    if name == "ConnectError" or isinstance(exc, ConnectionRefusedError):
        return RemoteEngineError(
            f"server unreachable ({name}) while {what}: {exc}", endpoint=endpoint, kind="connection", retryable=True
        )
    if name in ("RemoteProtocolError", "ReadError", "CloseError", "NetworkError", "StreamError") or isinstance(exc, ConnectionError):
        return RemoteEngineError(
            f"the stream was cut ({name}) while {what}: {exc}", endpoint=endpoint, kind="cut", retryable=True
        )
    return RemoteEngineError(f"{name} while {what}: {exc}", endpoint=endpoint, kind="connection", retryable=True)


def _shutdown_response_socket(response: Any) -> None:
    """Shut down the socket under an httpx response, waking a thread blocked reading it."""
    try:
        stream = response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except Exception:  # best effort: the reader also stops at its next chunk
        logger.debug("could not shut the stream's socket down", exc_info=True)


# ---------------------------------------------------------------------------------------------
# TGI
# ---------------------------------------------------------------------------------------------


class TGIBackend:
    """Text Generation Inference through ``huggingface_hub.InferenceClient``.

    Args:
        endpoint: the server, e.g. ``http://127.0.0.1:8080`` (a full route such as
            ``.../generate_stream`` is used as given).
        timeout_s: connect and read timeout of each request (the longest silence between two
            tokens).
        token: bearer token sent to the server (None: ``huggingface_hub``'s stored token, if any).
        headers: more HTTP headers.
        max_stop_sequences: TGI's ``--max-stop-sequences`` (4 by default).
        transport: ``"inference_client"`` (``huggingface_hub.InferenceClient``), ``"http"`` (the
            same protocol spoken directly to ``/generate_stream``) or ``"auto"`` (the default:
            InferenceClient, unless ``HF_HUB_OFFLINE`` is set -- InferenceClient then refuses
            every request, even to a local server -- in which case ``http``).

    TGI keeps the text of a matched stop string in the stream, and stops at it itself.
    ``temperature`` 0 or None means greedy decoding (TGI refuses ``temperature=0``), and
    ``top_p`` 1.0 is not sent (TGI wants ``top_p < 1``).
    """

    name = "tgi"
    stop_in_output = True

    def __init__(
        self,
        endpoint: str,
        *,
        timeout_s: float = 60.0,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        max_stop_sequences: int | None = 4,
        transport: str = "auto",
    ) -> None:
        if transport not in ("auto", "inference_client", "http"):
            raise ValueError(f"unknown transport {transport!r}: use 'auto', 'inference_client' or 'http'")
        self.endpoint = endpoint.rstrip("/")
        self.timeout_s = timeout_s
        self.token = token
        self.headers = dict(headers or {})
        self.max_stop_sequences = max_stop_sequences
        self.transport = transport

    def __repr__(self) -> str:
        return f"TGIBackend({self.endpoint!r})"

    def parameters(self, request: SegmentRequest) -> dict[str, Any]:
        """The ``text_generation`` keyword arguments for ``request``."""
        kwargs: dict[str, Any] = {"max_new_tokens": max(1, int(request.max_new_tokens))}
        if request.stop:
            stops = list(request.stop)
            if self.max_stop_sequences is not None:
                stops = stops[: self.max_stop_sequences]
            kwargs["stop"] = stops
        sample = bool(request.temperature) and request.temperature > 0  # type: ignore[operator]
        if request.top_p is not None and 0 < request.top_p < 1:
            sample = True
            kwargs["top_p"] = float(request.top_p)
        if sample:
            kwargs["do_sample"] = True
            if request.temperature:
                kwargs["temperature"] = float(request.temperature)
        else:
            kwargs["do_sample"] = False
        if request.seed is not None:
            kwargs["seed"] = int(request.seed)
        return kwargs

    def open(self, request: SegmentRequest) -> SegmentStream:
        """Send ``request`` and return the open stream (raises :class:`RemoteEngineError`)."""
        if self._use_http():
            return self._open_http(request)
        from huggingface_hub import InferenceClient

        client = InferenceClient(model=self.endpoint, token=self.token, timeout=self.timeout_s, headers=self.headers or None)
        try:
            events = client.text_generation(request.prompt, stream=True, details=True, **self.parameters(request))
        except BaseException as exc:
            client.close()
            raise self._error(exc, "opening the stream") from exc
        return _TGIStream(self, client, iter(events))

    def _use_http(self) -> bool:
        if self.transport != "auto":
            return self.transport == "http"
        from huggingface_hub import constants

        offline = bool(constants.is_offline_mode()) if hasattr(constants, "is_offline_mode") else bool(constants.HF_HUB_OFFLINE)
        if offline and not getattr(self, "_warned_offline", False):
            self._warned_offline = True
            logger.info("HF_HUB_OFFLINE is set: talking to %s without InferenceClient (which would refuse)", self.endpoint)
        return offline

    @property
    def stream_url(self) -> str:
        """The ``/generate_stream`` URL (used by the ``http`` transport)."""
        return self.endpoint if self.endpoint.endswith("/generate_stream") else self.endpoint + "/generate_stream"

    def _open_http(self, request: SegmentRequest) -> "_TGIHTTPStream":
        headers = dict(self.headers)
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        body = {"inputs": request.prompt, "parameters": {**self.parameters(request), "details": True}}
        client, response = _open_sse(self.endpoint, self.stream_url, body, headers, self.timeout_s)
        return _TGIHTTPStream(self.endpoint, self.stream_url, client, response)

    # errors ------------------------------------------------------------------------------------
    def _error(self, exc: BaseException, what: str) -> RemoteEngineError:
        if isinstance(exc, RemoteEngineError):
            return exc
        from huggingface_hub import errors as hf_errors

        endpoint = self.endpoint
        if isinstance(exc, hf_errors.OfflineModeIsEnabled):
            return RemoteEngineError(
                f"HF_HUB_OFFLINE is set, and huggingface_hub's InferenceClient then refuses every request, even to a "
                f"local server: unset HF_HUB_OFFLINE for this process ({exc})",
                endpoint=endpoint,
                kind="config",
            )
        if isinstance(exc, hf_errors.TextGenerationError):
            cause = exc.__cause__
            status = getattr(getattr(cause, "response", None), "status_code", None)
            kind = "http" if status is not None else "stream_error"
            error_type = type(exc).__name__
            if isinstance(exc, hf_errors.ValidationError):
                retryable = False
            elif status is not None:
                retryable = _retryable_status(status)
            else:
                retryable = True  # generation / overloaded / incomplete errors of the server
            prefix = f"HTTP {status} " if status is not None else "error event "
            return RemoteEngineError(
                f"{prefix}({error_type}) while {what}: {exc}", endpoint=endpoint, status=status, kind=kind, retryable=retryable
            )
        if isinstance(exc, hf_errors.HfHubHTTPError):
            response = getattr(exc, "response", None)
            status = getattr(response, "status_code", None)
            body = ""
            try:
                body = response.text[:_ERROR_BODY_CHARS] if response is not None else ""
            except Exception:
                body = ""
            message = f"HTTP {status} while {what}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            if body and body not in message:
                message += f" -- {body}"
            return RemoteEngineError(
                message, endpoint=endpoint, status=status, kind="http", retryable=status is not None and _retryable_status(status)
            )
        if isinstance(exc, hf_errors.InferenceTimeoutError):
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            mapped = _classify_transport_error(cause, endpoint, what)
            if mapped.kind == "connection" and type(cause).__name__ not in ("ConnectTimeout", "PoolTimeout"):
                mapped = RemoteEngineError(mapped.detail, endpoint=endpoint, kind="timeout", retryable=False)
            return mapped
        if isinstance(exc, json.JSONDecodeError):
            return RemoteEngineError(f"malformed event while {what}: {exc}", endpoint=endpoint, kind="protocol", retryable=False)
        if isinstance(exc, ValueError) and "not served via TGI" in str(exc):
            return RemoteEngineError(
                f"the server does not speak TGI's streaming protocol (use backend='openai' for OpenAI-compatible "
                f"servers): {exc}",
                endpoint=endpoint,
                kind="config",
            )
        return _classify_transport_error(exc, endpoint, what)


class _TGIStream:
    """An open TGI stream: one chunk per token event."""

    def __init__(self, backend: TGIBackend, client: Any, events: Iterator[Any]) -> None:
        self.backend = backend
        self._client = client
        self._events = events
        self._closed = False

    def __iter__(self) -> Iterator[StreamChunk]:
        try:
            for event in self._events:
                if self._closed:
                    return
                yield self._chunk(event)
                if event.details is not None:
                    return
            if not self._closed:
                raise RemoteEngineError(
                    "the stream ended before its last event (no details)", endpoint=self.backend.endpoint, kind="cut", retryable=True
                )
        except GeneratorExit:
            raise
        except BaseException as exc:
            if self._closed:
                return
            raise self.backend._error(exc, "reading the stream") from exc
        finally:
            self.close()

    def _chunk(self, event: Any) -> StreamChunk:
        token = event.token
        details = event.details
        if details is not None:
            details = {
                "finish_reason": details.finish_reason,
                "generated_tokens": getattr(details, "generated_tokens", None),
                "input_length": getattr(details, "input_length", None),
            }
        return _tgi_chunk(token.text, token.id, token.special, details)

    def abort(self) -> None:
        """Ask the reading thread to stop at its next event (safe from any thread)."""
        self._closed = True

    def close(self) -> None:
        if getattr(self, "_released", False):
            return
        self._closed = True
        self._released = True
        try:
            self._client.close()  # closes the HTTP response: TGI cancels the request
        except Exception:
            logger.debug("error while closing a TGI stream", exc_info=True)


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible /v1/completions
# ---------------------------------------------------------------------------------------------


def _tgi_chunk(text: str | None, token_id: int | None, special: bool, details: dict[str, Any] | None) -> StreamChunk:
    """A TGI token event as a chunk (special tokens other than CML markers carry no text)."""
    text = text or ""
    if special and not _is_marker(text):
        text = ""  # eos / pad: no text in the model's context
    if not details:
        return StreamChunk(text=text, tokens=1, token_id=token_id)
    reason = str(details.get("finish_reason"))
    reason = {"eos_token": "eos", "stop_sequence": "stop_sequence", "length": "length"}.get(reason, reason)
    return StreamChunk(
        text=text,
        tokens=1,
        token_id=token_id,
        finish_reason=reason,
        generated_tokens=details.get("generated_tokens"),
        prompt_tokens=details.get("input_length"),
    )


def completions_url(endpoint: str) -> str:
    """The ``/v1/completions`` URL of an OpenAI-compatible server.

    Example:

    ```python
    >>> from hf_asynclm.remote.backends import completions_url
    >>> completions_url("http://127.0.0.1:8000"), completions_url("http://h:1/v1/")
    ('http://127.0.0.1:8000/v1/completions', 'http://h:1/v1/completions')

    ```
    """
    url = endpoint.rstrip("/")
    if url.endswith("/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/completions"
    return url + "/v1/completions"


class OpenAICompletionsBackend:
    """OpenAI-compatible ``/v1/completions`` streaming (vLLM, SGLang, llama.cpp, ``transformers serve``).

    Args:
        endpoint: the server (``http://host:port``, ``.../v1`` or the full completions URL).
        model: the ``model`` field of requests (servers that serve one model may not need it).
        timeout_s: connect and read timeout (the longest silence between two chunks).
        api_key: sent as ``Authorization: Bearer ...``.
        headers: more HTTP headers.
        extra_body: more JSON fields for every request (e.g. ``{"skip_special_tokens": False}``).
        stop_in_output: whether the server streams the text of a matched stop string
            (``transformers serve`` does; vLLM, SGLang and llama.cpp do not by default).
        max_stop_sequences: most stop strings per request (OpenAI allows 4).
    """

    name = "openai"

    def __init__(
        self,
        endpoint: str,
        *,
        model: str | None = None,
        timeout_s: float = 60.0,
        api_key: str | None = None,
        headers: dict[str, str] | None = None,
        extra_body: dict[str, Any] | None = None,
        stop_in_output: bool = False,
        max_stop_sequences: int | None = 4,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.url = completions_url(endpoint)
        self.model = model
        self.timeout_s = timeout_s
        self.api_key = api_key
        self.headers = dict(headers or {})
        self.extra_body = dict(extra_body or {})
        self.stop_in_output = stop_in_output
        self.max_stop_sequences = max_stop_sequences

    def __repr__(self) -> str:
        return f"OpenAICompletionsBackend({self.url!r}, model={self.model!r})"

    def body(self, request: SegmentRequest) -> dict[str, Any]:
        """The JSON body of a streaming completions request."""
        body: dict[str, Any] = {"prompt": request.prompt, "stream": True, "max_tokens": max(1, int(request.max_new_tokens))}
        # the server's token counts: vLLM, SGLang and `transformers serve` (5.25 on) send them only in a last
        # usage chunk when asked; our own count of streamed chunks falls short where a chunk holds several tokens
        body["stream_options"] = {"include_usage": True}
        if self.model is not None:
            body["model"] = self.model
        if request.stop:
            stops = list(request.stop)
            if self.max_stop_sequences is not None:
                stops = stops[: self.max_stop_sequences]
            body["stop"] = stops
        if request.temperature is not None:
            body["temperature"] = float(request.temperature)
        if request.top_p is not None:
            body["top_p"] = float(request.top_p)
        if request.seed is not None:
            body["seed"] = int(request.seed)
        body.update(self.extra_body)
        body.update(request.extra)
        return body

    def open(self, request: SegmentRequest) -> "_OpenAIStream":
        """Send ``request`` and return the open stream (raises :class:`RemoteEngineError`)."""
        headers = dict(self.headers)
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        client, response = _open_sse(self.endpoint, self.url, self.body(request), headers, self.timeout_s)
        return _OpenAIStream(self, client, response)


def _error_details(text: str) -> tuple[str, str | None]:
    """The message and type of a JSON error body (TGI, OpenAI, vLLM, FastAPI styles), else the text."""
    try:
        data = json.loads(text)
    except (ValueError, TypeError):
        return text.strip(), None
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data.get("message")))
        if isinstance(err, dict):
            return str(err.get("message") or err), (str(err["type"]) if err.get("type") else None)
        if err is not None:
            return str(err), (str(data["error_type"]) if data.get("error_type") else None)
    return text.strip(), None


class _SSEStream:
    """An open HTTP response of server-sent events (``data: {...}`` lines), parsed by ``parse``."""

    def __init__(self, endpoint: str, url: str, client: Any, response: Any) -> None:
        self.endpoint = endpoint
        self.url = url
        self._client = client
        self._response = response
        self._closed = False

    def parse(self, data: Any) -> StreamChunk | None:  # pragma: no cover - overridden
        raise NotImplementedError

    #: Whether events may follow the finish chunk before ``[DONE]`` (OpenAI's usage chunk): the finish
    #: chunk is then held until ``[DONE]`` or the end of the stream, and those events go to :meth:`trailer`.
    trailing_events = False

    def trailer(self, finish: StreamChunk, data: Any) -> StreamChunk:
        """An event after the finish chunk (before ``[DONE]``): the finish chunk to yield (by default unchanged)."""
        return finish

    def __iter__(self) -> Iterator[StreamChunk]:
        finish: StreamChunk | None = None
        try:
            for line in self._response.iter_lines():
                if self._closed:
                    return
                if not line.startswith("data:"):
                    continue  # blank lines, comments (": ping"), event: / id: fields
                payload = line[len("data:") :].strip()
                if payload == "[DONE]":
                    break
                if finish is not None:  # e.g. the usage chunk (stream_options.include_usage); never an error now
                    try:
                        finish = self.trailer(finish, json.loads(payload))
                    except ValueError:
                        pass
                    continue
                try:
                    data = json.loads(payload)
                except ValueError as exc:
                    raise RemoteEngineError(
                        f"malformed event from {self.url}: {payload[:200]!r}", endpoint=self.endpoint, kind="protocol"
                    ) from exc
                chunk = self.parse(data)
                if chunk is None:
                    continue
                if chunk.finish_reason is not None and self.trailing_events:
                    finish = chunk  # held until [DONE] or the stream's end: a usage chunk may follow
                    continue
                yield chunk
                if chunk.finish_reason is not None:
                    return
            if finish is not None:
                yield finish
                return
            if not self._closed:
                raise RemoteEngineError(
                    f"the stream of {self.url} ended without a finish reason", endpoint=self.endpoint, kind="cut", retryable=True
                )
        except GeneratorExit:
            raise
        except RemoteEngineError:
            if self._closed:
                return
            raise
        except BaseException as exc:
            if self._closed:
                return
            raise _classify_transport_error(exc, self.endpoint, f"reading the stream of {self.url}") from exc
        finally:
            self.close()

    def abort(self) -> None:
        """Stop the stream from another thread: the socket is shut down, which wakes the reader."""
        self._closed = True
        _shutdown_response_socket(self._response)

    def close(self) -> None:
        if getattr(self, "_released", False):
            return
        self._closed = True
        self._released = True
        _shutdown_response_socket(self._response)
        try:
            self._response.close()
        except Exception:
            logger.debug("error while closing a stream", exc_info=True)
        try:
            self._client.close()
        except Exception:
            logger.debug("error while closing the HTTP client", exc_info=True)


def _open_sse(endpoint: str, url: str, body: dict[str, Any], headers: dict[str, str], timeout_s: float) -> tuple[Any, Any]:
    """POST ``body`` to ``url`` for a server-sent-event stream; raise RemoteEngineError on failure."""
    http = _http_module()
    timeout = http.Timeout(timeout_s, connect=min(timeout_s, 30.0))
    client = http.Client(timeout=timeout, follow_redirects=True)
    response = None
    try:
        response = client.send(
            client.build_request("POST", url, json=body, headers={"Accept": "text/event-stream", **headers}), stream=True
        )
        if response.status_code >= 400:
            try:
                text = response.read().decode("utf-8", "replace")[:_ERROR_BODY_CHARS]
            except Exception:
                text = ""
            detail, error_type = _error_details(text)
            status = response.status_code
            raise RemoteEngineError(
                f"HTTP {status} from {url}: {detail or response.reason_phrase}",
                endpoint=endpoint,
                status=status,
                kind="http",
                retryable=_retryable_status(status) and error_type != "validation",
            )
    except BaseException as exc:
        if response is not None:
            response.close()
        client.close()
        if isinstance(exc, RemoteEngineError):
            raise
        raise _classify_transport_error(exc, endpoint, f"opening {url}") from exc
    return client, response


class _TGIHTTPStream(_SSEStream):
    """TGI's ``/generate_stream`` read directly (the ``http`` transport of :class:`TGIBackend`)."""

    def parse(self, data: Any) -> StreamChunk | None:
        if not isinstance(data, dict):
            return None
        if data.get("error") is not None:
            error_type = data.get("error_type")
            raise RemoteEngineError(
                f"error event ({error_type or 'unknown'}) from {self.url}: {data['error']}",
                endpoint=self.endpoint,
                kind="stream_error",
                retryable=error_type != "validation",
            )
        token = data.get("token") or {}
        return _tgi_chunk(token.get("text"), token.get("id"), bool(token.get("special")), data.get("details"))


class _OpenAIStream(_SSEStream):
    """An open ``/v1/completions`` stream."""

    trailing_events = True

    def __init__(self, backend: "OpenAICompletionsBackend", client: Any, response: Any) -> None:
        super().__init__(backend.endpoint, backend.url, client, response)
        self.backend = backend

    def parse(self, data: Any) -> StreamChunk | None:
        return self._chunk(data)

    def trailer(self, finish: StreamChunk, data: Any) -> StreamChunk:
        """The usage chunk after the finish chunk: the server's token counts win over ours."""
        usage = data.get("usage") if isinstance(data, dict) else None
        if not isinstance(usage, dict):
            return finish
        counts: dict[str, int] = {}
        for field, key in (("generated_tokens", "completion_tokens"), ("prompt_tokens", "prompt_tokens")):
            if getattr(finish, field) is None and isinstance(usage.get(key), int):
                counts[field] = usage[key]
        return dataclasses.replace(finish, **counts) if counts else finish

    def _chunk(self, data: Any) -> StreamChunk | None:
        backend = self.backend
        if not isinstance(data, dict):
            return None
        if data.get("error") is not None:
            err = data["error"]
            message = err.get("message", err) if isinstance(err, dict) else err
            code = err.get("code") if isinstance(err, dict) else None
            try:
                status = int(code) if code is not None else None
            except (TypeError, ValueError):
                status = None
            etype = str(err.get("type", "")) if isinstance(err, dict) else ""
            retryable = not (status is not None and 400 <= status < 500 and status not in (408, 429)) and "invalid_request" not in etype
            raise RemoteEngineError(
                f"error event from {backend.url}: {message}", endpoint=backend.endpoint, status=status, kind="stream_error", retryable=retryable
            )
        usage = data.get("usage") or {}
        choices = data.get("choices") or []
        if not choices:
            return None
        choice = choices[0]
        text = choice.get("text") or ""
        reason = choice.get("finish_reason")
        if reason is None:
            return StreamChunk(text=text, tokens=1 if text else 0) if text else None
        stop_string = None
        matched = choice.get("stop_reason", choice.get("matched_stop", choice.get("stopping_word")))
        if isinstance(matched, str) and matched:
            stop_string = matched
        if reason == "length":
            norm = "length"
        elif stop_string is not None:
            norm = "stop_sequence"
        elif "stop_reason" in choice or "matched_stop" in choice:
            norm = "eos"  # vLLM / SGLang say None (or a token id) when the model ended on EOS
        else:
            norm = "stop"
        return StreamChunk(
            text=text,
            tokens=1 if text else 0,
            finish_reason=norm,
            stop_string=stop_string,
            generated_tokens=usage.get("completion_tokens"),
            prompt_tokens=usage.get("prompt_tokens"),
        )


#: Backend names and their classes.
BACKENDS: dict[str, type] = {"tgi": TGIBackend, "openai": OpenAICompletionsBackend}


def make_backend(endpoint: str, backend: str = "tgi", **kwargs: Any) -> Any:
    """Build the backend named ``backend`` (``tgi`` or ``openai``) for ``endpoint``.

    Keyword arguments that the backend does not take are ignored with a debug log (so that one
    set of options can serve both).
    """
    if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
        raise ValueError(f"endpoint must be an http(s) URL such as http://127.0.0.1:8080, got {endpoint!r}")
    try:
        cls = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}") from None
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "endpoint"}
    dropped = sorted(k for k in kwargs if k not in accepted)
    if dropped:
        logger.debug("%s backend ignores %s", backend, ", ".join(dropped))
    return cls(endpoint, **{k: v for k, v in kwargs.items() if k in accepted})
