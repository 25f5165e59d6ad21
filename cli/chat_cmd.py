"""``hf-asynclm chat``: a conversation in which you can interrupt the model while it answers.

Each answer streams in a background thread while the main thread keeps reading your input
(plain ``sys.stdin.readline``: works in any terminal, tmux, and with pipes):

* a line typed **while the model is answering** goes to the model as a user interrupt
  (``alm.interrupt(line)``, injected as ``[INTR] user [HEAD] line [END]`` at the next safe
  point; the paper's human-LLM interaction) and is shown as ``[you → interrupt] line``;
* a line typed **after the answer** starts a new turn; the conversation accumulates (chat
  template messages, or a plain ``User: / Assistant:`` transcript for tokenizers without one);
* ``/quit`` (or ``/exit``) or end of input ends the chat, ``/reset`` forgets the conversation;
* Ctrl-C during an answer cancels it (``alm.cancel()``) and returns to the prompt; Ctrl-C at
  the prompt exits.

``--transcript FILE`` keeps a JSON record of every turn (the user line, the interrupts sent
and the full ``AsyncResult.to_dict()``), rewritten after each answer.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import click

from .common import (
    LiveDisplay,
    ModelSettings,
    describe_alm,
    load_alm,
    load_tools,
    make_console,
    model_options,
    one_line,
    result_json,
    stream_generation,
    summary_text,
    transcript_prompt,
    user_errors,
    write_json,
)

EPILOG = """\b
Examples:
  hf-asynclm chat
  hf-asynclm chat --model my-org/cml-gemma-270m --tools my_tools.py --transcript chat.json
  hf-asynclm chat --emulate-tpot-ms 100      # slow the model down to type while it answers
