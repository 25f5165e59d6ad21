"""Remote engines: RemoteAsyncLM against a scripted TGI / OpenAI server and a real `transformers serve`."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fake_tgi import FakeEngine, tokenize
from hf_asynclm import AsyncLM
from hf_asynclm.remote import RemoteAsyncLM, RemoteEngineError
from hf_asynclm.remote.backends import OpenAICompletionsBackend, TGIBackend, completions_url, make_backend

PROMPT = "Weather in Oslo?\nAssistant:"
ONE_CALL = ' Checking. [CALL] w1 [HEAD] get_weather(city="Oslo") [END] Let me wait. [TRAP] [END] Oslo is mild.'
WEATHER = {"city": "Oslo", "temp_c": 18}
W1_INTR = '[INTR] w1 [HEAD] {"city": "Oslo", "temp_c": 18} [END]'


@pytest.fixture(autouse=True)
def _hub_online(monkeypatch: pytest.MonkeyPatch) -> None:
    # InferenceClient refuses every request (even to 127.0.0.1) when HF_HUB_OFFLINE is set
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)


def get_weather(city: str) -> dict:
    """Current weather in a city.

    Args:
        city: Name of the city.
    """
    return {"city": city, "temp_c": 18}


def trap_gated_weather() -> tuple[Any, Any]:
    """get_weather that answers only once the model has trapped, and the listener that opens the gate.

    In async mode a fast tool's result goes in at the first safe point after the call, which
    may come before or after the trap depending on timing; gating makes the position certain.
    """
    trapped = threading.Event()

    def get_weather(city: str) -> dict:
        """Current weather in a city.

        Args:
            city: Name of the city.
        """
        trapped.wait(10)
        return {"city": city, "temp_c": 18}

    def on_event(event: Any) -> None:
        if event.kind == "trap":
            trapped.set()

    return get_weather, on_event


def model_text(result: Any) -> str:
    """What the model wrote: the raw text without the interrupts the runtime injected."""
    return re.sub(r"\[INTR\].*?\[END\]", "", result.raw_text)


def make_sleepy(seconds: float) -> Any:
    def lookup(key: str) -> dict:
        """Look a key up slowly.

        Args:
            key: The key.
        """
        time.sleep(seconds)
        return {"key": key}

    return lookup


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def engines() -> Any:
    made: list[FakeEngine] = []

    def make(script: str, **kwargs: Any) -> FakeEngine:
        engine = FakeEngine(script, **kwargs)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


def remote(engine: FakeEngine, backend: str = "tgi", **kwargs: Any) -> RemoteAsyncLM:
    """``backend`` "tgi-http": TGI's protocol spoken directly, without InferenceClient."""
    if backend == "tgi-http":
        backend = "tgi"
        kwargs["backend_kwargs"] = {"transport": "http"}
    kwargs.setdefault("tools", [get_weather])
    kwargs.setdefault("timeout_s", 10)
    kwargs.setdefault("retry_backoff_s", 0.01)
    kwargs.setdefault("system_prompt", False)
    return RemoteAsyncLM(engine.url, backend=backend, **kwargs)


# ---------------------------------------------------------------------------------------------
# construction
# ---------------------------------------------------------------------------------------------


def test_construction_and_bad_input() -> None:
    rlm = AsyncLM.remote("http://127.0.0.1:9", backend="openai", model="m", mode="sync")
    assert isinstance(rlm, RemoteAsyncLM) and rlm.mode == "sync"
    assert isinstance(rlm.backend, OpenAICompletionsBackend) and rlm.backend.model == "m"
    assert isinstance(RemoteAsyncLM("http://127.0.0.1:9").backend, TGIBackend)
    assert completions_url("http://h:1/v1/completions") == "http://h:1/v1/completions"
    with pytest.raises(ValueError, match="unknown backend"):
        RemoteAsyncLM("http://127.0.0.1:9", backend="grpc")
    with pytest.raises(ValueError, match="http"):
        make_backend("127.0.0.1:9", "tgi")
    with pytest.raises(ValueError, match="unknown mode"):
        RemoteAsyncLM("http://127.0.0.1:9", mode="eager")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="no generation in progress"):
        rlm.interrupt("hi")
    assert rlm.cancel() is False and not rlm.generating
    # TGI wants do_sample instead of temperature 0, and no top_p of 1
    params = TGIBackend("http://h:1").parameters(
        __import__("hf_asynclm.remote", fromlist=["SegmentRequest"]).SegmentRequest("p", 5, ["x"], temperature=0, top_p=1.0)
    )
    assert params == {"max_new_tokens": 5, "stop": ["x"], "do_sample": False}


