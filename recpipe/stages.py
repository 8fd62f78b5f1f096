"""The pipeline's stages, each declared once: its folder, script, inputs, flags, and what runs it.

A stage script (`merge_and_clean.py`, ...) and `pipeline.py` both read their flags from here,
and both run a stage the same way: `Stage.run(args)`, which calls `run_stage(args)` of the
stage's module in this package (its publishing, on the cluster that `args` names).

Adding a stage is one entry in STAGES, in the order the stages run, one module holding its
`run_stage`, and a thin script that parses its flags and calls it.
"""

import argparse
import dataclasses
import importlib
import math
import posixpath

from recpipe import cli, storage


@dataclasses.dataclass(frozen=True)
class Parameter:
    """A flag of a stage that decides its output, and so is recorded in its manifest.

    Its range is declared here once: `parse` holds a flag's text to it, `check` a value from
    anywhere else (a manifest's parameters), so that no stage ever runs on a value outside it.
    """

    name: str
    type: type
    default: object
    help: str
    low: float = None      # smallest allowed
    above: float = None    # exclusive lower bound
    high: float = None     # largest allowed
    choices: tuple = None
    # default None: the stage derives the value when the flag is not given (these words say from what),
    # and records what it chose in its manifest's parameters
    derived: str = None

    @property
    def flag(self):
        return cli.flag(self.name)

    def check(self, value, given=None):
        """`value` if this parameter allows it (a float as float), else a ValueError saying what it must be;
        `given` is how the value was written, for the message (default: the value itself).

        A float must be finite: NaN fails every comparison with a bound, so it would pass them all.
        """
        if value is None and self.derived:
            return None  # to be derived by the stage
        given = value if given is None else given
        if self.choices is not None:
            if not (isinstance(value, str) and value in self.choices):
                raise ValueError(f"must be one of {', '.join(self.choices)}, got {given!r}")
            return value
        if self.type is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"must be an integer, got {given!r}")
        if self.type is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"must be a number, got {given!r}")
            if not math.isfinite(value):
                raise ValueError(f"must be a finite number, got {given}")
            value = float(value)
        for bound, broken, words in ((self.low, lambda b: value < b, "at least"),
                                     (self.above, lambda b: value <= b, "more than"),
                                     (self.high, lambda b: value > b, "at most")):
            if bound is not None and broken(bound):
                raise ValueError(f"must be {words} {bound}, got {given}")
        return value

    def parse(self, text):
        """A flag's text as its value, or argparse's error saying why not."""
        try:
            value = self.type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if self.type is int else ' number'}") \
                from None
        try:
            return self.check(value, given=text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None


@dataclasses.dataclass(frozen=True)
class Folder:
    """A folder flag: --data, which every stage takes, or one that a stage reads or writes beyond it."""

    name: str
    default: str
    help: str
    urls: bool = False  # may be a URL of object storage (recpipe/storage.py)
    under_data: str = None  # its default is this folder under --data, whatever --data is

    def add_to(self, parser):
        if self.name == "data":
            parser.add_argument(cli.flag(self.name), default=self.default, action=_DataFolder,
                                help=f"{self.help} (default: {self.default})")
        elif self.under_data:
            parser.add_argument(cli.flag(self.name), default=_Default(self.default),
                                help=f"{self.help} (default: {self.under_data}/ under --data: {self.default})")
        else:
            parser.add_argument(cli.flag(self.name), default=self.default,
                                help=f"{self.help} (default: {self.default})")


class _Default(str):
    """A folder flag's default, told apart from the same text given on the command line."""


class _DataFolder(argparse.Action):
    """--data, which moves the defaults of the folders under it along: `--data other` reads other/raw, not the
    raw files of ./data (whose stages would then be made from another pipeline's raw files)."""

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, value)
        for folder in FOLDERS:
            if folder.under_data and isinstance(getattr(namespace, folder.name, None), _Default):
                setattr(namespace, folder.name, _Default(posixpath.join(value, folder.under_data)))  # URLs too


DATA = Folder("data", "data", "folder holding the stage folders, or its URL (s3://bucket/data)", urls=True)
RAW = Folder("raw", "data/raw", "folder with one sub-folder per raw source, or its URL (s3://bucket/raw)", urls=True,
             under_data="raw")
