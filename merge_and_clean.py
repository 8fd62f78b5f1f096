"""Stage 1: read every raw source, clean it by the rules of docs/data.md, write merged/.

    python merge_and_clean.py --raw data/raw --data data

Reads   --raw (default data/raw): the files directly in impressions/, clicks/, add_to_carts/,
        previous_orders/, in JSON Lines, CSV or Parquet, optionally gzipped.
Writes  --data/merged/ (default data/merged), atomically, with _stage.json:
          impressions/  one row per shown item, with position and split
          actions/      the canonical action stream (customer_id, item_id, action_type, occurred_at)
          _quarantine/<source>/  rows set aside, with source_file, row, reason, raw
"""

import argparse
from pathlib import Path

from recpipe import cluster, pipeline, stage, summary
from recpipe.cli import entrypoint
from recpipe.merge import merge_and_clean
from recpipe.raw import list_raw_files


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", default="data/raw", help="folder with one sub-folder per raw source")
    parser.add_argument("--data", default="data", help="folder holding the stage folders")
    pipeline.add_parameters(parser, "merged")
    cluster.add_arguments(parser)
    return parser.parse_args(argv)


@entrypoint
def main(argv=None):
    args = parse_args(argv)
    raw_files = list_raw_files(args.raw)
    parameters = pipeline.asked_parameters(args, "merged")
    inputs = [stage.raw_input(args.raw, [path for files in raw_files.values() for path in files])]

    with stage.publish(args.data, "merged", parameters, inputs) as run, cluster.connect(args) as client:
        accounting, impression_days, extra_fields = merge_and_clean(
            client, raw_files, run.path, args.test_days, args.val_days, args.train_days)
        for source, fields in extra_fields.items():
            if fields:
                print(f"ignored unknown fields of {source}: {', '.join(fields)}")
        run.accounting = accounting
        run.extra["impression_days"] = impression_days

    summary.print_summary(run.published)
    print(f"rows set aside are in {Path(args.data) / 'merged' / '_quarantine'}/")


if __name__ == "__main__":
    main()