def test_plain_prompt_has_cml_system_prompt() -> None:
    rlm = RemoteAsyncLM("http://127.0.0.1:9", tools=[get_weather])
    prompt = rlm.render_prompt("Weather in Oslo?")
    assert "[CALL]" in prompt and "get_weather(city)" in prompt and prompt.endswith("\n\nWeather in Oslo?")
    chat = rlm.render_prompt([{"role": "user", "content": "Hi"}])
    assert chat.startswith("System: ") and chat.endswith("User: Hi\nAssistant:")


# ---------------------------------------------------------------------------------------------
# the protocol against the scripted TGI server
# ---------------------------------------------------------------------------------------------


def test_async_call_trap_injection_and_resubmission(engines: Any) -> None:
    engine = engines(ONE_CALL)
    tool, on_event = trap_gated_weather()
    rlm = remote(engine, tools=[tool])
    result = rlm.generate(PROMPT, max_new_tokens=200, on_event=on_event)

    assert result.raw_text.replace(W1_INTR, "") == ONE_CALL  # the script, plus the injected interrupt
    assert W1_INTR in result.raw_text
    assert result.raw_text.index(W1_INTR) > result.raw_text.index("[CALL]")
    assert result.text == " Checking.  Let me wait.  Oslo is mild."
    assert [c.status for c in result.calls] == ["done"] and result.calls[0].result == WEATHER
    assert [i.call_id for i in result.interrupts] == ["w1"]
    # re-submitted: the next prompt is the old one + generated text + the interrupt
    assert len(engine.requests) == 2
    first, second = engine.requests
    assert first.prompt == PROMPT and first.parameters["stop"] == ["[TRAP] [END]"] and first.parameters["details"]
    assert first.path == "/"  # InferenceClient posts to TGI's compat route, which streams as /generate_stream
    assert second.prompt.startswith(PROMPT) and second.prompt.endswith(W1_INTR) and "[TRAP] [END]" in second.prompt
    stats = result.stats
    assert stats.resubmissions == 1 and len(stats.segment_ttft_s) == 2 and all(t >= 0 for t in stats.segment_ttft_s)
    assert stats.stop_reason == "eos" and stats.interrupts == 1
    # tokens: the server's counts (the EOS included), prompt length from TGI's details
    assert stats.generated_tokens == sum(s["tokens"] for s in stats.remote["segments"])
    assert stats.prompt_tokens == len(tokenize(PROMPT))
    assert stats.remote["backend"] == "tgi" and stats.remote["endpoint"] == engine.url
    assert rlm.last_session is not None and rlm.last_session.executor.closed


@pytest.mark.parametrize("backend", ["tgi", "tgi-http", "openai"])
@pytest.mark.parametrize("mode", ["async", "sync", "sync-parallel"])
def test_modes_and_backends_follow_the_script(engines: Any, backend: str, mode: str) -> None:
    engine = engines(ONE_CALL)
    tool, on_event = trap_gated_weather() if mode == "async" else (get_weather, None)
    result = remote(engine, backend, mode=mode, tools=[tool]).generate(PROMPT, max_new_tokens=200, on_event=on_event)
    assert model_text(result) == ONE_CALL
    assert [c.status for c in result.calls] == ["done"] and result.mode == mode
    assert "w1" in [i.call_id for i in result.interrupts]
    if mode == "sync":  # the result goes in right after the call's [END]
        assert '[END]' + W1_INTR in result.raw_text
        if backend != "openai":
            assert all(r.parameters["stop"] == ["[END]"] for r in engine.requests)
    else:  # after the trap
        assert "[TRAP] [END]" + W1_INTR in result.raw_text
    if backend == "openai":
        assert all("stop" not in r.body for r in engine.requests)  # vLLM-style servers drop stop text: the client cuts
        assert engine.requests[0].body["max_tokens"] == 200


