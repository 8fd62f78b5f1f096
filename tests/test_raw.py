"""Reading raw files of every accepted format into rows."""

import gzip
import os
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import listing, one_line, run_main
from recpipe.cli import UserError
from recpipe.raw import (ROW_KEY_BITS, byte_ranges, count_rows, file_format, list_raw_files, list_source_files,
                         read_block, read_blocks, read_files, read_rows, split_row_keys)


def test_raw_file_format_looks_through_gzip():
    assert [file_format(name) for name in ("a.jsonl", "a.json.gz", "a.CSV", "a.parquet.gz", "a.txt")] == [
        ".jsonl", ".jsonl", ".csv", ".parquet", None]


@pytest.mark.parametrize("layout, message", [
    ({}, "clicks/ is missing"),
    ({"clicks/": None}, "clicks/ is empty"),
    ({"clicks/_SUCCESS": ""}, "clicks/ is empty"),
    ({"clicks/c.txt": "x"}, "c.txt: unknown format"),
])
def test_raw_list_source_files_names_an_unusable_source(tmp_path, layout, message):
    for name, text in layout.items():
        path = tmp_path / name
        if text is None:
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    with pytest.raises(UserError, match=message):
        list_source_files(tmp_path, "clicks")


def test_raw_impressions_cannot_be_csv(tmp_path):
    (tmp_path / "impressions").mkdir()
    (tmp_path / "impressions" / "i.csv").write_text("dt\n")
    with pytest.raises(UserError, match="impressions cannot be CSV"):
        list_source_files(tmp_path, "impressions")


def test_raw_json_lines_marks_undecodable_lines_malformed_and_skips_blank_ones(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"dt": "2024-03-01", "customer_id": 1}\n\n[1, 2]\n{"dt": "\xff"}\n{"x": 1}\n'))
    frame = read_rows(path, "clicks").frame
    assert frame.row.tolist() == [1, 3, 4, 5]
    assert frame.malformed.tolist() == [False, True, True, False]
    assert frame.customer_id.tolist()[0] == 1
    assert read_rows(path, "clicks").extra_fields == {"x"}


