"""A profile of the training data to look at: `pipeline.py profile` writes profile.json and profile.png
beside processed/ (in --data).

From processed/ (any layout), one day of examples at a time: examples and label rate per day and
split, the distribution of history lengths, the share of shown items the encoder does not know
(`cat_item` 1) per split, browser families and the bot share (ua-parser's device family "Spider");
from merged/'s manifest, while merged/ is there, the rows set aside per source and reason.
"""

import collections
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

from recpipe import encoders, stage, storage, tables
from recpipe.cli import UserError

PROFILE_JSON = "profile.json"
PROFILE_PNG = "profile.png"
MADE_BY = "pipeline.py profile"
SPLITS = ("train", "val", "test")
BOT_FAMILY = "Spider"
COLUMNS = ["is_order", "cat_item", "cat_browser", "cat_device", "num_history_len"]


def profile(data_dir):
    """The profile of data_dir/processed/ (and merged/'s set-aside rows, when merged/ is there), as a dict."""
    data_dir = storage.path(data_dir)
    with stage.reading(data_dir, "processed") as processed:
        fitted, scaler, _ = encoders.load(processed.path / encoders.FITTED)
        parameters = processed.manifest["parameters"]
        layout = parameters.get("layout", "compact")
        counter = _Counter(fitted, scaler, parameters["max_history"])
        days, splits = [], {}
        for split in SPLITS:
            totals = collections.Counter()
            for day, files in _days(processed.path, split, layout):
                counts = counter.count(pa.concat_tables([tables.read(file, columns=COLUMNS) for file in files]))
                days.append({"split": split, "dt": day, **_rates(counts)})
                totals.update(counts)
            splits[split] = _rates(totals)
        made_from = processed.manifest["output_sha256"]
    examples = sum(split["examples"] for split in splits.values())
    return {
        "made_by": MADE_BY, "processed_output_sha256": made_from, "layout": layout,
        "splits": splits, "days": days,
        "history_length": {"max_history": parameters["max_history"], "counts": counter.lengths.tolist(),
                           "quantiles": _quantiles(counter.lengths, (0.1, 0.5, 0.9, 0.99))},
        "browser_families": {name: _share(count, examples) for name, count in counter.browsers.most_common()},
        "set_aside": _set_aside(data_dir / "merged"),
    }


class _Counter:
    """Counts over days of examples: per day what `count` returns; across all of them, history lengths and
    browser families."""

    def __init__(self, fitted, scaler, max_history):
        self.browser_names = _names(fitted["cat_browser"])
        devices = _names(fitted["cat_device"])
        self.bot = devices.index(BOT_FAMILY) if BOT_FAMILY in devices else None
        self.history_scale = scaler.std_["num_history_len"], scaler.mean_["num_history_len"]
        self.lengths = np.zeros(max_history + 1, dtype=np.int64)
        self.browsers = collections.Counter()

    def count(self, table):
        """{examples, labels, unknown, bots} of one day's examples."""
        items, labels = table.column("cat_item").to_numpy(), table.column("is_order").to_numpy()
        std, mean = self.history_scale  # num_history_len is a scaled log1p of the length
        length = np.rint(np.expm1(table.column("num_history_len").to_numpy().astype(np.float64) * std + mean))
        self.lengths += np.bincount(np.clip(length, 0, len(self.lengths) - 1).astype(np.int64),
                                    minlength=len(self.lengths))
        browsers = np.bincount(table.column("cat_browser").to_numpy(), minlength=len(self.browser_names))
        self.browsers.update({self.browser_names[i]: int(count) for i, count in enumerate(browsers) if count})
        devices = table.column("cat_device").to_numpy()
        return collections.Counter(examples=len(items), labels=float(labels.sum()),
                                   unknown=int((items == encoders.UNKNOWN).sum()),
                                   bots=int((devices == self.bot).sum()) if self.bot is not None else 0)


def _rates(counts):
    examples = counts["examples"]
    return {"examples": examples, "label_rate": _share(counts["labels"], examples),
            "unknown_item_share": _share(counts["unknown"], examples), "bot_share": _share(counts["bots"], examples)}


def summary(profiled):
    """A few lines for the console: each split's examples, label rate, unknown items and bots."""
    lines = [f"{'split':<8}{'examples':>12}{'label rate':>12}{'unknown items':>15}{'bots':>9}"]
    for name, split in profiled["splits"].items():
        lines.append(f"{name:<8}{split['examples']:>12,}" + "".join(
            f"{'-' if split[key] is None else f'{split[key]:.2%}':>{width}}"
            for key, width in (("label_rate", 12), ("unknown_item_share", 15), ("bot_share", 9))))
    lines.append("history length: " + ", ".join(f"{name} {value}" for name, value in
                                                profiled["history_length"]["quantiles"].items()))
    return "\n".join(lines)


def _names(encoder):
    """Every index's value: 0 missing, 1 unknown, then the categories."""
    return ["(missing)", "(unknown)", *map(str, encoder.categories_)]


def _share(part, whole):
    return round(float(part) / whole, 6) if whole else None


def _quantiles(counts, levels):
    cumulative = np.cumsum(counts)
    if not cumulative[-1]:
        return {}
    return {f"p{round(level * 100)}": int(np.searchsorted(cumulative, level * cumulative[-1])) for level in levels}


