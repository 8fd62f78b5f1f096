"""docs/data.md names every column a stage writes, and nothing in the project points outside it."""

import re
import subprocess
from pathlib import Path

from recpipe import preprocess, raw, schemas

ROOT = Path(__file__).resolve().parent.parent
DATA_DOC = ROOT / "docs" / "data.md"
TEXT_SUFFIXES = (".py", ".md", ".sh", ".txt", ".toml", ".cfg")
# What a pointer to a document outside the repository looks like: the working contract the project was
# built to, and the issues it was built from. The project's own contract is docs/data.md.
OUTSIDE_POINTERS = re.compile(r"shared/|\bSPEC\b|(?i:\bthe issue\b)")


def _doc():
    return DATA_DOC.read_text(encoding="utf-8")


def _missing_columns(names):
    text = _doc()
    return sorted({name for name in names if f"`{name}`" not in text})


def _project_text_files():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    paths = [Path(name) for name in listed.decode("utf-8").split("\0") if name]
    return [path for path in paths
            if (path.suffix in TEXT_SUFFIXES or path.name == "Makefile")
            and path.as_posix() != "tests/test_docs.py" and (ROOT / path).is_file()]


def test_data_doc_has_every_section():
    headings = set(re.findall(r"^## (.+)$", _doc(), flags=re.MULTILINE))
    assert {"Raw input", "Cleaning", "The split", "The action stream and histories", "Features", "Tables",
            "Layouts", "Training input"} <= headings


def test_data_doc_names_raw_fields():
    assert _missing_columns(name for fields in raw.FIELDS.values() for name in fields) == []


def test_data_doc_names_merged_columns():
    names = [*schemas.IMPRESSIONS.names, *schemas.ACTIONS.names, *schemas.QUARANTINE.names]
    assert _missing_columns(names) == []


def test_data_doc_names_cleaned_columns():
    assert _missing_columns(schemas.CLEANED_IMPRESSIONS.names) == []


def test_data_doc_names_example_columns_of_every_layout():
    names = [name for layout in ("timeline", "compact", "wide") for name in preprocess.examples_schema(layout).names]
    assert _missing_columns(names) == []


def test_data_doc_names_wide_history_columns():
    assert _missing_columns(preprocess.wide_schema(preprocess.examples_schema("wide"), 4).names) == []


def test_data_doc_names_histories_and_timelines_columns():
    assert _missing_columns([*preprocess.HISTORIES_SCHEMA.names, *preprocess.TIMELINES_SCHEMA.names]) == []


def test_project_files_point_to_no_outside_document():
    found = []
    for path in _project_text_files():
        for number, line in enumerate((ROOT / path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE_POINTERS.search(line):
                found.append(f"{path}:{number}: {line.strip()}")
    assert found == []
