"""Training pipeline: tokenisation rule, tokenizer, Trainer loop (scratch, full, LoRA), resume, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_asynclm.cml import MARKERS, marker_token_ids  # noqa: E402
from hf_asynclm.prompting import CML_CHAT_TEMPLATE, CML_MAX_NEW_TOKENS  # noqa: E402
from hf_asynclm.testing import tiny_llama, tiny_tokenizer  # noqa: E402
from hf_asynclm.training import (  # noqa: E402
    IGNORE_INDEX,
    CMLCollator,
    ExampleError,
    ExampleTooLong,
    TrainConfig,
    build_cml_tokenizer,
    encode_prompt,
    load_cml_dataset,
    load_trained,
    read_jsonl,
    tokenize_example,
    train,
)
from hf_asynclm.training.dataset import summarize_meta  # noqa: E402
from hf_asynclm.training.tokenizer import ROLE_TAGS  # noqa: E402
from hf_asynclm.training.train import (  # noqa: E402
    TRAINING_RECORD,
    _make_trainer_class,
    _training_arguments,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather now.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        "x-latency-ms": 300,
    },
}
FLIGHT = {
    "type": "function",
    "function": {
        "name": "find_flight",
        "description": "Cheapest flight.",
        "parameters": {
            "type": "object",
            "properties": {"origin": {"type": "string"}, "destination": {"type": "string"}},
            "required": ["origin", "destination"],
        },
        "x-latency-ms": 800,
    },
}


def _weather(i: int, city: str, temp: int) -> dict:
    return {
        "task_id": f"w{i}",
        "mode": "async",
        "messages": [{"role": "user", "content": f"Weather in {city}?"}],
        "tools": [WEATHER],
        "segments": [
            {"role": "model", "text": f'[CALL] w1 [HEAD] get_weather(city="{city}") [END] [TRAP] [END]'},
            {"role": "inject", "text": f'[INTR] w1 [HEAD] {{"temp_c": {temp}}} [END]'},
            {"role": "model", "text": f" {city}: {temp} C."},
        ],
        "meta": {"n_calls": 1, "category": "simple", "latency_ms": 300},
    }


def _two_calls(i: int, a: str, b: str, code: str, temp: int) -> dict:
    return {
        "task_id": f"f{i}",
        "mode": "async",
        "messages": [{"role": "user", "content": f"Flight from {a} to {b}, and the weather in {b}?"}],
        "tools": [WEATHER, FLIGHT],
        "segments": [
            {"role": "model", "text": f'[CALL] f1 [HEAD] find_flight(origin="{a}", destination="{b}") [END] '
                                      f'[CALL] w1 [HEAD] get_weather(city="{b}") [END] [TRAP] [END]'},
            {"role": "inject", "text": f'[INTR] w1 [HEAD] {{"temp_c": {temp}}} [END]'},
            {"role": "model", "text": f" {b}: {temp} C. [TRAP] [END]"},
            {"role": "inject", "text": f'[INTR] f1 [HEAD] {{"code": "{code}"}} [END]'},
            {"role": "model", "text": f" Flight {code}."},
        ],
        "meta": {"n_calls": 2, "category": "parallel", "latency_ms": 800},
    }


EXAMPLES = [
    _weather(0, "Paris", 18), _weather(1, "Rome", 21), _weather(2, "Oslo", 3), _weather(3, "Lima", 25),
    _two_calls(4, "Kyiv", "Baku", "AZ12", 30), _two_calls(5, "Nice", "Bern", "LX404", 9),
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "traces.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in EXAMPLES) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def tok():
    t = tiny_tokenizer()
    t.chat_template = CML_CHAT_TEMPLATE
    return t


def _micro(data: Path, out: Path, **kw) -> TrainConfig:
    kw.setdefault("max_steps", 4)
    kw.setdefault("save_steps", 100)
    return TrainConfig.from_preset(
        "micro", data=str(data), output_dir=str(out), logging_steps=1, disable_tqdm=True, **kw
    )


# ---------------------------------------------------------------------------------------------
# Tokenisation rule
# ---------------------------------------------------------------------------------------------


def test_labels_mask_exactly_prompt_and_inject(tok):
    ex = EXAMPLES[4]
    item = tokenize_example(tok, ex)
    prompt = tok.encode(
        tok.apply_chat_template(ex["messages"], tools=ex["tools"], add_generation_prompt=True, tokenize=False),
        add_special_tokens=False,
    )
    assert prompt == encode_prompt(tok, ex["messages"], ex["tools"])
    expected_ids, expected_labels = list(prompt), [IGNORE_INDEX] * len(prompt)
    for seg in ex["segments"]:
        ids = tok.encode(seg["text"], add_special_tokens=False)
        expected_ids += ids
        expected_labels += ids if seg["role"] == "model" else [IGNORE_INDEX] * len(ids)
    expected_ids.append(tok.eos_token_id)
    expected_labels.append(tok.eos_token_id)
    assert item["input_ids"] == expected_ids
    assert item["labels"] == expected_labels
    assert item["attention_mask"] == [1] * len(expected_ids)
    # the prompt starts with BOS once (from the template, not from add_special_tokens)
    assert item["input_ids"][0] == tok.bos_token_id and item["input_ids"].count(tok.bos_token_id) == 1
    # what is trained on decodes to the model segments + EOS, nothing injected
    trained = [t for t in item["labels"] if t != IGNORE_INDEX]
    model_text = "".join(s["text"] for s in ex["segments"] if s["role"] == "model")
    assert tok.decode(trained[:-1]) == model_text and trained[-1] == tok.eos_token_id
    intr = marker_token_ids(tok).intr
    assert intr in item["input_ids"] and intr not in trained


def test_segments_are_encoded_separately(tok):
    ex = {
        "messages": [{"role": "user", "content": "hi"}],
        "segments": [{"role": "model", "text": "The wea"}, {"role": "model", "text": "ther is mild"}],
    }
    item = tokenize_example(tok, ex)
    a = tok.encode("The wea", add_special_tokens=False)
    b = tok.encode("ther is mild", add_special_tokens=False)
    joint = tok.encode("The weather is mild", add_special_tokens=False)
    assert a + b != joint  # the case matters: BPE merges across the boundary when encoded together
    assert item["input_ids"][-len(a + b) - 1 : -1] == a + b
    assert item["input_ids"][-len(joint) - 1 : -1] != joint


def test_too_long_examples_are_skipped_or_truncated(tok, data_file, caplog):
    lengths = [len(tokenize_example(tok, e)["input_ids"]) for e in EXAMPLES]
    limit = sorted(lengths)[2]
    with pytest.raises(ExampleTooLong):
        tokenize_example(tok, EXAMPLES[lengths.index(max(lengths))], max_length=limit)
    with caplog.at_level("WARNING"):
        ds = load_cml_dataset(tok, str(data_file), max_length=limit)
    n_long = sum(n > limit for n in lengths)
    assert ds.stats.too_long == n_long and len(ds) == len(EXAMPLES) - n_long
    assert f"skipped {n_long} of {len(EXAMPLES)}" in caplog.text
    ds = load_cml_dataset(tok, str(data_file), max_length=limit, truncate=True)
    assert len(ds) == len(EXAMPLES) and ds.stats.truncated == n_long
    assert max(len(i["input_ids"]) for i in ds) == limit


def test_invalid_examples_and_files(tok, tmp_path):
    with pytest.raises(ExampleError):
        tokenize_example(tok, {"messages": [{"role": "user", "content": "x"}], "segments": [{"role": "bot", "text": "y"}]})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(EXAMPLES[0]) + "\n{not json\n")
    with pytest.raises(ExampleError, match="bad.jsonl:2"):
        read_jsonl(bad)
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "missing.jsonl")


def test_collator_pads_right_with_masked_labels(tok):
    items = [tokenize_example(tok, e) for e in EXAMPLES[:2] + EXAMPLES[4:5]]
    batch = CMLCollator(tok.pad_token_id)(items)
    n = max(len(i["input_ids"]) for i in items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, n)
    for row, item in enumerate(items):
        k = len(item["input_ids"])
        assert batch["input_ids"][row, :k].tolist() == item["input_ids"]
        assert (batch["input_ids"][row, k:] == tok.pad_token_id).all()
        assert (batch["labels"][row, k:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].sum() == k


def test_collator_pads_to_a_multiple_without_changing_the_examples(tok):
    items = [tokenize_example(tok, e) for e in EXAMPLES[:3]]
    plain = CMLCollator(tok.pad_token_id)(items)
    padded = CMLCollator(tok.pad_token_id, pad_to_multiple_of=32)(items)
    n = plain["input_ids"].shape[1]
    assert padded["input_ids"].shape[1] % 32 == 0 and n <= padded["input_ids"].shape[1] < n + 32
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(padded[key][:, :n], plain[key])
    assert (padded["labels"][:, n:] == IGNORE_INDEX).all() and (padded["attention_mask"][:, n:] == 0).all()
    # never past max_length (the model's limit), unless an example is already longer
    assert CMLCollator(tok.pad_token_id, pad_to_multiple_of=32, max_length=n)(items)["input_ids"].shape[1] == n
    assert CMLCollator(tok.pad_token_id, pad_to_multiple_of=32, max_length=n - 1)(items)["input_ids"].shape[1] == n
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        CMLCollator(tok.pad_token_id, pad_to_multiple_of=0)


def test_meta_summary():
    s = summarize_meta(EXAMPLES)
    assert s["mode"] == {"async": 6}
    assert s["meta"]["category"] == {"simple": 4, "parallel": 2}
    assert s["meta"]["n_calls"]["max"] == 2


# ---------------------------------------------------------------------------------------------
# Tokenizer from scratch
# ---------------------------------------------------------------------------------------------


def test_cml_tokenizer_markers_digits_and_roundtrip(tmp_path):
    from transformers import AutoTokenizer

    texts = [t for e in EXAMPLES for s in e["segments"] for t in [s["text"]]] * 10
    tok = build_cml_tokenizer(texts, vocab_size=300)
    assert len(tok) <= 300
    tok.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    for special in (*MARKERS, *ROLE_TAGS, "<|pad|>", "<|bos|>", "<|eos|>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1, special
    assert marker_token_ids(tok).single_token
    assert tok.chat_template == CML_CHAT_TEMPLATE
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    pieces = tok.convert_ids_to_tokens(tok.encode("price 1234.50", add_special_tokens=False))
    assert pieces[-7:] == ["1", "2", "3", "4", ".", "5", "0"]
    # a value is spelt with the same tokens after a space and after a quote (copying = identity)
    after_space = tok.encode(" Zorblax", add_special_tokens=False)[1:]
    after_quote = tok.encode('="Zorblax"', add_special_tokens=False)
    assert after_quote[1 : 1 + len(after_space)] == after_space
    for text in ['[CALL] w1 [HEAD] f(x="Łódź", n=-3.5e2) [END]\n', "  two  spaces\ttab", "日本 🙂"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    prompt = tok.apply_chat_template(EXAMPLES[4]["messages"], tools=EXAMPLES[4]["tools"], add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|bos|><|system|>\n") and prompt.endswith("<|assistant|>\n")


def test_cml_tokenizer_digit_groups_cut_numbers_the_same_everywhere():
    texts = [t for e in EXAMPLES for s in e["segments"] for t in [s["text"]]] * 10
    texts += [f"code XN{n:03d} on 2026-0{n % 9 + 1}-1{n % 9}" for n in range(200)] * 4
    tok = build_cml_tokenizer(texts, vocab_size=420, digit_group=2)
    groups = [p for p, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("12345")]
    assert groups == ["12", "34", "5"]  # groups of two, left to right; merges never cross them
    pieces = tok.convert_ids_to_tokens(tok.encode("price 12345", add_special_tokens=False))
    assert "".join(pieces[-3:]) in ("12345", "2345", "345") and not any(len(p) > 2 for p in pieces[-3:])
    # the same number has the same tokens inside a code, after a space and after a quote
    alone = tok.encode(" 342", add_special_tokens=False)[1:]
    in_code = tok.encode('="XN342"', add_special_tokens=False)
    assert any(in_code[i : i + len(alone)] == alone for i in range(len(in_code)))
    assert tok.decode(tok.encode("2026-08-01 18:25 $971", add_special_tokens=False)) == "2026-08-01 18:25 $971"
    with pytest.raises(ValueError, match="digit_group"):
        build_cml_tokenizer(texts, vocab_size=420, digit_group=0)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch_run(data_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scratch") / "ckpt"
    return train(_micro(data_file, out, max_steps=30, save_steps=15, learning_rate=5e-3))


def test_scratch_training_lowers_loss_and_saves_a_loadable_checkpoint(scratch_run, data_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = json.loads((scratch_run / TRAINING_RECORD).read_text())
    losses = [h["loss"] for h in record["loss_history"]]
    assert record["steps"] == 30 and record["mode"] == "scratch" and record["base_model"] is None
    assert losses[-1] < losses[0] - 1.0
    assert record["final_train_loss"] == losses[-1]
    assert 0 < record["train_loop_s"] <= record["train_time_s"]  # the steps alone, within the whole run
    assert record["examples"] == len(EXAMPLES) and record["data_files"] == [str(data_file)]
    assert record["simulator"]["meta"]["category"]["parallel"] == 2
    assert (scratch_run / "model.safetensors").is_file()
    # the simulator's traces only hold interrupts at word starts and after blocks, and the markers are
    # single tokens (calls can be held to the tools' schemas): the checkpoint says so
    assert record["runtime"] == {"interrupt_at": "word", "constrain_calls": "schema"}

    tok = AutoTokenizer.from_pretrained(scratch_run)
    model = AutoModelForCausalLM.from_pretrained(scratch_run)
    assert tok.chat_template == CML_CHAT_TEMPLATE and marker_token_ids(tok).single_token
    assert model.generation_config.eos_token_id in (tok.eos_token_id, [tok.eos_token_id])  # transformers 5.17 saves a list
    assert model.generation_config.pad_token_id == tok.pad_token_id
    # a budget of its own, not transformers' 20 tokens: a CML answer with results quoted runs long
    assert model.generation_config.max_new_tokens == CML_MAX_NEW_TOKENS
    prompt = tok.apply_chat_template(EXAMPLES[0]["messages"], tools=EXAMPLES[0]["tools"], add_generation_prompt=True, tokenize=False)
    inputs = tok(prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_selective_loss_equals_the_full_loss(scratch_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(scratch_run)
    model = AutoModelForCausalLM.from_pretrained(scratch_run)
    cfg = TrainConfig(data="unused", output_dir=str(scratch_run / "tmp"))
    trainer = _make_trainer_class()(model=model, args=_training_arguments(cfg, scratch_run / "tmp"), train_dataset=[0])
    # the Trainer has moved the model to its device (a GPU where there is one): the batch goes there too
    batch = CMLCollator(tok.pad_token_id)([tokenize_example(tok, e) for e in EXAMPLES])
    batch = {k: v.to(model.device) for k, v in batch.items()}
    n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    with torch.no_grad():
        reference = model(**batch).loss
        assert torch.allclose(trainer.compute_loss(model, batch, num_items_in_batch=n), reference, atol=1e-5)
        assert torch.allclose(trainer.compute_loss(model, batch), reference, atol=1e-5)


def test_call_id_mask_covers_exactly_the_ids_the_model_writes(tok):
    from hf_asynclm.training.train import call_id_token_mask

    ids = marker_token_ids(tok)
    item = tokenize_example(tok, EXAMPLES[4])  # two calls (f1, w1) and an interrupt for each
    input_ids = torch.tensor([item["input_ids"]])
    mask = call_id_token_mask(input_ids, ids.call, ids.head)[0]
    runs, current = [], []
    for tid, m in zip(item["input_ids"], mask.tolist()):
        if m:
            current.append(tid)
        elif current:
            runs.append(tok.decode(current).strip()); current = []
    assert runs == ["f1", "w1"]  # the interrupts' ids ([INTR] w1 [HEAD]) are not the model's choice
    labels = torch.tensor(item["labels"])
    assert (labels[mask] != IGNORE_INDEX).all()  # every masked token is one the model writes


def test_call_id_loss_weight_scales_the_loss_on_call_ids_only(scratch_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from hf_asynclm.training.train import call_id_token_mask

    tok = AutoTokenizer.from_pretrained(scratch_run)
    model = AutoModelForCausalLM.from_pretrained(scratch_run)
    batch = CMLCollator(tok.pad_token_id)([tokenize_example(tok, e) for e in EXAMPLES])
    ids = marker_token_ids(tok)
    cfg = TrainConfig(data="unused", output_dir=str(scratch_run / "tmp"))
    args = _training_arguments(cfg, scratch_run / "tmp")
    plain = _make_trainer_class()(model=model, args=args, train_dataset=[0])
    weighted = _make_trainer_class()(model=model, args=args, train_dataset=[0], call_id_loss_weight=5.0,
                                     call_head_ids=(ids.call, ids.head))
    batch = {k: v.to(model.device) for k, v in batch.items()}  # where the Trainers put the model
    labels = batch["labels"][:, 1:]
    n = (labels != IGNORE_INDEX).sum()
    with torch.no_grad():
        logits = model(**batch).logits[:, :-1].float()
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=IGNORE_INDEX)
        on_ids = call_id_token_mask(batch["input_ids"], ids.call, ids.head)[:, 1:]
        expected = (ce.sum() + 4.0 * ce[on_ids].sum()) / n
        got = weighted.compute_loss(model, batch, num_items_in_batch=n)
        assert torch.allclose(got, expected, atol=1e-5)
        assert got > plain.compute_loss(model, batch, num_items_in_batch=n) + 1e-4
    with pytest.raises(ValueError, match="single tokens"):
        _make_trainer_class()(model=model, args=args, train_dataset=[0], call_id_loss_weight=2.0)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="call_id_loss_weight"):
            TrainConfig(data=str(scratch_run / "cml_training.json"), call_id_loss_weight=bad).validate()
    with pytest.raises(ValueError, match="selective"):
        TrainConfig(data=str(scratch_run / "cml_training.json"), call_id_loss_weight=2.0, selective_loss=False).validate()


def test_resume_continues_from_the_last_checkpoint(data_file, tmp_path):
    out = tmp_path / "ckpt"
    train(_micro(data_file, out, max_steps=4, save_steps=2))
    assert (out / "checkpoint-4").is_dir()
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(_micro(data_file, out, max_steps=6, save_steps=2))
    train(_micro(data_file, out, max_steps=6, save_steps=2, resume=True))
    record = json.loads((out / TRAINING_RECORD).read_text())
    assert record["steps"] == 6 and record["resumed_from"].endswith("checkpoint-4")
    assert [h["step"] for h in record["loss_history"]][-2:] == [5, 6]  # only the new steps ran


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random Llama + tokenizer without CML markers, saved like a Hub base."""
    path = tmp_path_factory.mktemp("base") / "tiny-llama"
    tok = tiny_tokenizer(with_markers=False)
    tiny_llama(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_lora_fine_tuning_trains_marker_rows_and_reloads(tiny_base, data_file, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hf_asynclm.training.train import apply_lora, load_base

    cfg = _micro(data_file, tmp_path / "lora", base_model=str(tiny_base), lora=True, lora_r=4,
                 max_steps=6, learning_rate=2e-2)
    # marker rows of the embedding and of the (untied) head are trainable, the rest of them frozen
    model, tokenizer = load_base(cfg)
    markers = sorted(marker_token_ids(tokenizer).by_id)
    assert markers == list(range(len(tokenizer) - 5, len(tokenizer)))
    peft_model = apply_lora(model, tokenizer, cfg)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("embed_tokens" in n and "trainable_tokens_delta" in n for n in trainable)
    assert any("lm_head" in n and "trainable_tokens_delta" in n for n in trainable)
    assert any("lora_A" in n for n in trainable)
    assert not any(n.endswith("embed_tokens.weight") or n.endswith("lm_head.weight") for n in trainable)

    out = train(cfg)
    record = json.loads((out / TRAINING_RECORD).read_text())
    assert record["mode"] == "lora" and record["base_model"] == str(tiny_base)
    assert record["trainable_parameters"] < record["parameters"]
    assert (out / "adapter_config.json").is_file() and not (out / "config.json").exists()
    adapter = load_file(str(out / "adapter_model.safetensors"))
    delta_key = next(k for k in adapter if "embed_tokens" in k and "trainable_tokens_delta" in k)
    base_rows = AutoModelForCausalLM.from_pretrained(tiny_base).get_input_embeddings().weight.mean(0)
    assert adapter[delta_key].shape[0] == 5
    assert not torch.allclose(adapter[delta_key], base_rows.expand(5, -1), atol=1e-4)  # the rows moved

    model, tok = load_trained(out)
    assert isinstance(model, PeftModel) and tok.chat_template == CML_CHAT_TEMPLATE
    # the generation config saved with the adapter applies, not the base's (which sets no budget)
    assert AutoModelForCausalLM.from_pretrained(tiny_base).generation_config.max_new_tokens is None
    assert model.get_base_model().generation_config.max_new_tokens == CML_MAX_NEW_TOKENS
    emb = model.get_input_embeddings()
    ids = torch.tensor([markers])
    assert torch.allclose(emb(ids)[0], adapter[delta_key], atol=1e-6)
    prompt = tok.apply_chat_template(EXAMPLES[0]["messages"], tools=EXAMPLES[0]["tools"], add_generation_prompt=True, tokenize=False)
    inputs = tok(prompt, add_special_tokens=False, return_tensors="pt")
    assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] > inputs["input_ids"].shape[1]

    # AsyncLM loads the adapter folder as it is (base resized to the CML tokenizer, adapter merged)
    from hf_asynclm import AsyncLM

    alm = AsyncLM.from_pretrained(out)
    assert alm.tokenizer.chat_template == CML_CHAT_TEMPLATE
    assert torch.allclose(alm.model.get_input_embeddings()(ids)[0], adapter[delta_key], atol=1e-6)
    assert alm.generate(EXAMPLES[0]["messages"], max_new_tokens=3, do_sample=False).stats.generated_tokens >= 1


def test_lora_merge_writes_a_plain_model(tiny_base, data_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = train(_micro(data_file, tmp_path / "merged", base_model=str(tiny_base), lora=True, merge_lora=True,
                       lora_r=4, max_steps=3, learning_rate=2e-2))
    merged = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert merged.get_input_embeddings().weight.shape[0] == len(tok) and marker_token_ids(tok).single_token
    reloaded, _ = load_trained(out / "adapter", merge=True)
    for (name, a), b in zip(merged.state_dict().items(), reloaded.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_full_fine_tuning_of_a_base(tiny_base, data_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = train(_micro(data_file, tmp_path / "full", base_model=str(tiny_base), max_steps=3, learning_rate=1e-2,
                       constrain_calls="grounded", no_repeat_calls=True, interrupt_at="sentence"))
    record = json.loads((out / TRAINING_RECORD).read_text())
    assert record["mode"] == "full" and record["trainable_parameters"] == record["parameters"]
    assert record["runtime"] == {"interrupt_at": "sentence", "constrain_calls": "grounded", "no_repeat_calls": True}  # as asked for
    from hf_asynclm import AsyncLM

    assert AsyncLM.from_pretrained(out).interrupt_at == "sentence"  # the recorded setting is applied
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == record["vocab_size"]


def test_markers_on_a_padded_vocabulary_reuse_spare_rows():
    from hf_asynclm.training.train import _add_markers

    tok = tiny_tokenizer(with_markers=False)
    n = len(tok)
    model = tiny_llama(tok, vocab_size=n + 16)  # embedding padded beyond the tokenizer, like Qwen
    assert _add_markers(tok, model) == 5
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == n + 16  # not shrunk to len(tokenizer)
    ids = sorted(marker_token_ids(tok).by_id)
    assert ids == list(range(n, n + 5))
    assert torch.allclose(weight[ids], weight[:n].mean(0).expand(5, -1))


def test_config_errors_are_clear(data_file, tmp_path):
    with pytest.raises(ValueError, match="needs a base_model"):
        TrainConfig(data=str(data_file), output_dir=str(tmp_path), lora=True).validate()
    with pytest.raises(ValueError, match="not found"):
        TrainConfig(data=str(tmp_path / "nope.jsonl"), output_dir=str(tmp_path)).validate()
    with pytest.raises(ValueError, match="unknown preset"):
        TrainConfig(preset="huge")
    with pytest.raises(ValueError, match="convert"):
        TrainConfig(data=str(data_file), base_model="gemma.gguf").validate()
    with pytest.raises(ValueError, match="constrain_calls"):
        TrainConfig(data=str(data_file), constrain_calls="strict").validate()
    with pytest.raises(ValueError, match="no_repeat_calls works through constrained calls"):
        TrainConfig(data=str(data_file), constrain_calls="off", no_repeat_calls=True).validate()
    with pytest.raises(ValueError, match="interrupt_at"):
        TrainConfig(data=str(data_file), interrupt_at="comma").validate()
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        TrainConfig(data=str(data_file), pad_to_multiple_of=0).validate()
    cfg = TrainConfig.from_preset("tiny", data="x", learning_rate=1e-3)
    assert (cfg.hidden_size, cfg.num_layers, cfg.learning_rate, cfg.preset) == (256, 4, 1e-3, "tiny")
    # tiny has as many kv heads as heads, so another head count needs nothing else
    TrainConfig.from_preset("tiny", data=str(data_file), hidden_size=384, num_heads=6).validate()
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads"):
        TrainConfig.from_preset("micro", data=str(data_file), hidden_size=48, num_heads=3).validate()


def test_a_stage_can_reuse_an_earlier_tokenizer(scratch_run, data_file, tmp_path):
    # curriculum stages (drills, then traces) share one tokenizer: tokenizer= skips training one
    from transformers import AutoTokenizer

    out = train(_micro(data_file, tmp_path / "stage2", max_steps=1, tokenizer=str(scratch_run)))
    first, second = AutoTokenizer.from_pretrained(scratch_run), AutoTokenizer.from_pretrained(out)
    assert first.get_vocab() == second.get_vocab() and second.chat_template == first.chat_template
    plain = tiny_tokenizer()  # no CML chat template
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a CML tokenizer"):
        train(_micro(data_file, tmp_path / "stage3", max_steps=1, tokenizer=str(tmp_path / "plain")))
    with pytest.raises(ValueError, match="from scratch"):
        TrainConfig(data=str(data_file), output_dir=str(tmp_path / "x"), base_model="m", tokenizer="t").validate()


def test_convert_gguf_base_without_the_package(tmp_path, without_gemma_extra):
    from hf_asynclm.training import convert_gguf_base

    with pytest.raises(ImportError, match=r"pip install .*gguf"):
        convert_gguf_base(tmp_path / "gemma")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_trains_and_reports_bad_input(data_file, tmp_path):
    from click.testing import CliRunner

    from hf_asynclm_cli.train_cmd import train_command

    runner = CliRunner()
    help_text = runner.invoke(train_command, ["--help"]).output
    assert "--data" in help_text and "Examples:" in help_text and "--lora" in help_text

    out = tmp_path / "cli"
    result = runner.invoke(train_command, ["--data", str(data_file), "--out", str(out), "--preset", "micro",
                                           "--steps", "2", "--save-steps", "50", "--batch-size", "2", "-q"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / TRAINING_RECORD).read_text())
    assert record["steps"] == 2 and record["config"]["batch_size"] == 2 and record["config"]["preset"] == "micro"

    # several files: the option repeated and comma-separated lists both read every file
    lines = data_file.read_text().splitlines()
    part_a, part_b, part_c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    part_a.write_text("\n".join(lines[:2]) + "\n")
    part_b.write_text("\n".join(lines[2:4]) + "\n")
    part_c.write_text("\n".join(lines[4:]) + "\n")
    multi = tmp_path / "multi"
    result = runner.invoke(train_command, ["--data", str(part_a), "--data", f"{part_b},{part_c}", "--out", str(multi),
                                           "--preset", "micro", "--steps", "1", "--batch-size", "2", "--num-layers", "1",
                                           "--hidden-size", "32", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads((multi / TRAINING_RECORD).read_text())["dataset"]["read"] == len(lines)
    model_config = json.loads((multi / "config.json").read_text())
    assert (model_config["num_hidden_layers"], model_config["hidden_size"]) == (1, 32)

    # width, heads, MLP and bf16 mixed precision (on a CPU too): the record and the saved config say so
    wide = tmp_path / "wide"
    result = runner.invoke(train_command, ["--data", str(data_file), "--out", str(wide), "--preset", "micro",
                                           "--steps", "2", "--batch-size", "2", "--hidden-size", "48", "--num-heads", "6",
                                           "--intermediate-size", "96", "--bf16", "-q"])
    assert result.exit_code == 0, result.output
    model_config = json.loads((wide / "config.json").read_text())
    assert (model_config["hidden_size"], model_config["num_attention_heads"], model_config["num_key_value_heads"],
            model_config["intermediate_size"]) == (48, 6, 2, 96)  # the micro preset's 2 kv heads (grouped-query)
    record = json.loads((wide / TRAINING_RECORD).read_text())
    assert record["config"]["bf16"] is True and record["steps"] == 2
    assert math.isfinite(record["final_train_loss"])

    bad_cases = [
        (["--data", str(data_file), "--out", str(tmp_path / "h"), "--preset", "micro", "--hidden-size", "50",
          "--num-heads", "6"], "not a multiple of num_heads"),
        (["--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x")], "not found"),
        (["--data", str(data_file), "--out", str(tmp_path / "y"), "--lora"], "base_model"),
        (["--data", str(data_file), "--out", str(out), "--preset", "micro", "--steps", "3"], "already holds checkpoints"),
    ]
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{oops\n")
    bad_cases.append((["--data", str(broken), "--out", str(tmp_path / "z"), "--preset", "micro"], "broken.jsonl:1"))
    for args, message in bad_cases:
        result = runner.invoke(train_command, args)
        assert result.exit_code != 0, args
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], result.output


def test_train_step_speed_benchmark_runs_both_precisions():
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step_speed.py"
    out = subprocess.run([sys.executable, str(script), "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2",
                          "--intermediate-size", "64", "--batch-size", "2", "--tokens", "16", "--warmup", "0",
                          "--steps", "1"], capture_output=True, text=True, timeout=120, check=True).stdout
    assert "fp32:" in out and "bf16:" in out and "bf16 / fp32:" in out
