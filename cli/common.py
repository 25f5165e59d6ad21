"""Pieces shared by ``hf-asynclm run`` and ``hf-asynclm chat``.

* :func:`model_options` -- the model / tools / backend / generation options of both commands.
* :func:`load_tools` -- ``--tools FILE.py|module.name|none`` (default: the built-in demo tools).
* :func:`load_alm` -- the :class:`~hf_asynclm.AsyncLM` for the options (local or remote),
  with one-line errors for an unknown model, a missing path or a bad endpoint.
* :class:`LiveDisplay` -- prints a generation's events as they happen: the visible text, and
  one line per call started / returned / injected, trap and user interrupt, with times
  relative to the start.
* :func:`user_errors` -- turns user errors (missing file, bad endpoint ...) into a one-line
  ``click.ClickException`` at the command boundary; ``HF_ASYNCLM_DEBUG=1`` shows tracebacks.

Nothing here imports torch or transformers at import time (``--help`` stays fast).

Example:

```python
>>> import io
>>> from rich.console import Console
>>> from hf_asynclm.streamer import StreamEvent
>>> out = io.StringIO()
>>> display = LiveDisplay(Console(file=out, width=120), t0=0.0)
>>> display.handle(StreamEvent("text", 0.1, text="Checking."))
>>> display.handle(StreamEvent("call_started", 0.21, text='get_weather(city="Paris")', call_id="w1", name="get_weather"))
>>> display.handle(StreamEvent("call_finished", 0.51, call_id="w1", name="get_weather", data={"status": "done", "result": '{"temp_c": 18}'}))
>>> display.handle(StreamEvent("interrupt", 0.52, text='[INTR] w1 [HEAD] {"temp_c": 18} [END]', call_id="w1"))
>>> print(out.getvalue(), end="")
Checking.
  ↳ w1 get_weather(city="Paris") started +0.21s
  ✓ w1 returned in 0.30s → {"temp_c": 18}
  ⇢ injected w1 (+0.52s)

```
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import urlparse

import click

from hf_asynclm.prompting import CML_MAX_NEW_TOKENS as DEFAULT_MAX_NEW_TOKENS  # torch-free

BACKENDS = ("local", "tgi", "openai")
MODES = ("async", "sync", "sync-parallel")  # hf_asynclm.generation.MODES, without importing torch
DEBUG_ENV = "HF_ASYNCLM_DEBUG"
_PREVIEW_CHARS = 100


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------
def one_line(error: BaseException, limit: int = 400) -> str:
    """``error`` as one line of at most ``limit`` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _network_error_types() -> tuple[type[BaseException], ...]:
    """Exception types of the HTTP stacks a remote backend may use (those installed)."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx", "HTTPError"), ("httpx", "StreamError"), ("requests", "RequestException"), ("hf_asynclm.remote", "RemoteEngineError")):
        mod = sys.modules.get(module)
        if mod is None:
            try:
                mod = importlib.import_module(module)
            except ImportError:
                continue
        cls = getattr(mod, name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            types.append(cls)
    return tuple(types)


@contextlib.contextmanager
def user_errors(what: str | None = None, network: bool = False) -> Iterator[None]:
    """Turn user errors (``OSError``, ``ValueError``, ``ImportError`` of an optional extra; network
    errors with ``network``) into one line.

    ``what`` prefixes the message (``"cannot load model x"`` -> ``Error: cannot load model x: ...``).
    With ``HF_ASYNCLM_DEBUG=1`` in the environment the original exception goes through.
    """
    caught: tuple[type[BaseException], ...] = (OSError, ValueError, ImportError)
    if network:
        caught += _network_error_types()
    try:
        yield
    except click.ClickException:
        raise
    except caught as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        message = one_line(exc)
        raise click.ClickException(f"{what}: {message}" if what else message) from None


# --------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------
@dataclass
class ModelSettings:
    """What the shared options say (see :func:`model_options`)."""

    model: str | None = None
    tools: str | None = None
    backend: str = "local"
    endpoint: str | None = None
    mode: str = "async"
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    seed: int = 0
    system_prompt: bool = True
    device: str | None = None
    call_timeout: float = 30.0
    interrupt_at: str | None = None  # None: the checkpoint's recorded choice, else token
    constrain_calls: str | None = None  # None: the checkpoint's recorded choice, else off
    no_repeat_calls: bool | None = None  # None: the checkpoint's recorded choice, else allowed
    complete_names: bool | None = None  # None: the checkpoint's recorded choice, else off
    quote_numbers: bool | None = None  # None: the checkpoint's recorded choice, else off
    emulate_tpot_ms: float | None = None
    emulate_ttft_ms: float | None = None

    @classmethod
    def pop_from(cls, kwargs: dict[str, Any]) -> "ModelSettings":
        """Take the shared options out of a command's keyword arguments."""
        names = [f for f in cls.__dataclass_fields__]
        return cls(**{name: kwargs.pop(name) for name in names if name in kwargs})

    @property
    def emulated(self) -> bool:
        return bool(self.emulate_tpot_ms) or bool(self.emulate_ttft_ms)

    def generation_kwargs(self, seed: int | None = None) -> dict[str, Any]:
        """Keyword arguments for ``AsyncLM.generate`` / ``stream`` (``seed``: override ``--seed``)."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens}
        if self.backend != "local":  # RemoteAsyncLM: temperature 0 is greedy; the server seeds its sampler
            kwargs.update(temperature=self.temperature, seed=self.seed if seed is None else seed)
        elif self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature)
        else:
            kwargs["do_sample"] = False
        return kwargs

    def validate(self) -> None:
        """Check option combinations (one-line ``click.UsageError`` otherwise)."""
        if self.backend == "local":
            if self.endpoint:
                raise click.UsageError("--endpoint is for --backend tgi or openai (the local backend loads --model itself)")
            if self.no_repeat_calls and self.constrain_calls == "off":
                raise click.UsageError("--no-repeat-calls works through constrained calls: leave out --constrain-calls off")
        else:
            if not self.endpoint:
                raise click.UsageError(f"--backend {self.backend} needs --endpoint URL (e.g. http://127.0.0.1:8080)")
            check_endpoint(self.endpoint)
            if self.emulated:
                raise click.UsageError("--emulate-tpot-ms/--emulate-ttft-ms slow a local model; they do not apply to a remote backend")
            if self.device:
                raise click.UsageError("--device applies to the local backend only")
            if self.interrupt_at is not None:
                raise click.UsageError("--interrupt-at applies to the local backend only (a server re-submits at safe points)")
            if self.constrain_calls is not None:
                raise click.UsageError("--constrain-calls applies to the local backend only (use the server's own grammar support)")
            if self.no_repeat_calls is not None:
                raise click.UsageError("--no-repeat-calls/--repeat-calls apply to the local backend only")
            if self.complete_names is not None:
                raise click.UsageError("--complete-names/--no-complete-names apply to the local backend only")
            if self.quote_numbers is not None:
                raise click.UsageError("--quote-numbers/--no-quote-numbers apply to the local backend only")


def check_endpoint(url: str) -> None:
    """A usage error unless ``url`` looks like ``http(s)://host[:port][/path]``."""
    parsed = urlparse(url)
    ok = parsed.scheme in ("http", "https") and bool(parsed.hostname)
    try:
        parsed.port  # noqa: B018 - raises on a bad port
    except ValueError:
        ok = False
    if not ok:
        raise click.UsageError(f"bad endpoint {url!r}: expected a URL like http://127.0.0.1:8080")


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a click command with the shared model, tools and generation options."""
    options = [
        click.option(
            "--model",
            metavar="PATH_OR_REPO",
            default=None,
            help="Checkpoint folder or Hub repo id (ORG/NAME). Default: the checkpoint shipped with hf-asynclm (cml-tiny). "
            "For --backend openai: the model name the server expects.",
        ),
        click.option(
            "--tools",
            metavar="FILE.py|MODULE|none",
            default=None,
            help="Tools: every public function with a docstring in FILE.py or the importable MODULE "
            "(type hints and an Args: section needed), or 'none'. Default: the built-in demo tools "
            "(weather, flights, hotels, calendar, with simulated latencies).",
        ),
        click.option("--backend", type=click.Choice(BACKENDS), default="local", show_default=True, help="Where the model runs: in this process, or on a TGI / OpenAI-compatible server."),
        click.option("--endpoint", metavar="URL", default=None, help="Server URL for --backend tgi|openai, e.g. http://127.0.0.1:8080."),
        click.option(
            "--mode",
            type=click.Choice(MODES),
            default="async",
            show_default=True,
            help="async: keep generating while calls run; sync: wait for each call; sync-parallel: run the calls written so far at the next trap, together.",
        ),
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=DEFAULT_MAX_NEW_TOKENS, show_default=True, help="Tokens the model may write (injected results not counted)."),
        click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True, help="Sampling temperature; 0 = greedy."),
        click.option("--seed", type=int, default=0, show_default=True, help="Random seed (sampling)."),
        click.option(
            "--system-prompt/--no-system-prompt",
            default=True,
            show_default=True,
            help="For models whose chat template does not know CML: add the CML system prompt (protocol, tools, examples).",
        ),
        click.option("--device", default=None, metavar="DEVICE", help="Device for a local model (cpu, cuda, cuda:1, mps). Default: cpu."),
        click.option("--call-timeout", type=click.FloatRange(min=0.0, min_open=True), default=30.0, show_default=True, help="Seconds before a running call becomes an error result."),
        click.option(
            "--interrupt-at",
            type=click.Choice(["token", "word", "sentence", "sentence-eager"]),
            default=None,
            help="Local backend: where results go in: any safe point (token), or only where a word starts and right after a block "
            "(word), or paced, one at a time after a burst of calls or a sentence end (sentence, for models trained on paced traces; "
            "sentence-eager: also between two calls, the rule before 2026-12-02). "
            "Default: what the checkpoint records (word or sentence for checkpoints made by hf-asynclm train), else token.",
        ),
        click.option(
            "--constrain-calls",
            type=click.Choice(["off", "schema", "grounded"]),
            default=None,
            help="Local backend: constrained decoding of call blocks: off, or schema (only calls of the tools with arguments of "
            "their types, new ids), or grounded (schema, and string and number values copied from the conversation or the tools' "
            "schemas). Default: what the checkpoint records, else off.",
        ),
        click.option(
            "--no-repeat-calls/--repeat-calls",
            "no_repeat_calls",
            default=None,
            help="Local backend: never let the model repeat a call it has made in this generation (same tool and arguments): "
            "with constrained calls, the value that would repeat one is not offered. --repeat-calls allows it (tools that "
            "are polled). Default: what the checkpoint records, else allowed.",
        ),
        click.option(
            "--complete-names/--no-complete-names",
            "complete_names",
            default=None,
            help="Local backend: never let the model end a name from the conversation early in its text (\"Kuala\" for "
            "Kuala Lumpur, \"Hong\" for Hong Kong). Default: what the checkpoint records, else off.",
        ),
        click.option(
            "--quote-numbers/--no-quote-numbers",
            "quote_numbers",
            default=None,
            help="Local backend: never let the model write a number its conversation lacks in its text (\"579.0\" where "
            "a result said 579.5). Default: what the checkpoint records, else off.",
        ),
        click.option(
            "--emulate-tpot-ms",
            type=click.FloatRange(min=0.0),
            default=None,
            metavar="MS",
            help="Demo aid: make each decode step of a local model take at least MS milliseconds (emulated speed, "
            "e.g. 5 as in the paper, or 100 to watch a tiny model stream).",
        ),
        click.option(
            "--emulate-ttft-ms",
            type=click.FloatRange(min=0.0),
            default=None,
            metavar="MS",
            help="Demo aid: make each prefill of a local model take at least MS milliseconds.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


# --------------------------------------------------------------------------------------------
# tools
# --------------------------------------------------------------------------------------------
def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise click.ClickException(f"tools file not found: {path}")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    name = f"hf_asynclm_user_tools_{path.stem.replace('-', '_')}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise click.ClickException(f"cannot import tools from {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(name, None)
        raise click.ClickException(f"cannot import tools from {path}: SyntaxError: {exc.msg} (line {exc.lineno})") from None
    except Exception as exc:
        sys.modules.pop(name, None)
        raise click.ClickException(f"cannot import tools from {path}: {type(exc).__name__}: {one_line(exc)}") from None
    return module


def _import_module(name: str) -> Any:
    added = os.getcwd() not in sys.path
    if added:  # like `python -m`: modules in the working directory are importable
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise click.ClickException(f"no module named {name!r}: --tools takes FILE.py, an importable module, or none") from None
        raise click.ClickException(f"cannot import tools module {name!r}: {type(exc).__name__}: {one_line(exc)}") from None
    except Exception as exc:
        raise click.ClickException(f"cannot import tools module {name!r}: {type(exc).__name__}: {one_line(exc)}") from None
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(os.getcwd())


def tool_functions(module: Any) -> list[Callable[..., Any]]:
    """Public functions with a docstring defined in ``module`` (not imported into it), in source order."""
    found = []
    for name, value in vars(module).items():
        if name.startswith("_") or not inspect.isfunction(value):
            continue
        if value.__module__ != module.__name__ or not inspect.getdoc(value):
            continue
        found.append(value)
    return sorted(found, key=lambda f: f.__code__.co_firstlineno)


def load_tools(spec: str | None) -> Any:
    """The tools of ``--tools`` as a :class:`~hf_asynclm.executor.ToolRegistry`.

    ``None``: the built-in demo tools; ``"none"``: no tools; a path ending in ``.py`` (or an
    existing file): its public documented functions; anything else: an importable module's.
    """
    from hf_asynclm.executor.registry import ToolRegistry

    if spec is None:
        from hf_asynclm.demo_tools import demo_tool_schemas, demo_tools

        # the demo tools' schemas carry their value rules (patterns, bounds) for the call constraint
        registry = ToolRegistry()
        for schema, fn in zip(demo_tool_schemas(), demo_tools(simulate_latency=True)):
            registry.add((schema, fn))
        return registry
    elif spec.strip().lower() == "none":
        return ToolRegistry()
    else:
        path = Path(spec).expanduser()
        if spec.endswith(".py") or path.is_file() or os.sep in spec:
            module = _import_file(path)
        else:
            module = _import_module(spec)
        functions, where = tool_functions(module), spec
        if not functions:
            raise click.ClickException(
                f"no tools in {spec}: define public functions with a docstring (type hints and an Args: section) in it"
            )
    registry = ToolRegistry()
    for fn in functions:
        try:
            registry.add(fn, latency_ms=getattr(fn, "latency_ms", None))
        except ValueError as exc:
            raise click.ClickException(f"bad tool in {where}: {one_line(exc, 600)}") from None
    return registry


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------
def load_alm(settings: ModelSettings, tools: Any) -> Any:
    """The :class:`~hf_asynclm.AsyncLM` (or remote equivalent) for ``settings``.

    Local: ``AsyncLM.from_pretrained(--model)``; remote: ``AsyncLM.remote(--endpoint,
    backend=...)``. User errors become one-line ``click.ClickException``s.
    """
    settings.validate()
    from transformers.utils import logging as hf_logging

    from hf_asynclm.asynclm import AsyncLM

    hf_logging.disable_progress_bar()  # no "Loading weights" bar in the middle of the output

    common = dict(tools=tools, mode=settings.mode, system_prompt=settings.system_prompt, call_timeout_s=settings.call_timeout)
    if settings.backend == "local":
        if settings.device:
            from hf_asynclm.asynclm import check_device

            try:
                check_device(settings.device)
            except ValueError as exc:
                raise click.ClickException(str(exc)) from None
        try:
            with user_errors(f"cannot load model {settings.model!r}" if settings.model else "cannot load the default model"):
                return AsyncLM.from_pretrained(
                    settings.model, device=settings.device, interrupt_at=settings.interrupt_at,
                    constrain_calls=settings.constrain_calls, no_repeat_calls=settings.no_repeat_calls,
                    complete_names=settings.complete_names, quote_numbers=settings.quote_numbers, **common,
                )
        except click.ClickException as exc:
            if settings.model is None:
                exc.message += " (pass --model PATH_OR_REPO to use another checkpoint)"
            raise
        except RuntimeError as exc:  # torch: unknown or unavailable --device
            if settings.device and "device" in str(exc).lower():
                raise click.ClickException(f"cannot use device {settings.device!r}: {one_line(exc)}") from None
            raise
    if not hasattr(AsyncLM, "remote"):  # an install without hf_asynclm.remote
        raise click.ClickException(f"the {settings.backend} backend is not available in this version of hf-asynclm")
    kwargs = dict(common, backend=settings.backend)
    if settings.model:
        kwargs["model"] = settings.model
        if Path(settings.model).is_dir():  # the served checkpoint: its tokenizer renders chat templates
            from transformers import AutoTokenizer

            with user_errors(f"cannot load the tokenizer of {settings.model}"):
                kwargs["tokenizer"] = AutoTokenizer.from_pretrained(settings.model)
    with user_errors(f"cannot use {settings.backend} endpoint {settings.endpoint}", network=True):
        return AsyncLM.remote(settings.endpoint, **kwargs)


def describe_alm(alm: Any, settings: ModelSettings) -> str:
    """One line about the model, tools and speed, for a banner."""
    if settings.backend == "local":
        where = settings.model or "cml-tiny (default)"
    else:
        where = f"{settings.backend} at {settings.endpoint}"
    registry = getattr(alm, "registry", None)
    n_tools = len(registry) if registry is not None else 0
    tools = "no tools" if not n_tools else f"{n_tools} tool{'s' if n_tools != 1 else ''}"
    parts = [f"model {where}", tools, f"mode {settings.mode}"]
    if settings.emulated:
        parts.append(f"emulated speed: {settings.emulate_tpot_ms or 0:g} ms/token, {settings.emulate_ttft_ms or 0:g} ms/prefill")
    return " · ".join(parts)


@contextlib.contextmanager
def emulation(alm: Any, settings: ModelSettings) -> Iterator[None]:
    """Slow the local model down as ``--emulate-*-ms`` ask (nothing otherwise)."""
    model = getattr(alm, "model", None)
    if not settings.emulated or model is None:
        yield
        return
    from hf_asynclm.emulation import emulate_speed

    with emulate_speed(model, tpot_ms=settings.emulate_tpot_ms or 0.0, ttft_ms=settings.emulate_ttft_ms or 0.0):
        yield


def seed_everything(seed: int) -> None:
    """Seed Python, torch (and CUDA) for reproducible sampling."""
    from transformers import set_seed

    set_seed(seed)


# --------------------------------------------------------------------------------------------
# display
# --------------------------------------------------------------------------------------------
def make_console(stderr: bool = False) -> Any:
    """A rich console for live output (no markup or highlighting of model text)."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True, emoji=False)


