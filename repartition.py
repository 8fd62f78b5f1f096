"""Stage 2: rewrite merged/ bucketed by customer, with row groups near --row-group-mb.

    python repartition.py --data data --buckets 16 --row-group-mb 64

Reads   --data/merged/ (from merge_and_clean.py)
Writes  --data/repartitioned/ (default data/repartitioned), atomically, with _stage.json:
          actions/bucket=NNNNN/      sorted by customer_id, occurred_at
          impressions/bucket=NNNNN/  sorted by dt, customer_id, ranking_id, position
A customer's bucket is splitmix64(customer_id) % --buckets: the same on every run and machine.
"""

import argparse

from recpipe import cluster, pipeline, stage, summary
from recpipe.cli import entrypoint
from recpipe.repartition import BUCKET_HASH, repartition


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data", help="folder holding the stage folders")
    pipeline.add_parameters(parser, "repartitioned")
    cluster.add_arguments(parser)
    return parser.parse_args(argv)


@entrypoint
def main(argv=None):
    args = parse_args(argv)
    parameters = {**pipeline.asked_parameters(args, "repartitioned"), "bucket_hash": BUCKET_HASH}

    with stage.reading(args.data, "merged") as merged, \
            stage.publish(args.data, "repartitioned", parameters, [merged.entry()]) as run, \
            cluster.connect(args) as client:
        run.accounting, group_sizes = repartition(client, merged.path, run.path, args.buckets, args.row_group_mb)
        run.extra["row_group_mib_in_memory"] = {table: stage.size_stats(sizes)
                                                for table, sizes in group_sizes.items() if sizes}

    summary.print_summary(run.published)


if __name__ == "__main__":
    main()
