"""Stage 3: parse every impression's user agent into browser, OS and device columns; write cleaned/.

    python parse_ua_strings.py --data data

Reads   --data/repartitioned/ (from repartition.py): impressions/bucket=NNNNN/, actions/
Writes  --data/cleaned/ (default data/cleaned), atomically, with _stage.json:
          impressions/bucket=NNNNN/  the same rows in the same order, plus browser_family, browser_major,
                                     os_family, os_major, device_family, device_brand, device_model, is_bot
          actions/                   copied unchanged, at the same paths
Each distinct user agent of a bucket is parsed once, with ua-parser's native resolver.
"""

import argparse

from recpipe import cluster, stage, summary, user_agents
from recpipe.cli import entrypoint


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data", help="folder holding the stage folders")
    cluster.add_arguments(parser)
    return parser.parse_args(argv)


@entrypoint
def main(argv=None):
    args = parse_args(argv)
    user_agents.require_native_resolver()

    with stage.reading(args.data, "repartitioned") as repartitioned:
        manifest = repartitioned.manifest
        # Row groups as repartition.py sized them, so that readers of cleaned/ get the same bound.
        row_group_mb = manifest["parameters"].get("row_group_mb", 64)
        parameters = {"row_group_mb": row_group_mb, **user_agents.parser_version()}
        expected_rows = {table: described["rows"] for table, described in manifest["tables"].items()}
        with stage.publish(args.data, "cleaned", parameters, [repartitioned.entry()]) as run, \
                cluster.connect(args) as client:
            run.accounting, parsed, group_sizes = user_agents.parse_ua_strings(
                client, repartitioned.path, run.path, row_group_mb, expected_rows)
            run.extra["user_agents"] = parsed
            if group_sizes:
                run.extra["row_group_mib_in_memory"] = {"impressions": stage.size_stats(group_sizes)}
            rate = f"{parsed['parsed_per_second']:,}/s per core" if parsed["parsed_per_second"] else "-"
            print(f"user agents: {parsed['distinct']:,} distinct strings parsed (once per bucket, "
                  f"{parsed['buckets']} buckets; {rate}); {parsed['bots']:,} rows flagged as bots, "
                  f"{parsed['missing']:,} rows without a user agent")

    summary.print_summary(run.published)


if __name__ == "__main__":
    main()
