"""The ``hf-asynclm`` app, ``run`` and ``chat`` (piped), the shared CLI helpers and the timeline plot.

A random tiny checkpoint writes no CML by itself: the hidden ``run --script`` option forces a
CML script through :class:`~hf_asynclm.testing.ScriptedPolicy`, and the display is also
checked on a recorded ``AsyncResult``.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from hf_asynclm_cli.main import app, load_command

SCRIPT = (
    'Let me look. [CALL] a1 [HEAD] lookup(key="alpha") [END] Some words go by while the call runs.'
    " [TRAP] [END] Got it. [CALL] nope(1) [END] Done."
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from hf_asynclm.testing import tiny_llama, tiny_tokenizer

    folder = tmp_path_factory.mktemp("ckpt")
    tok = tiny_tokenizer()
    tiny_llama(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tools_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tools") / "my_tools.py"
    path.write_text(
        textwrap.dedent(
            '''
            import time
            from json import dumps  # imported: not a tool


            def lookup(key: str) -> dict:
                """Look a key up.

                Args:
                    key: The key.
                """
                time.sleep(0.15)
                return {"key": key, "value": len(key)}


            def add(a: int, b: int) -> int:
                """Add two numbers.

                Args:
                    a: First.
                    b: Second.
                """
                return a + b


            def undocumented(x):
                return x


            def _private(x: int) -> int:
                """Hidden.

                Args:
                    x: X.
                """
                return x
            '''
        )
    )
    return str(path)


def invoke(*args, input=None):
    return CliRunner().invoke(app, list(args), input=input, catch_exceptions=False)


def error_lines(result):
    return [line for line in result.output.splitlines() if line.startswith("Error")]


def assert_user_error(result, *needles):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = error_lines(result)
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------------------------
# the app
# --------------------------------------------------------------------------------------------
def test_help_is_fast_and_lists_the_commands():
    code = textwrap.dedent(
        """
        import sys, time
        t0 = time.perf_counter()
        from click.testing import CliRunner
        from hf_asynclm_cli.main import app
        r = CliRunner().invoke(app, ["--help"])
        assert r.exit_code == 0, r.output
        print(round(time.perf_counter() - t0, 2), "torch" in sys.modules, "transformers" in sys.modules)
        print(r.output)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    first, help_text = out.split("\n", 1)
    seconds, torch_loaded, transformers_loaded = first.split()
    assert (torch_loaded, transformers_loaded) == ("False", "False")
    assert float(seconds) < 5
    for name in ("run", "chat", "publish", "data", "train"):
        assert re.search(rf"^\s+{name}\s", help_text, re.M), help_text
    assert "Examples:" in help_text


def test_version_and_short_help_option():
    assert invoke("--version").output.startswith("hf-asynclm, version ")
    assert invoke("-h").exit_code == 0