def _days(processed_dir, split, layout):
    """[(YYYY-MM-DD, example files)] of a split, in day order; none for a split preprocess.py found no day of."""
    folder = processed_dir / split / ("examples" if layout in ("timeline", "compact") else "")
    return [(day_dir.name.removeprefix("dt="), sorted(day_dir.glob("*.parquet")))
            for day_dir in sorted(folder.glob("dt=*")) if any(day_dir.glob("*.parquet"))]


def _set_aside(merged_dir):
    """{source: {reason: rows}} from merged/'s manifest, or None once merged/ was cleaned away."""
    if not (merged_dir / stage.MANIFEST).is_file():
        return None
    accounting = stage.read_manifest(merged_dir)["accounting"]
    return {source: dict(sorted(counts.get("set_aside", {}).items())) for source, counts in accounting.items()}


def write(data_dir, profiled):
    """Write profile.json and profile.png into data_dir, replacing only a profile this command wrote
    (its profile.json records the picture's hash); return their paths."""
    data_dir = storage.path(data_dir)
    json_path, png_path = data_dir / PROFILE_JSON, data_dir / PROFILE_PNG
    _check_ours(json_path, png_path)
    if storage.is_url(data_dir):  # one object each, written whole: the picture first, the record that vouches last
        with tempfile.TemporaryDirectory() as scratch:
            plot(profiled, Path(scratch) / PROFILE_PNG)
            picture = (Path(scratch) / PROFILE_PNG).read_bytes()
        png_path.write_bytes(picture)
        record = {**profiled, "png_sha256": hashlib.sha256(picture).hexdigest()}
        json_path.write_text(json.dumps(record, indent=2) + "\n")
        return json_path, png_path
    png_tmp = png_path.with_name(f".{PROFILE_PNG}.{os.getpid()}.tmp")
    json_tmp = json_path.with_name(f".{PROFILE_JSON}.{os.getpid()}.tmp")
    try:
        plot(profiled, png_tmp)
        record = {**profiled, "png_sha256": hashlib.sha256(png_tmp.read_bytes()).hexdigest()}
        json_tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(png_tmp, png_path)
        os.replace(json_tmp, json_path)  # last: it vouches for the picture
    finally:
        for leftover in (png_tmp, json_tmp):
            leftover.unlink(missing_ok=True)
    return json_path, png_path


def _check_ours(json_path, png_path):
    record = None
    if json_path.exists():
        try:
            record = json.loads(json_path.read_text())
        except (OSError, ValueError):
            pass
        if not isinstance(record, dict) or record.get("made_by") != MADE_BY:
            raise UserError(f"{json_path} exists and was not written by `{MADE_BY}`: this project replaces only "
                            "what it wrote; move it away or delete it, then run this again")
    if png_path.exists():
        ours = record is not None and record.get("png_sha256") == hashlib.sha256(png_path.read_bytes()).hexdigest()
        if not ours:
            raise UserError(f"{png_path} exists and is not the picture `{MADE_BY}` last wrote: this project replaces "
                            "only what it wrote; move it away or delete it, then run this again")


def plot(profiled, path):
    """The profile as one picture of six panels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    figure, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    colours = {"train": "tab:blue", "val": "tab:orange", "test": "tab:green"}

    ax = axes[0, 0]
    days = profiled["days"]
    positions = np.arange(len(days))
    ax.bar(positions, [day["examples"] for day in days], color=[colours[day["split"]] for day in days])
    step = max(1, len(days) // 6)
    ax.set_xticks(positions[::step], [day["dt"][5:] for day in days][::step], rotation=45)
    ax.set_title("examples per day, label rate (line)")
    rate = ax.twinx()
    rate.plot(positions, [day["label_rate"] or 0 for day in days], color="black", marker=".")
    rate.set_ylabel("label rate (is_order)")
    ax.legend(handles=[Patch(color=colour, label=split) for split, colour in colours.items()], loc="lower left")

    ax = axes[0, 1]
    history = profiled["history_length"]
    ax.bar(np.arange(len(history["counts"])), history["counts"], width=1.0, color="tab:purple")
    ax.set_yscale("log")
    quantiles = ", ".join(f"{name} {value}" for name, value in history["quantiles"].items())
    ax.set_title(f"history length: {quantiles}")
    ax.set_xlabel("actions in the history")

    ax = axes[0, 2]
    splits = profiled["splits"]
    ax.bar(list(splits), [split["unknown_item_share"] or 0 for split in splits.values()],
           color=[colours[name] for name in splits])
    ax.set_title("unknown shown items (cat_item 1)")

    ax = axes[1, 0]
    families = list(profiled["browser_families"].items())[:12][::-1]
    ax.barh([name for name, _ in families], [share for _, share in families], color="tab:gray")
    ax.set_title("browser families (share of examples)")

    ax = axes[1, 1]
    ax.bar(list(splits), [split["bot_share"] or 0 for split in splits.values()], color=[colours[n] for n in splits])
    ax.set_title(f"bot share (device family {BOT_FAMILY})")

    ax = axes[1, 2]
    set_aside = profiled["set_aside"]
    if set_aside is None:
        ax.text(0.5, 0.5, "merged/ was cleaned away:\nno record of rows set aside", ha="center", va="center")
        ax.set_axis_off()
    else:
        reasons = sorted(((f"{source}: {reason}", rows) for source, counts in set_aside.items()
                          for reason, rows in counts.items()), key=lambda pair: pair[1])[-14:]
        ax.barh([name for name, _ in reasons], [rows for _, rows in reasons], color="tab:red")
        ax.set_title("rows set aside, by reason")
    figure.tight_layout()
    figure.savefig(path, dpi=80, format="png")
    plt.close(figure)
