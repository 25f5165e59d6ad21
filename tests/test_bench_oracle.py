"""The oracle policy: LPT order, traps only when nothing is writable, reacting to real results."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList

from hf_asynclm import AsyncLM
from hf_asynclm.bench.oracle import OraclePolicy, lpt_order
from hf_asynclm.bench.tools import ToolSet
from hf_asynclm.cml import format_interrupt
from hf_asynclm.data.tasks import PlannedCall, Task
from hf_asynclm.prompting import CML_CHAT_TEMPLATE
from hf_asynclm.testing import tiny_llama, tiny_tokenizer

SCHEMA = {
    "type": "function",
    "function": {"name": "f", "description": "F.", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}},
}


@pytest.fixture(scope="module")
def tok():
    t = tiny_tokenizer()
    t.chat_template = CML_CHAT_TEMPLATE
    return t


@pytest.fixture()
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _drive(oracle: OraclePolicy, tok, inject: dict[str, str], max_steps: int = 400, trap_releases_all: bool = False) -> list[tuple[str, str | None]]:
    """A minimal decode loop: feed forced tokens; inject the results in ``inject`` (call id -> "now"
    when its block is written, or "after:<id>" once that call's result went in) at block ends; a
    trap releases the oldest owed result (all of them with ``trap_releases_all``, as sync-parallel)."""
    ids = torch.zeros(1, 3, dtype=torch.long)
    owed: list[str] = []
    injected: list[str] = []
    eos = tok.eos_token_id
    end_id = tok.convert_tokens_to_ids("[END]")
    for _ in range(max_steps):
        scores = oracle(ids, torch.zeros(1, len(tok)))
        token = int(scores.argmax(-1))
        ids = torch.cat([ids, torch.tensor([[token]])], dim=-1)
        if token == eos:
            break
        if token == end_id:  # a block ended: a safe point
            last = oracle.log[-1]
            if last[0] == "call":
                owed.append(last[1])
            ready = [c for c in owed if inject.get(c) == "now" or (inject.get(c, "").startswith("after:") and inject[c][6:] in injected)]
            if last[0] == "trap" and not ready and owed:
                ready = list(owed) if trap_releases_all else owed[:1]  # a trap waits for the next result
            for c in ready:
                owed.remove(c)
                injected.append(c)
                extra = tok.encode(format_interrupt(c, '{"ok": 1}'), add_special_tokens=False)
                ids = torch.cat([ids, torch.tensor([extra])], dim=-1)
    return oracle.log


def test_async_writes_longest_first_and_traps_only_when_nothing_is_writable(tok) -> None:
    calls = [PlannedCall("c1", "f", {"x": 1}), PlannedCall("c2", "f", {"x": 2}), PlannedCall("c3", "f", {"x": 3}),
             PlannedCall("c4", "f", {"x": 4}, depends_on=["c1"])]
    task = Task("t", "bfcl", "parallel", [], [SCHEMA], calls)
    lat = {"c1": 0.1, "c2": 0.3, "c3": 0.2, "c4": 0.5}
    oracle = OraclePolicy(tok, task, "async", lat)
    # results come back only when a trap waits for them
    log = _drive(oracle, tok, inject={})
    calls_written = [cid for kind, cid in log if kind == "call"]
    assert calls_written[:3] == ["c2", "c3", "c1"]  # LPT over the ready calls (c4 needs c1)
    assert lpt_order(calls[:3], lat) == ["c2", "c3", "c1"]
    assert log[3] == ("trap", None)  # nothing writable until c1's result is in
    assert "c4" in calls_written and calls_written.index("c4") == 3
    assert oracle.trap_ready and all(n == 0 for n in oracle.trap_ready)
    assert log[-1] == ("answer", None) and oracle.done


def test_async_writes_a_dependent_call_as_soon_as_its_input_arrives(tok) -> None:
    calls = [PlannedCall("c1", "f", {"x": 1}), PlannedCall("c2", "f", {"x": 2}), PlannedCall("c3", "f", {"x": 3}, depends_on=["c1"])]
    task = Task("t", "bfcl", "parallel", [], [SCHEMA], calls)
    # c1 is written first (longest), its result arrives right away: c3 becomes ready and,
    # being longer than c2, is written before it; no trap before everything is written
    oracle = OraclePolicy(tok, task, "async", {"c1": 0.5, "c2": 0.1, "c3": 0.4})
    log = _drive(oracle, tok, inject={"c1": "now"})
    assert [cid for kind, cid in log if kind == "call"] == ["c1", "c3", "c2"]
    assert log.index(("trap", None)) == 3


def test_sync_and_sync_parallel_orders(tok) -> None:
    calls = [PlannedCall("c1", "f", {"x": 1}), PlannedCall("c2", "f", {"x": 2}, depends_on=["c1"]), PlannedCall("c3", "f", {"x": 3})]
    task = Task("t", "bfcl", "parallel", [], [SCHEMA], calls)
    lat = {"c1": 0.1, "c2": 0.2, "c3": 0.5}
    sync = OraclePolicy(tok, task, "sync", lat)
    log = _drive(sync, tok, inject={"c1": "now", "c2": "now", "c3": "now"})
    assert log == [("call", "c1"), ("call", "c2"), ("call", "c3"), ("answer", None)]  # task order, no trap
    sp = OraclePolicy(tok, task, "sync-parallel", lat)
    log = _drive(sp, tok, inject={}, trap_releases_all=True)
    # wave 1 (c1, c3), trap; wave 2 (c2, which needed c1), trap; answer
    assert log == [("call", "c1"), ("call", "c3"), ("trap", None), ("call", "c2"), ("trap", None), ("answer", None)]


def test_bad_mode_is_rejected(tok) -> None:
    with pytest.raises(ValueError, match="oracle mode"):
        OraclePolicy(tok, Task("t", "x", "y", [], [], []), "sync-cached")


def test_oracle_drives_a_real_generation_in_lpt_order(tok, one_thread) -> None:
    model = tiny_llama(tok)
    calls = [PlannedCall("c1", "f", {"x": 1}), PlannedCall("c2", "f", {"x": 2}), PlannedCall("c3", "f", {"x": 3})]
    task = Task("t-real", "bfcl", "parallel", [{"role": "user", "content": "go"}], [SCHEMA], calls)
    tools = ToolSet(task, seed=0, latency_scale=0.05)
    lat = tools.planned_latencies()
    oracle = OraclePolicy(tok, task, "async", lat)
    alm = AsyncLM(model, tok, tools=tools.registry())
    result = alm.generate(task.messages, logits_processor=LogitsProcessorList([oracle]), max_new_tokens=oracle.max_tokens(), do_sample=False)
    assert [r.call_id for r in result.calls] == sorted(lat, key=lambda c: -lat[c])
    assert all(r.status == "done" for r in result.calls)
    assert sorted(oracle.results) == ["c1", "c2", "c3"]  # it saw every result injected
    assert all(n == 0 for n in oracle.trap_ready)
    assert result.stats.stop_reason == "eos" and result.text.strip().endswith("Done.")
