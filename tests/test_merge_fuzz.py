"""Bad input, tried hard: seeded mutations of valid raw rows thrown at merge_and_clean.

Every row is built as raw text (or Parquet), so the mutations can be what a parser would
never produce: wrong types in every field, ids past int64, huge strings, nesting deeper
than any parser allows, invalid UTF-8, NUL bytes, duplicate keys, truncated lines, wrong
column counts, BOMs, CR and CRLF line ends, empty and header-only files, gzip.

Each test knows what it wrote:
- `rows_in` exactly (blank lines are not rows);
- the untouched valid rows, by customer id: ids in [VALID, ODD) are valid rows and ids in
  [ODD, END) are valid rows written oddly (padded text, digit strings, offsets, extra
  fields, CRLF); both must come out kept, every one, and nothing else may carry such an id;
- for a mutated row, the reasons it may be set aside for (`KEPT` where keeping it is right).
"""

import collections
import datetime as dt
import decimal
import gzip
import inspect
import json
import random
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distributed import Client

from conftest import run_joined
from recpipe import schemas
from recpipe.merge import SPLIT_BYTES, clean_file, merge_and_clean
from recpipe.raw import FIELDS, list_source_files

SEED = 20261122
VALID, ODD, END = 10**12, 2 * 10**12, 3 * 10**12  # customer ids of rows that must be kept; mutated rows use < 10**7
DAYS = ["2024-03-01", "2024-03-02", "2024-03-03", "2024-03-04"]
UA = "Mozilla/5.0 (X11; Linux x86_64; rv:124.0) Gecko/20100101 Firefox/124.0"
KEPT = "kept"
OPTIONAL = {"user_agent", "simple_id"}
IDS = {"customer_id", "item_id", "config_id", "simple_id"}
TIMES = {"dt", "order_date", "click_time", "occur_at"}


def allowed_reasons(source):
    """The reasons a row of `source` may be set aside for (docs/data.md, Cleaning)."""
    reasons = {"malformed"} | set().union(*(field_reasons(name) - {KEPT} for name in FIELDS[source]))
    return reasons | {"bad_item"} if source == "impressions" else reasons


def field_reasons(name):
    """Where a bad value of field `name` may end: kept (it was fine after all) or set aside naming that field."""
    reasons = {KEPT, f"missing:{name}"}
    if name in IDS:
        reasons.add(f"bad_id:{name}")
    if name in TIMES:
        reasons.add(f"bad_time:{name}")
    if name == "impressions":
        reasons.add("bad_impressions")
    return reasons


def nested(depth, kind):
    return "[" * depth + "1" + "]" * depth if kind == "list" else '{"a":' * depth + "1" + "}" * depth


# Values (as JSON text) of a wrong type or shape for most fields; a few are fine for some (123 as an id).
WRONG_VALUES = [
    "null", '""', '"   "', '"\\t\\n"', "[]", "[1,2]", '["12"]', "{}", '{"a":1}', '{"customer_id":1}', "1.5", "3.0",
    "-0.0", "1e3", "true", "false", "0", "-1", "-9223372036854775808", "9223372036854775808",
    "18446744073709551615", "123456789012345678901234567890", "-9223372036854775809", '"abc"', '"12abc"', '"1e3"',
    '"0x1F"', '"\\u0661\\u0662"', '"12\\u0000"', '"\\ufeff12"', '"-5"', '"+-5"', '"99999999999999999999"',
    '"2024-3-1"', '"2024-02-30"', '"0000-01-01"', '"10000-01-01"', '"2024-03-01T10:00:00.123456789"',
    '"9999-12-31T23:59:59-14:00"', '"0001-01-01T00:00:00+14:00"', "1709280000", '"yesterday"',
    '"2024-03-01T25:00:00"', '"2024-03-01T10:00:00+25:00"', '"\\ud83d\\ude00"', '"\\u0000"', "123",
]
# Valid JSON nested deeper than orjson encodes (254 levels), and lines nested deeper than it decodes (1024): malformed.
DEEP_VALUES = [nested(depth, kind) for depth in (5, 254, 255, 300, 1000, 1023) for kind in ("list", "dict")]
TOO_DEEP_VALUES = [nested(depth, kind) for depth in (1024, 5000, 100_000) for kind in ("list", "dict")]
HUGE = '"' + "x" * 1_000_000 + '"'
# Entries of a shown-items list that are not {item_id: int, is_order: bool}: each is one bad_item.
BAD_ENTRIES = [
    "5", '"x"', "null", "true", "[]", "[1]", "{}", '{"item_id":1}', '{"is_order":true}', '{"item_id":null,"is_order":true}',
    '{"item_id":1.0,"is_order":true}', '{"item_id":true,"is_order":true}', '{"item_id":1,"is_order":1}',
    '{"item_id":1,"is_order":"true"}', '{"item_id":1,"is_order":null}', '{"item_id":0,"is_order":false}',
    '{"item_id":-3,"is_order":false}', '{"item_id":18446744073709551615,"is_order":false}', '{"item_id":"abc","is_order":false}',
    '{"item_id":1,"item_id":"x","is_order":false}', '{"item_id":[1],"is_order":false}',
    '{"item_id":' + nested(300, "list") + ',"is_order":false}', nested(300, "list"), nested(300, "dict"),
    '{"item_id":' + HUGE + ',"is_order":false}',
]
# Entries written oddly that are still good shown items.
ODD_GOOD_ENTRIES = ['{"item_id":"12","is_order":false}', '{"item_id":" 13 ","is_order":true}',
                    '{"item_id":"x","item_id":14,"is_order":false}', '{"is_order":false,"item_id":15,"extra":[[1]]}']