def test_async_overlaps_calls_and_sync_serialises_them(engines: Any) -> None:
    script = " A. [CALL] a [HEAD] lookup(key=\"x\") [END] B. [CALL] b [HEAD] lookup(key=\"y\") [END] C. [TRAP] [END] D."
    walls: dict[str, float] = {}
    results: dict[str, Any] = {}
    for mode in ("async", "sync", "sync-parallel"):
        engine = engines(script, token_delay_s=0.005)
        t0 = time.monotonic()
        results[mode] = remote(engine, tools=[make_sleepy(0.4)], mode=mode).generate(PROMPT, max_new_tokens=200)
        walls[mode] = time.monotonic() - t0
        assert [c.status for c in results[mode].calls] == ["done", "done"]

    a, b = results["async"].calls
    assert b.started_at < a.finished_at  # async: the second call runs while the first is still running
    a, b = results["sync"].calls
    assert b.submitted_at >= a.finished_at  # sync: the model waited for each call
    a, b = results["sync-parallel"].calls
    trap = next(e for e in results["sync-parallel"].timeline if e.kind == "trap")
    assert a.submitted_at >= trap.time - 0.05 and b.started_at < a.finished_at  # bundled until the trap, then parallel
    assert walls["sync"] > walls["async"] * 1.3
    assert walls["sync"] > 0.8 and walls["async"] < walls["sync"]


def test_tool_that_raises_becomes_an_error_interrupt(engines: Any) -> None:
    def get_weather(city: str) -> dict:
        """Weather.

        Args:
            city: The city.
        """
        raise ValueError(f"no station in {city}")

    engine = engines(ONE_CALL)
    result = remote(engine, tools=[get_weather]).generate(PROMPT, max_new_tokens=200)
    assert result.calls[0].status == "error"
    assert "[INTR] w1 [HEAD] error: ValueError: no station in Oslo [END]" in result.raw_text
    assert result.raw_text.endswith("Oslo is mild.")  # generation went on
    assert "error: ValueError" in engine.requests[-1].prompt


def test_user_interrupt_from_another_thread(engines: Any) -> None:
    script = " " + " ".join(f"word{i}." for i in range(60))
    engine = engines(script, token_delay_s=0.01)
    rlm = remote(engine)
    seen_text = threading.Event()

    def on_event(event: Any) -> None:
        if event.kind == "text":
            seen_text.set()

    def speak() -> None:
        assert seen_text.wait(10)
        rlm.interrupt("make it\nThursday")

    speaker = threading.Thread(target=speak)
    speaker.start()
    result = rlm.generate(PROMPT, max_new_tokens=500, on_event=on_event)
    speaker.join(5)
    user = "[INTR] user [HEAD] make it Thursday [END]"
    assert user in result.raw_text and result.raw_text.replace(user, "") == script
    assert any(user in p for p in engine.prompts[1:]) and result.stats.resubmissions >= 1
    assert any(e.kind == "user_interrupt" for e in result.timeline)
    assert [i.call_id for i in result.interrupts] == ["user"]


def test_cancel_from_another_thread_stops_quickly(engines: Any) -> None:
    script = ' [CALL] w1 [HEAD] lookup(key="k") [END] ' + " ".join(f"w{i}" for i in range(400))
    engine = engines(script, token_delay_s=0.02)
    rlm = remote(engine, tools=[make_sleepy(30)])
    started = threading.Event()

    def on_event(event: Any) -> None:
        if event.kind == "call_started":
            started.set()

    def stop() -> None:
        assert started.wait(10)
        time.sleep(0.1)
        assert rlm.cancel()

    killer = threading.Thread(target=stop)
    killer.start()
    t0 = time.monotonic()
    result = rlm.generate(PROMPT, max_new_tokens=1000, on_event=on_event)
    elapsed = time.monotonic() - t0
    killer.join(5)
    assert result.stats.stop_reason == "cancelled" and elapsed < 5
    assert result.calls[0].status == "cancelled"
    assert rlm.last_session is not None and rlm.last_session.executor.closed and not rlm.generating
    deadline = time.monotonic() + 5  # the server sees the request go away (TGI then cancels it)
    while not engine.requests[-1].disconnected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.requests[-1].disconnected and engine.requests[-1].tokens_sent < 400


