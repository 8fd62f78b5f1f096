"""Benchmark a training step's memory and time against the history length L, on the CPU.

    .venv/bin/python bench/bench_train_memory.py                 # L = 250 500 1000 2000, batch 512, 3 steps each

For each L, a process of its own builds train.py's model at its GPU defaults (dim 64, 4
heads, 2 layers; vocabularies of `make demo`'s size), AdamW, and a batch of random
full-length histories, then runs --steps training steps. It reports its peak RSS (the
kernel's high-water mark), the fastest step's seconds, and what train.py's estimate
(recpipe.training.step_memory) said the step needs. Saves bench/results/train_memory.json.

Attention through scaled_dot_product_attention's fused kernel keeps memory linear in L;
the model before it held [batch, heads, L, L] scores and was killed for memory at L = 1000.
"""

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time

from measure import ROOT, save_report

ITEMS, CATEGORICAL, NUMERIC = 5000, [2000, 30, 20, 40], 9


def one_length(length, batch_size, steps, dim):
    """Run in a child process: the measurements for one L, as JSON on stdout."""
    sys.path.insert(0, str(ROOT))
    import torch

    from recpipe.model import Recommender
    from recpipe.training import step_memory

    torch.manual_seed(0)
    model = Recommender(ITEMS, CATEGORICAL, NUMERIC, length, dim=dim)
    optimizer = torch.optim.AdamW(model.parameters())
    per_example, fixed = step_memory(model, torch.device("cpu"), contextlib.nullcontext, length, len(CATEGORICAL),
                                     NUMERIC)
    generator = torch.Generator().manual_seed(0)
    history = torch.randint(1, ITEMS, (batch_size, length), generator=generator)
    batch = {"item": torch.randint(1, ITEMS, (batch_size,), generator=generator), "history_items": history,
             "history_action_types": torch.randint(1, 4, (batch_size, length), dtype=torch.int8, generator=generator),
             "categorical": torch.stack([torch.randint(0, n, (batch_size,), generator=generator) for n in CATEGORICAL],
                                        1),
             "numeric": torch.randn(batch_size, NUMERIC, generator=generator),
             "target": torch.randint(0, 2, (batch_size,), generator=generator).float()}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch["target"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - started)
    print(json.dumps({"length": length, "batch_size": batch_size, "dim": dim,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "rss_before_first_step_bytes": before,
                      "estimated_step_bytes": int(fixed + per_example * batch_size),
                      "seconds_per_step": min(seconds), "steps": steps}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[250, 500, 1000, 2000])
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        one_length(args.child, args.batch_size, args.steps, args.dim)
        return
    rows = []
    for length in args.lengths:
        result = subprocess.run([sys.executable, __file__, "--child", str(length), "--batch-size", str(args.batch_size),
                                 "--steps", str(args.steps), "--dim", str(args.dim)],
                                capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        print(f"L={length}: peak {row['peak_rss_bytes'] / 2**30:.2f} GiB (estimated step "
              f"{row['estimated_step_bytes'] / 2**30:.2f} GiB on {row['rss_before_first_step_bytes'] / 2**30:.2f} GiB "
              f"before it), {row['seconds_per_step']:.2f} s per step", flush=True)
    peaks = {row["length"]: row["peak_rss_bytes"] for row in rows}
    report = {"command": " ".join(["bench/bench_train_memory.py", *sys.argv[1:]]), "rows": rows}
    if 1000 in peaks and 2000 in peaks:
        report["peak_ratio_2000_to_1000"] = round(peaks[2000] / peaks[1000], 3)
    save_report("train_memory", report)


if __name__ == "__main__":
    main()