PREPROCESSORS = Folder("preprocessors", "preprocessors", "where the fitted encoders and scaler go, a folder or its URL",
                       urls=True)


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str                # its folder under --data
    script: str              # the script that runs it alone
    module: str              # recpipe.<module>.run_stage(args) runs it
    reads: str               # the stage folder it is made from; None: the raw files
    folders: tuple = ()      # folder flags beyond --data
    parameters: tuple = ()   # flags that decide its output

    def parameter(self, name):
        """The declaration of one of its parameters."""
        return next(parameter for parameter in self.parameters if parameter.name == name)

    def add_parameters(self, parser, defaults=True):
        """Add the parameter flags to a parser, as a group titled by the script.

        defaults=False leaves a flag that is not given as None: pipeline.py then compares
        and changes only what was asked, and otherwise keeps what a stage was made with.
        """
        group = parser.add_argument_group(f"{self.script} parameters")
        for parameter in self.parameters:
            kind = str if parameter.choices else parameter.parse
            default = parameter.derived or f"{parameter.default}"
            if not defaults:
                default = f"what the stage was made with, else {default}"
            group.add_argument(parameter.flag, type=kind, default=parameter.default if defaults else None,
                               choices=parameter.choices, help=f"{parameter.help} (default: {default})")

    def parse_args(self, argv, description):
        """The script's flags: its folders, its parameters and the cluster's."""
        from recpipe import cluster  # here: it imports Dask, and train.py reads these declarations without it

        folders = (DATA, *self.folders)
        parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
        for folder in folders:
            folder.add_to(parser)
        if any(folder.urls for folder in folders):
            add_storage_options(parser)
        self.add_parameters(parser)
        cluster.add_arguments(parser)
        args = parser.parse_args(argv)
        storage.local_folders(args, [folder.name for folder in folders], [folder.name for folder in folders if folder.urls])
        storage.configure(storage.urls(args), getattr(args, "storage_options", None))
        return args

    def asked(self, args):
        """The parameters that were given (all of them in the stage's script, which has defaults)."""
        return {parameter.name: getattr(args, parameter.name) for parameter in self.parameters
                if getattr(args, parameter.name) is not None}

    def run(self, args):
        """Run the stage as its script would, on the cluster `args` names (or a LocalCluster it starts).

        The module is imported here, not above: it imports this one for its declaration.
        """
        importlib.import_module(f"recpipe.{self.module}").run_stage(args)


def add_storage_options(parser, workers=True):
    """--storage-options; `workers`: whether the command has Dask workers, which it sends the options to."""
    parser.add_argument("--storage-options", type=storage.options_flag, default=None, metavar="JSON",
                        help="options of the object storage library for a URL given as a folder, e.g. "
                             "'{\"endpoint_url\": \"https://s3.example.com\"}' (default: what the environment and "
                             "the library's config files give); " + ("sent to every worker, " if workers else "")
                             + "recorded nowhere")


# Ranges beyond which a value means nothing more, or breaks what it feeds.
DAYS = 3_652_425  # 10,000 years: every span of dates the cleaning keeps (years 1 ... 9999) is shorter
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1

STAGES = (
    Stage("merged", "merge_and_clean.py", "merge", reads=None, folders=(RAW,), parameters=(
        Parameter("test_days", int, 1, "latest impression days labelled test", low=0, high=DAYS),
        Parameter("val_days", int, 1, "days before those labelled val", low=0, high=DAYS),
        Parameter("train_days", int, 14, "days before those labelled train", low=0, high=DAYS),
    )),
    Stage("repartitioned", "repartition.py", "repartition", reads="merged", parameters=(
        Parameter("buckets", int, None, "customer buckets; one bucket must fit a worker many times over", low=1,
                  high=99999,  # bucket=NNNNN: five digits
                  derived="derived from merged/'s size in memory and the workers' memory per thread, at least a "
                          "few per thread; the summary says the number and why"),
        # A reader holds a row group whole: one of a TiB fits no worker, and a size near 2^63 bytes overflows
        # the row count it becomes.
        Parameter("row_group_mb", float, 64.0, "target uncompressed (in-memory) row group size, in MiB", above=0,
                  high=2**20),
    )),
    Stage("cleaned", "parse_ua_strings.py", "user_agents", reads="repartitioned"),
    Stage("processed", "preprocess.py", "preprocess", reads="cleaned", folders=(PREPROCESSORS,), parameters=(
        Parameter("lookback_days", int, 365, "history window before the impression day", low=1, high=DAYS),
        # A history's length is an Arrow list length (int32), in every layout.
        Parameter("max_history", int, 1000, "most recent actions kept per history", low=1, high=2**31 - 1),
        Parameter("sample_frac", float, 0.2, "share of train examples to fit on, in (0, 1]", above=0, high=1),
        Parameter("min_frequency", int, 3, "rarer values encode as unknown (1)", low=1, high=INT64_MAX),  # counts: int64
        Parameter("seed", int, 0, "seed of the fitting sample", low=0, high=UINT64_MAX),  # a uint64 in in_sample
        Parameter("layout", str, "timeline", "timeline (each customer's actions once), compact (a history per "
                  "customer and day) or wide (padded histories per example)", choices=("timeline", "compact", "wide")),
    )),
)
BY_NAME = {stage.name: stage for stage in STAGES}
NAMES = tuple(BY_NAME)  # in the order they run
FINAL = NAMES[-1]
FOLDERS = tuple({folder.name: folder for stage in STAGES for folder in (DATA, *stage.folders)}.values())


def script(name, otherwise):
    """The script that makes stage folder `name`, or `otherwise` for a folder no stage makes."""
    return BY_NAME[name].script if name in BY_NAME else otherwise
