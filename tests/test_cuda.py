"""The same behaviour on a CUDA GPU: exact injection, the call constraint, the shipped checkpoint,
training, and the benchmarks' clocks.

Every test here is skipped on a machine without a CUDA GPU (CI has none); run them on one with
``python -m pytest tests/test_cuda.py`` (``benchmarks/gpu_check.sh`` runs them with the GPU
benchmarks). The CPU half of each comparison runs in the same test, so a difference between the
devices is a failure here and not a note in a report.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from hf_asynclm import AsyncLM
from hf_asynclm.testing import ScriptedPolicy, tiny_gemma3, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = "cuda"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def lookup(key: str) -> dict:
    """Look a key up.

    Args:
        key: The key.
    """
    time.sleep(0.01)
    return {"key": key, "value": len(key)}


def add(a: int, b: int) -> int:
    """Add two numbers.

    Args:
        a: First.
        b: Second.
    """
    time.sleep(0.01)
    return a + b


SCRIPT = [
    "Let me look.",
    ' [CALL] a1 [HEAD] lookup(key="alpha") [END]',
    ' [CALL] a2 [HEAD] add(a=2, b=3) [END]',
    " Meanwhile some words go by while the calls run in the background.",
    " [TRAP] [END]",
    " Got one.",
    " [TRAP] [END]",
    " Both are back, the sum is there.",
]


class Recorder(LogitsProcessor):
    """Records the ids and the raw logits the loop saw at each step."""

    def __init__(self) -> None:
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, input_ids, scores):
        self.steps.append((input_ids.clone(), scores.clone()))
        return scores


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_injected_interrupts_are_exact_on_the_gpu(family):
    """Results injected into a CUDA KV cache give the logits of one forward pass over the whole sequence."""
    tok = tiny_tokenizer()
    model = (tiny_llama(tok) if family == "llama" else tiny_gemma3(tok, sliding_window=8)).to(CUDA)
    alm = AsyncLM(model, tok, tools=[lookup, add])
    rec = Recorder()
    policy = ScriptedPolicy(tok, SCRIPT)
    result = alm.generate("Start.", logits_processor=LogitsProcessorList([rec, policy]), max_new_tokens=400, do_sample=False)
    assert [c.status for c in result.calls] == ["done", "done"]
    assert result.stats.interrupts >= 2 and result.stats.injected_tokens > 10
    seq = result.sequences
    assert seq.device.type == "cuda"
    with torch.no_grad():
        full = model(input_ids=seq).logits[0].float()
    for ids, scores in rec.steps:
        n = ids.shape[1]
        assert scores.device.type == "cuda"
        assert torch.equal(seq[0, :n], ids[0])
        torch.testing.assert_close(scores[0], full[n - 1], atol=1e-4, rtol=1e-4)


def test_the_call_constraint_searches_the_vocabulary_with_gpu_scores():
    """None of the most likely tokens is valid: the whole-vocabulary search (a CPU index) works on CUDA scores."""
    from hf_asynclm.call_grammar import CallGrammarProcessor

    tok = tiny_tokenizer()
    ids = tok.encode("[CALL] w1 [HEAD] get_weather(", add_special_tokens=False)
    scores = torch.linspace(1.0, 0.0, len(tok)).unsqueeze(0)
    kept = {}
    for device in ("cpu", CUDA):
        proc = CallGrammarProcessor(tok, [WEATHER], candidates=2, max_scan=4)
        out = proc(torch.tensor([ids], device=device), scores.to(device))
        assert out.device.type == torch.device(device).type and proc.vocabulary_searches == 1
        kept[device] = torch.nonzero(out[0] > float("-inf")).flatten().tolist()
    assert kept["cpu"] == kept[CUDA] and kept["cpu"]


@pytest.mark.timeout(600)  # the CPU half runs the shipped model 8 times in float32
def test_the_shipped_checkpoint_makes_the_same_calls_on_the_gpu():
    """cml-tiny in float32 on the GPU writes what it writes on the CPU (virtual clock: the same
    interrupts at the same tokens), its recorded runtime settings (constrained calls) included."""
    from hf_asynclm.data.synthetic import generate_tasks
    from hf_asynclm.evaluation import evaluate_synthetic

    tasks = generate_tasks(8, seed=1, split="eval")
    reports = {}
    for device in ("cpu", CUDA):
        alm = AsyncLM.from_pretrained(device=device, dtype=torch.float32)
        assert alm.model.device.type == torch.device(device).type
        reports[device] = evaluate_synthetic(
            alm.model, alm.tokenizer, tasks, clock="virtual", interrupt_at=alm.interrupt_at,
            constrain_calls=alm.constrain_calls, no_repeat_calls=alm.no_repeat_calls,
            complete_names=alm.complete_names, quote_numbers=alm.quote_numbers,
        )
    cpu, gpu = reports["cpu"], reports[CUDA]
    assert [t.emitted for t in gpu.tasks] == [t.emitted for t in cpu.tasks]
    assert [t.success for t in gpu.tasks] == [t.success for t in cpu.tasks]
    assert gpu.success_rate == cpu.success_rate > 0.5


def test_the_shipped_checkpoint_runs_in_half_precision_on_the_gpu():
    """Without ``dtype`` the fp16 weights stay fp16 on a GPU and still write valid calls."""
    from hf_asynclm.demo_tools import demo_tools
    from hf_asynclm.virtual_time import VirtualClock

    alm = AsyncLM.from_pretrained(tools=demo_tools(), device=CUDA)
    assert alm.model.dtype == torch.float16 and alm.model.device.type == "cuda"
    clock = VirtualClock(0.01, lambda name, args: 0.05)
    result = alm.generate("What's the weather in Paris and in Oslo?", max_new_tokens=200, do_sample=False, virtual_clock=clock)
    assert result.calls and all(c.status == "done" for c in result.calls)
    assert {c.name for c in result.calls} == {"get_weather"}
    assert not result.malformed


def test_training_runs_on_the_gpu_and_the_checkpoint_generates_there(tmp_path):
    """A few bf16 steps on the GPU (the Trainer takes it when it is there) lower the loss and save a
    checkpoint that loads onto the GPU and generates."""
    from hf_asynclm.training.train import TRAINING_RECORD, TrainConfig, train

    examples = [
        {
            "task_id": f"w{i}",
            "mode": "async",
            "messages": [{"role": "user", "content": f"Weather in {city}?"}],
            "tools": [WEATHER],
            "segments": [
                {"role": "model", "text": f'[CALL] w1 [HEAD] get_weather(city="{city}") [END] [TRAP] [END]'},
                {"role": "inject", "text": f'[INTR] w1 [HEAD] {{"temp_c": {10 + i}}} [END]'},
                {"role": "model", "text": f" {city}: {10 + i} C."},
            ],
            "meta": {"n_calls": 1, "category": "simple", "latency_ms": 300},
        }
        for i, city in enumerate(["Paris", "Rome", "Oslo", "Lima", "Kyiv", "Baku"])
    ]
    data = tmp_path / "traces.jsonl"
    data.write_text("\n".join(json.dumps(e) for e in examples) + "\n", encoding="utf-8")
    cfg = TrainConfig.from_preset(
        "micro", data=str(data), output_dir=str(tmp_path / "ckpt"), logging_steps=1, disable_tqdm=True,
        max_steps=30, save_steps=100, learning_rate=5e-3, bf16=True,
    )
    out = train(cfg)
    record = json.loads((out / TRAINING_RECORD).read_text())
    losses = [h["loss"] for h in record["loss_history"]]
    assert losses[-1] < losses[0] - 1.0
    alm = AsyncLM.from_pretrained(out, device=CUDA)
    result = alm.generate("Weather in Paris?", max_new_tokens=20, do_sample=False)
    assert result.sequences.device.type == "cuda" and result.stats.generated_tokens > 0


def test_the_benchmarks_time_the_gpu():
    """The overhead and latency benchmarks run on a GPU model and say so in their reports."""
    from hf_asynclm.bench.latency import LatencyConfig, load_bench_model, run_latency
    from hf_asynclm.bench.overhead import OverheadConfig, run_overhead

    bm = load_bench_model("random", device=CUDA)
    assert bm.model.device.type == "cuda" and "on cuda" in bm.label
    cfg = OverheadConfig(new_tokens=8, reps=1, interrupt_tokens=(8,), context_tokens=16, calls=2, generations=1, emulated_tpot_ms=1.0)
    report = run_overhead(cfg, bm)
    assert report["environment"]["device"].startswith("cuda")
    assert report["text"]["plain_tokens_per_s"] > 0 and report["interrupt"]["decode_step_ms"] > 0
    assert report["dispatch"]["rows"][0]["decode"] == "real GPU decode"
    lat = LatencyConfig(workload="bfcl-parallel", n=1, tpot_ms=None, ttft_ms=None, latency_scale=0.05,
                        data_dir="tests/data/bfcl_mini", warmup=False)
    out = run_latency(lat, bm)
    assert out["environment"]["device"].startswith("cuda")
    assert sorted(out["tasks"][0]["modes"]) == sorted(["sync", "sync-cached", "sync-parallel", "async"])


def test_a_random_llama_of_llama_3_2_1b_shape_loads_on_the_gpu():
    from hf_asynclm.bench.latency import load_bench_model

    bm = load_bench_model("random-llama-1b", device=CUDA)
    n = sum(p.numel() for p in bm.model.parameters())
    assert 0.9e9 < n < 1.0e9  # Llama 3.2 1B's 1.24B less its 128k-token embedding
    assert bm.model.dtype == torch.bfloat16 and bm.model.config.num_hidden_layers == 16
