"""Publishing and resolving checkpoints against a Hub look-alike on loopback (tests/hub_server.py).

The ``fake_hub`` fixture serves an empty in-memory Hub on ``127.0.0.1:<free port>``; pass
``fake_hub.url`` as ``endpoint=``. ``tiny_checkpoint`` is a saved random tiny Llama with its
tokenizer and a ``cml_training.json``.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Iterator

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_asynclm.hub import (
    HubError,
    InvalidCheckpointError,
    check_checkpoint_folder,
    publish_checkpoint,
    render_model_card,
    resolve_checkpoint,
)
from hf_asynclm.testing import tiny_llama, tiny_tokenizer
from hf_asynclm_cli.publish_cmd import publish
from hub_server import FakeHub, fake_hub, hub_env  # noqa: F401  (fake_hub, hub_env: shared fixtures)

TRAINING_RECORD = {
    "model_name": "CML tiny (test)",
    "base_model": "hf-asynclm/tiny-llama-base",
    "license": "apache-2.0",
    "datasets": ["gorilla-llm/Berkeley-Function-Calling-Leaderboard"],
    "data": {"sources": ["bfcl:parallel", "synthetic"], "num_traces": 128},
    "simulator": {"call_time_ms": [1, 1000], "token_time_ms": [5, 30], "scheduling": "LPT", "seed": 0},
    "training": {"steps": 10, "learning_rate": 0.002, "batch_size": 4},
    "metrics": {"held_out_task_accuracy": 0.27, "extra_tokens_per_task": 21.5},
    "limitations": ["Random weights: this checkpoint exists for tests only."],
}


@pytest.fixture
def token_hub() -> Iterator[FakeHub]:
    """A Hub look-alike that accepts the bearer token ``hf_write``, and requires it for writes."""
    with FakeHub(tokens={"hf_write"}) as hub:
        yield hub


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "cml-tiny"
    tok = tiny_tokenizer()
    tiny_llama(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "cml_training.json").write_text(json.dumps(TRAINING_RECORD, indent=1))
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _greedy(folder: Path, n: int = 4) -> list[int]:
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    inputs = tok("get_weather(city=", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


# ---------------------------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------------------------


def test_round_trip_publish_resolve_load(fake_hub: FakeHub, tiny_checkpoint: Path, tmp_path: Path) -> None:
    url = publish_checkpoint(tiny_checkpoint, "org/cml-tiny", endpoint=fake_hub.url)
    assert url == f"{fake_hub.url}/org/cml-tiny"

    # one commit with the folder and the card
    assert len(fake_hub.requests_to("/commit/main", "POST")) == 1
    assert fake_hub.requests_to("/api/validate-yaml", "POST")
    remote = fake_hub.files("org/cml-tiny")
    local = _files(tiny_checkpoint)
    assert set(remote) == set(local) | {"README.md", ".gitattributes"}
    assert all(remote[name] == content for name, content in local.items())

    # the card
    card = ModelCard(remote["README.md"].decode())
    assert card.data.library_name == "transformers"
    assert card.data.tags == ["asynclm", "cml", "function-calling"]
    assert card.data.base_model == "hf-asynclm/tiny-llama-base"
    assert card.data.license == "apache-2.0"
    assert card.data.datasets == ["gorilla-llm/Berkeley-Function-Calling-Leaderboard"]
    assert "# CML tiny (test)" in card.text
    assert "| held_out_task_accuracy | 0.27 |" in card.text
    assert "| token_time_ms | 5 – 30 |" in card.text
    assert "[CALL] w1 [HEAD] get_weather(city=\"Paris\") [END]" in card.text
    assert 'AsyncLM.from_pretrained("org/cml-tiny", tools=[get_weather])' in card.text
    assert "custom_generate=alm.custom_generate" in card.text
    assert "Random weights: this checkpoint exists for tests only." in card.text

    # download into a fresh cache: same bytes, loads and generates like the original
    cache = tmp_path / "cache"
    path = resolve_checkpoint("org/cml-tiny", endpoint=fake_hub.url, cache_dir=cache)
    assert path.is_relative_to(cache.resolve())
    downloaded = _files(path)
    assert all(downloaded[name] == content for name, content in local.items())
    assert _greedy(path) == _greedy(tiny_checkpoint)

    # cached now: works offline, by argument and through HF_HUB_OFFLINE, without a request
    n_requests = len(fake_hub.requests)
    assert resolve_checkpoint("org/cml-tiny", cache_dir=cache, local_files_only=True, endpoint=fake_hub.url) == path
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        assert resolve_checkpoint("org/cml-tiny", cache_dir=cache, endpoint=fake_hub.url) == path
    assert len(fake_hub.requests) == n_requests


def test_republish_unchanged_is_a_no_op(fake_hub: FakeHub, tiny_checkpoint: Path) -> None:
    first = publish_checkpoint(tiny_checkpoint, "org/again", endpoint=fake_hub.url)
    before = fake_hub.files("org/again")
    second = publish_checkpoint(tiny_checkpoint, "org/again", endpoint=fake_hub.url)   # create_repo answers 409
    assert first == second
    assert len(fake_hub.requests_to("/commit/main", "POST")) == 1                      # nothing changed
    assert fake_hub.files("org/again") == before


def test_publish_to_branch_and_resolve_revision(fake_hub: FakeHub, tiny_checkpoint: Path, tmp_path: Path) -> None:
    publish_checkpoint(tiny_checkpoint, "org/branchy", endpoint=fake_hub.url, revision="v2",
                       commit_message="v2 weights")
    assert "config.json" not in fake_hub.files("org/branchy", "main")
    assert "config.json" in fake_hub.files("org/branchy", "v2")
    assert fake_hub.repos["org/branchy"].resolve("v2").message == "v2 weights"
    path = resolve_checkpoint("org/branchy", revision="v2", endpoint=fake_hub.url, cache_dir=tmp_path)
    assert (path / "config.json").read_bytes() == (tiny_checkpoint / "config.json").read_bytes()
    with pytest.raises(HubError, match="revision 'v3' does not exist"):
        resolve_checkpoint("org/branchy", revision="v3", endpoint=fake_hub.url, cache_dir=tmp_path)


def test_hf_endpoint_is_read_at_call_time(
    fake_hub: FakeHub, tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    assert publish_checkpoint(tiny_checkpoint, "org/env", card_data={"tags": ["tiny"]}).startswith(fake_hub.url)
    path = resolve_checkpoint("org/env", cache_dir=tmp_path)
    assert (path / "model.safetensors").is_file()
    assert ModelCard((path / "README.md").read_text()).data.tags == ["asynclm", "cml", "function-calling", "tiny"]


# ---------------------------------------------------------------------------------------------
# Errors that say what to do
# ---------------------------------------------------------------------------------------------


def test_offline_with_empty_cache(fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(HubError, match=r"not in .* downloads are disabled \(local_files_only=True\)") as err:
        resolve_checkpoint("org/cml-tiny", cache_dir=tmp_path, local_files_only=True, endpoint=fake_hub.url)
    assert "hf download org/cml-tiny" in str(err.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match=r"downloads are disabled \(HF_HUB_OFFLINE=1\)"):
        resolve_checkpoint("org/cml-tiny", cache_dir=tmp_path, endpoint=fake_hub.url)
    assert fake_hub.requests == []


def test_missing_repo(fake_hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(HubError, match=r"repository 'org/nope' not found on http://127\.0\.0\.1:\d+") as err:
        resolve_checkpoint("org/nope", endpoint=fake_hub.url, cache_dir=tmp_path)
    assert "HF_TOKEN" in str(err.value)                          # it may be private
    assert fake_hub.requests[-1].status == 404


def test_unreachable_hub(tmp_path: Path) -> None:
    with socket.socket() as s:                                   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(HubError, match=r"cannot reach http://127\.0\.0\.1:\d+ and org/x is not in"):
        resolve_checkpoint("org/x", endpoint=f"http://127.0.0.1:{port}", cache_dir=tmp_path)
    with pytest.raises(HubError, match="cannot reach"):
        publish_checkpoint(_tiny_folder(tmp_path / "t"), "org/x", endpoint=f"http://127.0.0.1:{port}")


def test_private_repo_needs_token(token_hub: FakeHub, tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(HubError, match=r"needs a write token .* set HF_TOKEN"):
        publish_checkpoint(tiny_checkpoint, "org/secret", endpoint=token_hub.url, private=True, token=False)
    with pytest.raises(HubError, match="token given was rejected"):
        publish_checkpoint(tiny_checkpoint, "org/secret", endpoint=token_hub.url, private=True, token="hf_bad")
    publish_checkpoint(tiny_checkpoint, "org/secret", endpoint=token_hub.url, private=True, token="hf_write")
    assert token_hub.repos["org/secret"].private
    with pytest.raises(HubError, match=r"not found .* if it is private, pass a token"):
        resolve_checkpoint("org/secret", endpoint=token_hub.url, cache_dir=tmp_path, token=False)
    path = resolve_checkpoint("org/secret", endpoint=token_hub.url, cache_dir=tmp_path, token="hf_write")
    assert (path / "config.json").is_file()


def test_publish_refuses_offline_mode(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="offline mode is on"):
        publish_checkpoint(tiny_checkpoint, "org/x", endpoint="http://127.0.0.1:9")


def _tiny_folder(folder: Path, weights: bool = True, tokenizer: bool = True) -> Path:
    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    if weights:
        model.save_pretrained(folder)
    else:
        folder.mkdir(parents=True)
        model.config.save_pretrained(folder)
    if tokenizer:
        tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no-weights", r"has no \*\.safetensors weights \(save the model with save_pretrained"),
        ("bin-weights", r"found pytorch_model\.bin: re-save with save_pretrained\(folder, safe_serialization=True\)"),
        ("no-tokenizer", r"has no tokenizer files .* tokenizer\.save_pretrained\(folder\)"),
        ("no-config", r"has neither config\.json \(a model\) nor adapter_config\.json"),
        ("missing", r"does not exist or is not a folder"),
    ],
)
def test_publish_rejects_non_checkpoints(fake_hub: FakeHub, tmp_path: Path, case: str, message: str) -> None:
    folder = tmp_path / "ckpt"
    if case in ("no-weights", "bin-weights"):
        _tiny_folder(folder, weights=False)
        if case == "bin-weights":
            (folder / "pytorch_model.bin").write_bytes(b"\0")
    elif case == "no-tokenizer":
        _tiny_folder(folder, tokenizer=False)
    elif case == "no-config":
        _tiny_folder(folder)
        (folder / "config.json").unlink()
    with pytest.raises(InvalidCheckpointError, match=message):
        publish_checkpoint(folder, "org/bad", endpoint=fake_hub.url)
    assert fake_hub.requests == []                               # nothing sent


def test_missing_shard_is_reported(tmp_path: Path) -> None:
    folder = _tiny_folder(tmp_path / "sharded")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model.safetensors"}})
    )
    with pytest.raises(InvalidCheckpointError, match="missing: model-00001-of-00002.safetensors"):
        check_checkpoint_folder(folder)


def test_resolve_local_paths(tiny_checkpoint: Path, tmp_path: Path) -> None:
    assert resolve_checkpoint(tiny_checkpoint) == tiny_checkpoint.resolve()
    assert resolve_checkpoint(str(tiny_checkpoint)) == tiny_checkpoint.resolve()
    with pytest.raises(InvalidCheckpointError, match="neither config.json nor adapter_config.json"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(InvalidCheckpointError, match="is a file"):
        resolve_checkpoint(tiny_checkpoint / "config.json")
    for bad in ("./not/here", "a/b/c", "bad name!"):
        with pytest.raises(InvalidCheckpointError, match="neither an existing folder nor a Hub repo id"):
            resolve_checkpoint(bad)


def test_adapter_card(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "base_model_name_or_path": "google/gemma-3-270m", "r": 8,
    }))
    save_file({"lora_A": torch.zeros(8, 32), "lora_B": torch.zeros(32, 8)}, str(folder / "adapter_model.safetensors"))
    tiny_tokenizer().save_pretrained(folder)
    info = check_checkpoint_folder(folder)
    assert (info.kind, info.num_parameters) == ("adapter", 512)
    card = render_model_card(folder, "org/cml-lora", card_data={"license": "gemma"})
    assert card.data.base_model == "google/gemma-3-270m"
    assert "peft" in card.data.tags
    assert "PEFT adapter" in card.text
    assert "Interrupts: this checkpoint" not in card.text  # no training record: no recorded rule to tell


def test_card_lists_the_stages_of_a_multi_stage_run(tmp_path: Path) -> None:
    """A record with ``stages`` (the shipped cml-tiny's) gets a table of them and the total training
    time; a one-stage record gets neither."""
    folder = _tiny_folder(tmp_path / "staged")
    record = {
        "format": "hf-asynclm/cml-training/1", "mode": "scratch (2 stages)", "steps": 30, "train_time_s": 12.5,
        "data_files": ["/d/b.jsonl"],
        "stages": [
            {"name": "1: drills", "steps": 100, "examples": 4000, "train_time_s": 60.25, "data_files": ["/d/a.jsonl"]},
            {"name": "2: traces | BFCL", "steps": 30, "examples": 900, "train_time_s": 12.5,
             "data_files": ["/d/b.jsonl", "/d/c.jsonl"]},
            "not a stage",
        ],
        "train_time_s_total": 72.75,
    }
    (folder / "cml_training.json").write_text(json.dumps(record))
    text = render_model_card(folder, "org/staged").text
    assert "Trained in 2 stages" in text and "training time in all: 72.8 s (1.2 min)" in text
    assert "| 1: drills | 100 | 4000 | 60.25 | a.jsonl |" in text
    assert "| 2: traces \\| BFCL | 30 | 900 | 12.5 | b.jsonl, c.jsonl |" in text  # a | in a name is escaped
    assert text.index("### Stages") < text.index("### Training data")
    del record["stages"], record["train_time_s_total"]
    (folder / "cml_training.json").write_text(json.dumps(record))
    text = render_model_card(folder, "org/staged").text
    assert "### Stages" not in text and "training time in all" not in text


def test_card_of_the_shipped_cml_tiny_lists_its_stages() -> None:
    import hf_asynclm

    folder = Path(hf_asynclm.__file__).parent / "checkpoints" / "cml-tiny"
    record = json.loads((folder / "cml_training.json").read_text())
    text = render_model_card(folder, "org/cml-tiny").text
    assert f"Trained in {len(record['stages'])} stages" in text
    minutes = record["train_time_s_total"] / 60
    assert f"({minutes:.1f} min)" in text and minutes < 120  # issue 3: trains in under two hours


def test_card_from_the_trainers_record(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The record hf_asynclm.training.train writes (format hf-asynclm/cml-training/1) fills the card."""
    folder = _tiny_folder(tmp_path / "trained")
    record = {
        "format": "hf-asynclm/cml-training/1",
        "mode": "lora",
        "base_model": str(tmp_path / "gemma-3-270m"),              # a local folder: not for the metadata
        "data_files": ["/data/traces/train.jsonl"],
        "examples": 120,
        "dataset": {"files": ["/data/traces/train.jsonl"], "read": 128, "kept": 120, "too_long": 8,
                    "truncated": 0, "invalid": 0, "tokens": 16000, "trained_tokens": 5200, "max_tokens": 480},
        "steps": 50, "epochs": 1.7, "final_train_loss": 0.4123, "mean_train_loss": 1.2, "train_time_s": 81.5,
        "parameters": 268000000, "trainable_parameters": 1500000, "vocab_size": 262149,
        "simulator": {"mode": {"async": 100, "sync": 20},
                      "meta": {"call_time_ms": {"count": 120, "mean": 110.2, "min": 30, "max": 500},
                               "scheduling": {"LPT": 120}}},
        "config": {"learning_rate": 0.0002, "batch_size": 8, "max_length": 512, "lora": True, "lora_r": 16,
                   "seed": 0, "preset": None},
        "loss_history": [{"step": 10, "loss": 2.0}],
        "runtime": {"interrupt_at": "word", "constrain_calls": "schema"},
    }
    (tmp_path / "gemma-3-270m").mkdir()
    (folder / "cml_training.json").write_text(json.dumps(record))
    with caplog.at_level("WARNING", logger="hf_asynclm.hub"):
        card = render_model_card(folder, "org/cml-gemma", card_data={"license": "gemma"})
    assert card.data.base_model is None and "is not a Hub id" in caplog.text
    text = card.text
    for row in ("| mode | lora |", "| steps | 50 |", "| final_train_loss | 0.4123 |", "| learning_rate | 0.0002 |",
                "| lora_r | 16 |", "| files | train.jsonl |", "| examples kept | 120 |", "| too_long | 8 |",
                "| calling modes in the traces | async=100, sync=20 |",
                "| call_time_ms | mean 110.2 (min 30, max 500) |", "| scheduling | LPT=120 |"):
        assert row in text, row
    assert "truncated" not in text and "loss_history" not in text and "/data/traces" not in text
    assert '`"interrupt_at": "word"`' in text and "between words or right after a block" in text
    assert "paced" not in text
    assert '`"constrain_calls": "schema"`' in text and 'constrain_calls="off"' in text
    assert "copied from the conversation" not in text
    record["runtime"]["constrain_calls"] = "grounded"
    (folder / "cml_training.json").write_text(json.dumps(record))
    text = render_model_card(folder, "org/cml-gemma", card_data={"license": "gemma"}).text
    assert '`"constrain_calls": "grounded"`' in text and "copied from the conversation" in text
    assert "no_repeat_calls" not in text
    record["runtime"]["no_repeat_calls"] = True
    (folder / "cml_training.json").write_text(json.dumps(record))
    text = render_model_card(folder, "org/cml-gemma", card_data={"license": "gemma"}).text
    assert '`"no_repeat_calls": true`' in text and "no_repeat_calls=False" in text
    assert "complete_names" not in text
    record["runtime"]["complete_names"] = True
    (folder / "cml_training.json").write_text(json.dumps(record))
    text = render_model_card(folder, "org/cml-gemma", card_data={"license": "gemma"}).text
    assert '`"complete_names": true`' in text and "complete_names=False" in text
    record["runtime"]["interrupt_at"] = "sentence"
    (folder / "cml_training.json").write_text(json.dumps(record))
    text = render_model_card(folder, "org/cml-gemma", card_data={"license": "gemma"}).text
    assert '`"interrupt_at": "sentence"`' in text and "one at a time (paced)" in text and "between words" not in text
    assert "plan_layout" not in text
    record["runtime"]["plan_layout"] = "time-first"
    (folder / "cml_training.json").write_text(json.dumps(record))
    text = render_model_card(folder, "org/cml-gemma", card_data={"license": "gemma"}).text
    assert '`"plan_layout": "time-first"`' in text and "~420ms c1 f(a=1)" in text
    card = render_model_card(folder, "org/cml-gemma", card_data={"license": "gemma", "base_model": "google/gemma-3-270m"})
    assert card.data.base_model == "google/gemma-3-270m"


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_publish(fake_hub: FakeHub, tiny_checkpoint: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(publish, [str(tiny_checkpoint), "--repo-id", "org/cli", "--endpoint", fake_hub.url,
                                     "--license", "mit", "--base-model", "org/base", "-m", "from the CLI"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == f"{fake_hub.url}/org/cli"
    card = ModelCard(fake_hub.files("org/cli")["README.md"].decode())
    assert (card.data.license, card.data.base_model) == ("mit", "org/base")
    assert fake_hub.repos["org/cli"].resolve("main").message == "from the CLI"

    bad = runner.invoke(publish, [str(tmp_path), "--repo-id", "org/cli", "--endpoint", fake_hub.url])
    assert bad.exit_code == 1
    assert bad.output.startswith("Error: not a checkpoint folder:")
    assert "Traceback" not in bad.output

    missing = runner.invoke(publish, [str(tiny_checkpoint)])
    assert missing.exit_code == 2 and "--repo-id" in missing.output

    helped = runner.invoke(publish, ["--help"])
    assert helped.exit_code == 0 and "hf-asynclm publish out/cml-tiny --repo-id my-org/cml-tiny" in helped.output


def test_cli_publish_hub_error_is_one_line(token_hub: FakeHub, tiny_checkpoint: Path) -> None:
    result = CliRunner().invoke(publish, [str(tiny_checkpoint), "--repo-id", "org/x", "--endpoint", token_hub.url,
                                          "--token", "hf_bad"])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("Error: not allowed to publish")
    assert "hf_bad" not in result.output


def test_fake_hub_tree_and_ranges(fake_hub: FakeHub) -> None:
    """The server itself: folder listing and ranged downloads (the client resumes with Range)."""
    import httpx2

    repo = fake_hub.create_repo("org/tree")
    fake_hub._commit(repo, "main", "add", {"a/b/c.txt": b"hello", "d.txt": b"x"})
    tree = httpx2.get(f"{fake_hub.url}/api/models/org/tree/tree/main", params={"recursive": "false"}).json()
    assert [(e["type"], e["path"]) for e in tree] == [("file", ".gitattributes"), ("directory", "a"), ("file", "d.txt")]
    tree = httpx2.get(f"{fake_hub.url}/api/models/org/tree/tree/main/a", params={"recursive": "true"}).json()
    assert [(e["type"], e["path"]) for e in tree] == [("directory", "a/b"), ("file", "a/b/c.txt")]
    r = httpx2.get(f"{fake_hub.url}/org/tree/resolve/main/a/b/c.txt", headers={"Range": "bytes=1-"})
    assert (r.status_code, r.content, r.headers["Content-Range"]) == (206, b"ello", "bytes 1-4/5")
    r = httpx2.head(f"{fake_hub.url}/org/tree/resolve/main/nope.txt")
    assert (r.status_code, r.headers["X-Error-Code"]) == (404, "EntryNotFound")
