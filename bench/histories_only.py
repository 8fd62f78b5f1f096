"""Our history computation alone, on the cluster: what bench/duckdb_histories.py computes, the same way round.

    .venv/bin/python bench/histories_only.py DATA_DIR OUT_DIR [--lookback-days 365] [--max-history 1000]

Reads DATA_DIR/cleaned/ and writes OUT_DIR/bucket=N.parquet: one row per (customer_id,
dt) with impressions in train/val/test, with the raw item ids and action types of its
history — the same input and output as the DuckDB query, so the two times compare
like for like. preprocess.py does this inside its step 3, besides fitting, encoding,
the activity features and writing examples.
"""

import argparse
import sys
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from recpipe import cluster  # noqa: E402  (the repository root is not on the path of a bench/ script)
from recpipe.histories import compute_histories  # noqa: E402
from recpipe.preprocess import _keys, read_bucket  # noqa: E402


def histories_of_bucket(cleaned_dir, bucket, out_dir, params):
    impressions, actions, _ = read_bucket(cleaned_dir, bucket)
    _, keys = _keys(impressions)
    histories = compute_histories(actions, keys, params["lookback_days"], params["max_history"])
    histories = histories.select(["customer_id", "dt", "history_items", "history_action_types"]).rename_columns(
        ["customer_id", "dt", "actions", "action_types"])
    pq.write_table(histories, Path(out_dir) / f"{bucket}.parquet")
    return histories.num_rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--lookback-days", type=int, default=365)
    parser.add_argument("--max-history", type=int, default=1000)
    cluster.add_arguments(parser)
    args = parser.parse_args()
    cleaned = Path(args.data) / "cleaned"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    params = {"lookback_days": args.lookback_days, "max_history": args.max_history}
    with cluster.connect(args) as client:
        buckets = sorted(path.name for path in (cleaned / "impressions").glob("bucket=*"))
        futures = [client.submit(histories_of_bucket, str(cleaned), bucket, args.out, params, pure=False)
                   for bucket in buckets]
        rows = sum(cluster.wait_with_progress(futures, "histories"))
    print(f"{rows:,} histories written to {args.out}")


if __name__ == "__main__":
    main()