def _preview(text: str | None, limit: int = _PREVIEW_CHARS) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class LiveDisplay:
    """Prints a generation's :class:`~hf_asynclm.streamer.StreamEvent` objects as they come.

    Args:
        console: a rich ``Console``.
        t0: ``time.monotonic()`` of the start (times are shown relative to it).
        mode: the generation mode (``sync-parallel`` also shows calls as they are written).
        show_text: print the visible text (off: only the call lines).
        you: how the person is named in ``[you → interrupt] ...`` lines.
    """

    def __init__(self, console: Any, t0: float | None = None, mode: str = "async", show_text: bool = True, you: str = "you") -> None:
        self.console = console
        self.t0 = time.monotonic() if t0 is None else t0
        self.mode = mode
        self.show_text = show_text
        self.you = you
        self.at_line_start = True
        self._after_line = False
        self._submitted: dict[str, float] = {}

    # output helpers --------------------------------------------------------------------------
    def _rel(self, t: float) -> str:
        return f"+{t - self.t0:.2f}s"

    def text(self, text: str) -> None:
        from rich.text import Text

        if self._after_line:
            text = text.lstrip(" ")
            if not text:
                return
        self.console.print(Text(text), end="")
        self._after_line = False
        self.at_line_start = text.endswith("\n")

    def line(self, text: str, style: str | None = None) -> None:
        """Print ``text`` on a line of its own (ending the current text line first)."""
        from rich.text import Text

        if not self.at_line_start:
            self.console.print()
        self.console.print(Text(text, style=style or ""))
        self.at_line_start = True
        self._after_line = True

    def finish_line(self) -> None:
        if not self.at_line_start:
            self.console.print()
            self.at_line_start = True

    # events ------------------------------------------------------------------------------------
    def handle(self, event: Any) -> None:
        kind = event.kind
        cid = event.call_id or "·"
        if kind == "text":
            if self.show_text and event.text:
                self.text(event.text)
        elif kind == "call_written":
            if self.mode == "sync-parallel":
                self.line(f"  ✎ {cid} {event.data.get('body', event.text)} written {self._rel(event.time)} (starts at the next trap)", "dim")
        elif kind == "call_started":
            self._submitted[self._key(event)] = event.time
            self.line(f"  ↳ {cid} {event.text} started {self._rel(event.time)}", "cyan")
        elif kind == "call_finished":
            self._call_finished(event, cid)
        elif kind == "interrupt":
            if event.call_id == "user":
                self.line(f"  ⇢ injected your message ({self._rel(event.time)})", "green")
            elif event.data.get("is_error"):
                value = event.text.split("[HEAD]", 1)[-1].removesuffix("[END]")
                self.line(f"  ⇢ injected {cid} ({self._rel(event.time)}): {_preview(value)}", "red")
            else:
                self.line(f"  ⇢ injected {cid} ({self._rel(event.time)})", "magenta")
        elif kind == "user_interrupt":
            self.line(f"[{self.you} → interrupt] {event.text}", "bold green")
        elif kind == "trap":
            if event.data.get("reason") == "eos":
                self.line(f"  ⏸ waiting for results still owed {self._rel(event.time)}", "yellow")
            else:
                self.line(f"  ⏸ trap: waiting for a result {self._rel(event.time)}", "yellow")
        elif kind == "resume":
            waited = float(event.data.get("waited_s") or 0.0)
            if waited >= 0.005:
                self.line(f"  ▶ resumed after {waited:.2f}s", "yellow")
        elif kind == "malformed":
            self.line(f"  ⚠ malformed CML ({event.data.get('error') or 'bad block'}): {_preview(event.text, 60)}", "yellow")
        elif kind == "done":
            self.finish_line()

    @staticmethod
    def _key(event: Any) -> str:
        return event.call_id or f"·{event.name}"

    def _call_finished(self, event: Any, cid: str) -> None:
        status = event.data.get("status")
        started = self._submitted.pop(self._key(event), None)
        who = cid if event.call_id else f"{cid} {event.name or 'call'}"
        if status == "done":
            took = f" in {event.time - started:.2f}s" if started is not None else ""
            self.line(f"  ✓ {who} returned{took} → {_preview(event.data.get('result'))}", "green")
        elif status == "cancelled":
            self.line(f"  ⊘ {who} cancelled", "dim")
        else:
            took = f" after {event.time - started:.2f}s" if started is not None else ""
            verb = "timed out" if status == "timeout" else "failed"
            self.line(f"  ✗ {who} {verb}{took} → {_preview(event.data.get('error') or event.data.get('result'))}", "red")

    def replay(self, result: Any) -> None:
        """Print a finished result's timeline (its times relative to the result's start)."""
        events = list(result.timeline)
        end = next((e.time for e in reversed(events) if e.kind == "done"), events[-1].time if events else 0.0)
        self.t0 = end - float(result.stats.wall_s or 0.0)
        for event in events:
            self.handle(event)


