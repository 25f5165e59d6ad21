"""The latency benchmark: analysis of a constructed run, and a small end-to-end run."""

from __future__ import annotations

import math

import pytest
import torch

from hf_asynclm.bench.latency import (
    BENCH_MODES,
    CallTiming,
    LatencyConfig,
    RunTrace,
    analyse_run,
    load_bench_model,
    load_workload,
    median_task,
    run_latency,
    summarize,
)
from hf_asynclm.bench.latency_model import SimCall, ideal_schedule, l_async_independent
from hf_asynclm.bench.report import (
    latency_markdown,
    latency_overview_markdown,
    latency_stem,
    plot_timeline,
    plot_timeline_detail,
    report_model_name,
    write_json,
)
from hf_asynclm.cml import format_call, format_interrupt, format_trap
from hf_asynclm.data.tasks import PlannedCall, Task

MINI = "tests/data/bfcl_mini"


@pytest.fixture(scope="module")
def bm():
    return load_bench_model("random")


def _constructed(tok):
    """An async run built by hand: 10 ms per token, 50 ms to the first token, c1 (E = 300 ms)
    then c2 (E = 100 ms), a trap, the answer; 5 ms dispatch delays, a 2 ms tail."""
    dt, ttft = 0.01, 0.05
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    b1, b2 = enc(format_call("f(x=1)", "c1")), enc(format_call("f(x=22)", "c2"))
    trap, answer = enc(format_trap()), enc(" Done.") + [tok.eos_token_id]
    intr = enc(format_interrupt("c2", "{}")) + enc(format_interrupt("c1", "{}"))
    prompt = [5, 6, 7, 8]
    seq = list(prompt)
    enter: list[float] = []
    lengths: list[int] = []
    t = ttft
    for tid in b1 + b2 + trap:
        lengths.append(len(seq))
        enter.append(t)
        seq.append(tid)
        t += dt
    t -= dt
    end1 = enter[len(b1) - 1]
    end2 = enter[len(b1) + len(b2) - 1]
    c1 = CallTiming("c1", "f", {"x": 1}, "f(x=1)", "done", end1 + 1e-4, end1 + 0.005, end1 + 0.305)
    c2 = CallTiming("c2", "f", {"x": 22}, "f(x=22)", "done", end2 + 1e-4, end2 + 0.005, end2 + 0.105)
    trap_end = enter[-1]
    resume = max(c1.finished, c2.finished) + 0.001  # a 1 ms wake-up
    seq += intr
    t = resume
    for tid in answer:
        t += dt
        lengths.append(len(seq))
        enter.append(t)
        seq.append(tid)
    t_end = enter[-1] + 0.002
    forwards = [(0.001, ttft - 0.001, len(prompt), True)] + [(e - dt + 0.0005, e - 0.0005, 1, False) for e in enter[1:]]
    trace = RunTrace(
        mode="async", t_start=0.0, t_end=t_end, request_starts=[0.0], enter=enter, exit=[e + 1e-5 for e in enter],
        lengths=lengths, forwards=forwards, sequence=seq, prompt_len=len(prompt),
        waits=[(trap_end, resume, "trap:trap")], calls=[c1, c2], injected_tokens=len(intr),
    )
    task = Task("t", "bfcl", "parallel", [], [], [PlannedCall("c1", "f", {"x": 1}), PlannedCall("c2", "f", {"x": 22})])
    return trace, task, dict(dt=dt, ttft=ttft, n1=len(b1), n2=len(b2), n_trap=len(trap), n_answer=len(answer), t_end=t_end)


