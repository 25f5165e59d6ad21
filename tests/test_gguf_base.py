"""GGUF bases: converted once and cached; adapters name the package and load anywhere."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from hf_asynclm.cml import marker_token_ids
from hf_asynclm.testing import tiny_llama, tiny_tokenizer
from hf_asynclm.training import gguf_base as gb


@pytest.fixture()
def fake_conversion(tmp_path, monkeypatch):
    """convert_gguf_base replaced by a copy of a tiny random Llama saved as if converted; counts calls."""
    src = tmp_path / "converted-src"
    tok = tiny_tokenizer(with_markers=False)
    tiny_llama(tok).save_pretrained(src)
    tok.save_pretrained(src)
    (src / gb.GGUF_SOURCE_RECORD).write_text(json.dumps({"gguf_file": "x.gguf", "package": gb.GEMMA_GGUF_PACKAGE}))
    calls = {"n": 0}
    lock = threading.Lock()

    def fake(out_dir, gguf_path=None):
        with lock:
            calls["n"] += 1
        shutil.copytree(src, out_dir)
        return Path(out_dir)

    monkeypatch.setattr(gb, "convert_gguf_base", fake)
    monkeypatch.setenv(gb.CACHE_ENV, str(tmp_path / "cache"))
    return calls, src


def test_gguf_base_converts_once_then_reuses(fake_conversion, tmp_path):
    calls, _ = fake_conversion
    first = gb.gguf_base()
    assert first == tmp_path / "cache" / gb.GEMMA_GGUF_PACKAGE and (first / "config.json").is_file()
    assert gb.gguf_base() == first and calls["n"] == 1
    # no staging folder or half-written copy is left behind
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")) == [gb.GEMMA_GGUF_PACKAGE]


def test_concurrent_callers_convert_once(fake_conversion):
    calls, _ = fake_conversion
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(gb.gguf_base())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(set(results)) == 1 and len(results) == 4 and calls["n"] == 1


def test_a_leftover_without_config_is_replaced(fake_conversion, tmp_path):
    calls, _ = fake_conversion
    broken = tmp_path / "cache" / gb.GEMMA_GGUF_PACKAGE
    broken.mkdir(parents=True)
    (broken / "model.safetensors").write_text("half")
    folder = gb.gguf_base()
    assert (folder / "config.json").is_file() and calls["n"] == 1


def test_unknown_package_and_missing_package_are_clear(tmp_path, without_gemma_extra):
    with pytest.raises(ValueError, match="knows"):
        gb.gguf_base("some-other-gguf", cache_dir=tmp_path)
    with pytest.raises(ImportError, match=r"pip install .*gemma"):
        gb.gguf_base(cache_dir=tmp_path)
    assert not (tmp_path / gb.GEMMA_GGUF_PACKAGE).exists()


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv(gb.CACHE_ENV, str(tmp_path / "mine"))
    assert gb.default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(gb.CACHE_ENV)
    assert gb.default_cache_dir().name == "hf_asynclm"


def test_names_resolve_and_record_portably(fake_conversion, tmp_path):
    _, src = fake_conversion
    assert gb.resolve_base_model("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert gb.resolve_base_model(gb.GEMMA_GGUF_PACKAGE) == str(tmp_path / "cache" / gb.GEMMA_GGUF_PACKAGE)
    assert gb.portable_base_name(src) == gb.GEMMA_GGUF_PACKAGE
    plain = tmp_path / "plain"
    plain.mkdir()
    assert gb.portable_base_name(plain) == str(plain)
    (plain / gb.GGUF_SOURCE_RECORD).write_text(json.dumps({"gguf_file": "/my/own.gguf"}))  # not from the package
    assert gb.portable_base_name(plain) == str(plain)


def test_an_adapter_on_a_converted_base_loads_from_the_cache(fake_conversion, tmp_path):
    """Train LoRA on a folder converted from the package: the adapter names the package, and
    loads after the training folder is gone (the base comes from the cache)."""
    from test_training import EXAMPLES  # the tiny traces the training tests use

    from hf_asynclm import AsyncLM
    from hf_asynclm.training import TrainConfig, load_trained, train

    _, src = fake_conversion
    base = tmp_path / "out" / "gemma-base"
    shutil.copytree(src, base)
    data = tmp_path / "traces.jsonl"
    data.write_text("\n".join(json.dumps(e) for e in EXAMPLES) + "\n")
    cfg = TrainConfig.from_preset("micro", data=str(data), output_dir=str(tmp_path / "adapter"), base_model=str(base),
                                  lora=True, lora_r=4, max_steps=2, save_steps=100, logging_steps=1, disable_tqdm=True)
    out = train(cfg)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == gb.GEMMA_GGUF_PACKAGE
    shutil.rmtree(base)
    model, tok = load_trained(out)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    alm = AsyncLM.from_pretrained(out)
    assert alm.generate("Hi", max_new_tokens=2, do_sample=False).stats.generated_tokens >= 1

    # shipped small: fp16 and no tokenizer files; the tokenizer is rebuilt from the base, same ids and template
    from hf_asynclm.training.train import copy_checkpoint

    slim = copy_checkpoint(out, tmp_path / "slim", without_tokenizer=True)
    assert not (slim / "tokenizer.json").exists() and not (slim / "tokenizer_config.json").exists()
    slim_model, slim_tok = load_trained(slim)
    assert slim_tok.get_vocab() == tok.get_vocab() and slim_tok.chat_template == tok.chat_template
    assert marker_token_ids(slim_tok).by_id == marker_token_ids(tok).by_id
    ids = tok("Hi [CALL] a [HEAD] f() [END]", return_tensors="pt")["input_ids"]
    torch.testing.assert_close(slim_model(ids).logits, model(ids).logits, atol=5e-2, rtol=5e-2)
    # a base whose tokenizer would put the markers elsewhere is refused, not silently misread
    record = json.loads((slim / "cml_training.json").read_text())
    record["marker_token_ids"] = {m: i + 1 for m, i in record["marker_token_ids"].items()}
    (slim / "cml_training.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="ship the adapter's tokenizer"):
        load_trained(slim)
    with pytest.raises(ValueError, match="LoRA adapters"):
        copy_checkpoint(src, tmp_path / "nope", without_tokenizer=True)


def test_copy_checkpoint_halves_the_weights_and_still_loads(tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hf_asynclm.training.train import copy_checkpoint

    src = tmp_path / "full"
    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    model.save_pretrained(src)
    tok.save_pretrained(src)
    (src / "checkpoint-10").mkdir()  # training state is not shipped
    dst = copy_checkpoint(src, tmp_path / "half")
    assert not (dst / "checkpoint-10").exists() and (dst / "tokenizer_config.json").is_file()
    weights = load_file(str(dst / "model.safetensors"))
    assert all(t.dtype == torch.float16 for t in weights.values() if t.is_floating_point())
    assert (dst / "model.safetensors").stat().st_size < 0.6 * (src / "model.safetensors").stat().st_size
    assert json.loads((dst / "config.json").read_text())["dtype"] == "float16"  # the config says so too
    assert (dst / "model.safetensors").stat().st_mode & 0o777 == 0o644
    reloaded = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=5e-2, rtol=5e-2)
    with pytest.raises(FileExistsError):
        copy_checkpoint(src, dst)
    with pytest.raises(ValueError, match="dtype"):
        copy_checkpoint(src, tmp_path / "x", dtype="int8")
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        copy_checkpoint(tmp_path, tmp_path / "y")
