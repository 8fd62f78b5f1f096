"""The planted bad rows and duplicates: the defect kinds per format, the bad values, and how they are written."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recpipe.synthetic.text import _replace

BAD_FRACTION = 0.02
DUPLICATE_FRACTION = 0.005

# The defect kinds each source's formats can express (docs/data.md, Cleaning). Parquet has
# types, so it cannot hold a malformed line, nor an `impressions` that is not a list.
_IMPRESSION_KINDS = ["missing:dt", "missing:ranking_id", "missing:customer_id", "missing:impressions",
                     "bad_id:customer_id", "bad_time:dt", "bad_item"]
KINDS = {
    "impressions": {"jsonl": ["malformed", *_IMPRESSION_KINDS, "bad_impressions"], "parquet": _IMPRESSION_KINDS},
    "clicks": {"jsonl": ["malformed", "missing:dt", "missing:customer_id", "missing:item_id", "missing:click_time",
                         "bad_id:customer_id", "bad_id:item_id", "bad_time:dt", "bad_time:click_time"]},
    "add_to_carts": {"csv": ["malformed", "missing:dt", "missing:customer_id", "missing:config_id",
                             "missing:occur_at", "bad_id:customer_id", "bad_id:config_id", "bad_time:dt",
                             "bad_time:occur_at"]},
    "previous_orders": {
        "jsonl": ["malformed", "missing:order_date", "missing:customer_id", "missing:config_id",
                  "bad_id:customer_id", "bad_id:config_id", "bad_time:order_date"],
        "parquet": ["missing:order_date", "missing:customer_id", "missing:config_id",
                    "bad_id:customer_id", "bad_id:config_id", "bad_time:order_date"],
    },
}
FORMAT_CODES = {"jsonl": 0, "csv": 1, "parquet": 2}

# The bad values, as JSON text (None: the field is left out) or as CSV text.
JSON_MISSING = [None, "null"]
JSON_BAD_IDS = ["0", "-7", '"abc"', "3.5"]
JSON_BAD_DATES = ['"2024-13-45"', '"yesterday"', '"2024-02-30"']
JSON_BAD_TIMESTAMPS = ['"2024-13-45T10:00:00"', '"yesterday"', '"2024-03-01T25:61:00"']
JSON_NOT_LISTS = ['"1,2,3"', "42", '{"item_id":7,"is_order":false}']
NOT_JSON = ["not json", "<html><body>502 Bad Gateway</body></html>", "{'dt': '2024-03-01'}"]
CSV_BAD_IDS = ["abc", "-7", "0"]
CSV_BAD_DATES = ["2024-13-45", "yesterday", "2024-02-30"]
CSV_BAD_TIMESTAMPS = ["2024-13-45T10:00:00", "yesterday", "2024-03-01T25:61:00"]
PARQUET_BAD_IDS = [0, -7]
# Bad entries inside a ranking: (item_id JSON, is_order JSON); "" keeps the good value, None leaves it out.
BAD_ITEMS = [(None, ""), ('"x"', ""), ("2.5", ""), ("", None), ("", '"yes"'), ("", "1")]


def _planted(text, name, reasons, defect, variant, bad_values, missing):
    """A field's text with its missing:<name> rows set to `missing` and its bad_id / bad_time rows to `bad_values`."""
    for prefix, choices in (("missing", missing), *bad_values.items()):
        reason = f"{prefix}:{name}"
        if reason in reasons:
            text = _replace(text, defect == reasons.index(reason), choices, variant)
    return text


def _json_field(text, name, reasons, defect, variant, bad_values):
    return _planted(text, name, reasons, defect, variant, bad_values, JSON_MISSING)


def _csv_field(text, name, reasons, defect, variant, bad_values):
    return _planted(text, name, reasons, defect, variant, bad_values, [""])  # an empty CSV value is missing


def _malformed_json(lines, mask, variant, cut):
    """Truncate the JSON lines in `mask` mid-object, or replace them with text that is not JSON."""
    if not mask.any():
        return lines
    broken = []
    for line, v, c in zip(lines.filter(pa.array(mask)).to_pylist(), variant[mask], cut[mask]):
        # Any proper prefix of a JSON object is invalid: its closing brace is its last character.
        broken.append(NOT_JSON[v % len(NOT_JSON)] if v % 2 else line[: 1 + int(c * (len(line) - 1))])
    return pc.replace_with_mask(lines, pa.array(mask), pa.array(broken, pa.string()))


def _malformed_csv(lines, mask, variant):
    """A CSV row with one value too many or one too few."""
    if not mask.any():
        return lines
    broken = [line + ",1" if v % 2 else line.rsplit(",", 1)[0]
              for line, v in zip(lines.filter(pa.array(mask)).to_pylist(), variant[mask])]
    return pc.replace_with_mask(lines, pa.array(mask), pa.array(broken, pa.string()))


def _with_duplicates(n, duplicate, placement):
    """Row order of a file whose rows in `duplicate` are repeated once, at a random later place."""
    source = np.flatnonzero(duplicate)
    key = np.concatenate([np.arange(n, dtype=np.float64),
                          source + 0.5 + np.floor(placement[source] * (n - source))])
    return np.concatenate([np.arange(n), source])[np.argsort(key, kind="stable")]