def test_efficiency_of_a_constructed_run(bm) -> None:
    trace, task, k = _constructed(bm.tokenizer)
    m = analyse_run(trace, task, bm.tokenizer, tpot_ms=10, ttft_ms=50)
    dt = k["dt"]
    g1 = (k["n1"] - 1) * dt  # the first token came with the prefill: it is time to first token
    g2 = k["n2"] * dt
    calls = {c["call_id"]: c for c in m["calls"]}
    assert calls["c1"]["G_s"] == pytest.approx(g1) and calls["c2"]["G_s"] == pytest.approx(g2)
    assert calls["c1"]["E_s"] == pytest.approx(0.3) and calls["c2"]["E_s"] == pytest.approx(0.1)
    assert calls["c1"]["dispatch_s"] == pytest.approx(0.005 - 1e-5)
    assert m["ttft_s"] == pytest.approx(k["ttft"])
    assert m["answer_s"] == pytest.approx(k["n_answer"] * dt)
    assert m["trap_tokens"] == k["n_trap"] and m["trap_token_s"] == pytest.approx(k["n_trap"] * dt)
    # the ideal: appendix A's formula for independent calls, plus the first token and the answer
    ideal = k["ttft"] + l_async_independent([g1, g2], [0.3, 0.1]) + k["n_answer"] * dt
    sim = ideal_schedule([SimCall("c1", g1, 0.3), SimCall("c2", g2, 0.1)], "async", answer_s=k["n_answer"] * dt).total_s + k["ttft"]
    assert sim == pytest.approx(ideal)
    assert m["ideal_s"] == pytest.approx(ideal)
    assert m["latency_s"] == pytest.approx(k["t_end"])
    assert m["efficiency"] == pytest.approx(ideal / k["t_end"])
    assert 0.9 < m["efficiency"] < 1.0  # the dispatch delay, trap tokens and wake-up cost something
    # model-time variant: forward passes of 9 ms instead of 10 ms steps
    assert m["efficiency_model"] < m["efficiency"]
    assert m["loop_ms_per_step"] == pytest.approx(1.0, abs=1e-6)
    assert m["wake_s"] == pytest.approx(0.001)
    assert m["cml_tokens"] > 0 and m["generated_tokens"] == k["n1"] + k["n2"] + k["n_trap"] + k["n_answer"]


def test_a_reused_call_id_is_measured_not_fatal(bm) -> None:
    # a model-policy run where the model wrote the id c1 twice (the plain loop lets both run):
    # the run is analysed, both calls counted, each with its own block's writing time
    import dataclasses

    trace, task, k = _constructed(bm.tokenizer)
    tok = bm.tokenizer
    old = tok.encode(format_call("f(x=22)", "c2"), add_special_tokens=False)
    new = tok.encode(format_call("f(x=22)", "c1"), add_special_tokens=False)
    assert len(old) == len(new)
    seq = list(trace.sequence)
    start = next(i for i in range(len(seq)) if seq[i : i + len(old)] == old)
    seq[start : start + len(old)] = new
    trace.sequence = seq
    trace.calls = [trace.calls[0], dataclasses.replace(trace.calls[1], call_id="c1")]
    m = analyse_run(trace, task, tok, tpot_ms=10, ttft_ms=50)
    assert [c["call_id"] for c in m["calls"]] == ["c1", "c1"]
    assert m["calls"][0]["G_s"] == pytest.approx((k["n1"] - 1) * k["dt"])
    assert m["calls"][1]["G_s"] == pytest.approx(k["n2"] * k["dt"])
    assert math.isfinite(m["ideal_s"]) and 0.5 < m["efficiency"] <= 1.0


def test_sync_baseline_ideal_charges_every_request() -> None:
    from hf_asynclm.bench.latency import _ideal

    sims = [SimCall("c1", 0.1, 0.2), SimCall("c2", 0.1, 0.3)]
    # three requests (two results sent back) of 0.05 s each, answer 0.02 s
    assert _ideal("sync", sims, [0.05, 0.05, 0.05], 0.02) == pytest.approx(3 * 0.05 + 0.2 + 0.5 + 0.02)
    assert _ideal("sync-cached", sims, [0.05], 0.02) == pytest.approx(0.05 + 0.2 + 0.5 + 0.02)
    assert _ideal("sync-parallel", sims, [0.05], 0.02) == pytest.approx(0.05 + 0.2 + 0.3 + 0.02)