def test_raw_csv_numbers_rows_and_keeps_the_malformed_line(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("dt,customer_id,config_id,occur_at,extra\n2024-03-01,1,2,2024-03-01,e\n1,2\n2024-03-01,3,4,,e\n")
    rows = read_rows(path, "add_to_carts")
    assert rows.frame[["row", "malformed"]].to_dict("records") == [
        {"row": 1, "malformed": False}, {"row": 2, "malformed": True}, {"row": 3, "malformed": False}]
    assert rows.frame.raw[1] == "1,2"
    assert rows.frame.simple_id.tolist() == [None, None, None]  # absent column
    assert rows.frame.occur_at.tolist()[2] == ""
    assert rows.extra_fields == {"extra"}


@pytest.mark.parametrize("text", ["", "dt,customer_id,config_id,simple_id,occur_at\n"])
def test_raw_empty_or_header_only_csv_has_no_rows(tmp_path, text):
    path = tmp_path / "a.csv"
    path.write_text(text)
    assert len(read_rows(path, "add_to_carts").frame) == 0


def test_raw_parquet_dates_arrive_as_text(tmp_path):
    import datetime as dt
    path = tmp_path / "o.parquet"
    pq.write_table(pa.table({"order_date": [dt.date(2024, 2, 28)], "customer_id": [1], "config_id": [2]}), path)
    frame = read_rows(path, "previous_orders").frame
    assert frame.order_date.tolist() == ["2024-02-28"]
    assert frame.customer_id.tolist() == [1]


def test_raw_corrupt_gzip_is_a_user_error_naming_the_file(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="c.jsonl.gz: cannot be read or decompressed"):
        read_rows(path, "clicks")


def test_raw_csv_invalid_utf8_makes_only_its_row_malformed(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b"dt,customer_id,config_id,occur_at\n2024-03-01,1,2,2024-03-01\n"
                     b"2024-03-01,1\xff,2,2024-03-01\n1,\xfe\n2024-03-01,3,4,2024-03-01\n")
    frame = read_rows(path, "add_to_carts").frame
    assert frame.row.tolist() == [1, 2, 3, 4]
    assert frame.malformed.tolist() == [False, True, True, False]
    assert frame.customer_id.tolist() == ["1", "1\ufffd", None, "3"]
    assert frame.raw[2] == "1,\ufffd"


def test_raw_csv_reads_a_field_longer_than_pyarrows_block(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b"dt,customer_id,config_id,occur_at\n2024-03-01," + b"9" * 3_000_000 + b",2,2024-03-01\n")
    assert len(read_rows(path, "add_to_carts").frame.customer_id[0]) == 3_000_000


def test_raw_csv_header_survives_bom_cr_line_ends_and_blank_lines(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b"\xef\xbb\xbf\r  \rdt,customer_id,config_id,occur_at\r2024-03-01,1,2,2024-03-01\r \t \r"
                     b"2024-03-01,3,4,2024-03-01\r")
    frame = read_rows(path, "add_to_carts").frame
    assert frame.dt.tolist() == ["2024-03-01", "2024-03-01"]  # "dt", not "\ufeffdt" read as a date
    assert frame.row.tolist() == [1, 3]  # the line of spaces is blank, not a malformed row
    assert not frame.malformed.any()


def test_raw_csv_header_without_a_line_end_has_no_rows(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("dt,customer_id,config_id,occur_at,extra")
    rows = read_rows(path, "add_to_carts")
    assert len(rows.frame) == 0
    assert rows.extra_fields == {"extra"}


def test_raw_csv_header_that_is_not_utf8_is_a_user_error_naming_the_file(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b"dt,customer_\xffid\n2024-03-01,1\n")
    with pytest.raises(UserError, match=r"a\.csv: the header row is not valid UTF-8"):
        read_rows(path, "add_to_carts")


@pytest.mark.parametrize("name", ["a.csv", "a.parquet"])
def test_raw_repeated_column_is_a_user_error_naming_it(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".csv"):
        path.write_text("dt,customer_id,customer_id\n2024-03-01,1,x\n")
    else:
        pq.write_table(pa.Table.from_arrays([pa.array(["2024-03-01"]), pa.array([1]), pa.array(["x"])],
                                            names=["dt", "customer_id", "customer_id"]), path)
    with pytest.raises(UserError, match=rf"{name}: .*'customer_id' .*more than once"):
        read_rows(path, "clicks")


def test_raw_json_lines_skip_a_byte_order_mark(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"customer_id": 1}\n')
    frame = read_rows(path, "clicks").frame
    assert frame.malformed.tolist() == [False]
    assert frame.customer_id.tolist() == [1]


def test_raw_parquet_binary_columns_are_text_and_invalid_utf8_is_malformed(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"dt": pa.array([b"2024-03-01", b"2024-03-01\xff", None], pa.binary()),
                             "customer_id": [1, 2, 3]}), path)
    frame = read_rows(path, "clicks").frame
    assert frame.dt.tolist() == ["2024-03-01", "2024-03-01\ufffd", None]
    assert frame.malformed.tolist() == [False, True, False]


def test_raw_file_name_that_is_not_utf8_is_a_user_error(tmp_path):
    import os
    (tmp_path / "clicks").mkdir()
    with open(os.path.join(os.fsencode(tmp_path), b"clicks", b"c\xff.jsonl"), "wb") as file:
        file.write(b"{}\n")
    with pytest.raises(UserError, match="c\ufffd.jsonl: the file name is not valid UTF-8"):
        list_source_files(tmp_path, "clicks")


def test_raw_only_files_directly_in_a_source_folder_are_read(tmp_path):
    (tmp_path / "clicks" / "_backup").mkdir(parents=True)
    (tmp_path / "clicks" / "day.jsonl").write_text("{}\n")
    (tmp_path / "clicks" / "_backup" / "day.jsonl").write_text("{}\n")  # kept there unread: its name starts with _
    assert list_source_files(tmp_path, "clicks") == [tmp_path / "clicks" / "day.jsonl"]