# `impressions` values that are not a list.
BAD_IMPRESSIONS = ['"10,11"', "5", "true", "{}", '{"item_id":1,"is_order":true}', '"[]"', "1.5"]
# Whole lines that are not a JSON object.
MALFORMED_LINES = [
    b"[1,2]", b'"just a string"', b"1", b"null", b"true", b"not json", b"{", b"}", b"{}}", b"{'dt': 1}",
    b"[" * 100_000, b'{"a":' * 5_000, nested(600, "list").encode(), nested(100_000, "list").encode(),
    b'{"dt": NaN}', b'{"dt": 1e400}', b'{"dt": "\\ud800"}', b'{"dt": "a\x00b"}', b"\x00", b"\xff\xfe{}",
]
INVALID_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xc3", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82"]


class Rows:
    """Valid rows of every source, with unique customer ids in [VALID, ODD) and [ODD, END)."""

    def __init__(self, rng):
        self.rng = rng
        self.next_id = {"valid": VALID, "odd": ODD}

    def customer(self, kind):
        self.next_id[kind] += 1
        return self.next_id[kind]

    def record(self, source, customer_id):
        """A valid row as {field: JSON text}, in the order docs/data.md lists the fields."""
        rng = self.rng
        day = rng.choice(DAYS)
        time = f"{day}T{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}"
        time += rng.choice(["Z", "", "+02:00", ".123456Z", "-05:30"])
        values = {
            "impressions": {"dt": day, "ranking_id": f"r{customer_id}", "customer_id": customer_id, "user_agent": UA,
                            "impressions": [{"item_id": rng.randint(1, 10**6), "is_order": rng.random() < 0.2}
                                            for _ in range(rng.randint(1, 4))]},
            "clicks": {"dt": day, "customer_id": customer_id, "item_id": rng.randint(1, 10**6), "click_time": time},
            "add_to_carts": {"dt": day, "customer_id": customer_id, "config_id": rng.randint(1, 10**6),
                             "simple_id": rng.randint(1, 10**7), "occur_at": time},
            "previous_orders": {"order_date": day, "customer_id": customer_id, "config_id": rng.randint(1, 10**6)},
        }[source]
        return {name: json.dumps(value) for name, value in values.items()}

    def odd(self, source):
        """A valid row written oddly, with its customer id in [ODD, END): it must be kept."""
        customer_id = self.customer("odd")
        record = self.record(source, customer_id)
        name = self.rng.choice([name for name in record if name != "impressions"])
        value = json.loads(record[name])
        record[name] = self.rng.choice([
            json.dumps(f"  {value}\t"),                   # text is stripped, ids may be digit strings
            json.dumps(str(value)),
            None if name in OPTIONAL else record[name],  # an optional field may be absent
            "null" if name in OPTIONAL else record[name],
        ])
        if record[name] is None:
            del record[name]
        if self.rng.random() < 0.3:
            record["unknown_field"] = json.dumps([{"deep": nested(3, "list")}])
        if source == "impressions" and self.rng.random() < 0.5:
            entries = json.loads(record["impressions"])
            record["impressions"] = "[" + ",".join([json.dumps(e) for e in entries] + [self.rng.choice(ODD_GOOD_ENTRIES)]) + "]"
        return record


def json_line(record):
    return ("{" + ",".join(f"{json.dumps(name)}:{value}" for name, value in record.items()) + "}").encode()