\b
While the model answers, type a line and press Enter: it reaches the model as an interrupt
([INTR] user [HEAD] ... [END]) at the next safe point. After the answer, a line starts a new
turn. /quit or Ctrl-D ends the chat; Ctrl-C cancels the answer in progress.
"""

_QUIT = ("/quit", "/exit", "/q")
_START_TIMEOUT_S = 30.0  # model load done; this is prompt encoding + prefill before interrupts are accepted


class _Answer:
    """One answer generating in a background thread, rendered live; ``on_done(self)`` runs at its end."""

    def __init__(
        self, alm: Any, user: str, prompt: Any, settings: ModelSettings, seed: int, display: LiveDisplay, on_done: Callable[["_Answer"], None]
    ) -> None:
        self.alm = alm
        self.user = user
        self.prompt = prompt
        self.settings = settings
        self.seed = seed
        self.display = display
        self.on_done = on_done
        self.result: Any = None
        self.error: BaseException | None = None
        self.interrupts: list[str] = []
        self.cancelled = False
        self.quiet = False  # no prompt after it (the chat is ending)
        self.thread = threading.Thread(target=self._run, name="hf-asynclm-chat-answer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def _run(self) -> None:
        try:
            self.result = stream_generation(self.alm, self.prompt, self.settings, self.display, seed=self.seed)
        except BaseException as exc:  # reported below, in this thread
            self.error = exc
        finally:
            self.on_done(self)

    def _while_generating(self, action: Callable[[], Any]) -> bool:
        """Run ``action`` once the generation has started (retrying while it is still being set up)."""
        deadline = time.monotonic() + _START_TIMEOUT_S
        while self.running:
            try:
                if action() is not False:
                    return True
            except RuntimeError:  # no generation in progress yet (prompt encoding) or any more
                pass
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return False

    def interrupt(self, text: str) -> bool:
        """Send ``text`` to the running generation; False when the answer ended first."""
        self.interrupts.append(text)  # before sending: the answer may end (and be recorded) right after
        sent = self._while_generating(lambda: self.alm.interrupt(text))
        if not sent:
            self.interrupts.remove(text)
        return sent

    def cancel(self, quiet: bool = False) -> None:
        """Stop the answer and wait for its thread."""
        self.cancelled = True
        self.quiet = quiet
        self._while_generating(self.alm.cancel)
        self.wait()

    def wait(self) -> None:
        """Join the thread in short slices (so that Ctrl-C still reaches the main thread)."""
        while self.thread.is_alive():
            self.thread.join(timeout=0.1)


@click.command("chat", epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@model_options
@click.option(
    "--transcript",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE.json",
    help="Write every turn (your line, your interrupts, the full result with raw CML text) to FILE.json.",
)
def chat(transcript: Path | None, **options: Any) -> None:
    """Chat with a CML model; type while it answers to interrupt it."""
    settings = ModelSettings.pop_from(options)
    if transcript is not None and not transcript.parent.is_dir():
        raise click.UsageError(f"--transcript: folder {str(transcript.parent)!r} does not exist")
    tools = load_tools(settings.tools)
    alm = load_alm(settings, tools)
    console = make_console()
    console.print(describe_alm(alm, settings), style="dim")
    console.print("Type a message. While the model answers, a line you send interrupts it. /quit or Ctrl-D to leave.", style="dim")

    _ChatSession(alm, settings, console, transcript).loop()


class _ChatSession:
    def __init__(self, alm: Any, settings: ModelSettings, console: Any, transcript: Path | None) -> None:
        self.alm = alm
        self.settings = settings
        self.console = console
        self.transcript = transcript
        tokenizer = getattr(alm, "tokenizer", None)
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        self.history: list[tuple[str, str]] = []  # (user, assistant raw text)
        self.turns: list[dict[str, Any]] = []
        self.answer: _Answer | None = None

    # input -------------------------------------------------------------------------------------
    def prompt(self) -> None:
        self.console.print("you› ", style="bold", end="")

    def loop(self) -> None:
        self.prompt()
        while True:
            try:
                if not self.handle_line(sys.stdin.readline()):
                    return
            except KeyboardInterrupt:
                if self.answer is not None and self.answer.running:
                    self.cancel_answer()  # Ctrl-C during an answer: cancel it, back to the prompt
                    continue
                self.console.print()  # Ctrl-C at the prompt: leave
                return

    def handle_line(self, line: str) -> bool:
        """React to one input line; False ends the chat."""
        if not line:  # end of input: let the answer in progress finish, then leave
            self.wait_answer()
            self.console.print()
            return False
        text = line.strip()
        command = text.lower()
        if command in _QUIT:
            self.cancel_answer(quiet=True)
            return False
        if self.answer is not None and self.answer.running:
            if command == "/reset":
                self.console.print("(/reset works between answers)", style="dim")
                return True
            if not text or self.answer.interrupt(text):
                return True
            # the answer ended just before the line came: it starts the next turn instead
        self.wait_answer()  # it has ended; make sure its bookkeeping is done
        if not text:
            self.prompt()
            return True
        if command == "/reset":
            self.history.clear()
            self.console.print("(conversation cleared)", style="dim")
            self.prompt()
            return True
        self.start_answer(text)
        return True

    # answers -----------------------------------------------------------------------------------
    def build_prompt(self, user: str) -> Any:
        if self.templated:
            messages: list[dict[str, str]] = []
            for u, a in self.history:
                messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
            return messages + [{"role": "user", "content": user}]
        return transcript_prompt(self.history, user)

    def start_answer(self, text: str) -> None:
        display = LiveDisplay(self.console, mode=self.settings.mode)
        seed = self.settings.seed + len(self.turns)  # reproducible, but not the same sample each turn
        self.answer = _Answer(self.alm, text, self.build_prompt(text), self.settings, seed, display, self.on_answer_done)
        self.answer.start()

    def on_answer_done(self, answer: _Answer) -> None:
        """In the answer's thread, at its end: summary, history, transcript, next prompt."""
        answer.display.finish_line()
        if answer.error is not None:
            self.console.print(f"Error: {self._error_line(answer.error)}", style="red")
        elif answer.result is not None:
            result = answer.result
            self.console.print(f"({summary_text(result)}{' · cancelled' if answer.cancelled else ''})", style="dim")
            if not answer.cancelled:
                self.history.append((answer.user, result.raw_text.strip()))
            self.turns.append(
                {"user": answer.user, "interrupts": list(answer.interrupts), "cancelled": answer.cancelled, "result": result_json(result)}
            )
            try:
                self.save()
            except click.ClickException as exc:
                self.console.print(f"Error: {exc.message}", style="red")
        if not answer.quiet:
            self.prompt()

    @staticmethod
    def _error_line(error: BaseException) -> str:
        """User errors (already one line); anything else with its traceback: it is a bug."""
        if isinstance(error, click.ClickException):
            return error.message
        import traceback

        traceback.print_exception(error)
        return f"{type(error).__name__}: {one_line(error)}"

    def wait_answer(self) -> None:
        if self.answer is not None:
            self.answer.wait()

    def cancel_answer(self, quiet: bool = False) -> None:
        if self.answer is not None and self.answer.running:
            self.answer.cancel(quiet=quiet)

    def save(self) -> None:
        if self.transcript is None:
            return
        data = {
            "model": self.settings.model,
            "backend": self.settings.backend,
            "mode": self.settings.mode,
            "turns": self.turns,
        }
        with user_errors(f"cannot write the transcript {self.transcript}"):
            write_json(self.transcript, data)