def test_max_new_tokens_counts_generated_tokens_across_segments(engines: Any) -> None:
    engine = engines(ONE_CALL + " " + " ".join(f"x{i}" for i in range(100)))
    tool, on_event = trap_gated_weather()
    result = remote(engine, tools=[tool]).generate(PROMPT, max_new_tokens=40, on_event=on_event)
    stats = result.stats
    assert stats.stop_reason == "max_new_tokens" and stats.generated_tokens == 40
    first, second = engine.requests
    assert first.parameters["max_new_tokens"] == 40
    assert second.parameters["max_new_tokens"] == 40 - stats.remote["segments"][0]["tokens"]
    assert W1_INTR in result.raw_text  # injected tokens do not count


def test_eos_with_results_owed_waits_and_resubmits(engines: Any) -> None:
    script = ' Working. [CALL] w1 [HEAD] lookup(key="k") [END] Done.'
    engine = engines(script)
    result = remote(engine, tools=[make_sleepy(0.3)]).generate(PROMPT, max_new_tokens=100)
    assert result.calls[0].status == "done"  # not cancelled at EOS
    assert result.raw_text == script + '[INTR] w1 [HEAD] {"key": "k"} [END]'
    assert result.stats.trap_wait_s > 0.1 and result.stats.resubmissions == 1 and result.stats.stop_reason == "eos"
    assert any(e.kind == "trap" and e.data.get("reason") == "eos" for e in result.timeline)


def test_user_stop_string_ends_generation(engines: Any) -> None:
    engine = engines(ONE_CALL)
    result = remote(engine).generate(PROMPT, max_new_tokens=200, stop=["mild"])
    assert result.stats.stop_reason == "stop_sequence" and result.raw_text.endswith("Oslo is mild")
    assert engine.requests[-1].parameters["stop"] == ["[TRAP] [END]", "mild"]


def test_stream_yields_events_and_result(engines: Any) -> None:
    engine = engines(ONE_CALL, token_delay_s=0.002)
    events = list(remote(engine).stream(PROMPT, max_new_tokens=200))
    kinds = [e.kind for e in events]
    for kind in ("text", "call_written", "call_started", "call_finished", "trap", "resume", "interrupt", "done"):
        assert kind in kinds, kind
    assert kinds.index("call_written") < kinds.index("call_started") < kinds.index("interrupt")
    assert kinds[-1] == "done" and events[-1].data["result"].raw_text.endswith("Oslo is mild.")


def test_stream_reraises_engine_errors(engines: Any) -> None:
    engine = engines(ONE_CALL, faults=[{"status": 400, "message": "prompt too long"}])
    seen: list[str] = []
    with pytest.raises(RemoteEngineError, match="prompt too long"):
        for event in remote(engine).stream(PROMPT, max_new_tokens=10, on_event=lambda e: seen.append(e.kind)):
            pass
    assert seen[-1] == "done"
    with pytest.raises(ValueError, match="max_new_tokens"):
        list(remote(engine).stream(PROMPT, max_new_tokens=0))


def test_tokenizer_renders_chat_and_counts_tokens(engines: Any) -> None:
    from hf_asynclm.prompting import CML_CHAT_TEMPLATE
    from hf_asynclm.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = CML_CHAT_TEMPLATE
    engine = engines(ONE_CALL, cue="<|assistant|>\n")
    tool, on_event = trap_gated_weather()
    rlm = remote(engine, tokenizer=tok, system_prompt=True, tools=[tool])
    prompt = rlm.render_prompt([{"role": "user", "content": "Weather in Oslo?"}])
    assert prompt.startswith("<|system|>\nget_weather(city)") and prompt.endswith("<|assistant|>\n")  # no BOS text
    result = rlm.generate([{"role": "user", "content": "Weather in Oslo?"}], max_new_tokens=200, on_event=on_event)
    assert W1_INTR in result.raw_text
    assert result.stats.injected_tokens == len(tok.encode(W1_INTR, add_special_tokens=False)), result.raw_text  # once seen 74 != 27 under heavy load: say what went in
    assert result.prompt_length == len(tok.encode(prompt, add_special_tokens=False))
    assert result.sequences.shape[1] > result.prompt_length


