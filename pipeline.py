"""The pipeline as a whole: what state each stage is in, re-running what is out of date, reclaiming space.

    python pipeline.py status                      # each stage: complete / stale / missing, rows, size, when
    python pipeline.py status --verify             # ... and every file's content, and the raw files' (hashed)
    python pipeline.py run                         # run the stages in order, skipping complete ones
    python pipeline.py run --from repartitioned    # re-run one stage (after a fix), then whatever that makes stale
    python pipeline.py clean merged                # delete an intermediate folder no later stage still needs
    python pipeline.py clean leftovers             # delete temporary folders left by killed runs
    python pipeline.py profile                     # profile.json and profile.png of processed/, beside it

Reads   --data (default data): merged/, repartitioned/, cleaned/, processed/ and their _stage.json;
        --raw (default raw/ under --data), to tell whether the raw files changed;
        --preprocessors (default preprocessors)
Writes  `run`: what the stage scripts write (each stage run in this process, on one LocalCluster that `run`
        starts, or --scheduler's cluster); `clean`: deletes one folder; `profile`: --data/profile.json and
        --data/profile.png (replacing only a profile it wrote).
Stage parameters (--buckets, --max-history, ...) are the stage scripts' flags. Given, a stage made with other
values is stale and `run` remakes it with them; not given, a stage keeps what it was made with.
Raw files are judged changed by their names, sizes and modification times; `status --verify` hashes them.
"""

import argparse
import contextlib
import sys
import traceback

from recpipe import cli, cluster, data_profile, pipeline, preprocess, stage, stages, storage
from recpipe.cli import OutputError, UserError, entrypoint


def parse_args(argv=None):
    places = argparse.ArgumentParser(add_help=False)  # `clean` takes these alone: it uses no stage parameter
    for folder in stages.FOLDERS:
        folder.add_to(places)
    common = argparse.ArgumentParser(add_help=False, parents=[places])
    for definition in stages.STAGES:
        definition.add_parameters(common, defaults=False)
    computing = argparse.ArgumentParser(add_help=False)  # only `run` starts or joins a cluster
    cluster.add_arguments(computing)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{status,run,clean,profile}")
    status = commands.add_parser("status", parents=[common], help="the state of every stage, and what may be deleted")
    status.add_argument("--verify", action="store_true",
                        help="also hash every file of every stage and compare with its manifest's output_sha256, "
                             "and the raw files (local ones) with the hashes merge_and_clean.py recorded; it reads "
                             "all of them and says how many. Without it, stage files are checked by names, sizes and "
                             "row counts, and raw files by names, sizes and modification times, which a file put back "
                             "with the same three does not change")
    stages.add_storage_options(status, workers=False)
    run = commands.add_parser("run", parents=[common, computing],
                              help="run the stages that are missing or stale, in order")
    run.add_argument("--from", dest="start", choices=stages.NAMES, default=None,
                     help="run this stage even if complete, then every later stage that is then not complete")
    stages.add_storage_options(run)
    profile = commands.add_parser("profile", help="examples, label rate, history lengths, unknown items, user "
                                  "agents and rows set aside, in --data/profile.json and profile.png")
    stages.DATA.add_to(profile)  # it reads processed/ and merged/'s manifest, nothing else
    stages.add_storage_options(profile, workers=False)
    clean = commands.add_parser("clean", parents=[places], help="delete an intermediate stage folder")
    clean.add_argument("target", choices=[*stages.NAMES[:-1], "leftovers"], metavar="STAGE",
                       help=f"one of {', '.join(stages.NAMES[:-1])}, or leftovers (temporary folders of killed runs)")
    stages.add_storage_options(clean, workers=False)
    args = parser.parse_args(argv)
    storage.local_folders(args, [folder.name for folder in stages.FOLDERS],
                      [folder.name for folder in stages.FOLDERS if folder.urls])
    return args


def inspect(args):
    asked = ({definition.name: definition.asked(args) for definition in stages.STAGES}
             if args.command in ("status", "run") else {})  # `clean` takes no stage parameters
    return pipeline.inspect(args.data, args.raw, asked, verify=getattr(args, "verify", False),
                            making=args.command == "run")


def print_status(args):
    """Print the status report; (the states, whether train.py can run on processed/)."""
    states = inspect(args)
    preprocessors, trainable = pipeline.preprocessors_state(states, args.preprocessors)
    print(f"pipeline in {args.data}/ (raw files: {args.raw}/)")
    print(pipeline.format_status(states, pipeline.all_leftovers(args.data, args.preprocessors), preprocessors),
          flush=True)
    if getattr(args, "verify", False):
        print(pipeline.verified_line(states, args.raw), flush=True)
    return states, (preprocessors if not trainable else None)


def stage_arguments(args, states, name):
    """What one stage runs with: the pipeline's folders and cluster, and its parameters (pipeline.parameters_to_run)."""
    asked = stages.BY_NAME[name].asked(args)
    return argparse.Namespace(**{**vars(args), **pipeline.parameters_to_run(states, name, asked)})