@pytest.mark.parametrize("make, message", [
    (lambda path: path.mkdir(), "{path}/: a folder inside {source}/; only the files directly in a source folder are "
                                "read: move its files up, or move it out (or prefix its name with _ to keep it there "
                                "unread)"),
    (lambda path: path.symlink_to("/etc/hostname"),
     "{path}: a symbolic link (to /etc/hostname); raw files must be regular files in {source}/: copy the file there, "
     "or point --raw at the folder that holds it"),
    (lambda path: os.mkfifo(path), "{path}: not a regular file (a named pipe, socket or device); raw files must be "
                                   "regular files: remove it from the source folder"),
])
def test_raw_merge_refuses_what_is_not_a_file_in_a_source_folder(raw_dir, tmp_path, capsys, make, message):
    """A folder of copies (`clicks/backup.jsonl/`) used to add its rows again, a symbolic link was followed
    anywhere and a named pipe skipped silently: each now stops merge_and_clean.py, naming it."""
    path = raw_dir / "clicks" / "backup.jsonl"
    make(path)
    before = listing(tmp_path)
    assert run_main("merge_and_clean.py", "--raw", raw_dir, "--data", tmp_path / "data") == 2
    assert one_line(capsys.readouterr().err) == "error: " + message.format(path=path, source=raw_dir / "clicks")
    assert listing(tmp_path) == before


def test_raw_corrupt_parquet_stops_merge_in_one_line(raw_dir, tmp_path, capsys):
    """Parquet's own text for a damaged footer ends in a line break ("Couldn't deserialize thrift: ...\\n")."""
    path = raw_dir / "previous_orders" / "orders.parquet"
    content = bytearray(path.read_bytes())
    footer = int.from_bytes(content[-8:-4], "little")
    content[-8 - footer:-8] = bytes(footer)
    path.write_bytes(bytes(content))
    assert run_main("merge_and_clean.py", "--raw", raw_dir, "--data", tmp_path / "data", "--workers", "1") == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"error: {path}: not a readable Parquet file (Couldn't deserialize thrift")
    assert line.endswith("); replace or remove the file")
    assert not (tmp_path / "data" / "merged").exists()


def block_rows(block):
    """{row: (raw line or None, customer_id)} of every row a Block holds, however it was read."""
    rows = dict(zip(block.rows.tolist(), zip([None] * len(block.rows), block.table.column("customer_id").to_pylist())))
    every = block.as_rows(np.ones(block.table.num_rows, dtype=bool))
    for frame in (every, block.rest):
        for row, raw, customer in zip(frame.row, frame.raw, frame.customer_id):
            rows.setdefault(int(row), (raw, customer))
    return rows


def read_in_ranges(path, source, split_bytes):
    counts = [count_rows(path, start, end) for start, end in byte_ranges(path.stat().st_size, split_bytes)]
    header = counts[0]["first_line"] if path.suffix == ".csv" else None
    rows, before = {}, 0
    for number, ((start, end), count) in enumerate(zip(byte_ranges(path.stat().st_size, split_bytes), counts)):
        block = read_block(path, source, start, end, before + 1, header if number else None)
        found = block_rows(block)
        assert not set(found) & set(rows), "a row read by two ranges"
        rows.update(found)
        before += count["rows" if path.suffix == ".csv" else "lines"]
    return rows


def test_raw_json_lines_in_byte_ranges_reads_every_line_once_whatever_the_cut(tmp_path):
    # Lines of every length from empty to longer than a range, blank ones, a malformed one, no final \n.
    lines = [b'{"dt": "2024-03-01", "customer_id": %d, "pad": "%s"}' % (i, b"x" * (i % 23)) for i in range(1, 60)]
    lines[5:5] = [b"", b"   ", b"not json", b'{"customer_id": 7, "customer_id": 8}']
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\n".join(lines))
    whole = block_rows(read_block(path, "clicks"))
    assert len(whole) == len(lines) - 2  # the blank lines are not rows
    for split_bytes in (16, 33, 64, 65, 100, 999):  # 16: shorter than every line, most ranges own none
        assert read_in_ranges(path, "clicks", split_bytes) == whole, split_bytes