def mutate_json(rows, source):
    """One mutated row of `source`: (line bytes, reasons it may end with, shown items expected set aside)."""
    rng = rows.rng
    record = rows.record(source, rng.randint(1, 10**6))
    name = rng.choice(list(record))
    kind = rng.choice(["value", "value", "value", "deep", "too_deep", "missing", "huge", "duplicate_key",
                       "invalid_utf8", "nul", "truncated", "line", "entries", "impressions"])
    bad_items = 0
    if kind in ("value", "deep"):
        record[name] = rng.choice(WRONG_VALUES if kind == "value" else DEEP_VALUES)
        allowed = field_reasons(name)
        if name == "impressions" and record[name].startswith("["):  # a list: every entry in it is a bad item
            bad_items = 1 if kind == "deep" else len(json.loads(record[name]))
    elif kind == "too_deep":
        record[name] = rng.choice(TOO_DEEP_VALUES)
        allowed = {"malformed"}
    elif kind == "missing":
        del record[name]
        allowed = {KEPT if name in OPTIONAL else f"missing:{name}"}
    elif kind == "huge":
        record[name if name != "impressions" else "unknown_field"] = HUGE
        allowed = field_reasons(name) if name != "impressions" else {KEPT}
    elif kind == "duplicate_key":  # the last value wins, as in every JSON parser we know
        line = json_line(record)[:-1] + b"," + json.dumps(name).encode() + b':"x"}'
        return line, ({KEPT} if name in ("ranking_id", "user_agent") else field_reasons(name) - {KEPT, f"missing:{name}"}), 0
    elif kind in ("invalid_utf8", "nul", "truncated"):
        line = json_line(record)
        at = rng.randrange(1, len(line))
        insert = rng.choice(INVALID_UTF8) if kind == "invalid_utf8" else b"\x00"
        return (line[:at] if kind == "truncated" else line[:at] + insert + line[at:]), {"malformed"}, 0
    elif kind == "line":
        return rng.choice(MALFORMED_LINES), {"malformed"}, 0
    elif kind == "entries" and source == "impressions":
        entries = json.loads(record["impressions"])
        bad_items = rng.randint(1, 3)
        texts = [json.dumps(entry) for entry in entries] + [rng.choice(BAD_ENTRIES) for _ in range(bad_items)]
        rng.shuffle(texts)
        record["impressions"] = "[" + ",".join(texts) + "]"
        allowed = {KEPT}
    elif kind == "impressions" and source == "impressions":
        record["impressions"] = rng.choice(BAD_IMPRESSIONS + ["null", "[]"])
        allowed = {"bad_impressions", "missing:impressions", KEPT}
    else:
        record[name] = rng.choice(WRONG_VALUES)
        allowed = field_reasons(name)
    if rng.random() < 0.2:
        keys = list(record)
        rng.shuffle(keys)  # field order does not matter
        record = {key: record[key] for key in keys}
    return json_line(record), allowed, bad_items


def csv_cell(value):
    value = value if isinstance(value, bytes) else value.encode()
    if any(char in value for char in (b",", b'"', b"\n", b"\r")):
        return b'"' + value.replace(b'"', b'""') + b'"'
    return value


def csv_text(json_value):
    """What a CSV cell holds for a valid JSON value: strings without quotes, numbers as digits."""
    value = json.loads(json_value)
    return "" if value is None else str(value)


WRONG_CELLS = ["", "   ", "abc", "12abc", "-1", "0", "1.5", "3.0", "1e3", "0x1F", "99999999999999999999",
               "9223372036854775808", "true", "null", "[1]", '{"a": 1}', "2024-3-1", "2024-02-30", "0000-01-01",
               "9999-12-31T23:59:59-14:00", "2024-03-01T10:00:00.123456789", "yesterday", "1709280000",
               "12\x00", "\ufeff12", "\u0661\u0662", "1\n2", "a,b", 'say "hi"', "x" * 1_500_000]


def mutate_csv(rows, source, header):
    """One mutated CSV row: (line bytes, reasons it may end with)."""
    rng = rows.rng
    record = rows.record(source, rng.randint(1, 10**6))
    cells = {name: csv_text(value).encode() for name, value in record.items()}
    name = rng.choice([name for name in header if name in cells])
    kind = rng.choice(["cell", "cell", "cell", "invalid_utf8", "too_many", "too_few", "empty"])
    if kind == "cell":
        cells[name] = rng.choice(WRONG_CELLS).encode()
        allowed = field_reasons(name)
    elif kind == "invalid_utf8":
        at = rng.randrange(len(cells[name]) + 1)
        cells[name] = cells[name][:at] + rng.choice(INVALID_UTF8) + cells[name][at:]
        allowed = {"malformed"}
    elif kind == "empty":
        cells[name] = b""
        allowed = {KEPT if name in OPTIONAL else f"missing:{name}"}
    else:
        line = b",".join(csv_cell(cells.get(column, b"")) for column in header)
        return (line + b",1,2" if kind == "too_many" else line.rsplit(b",", 1)[0]), {"malformed"}
    return b",".join(csv_cell(cells.get(column, b"")) for column in header), allowed