def test_summary_speedups() -> None:
    def row(lat: dict[str, float]) -> dict:
        modes = {}
        for mode, v in lat.items():
            modes[mode] = {"latency_s": v, "ideal_s": v * 0.98, "efficiency": 0.98, "efficiency_model": math.nan, "efficiency_nominal": math.nan,
                           "generated_tokens": 10, "cml_tokens": 4, "trap_tokens": 2, "injected_tokens": 5, "ttft_s": 0.05,
                           "requests": 1, "loop_ms_per_step": 0.1, "step_ms_median": 5.1, "forward_ms_median": 5.0,
                           "calls": [{"dispatch_s": 0.001, "tokens": 5, "G_s": 0.1, "E_s": 0.2}], "trap_token_s": 0.01,
                           "wake_s": 0.0, "teardown_s": 0.001, "errors": 0, "n_calls": 0 if mode == "sync" and v > 2.5 else 1}
        return {"task_id": "t", "n_calls": 1, "modes": modes}

    rows = [row({"sync": 2.0, "sync-cached": 1.5, "sync-parallel": 1.2, "async": 1.0}), row({"sync": 3.0, "sync-cached": 2.0, "sync-parallel": 2.0, "async": 1.0})]
    s = summarize(rows, BENCH_MODES)
    assert s["speedups"]["async/sync"]["median"] == pytest.approx(2.5)
    assert s["speedups"]["async/sync-parallel"]["median"] == pytest.approx(1.6)
    assert s["speedups"]["sync-parallel/sync"]["min"] == pytest.approx(1.5)
    assert s["modes"]["async"]["efficiency_aggregate"] == pytest.approx(0.98)
    assert "sync/async" not in s["speedups"]
    # work done per mode: the second task's plain loop ran none of its call
    assert (s["modes"]["async"]["calls_run"], s["modes"]["async"]["calls_due"]) == (2, 2)
    assert (s["modes"]["sync"]["calls_run"], s["modes"]["sync"]["calls_due"]) == (1, 2)


def test_workloads_from_the_mini_fixture() -> None:
    tasks, info = load_workload("bfcl-parallel", 10, 0, data_dir=MINI)
    assert tasks and all(len(t.calls) >= 2 for t in tasks)
    assert {t.category for t in tasks} <= {"parallel", "live_parallel"}
    ms, _ = load_workload("bfcl-multistep-parallel", 2, 0, data_dir=MINI, split="all")
    assert len(ms) == 2 and all(len(t.meta["chains"]) == 3 for t in ms)
    syn, _ = load_workload("synthetic", 3, 0)
    assert len(syn) == 3 and all(t.source == "synthetic" for t in syn)
    with pytest.raises(ValueError, match="unknown workload"):
        load_workload("nope", 1)
    with pytest.raises(ValueError, match="tpot_ms and ttft_ms"):
        LatencyConfig(tpot_ms=5)
    with pytest.raises(ValueError, match="unknown modes"):
        LatencyConfig(modes=("fast",))


def test_end_to_end_ordering_async_le_sync_parallel_le_sync(bm, tmp_path) -> None:
    """Oracle policy, emulated decode (2 ms/token, 60 ms/request), real tool latencies (30-500 ms).

    60 ms per request keeps the structural gap between the plain loop (a request per result) and
    the cached modes well above the noise of a busy 2-core machine.
    """
    cfg = LatencyConfig(workload="bfcl-parallel", n=2, seed=0, tpot_ms=2, ttft_ms=60, data_dir=MINI, warmup=True, threads=1)
    report = run_latency(cfg, bm)
    rows = report["tasks"]
    assert len(rows) == 2
    for r in rows:
        lat = {m: r["modes"][m]["latency_s"] for m in BENCH_MODES}
        assert lat["sync-parallel"] <= lat["sync"], lat
        assert lat["sync-cached"] <= lat["sync"], lat  # the plain loop pays a request per result
        assert lat["async"] <= lat["sync-parallel"] + 0.025, lat  # per task, 25 ms of slack for a busy shared CPU
        for m in BENCH_MODES:
            mm = r["modes"][m]
            assert mm["n_calls"] == r["n_calls"] and mm["errors"] == 0
            assert 0.5 < mm["efficiency"] <= 1.05, (m, mm["efficiency"])
        assert r["modes"]["sync"]["requests"] == r["n_calls"] + 1
        assert r["modes"]["async"]["requests"] == 1
        # LPT: the async run wrote the calls longest-expected-first
        exp = r["expected_latency_s"]
        assert r["modes"]["async"]["write_order"] == sorted(exp, key=lambda c: -exp[c])
    total = {m: sum(r["modes"][m]["latency_s"] for r in rows) for m in BENCH_MODES}
    assert total["async"] < total["sync-parallel"] < total["sync"]
    s = report["summary"]
    assert s["speedups"]["async/sync"]["median"] > 1.0
    # outputs
    md = latency_markdown(report)
    assert "async (hf-asynclm)" in md and "Paper" in md
    assert "1.6x" in latency_overview_markdown([report])
    path = write_json(report, tmp_path / "r.json")
    assert path.stat().st_size > 1000
    task = median_task(report)
    assert plot_timeline(task, tmp_path / "t.png").stat().st_size > 1000
    assert plot_timeline_detail(task, tmp_path / "d.png").stat().st_size > 1000