def test_raw_csv_in_byte_ranges_numbers_rows_as_the_whole_file_does(tmp_path):
    lines = [b"dt,customer_id,config_id,occur_at"] + [
        b"2024-03-01,%d,%s,2024-03-01T00:00:00" % (i, b"1" * (1 + i % 17)) for i in range(1, 50)]
    lines[7:7] = [b"", b"", b"1,2", b"  "]
    path = tmp_path / "a.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    whole = block_rows(read_block(path, "add_to_carts"))
    for split_bytes in (16, 31, 32, 47, 200):  # 16: shorter than every line, most ranges own none
        assert read_in_ranges(path, "add_to_carts", split_bytes) == whole, split_bytes


@pytest.mark.parametrize("source, text", [
    ("clicks", b'{"dt": "2024-03-01", "customer_id": 1, "item_id": 2, "click_time": "2024-03-01T10:00:00Z"}\n'
               b'{"dt": "2024-03-01", "customer_id": "1", "item_id": 2.0, "click_time": 5}\n'
               b'{"dt": "2024-03-01", "customer_id": 1}{"customer_id": 2}\n{"a": NaN}\n{"a": 1,}\n\xef\xbb\xbf{"a": 1}\n'
               b'{"customer_id": 1,\n "item_id": 2}\n{"x": ' + b"[" * 1100 + b"]" * 1100 + b'}\n{"dt": "\xff"}\n'
               b'{"dt": "a", "dt": "b"}\n{"dt": "\\ud800"}\n[1]\n{"customer_id": 9223372036854775808}\n'),
    ("impressions", b'{"dt": "2024-03-01", "ranking_id": "r", "customer_id": 1, "impressions": '
                    b'[{"item_id": 1, "is_order": false, "x": 1}, {"item_id": "2"}, null, 5]}\n'
                    b'{"dt": "2024-03-01", "ranking_id": 7, "customer_id": 1, "impressions": {"item_id": 1}}\n'
                    b'{"dt": "2024-03-01", "ranking_id": " r ", "customer_id": 1, "user_agent": null, "impressions": '
                    b'[{"item_id": 1, "is_order": false, "x": [1]}, {"item_id": 2}, null, {}], "y": {"z": 1}}\n'),
])
def test_raw_block_gives_the_reference_values_of_every_row(tmp_path, source, text):
    """What Arrow decodes and what it leaves are, row for row, what read_rows gives."""
    path = tmp_path / "f.jsonl"
    path.write_bytes(text)
    reference = read_rows(path, source)
    block = read_block(path, source)
    frame = pd.concat([block.rest, block.as_rows(np.ones(block.table.num_rows, dtype=bool))]).sort_values("row")
    assert frame.reset_index(drop=True).to_dict("records") == reference.frame.to_dict("records")
    assert block.extra_fields == reference.extra_fields
    # and the values Arrow decoded are orjson's, type for type (an entry's fields, for a shown item)
    by_row = reference.frame.set_index("row")
    assert block.table.num_rows >= 1
    for row, decoded in zip(block.rows.tolist(), block.table.to_pylist()):
        for name, value in decoded.items():
            expected = by_row.at[row, name]
            if name == "impressions" and value is not None:
                value = [entry if entry is None else (entry["item_id"], entry["is_order"]) for entry in value]
                expected = [entry if type(entry) is not dict else (entry.get("item_id"), entry.get("is_order"))
                            for entry in expected]
            assert (value, type(value)) == (expected, type(expected)), (row, name)