def blank_line(rng):
    return rng.choice([b"", b"   ", b"\t", b" \t "])


def write_file(path, data, rng):
    """`data` to `path`; gzipped (sometimes as two gzip members) if the name ends in .gz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        cut = data.find(b"\n", len(data) // 2) + 1
        data = (gzip.compress(data[:cut], mtime=0) + gzip.compress(data[cut:], mtime=0)) if rng.random() < 0.3 and cut \
            else gzip.compress(data, mtime=0)
    path.write_bytes(data)


def json_file(rows, source, n_valid, n_odd, n_bad):
    """Lines of a JSON Lines file: (data, rows written, expected per row: (line number, allowed, bad items))."""
    rng = rows.rng
    lines, expected = [], []
    kinds = ["valid"] * n_valid + ["odd"] * n_odd + ["bad"] * n_bad
    rng.shuffle(kinds)
    for kind in kinds:
        while rng.random() < 0.1:
            lines.append(blank_line(rng))
        if kind == "valid":
            lines.append(json_line(rows.record(source, rows.customer("valid"))))
            expected.append((len(lines), {KEPT}, 0))
        elif kind == "odd":
            lines.append(json_line(rows.odd(source)))
            expected.append((len(lines), {KEPT}, 0))
        else:
            line, allowed, bad_items = mutate_json(rows, source)
            lines.append(line)
            expected.append((len(lines), allowed, bad_items))
    end = rng.choice([b"\n", b"\r\n"])
    data = end.join(lines) + rng.choice([end, b""])
    if rng.random() < 0.15:
        data = b"\xef\xbb\xbf" + data
    return data, len(expected), expected


def csv_file(rows, source, n_valid, n_odd, n_bad):
    """Lines of a CSV file: (data, rows written, expected per row: (row number, allowed, 0)).

    A CSV row's number counts the rows after the header as pyarrow does: every line but an empty
    one (a line of spaces gets a number, though it is blank and not a row).
    """
    rng = rows.rng
    header = list(FIELDS[source])
    if source == "add_to_carts" and rng.random() < 0.3:
        header.remove("simple_id")
    if rng.random() < 0.3:
        header.append("note")
    rng.shuffle(header)
    kinds = ["valid"] * n_valid + ["odd"] * n_odd + ["bad"] * n_bad
    rng.shuffle(kinds)
    lines, expected, number = [",".join(header).encode()], [], 0
    for kind in kinds:
        while rng.random() < 0.1:
            lines.append(blank_line(rng))
            number += lines[-1] != b""
        if kind == "bad":
            line, allowed = mutate_csv(rows, source, header)
        else:
            record = rows.record(source, rows.customer("valid")) if kind == "valid" else rows.odd(source)
            line, allowed = b",".join(csv_cell(csv_text(record[c]) if c in record else b"") for c in header), {KEPT}
        lines.append(line)
        number += 1
        expected.append((number, allowed, 0))
    end = rng.choice([b"\n", b"\r\n", b"\r"])
    data = end.join(lines) + rng.choice([end, b""])
    if rng.random() < 0.15:
        data = b"\xef\xbb\xbf" + data
    return data, len(expected), expected


def parquet_file(rows, source, path, n_valid):
    """A Parquet file of valid rows in unusual column types, and one row of nulls; returns the rows written."""
    rng = rows.rng
    records = [json.loads("{" + ",".join(f'"{k}":{v}' for k, v in rows.record(source, rows.customer("valid")).items())
                          + "}") for _ in range(n_valid)]
    table = pa.Table.from_pylist(records)
    # Text as binary and ids as digit strings are read as the values they hold ...
    columns = {name: table.column(name) for name in table.column_names}
    for name in columns:
        if pa.types.is_string(columns[name].type) and rng.random() < 0.5:
            columns[name] = columns[name].cast(pa.binary())
    columns["customer_id"] = columns["customer_id"].cast(pa.string())
    # ... one more row of nulls is set aside.
    bad = {name: pa.array([None], column.type) for name, column in columns.items()}
    table = pa.concat_tables([pa.table(columns), pa.table(bad)])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return n_valid + 1


def build_raw(raw, seed):
    """A raw folder of every source, every format and every mutation; returns what was written."""
    rng = random.Random(seed)
    rows = Rows(rng)
    written = collections.Counter()
    for source in FIELDS:
        for index in range(7):
            n_valid, n_odd, n_bad = rng.randint(0, 25), rng.randint(0, 8), rng.randint(5, 30)
            fmt = rng.choice([".jsonl", ".json", ".csv"] if source != "impressions" else [".jsonl", ".json"])
            gz = ".gz" if rng.random() < 0.35 else ""
            path = raw / source / f"part-{index:02d}{fmt}{gz}"
            make = json_file if fmt != ".csv" else csv_file
            data, n, _ = make(rows, source, n_valid, n_odd, n_bad)
            write_file(path, data, rng)
            written[source] += n
        if source != "impressions":
            written[source] += parquet_file(rows, source, raw / source / "typed.parquet", 5)
        # Files without a single row: empty, only blank lines, only a header, an empty gzip.
        write_file(raw / source / "empty.jsonl", b"", rng)
        write_file(raw / source / "blank.jsonl.gz", b"\n  \n\t\r\n", rng)
        write_file(raw / source / "nothing.json.gz", b"", rng)
        if source != "impressions":
            write_file(raw / source / "header-only.csv", ",".join(FIELDS[source]).encode(), rng)
            write_file(raw / source / "header-only-crlf.csv.gz", ",".join(FIELDS[source]).encode() + b"\r\n\r\n", rng)
    # Exact duplicates: the same ranking in two files (its shown items are dropped once), the same click twice.
    ranking = json_line({"dt": '"2024-03-04"', "ranking_id": '"dup"', "customer_id": "42", "user_agent": '""',
                         "impressions": '[{"item_id": 7, "is_order": false}, {"item_id": 8, "is_order": true}]'})
    click = json_line({"dt": '"2024-03-04"', "customer_id": "42", "item_id": "7", "click_time": '"2024-03-04T10:00:00Z"'})
    for name in ("dup-a.jsonl", "dup-b.jsonl"):
        write_file(raw / "impressions" / name, ranking + b"\n", rng)
        write_file(raw / "clicks" / name, click + b"\n", rng)
    written["impressions"] += 2
    written["clicks"] += 2
    return rows, written


def read_all(directory):
    paths = sorted(Path(directory).rglob("*.parquet"))
    return paths, pa.concat_tables([pq.read_table(path) for path in paths]).to_pandas() if paths else pd.DataFrame()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """build_raw(raw, SEED) made once for the tests that only read it: (raw, rows, written)."""
    raw = tmp_path_factory.mktemp("fuzz-corpus") / "raw"
    rows, written = build_raw(raw, SEED)
    return raw, rows, written


def test_merge_fuzz_stage_never_crashes_and_accounts_for_every_row(corpus, session_cluster, tmp_path):
    (raw, rows, written), data = corpus, tmp_path / "data"
    result = run_joined(session_cluster, "merge_and_clean.py", "--raw", raw, "--data", data, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr[-3000:]
    merged = data / "merged"
    accounting = json.loads((merged / "_stage.json").read_text())["accounting"]

    # rows in = what was written; kept + set aside + duplicates = rows in, per source and per shown item
    sources = {"impressions.rankings": "impressions", "impressions.shown_items": None,
               "clicks": "clicks", "add_to_carts": "add_to_carts", "previous_orders": "previous_orders"}
    for key, source in sources.items():
        counts = accounting[key]
        if source:
            assert counts["rows_in"] == written[source], key
        assert counts["rows_in"] == counts["kept"] + sum(counts["set_aside"].values()) + counts.get("duplicates_dropped", 0), key
    assert accounting["impressions.shown_items"]["duplicates_dropped"] >= 2

    # every quarantined row has a reason of docs/data.md's list, its raw text, and the counts match the manifest
    paths, quarantine = read_all(merged / "_quarantine")
    assert all(pq.read_schema(path).equals(schemas.QUARANTINE) for path in paths)
    for source in FIELDS:
        of_source = quarantine[quarantine.source_file.str.contains(f"/{source}/", regex=False)]
        assert set(of_source.reason) <= allowed_reasons(source), source
        assert of_source.raw.notna().all() and (of_source.row >= 1).all()
        expected = collections.Counter()
        for key in ([source] if source != "impressions" else ["impressions.rankings", "impressions.shown_items"]):
            expected.update(accounting[key]["set_aside"])
        assert collections.Counter(of_source.reason) == expected, source
    # the mutations reached every kind of reason (a fuzzer whose rows were all kept would test nothing)
    assert {"malformed", "missing:customer_id", "bad_id:customer_id", "bad_time:dt", "bad_time:click_time",
            "bad_impressions", "bad_item", "bad_id:simple_id"} <= set(quarantine.reason)

    # kept tables have the documented types and no impossible values
    paths, actions = read_all(merged / "actions")
    assert all(pq.read_schema(path).equals(schemas.ACTIONS) for path in paths)
    assert actions.notna().all().all() and (actions.customer_id >= 1).all() and (actions.item_id >= 1).all()
    assert str(actions.occurred_at.dtype) == "datetime64[us, UTC]"
    paths, impressions = read_all(merged / "impressions")
    assert all(pq.read_schema(path).equals(schemas.IMPRESSIONS) for path in paths)
    assert (impressions.drop(columns="user_agent").notna().all().all() and (impressions.position >= 0).all()
            and (impressions.item_id >= 1).all())

    # every valid row was kept, and no mutated row came out with a valid row's id
    for low, high, kind in ((VALID, ODD, "valid"), (ODD, END, "odd")):
        kept_actions = actions[(actions.customer_id >= low) & (actions.customer_id < high)]
        kept_rankings = impressions[(impressions.customer_id >= low) & (impressions.customer_id < high)]
        written_ids = set(range(low + 1, rows.next_id[kind] + 1))
        assert set(kept_actions.customer_id) | set(kept_rankings.customer_id) == written_ids, kind
        assert not kept_actions.duplicated("customer_id").any()
        assert kept_rankings.groupby("customer_id").ranking_id.nunique().eq(1).all()


def test_merge_fuzz_source_of_only_empty_files_stops_with_one_line_naming_it(session_cluster, tmp_path):
    raw, data = tmp_path / "raw", tmp_path / "data"
    rng = random.Random(SEED)
    rows = Rows(rng)
    for source in ("impressions", "clicks", "previous_orders"):
        write_file(raw / source / "ok.jsonl", json_line(rows.record(source, rows.customer("valid"))) + b"\n", rng)
    carts = raw / "add_to_carts"
    write_file(carts / "empty.csv", b"", rng)
    write_file(carts / "header-only.csv", b"\xef\xbb\xbfdt,customer_id,config_id,simple_id,occur_at", rng)
    write_file(carts / "header-blank-lines.csv.gz", b"dt,customer_id,config_id,occur_at\r\n\r\n  \r\n", rng)
    write_file(carts / "blank.jsonl", b"\n \n\t\n", rng)
    write_file(carts / "empty.json.gz", b"", rng)
    pq.write_table(pa.table({"dt": pa.array([], pa.string()), "customer_id": pa.array([], pa.int64())}),
                   carts / "no-rows.parquet")
    result = run_joined(session_cluster, "merge_and_clean.py", "--raw", raw, "--data", data, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "add_to_carts/" in errors[0] and "no rows" in errors[0], result.stderr[-3000:]
    assert result.stderr.rstrip().endswith(errors[0])
    assert not (data / "merged").exists()


def test_merge_fuzz_every_row_set_aside_still_publishes_the_quarantine(session_cluster, tmp_path):
    """No row of any source survives: the stage publishes the accounting and the quarantine, no kept table."""
    raw, data = tmp_path / "raw", tmp_path / "data"
    rng = random.Random(SEED + 3)
    rows = Rows(rng)
    written = collections.Counter()
    for source in FIELDS:
        lines = [rng.choice(MALFORMED_LINES) for _ in range(3)]
        record = rows.record(source, 5)
        del record["customer_id"]
        lines.append(json_line(record))
        if source == "impressions":  # a kept ranking whose every entry is bad: no shown item survives
            record = rows.record(source, 6)
            record["impressions"] = "[" + ",".join(BAD_ENTRIES[:5]) + "]"
            lines.append(json_line(record))
        write_file(raw / source / "bad.jsonl", b"\n".join(lines), rng)
        written[source] = len(lines)
    result = run_joined(session_cluster, "merge_and_clean.py", "--raw", raw, "--data", data, check=False)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    accounting = json.loads((data / "merged" / "_stage.json").read_text())["accounting"]
    assert accounting["impressions.rankings"] == {"rows_in": 5, "kept": 1, "set_aside": {
        "malformed": 3, "missing:customer_id": 1}}
    assert accounting["impressions.shown_items"]["kept"] == 0
    assert accounting["impressions.shown_items"]["set_aside"] == {"bad_item": 5}
    for source in ("clicks", "add_to_carts", "previous_orders"):
        assert accounting[source]["rows_in"] == written[source] and accounting[source]["kept"] == 0
    assert len(read_all(data / "merged" / "_quarantine")[1]) == sum(written.values()) + 5 - 1
    assert not list((data / "merged").glob("impressions/*.parquet")) + list((data / "merged").glob("actions/*.parquet"))


def check_file(path, source, index, out, written, expected, report):
    """`report`, what clean_file returned for one file: every row must end where `expected` allows and the
    file's accounting balance."""
    assert report["rows_in"] == written
    quarantine_path = out / "_quarantine" / source / f"part-{index:05d}.parquet"
    quarantine = pq.read_table(quarantine_path).to_pandas() if quarantine_path.exists() else pd.DataFrame(
        columns=["source_file", "row", "reason", "raw"])
    rankings = quarantine[quarantine.reason != "bad_item"]
    assert not rankings.row.duplicated().any()  # one place per row
    assert collections.Counter(rankings.reason) == collections.Counter(report["set_aside"])
    assert report["kept"] + len(rankings) == written
    by_row = dict(zip(rankings.row, rankings.reason))
    bad_items = quarantine[quarantine.reason == "bad_item"].groupby("row").size().to_dict()
    lines = {line for line, _, _ in expected}
    assert set(by_row) <= lines
    for line, allowed, n_bad_items in expected:
        end = by_row.get(line, KEPT)
        assert end in allowed, (path, line, end, allowed)
        if end == KEPT and source == "impressions" and n_bad_items is not None:
            assert bad_items.get(line, 0) == n_bad_items, (path, line)
    if source == "impressions":
        assert report["shown_items_in"] == (sum(pq.read_table(p).num_rows for p in (out / "_scratch").rglob("*.parquet"))
                                            + sum(report["shown_items_set_aside"].values()))
    return report