def test_model_policy_runs_with_a_random_model(bm) -> None:
    cfg = LatencyConfig(workload="bfcl-parallel", n=1, policy="model", tpot_ms=0.5, ttft_ms=2, max_new_tokens=12,
                        latency_scale=0.05, data_dir=MINI, warmup=False, threads=1)
    report = run_latency(cfg, bm)
    modes = report["tasks"][0]["modes"]
    assert set(modes) == set(BENCH_MODES)
    assert all(m["latency_s"] > 0 and m["generated_tokens"] <= 12 for m in modes.values())


def test_writing_that_started_nothing_is_model_time_in_the_ideal() -> None:
    from hf_asynclm.bench.latency import UNRUN_WRITING, _ideal_schedule

    sims = [SimCall("a", 1.0, 5.0)]
    base = {m: _ideal_schedule(m, sims, [0.1], 1.0) for m in BENCH_MODES}
    junk = {m: _ideal_schedule(m, sims, [0.1], 1.0, unrun_s=2.0) for m in BENCH_MODES}
    # the sync modes write it in their one stream while nothing runs: 2 s more
    for m in ("sync", "sync-cached", "sync-parallel"):
        assert junk[m][0] == pytest.approx(base[m][0] + 2.0), m
    # the plain loop sent the refused block's error back in a request of its own: one more time to first token
    assert _ideal_schedule("sync", sims, [0.1, 0.1, 0.1], 1.0, unrun_s=2.0)[0] == pytest.approx(base["sync"][0] + 2.0 + 0.1)
    assert _ideal_schedule("sync", sims, [0.1, 0.1, 0.1], 1.0)[0] == pytest.approx(base["sync"][0])
    # async writes it while call a runs for 5 s: the ideal is unchanged
    assert junk["async"][0] == pytest.approx(base["async"][0])
    assert all(UNRUN_WRITING not in order for _, order in junk.values())
    # more junk than the wait: it shows
    assert _ideal_schedule("async", sims, [0.1], 1.0, unrun_s=9.0)[0] > base["async"][0] + 3.0


def test_file_stems_name_the_model_of_a_model_policy_run() -> None:
    def report(policy: str, tpot=None, ttft=None, **extra) -> dict:
        return {"config": {"workload": "bfcl-parallel", "policy": policy, "tpot_ms": tpot, "ttft_ms": ttft}, **extra}

    assert latency_stem(report("oracle", 5.0, 59.0, model_name="cml-tiny")) == "latency_bfcl-parallel_oracle_emu5ms-ttft59ms"
    assert latency_stem(report("model", model_name="gemma-3-270m-cml")) == "latency_bfcl-parallel_model-gemma-3-270m-cml_real"
    # the oracle under real decode times the model's own decode steps: its name is in the stem too
    assert latency_stem(report("oracle", model_name="random-llama-1b")) == "latency_bfcl-parallel_oracle-random-llama-1b_real"
    # reports written before model_name existed: the label's name
    old = report("model", model="cml-tiny (LlamaForCausalLM, 3.5M parameters, vocabulary 512)")
    assert report_model_name(old) == "cml-tiny" and latency_stem(old).endswith("_model-cml-tiny_real")
    assert report_model_name(report("oracle", model="tiny random Llama (hf_asynclm.testing.tiny_llama, ...)")) == "tiny-random"