def test_openai_server_stops_restore_dropped_stop_text(engines: Any) -> None:
    # vLLM drops the matched stop string but names it in stop_reason: the client puts it back
    engine = engines(ONE_CALL)
    tool, on_event = trap_gated_weather()
    result = remote(engine, "openai", server_stops=True, tools=[tool]).generate(PROMPT, max_new_tokens=200, on_event=on_event)
    assert engine.requests[0].body["stop"] == ["[TRAP] [END]"] and engine.requests[0].finish == "stop_sequence"
    assert result.raw_text.replace(W1_INTR, "") == ONE_CALL and "[TRAP] [END]" + W1_INTR in result.raw_text


# ---------------------------------------------------------------------------------------------
# faults
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["tgi", "tgi-http", "openai"])
def test_server_errors_are_retried_with_backoff(engines: Any, backend: str) -> None:
    engine = engines(ONE_CALL, faults=[{"status": 500}, {"status": 503}])
    tool, on_event = trap_gated_weather()
    result = remote(engine, backend, tools=[tool]).generate(PROMPT, max_new_tokens=200, on_event=on_event)
    assert model_text(result) == ONE_CALL and W1_INTR in result.raw_text
    assert result.stats.remote["retries"] == 2 and len(engine.requests) == 4  # 2 failures, 2 segments
    assert result.stats.resubmissions == 1


@pytest.mark.parametrize("backend", ["tgi", "tgi-http", "openai"])
def test_client_errors_raise_at_once(engines: Any, backend: str) -> None:
    engine = engines(ONE_CALL, faults=[{"status": 422, "error_type": "validation", "message": "inputs too long"}])
    rlm = remote(engine, backend)
    with pytest.raises(RemoteEngineError) as info:
        rlm.generate(PROMPT, max_new_tokens=200)
    err = info.value
    assert engine.url in str(err) and "inputs too long" in str(err) and err.status == 422 and not err.retryable
    assert len(engine.requests) == 1  # no retry
    assert rlm.last_session is not None and rlm.last_session.executor.closed and not rlm.generating


def test_failure_after_a_call_cancels_it_and_closes_the_executor(engines: Any) -> None:
    script = ONE_CALL.replace('get_weather(city="Oslo")', 'lookup(key="k")')
    after_call = tokenize(script).index("[END]") + 2  # the error event comes a token after the call's [END]
    engine = engines(script, faults=[{"error_after": after_call, "error_type": "validation", "message": "bad request"}])
    rlm = remote(engine, tools=[make_sleepy(30)])
    t0 = time.monotonic()
    with pytest.raises(RemoteEngineError, match="bad request"):
        rlm.generate(PROMPT, max_new_tokens=200)
    assert time.monotonic() - t0 < 5
    session = rlm.last_session
    assert session is not None and session.executor.closed
    assert [c.status for c in session.executor.calls] == ["cancelled"]


@pytest.mark.parametrize("backend", ["tgi", "openai"])
def test_unreachable_server(backend: str) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    rlm = RemoteAsyncLM(url, backend=backend, max_retries=2, retry_backoff_s=0.01, timeout_s=5)
    t0 = time.monotonic()
    with pytest.raises(RemoteEngineError) as info:
        rlm.generate("hi", max_new_tokens=5)
    assert url in str(info.value) and info.value.kind == "connection" and "after 2 retries" in str(info.value)
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("backend", ["tgi", "tgi-http", "openai"])
def test_stream_cut_midway_resumes_from_received_text(engines: Any, backend: str) -> None:
    engine = engines(ONE_CALL, faults=[{"cut_after": 3}])
    tool, on_event = trap_gated_weather()
    result = remote(engine, backend, tools=[tool]).generate(PROMPT, max_new_tokens=200, on_event=on_event)
    assert model_text(result) == ONE_CALL and W1_INTR in result.raw_text
    assert result.stats.remote["resumes"] == 1 and result.stats.resubmissions == 2
    assert engine.requests[1].prompt == PROMPT + "".join(tokenize(ONE_CALL)[:3])
    assert result.stats.remote["segments"][0]["end"] == "error:cut"