def check_files(session_cluster, cases):
    """check_file for every case (path, source, index, out, written, expected), the files cleaned by clean_file
    on the session cluster's two workers at once, as a stage runs it, and each checked here."""
    with Client(session_cluster) as client:
        futures = [client.submit(clean_file, str(path), source, index, str(out), 2, pure=False)
                   for path, source, index, out, _, _ in cases]
        for case, future in zip(cases, futures):
            check_file(*case, report=future.result())


def test_merge_fuzz_each_mutation_ends_where_the_spec_says(session_cluster, tmp_path):
    """Hundreds of small files, each with a few mutated rows among valid ones, each cleaned and checked."""
    rng = random.Random(SEED + 1)
    rows = Rows(rng)
    cases = []
    for case in range(200):
        source = rng.choice(list(FIELDS))
        fmt = ".jsonl" if source == "impressions" or rng.random() < 0.6 else ".csv"
        gz = ".gz" if rng.random() < 0.2 else ""
        path = tmp_path / "raw" / source / f"case-{case:03d}{fmt}{gz}"
        make = json_file if fmt == ".jsonl" else csv_file
        data, written, expected = make(rows, source, rng.randint(0, 4), rng.randint(0, 2), rng.randint(1, 8))
        write_file(path, data, rng)
        cases.append((path, source, case, tmp_path / "out" / f"{case:03d}", written, expected))
    check_files(session_cluster, cases)


