"""Stage 1: read every raw source, clean it by the rules of docs/data.md, write merged/.

    python merge_and_clean.py --data data                  # reads data/raw
    python merge_and_clean.py --data data --raw /logs/raw  # raw files elsewhere

Reads   --raw (default raw/ under --data: data/raw): the files directly in impressions/, clicks/, add_to_carts/,
        previous_orders/, in JSON Lines, CSV or Parquet, optionally gzipped.
Writes  --data/merged/ (default data/merged), atomically, with _stage.json:
          impressions/  one row per shown item, with position and split
          actions/      the canonical action stream (customer_id, item_id, action_type, occurred_at)
          _quarantine/<source>/  rows set aside, with source_file, row, reason, raw
"""

from recpipe import merge, stages
from recpipe.cli import entrypoint


@entrypoint
def main(argv=None):
    args = stages.BY_NAME["merged"].parse_args(argv, __doc__)
    merge.run_stage(args)


if __name__ == "__main__":
    main()