def run_stage(name, args):
    """Run a stage in this process, as its script would; its exit status.

    Not a child process: each one spent 1.5-2 s importing pandas, PyArrow and distributed,
    a sixth of a whole run at 2.5M actions. The stage's errors still end in its own one
    line and exit status; Ctrl-C and SIGTERM unwind through its `finally`, which removes
    its staging folder, and then stop the pipeline.
    """
    try:
        stages.BY_NAME[name].run(args)
    except Exception as error:
        failed = cli.failure(error)
        if failed is None:  # a bug in the stage: its traceback, then the pipeline's line on which stage failed
            traceback.print_exc()
            return 1
        status, message = failed
        cli.print_error(message)
        return status
    return 0


@contextlib.contextmanager
def shared_cluster(args):
    """One LocalCluster for every stage this run runs, unless --scheduler names a cluster already.

    Each stage joins it as --scheduler instead of starting its own: a cluster
    start costs about 5 s a stage on 2 cores, and one dashboard then shows the whole run.
    """
    if args.scheduler:
        yield args.scheduler
        return
    with cluster.connect(args) as client:
        yield client.scheduler.address


def run(args):
    forced = args.start
    ran = set()
    to_run = pipeline.stages_to_run(inspect(args), forced)
    if not storage.is_url(args.data) and not storage.path(args.data).exists():  # a typo would go unseen until done
        print(f"{args.data}/ does not exist: making a new pipeline there", flush=True)
    if "merged" in to_run:  # say at once, before a cluster starts, when merge_and_clean.py cannot read them
        problem = pipeline.raw_fingerprint(args.raw)[1]
        if problem:
            raise UserError(f"{problem} (merge_and_clean.py needs them: merged/ is to be made)")
    if "processed" in to_run:  # before the stages that come first, not after them
        preprocess.refuse_others_preprocessors(storage.path(args.preprocessors),
                                               preprocess.processed_location(args.data))
    if to_run:
        try:
            with shared_cluster(args) as address:
                run_stages(argparse.Namespace(**{**vars(args), "scheduler": address}), forced, ran)
        except BaseException:
            # A task still running when its stage was stopped can write on into the staging folder
            # the stage has just removed; with our LocalCluster closed now, nothing can. (An external
            # cluster's workers still may; the next run removes what they leave.)
            with contextlib.suppress(OutputError):  # what stopped the run is the error to show
                pipeline.remove_leftovers(args.data, args.preprocessors)
            raise
    skipped = [name for name in stages.NAMES if name not in ran]
    print(f"\n=== ran {', '.join(ran_name + '/' for ran_name in stages.NAMES if ran_name in ran) or 'nothing'}"
          f"; up to date or not needed: {', '.join(name + '/' for name in skipped) or 'none'}\n")
    states, untrainable = print_status(args)
    refuse_damaged(states)
    if untrainable:  # every stage it must run ran, and still train.py would refuse what the run leaves
        raise UserError(untrainable)


def refuse_damaged(states):
    """The report is above; the exit status and one line tell a script or a person at once."""
    damaged = [state for state in states if state.state == "damaged"]
    if damaged:
        others = f" (and {len(damaged) - 1} more damaged stage folders, above)" if len(damaged) > 1 else ""
        raise UserError(damaged[0].reasons[0] + others)


def run_stages(args, forced, ran):
    """Run the first stage that must run, judge again, and so on until none must; `ran` collects them."""
    while True:
        states = inspect(args)
        to_run = pipeline.stages_to_run(states, forced)
        if not to_run:
            break
        name = to_run[0]
        if name in ran:
            state = states[stages.NAMES.index(name)]
            raise RuntimeError(f"{name}/ is still {state.state} after running {state.script} "
                               f"({' '.join(state.reasons)}): this is a bug")
        state = states[stages.NAMES.index(name)]
        why = "asked with --from" if name == forced else f"{state.state}" + (
            f": {' '.join(state.reasons).removesuffix('.')}" if state.reasons else "")
        print(f"\n=== {name}/ ({why}): python {state.script}", flush=True)
        status = run_stage(name, stage_arguments(args, states, name))
        if status != 0:
            print(f"error: {state.script} failed (exit status {status}); the stages after it were not run. "
                  "Fix what it says, then `python pipeline.py run` again", file=sys.stderr)
            raise SystemExit(status)
        ran.add(name)
        forced = None if name == forced else forced


@entrypoint
def main(argv=None):
    args = parse_args(argv)
    storage.configure(storage.urls(args), args.storage_options)
    if args.command == "profile":
        profiled = data_profile.profile(args.data)
        written = data_profile.write(args.data, profiled)
        print(data_profile.summary(profiled))
        print(f"wrote {written[0]} and {written[1]}")
        return
    if args.command == "status":
        refuse_damaged(print_status(args)[0])
    elif args.command == "run":
        run(args)
    elif args.target == "leftovers":
        stage.require_data(args.data)
        removed = pipeline.remove_leftovers(args.data, args.preprocessors)
        print("\n".join(f"deleted {path}{'' if path.name.endswith('.lock') else '/'}, left by a killed run"
                        for path in removed) or "no leftovers to delete")
    else:
        freed = pipeline.remove(inspect(args), args.target)
        print(f"deleted {storage.path(args.data) / args.target}/, gave back {pipeline.mib(freed)}")
        print_status(args)


if __name__ == "__main__":
    main()