def test_merge_fuzz_csv_without_a_required_column_sets_every_row_aside_for_it(tmp_path):
    rng = random.Random(SEED + 2)
    rows = Rows(rng)
    for case, (source, dropped) in enumerate([("clicks", "click_time"), ("add_to_carts", "customer_id"),
                                              ("previous_orders", "order_date")]):
        header = [name for name in FIELDS[source] if name != dropped]
        records = [rows.record(source, rows.customer("valid")) for _ in range(5)]
        lines = [",".join(header).encode()] + [b",".join(csv_cell(csv_text(r[c])) for c in header) for r in records]
        path = tmp_path / source / "no-column.csv"
        write_file(path, b"\n".join(lines) + b"\n", rng)
        report = clean_file(str(path), source, case, str(tmp_path / "out"))
        assert report["set_aside"] == {f"missing:{dropped}": 5} and report["kept"] == 0


def wrong_columns(n):
    """Arrow columns of every type a Parquet writer might give a field, none of them right for it."""
    return [
        pa.array([1.5] * n), pa.array([3.0] * n), pa.array([True] * n), pa.array([-1] * n), pa.array([0] * n),
        pa.array([1709280000] * n), pa.array([2**64 - 1] * n, pa.uint64()), pa.array([[1, 2]] * n),
        pa.array([{"a": 1}] * n), pa.array([[("k", 1)]] * n, pa.map_(pa.string(), pa.int64())),
        pa.array([b"\xff\xfe"] * n, pa.binary()), pa.array([b"x"] * n, pa.large_binary()), pa.array([b"1234"] * n, pa.binary(4)),
        pa.array(["x"] * n, pa.large_string()), pa.array(["x"] * n).dictionary_encode(), pa.nulls(n), pa.nulls(n, pa.string()),
        pa.array([dt.datetime(2024, 3, 1, 10)] * n, pa.timestamp("s")), pa.array([dt.date(2024, 3, 1)] * n),
        pa.array([5] * n, pa.duration("s")), pa.array([decimal.Decimal("12")] * n, pa.decimal128(5, 0)),
        pa.array(["x" * 100_000] * n), pa.array(["1\x00"] * n), pa.array([[[[1]]]] * n),
    ]