def test_raw_source_that_is_a_file_stops_merge_naming_it(raw_dir, tmp_path, capsys):
    """`raw/clicks` a file, not a folder, used to be called "missing"."""
    shutil.rmtree(raw_dir / "clicks")
    (raw_dir / "clicks").write_text('{"customer_id": 1}\n')
    before = listing(tmp_path)
    assert run_main("merge_and_clean.py", "--raw", raw_dir, "--data", tmp_path / "data") == 2
    assert one_line(capsys.readouterr().err) == (
        f"error: raw source {raw_dir / 'clicks'} is a file, not a folder: a source is a folder of raw files; move the "
        f"file into a folder of that name, as {raw_dir / 'clicks'}/<name>.jsonl (or .csv, .parquet, optionally .gz)")
    assert listing(tmp_path) == before


def test_raw_folder_that_is_a_file_is_named_as_such(tmp_path):
    (tmp_path / "raw").write_text("")
    with pytest.raises(UserError, match=r"^--raw .*raw is a file, not a folder: point --raw at the folder that holds "
                                        r"impressions/, clicks/, add_to_carts/, previous_orders/$"):
        list_raw_files(tmp_path / "raw")


@pytest.mark.parametrize("name, source, lines", [
    ("c.jsonl.gz", "clicks", [b'{"dt": "2024-03-01", "customer_id": %d, "pad": "%s"}' % (i, b"x" * (i % 29))
                              for i in range(1, 80)] + [b"", b"   ", b"\t\r", b"not json", b"[1]", b"{}"]),
    ("a.csv.gz", "add_to_carts", [b"2024-03-01,%d,%s,2024-03-01T00:00:00" % (i, b"1" * (1 + i % 17))
                                  for i in range(1, 80)] + [b"", b"", b" \t ", b"1,2", b"x,y,z,w,v,u"]),
])
def test_raw_blocks_hold_every_row_once_whatever_the_chunk_and_block(tmp_path, monkeypatch, name, source, lines):
    """A file read a few bytes at a time into blocks of a few rows: the rows of the file read whole, numbered
    alike, blank lines counted and dropped; a CSV is cut only before its first quote or \\r."""
    rng = np.random.default_rng(5)
    lines = [lines[i] for i in rng.permutation(len(lines))]
    if name.endswith(".csv.gz"):
        lines = [b"", b"  ", b"dt,customer_id,config_id,occur_at"] + lines + [b'2024-03-01,"7",7,x', b"x\r", b"  "]
    path = tmp_path / name
    path.write_bytes(gzip.compress(b"\xef\xbb\xbf" + b"\n".join(lines)))
    whole = block_rows(read_block(path, source))
    assert len(whole) > 80
    for chunk in (1, 7, 100):
        monkeypatch.setattr("recpipe.raw._CHUNK_BYTES", chunk)
        for block_bytes, block_rows_ in ((1, 1), (300, 1000), (10**6, 7)):
            blocks = list(read_blocks(path, source, block_bytes=block_bytes, block_rows=block_rows_))
            assert [last for _, last in blocks] == [False] * (len(blocks) - 1) + [True]
            assert len(blocks) > 3
            rows = {}
            for block, _ in blocks:
                found = block_rows(block)
                assert not set(found) & set(rows), "a row read twice"
                rows.update(found)
            assert rows == whole, (chunk, block_bytes)


def test_raw_blank_lines_are_counted_and_dropped_a_chunk_at_a_time(tmp_path):
    """8 MiB of line ends between two rows (a gzip bomb in small): one block of two rows, numbered by their
    lines, and no block or chunk holding the blank lines."""
    path = tmp_path / "c.jsonl.gz"
    blank = 8 << 20
    path.write_bytes(gzip.compress(b'{"customer_id": 1}\n' + b"\n" * blank + b" \t\n" * 1000 + b"not json\n"))
    (block, last), = read_blocks(path, "clicks")
    assert last and block.rows_in == 2
    assert block_rows(block) == {1: (None, 1), blank + 1000 + 2: (b"not json", None)}


