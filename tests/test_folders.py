"""What the project may replace or delete, staging markers, and the locks on folders in use."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, listing, one_line, run_in_process, temporary_folder
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


def clean_leftovers(data, tmp_path):
    return run_in_process("pipeline.py", "clean", "leftovers", "--data", data, "--raw", tmp_path / "raw",
                          "--preprocessors", tmp_path / "preprocessors", check=False)


def test_folders_a_lock_file_a_killed_command_left_is_free_and_clean_leftovers_removes_it(tmp_path):
    """A SIGKILLed command leaves its `.<stage>.lock` (the kernel drops the flock, not the file): the next command
    takes it as free, and `clean leftovers` removes it; a lock file a process holds is left alone."""
    data = tmp_path / "data"
    (data / "merged").mkdir(parents=True)
    (data / "cleaned").mkdir()
    stale = folders.lock_path(data / "merged")
    stale.write_text("")  # what a killed holder leaves: a file that no process has an flock on
    with folders.reading(data / "merged"):  # free to take, and its last holder removes it
        pass
    assert not stale.exists()
    stale.write_text("")
    assert [(found.path, found.abandoned, found.what) for found in folders.leftovers(data, "merged")] == [
        (stale, True, folders.LOCK_FILE)]
    before = listing(tmp_path)
    with folders.reading(data / "cleaned"):  # held meanwhile, by this process: not a leftover
        held = folders.lock_path(data / "cleaned")
        assert folders.leftovers(data, "cleaned") == []
        result = clean_leftovers(data, tmp_path)
        assert held.exists()
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"deleted {stale}")
    assert listing(tmp_path) == {name: size for name, size in before.items() if name != "data/.merged.lock"}


def test_folders_a_staging_folder_whose_pid_was_reused_is_a_leftover(tmp_path):
    """The marker records when its process started: a live process with the same pid that started at another
    time was given the pid after the run that made the folder ended (here: this test's parent, a live pid)."""
    data = tmp_path / "data"
    data.mkdir()
    reused, running = (temporary_folder(data, name, pid=os.getppid()) for name in ("merged", "cleaned"))
    for folder, started in ((reused, "another-boot:12345"), (running, folders.process_started(os.getppid()))):
        marker = json.loads((folder / folders.MARKER).read_text())
        (folder / folders.MARKER).write_text(json.dumps({**marker, "started": started}))
    assert [found.abandoned for found in folders.leftovers(data, "merged")] == [True]
    assert [found.abandoned for found in folders.leftovers(data, "cleaned")] == [False]
    before = listing(tmp_path)
    result = clean_leftovers(data, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"deleted {reused}/, left by a killed run"
    assert listing(tmp_path) == {name: size for name, size in before.items() if not name.startswith(
        f"data/{reused.name}")}


def test_folders_clean_leftovers_that_could_not_delete_says_so(tmp_path, monkeypatch):
    """A leftover that stays after the tries (here: rmtree removes nothing, as for a folder this user may not empty)
    is not reported deleted: one line, exit 74."""
    data = tmp_path / "data"
    data.mkdir()
    dead = temporary_folder(data, "merged")
    monkeypatch.setattr(folders.shutil, "rmtree", lambda path, ignore_errors: None)
    monkeypatch.setattr(folders.time, "sleep", lambda seconds: None)
    before = listing(tmp_path)
    result = clean_leftovers(data, tmp_path)
    assert result.returncode == 74, result.stdout + result.stderr
    assert one_line(result.stderr) == (
        f"error: could not delete {dead}/: files were still being written into it (actions/part.parquet stayed, under its "
        f"{folders.MARKER} marker); delete it yourself, or fix what keeps it, then run this again")
    assert "deleted" not in result.stdout
    assert listing(tmp_path) == before