def test_merge_fuzz_parquet_columns_of_wrong_types_set_their_rows_aside(session_cluster, tmp_path):
    rng = random.Random(SEED + 4)
    rows = Rows(rng)
    case, cases = 0, []
    for source in FIELDS:
        for column in wrong_columns(4):
            records = [{name: json.loads(value) for name, value in rows.record(source, rng.randint(1, 10**6)).items()}
                       for _ in range(4)]
            table = pa.Table.from_pylist(records)
            name = rng.choice(table.column_names)
            table = table.set_column(table.column_names.index(name), name, column)
            path = tmp_path / source / f"case-{case:03d}.parquet{rng.choice(['', '.gz'])}"
            path.parent.mkdir(parents=True, exist_ok=True)
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
            write_file(path, sink.getvalue().to_pybytes(), rng)
            invalid_utf8 = column.type == pa.binary() and column[0].as_py() == b"\xff\xfe"
            allowed = {"malformed"} if invalid_utf8 else field_reasons(name)
            cases.append((path, source, case, tmp_path / "out" / f"{case:03d}", 4,
                          [(row, allowed, None) for row in range(1, 5)]))
            case += 1
    check_files(session_cluster, cases)


def merged_files(directory):
    return {path.relative_to(directory): path.read_bytes() for path in sorted(Path(directory).rglob("*"))
            if path.is_file()}