def click_files(folder):
    """Click files of every kind a group may hold, in raw order: JSON Lines (one gzipped, one empty), CSV
    files under one header (one with blank lines and a byte order mark before it), one under another, one
    with a quote, Parquet, JSON Lines again."""
    header = b"dt,customer_id,item_id,click_time"

    def jsonl(first, n):
        return b"".join(b'{"dt": "2024-03-01", "customer_id": %d, "item_id": 3, "click_time": "2024-03-01T10:00:00"}\n'
                        % i for i in range(first, first + n)) + b"not json\n\n"

    def csv(first, n, head=header):
        return head + b"\n" + b"".join(b"2024-03-01,%d,4,2024-03-01T10:00:00\n" % i
                                       for i in range(first, first + n)) + b"1,2\n\n  \n"

    files = {
        "00.jsonl": jsonl(1, 5), "01.jsonl.gz": gzip.compress(jsonl(10, 7)), "02.jsonl": b"",
        "03.csv": csv(20, 4), "04.csv": b"\xef\xbb\xbf\n  \n" + csv(30, 3), "05.csv": csv(40, 2, header + b",extra"),
        "06.csv": csv(50, 3) + b'2024-03-01,"51",4,2024-03-01T10:00:00\n' + csv(52, 2)[len(header) + 1:],
        "07.csv": csv(60, 2), "10.jsonl": jsonl(90, 3),
    }
    paths = []
    for name, data in files.items():
        paths.append(folder / name)
        paths[-1].write_bytes(data)
    for name, first in (("08.parquet", 70), ("09.parquet", 80)):
        pq.write_table(pa.table({"dt": ["2024-03-01"] * 3, "customer_id": list(range(first, first + 3)),
                                 "item_id": [5, 5, None], "click_time": ["2024-03-01T10:00:00"] * 3}), folder / name)
    return sorted(folder.iterdir())


def test_raw_files_read_together_give_each_row_of_each_file_alone_under_its_key(tmp_path, monkeypatch):
    """Files read as one, cut into blocks of every size: each file's rows, numbered as read alone, under its
    place among them; the JSON Lines files' text decoded as one, and CSV under one header as one."""
    paths = click_files(tmp_path)
    alone = {}
    for position, path in enumerate(paths):
        rows = block_rows(read_block(path, "clicks"))
        alone.update({(position << ROW_KEY_BITS) + row: value for row, value in rows.items()})
    assert len(alone) == 47
    blocks = list(read_files(paths, "clicks"))
    assert [last for _, last in blocks] == [False, False, True]  # JSON Lines; CSV; Parquet with the JSON Lines after
    files_of = [split_row_keys(np.concatenate([block.rows, block.rest.row]))[0] for block, _ in blocks]
    assert [sorted(set(files.tolist())) for files in files_of] == [[0, 1], [3, 4, 5, 6, 7], [8, 9, 10]]
    assert blocks[1][0].extra_fields == {"extra"}
    for chunk in (3, 100, 1 << 20):
        monkeypatch.setattr("recpipe.raw._CHUNK_BYTES", chunk)
        for block_bytes, block_rows_ in ((1, 1), (300, 1000), (10**6, 7), (None, None)):
            blocks = list(read_files(paths, "clicks", block_bytes=block_bytes, block_rows=block_rows_))
            assert [last for _, last in blocks] == [False] * (len(blocks) - 1) + [True]
            rows = {}
            for block, _ in blocks:
                found = block_rows(block)
                assert not set(found) & set(rows), "a row read twice"
                rows.update(found)
            assert rows == alone, (chunk, block_bytes, block_rows_)


def test_raw_files_read_together_name_the_file_a_bad_header_is_in(tmp_path):
    paths = click_files(tmp_path)
    paths[4].write_bytes(b"dt,customer_id,dt\n2024-03-01,1,x\n")
    with pytest.raises(UserError, match=f"^{paths[4]}: the header row names 'dt' more than once"):
        list(read_files(paths, "clicks"))
