"""Weight averaging of checkpoints: hf_asynclm.training.average_checkpoints and `hf-asynclm average`."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from hf_asynclm.testing import tiny_llama, tiny_tokenizer
from hf_asynclm.training import average_checkpoints


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _save(tok, folder, seed, record=None, **overrides):
    model = tiny_llama(tok, seed=seed, **overrides)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    if record is not None:
        (folder / "cml_training.json").write_text(json.dumps(record))
    return model


RUNTIME = {"interrupt_at": "sentence", "constrain_calls": "grounded"}


def _record(steps, base="stage2", data=("a.jsonl",), runtime=RUNTIME):
    return {"format": "hf-asynclm/cml-training/1", "mode": "full", "base_model": base, "steps": steps,
            "data_files": list(data), "train_time_s": 100.0 + steps, "runtime": dict(runtime),
            "loss_history": [[1, 2.0]], "vocab_size": 400, "config": {"learning_rate": 2e-4}}


def test_weighted_average_of_every_tensor_and_the_record(tmp_path, tok):
    _save(tok, tmp_path / "a", 0, _record(700, data=("a.jsonl", "b.jsonl")))
    _save(tok, tmp_path / "b", 1, _record(1000, data=("b.jsonl", "c.jsonl")))
    (tmp_path / "a" / "checkpoint-700").mkdir()  # resumable state is not copied
    out = average_checkpoints([tmp_path / "a", tmp_path / "b"], tmp_path / "avg", weights=[1, 3])
    a, b, avg = (load_file(str(p / "model.safetensors")) for p in (tmp_path / "a", tmp_path / "b", out))
    assert avg.keys() == a.keys()
    for key in a:
        assert avg[key].dtype == a[key].dtype
        torch.testing.assert_close(avg[key], 0.25 * a[key] + 0.75 * b[key])
    assert not (out / "checkpoint-700").exists()
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "a" / "tokenizer.json").read_bytes()
    record = json.loads((out / "cml_training.json").read_text())
    assert record["mode"] == "average" and record["runtime"] == RUNTIME
    assert [x["weight"] for x in record["averaged_from"]] == [0.25, 0.75]
    assert [x["steps"] for x in record["averaged_from"]] == [700, 1000]
    assert [x["learning_rate"] for x in record["averaged_from"]] == [2e-4, 2e-4]
    assert record["data_files"] == ["a.jsonl", "b.jsonl", "c.jsonl"]
    assert record["train_time_s"] == 800 + 1100
    assert "loss_history" not in record and "steps" not in record and "config" not in record


def test_the_average_loads_and_generates_like_a_checkpoint(tmp_path, tok):
    from transformers import AutoModelForCausalLM

    for i in range(3):
        _save(tok, tmp_path / f"m{i}", i)
    out = average_checkpoints([tmp_path / f"m{i}" for i in range(3)], tmp_path / "avg", dtype="float16")
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float16"
    tensors = load_file(str(out / "model.safetensors"))
    assert all(t.dtype == torch.float16 for t in tensors.values())
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[tok.bos_token_id, 5, 6]])
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 7)
    # uniform: each parameter is the mean of the three
    ms = [AutoModelForCausalLM.from_pretrained(tmp_path / f"m{i}") for i in range(3)]
    name, param = next(iter(model.named_parameters()))
    mean = sum(dict(m.named_parameters())[name] for m in ms) / 3
    torch.testing.assert_close(param, mean.detach(), atol=2e-3, rtol=2e-3)  # float16 rounding


def test_an_average_of_one_model_with_itself_is_that_model(tmp_path, tok):
    _save(tok, tmp_path / "a", 0)
    out = average_checkpoints([tmp_path / "a", tmp_path / "a"], tmp_path / "avg", weights=[0.3, 0.7])
    a, avg = (load_file(str(p / "model.safetensors")) for p in (tmp_path / "a", out))
    for key in a:
        torch.testing.assert_close(avg[key], a[key])


@pytest.mark.parametrize("weights,message", [
    ([1.0], "1 weights for 2 checkpoints"),
    ([1.0, -1.0], ">= 0"),
    ([0.0, 0.0], "at least one must be > 0"),
    ([1.0, float("nan")], ">= 0"),
])
def test_bad_weights(tmp_path, tok, weights, message):
    _save(tok, tmp_path / "a", 0)
    _save(tok, tmp_path / "b", 1)
    with pytest.raises(ValueError, match=message):
        average_checkpoints([tmp_path / "a", tmp_path / "b"], tmp_path / "avg", weights=weights)
    assert not (tmp_path / "avg").exists()


def test_refuses_what_cannot_be_averaged(tmp_path, tok):
    _save(tok, tmp_path / "a", 0, _record(1))
    _save(tok, tmp_path / "b", 1, _record(1))
    with pytest.raises(ValueError, match="at least two"):
        average_checkpoints([tmp_path / "a"], tmp_path / "avg")
    with pytest.raises(ValueError, match="one of the inputs"):
        average_checkpoints([tmp_path / "a", tmp_path / "b"], tmp_path / "a")
    with pytest.raises(ValueError, match="dtype"):
        average_checkpoints([tmp_path / "a", tmp_path / "b"], tmp_path / "avg", dtype="int8")
    # another architecture (width)
    _save(tok, tmp_path / "wide", 2, _record(1), hidden_size=64, intermediate_size=128)
    with pytest.raises(ValueError, match="differ in config.json.*hidden_size"):
        average_checkpoints([tmp_path / "a", tmp_path / "wide"], tmp_path / "avg")
    # another tokenizer
    other = tiny_tokenizer(vocab_size=399)
    _save(other, tmp_path / "tok", 3, _record(1), vocab_size=len(tok))
    with pytest.raises(ValueError, match="different tokenizers"):
        average_checkpoints([tmp_path / "a", tmp_path / "tok"], tmp_path / "avg")
    # another runtime
    _save(tok, tmp_path / "rt", 4, _record(1, runtime={"interrupt_at": "token"}))
    with pytest.raises(ValueError, match="different runtime settings"):
        average_checkpoints([tmp_path / "a", tmp_path / "rt"], tmp_path / "avg")
    # not a checkpoint, an adapter
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        average_checkpoints([tmp_path / "a", tmp_path / "empty"], tmp_path / "avg")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="merge each adapter"):
        average_checkpoints([tmp_path / "a", tmp_path / "adapter"], tmp_path / "avg")
    assert not (tmp_path / "avg").exists()
    # an existing output is kept unless overwrite
    (tmp_path / "avg").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        average_checkpoints([tmp_path / "a", tmp_path / "b"], tmp_path / "avg")
    assert average_checkpoints([tmp_path / "a", tmp_path / "b"], tmp_path / "avg", overwrite=True).is_dir()


def test_different_bases_are_averaged_with_a_warning(tmp_path, tok, caplog):
    _save(tok, tmp_path / "a", 0, _record(1, base="stage2"))
    _save(tok, tmp_path / "b", 1, _record(1, base="elsewhere"))
    with caplog.at_level("WARNING", logger="hf_asynclm"):
        average_checkpoints([tmp_path / "a", tmp_path / "b"], tmp_path / "avg")
    assert "one base" in caplog.text


def test_cli_average(tmp_path, tok):
    from hf_asynclm_cli.main import app

    _save(tok, tmp_path / "a", 0)
    _save(tok, tmp_path / "b", 1)
    runner = CliRunner()
    result = runner.invoke(app, ["average", str(tmp_path / "avg"), str(tmp_path / "a"), str(tmp_path / "b"),
                                 "--weights", "2,1", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert "saved" in result.output
    a, b, avg = (load_file(str(p / "model.safetensors")) for p in (tmp_path / "a", tmp_path / "b", tmp_path / "avg"))
    key = "model.norm.weight"
    assert avg[key].dtype == torch.bfloat16
    torch.testing.assert_close(avg[key].float(), (2 * a[key] + b[key]) / 3, atol=1e-2, rtol=1e-2)
    # errors are one line, no traceback
    result = runner.invoke(app, ["average", str(tmp_path / "avg"), str(tmp_path / "a"), str(tmp_path / "b")])
    assert result.exit_code != 0 and "overwrite" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["average", str(tmp_path / "x"), str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "two,one"])
    assert result.exit_code != 0 and "comma-separated numbers" in result.output
    result = runner.invoke(app, ["average", str(tmp_path / "x"), str(tmp_path / "a")])
    assert result.exit_code != 0 and "at least two" in result.output


def test_the_model_card_of_an_average_names_what_was_averaged(tmp_path, tok):
    from hf_asynclm.hub import render_model_card

    _save(tok, tmp_path / "stage3-a", 0, _record(700))
    _save(tok, tmp_path / "stage3-c", 1, _record(1000))
    out = average_checkpoints([tmp_path / "stage3-a", tmp_path / "stage3-c"], tmp_path / "soup", weights=[1, 1])
    text = str(render_model_card(out, "org/soup", card_data={"license": "apache-2.0"}))
    assert "| averaged from | stage3-a (weight 0.5), stage3-c (weight 0.5) |" in text
    assert "| mode | average |" in text