@pytest.fixture(scope="module")
def merged_corpus(corpus, session_cluster, tmp_path_factory):
    """merged_corpus(**way): the fuzz corpus merged with merge_and_clean's keyword arguments `way`, on the
    session's cluster, once per way for the module (the tests only read the output): (accounting,
    impression days, extra fields, the output folder). The default way, whole files read in Arrow blocks,
    is what both comparisons below hold the other ways against."""
    raw = corpus[0]
    raw_files = {source: list_source_files(raw, source) for source in FIELDS}
    defaults = {name: parameter.default for name, parameter in inspect.signature(merge_and_clean).parameters.items()
                if parameter.default is not inspect.Parameter.empty}
    results = {}

    def merged(**way):
        key = tuple(sorted({**defaults, **way}.items()))  # line_by_line=False is split_bytes=SPLIT_BYTES: one run
        if key not in results:
            out = tmp_path_factory.mktemp("fuzz-merged") / "out"
            with Client(session_cluster) as client:
                results[key] = (*merge_and_clean(client, raw_files, out, 1, 1, 14, **way), out)
        return results[key]

    return merged


def test_merge_fuzz_arrow_blocks_write_byte_for_byte_what_line_by_line_reading_writes(merged_corpus):
    """The fuzz corpus through both paths: every file merged/ would hold, compared byte by byte."""
    by_line, by_block = merged_corpus(line_by_line=True), merged_corpus(line_by_line=False)
    assert by_line[:3] == by_block[:3]
    by_line_files, by_block_files = merged_files(by_line[3]), merged_files(by_block[3])
    assert by_line_files.keys() == by_block_files.keys()
    assert [name for name, data in by_line_files.items() if by_block_files[name] != data] == []


def test_merge_fuzz_a_file_read_in_byte_ranges_gives_the_rows_of_the_whole_file(merged_corpus):
    """Every JSON Lines and CSV file of the corpus cut into 64 KiB ranges: the same rows kept and set aside."""
    whole, cut = merged_corpus(split_bytes=SPLIT_BYTES), merged_corpus(split_bytes=65536)
    assert whole[:3] == cut[:3]
    assert len(list(cut[3].glob("actions/*.*.parquet"))) > 0  # some files were cut
    for name in ("actions", "impressions", "_quarantine"):
        whole_rows, cut_rows = read_all(whole[3] / name)[1], read_all(cut[3] / name)[1]
        key = list(whole_rows.columns)
        assert len(cut_rows) > 0
        pd.testing.assert_frame_equal(whole_rows.sort_values(key, ignore_index=True),
                                      cut_rows.sort_values(key, ignore_index=True))


def test_merge_fuzz_files_grouped_into_tasks_give_the_rows_of_each_file_alone(merged_corpus):
    """The corpus's small files, a task for each source's files (the default) and a task for each file: the
    same accounting, the same impressions, and the same actions and set-aside rows in the same order."""
    grouped, alone = merged_corpus(), merged_corpus(group_bytes=1)
    assert grouped[:3] == alone[:3]
    assert len(list(grouped[3].glob("actions/*.parquet"))) < len(list(alone[3].glob("actions/*.parquet")))
    grouped_files, alone_files = merged_files(grouped[3] / "impressions"), merged_files(alone[3] / "impressions")
    assert grouped_files == alone_files
    for name in ("actions", "_quarantine"):
        pd.testing.assert_frame_equal(read_all(grouped[3] / name)[1], read_all(alone[3] / name)[1])
