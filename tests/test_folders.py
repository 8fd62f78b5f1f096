"""What the project may replace or delete, staging markers, and the locks on folders in use."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from recpipe import folders
from recpipe.cli import UserError


def test_folders_refuse_unless_ours_allows_missing_empty_and_proven_folders_only(tmp_path):
    def never_ours(folder):
        return "it is someone else's"

    folders.refuse_unless_ours(tmp_path / "missing", never_ours, "replace", "fix")
    (tmp_path / "empty").mkdir()
    folders.refuse_unless_ours(tmp_path / "empty", never_ours, "replace", "fix")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("")
    folders.refuse_unless_ours(tmp_path / "full", lambda folder: None, "replace", "fix")
    with pytest.raises(UserError, match=rf"refusing to replace {tmp_path / 'full'}/: it is someone else's, so"):
        folders.refuse_unless_ours(tmp_path / "full", never_ours, "replace", "fix")
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    with pytest.raises(UserError, match="it is a symbolic link"):
        folders.refuse_unless_ours(tmp_path / "link", lambda folder: None, "delete", "fix")


def test_folders_unexpected_entries_names_files_folders_and_links_outside_the_list(tmp_path):
    (tmp_path / "table" / "dt=1").mkdir(parents=True)
    (tmp_path / "table" / "dt=1" / "part.parquet").write_text("")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("")
    (tmp_path / "link.parquet").symlink_to(tmp_path / "table" / "dt=1" / "part.parquet")
    assert folders.unexpected_entries(tmp_path, {"table/dt=1/part.parquet", "link.parquet"}) == ["link.parquet",
                                                                                               "notes"]


def test_folders_make_parents_never_makes_a_staging_folder_that_is_gone(tmp_path):
    staging = folders.make_staging(tmp_path / "merged")
    folders.make_parents(staging / "actions" / "bucket=1" / "part.parquet")
    assert (staging / "actions" / "bucket=1").is_dir()
    folders.discard(staging)
    assert not staging.exists()
    with pytest.raises(FileNotFoundError, match="staging folder is gone"):
        folders.make_parents(staging / "actions" / "part.parquet")
    assert not staging.exists()


def test_folders_discard_keeps_the_marker_over_what_it_could_not_remove(tmp_path, monkeypatch):
    staging = folders.make_staging(tmp_path / "merged")
    (staging / "actions").mkdir()
    monkeypatch.setattr(folders.shutil, "rmtree", lambda path, ignore_errors: None)  # a late task's file stays
    folders.discard(staging)
    assert sorted(entry.name for entry in staging.iterdir()) == [folders.MARKER, "actions"]
    assert folders.owner(staging) == (os.uname().nodename, os.getpid())


@pytest.mark.processes
def test_folders_a_reader_keeps_a_replacer_out_and_is_named(tmp_path):
    """The lock is held by another process (a reader), as a running stage or train.py holds it."""
    target = tmp_path / "merged"
    target.mkdir()
    hold = ("import sys, time; from pathlib import Path; from recpipe import folders\n"
            "with folders.reading(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)")
    reader = subprocess.Popen([sys.executable, "-c", hold, str(target)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline() == "held\n"
        with pytest.raises(UserError) as refused, folders.claiming(target, lambda folder: None, "delete", "fix"):
            pass
        assert str(refused.value) == (f"cannot delete {target}/ now: python (pid {reader.pid}) is reading it; wait "
                                      "until that finishes (or stop it), then run this again")
        with folders.reading(target):  # readers share
            pass
    finally:
        reader.kill()
        reader.wait()
    with folders.claiming(target, lambda folder: None, "delete", "fix"):
        assert folders.lock_path(target).exists()
    assert not folders.lock_path(target).exists()  # the last holder removes the lock file