@pytest.mark.parametrize("backend", ["tgi", "tgi-http", "openai"])
def test_error_event_midstream_resumes_and_before_first_token_retries(engines: Any, backend: str) -> None:
    engine = engines(ONE_CALL, faults=[{"error_after": 0, "error_type": "overloaded"}, {"error_after": 4, "error_type": "generation"}])
    result = remote(engine, backend).generate(PROMPT, max_new_tokens=200)
    assert model_text(result) == ONE_CALL and W1_INTR in result.raw_text
    assert result.stats.remote["retries"] == 1 and result.stats.remote["resumes"] == 1
    assert result.stats.remote["segments"][0]["end"] == "error:stream_error"
    assert result.stats.remote["segments"][1]["end"] == "error:stream_error"


def test_tgi_works_with_hf_hub_offline(engines: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    engine = engines(ONE_CALL)
    result = remote(engine).generate(PROMPT, max_new_tokens=200)  # transport "auto": direct HTTP
    assert W1_INTR in result.raw_text and all(r.path == "/generate_stream" for r in engine.requests)
    rlm = remote(engine, backend_kwargs={"transport": "inference_client"})
    with pytest.raises(RemoteEngineError, match="HF_HUB_OFFLINE") as info:
        rlm.generate(PROMPT, max_new_tokens=5)
    assert engine.url in str(info.value) and info.value.kind == "config"


@pytest.mark.parametrize("backend", ["tgi", "tgi-http"])
def test_validation_error_event_raises(engines: Any, backend: str) -> None:
    engine = engines(ONE_CALL, faults=[{"error_after": 2, "error_type": "validation", "message": "bad stop"}])
    with pytest.raises(RemoteEngineError, match="bad stop") as info:
        remote(engine, backend).generate(PROMPT, max_new_tokens=200)
    assert engine.url in str(info.value) and len(engine.requests) == 1


def test_repeated_cuts_are_bounded(engines: Any) -> None:
    engine = engines(ONE_CALL, faults=[{"cut_after": 1}] * 10)
    with pytest.raises(RemoteEngineError, match="max_resumes=2"):
        remote(engine, max_resumes=2).generate(PROMPT, max_new_tokens=200)
    assert len(engine.requests) == 3


@pytest.mark.parametrize("backend", ["tgi", "tgi-http", "openai"])
@pytest.mark.parametrize("hang_after", [0, 3])
def test_slow_server_times_out(engines: Any, backend: str, hang_after: int) -> None:
    engine = engines(ONE_CALL, faults=[{"hang_after": hang_after, "hang_s": 30}])
    rlm = remote(engine, backend, timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(RemoteEngineError) as info:
        rlm.generate(PROMPT, max_new_tokens=200)
    assert time.monotonic() - t0 < 5
    assert info.value.kind == "timeout" and engine.url in str(info.value) and len(engine.requests) == 1
    assert rlm.last_session is not None and rlm.last_session.executor.closed and not rlm.generating


# ---------------------------------------------------------------------------------------------
# a real `transformers serve` (OpenAI /v1/completions) on loopback
# ---------------------------------------------------------------------------------------------

# What the memorising model writes after MEMO_PROMPT; the interrupt is what get_weather returns.
MEMO_PROMPT = "Oslo?\nAssistant:"
MEMO_SCRIPT = ' [CALL] w1 [HEAD] get_weather(city="Oslo") [END] [TRAP] [END][INTR] w1 [HEAD] {"temp_c": 18} [END] 18 C.'


def _train_memorising_model(folder: Path) -> bool:
    """A tiny Llama that has learnt MEMO_PROMPT + MEMO_SCRIPT by heart (CML markers spelt as text)."""
    import torch

    from hf_asynclm.testing import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer(with_markers=False)
    ids = tok(MEMO_PROMPT + MEMO_SCRIPT, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n_prompt = len(tok(MEMO_PROMPT, add_special_tokens=False)["input_ids"])
    model = tiny_llama(tok, hidden_size=64, intermediate_size=128)
    x = torch.tensor([ids])
    labels = x.clone()
    labels[0, :n_prompt] = -100
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(300):
        loss = model(input_ids=x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    model.eval()
    out = model.generate(x[:, :n_prompt], max_new_tokens=len(ids), do_sample=False)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return tok.decode(out[0, n_prompt:], skip_special_tokens=True) == MEMO_SCRIPT


@pytest.fixture(scope="module")
def transformers_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`transformers serve` on 127.0.0.1 with two local models: a random tiny Llama and a memorising one."""
    pytest.importorskip("fastapi", reason="transformers serve needs the serving extra: pip install 'transformers[serving]'")
    pytest.importorskip("uvicorn", reason="transformers serve needs the serving extra: pip install 'transformers[serving]'")
    from hf_asynclm.testing import tiny_llama, tiny_tokenizer

    root = tmp_path_factory.mktemp("serve")
    random_dir, memo_dir = root / "random-llama", root / "memo-llama"
    tok = tiny_tokenizer()
    tiny_llama(tok).save_pretrained(random_dir)
    tok.save_pretrained(random_dir)
    memorised = _train_memorising_model(memo_dir)

    port = free_port()
    cmd = [
        sys.executable, "-c", "from transformers.cli.transformers import app; app()",
        "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_UPDATE_CHECK="1", TOKENIZERS_PARALLELISM="false")
    log = open(root / "serve.log", "w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        from hf_asynclm.remote.backends import _http_module

        http = _http_module()
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.skip(f"transformers serve exited with {proc.returncode}: {log.read()[-1500:]}")
            try:
                if http.get(url + "/health", timeout=1).status_code == 200:
                    break
            except Exception:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.skip(f"transformers serve did not answer /health within 90 s: {log.read()[-1500:]}")
            time.sleep(0.3)
        yield {"url": url, "random": str(random_dir), "memo": str(memo_dir), "memorised": memorised, "cmd": cmd}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def test_transformers_serve_streams_through_the_openai_backend(transformers_server: Any) -> None:
    srv = transformers_server
    rlm = RemoteAsyncLM(srv["url"], backend="openai", model=srv["random"], tools=[get_weather], timeout_s=60)
    result = rlm.generate("Hello", max_new_tokens=8, temperature=0, seed=0)
    stats = result.stats
    assert result.raw_text  # text streamed in
    assert stats.stop_reason in ("max_new_tokens", "eos") and 0 < stats.generated_tokens <= 8
    assert len(stats.segment_ttft_s) >= 1 and stats.remote["segments"][0]["tokens"] > 0
    assert stats.prompt_tokens > 0  # from the server's usage
    events = list(rlm.stream("Hello", max_new_tokens=4, temperature=0))
    assert events[-1].kind == "done" and events[-1].data["result"].stats.generated_tokens > 0


def test_transformers_serve_rejects_unknown_model_with_a_clear_error(transformers_server: Any) -> None:
    rlm = RemoteAsyncLM(transformers_server["url"], backend="openai", model="/no/such/model", timeout_s=60, max_retries=0)
    with pytest.raises(RemoteEngineError) as info:
        rlm.generate("Hello", max_new_tokens=4)
    assert transformers_server["url"] in str(info.value)


@pytest.mark.parametrize("mode", ["async", "sync-parallel"])
def test_transformers_serve_runs_cml_end_to_end(transformers_server: Any, mode: str) -> None:
    srv = transformers_server
    if not srv["memorised"]:
        pytest.skip("the tiny model did not learn its CML script by heart on this machine")
    trap_seen = threading.Event()

    def get_weather(city: str) -> dict:
        """Current weather.

        Args:
            city: The city.
        """
        trap_seen.wait(10)  # answer during the trap, where the model learnt to read the result
        return {"temp_c": 18}

    def on_event(event: Any) -> None:
        if event.kind == "trap":
            trap_seen.set()

    rlm = RemoteAsyncLM(
        srv["url"], backend="openai", model=srv["memo"], tools=[get_weather], mode=mode, system_prompt=False, timeout_s=60
    )
    result = rlm.generate(MEMO_PROMPT, max_new_tokens=150, temperature=0, on_event=on_event)
    assert result.raw_text == MEMO_SCRIPT  # the call ran, its result was injected, the model read it
    assert [c.status for c in result.calls] == ["done"] and result.stats.resubmissions == 1
    assert len(result.stats.segment_ttft_s) == 2 and result.text == "   18 C."


@pytest.mark.parametrize("mode", ["async", "sync", "sync-parallel"])
def test_text_past_a_wait_in_a_chunk_of_several_tokens_is_dropped(engines: Any, mode: str) -> None:
    """A server that sends several tokens per chunk (``transformers serve`` 5.25, vLLM / SGLang stream
    intervals) runs past the trap, or past the call in sync mode, within one chunk: the model wrote that
    text without the result. It is dropped, the result goes in right after the block, and the model
    writes on from there, as a local run would."""
    engine = engines(ONE_CALL, tokens_per_chunk=64)  # the whole script in one chunk
    tool, on_event = trap_gated_weather() if mode == "async" else (get_weather, None)
    result = remote(engine, "openai", mode=mode, tools=[tool]).generate(PROMPT, max_new_tokens=200, on_event=on_event)
    assert model_text(result) == ONE_CALL
    wait = "[END]" if mode == "sync" else "[TRAP] [END]"
    assert wait + W1_INTR in result.raw_text
    assert result.stats.remote["dropped_chars"] > 0
    # nothing written after the wait went back to the server: each resubmitted prompt ends with an injection
    for request in engine.requests[1:]:
        assert request.prompt.endswith("[END]"), request.prompt
    assert [c.status for c in result.calls] == ["done"]


def test_a_loop_of_malformed_blocks_stops_resubmitting(engines: Any) -> None:
    engine = engines(" Done [END]" * 30)
    result = remote(engine, tools=[get_weather]).generate(PROMPT, max_new_tokens=400)
    assert result.stats.stop_reason == "cml_errors"
    assert len(result.malformed) == 8 and len(engine.requests) <= 9


def test_openai_stream_reads_the_usage_chunk_after_the_finish_chunk() -> None:
    """``transformers serve`` (5.25 on), vLLM and SGLang send token counts only in a last usage chunk, after the
    finish chunk and when asked (``stream_options.include_usage``): the finish chunk carries them, since one
    streamed chunk may hold several tokens and our own count falls short."""
    import json as _json

    from hf_asynclm.remote.backends import OpenAICompletionsBackend, SegmentRequest, _OpenAIStream

    backend = OpenAICompletionsBackend("http://127.0.0.1:9")
    assert backend.body(SegmentRequest(prompt="Hi", max_new_tokens=8))["stream_options"] == {"include_usage": True}

    class _Response:
        def __init__(self, lines: list[str]) -> None:
            self.lines = lines

        def iter_lines(self) -> Any:
            yield from self.lines

        def close(self) -> None:
            pass

    def event(**data: Any) -> str:
        return "data: " + _json.dumps(data)

    text = event(choices=[{"text": "ab cd", "index": 0, "finish_reason": None}])
    finish = event(choices=[{"text": "", "index": 0, "finish_reason": "length"}])
    usage = event(choices=[], usage={"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20})
    for lines in ([text, "", finish, "", usage, "", "data: [DONE]"], [text, finish, "data: {not json", usage]):
        chunks = list(_OpenAIStream(backend, _Response([]), _Response(lines)))
        assert [c.text for c in chunks] == ["ab cd", ""] and chunks[-1].finish_reason == "length"
        assert (chunks[-1].generated_tokens, chunks[-1].prompt_tokens) == (8, 12)
    # without a usage chunk the finish chunk comes as it was; a stream cut before any finish is still an error
    (_, last) = list(_OpenAIStream(backend, _Response([]), _Response([text, finish, "data: [DONE]"])))
    assert last.finish_reason == "length" and last.generated_tokens is None
    with pytest.raises(Exception, match="without a finish reason"):
        list(_OpenAIStream(backend, _Response([]), _Response([text])))