@pytest.mark.parametrize("command", ["run", "chat"])
def test_commands_have_help_with_examples(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Examples:" in result.output and f"hf-asynclm {command}" in result.output
    assert "--emulate-tpot-ms" in result.output and "--tools" in result.output


def test_missing_command_module_is_absent_but_real_errors_surface(tmp_path, monkeypatch):
    assert load_command("nothing", "hf_asynclm_cli.no_such_cmd") is None
    (tmp_path / "broken_cmd_mod.py").write_text("import no_such_dependency_xyz\n")
    (tmp_path / "empty_cmd_mod.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        load_command("broken", "broken_cmd_mod")
    with pytest.raises(RuntimeError, match="no click command named 'empty'"):
        load_command("empty", "empty_cmd_mod")


def test_unknown_command_is_a_usage_error():
    result = invoke("frobnicate")
    assert result.exit_code == 2 and "No such command" in result.output


# --------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------
def test_run_plain_prompt_summary(checkpoint, tools_file):
    result = invoke("run", "Hello there", "--model", checkpoint, "--tools", tools_file, "--max-new-tokens", "6")
    assert result.exit_code == 0, result.output
    assert "2 tools" in result.output  # lookup and add; not the import, the undocumented or the private one
    summary = result.output.strip().splitlines()[-1]
    assert re.search(r"async · [\d.]+s wall · 6 tokens · \d+ forward passes · 0 calls · trap [\d.]+s · stop: max_new_tokens", summary), summary


def test_run_shows_calls_starting_returning_and_injected(checkpoint, tools_file):
    result = invoke("run", "Go", "--model", checkpoint, "--tools", tools_file, "--script", SCRIPT, "--max-new-tokens", "200")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Let me look." in out and "Done." in out
    assert "[CALL]" not in out  # CML is not shown as text
    assert re.search(r'^  ↳ a1 lookup\(key="alpha"\) started \+\d+\.\d\ds$', out, re.M), out
    assert re.search(r'^  ✓ a1 returned in 0\.\d\ds → \{"key": "alpha", "value": 5\}$', out, re.M), out
    assert re.search(r"^  ⇢ injected a1 \(\+\d+\.\d\ds\)$", out, re.M), out
    assert re.search(r"^  ✗ · nope failed .*UnknownToolError", out, re.M), out
    assert re.search(r"2 calls \(1 ok\)", out)
    # events come in order: started, returned, injected
    assert out.index("↳ a1") < out.index("✓ a1") < out.index("⇢ injected a1")


def test_run_interrupt_at_word_keeps_words_whole(checkpoint, tools_file):
    script = '[CALL] a1 [HEAD] lookup(key="alpha") [END]' + " verylongwordnumberone verylongwordnumbertwo" * 20 + " [TRAP] [END] Done."
    result = CliRunner().invoke(
        app, ["run", "Go", "--model", checkpoint, "--tools", tools_file, "--script", script, "--json", "--interrupt-at", "word",
              "--max-new-tokens", "600"]
    )
    assert result.exit_code == 0, result.output
    raw = json.loads(result.stdout)["raw_text"]
    at = raw.index("[INTR] a1 [HEAD]")
    after = raw[raw.index("[END]", at) + len("[END]"):]
    assert raw[:at].endswith("[END]") or after[:1].isspace() or after.startswith("["), raw[at - 30: at + 80]


def test_run_json_is_the_only_stdout(checkpoint, tools_file):
    result = CliRunner().invoke(
        app, ["run", "Go", "--model", checkpoint, "--tools", tools_file, "--script", SCRIPT, "--json", "--mode", "sync"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) >= {"mode", "text", "raw_text", "calls", "stats", "timeline"}
    assert data["mode"] == "sync"
    assert [c["name"] for c in data["calls"]] == ["lookup", "nope"]
    assert data["calls"][0]["status"] == "done" and data["calls"][1]["status"] == "error"
    assert '[INTR] a1 [HEAD] {"key": "alpha", "value": 5} [END]' in data["raw_text"]
    assert data["stats"]["sync_wait_s"] >= 0.1
    assert {e["kind"] for e in data["timeline"]} >= {"call_started", "call_finished", "interrupt", "done"}


def test_run_timeline_png(checkpoint, tools_file, tmp_path):
    png = tmp_path / "timeline.png"
    result = invoke("run", "Go", "--model", checkpoint, "--tools", tools_file, "--script", SCRIPT, "--timeline", str(png))
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert f"timeline written to {png}" in result.output


def test_run_compare_sync_and_async(checkpoint, tools_file, tmp_path):
    png = tmp_path / "cmp.png"
    args = ["run", "Go", "--model", checkpoint, "--tools", tools_file, "--script", SCRIPT, "--emulate-tpot-ms", "5"]
    result = invoke(*args, "--compare", "--timeline", str(png))
    assert result.exit_code == 0, result.output
    assert "emulated speed: 5 ms/token" in result.output
    assert re.search(r"^sync · ", result.output, re.M) and re.search(r"^async · ", result.output, re.M)
    assert re.search(r"speedup: \d+\.\d\dx \(sync \d+\.\d\ds → async \d+\.\d\ds\)", result.output), result.output
    assert png.stat().st_size > 5000

    data = json.loads(CliRunner().invoke(app, [*args, "--compare", "--json"]).stdout)
    assert set(data) == {"sync", "async", "speedup"}
    assert data["sync"]["mode"] == "sync" and data["async"]["mode"] == "async"
    # sync waited for the 0.15 s lookup; async wrote its text meanwhile (same script, same tokens)
    assert data["sync"]["stats"]["sync_wait_s"] >= 0.1
    assert data["sync"]["stats"]["generated_tokens"] == data["async"]["stats"]["generated_tokens"]
    assert data["speedup"] == pytest.approx(data["sync"]["stats"]["wall_s"] / data["async"]["stats"]["wall_s"])


def test_run_reads_the_prompt_from_stdin(checkpoint):
    result = invoke("run", "-", "--model", checkpoint, "--tools", "none", "--max-new-tokens", "3", "--json", input="Hello\n")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["stats"]["generated_tokens"] == 3


def test_run_sampling_is_seeded(checkpoint):
    args = ["run", "Hi", "--model", checkpoint, "--tools", "none", "--max-new-tokens", "12", "--temperature", "1.0", "--json"]
    first = json.loads(invoke(*args, "--seed", "3").stdout)["raw_text"]
    assert first == json.loads(invoke(*args, "--seed", "3").stdout)["raw_text"]


# --------------------------------------------------------------------------------------------
# user errors: one line, non-zero exit, no traceback
# --------------------------------------------------------------------------------------------
def test_missing_tools_file(checkpoint):
    assert_user_error(invoke("run", "Hi", "--model", checkpoint, "--tools", "nowhere/tools.py"), "tools file not found")


@pytest.mark.parametrize(
    "source, needle",
    [
        ("def f(:\n", "SyntaxError"),
        ("raise RuntimeError('boom at import')\n", "RuntimeError: boom at import"),
        ("X = 1\n", "no tools in"),
        ('def f(x):\n    """No Args section."""\n    return x\n', "bad tool"),
    ],
)
def test_bad_tools_files(checkpoint, tmp_path, source, needle):
    path = tmp_path / "bad_tools.py"
    path.write_text(source)
    assert_user_error(invoke("run", "Hi", "--model", checkpoint, "--tools", str(path)), needle)


def test_tools_module_missing_and_importable(checkpoint, tools_file, monkeypatch):
    assert_user_error(invoke("run", "Hi", "--model", checkpoint, "--tools", "no_such_pkg.tools"), "no module named 'no_such_pkg.tools'")
    monkeypatch.chdir(Path(tools_file).parent)
    result = invoke("run", "Hi", "--model", checkpoint, "--tools", "my_tools", "--max-new-tokens", "2")
    assert result.exit_code == 0 and "2 tools" in result.output


def test_unknown_model_path():
    assert_user_error(invoke("run", "Hi", "--model", "/no/such/checkpoint", "--tools", "none"), "cannot load model", "/no/such/checkpoint")


def test_model_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert_user_error(invoke("run", "Hi", "--model", str(tmp_path), "--tools", "none"), "cannot load model")


def test_missing_default_checkpoint(monkeypatch, tmp_path):
    monkeypatch.setattr("hf_asynclm.asynclm.DEFAULT_CHECKPOINT", tmp_path / "cml-tiny")
    assert_user_error(invoke("run", "Hi", "--tools", "none"), "default checkpoint", "--model")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--backend", "tgi"], "needs --endpoint"),
        (["--backend", "openai", "--endpoint", "not a url"], "bad endpoint"),
        (["--backend", "tgi", "--endpoint", "ftp://host:1"], "bad endpoint"),
        (["--backend", "tgi", "--endpoint", "http://127.0.0.1:99999"], "bad endpoint"),
        (["--endpoint", "http://127.0.0.1:8080"], "--endpoint is for --backend tgi or openai"),
        (["--mode", "fast"], "'fast' is not one of"),
        (["--temperature", "-1"], "--temperature"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--compare", "--mode", "sync"], "leave out --mode"),
        (["--backend", "tgi", "--endpoint", "http://127.0.0.1:8080", "--emulate-tpot-ms", "5"], "local model"),
        (["--backend", "tgi", "--endpoint", "http://127.0.0.1:8080", "--interrupt-at", "word"], "local backend only"),
        (["--interrupt-at", "paragraph"], "'paragraph' is not one of"),
        (["--backend", "tgi", "--endpoint", "http://127.0.0.1:8080", "--constrain-calls", "schema"], "local backend only"),
        (["--constrain-calls", "json"], "'json' is not one of"),
        (["--backend", "tgi", "--endpoint", "http://127.0.0.1:8080", "--no-repeat-calls"], "local backend only"),
        (["--constrain-calls", "off", "--no-repeat-calls"], "works through constrained calls"),
        (["--backend", "tgi", "--endpoint", "http://127.0.0.1:8080", "--complete-names"], "local backend only"),
    ],
)
def test_bad_options(args, needle):
    result = invoke("run", "Hi", "--tools", "none", *args)
    assert result.exit_code == 2
    assert_user_error(result, needle)


def test_a_device_this_machine_lacks_is_one_line():
    result = invoke("run", "Hi", "--tools", "none", "--device", "gpu")
    assert result.exit_code == 1
    assert_user_error(result, "unknown device 'gpu': use cpu, cuda, cuda:N or mps")


def test_unreachable_endpoint_is_one_line():
    # Nothing listens on port 9 of the loopback: whether the remote backend is installed yet
    # or not, the answer is one line.
    result = CliRunner().invoke(app, ["run", "Hi", "--tools", "none", "--backend", "tgi", "--endpoint", "http://127.0.0.1:9"])
    assert_user_error(result)
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("backend", ["tgi", "openai"])
def test_run_on_a_remote_engine(backend, tools_file):
    fake_tgi = pytest.importorskip("fake_tgi", reason="the loopback fake engine of the remote tests")
    script = 'Let me look. [CALL] a1 [HEAD] lookup(key="alpha") [END] Words while it runs. [TRAP] [END] Done.'
    with fake_tgi.FakeEngine(script) as engine:
        args = ["run", "User: look alpha up\nAssistant:", "--backend", backend, "--endpoint", engine.url, "--tools", tools_file]
        result = invoke(*args, "--model", "cml-tiny")
        assert result.exit_code == 0, result.output
        assert f"model {backend} at {engine.url}" in result.output
        assert re.search(r'^  ↳ a1 lookup\(key="alpha"\) started \+\d+\.\d\ds$', result.output, re.M), result.output
        assert re.search(r"^  ✓ a1 returned in 0\.\d\ds → ", result.output, re.M), result.output
        assert "Done." in result.output and "[CALL]" not in result.output
        data = json.loads(CliRunner().invoke(app, [*args, "--json"]).stdout)
        assert '[INTR] a1 [HEAD] {"key": "alpha", "value": 5} [END]' in data["raw_text"]


def test_timeline_into_missing_folder(checkpoint):
    assert_user_error(invoke("run", "Hi", "--model", checkpoint, "--timeline", "/no/such/dir/t.png"), "does not exist")


def test_debug_env_shows_the_original_exception(monkeypatch):
    monkeypatch.setenv("HF_ASYNCLM_DEBUG", "1")
    result = CliRunner().invoke(app, ["run", "Hi", "--model", "/no/such/checkpoint", "--tools", "none"])
    assert isinstance(result.exception, ValueError)


# --------------------------------------------------------------------------------------------
# chat (piped stdin; the terminal test is in test_chat_tmux.py)
# --------------------------------------------------------------------------------------------
def test_chat_turns_accumulate_and_transcript(checkpoint, tmp_path):
    transcript = tmp_path / "chat.json"
    result = invoke(
        "chat", "--model", checkpoint, "--tools", "none", "--max-new-tokens", "4", "--transcript", str(transcript),
        input="\nhello\n",
    )
    assert result.exit_code == 0, result.output
    # piped lines arrive at once: the first starts a turn, EOF waits for the answer and ends the chat
    data = json.loads(transcript.read_text())
    assert [t["user"] for t in data["turns"]] == ["hello"]
    assert data["turns"][0]["result"]["stats"]["generated_tokens"] == 4
    assert "you› " in result.output and "stop: max_new_tokens" in result.output


def test_chat_quit_and_new_turn_uses_history(checkpoint, tmp_path):
    from hf_asynclm_cli import chat_cmd
    from hf_asynclm_cli.common import ModelSettings, load_alm, make_console

    settings = ModelSettings(model=checkpoint, max_new_tokens=3)
    alm = load_alm(settings, None)
    session = chat_cmd._ChatSession(alm, settings, make_console(), tmp_path / "t.json")
    assert session.handle_line("first\n")
    session.wait_answer()
    assert session.handle_line("second\n")
    session.wait_answer()
    assert len(session.history) == 2
    prompt = session.build_prompt("third")
    assert prompt.startswith("User: first\nAssistant: ") and "\nUser: second\nAssistant: " in prompt
    assert prompt.endswith("\nUser: third\nAssistant:")
    assert session.handle_line("/reset\n") and session.history == []
    assert session.handle_line("/quit\n") is False


def test_chat_cancel_stops_the_answer(checkpoint, tmp_path):
    from hf_asynclm_cli import chat_cmd
    from hf_asynclm_cli.common import ModelSettings, load_alm, make_console

    settings = ModelSettings(model=checkpoint, max_new_tokens=200, emulate_tpot_ms=20)
    alm = load_alm(settings, None)
    session = chat_cmd._ChatSession(alm, settings, make_console(), tmp_path / "t.json")
    session.handle_line("go on forever\n")
    time.sleep(0.5)
    assert session.answer.running
    session.cancel_answer()
    assert not session.answer.running
    turn = json.loads((tmp_path / "t.json").read_text())["turns"][0]
    assert turn["cancelled"] and turn["result"]["stats"]["stop_reason"] == "cancelled"
    assert turn["result"]["stats"]["generated_tokens"] < 200
    assert session.history == []  # a cancelled answer is not part of the conversation


def test_chat_uses_messages_with_a_chat_template(checkpoint):
    from hf_asynclm_cli import chat_cmd
    from hf_asynclm_cli.common import ModelSettings, make_console

    class FakeAlm:
        tokenizer = type("T", (), {"chat_template": "{{ messages }}"})()

    session = chat_cmd._ChatSession(FakeAlm(), ModelSettings(), make_console(), None)
    session.history.append(("hi", "hello [CALL] w1 [HEAD] f() [END]"))
    assert session.build_prompt("and?") == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello [CALL] w1 [HEAD] f() [END]"},
        {"role": "user", "content": "and?"},
    ]


# --------------------------------------------------------------------------------------------
# display of a recorded result, timeline rows
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recorded():
    from transformers import LogitsProcessorList

    from hf_asynclm import AsyncLM
    from hf_asynclm.testing import ScriptedPolicy, tiny_llama, tiny_tokenizer

    def slow(x: int) -> int:
        """Slow identity.

        Args:
            x: The value.
        """
        time.sleep(0.12)
        return x

    def fail(x: int) -> int:
        """Always fails.

        Args:
            x: The value.
        """
        raise KeyError("no such thing")

    tok = tiny_tokenizer()
    alm = AsyncLM(tiny_llama(tok), tok, tools=[slow, fail])
    script = [
        "Start.",
        " [CALL] s1 [HEAD] slow(x=1) [END]",
        " [CALL] f1 [HEAD] fail(x=2) [END]",
        " [TRAP] [END]",
        " One back.",
        " [TRAP] [END]",
        " All back.",
    ]
    return {
        mode: alm.generate("Go.", mode=mode, logits_processor=LogitsProcessorList([ScriptedPolicy(tok, script)]), max_new_tokens=200, do_sample=False)
        for mode in ("async", "sync")
    }


def test_display_replays_a_recorded_result(recorded):
    from rich.console import Console

    from hf_asynclm_cli.common import LiveDisplay, summary_text

    out = io.StringIO()
    LiveDisplay(Console(file=out, width=200), mode="async").replay(recorded["async"])
    text = out.getvalue()
    assert re.match(r"Start\. ?\n", text), text
    assert re.search(r"^  ↳ s1 slow\(x=1\) started \+\d+\.\d\ds$", text, re.M), text
    assert re.search(r"^  ✓ s1 returned in 0\.\d\ds → 1$", text, re.M), text
    assert re.search(r"^  ✗ f1 failed after \d+\.\d\ds → KeyError: .*no such thing", text, re.M), text
    assert re.search(r"^  ⇢ injected f1 \(\+\d+\.\d\ds\): error: KeyError", text, re.M), text
    assert re.search(r"^  ⏸ trap: waiting for a result \+\d+\.\d\ds$", text, re.M), text
    # a trap waits only when no result is ready yet (timing): the display says so exactly then
    waited = any(e.kind == "resume" and e.data["waited_s"] >= 0.005 for e in recorded["async"].timeline)
    assert bool(re.search(r"^  ▶ resumed after \d+\.\d\ds$", text, re.M)) == waited, text
    assert text.rstrip().endswith("All back.")
    assert "2 calls (1 ok)" in summary_text(recorded["async"])


def test_display_user_interrupt_and_sync_parallel_lines():
    from rich.console import Console

    from hf_asynclm.streamer import StreamEvent
    from hf_asynclm_cli.common import LiveDisplay

    out = io.StringIO()
    display = LiveDisplay(Console(file=out, width=200), t0=100.0, mode="sync-parallel")
    display.handle(StreamEvent("text", 100.1, text="Working"))
    display.handle(StreamEvent("user_interrupt", 100.2, text="make it Thursday", call_id="user"))
    display.handle(StreamEvent("interrupt", 100.3, text="[INTR] user [HEAD] make it Thursday [END]", call_id="user"))
    display.handle(StreamEvent("text", 100.35, text=" on it"))
    display.handle(StreamEvent("call_written", 100.4, text="[CALL] a [HEAD] f() [END]", call_id="a", data={"body": "f()"}))
    display.handle(StreamEvent("call_finished", 100.5, call_id="a", name="f", data={"status": "cancelled"}))
    display.handle(StreamEvent("done", 100.6))
    assert out.getvalue().splitlines() == [
        "Working",
        "[you → interrupt] make it Thursday",
        "  ⇢ injected your message (+0.30s)",
        "on it",
        "  ✎ a f() written +0.40s (starts at the next trap)",
        "  ⊘ a cancelled",
    ]


def test_timeline_rows_from_results_and_dicts(recorded, tmp_path):
    from hf_asynclm.timeline_plot import plot_timeline, timeline_rows

    async_row, sync_row = timeline_rows([recorded["async"], recorded["sync"].to_dict()])
    assert (async_row.label, sync_row.label) == ("async", "sync")
    for row, result in ((async_row, recorded["async"]), (sync_row, recorded["sync"])):
        assert row.end == pytest.approx(result.stats.wall_s, abs=1e-6)
        assert [c.call_id for c in row.calls] == ["s1", "f1"]
        assert row.decode[0][0] == 0.0 and row.decode[-1][1] == pytest.approx(row.end)
        busy = sum(b - a for a, b in row.decode) + sum(b - a for a, b in row.trap_waits + row.sync_waits)
        assert busy == pytest.approx(row.end, abs=1e-6)  # decoding and waits tile the run
        assert {cid for _, cid, _ in row.interrupts} >= {"s1", "f1"}
    assert async_row.trap_waits and async_row.traps
    assert sum(b - a for a, b in sync_row.sync_waits) >= 0.1  # sync waited for slow()
    slow_call = async_row.calls[0]
    assert slow_call.end - slow_call.start >= 0.1 and slow_call.status == "done"
    assert async_row.calls[1].status == "error"

    path = plot_timeline({"sync": recorded["sync"], "async": recorded["async"]}, tmp_path / "t.png", title="demo")
    assert path.stat().st_size > 5000
    with pytest.raises(ValueError):
        timeline_rows([recorded["async"]], labels=["a", "b"])


def test_shipped_gemma_without_its_extra_is_one_line(monkeypatch, tmp_path, without_gemma_extra):
    """The shipped gemma adapter needs the [gemma] extra for its base: a missing package says what to install."""
    from hf_asynclm.asynclm import shipped_checkpoints

    if "gemma-3-270m-cml" not in shipped_checkpoints():
        pytest.skip("gemma-3-270m-cml is not in this install")
    pytest.importorskip("peft")
    monkeypatch.setenv("HF_ASYNCLM_CACHE", str(tmp_path / "empty-cache"))
    result = invoke("run", "Hi", "--model", "gemma-3-270m-cml", "--tools", "none")
    assert result.exit_code == 1
    assert_user_error(result, "hf-asynclm[gemma]")
