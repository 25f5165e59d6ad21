"""A scripted serving engine on loopback, for tests (standard library only).

:class:`FakeEngine` "generates" a fixed CML script and speaks two wire protocols:

* TGI: ``POST /generate_stream`` and ``POST /`` with ``"stream": true`` (TGI's compat route,
  where ``InferenceClient(model=url).text_generation(..., stream=True)`` posts). Server-sent
  events exactly as TGI writes them: ``data:{"index":i,"token":{"id":..,"text":..,
  "logprob":..,"special":false},"generated_text":null,"details":null}``; the last event carries
  ``generated_text`` and ``details`` (``finish_reason`` ``eos_token`` / ``stop_sequence`` /
  ``length``, ``generated_tokens``, ``seed``, ``input_length``); at the end of the script the
  last token is a special EOS (``</s>``), as with TGI. Errors: ``data:{"error":..,
  "error_type":..}`` in the stream, or a JSON body with an HTTP status.
* OpenAI ``POST /v1/completions`` (``stream: true``): ``data: {"choices":[{"text":..,
  "finish_reason":null}]}`` ... a last chunk with ``finish_reason`` (``stop`` / ``length``),
  ``stop_reason`` (the matched stop string, as vLLM) and ``usage``, then ``data: [DONE]``.
  By default a matched stop string is dropped from the text, as vLLM does.

Continuation: the engine takes the text after the last ``cue`` in the prompt (default
``"Assistant:"``), removes the ``[INTR] ... [END]`` blocks the client injected, checks that
what is left is a prefix of the script (HTTP 400 otherwise: the client's prompt diverged) and
streams the rest, honouring ``stop`` and ``max_new_tokens``. So re-submissions continue where
the previous segment ended, like a real model with its prompt extended.

Every request is recorded (:attr:`FakeEngine.requests`: prompt, parameters, tokens sent, how
it ended, whether the client went away). Faults, consumed one per request from
:attr:`FakeEngine.faults`: ``{"status": 500}``, ``{"status": 422, "error_type": "validation"}``,
``{"cut_after": n}`` (drop the connection after n tokens), ``{"error_after": n, "error_type":
"generation"}`` (an error event after n tokens), ``{"hang_after": n, "hang_s": s}`` (stop
sending after n tokens for s seconds, then drop the connection).

Example:

```python
>>> from huggingface_hub import InferenceClient
>>> from fake_tgi import FakeEngine
>>> with FakeEngine("Hello world [TRAP] [END] bye") as engine:
...     client = InferenceClient(model=engine.url)
...     out = list(client.text_generation("Assistant:", stream=True, details=True, max_new_tokens=20, stop=["[TRAP] [END]"]))
>>> "".join(o.token.text for o in out), out[-1].details.finish_reason
('Hello world [TRAP] [END]', 'stop_sequence')

```
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

logger = logging.getLogger(__name__)

_TOKEN_RE = re.compile(r"\[(?:CALL|INTR|TRAP|HEAD|END)\]|\s+|[A-Za-z0-9_]+|[^\sA-Za-z0-9_]")
_INTR_RE = re.compile(r"\[INTR\].*?\[END\]", re.S)
EOS_TEXT = "</s>"
EOS_ID = 2


def tokenize(text: str) -> list[str]:
    """Split text the way the fake engine "generates" it: markers, words, spaces, punctuation."""
    return _TOKEN_RE.findall(text)


@dataclass
class RecordedRequest:
    """One request the engine received."""

    path: str
    body: dict[str, Any]
    protocol: str
    prompt: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    received_at: float = 0.0
    tokens_sent: int = 0
    text_sent: str = ""
    finish: str = ""
    disconnected: bool = False
    fault: dict[str, Any] | None = None


class _Disconnected(Exception):
    pass


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # clients that close streams early (which the remote loop does on purpose) are not errors
        logger.debug("fake engine: connection from %s ended abruptly", client_address, exc_info=True)


class FakeEngine:
    """Scripted TGI / OpenAI-completions server on ``127.0.0.1:<free port>``.

    Args:
        script: the text the "model" writes after ``cue`` (CML blocks included, no interrupts).
        cue: where the model's part of the prompt starts (the last occurrence wins).
        token_delay_s: seconds between two tokens (and before the first).
        faults: fault specs, one per request in order (None: a normal request).
        openai_stop_in_output: keep a matched stop string in OpenAI streams (vLLM drops it).
        tokens_per_chunk: OpenAI streams: tokens per chunk (``transformers serve`` 5.25 and vLLM /
            SGLang with a stream interval send several; the usage still counts tokens).
    """

    def __init__(
        self,
        script: str,
        *,
        cue: str = "Assistant:",
        token_delay_s: float = 0.0,
        faults: list[dict[str, Any] | None] | None = None,
        openai_stop_in_output: bool = False,
        tokens_per_chunk: int = 1,
    ) -> None:
        self.script = script
        self.cue = cue
        self.token_delay_s = token_delay_s
        self.faults: list[dict[str, Any] | None] = list(faults or [])
        self.openai_stop_in_output = openai_stop_in_output
        self.tokens_per_chunk = tokens_per_chunk
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        engine = self

        class Handler(_Handler):
            pass

        Handler.engine = engine
        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    # lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FakeEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # script ----------------------------------------------------------------------------------
    def continuation(self, prompt: str) -> str | None:
        """What is left of the script after the model text in ``prompt`` (None: it diverged)."""
        written = prompt.rsplit(self.cue, 1)[1] if self.cue in prompt else ""
        written = _INTR_RE.sub("", written)
        if not self.script.startswith(written):
            return None
        return self.script[len(written) :]

    def next_fault(self) -> dict[str, Any] | None:
        with self._lock:
            return self.faults.pop(0) if self.faults else None

    def record(self, req: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(req)

    def sleep(self, seconds: float) -> None:
        self._closing.wait(seconds)

    @property
    def prompts(self) -> list[str]:
        """The prompts of all requests, in order."""
        return [r.prompt for r in self.requests]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    engine: FakeEngine

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        logger.debug("fake engine: " + format, *args)

    # plumbing --------------------------------------------------------------------------------
    def _json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _start_sse(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _chunk(self, text: str) -> None:
        data = text.encode()
        try:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            raise _Disconnected() from exc

    def _end_chunks(self) -> None:
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            pass

    def _drop(self) -> None:
        """Cut the connection without finishing the chunked body."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(2)
        except OSError:
            pass

    def do_GET(self) -> None:
        if self.path in ("/health", "/info"):
            self._json(200, {"status": "ok", "model_id": "fake-cml"})
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            self._json(400, {"error": "invalid JSON", "error_type": "validation"})
            return
        path = self.path.split("?")[0]
        if path in ("/", "/generate_stream"):
            self._tgi(path, body)
        elif path in ("/v1/completions",):
            self._openai(path, body)
        else:
            self._json(404, {"error": f"no route {path}"})

    # generation ------------------------------------------------------------------------------
    def _plan(self, req: RecordedRequest, stops: list[str], max_new: int) -> tuple[list[str], str] | None:
        """The tokens to send and the finish reason (None when the prompt diverged)."""
        rest = self.engine.continuation(req.prompt)
        if rest is None:
            return None
        tokens: list[str] = []
        text = ""
        for tok in tokenize(rest):
            if len(tokens) >= max_new:
                return tokens, "length"
            tokens.append(tok)
            text += tok
            if any(s and s in text for s in stops):
                return tokens, "stop_sequence"
        if len(tokens) >= max_new:
            return tokens, "length"
        return tokens, "eos_token"

    def _fault_status(self, req: RecordedRequest, fault: dict[str, Any] | None, tgi: bool) -> bool:
        if fault and "status" in fault:
            status = int(fault["status"])
            message = fault.get("message", f"injected HTTP {status}")
            req.finish = f"http_{status}"
            if tgi:
                payload: dict[str, Any] = {"error": message}
                if fault.get("error_type"):
                    payload["error_type"] = fault["error_type"]
            else:
                payload = {"error": {"message": message, "type": fault.get("error_type", "server_error"), "code": status}}
            self._json(status, payload)
            return True
        return False

    def _stream_tokens(self, req: RecordedRequest, tokens: list[str], fault: dict[str, Any] | None, emit: Any) -> bool:
        """Send tokens through ``emit(i, tok)``; False when a fault ended the stream."""
        for i, tok in enumerate(tokens):
            if fault:
                if fault.get("cut_after") == i:
                    req.finish = "cut"
                    self._drop()
                    return False
                if fault.get("error_after") == i:
                    return self._error_event(req, fault)
                if fault.get("hang_after") == i:
                    req.finish = "hang"
                    self.engine.sleep(float(fault.get("hang_s", 30)))
                    self._drop()
                    return False
            if self.engine.token_delay_s:
                self.engine.sleep(self.engine.token_delay_s)
            emit(i, tok)
            req.tokens_sent += 1
            req.text_sent += tok
        if fault and any(fault.get(k) == len(tokens) for k in ("cut_after", "error_after", "hang_after")):
            if fault.get("error_after") == len(tokens):
                return self._error_event(req, fault)
            req.finish = "cut"
            self._drop()
            return False
        return True

    def _error_event(self, req: RecordedRequest, fault: dict[str, Any]) -> bool:
        req.finish = "error_event"
        message = fault.get("message", "Request failed during generation: injected failure")
        if req.protocol == "tgi":
            self._chunk("data:" + json.dumps({"error": message, "error_type": fault.get("error_type", "generation")}) + "\n\n")
        else:
            self._chunk("data: " + json.dumps({"error": {"message": message, "type": fault.get("error_type", "server_error"), "code": fault.get("code", 500)}}) + "\n\n")
        self._end_chunks()
        return False

    # TGI ---------------------------------------------------------------------------------------
    def _tgi(self, path: str, body: dict[str, Any]) -> None:
        params = dict(body.get("parameters") or {})
        req = RecordedRequest(path=path, body=body, protocol="tgi", prompt=str(body.get("inputs", "")), parameters=params, received_at=time.monotonic())
        self.engine.record(req)
        fault = self.engine.next_fault()
        req.fault = fault
        if self._fault_status(req, fault, tgi=True):
            return
        if path == "/" and not body.get("stream"):
            self._json(400, {"error": "the fake engine only streams", "error_type": "validation"})
            return
        stops = list(params.get("stop") or [])
        if len(stops) > 4:
            self._json(422, {"error": f"`stop` supports up to 4 stop sequences. Given: {len(stops)}", "error_type": "validation"})
            return
        if params.get("temperature") is not None and float(params["temperature"]) <= 0:
            self._json(422, {"error": "`temperature` must be strictly positive", "error_type": "validation"})
            return
        max_new = int(params.get("max_new_tokens") or 100)
        plan = self._plan(req, stops, max_new)
        if plan is None:
            self._json(400, {"error": f"prompt diverged from the script: {req.prompt[-200:]!r}", "error_type": "validation"})
            return
        tokens, finish = plan
        input_length = len(tokenize(req.prompt))
        eos = finish == "eos_token"
        self._start_sse()

        def event(index: int, tok_text: str, tok_id: int, special: bool, generated_text: str | None, n_generated: int) -> str:
            payload: dict[str, Any] = {
                "index": index,
                "token": {"id": tok_id, "text": tok_text, "logprob": -0.25, "special": special},
                "generated_text": generated_text,
                "details": None,
            }
            if generated_text is not None:
                payload["details"] = {
                    "finish_reason": finish,
                    "generated_tokens": n_generated,
                    "seed": params.get("seed"),
                    "input_length": input_length,
                }
            return "data:" + json.dumps(payload) + "\n\n"

        def emit(i: int, tok: str) -> None:
            last = (i == len(tokens) - 1) and not eos
            self._chunk(event(i + 1, tok, 1000 + sum(map(ord, tok)) % 30000, False, req.text_sent + tok if last else None, len(tokens)))

        try:
            if not self._stream_tokens(req, tokens, fault, emit):
                return
            if eos:
                if self.engine.token_delay_s:
                    self.engine.sleep(self.engine.token_delay_s)
                self._chunk(event(len(tokens) + 1, EOS_TEXT, EOS_ID, True, req.text_sent, len(tokens) + 1))
            req.finish = finish
            self._end_chunks()
        except _Disconnected:
            req.disconnected = True
            req.finish = req.finish or "client_gone"

    # OpenAI ------------------------------------------------------------------------------------
    def _openai(self, path: str, body: dict[str, Any]) -> None:
        req = RecordedRequest(path=path, body=body, protocol="openai", prompt=str(body.get("prompt", "")), parameters=dict(body), received_at=time.monotonic())
        self.engine.record(req)
        fault = self.engine.next_fault()
        req.fault = fault
        if self._fault_status(req, fault, tgi=False):
            return
        if not body.get("stream"):
            self._json(400, {"error": {"message": "the fake engine only streams", "type": "invalid_request_error", "code": 400}})
            return
        stop = body.get("stop") or []
        stops = [stop] if isinstance(stop, str) else list(stop)
        max_new = int(body.get("max_tokens") or 16)
        plan = self._plan(req, stops, max_new)
        if plan is None:
            self._json(400, {"error": {"message": "prompt diverged from the script", "type": "invalid_request_error", "code": 400}})
            return
        tokens, finish = plan
        rid = f"cmpl-{uuid.uuid4().hex[:12]}"
        matched = None
        if finish == "stop_sequence":
            text = "".join(tokens)
            matched = next(s for s in stops if s in text)
            if not self.engine.openai_stop_in_output:
                # drop the stop string (and anything after it) from the last tokens, as vLLM does
                keep = text[: text.index(matched)]
                new_tokens: list[str] = []
                acc = ""
                for tok in tokens:
                    if len(acc) + len(tok) <= len(keep):
                        new_tokens.append(tok)
                        acc += tok
                    else:
                        if len(acc) < len(keep):
                            new_tokens.append(keep[len(acc) :])
                        break
                tokens = new_tokens
        self._start_sse()

        def chunk(text: str, reason: str | None, usage: dict[str, int] | None = None, stop_reason: Any = None) -> str:
            choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            if reason is not None:
                choice["stop_reason"] = stop_reason
            payload: dict[str, Any] = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": body.get("model", "fake-cml"), "choices": [choice]}
            if usage is not None:
                payload["usage"] = usage
            return "data: " + json.dumps(payload) + "\n\n"

        n = len(tokens) + (1 if finish == "eos_token" else 0)
        k = self.engine.tokens_per_chunk
        chunks = ["".join(tokens[i : i + k]) for i in range(0, len(tokens), k)]
        try:
            if not self._stream_tokens(req, chunks, fault, lambda i, text: self._chunk(chunk(text, None))):
                return
            reason = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}[finish]
            usage = {"prompt_tokens": len(tokenize(req.prompt)), "completion_tokens": n, "total_tokens": n + len(tokenize(req.prompt))}
            self._chunk(chunk("", reason, usage, stop_reason=matched))
            self._chunk("data: [DONE]\n\n")
            req.finish = finish
            self._end_chunks()
        except _Disconnected:
            req.disconnected = True
            req.finish = req.finish or "client_gone"
