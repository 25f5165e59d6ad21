"""The Hub round trip through AsyncLM: publish a CML checkpoint, download it, generate with tools."""

from __future__ import annotations

import time

import pytest
from transformers import LogitsProcessorList

from hf_asynclm import AsyncLM
from hf_asynclm.hub import HubError, publish_checkpoint
from hf_asynclm.prompting import CML_CHAT_TEMPLATE
from hf_asynclm.testing import ScriptedPolicy, tiny_llama, tiny_tokenizer
from hub_server import fake_hub, hub_env  # noqa: F401  (shared fixtures)


def add(a: int, b: int) -> int:
    """Add two numbers.

    Args:
        a: First.
        b: Second.
    """
    time.sleep(0.05)
    return a + b


def test_publish_download_generate(fake_hub, tmp_path):
    hub = fake_hub
    folder = tmp_path / "cml-test"
    tok = tiny_tokenizer()
    tok.chat_template = CML_CHAT_TEMPLATE
    tiny_llama(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    url = publish_checkpoint(folder, "acme/cml-test", endpoint=hub.url, card_data={"license": "apache-2.0"})
    assert "acme/cml-test" in url

    cache = tmp_path / "cache"
    alm = AsyncLM.from_pretrained("acme/cml-test", tools=[add], endpoint=hub.url, cache_dir=cache)
    assert "[CALL]" in alm.tokenizer.chat_template  # the CML template travelled with the checkpoint
    policy = ScriptedPolicy(alm.tokenizer, [" [CALL] s1 [HEAD] add(a=40, b=2) [END]", " [TRAP] [END]", " The sum is 42."])
    result = alm.generate(
        [{"role": "user", "content": "What is 40 + 2?"}],
        logits_processor=LogitsProcessorList([policy]),
        max_new_tokens=60,
        do_sample=False,
    )
    assert [(i.call_id, i.value) for i in result.interrupts] == [("s1", "42")]
    assert result.text.strip() == "The sum is 42."

    # offline: the cached snapshot is enough, and a repo never downloaded fails clearly
    again = AsyncLM.from_pretrained("acme/cml-test", endpoint=hub.url, cache_dir=cache, local_files_only=True)
    assert again.model.config.vocab_size == alm.model.config.vocab_size
    with pytest.raises(HubError, match="offline|cache"):
        AsyncLM.from_pretrained("acme/other", endpoint=hub.url, cache_dir=cache, local_files_only=True)


def test_shipped_checkpoints_load_by_name(monkeypatch, tmp_path):
    from hf_asynclm.asynclm import DEFAULT_CHECKPOINT, shipped_checkpoints

    assert shipped_checkpoints()["cml-tiny"] == DEFAULT_CHECKPOINT
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a shipped name never goes to the Hub
    alm = AsyncLM.from_pretrained("cml-tiny")
    assert alm.model.config.num_hidden_layers == AsyncLM.from_pretrained().model.config.num_hidden_layers
    # a local folder of the same name wins over the shipped one
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cml-tiny").mkdir()
    with pytest.raises(Exception, match="config.json|checkpoint"):
        AsyncLM.from_pretrained("cml-tiny")


def test_the_shipped_default_fits_the_package_budget():
    # cml-tiny ships inside the wheel: at most 20 MB in all, weights in fp16, trained in under two hours
    import json

    from hf_asynclm.asynclm import DEFAULT_CHECKPOINT

    files = [p for p in DEFAULT_CHECKPOINT.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 1024 * 1024
    assert json.loads((DEFAULT_CHECKPOINT / "config.json").read_text())["dtype"] == "float16"
    record = json.loads((DEFAULT_CHECKPOINT / "cml_training.json").read_text())
    assert sum(stage["train_time_s"] for stage in record.get("stages", [record])) < 2 * 3600


def test_a_checkpoint_records_its_interrupt_rule(tmp_path, caplog):
    import json
    import shutil

    from hf_asynclm.asynclm import DEFAULT_CHECKPOINT, checkpoint_runtime_defaults

    # the shipped cml-tiny was trained on paced interrupts (its last stage): that is its default
    assert AsyncLM.from_pretrained().interrupt_at == "sentence"
    assert AsyncLM.from_pretrained(interrupt_at=None).interrupt_at == "sentence"
    assert AsyncLM.from_pretrained(interrupt_at="word").interrupt_at == "word"
    assert AsyncLM.from_pretrained(interrupt_at="token").interrupt_at == "token"  # the caller wins
    # ... and their calls are held to the tools' schemas (cml-tiny's values also to the context)
    assert AsyncLM.from_pretrained().constrain_calls == "grounded"
    assert AsyncLM.from_pretrained(constrain_calls="off").constrain_calls == "off"
    # ... and may not repeat a call: a setting that goes with the constraint when the caller turns it off
    assert AsyncLM.from_pretrained().no_repeat_calls is True
    assert AsyncLM.from_pretrained(no_repeat_calls=False).no_repeat_calls is False
    assert AsyncLM.from_pretrained(constrain_calls="off").no_repeat_calls is False
    with pytest.raises(ValueError, match="no_repeat_calls"):
        AsyncLM.from_pretrained(constrain_calls="off", no_repeat_calls=True)
    # ... and holds names whole in its text, a setting of its own (no markers needed)
    assert AsyncLM.from_pretrained().complete_names is True
    assert AsyncLM.from_pretrained(constrain_calls="off").complete_names is True
    assert AsyncLM.from_pretrained(complete_names=False).complete_names is False
    # ... and reads cheat-sheet plans written time first (~300ms c1 f(a=1)), the layout it was trained on
    assert AsyncLM.from_pretrained().plan_layout == "time-first"
    folder = tmp_path / "ckpt"
    shutil.copytree(DEFAULT_CHECKPOINT, folder)
    record_path = folder / "cml_training.json"
    record = json.loads(record_path.read_text())
    # a checkpoint that records nothing (made elsewhere): the paper's rule
    del record["runtime"]
    record_path.write_text(json.dumps(record))
    assert checkpoint_runtime_defaults(folder) == {}
    bare = AsyncLM.from_pretrained(folder)
    assert bare.interrupt_at == "token" and bare.constrain_calls == "off" and bare.plan_layout == "call-first"
    # bad or unknown settings are left out with a warning, the weights still load
    record["runtime"] = {"interrupt_at": "paragraph", "speed": "fast", "constrain_calls": "json", "no_repeat_calls": "yes"}
    record_path.write_text(json.dumps(record))
    with caplog.at_level("WARNING", logger="hf_asynclm.asynclm"):
        loaded = AsyncLM.from_pretrained(folder)
    assert loaded.interrupt_at == "token" and loaded.constrain_calls == "off" and loaded.no_repeat_calls is False
    assert "'paragraph'" in caplog.text and "unknown runtime setting 'speed'" in caplog.text and "'json'" in caplog.text
    assert "'yes'" in caplog.text
    # a recorded no_repeat_calls whose constraint is not recorded (or is off) is not applied
    record["runtime"] = {"no_repeat_calls": True}
    record_path.write_text(json.dumps(record))
    assert AsyncLM.from_pretrained(folder).no_repeat_calls is False
    record_path.write_text("not json")
    assert checkpoint_runtime_defaults(folder) == {}
    (folder / "cml_training.json").unlink()
    assert checkpoint_runtime_defaults(folder) == {}
