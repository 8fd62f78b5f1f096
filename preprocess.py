"""Stage 4: fit encoders and scaler on a sample of train, build histories, write processed/.

    python preprocess.py --data data --preprocessors preprocessors

Reads   --data/cleaned/ (from parse_ua_strings.py)
Writes  --preprocessors/ (default preprocessors): encoders.json, scaler.json, fit.json; replaced only when
          it is new, empty, or holds nothing but those (else refused, untouched)
        --data/processed/ (default data/processed), atomically, with _stage.json:
          timeline (default): timelines/bucket=NNNNN/ (each customer's actions once) and
                              <split>/examples/dt=YYYY-MM-DD/ (with each example's window into them)
          compact (--layout compact): <split>/examples/dt=YYYY-MM-DD/ and <split>/histories/dt=YYYY-MM-DD/
          wide (--layout wide): <split>/dt=YYYY-MM-DD/ with fixed-length, 0-padded actions
"""

import argparse
import shutil
from pathlib import Path

from recpipe import cluster, encoders, folders, pipeline, stage, summary
from recpipe.cli import OutputError, UserError, entrypoint
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
    parameters = pipeline.asked_parameters(args, "processed")
    target = Path(args.preprocessors)
    for name in pipeline.STAGES:
        if target.resolve().is_relative_to((Path(args.data) / name).resolve()):
            raise UserError(f"--preprocessors {target} lies inside {Path(args.data) / name}/, a stage folder that "
                            "its stage replaces as a whole: choose a folder outside the stage folders")

    with stage.reading(args.data, "cleaned") as cleaned, \
            folders.claiming(target, encoders.not_a_preprocessors_folder, "replace",
                             "point --preprocessors at a new or empty folder, or at one preprocess.py wrote"):
        with stage.publish(args.data, "processed", parameters, [cleaned.entry()]) as run, \
                cluster.connect(args) as client:
            # Fitted into the stage first: processed/ keeps the copy it was made with.
            fitted_dir = run.path / encoders.FITTED
            run.accounting, fit_record, rows_per_split, history_entries = preprocess(
                client, cleaned.path, run.path, fitted_dir, parameters)
            run.extra["rows_per_split"] = rows_per_split
            examples = sum(rows_per_split.values())
            run.extra["history_entries_per_example"] = round(history_entries / examples, 2) if examples else None
            run.extra["sample_rows"] = fit_record["sample_rows"]
            run.extra["preprocessors_sha256"] = encoders.fingerprint(fitted_dir)
        replace_preprocessors(Path(args.data) / "processed" / encoders.FITTED, target, args.data)

    summary.print_summary(run.published)
    print(f"rows per split: {rows_per_split}; encoders and scaler fitted on {fit_record['sample_rows']:,} "
          f"sampled train rows, saved in {target}/")
    print(f"{parameters['layout']} layout: {run.published['history_entries_per_example']} history entries stored per "
          "example")


def replace_preprocessors(fitted_dir, target, data_dir):
    """Copy what processed/ was made with to --preprocessors, through a staging folder beside it."""
    staging = None
    try:
        staging = folders.make_staging(target)
        shutil.copytree(fitted_dir, staging, dirs_exist_ok=True)
        if (Path(target) / encoders.README_FILE).is_file():
            shutil.copy2(Path(target) / encoders.README_FILE, staging / encoders.README_FILE)
        folders.replace(staging, target)
    except OSError as error:
        if staging is not None:
            folders.discard(staging)
        raise OutputError(
            f"{data_dir}/processed/ was published, but {target}/ could not be replaced ({error}); train.py "
            f"refuses the old one. Copy {data_dir}/processed/{encoders.FITTED}/ to {target}/, or make room and run "
            "`python pipeline.py run --from processed`") from None


if __name__ == "__main__":
    main()
