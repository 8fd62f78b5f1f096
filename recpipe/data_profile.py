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


# Reasons drawn one bar each in the set-aside panel; the rest share one bar that says how many they are.
SET_ASIDE_BARS = 12
# History lengths are drawn in this many bins below the cap; the cap (--max-history) gets a bar of its own,
# since a one-length-wide bar among a thousand is narrower than a pixel.
HISTORY_BINS = 50
LABEL_CHARS = 30  # longer tick labels are cut, so that they do not squeeze their panel


def plot(profiled, path):
    """The profile as one picture of six panels, written to `path` (PNG)."""
    import matplotlib.pyplot as plt

    figure = draw(profiled)
    figure.savefig(path, dpi=80, format="png")
    plt.close(figure)


def draw(profiled):
    """The matplotlib figure of `plot`: examples and label rate per day, history lengths, unknown shown items,
    browser families, bots, rows set aside."""
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
    ax.set_ylabel("examples")
    rate = ax.twinx()
    rates = [day["label_rate"] or 0 for day in days]
    rate.plot(positions, rates, color="black", marker=".")
    # From zero: an axis fitted to the line makes a wobble of a point look like a collapse.
    rate.set_ylim(0, max(rates, default=0) * 1.25 or 1)
    rate.set_ylabel("label rate (is_order)")
    ax.legend(handles=[Patch(color=colour, label=split) for split, colour in colours.items()], loc="lower left")

    ax = axes[0, 1]
    history = profiled["history_length"]
    counts = np.asarray(history["counts"], dtype=np.int64)
    cap = len(counts) - 1
    edges = np.unique(np.linspace(0, cap, HISTORY_BINS + 1).astype(np.int64))
    binned = np.add.reduceat(counts[:cap], edges[:-1]) if cap else np.zeros(0, dtype=np.int64)
    ax.bar(edges[:-1], binned, width=np.diff(edges), align="edge", color="tab:purple", label="below the cap")
    ax.bar([cap], [counts[cap]], width=max(1, cap / HISTORY_BINS), color="tab:red",
           label=f"at the cap ({cap}): {counts[cap]:,}")
    ax.set_yscale("log")
    quantiles = ", ".join(f"{name} {value}" for name, value in history["quantiles"].items())
    ax.set_title(f"history length: {quantiles}")
    ax.set_xlabel("actions in the history")
    ax.set_ylabel("examples")
    ax.legend(loc="upper center")

    ax = axes[0, 2]
    splits = profiled["splits"]
    ax.bar(list(splits), [split["unknown_item_share"] or 0 for split in splits.values()],
           color=[colours[name] for name in splits])
    ax.set_title("unknown shown items (cat_item 1)")
    ax.set_ylabel("share of examples")

    ax = axes[1, 0]
    families = list(profiled["browser_families"].items())[:12][::-1]
    _bars_by_name(ax, families, color="tab:gray")
    ax.set_title("browser families (top 12)")
    ax.set_xlabel("share of examples")

    ax = axes[1, 1]
    ax.bar(list(splits), [split["bot_share"] or 0 for split in splits.values()], color=[colours[n] for n in splits])
    ax.set_title(f"bot share (device family {BOT_FAMILY})")
    ax.set_ylabel("share of examples")

    ax = axes[1, 2]
    set_aside = profiled["set_aside"]
    if set_aside is None:
        ax.text(0.5, 0.5, "merged/ was cleaned away:\nno record of rows set aside", ha="center", va="center")
        ax.set_axis_off()
    else:
        reasons = sorted(((f"{source}: {reason}", rows) for source, counts in set_aside.items()
                          for reason, rows in counts.items()), key=lambda pair: -pair[1])
        shown, rest = reasons[:SET_ASIDE_BARS], reasons[SET_ASIDE_BARS:]
        if len(rest) == 1:
            shown, rest = reasons, []
        if rest:
            shown.append((f"{len(rest)} other reasons", sum(rows for _, rows in rest)))
        _bars_by_name(ax, shown[::-1], color=["tab:gray" if rest else "tab:red"] + ["tab:red"] * (len(shown) - 1))
        ax.set_title(f"rows set aside, by reason ({len(reasons)} reasons)")
        ax.set_xlabel("rows")
    for ax in axes.flat:
        ax.tick_params(labelsize=8)
    figure.tight_layout()
    return figure


def _bars_by_name(ax, pairs, color):
    """Horizontal bars of (name, value) pairs, bottom up, labelled by their names cut to LABEL_CHARS (by
    position: two names cut alike stay two bars)."""
    positions = np.arange(len(pairs))
    ax.barh(positions, [value for _, value in pairs], color=color)
    ax.set_yticks(positions, [_short(name) for name, _ in pairs])


def _short(label):
    return label if len(label) <= LABEL_CHARS else label[:LABEL_CHARS - 1] + "…"
