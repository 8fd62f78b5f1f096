"""Stage 3: parse every impression's user agent into browser, OS and device columns; write cleaned/.

    python parse_ua_strings.py --data data

Reads   --data/repartitioned/ (from repartition.py): impressions/bucket=NNNNN/, actions/
Writes  --data/cleaned/ (default data/cleaned), atomically, with _stage.json:
          impressions/bucket=NNNNN/  the same rows in the same order, plus browser_family, browser_major,
                                     os_family, os_major, device_family, device_brand, device_model, is_bot
          actions/                   copied unchanged, at the same paths
Each distinct user agent of a bucket is parsed once, with ua-parser's native resolver.
"""

from recpipe import user_agents, stages
from recpipe.cli import entrypoint


@entrypoint
def main(argv=None):
    args = stages.BY_NAME["cleaned"].parse_args(argv, __doc__)
    user_agents.run_stage(args)


if __name__ == "__main__":
    main()
