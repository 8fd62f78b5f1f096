"""Stage 4: fit encoders and scaler on a sample of train, build histories, write processed/.

    python preprocess.py --data data --preprocessors preprocessors

Reads   --data/cleaned/ (from parse_ua_strings.py)
Writes  --preprocessors/ (default preprocessors): encoders.json, scaler.json, fit.json
        --data/processed/ (default data/processed), atomically, with _stage.json:
          compact (default): <split>/examples/dt=YYYY-MM-DD/  and  <split>/histories/dt=YYYY-MM-DD/
          wide (--layout wide): <split>/dt=YYYY-MM-DD/ with fixed-length, 0-padded actions
"""

import argparse
import shutil
from pathlib import Path

from recpipe import cluster, encoders, stage
from recpipe.cli import UserError, entrypoint
from recpipe.preprocess import preprocess


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data", help="folder holding the stage folders")
    parser.add_argument("--preprocessors", default="preprocessors", help="where the fitted encoders and scaler go")
    parser.add_argument("--lookback-days", type=int, default=365, help="history window before the impression day")
    parser.add_argument("--max-history", type=int, default=1000, help="most recent actions kept per history")
    parser.add_argument("--sample-frac", type=float, default=0.2, help="share of train examples to fit on")
    parser.add_argument("--min-frequency", type=int, default=3, help="rarer values encode as unknown (1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fitting sample")
    parser.add_argument("--layout", choices=("compact", "wide"), default="compact")
    cluster.add_arguments(parser)
    args = parser.parse_args()
    for flag, low in (("lookback_days", 1), ("max_history", 1), ("min_frequency", 1)):
        if getattr(args, flag) < low:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least {low}")
    if not 0 < args.sample_frac <= 1:
        raise UserError(f"--sample-frac {args.sample_frac}: must be in (0, 1]")
    return args


@entrypoint
def main():
    args = parse_args()
    stage.require_stage(args.data, "cleaned")
    parameters = {name: getattr(args, name) for name in
                  ("lookback_days", "max_history", "sample_frac", "min_frequency", "seed", "layout")}
    inputs = [stage.stage_input(args.data, "cleaned")]

    with cluster.connect(args) as client, stage.publish(args.data, "processed", parameters, inputs) as run:
        # Fitted into the stage first: processed/ keeps the copy it was made with.
        fitted_dir = run.path / "_preprocessors"
        run.accounting, fit_record, rows_per_split = preprocess(
            client, Path(args.data) / "cleaned", run.path, fitted_dir, parameters)
        run.extra["rows_per_split"] = rows_per_split
        run.extra["sample_rows"] = fit_record["sample_rows"]
        run.extra["preprocessors_sha256"] = encoders.fingerprint(fitted_dir)

    target = Path(args.preprocessors)
    staging = target.with_name(f".{target.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(Path(args.data) / "processed" / "_preprocessors", staging)
    stage.replace_dir(staging, target)
    stage.print_summary(run.published)
    print(f"rows per split: {rows_per_split}; encoders and scaler fitted on {fit_record['sample_rows']:,} "
          f"sampled train rows, saved in {target}/")


if __name__ == "__main__":
    main()