def summary_text(result: Any) -> str:
    """One line: wall time, tokens, forward passes, calls, trap time, stop reason."""
    s = result.stats
    calls = list(getattr(result, "calls", []) or [])
    ok = sum(1 for c in calls if getattr(c, "status", None) == "done")
    tokens = f"{s.generated_tokens} tokens" + (f" (+{s.injected_tokens} injected)" if s.injected_tokens else "")
    n_calls = f"{len(calls)} call{'s' if len(calls) != 1 else ''}" + (f" ({ok} ok)" if calls and ok != len(calls) else "")
    parts = [f"{result.mode}", f"{s.wall_s:.2f}s wall", tokens, f"{s.forward_passes} forward passes", n_calls, f"trap {s.trap_wait_s:.2f}s"]
    if s.sync_wait_s:
        parts.append(f"sync wait {s.sync_wait_s:.2f}s")
    if s.stop_reason:
        parts.append(f"stop: {s.stop_reason}")
    return " · ".join(parts)


def result_json(result: Any) -> dict[str, Any]:
    """``result.to_dict()`` made safe for ``json.dumps``."""
    return json.loads(json.dumps(result.to_dict(), default=str))


def stream_generation(
    alm: Any,
    prompt: Any,
    settings: ModelSettings,
    display: LiveDisplay | None,
    mode: str | None = None,
    seed: int | None = None,
    **extra: Any,
) -> Any:
    """Generate with live display; return the result (``done`` event's ``data["result"]``).

    ``mode`` and ``seed`` override the settings' for this generation; ``extra`` goes to
    ``alm.stream``. Runs under the speed emulation the settings ask for; user errors become
    one-line ``click.ClickException``s.
    """
    seed = settings.seed if seed is None else seed
    kwargs = dict(settings.generation_kwargs(seed), **extra)
    mode = mode or settings.mode
    if settings.backend == "local":
        seed_everything(seed)
    result = None
    with user_errors(network=settings.backend != "local"), emulation(alm, settings):
        if display is not None:
            display.t0 = time.monotonic()
            display.mode = mode
        events = alm.stream(prompt, mode=mode, **kwargs)
        try:
            for event in events:
                if display is not None:
                    display.handle(event)
                if event.kind == "done":
                    result = event.data.get("result")
        finally:
            events.close()  # interrupted (Ctrl-C): cancels the generation and waits for its thread
    return result


def transcript_prompt(history: Sequence[tuple[str, str]], user: str) -> str:
    """A plain-text conversation for tokenizers without a chat template."""
    lines = [f"User: {u}\nAssistant: {a}" for u, a in history]
    lines.append(f"User: {user}\nAssistant:")
    return "\n".join(lines)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
