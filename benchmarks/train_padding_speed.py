"""Time the same training steps with and without ``--pad-to-multiple-of`` (``hf-asynclm train``), both in one run.

    python benchmarks/train_padding_speed.py                    # builds 2,000 paced synthetic traces, tiny model from scratch
    python benchmarks/train_padding_speed.py --data a.jsonl,b.jsonl --base out/stage2 --steps 150

Each side is a fresh ``hf-asynclm train`` process (a warm kernel cache must not favour the second) with the same data,
seed and batches (``group_by_length``); only the batches' padded length differs. Padding is on the right and masked, so
the loss is the same; what changes is how many distinct tensor shapes the CPU kernels see. Prints the seconds of the
training loop (``train_loop_s`` in the run's ``cml_training.json``: the steps alone, not loading or tokenizing), the
mean loss of each side, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from hf_asynclm.asynclm import DEFAULT_CHECKPOINT

CLI = [sys.executable, "-m", "hf_asynclm_cli.main"]  # `hf-asynclm`, with this interpreter


def run_side(data: str, base: str | None, out: Path, steps: int, multiple: int | None, bf16: bool) -> dict:
    """One ``hf-asynclm train`` run in its own process; returns its ``cml_training.json``."""
    cmd = [*CLI, "train", "-q", "--data", data, "--out", str(out),
           "--steps", str(steps), "--batch-size", "8", "--save-steps", str(steps + 1), "--seed", "0"]
    cmd += ["--base", base] if base else ["--preset", "tiny", "--tokenizer", str(DEFAULT_CHECKPOINT)]
    cmd += ["--bf16"] if bf16 else ["--no-bf16"]
    if multiple:
        cmd += ["--pad-to-multiple-of", str(multiple)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"hf-asynclm train failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads((out / "cml_training.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="training JSONL file(s), comma-separated [2,000 fresh synthetic traces]")
    parser.add_argument("--base", default=None, help="checkpoint to fine-tune [the tiny preset from scratch]")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--multiple", type=int, default=32, help="the padded side's --pad-to-multiple-of")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 instead of bfloat16 mixed precision")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = os.path.join(tmp, "traces.jsonl")
            subprocess.run([*CLI, "data", "build", "--out", data, "--n", "2000",
                            "--seed", "6000", "--shapes", "parallel,mixed", "--modes", "async", "--max-tokens", "0",
                            "--interrupt-at", "sentence"], check=True, capture_output=True)
        sides = {name: run_side(data, args.base, Path(tmp) / name.replace(" ", "_"), args.steps, multiple, args.bf16)
                 for name, multiple in (("unpadded", None), (f"padded to x{args.multiple}", args.multiple))}
        first = next(iter(sides.values()))
        print(f"{args.steps} steps x 8 of {first['examples']} examples, {first['parameters'] / 1e6:.2f} M parameters, "
              f"{'bf16' if args.bf16 else 'fp32'}, torch {torch.__version__}, {torch.get_num_threads()} threads")
        for name, record in sides.items():
            print(f"  {name}: {record['train_loop_s']:.1f} s ({record['train_loop_s'] / args.steps:.3f} s/step), "
                  f"mean loss {record['mean_train_loss']:.4f}")
        a, b = (record["train_loop_s"] for record in sides.values())
        print(f"  padded / unpadded: {b / a:.2f}")


if __name__ == "__main__":
    main()
