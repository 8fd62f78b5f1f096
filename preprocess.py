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

from recpipe import cluster, encoders, pipeline, stage
from recpipe.cli import OutputError, entrypoint
from recpipe.preprocess import preprocess


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data", help="folder holding the stage folders")
    parser.add_argument("--preprocessors", default="preprocessors", help="where the fitted encoders and scaler go")
    pipeline.add_parameters(parser, "processed")
    cluster.add_arguments(parser)
    return parser.parse_args(argv)


@entrypoint
def main(argv=None):
    args = parse_args(argv)
    stage.require_stage(args.data, "cleaned")
    parameters = pipeline.asked_parameters(args, "processed")
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
    try:
        shutil.copytree(Path(args.data) / "processed" / "_preprocessors", staging)
        stage.replace_dir(staging, target)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputError(
            f"{args.data}/processed/ was published, but {target}/ could not be replaced ({error}); train.py "
            f"refuses the old one. Copy {args.data}/processed/_preprocessors/ to {target}/, or make room and run "
            "`python pipeline.py run --from processed`") from None
    stage.print_summary(run.published)
    print(f"rows per split: {rows_per_split}; encoders and scaler fitted on {fit_record['sample_rows']:,} "
          f"sampled train rows, saved in {target}/")


if __name__ == "__main__":
    main()
