"""Stage 2: rewrite merged/ bucketed by customer, with row groups near --row-group-mb.

    python repartition.py --data data --buckets 16 --row-group-mb 64

Reads   --data/merged/ (from merge_and_clean.py)
Writes  --data/repartitioned/ (default data/repartitioned), atomically, with _stage.json:
          actions/bucket=NNNNN/      sorted by customer_id, occurred_at
          impressions/bucket=NNNNN/  sorted by dt, customer_id, ranking_id, position
A customer's bucket is splitmix64(customer_id) % --buckets: the same on every run and machine.
"""

from recpipe import repartition, stages
from recpipe.cli import entrypoint


@entrypoint
def main(argv=None):
    args = stages.BY_NAME["repartitioned"].parse_args(argv, __doc__)
    repartition.run_stage(args)


if __name__ == "__main__":
    main()