def test_tasks_beyond_the_models_context_are_left_out_and_said() -> None:
    from hf_asynclm.bench.latency import model_context, prompt_tokens

    small = load_bench_model("random")  # its own copy: the context is changed below
    cfg = LatencyConfig(workload="bfcl-parallel", n=3, latency_scale=0.05, data_dir=MINI, split="all", warmup=False,
                        threads=1, policy="model", max_new_tokens=4)
    tasks, _ = load_workload("bfcl-parallel", 3, 0, data_dir=MINI, split="all")
    sizes = sorted(prompt_tokens(small, t, cfg) for t in tasks)
    assert model_context(small.model) == 16384 and sizes[0] < sizes[-1]
    small.model.config.max_position_embeddings = sizes[-1] + 3  # the longest prompt + 4 new tokens does not fit
    report = run_latency(cfg, small)
    assert report["summary"]["n_tasks"] == len(tasks) - 1
    assert report["skipped_tasks"] == [{"task_id": report["skipped_tasks"][0]["task_id"], "prompt_tokens": sizes[-1], "context": sizes[-1] + 3}]
    assert f"1 task(s) left out: prompt ({sizes[-1]}-{sizes[-1]} tokens) + 4 new tokens beyond the model's context of {sizes[-1] + 3} positions" in latency_markdown(report)
    small.model.config.max_position_embeddings = sizes[0] + 2  # every prompt fits, with no room for 4 new tokens
    with pytest.raises(ValueError, match="no task of 'bfcl-parallel' left; lower --max-new-tokens"):
        run_latency(cfg, small)
    small.model.config.max_position_embeddings = sizes[0]  # even the shortest prompt leaves no room
    with pytest.raises(ValueError, match="left; use a model with a longer context"):
        run_latency(cfg, small)


# ---------------------------------------------------------------------------------------------
# devices (the GPU side: tests/test_cuda.py)
# ---------------------------------------------------------------------------------------------
def test_devices_this_machine_lacks_are_refused_before_any_weights_load():
    from hf_asynclm.asynclm import check_device

    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu': use cpu, cuda, cuda:N or mps"):
        check_device("gpu")
    with pytest.raises(ValueError, match="unknown device"):
        load_bench_model("random", device="tpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda:1': no CUDA GPU is available to this torch"):
            load_bench_model("random", device="cuda:1")
    else:  # pragma: no cover - a GPU machine
        with pytest.raises(ValueError, match=r"CUDA device\(s\)"):
            check_device(f"cuda:{torch.cuda.device_count()}")


def test_the_random_llama_1b_model_has_llama_3_2_1b_layers(monkeypatch):
    """``--model random-llama-1b``: Llama 3.2 1B's layer shape with random weights and the test
    tokenizer (float32 on a CPU). The shape is cut down here to keep the test light; the full
    one is built on a GPU in tests/test_cuda.py."""
    from hf_asynclm.bench import latency

    assert latency.LLAMA_3_2_1B_SHAPE["num_hidden_layers"] == 16 and latency.LLAMA_3_2_1B_SHAPE["hidden_size"] == 2048
    small = dict(latency.LLAMA_3_2_1B_SHAPE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16)
    monkeypatch.setattr(latency, "LLAMA_3_2_1B_SHAPE", small)
    bm = latency.load_bench_model("random-llama-1b", device="cpu")
    assert "Llama 3.2 1B's shape" in bm.label and "float32" in bm.label and bm.path is None
    cfg = bm.model.config
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta}  # transformers 5 / 4.x
    assert cfg.tie_word_embeddings and rope["rope_theta"] == 500000.0
    assert bm.model.config.vocab_size == len(bm.tokenizer) and bm.model.device.type == "cpu"
    # its reports and tables name it as itself, not as the 2-layer tiny random Llama
    assert bm.name == "random-llama-1b" and latency.load_bench_model("random").name == "tiny-random"
