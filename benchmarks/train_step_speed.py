"""Time one training step (forward, backward, AdamW) of a from-scratch CML Llama in fp32 and in
bfloat16 mixed precision (``torch.autocast``, what ``hf-asynclm train --bf16`` turns on), both in one run.

    python benchmarks/train_step_speed.py                       # the tiny preset's shape, 8 x 512 tokens
    python benchmarks/train_step_speed.py --hidden-size 384 --num-heads 6 --intermediate-size 1152

Prints the median of ``--steps`` timed steps (after ``--warmup`` untimed ones) per precision and the ratio.
bfloat16 pays off on CPUs with avx512_bf16 or AMX (``lscpu | grep -o 'avx512_bf16\\|amx_bf16'``) and on GPUs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoTokenizer

from hf_asynclm.asynclm import DEFAULT_CHECKPOINT
from hf_asynclm.training.train import TrainConfig, build_tiny_llama


def time_steps(model: torch.nn.Module, batch: torch.Tensor, bf16: bool, warmup: int, steps: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    device_type = batch.device.type
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device_type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # model shape: the tiny preset's (what `hf-asynclm train --preset tiny` builds), unless overridden
    for option in ("--hidden-size", "--num-layers", "--num-heads", "--intermediate-size"):
        parser.add_argument(option, type=int, default=None, help="[tiny preset]")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512, help="sequence length")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    shape = {k: v for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size") if (v := getattr(args, k)) is not None}
    config = TrainConfig.from_preset("tiny", **shape)
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_CHECKPOINT)  # the shipped model's 512-token vocabulary
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = torch.randint(0, len(tokenizer), (args.batch_size, args.tokens), device=device)
    results = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        model = build_tiny_llama(tokenizer, config).to(device).train()  # seeded: the same initial weights for both
        results[name] = time_steps(model, batch, bf16, args.warmup, args.steps)
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.2f} M parameters, {args.batch_size} x {args.tokens} tokens, {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, seconds in results.items():
        print(f"  {name}: {seconds:.3f} s per step (median of {args.steps})")
    print(f"  bf16 / fp32: {results['bf16'] / results['fp32']:.2f}")


if __name__ == "__main__":
    main()
