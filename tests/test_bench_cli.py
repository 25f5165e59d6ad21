"""hf-asynclm bench: the click commands, with tiny runs and bad input."""

from __future__ import annotations

import json

from click.testing import CliRunner

from hf_asynclm_cli.bench_cmd import bench

MINI = "tests/data/bfcl_mini"


def test_help_lists_the_commands() -> None:
    result = CliRunner().invoke(bench, ["--help"])
    assert result.exit_code == 0
    assert all(c in result.output for c in ("latency", "accuracy", "overhead"))


def test_latency_command_writes_json_markdown_and_timelines(tmp_path) -> None:
    args = ["latency", "--model", "random", "--data-dir", MINI, "--n", "1", "--emulate-tpot-ms", "1", "--emulate-ttft-ms", "5",
            "--latency-scale", "0.1", "--threads", "1", "--no-warmup", "--out", str(tmp_path)]
    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 0, result.output
    stem = "latency_bfcl-parallel_oracle_emu1ms-ttft5ms"
    report = json.loads((tmp_path / f"{stem}.json").read_text())
    assert set(report["tasks"][0]["modes"]) == {"sync", "sync-cached", "sync-parallel", "async"}
    assert (tmp_path / f"{stem}.md").exists() and (tmp_path / f"{stem}_timeline.png").exists()
    assert (tmp_path / f"{stem}_timeline_detail.png").exists() and (tmp_path / "latency_summary.md").exists()
    assert "async / sync" in result.output


def test_oracle_runs_of_two_models_on_real_decode_keep_both_reports(tmp_path, monkeypatch) -> None:
    """Real decode times are the model's: a run of random-llama-1b (cut down here) must not overwrite
    the tiny random Llama's report in the same folder, and the summary lists both."""
    from hf_asynclm.bench import latency

    small = dict(latency.LLAMA_3_2_1B_SHAPE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16)
    monkeypatch.setattr(latency, "LLAMA_3_2_1B_SHAPE", small)
    for model in ("random", "random-llama-1b"):
        args = ["latency", "--model", model, "--data-dir", MINI, "--n", "1", "--modes", "sync,async", "--latency-scale", "0.1",
                "--threads", "1", "--no-warmup", "--out", str(tmp_path)]
        result = CliRunner().invoke(bench, args)
        assert result.exit_code == 0, result.output
    for name in ("tiny-random", "random-llama-1b"):
        stem = f"latency_bfcl-parallel_oracle-{name}_real"
        assert json.loads((tmp_path / f"{stem}.json").read_text())["model_name"] == name
        assert (tmp_path / f"{stem}.md").exists()
    summary = (tmp_path / "latency_summary.md").read_text()
    assert "| oracle | tiny-random | real decode |" in summary and "| oracle | random-llama-1b | real decode |" in summary


def test_model_policy_files_and_summary_name_the_model(tmp_path) -> None:
    args = ["latency", "--policy", "model", "--model", "random", "--data-dir", MINI, "--n", "1", "--max-new-tokens", "6",
            "--latency-scale", "0.1", "--threads", "1", "--no-warmup", "--out", str(tmp_path)]
    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 0, result.output
    stem = "latency_bfcl-parallel_model-tiny-random_real"
    report = json.loads((tmp_path / f"{stem}.json").read_text())
    assert report["model_name"] == "tiny-random"
    # a random model writes no call: the modes' work and the ideal say so
    assert "Work done, calls run of the calls due: sync 0/" in (tmp_path / f"{stem}.md").read_text()
    summary = (tmp_path / "latency_summary_model.md").read_text()
    assert "| model |" in summary and "| bfcl-parallel | model | tiny-random | real decode |" in summary


def test_accuracy_and_overhead_commands(tmp_path) -> None:
    result = CliRunner().invoke(bench, ["accuracy", "--model", "random", "--data-dir", MINI, "--category", "parallel", "--n", "1",
                                        "--split", "all", "--max-new-tokens", "8", "--latency-scale", "0.01", "--threads", "1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "accuracy_random.json").exists() and "| parallel | async |" in result.output
    result = CliRunner().invoke(bench, ["overhead", "--model", "random", "--new-tokens", "4", "--reps", "1", "--interrupt-tokens", "4",
                                        "--context-tokens", "8", "--calls", "1", "--generations", "1", "--emulate-tpot-ms", "1",
                                        "--threads", "1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "overhead.json").read_text())["benchmark"] == "overhead"


def test_bad_input_gives_usage_errors(tmp_path) -> None:
    runner = CliRunner()
    cases = [
        (["latency", "--emulate-ttft-ms", "59"], 2, "both"),
        (["latency", "--emulate-tpot-ms", "5"], 2, "both"),
        (["latency", "--workload", "nope"], 2, "nope"),
        (["latency", "--modes", "sync,fast"], 2, "fast"),
        (["latency", "--n", "0"], 2, "0"),
        (["overhead", "--interrupt-tokens", "8,abc"], 2, "abc"),
        (["accuracy", "--modes", "sync-cached"], 2, "sync-cached"),
    ]
    for args, code, text in cases:
        result = runner.invoke(bench, args)
        assert result.exit_code == code, (args, result.output)
        assert text in result.output
    # a device this machine lacks: one line, before any weights load
    for command in ("latency", "overhead", "accuracy"):
        result = runner.invoke(bench, [command, "--model", "random", "--device", "gpu", "--out", str(tmp_path)])
        assert result.exit_code == 1 and "unknown device 'gpu': use cpu, cuda, cuda:N or mps" in result.output, result.output
        assert "Traceback" not in result.output
    # a data folder without BFCL files: one line, no traceback
    result = runner.invoke(bench, ["latency", "--model", "random", "--data-dir", str(tmp_path), "--n", "1", "--threads", "1", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "Error:" in result.output and "Traceback" not in result.output
