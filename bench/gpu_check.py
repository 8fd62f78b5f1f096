"""The GPU check: what the loader and train.py do on a GPU machine, in a few minutes.

    python bench/gpu_check.py --data data --preprocessors preprocessors      # bench/gpu_check.sh runs this

Needs only PyTorch (CUDA), PyArrow, pandas and NumPy: the training side imports no Dask, so a
`processed/` and `preprocessors/` made elsewhere (`make demo` makes 4 MiB of them, histories of
up to 1,000 actions) are carried to the GPU machine and read there. Prints, and writes to
--out/gpu_check.json:

- which attention kernel runs (scaled_dot_product_attention's backend on this device);
- the loader's examples/s into GPU memory at L = 1000 and L = 200 (batches of 512, pinned,
  non_blocking, the [B, L] histories gathered on the GPU from the timelines, synchronized at
  the end), and the bytes each example moves to the device;
- one epoch of `train.py` at its GPU defaults (bf16 autocast, L = processed/'s, batch 512,
  dim 64): training examples/s, peak GPU memory, test AUC and the rule's.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import train  # noqa: E402  (the repository root is not on a bench/ script's path)
from recpipe import encoders, stage  # noqa: E402
from recpipe.loader import Prepare, ProcessedDataset, Timelines, make_loader  # noqa: E402
from recpipe.model import Recommender  # noqa: E402


def attention_kernels(device):
    """The aten attention kernels a forward and backward of the model run on `device`."""
    from torch.profiler import ProfilerActivity, profile
    model = Recommender(100, [10], 9, 64, dim=64).to(device)
    batch = {"item": torch.ones(8, dtype=torch.int64, device=device),
             "history_items": torch.randint(0, 100, (8, 64), device=device),
             "history_action_types": torch.ones(8, 64, dtype=torch.int8, device=device),
             "categorical": torch.zeros(8, 1, dtype=torch.int64, device=device),
             "numeric": torch.zeros(8, 9, device=device)}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                       enabled=False)
    with profile(activities=activities) as profiled, autocast:
        model(batch).float().sum().backward()
    return sorted({event.name for event in profiled.events() if "attention" in event.name and event.name.startswith("aten::_")})


def loader_rate(processed, fit, timelines, length, device, max_batches):
    """Examples/s the loader delivers into `device` memory at history length `length`, [B, L] histories
    built there (timeline layout), and the bytes an example moves to the device."""
    categorical = [name for name in fit["categorical"] if name != "cat_item"]
    data = ProcessedDataset(processed.path, "train", batch_size=512, max_history=length, categorical=categorical,
                            numeric=fit["numeric"], checked=processed, timelines=timelines)
    loader = make_loader(data, pin_memory=device.type == "cuda")
    prepare = Prepare(device, length, timelines)
    examples, moved, started = 0, 0, time.perf_counter()
    for number, batch in enumerate(loader):
        if number == max_batches:
            break
        moved += sum(tensor.nbytes for tensor in batch.values())
        batch = prepare(batch)
        examples += len(batch["target"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return examples / (time.perf_counter() - started), moved / max(examples, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data")
    parser.add_argument("--preprocessors", default="preprocessors")
    parser.add_argument("--out", default="/tmp/gpu-check")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--loader-batches", type=int, default=200)
    parser.add_argument("--train-flags", default="--epochs 1", help="more flags for train.py's run")
    args = parser.parse_args()
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "attention_kernels": attention_kernels(device)}
    print(f"attention kernels on {report['device']}: {', '.join(report['attention_kernels'])}", flush=True)

    processed = stage.open_stage(args.data, "processed")
    _, _, fit = encoders.load(Path(args.preprocessors))
    made_with = processed.manifest["parameters"]["max_history"]
    timelines = Timelines.load(processed) if processed.manifest["parameters"].get("layout") == "timeline" else None
    for length in (1000, 200):
        rate, moved = loader_rate(processed, fit, timelines, min(length, made_with), device, args.loader_batches)
        report[f"loader_examples_per_second_L{length}"] = round(rate)
        report[f"loader_bytes_moved_per_example_L{length}"] = round(moved, 1)
        print(f"loader into {device} at L = {min(length, made_with)}: {rate:,.0f} examples/s, {moved:,.1f} bytes "
              "moved per example", flush=True)

    run = out / time.strftime("run-%Y%m%d-%H%M%S")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train.main(["--data", args.data, "--preprocessors", args.preprocessors, "--out", str(run),
                "--device", args.device, "--log-seconds", "30", *args.train_flags.split()])
    final = json.loads((run / "final.json").read_text())
    report.update({key: final[key] for key in ("examples_per_second", "test_auc", "rule_test_auc", "steps")})
    report["max_history"] = json.loads((run / "config.json").read_text())["max_history"]
    if device.type == "cuda":
        report["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
