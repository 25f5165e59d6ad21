"""``hf-asynclm chat`` in a real terminal (tmux): a line typed while the answer streams reaches
the model as a user interrupt, ``[INTR] user [HEAD] ... [END]``, inside that same answer.

The checkpoint is a random tiny Llama slowed down with ``--emulate-tpot-ms`` so that an answer
takes a few seconds; its generation config suppresses EOS and the CML markers, so the answer
is plain text that runs to ``--max-new-tokens`` (a random model could otherwise stop early or
open a call block that never closes, which would hold the interrupt back).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

INTERRUPT = "make it Thursday"


def _tmux() -> str:
    path = shutil.which("tmux")
    if path:
        return path
    if shutil.which("apt-get") and os.geteuid() == 0:
        try:
            subprocess.run(["apt-get", "install", "-y", "-q", "tmux"], capture_output=True, timeout=120, check=True)
        except (subprocess.SubprocessError, OSError):
            pass
    path = shutil.which("tmux")
    if not path:
        pytest.skip("tmux is not installed and could not be installed (apt-get install -y tmux)")
    return path


@pytest.fixture
def tmux(tmp_path):
    exe = _tmux()
    socket = str(tmp_path / "tmux.sock")  # a private server: nothing else is touched
    name = f"chat-{uuid.uuid4().hex[:8]}"

    def call(*args: str, check: bool = True) -> str:
        return subprocess.run([exe, "-S", socket, *args], capture_output=True, text=True, timeout=10, check=check).stdout

    call.session = name  # type: ignore[attr-defined]
    yield call
    call("kill-server", check=False)


@pytest.fixture
def slow_checkpoint(tmp_path):
    from hf_asynclm.cml import MARKERS
    from hf_asynclm.testing import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    model.generation_config.suppress_tokens = [tok.eos_token_id] + [tok.convert_tokens_to_ids(m) for m in MARKERS]
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _wait_for(predicate, timeout: float, what: str, detail=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}\n{detail()}")


def test_typing_while_the_answer_streams_interrupts_it(tmux, slow_checkpoint, tmp_path):
    transcript = tmp_path / "chat.json"
    command = [
        sys.executable, "-m", "hf_asynclm_cli.main", "chat",
        "--model", str(slow_checkpoint), "--tools", "none", "--no-system-prompt",
        "--max-new-tokens", "60", "--emulate-tpot-ms", "60", "--emulate-ttft-ms", "100",
        "--transcript", str(transcript),
    ]  # fmt: skip
    shell = " ".join(f"'{c}'" for c in command) + "; echo CHAT-EXITED-$?; sleep 30"
    tmux("new-session", "-d", "-s", tmux.session, "-x", "220", "-y", "60", shell)

    def pane() -> str:
        return tmux("capture-pane", "-p", "-J", "-S", "-200", "-t", tmux.session, check=False)

    _wait_for(lambda: "you› " in pane(), 30, "the chat prompt", pane)
    tmux("send-keys", "-t", tmux.session, "hello there", "Enter")
    # the answer takes about 100 ms + 60 x 60 ms; interrupt it a moment after it starts
    time.sleep(1.0)
    assert not transcript.exists(), "the answer ended before the interrupt could be typed"
    tmux("send-keys", "-t", tmux.session, INTERRUPT, "Enter")

    turns = _wait_for(
        lambda: transcript.exists() and json.loads(transcript.read_text())["turns"], 20, "the answer to end", pane
    )
    assert len(turns) == 1
    turn = turns[0]
    assert turn["user"] == "hello there"
    assert turn["interrupts"] == [INTERRUPT]
    raw = turn["result"]["raw_text"]
    assert f"[INTR] user [HEAD] {INTERRUPT} [END]" in raw  # it went into the model's context ...
    assert raw.index("[INTR] user") > 0  # ... mid-answer, after some generated text
    assert turn["result"]["stats"]["generated_tokens"] == 60
    assert any(e["kind"] == "interrupt" and e["call_id"] == "user" for e in turn["result"]["timeline"])

    screen = pane()
    assert f"[you → interrupt] {INTERRUPT}" in screen
    assert "⇢ injected your message" in screen

    # after the answer the next line is a new turn; /quit ends the chat cleanly
    tmux("send-keys", "-t", tmux.session, "/quit", "Enter")
    _wait_for(lambda: "CHAT-EXITED-" in pane(), 10, "the chat to exit", pane)
    assert "CHAT-EXITED-0" in pane()
    assert "Traceback" not in pane()


def test_ctrl_c_cancels_the_answer_then_exits_at_the_prompt(tmux, slow_checkpoint, tmp_path):
    transcript = tmp_path / "chat.json"
    command = [
        sys.executable, "-m", "hf_asynclm_cli.main", "chat",
        "--model", str(slow_checkpoint), "--tools", "none", "--no-system-prompt",
        "--max-new-tokens", "200", "--emulate-tpot-ms", "50", "--transcript", str(transcript),
    ]  # fmt: skip
    shell = " ".join(f"'{c}'" for c in command) + "; echo CHAT-EXITED-$?; sleep 30"
    tmux("new-session", "-d", "-s", tmux.session, "-x", "220", "-y", "60", shell)

    def pane() -> str:
        return tmux("capture-pane", "-p", "-J", "-S", "-200", "-t", tmux.session, check=False)

    _wait_for(lambda: "you› " in pane(), 30, "the chat prompt", pane)
    tmux("send-keys", "-t", tmux.session, "go on and on", "Enter")
    time.sleep(1.0)
    tmux("send-keys", "-t", tmux.session, "C-c")  # during the answer: cancel it
    turns = _wait_for(lambda: transcript.exists() and json.loads(transcript.read_text())["turns"], 10, "the cancelled turn", pane)
    assert turns[0]["cancelled"] and turns[0]["result"]["stats"]["stop_reason"] == "cancelled"
    assert turns[0]["result"]["stats"]["generated_tokens"] < 200
    _wait_for(lambda: pane().rstrip().endswith("you›"), 10, "the prompt after the cancel", pane)
    assert "CHAT-EXITED" not in pane()

    tmux("send-keys", "-t", tmux.session, "C-c")  # at the prompt: leave
    _wait_for(lambda: "CHAT-EXITED-" in pane(), 10, "the chat to exit", pane)
    assert "CHAT-EXITED-0" in pane() and "Traceback" not in pane()
