"""The cleaning rules, the canonical action stream and the split (docs/data.md: Cleaning, The action stream
and histories, The split).

Input is RawRows from raw.py (object columns of plain Python values); output is
typed frames ready for tables.write_table, plus the quarantined rows with their
reason. All rules are evaluated on whole columns.

When a row has several problems it is set aside for the first one in this order:
malformed, missing:<field>, bad_id:<field>, bad_time:<field>, bad_impressions, with
fields in raw.FIELDS's order (docs/data.md, Cleaning) — so a row always has exactly one reason.
"""

import itertools

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from recpipe.cli import UserError
from recpipe.raw import FIELDS, true_where
from recpipe.schemas import ADD_TO_CART, CLICK, ORDER, QUARANTINE, US_PER_DAY

INT64_MAX = 2**63 - 1
# Dates and times must lie in years 1 … 9999, the range every downstream tool (Python's datetime) can hold.
FIRST_INSTANT = pd.Timestamp("0001-01-01T00:00:00Z").as_unit("us")
LAST_INSTANT = pd.Timestamp("9999-12-31T23:59:59.999999Z").as_unit("us")
OPTIONAL = {"user_agent", "simple_id"}
IDS = ("customer_id", "item_id", "config_id", "simple_id")
DATES = ("dt", "order_date")
TIMESTAMPS = ("click_time", "occur_at")

# How each action source becomes the canonical stream: (action_type, item field, time field).
ACTION_SOURCES = {
    "clicks": (CLICK, "item_id", "click_time"),
    "add_to_carts": (ADD_TO_CART, "config_id", "occur_at"),
    "previous_orders": (ORDER, "config_id", "order_date"),  # midnight UTC of the order's date
}
DUPLICATE_KEY = ["dt", "ranking_id", "customer_id", "item_id", "position"]


def strip_text(values):
    """Text values stripped (text fields are stripped: docs/data.md, Cleaning); other values untouched."""
    if is_all_text(values):
        to_strip = may_need_stripping(values)
    else:
        to_strip = values.map(type).to_numpy() == str
    if not to_strip.any():
        return values
    stripped = values.copy()
    stripped[to_strip] = values[to_strip].str.strip()
    return stripped


def is_all_text(values):
    """Whether every value is a str or missing (pandas checks in C, without a Python call per value)."""
    return pd.api.types.infer_dtype(values, skipna=True) == "string"


# Only a value that begins or ends with something other than an ASCII letter or digit can change when
# stripped; a timestamp or a date never does. Python strips those few, so its notion of whitespace holds.
_MAY_NEED_STRIPPING = r"^[^0-9A-Za-z]|[^0-9A-Za-z]$"


def may_need_stripping(text):
    """Mask of the str values (all others missing) that may hold leading or trailing whitespace."""
    found = _search_in_arrow(text, _MAY_NEED_STRIPPING)
    return text.notna().to_numpy() if found is None else found


def fullmatch(text, pattern):
    """Mask of the values that are str and match `pattern` whole."""
    if is_all_text(text):
        found = _search_in_arrow(text, f"^(?:{pattern})$")
        if found is not None:
            return found
    return text.str.fullmatch(pattern).fillna(False).to_numpy(dtype=bool)


def _search_in_arrow(text, pattern):
    """Mask of the values (str or missing) where RE2 finds `pattern`, one pass in C; None if Arrow cannot
    hold the text (a lone surrogate, which UTF-8 cannot encode)."""
    try:
        array = pa.array(text, type=pa.string(), from_pandas=True)
    except (pa.ArrowException, UnicodeError):
        return None
    return pc.fill_null(pc.match_substring_regex(array, pattern), False).to_numpy(zero_copy_only=False)


def is_missing(values):
    """None, NaN, or empty text (values are already stripped)."""
    return (values.isna() | values.eq("")).to_numpy(dtype=bool)


def parse_ids(values, strip=False):
    """(int64 array, valid mask): valid ids are integers 1 … 2**63-1, given as numbers or digit strings.

    Booleans and floats (3.0 included) are not ids: a float id has usually lost digits already.
    `strip` strips the strings first, for values that strip_text has not seen (shown items' ids).
    """
    kind = values.map(type).to_numpy()
    candidates = np.full(len(values), None, dtype=object)
    numbers = kind == int
    candidates[numbers] = values[numbers].to_numpy()
    text = kind == str
    if text.any():
        strings = values[text].str.strip() if strip else values[text]
        digits = fullmatch(strings, r"\+?[0-9]{1,19}")
        candidates[np.flatnonzero(text)[digits]] = [int(digit) for digit in strings[digits]]
    has_value = candidates != None  # noqa: E711 (elementwise on an object array)
    valid = np.zeros(len(values), dtype=bool)
    if has_value.any():
        present = candidates[has_value]
        valid[has_value] = ((present >= 1) & (present <= INT64_MAX)).astype(bool)
    ids = np.zeros(len(values), dtype=np.int64)
    ids[valid] = candidates[valid].astype(np.int64)
    return ids, valid


def _text(values):
    if is_all_text(values):
        return values
    return values.where(values.map(type).to_numpy() == str)


def _in_calendar(parsed):
    """NaT outside years 1 … 9999: pandas parses year 0 (and an offset can reach it or year 10000), Python cannot."""
    return parsed.where((parsed >= FIRST_INSTANT) & (parsed <= LAST_INSTANT))


def parse_dates(values):
    """Strict YYYY-MM-DD (pandas alone would accept 2024-3-1) -> midnight UTC; NaT where invalid."""
    text = _text(values)
    text = text.where(fullmatch(text, r"[0-9]{4}-[0-9]{2}-[0-9]{2}"))
    return _in_calendar(pd.to_datetime(text, format="%Y-%m-%d", utc=True, errors="coerce").astype("datetime64[us, UTC]"))


def parse_timestamps(values):
    """ISO 8601 -> UTC (an offset is converted; none means UTC), truncated to microseconds; NaT where invalid."""
    text = _text(values)
    parsed = pd.to_datetime(text, format="ISO8601", utc=True, errors="coerce")
    if parsed.dt.unit == "ns":
        # One string with nanoseconds makes pandas parse the whole column in ns, which cannot hold years
        # outside 1677-2262: those came out NaT. Parse them again at microseconds, so that a row's fate
        # does not depend on its neighbours.
        again = parsed.isna().to_numpy() & text.notna().to_numpy()
        parsed = parsed.dt.as_unit("us")
        if again.any():
            retry = text[again].str.replace(r"(\.[0-9]{6})[0-9]+", r"\1", regex=True)
            parsed[again] = pd.to_datetime(retry, format="ISO8601", utc=True, errors="coerce").dt.as_unit("us")
    return _in_calendar(parsed.dt.as_unit("us"))


def json_text(value):
    """`value` as compact JSON text, however deeply nested (anything JSON lacks, such as bytes, as its str()).

    orjson encodes at most 254 levels of nesting, while a JSON line may hold up to 1024 (orjson's
    decoding limit); deeper values are written level by level here, with no recursion at all.
    """
    try:
        return orjson.dumps(value, default=str).decode()
    except orjson.JSONEncodeError:
        pass
    pieces, stack = [], [(False, value)]
    while stack:
        literal, item = stack.pop()
        if literal:
            pieces.append(item)
        elif isinstance(item, (list, tuple, dict)):
            is_dict = isinstance(item, dict)
            children = list(item.items()) if is_dict else list(item)
            stack.append((True, "}" if is_dict else "]"))
            for i in range(len(children) - 1, -1, -1):
                key, child = children[i] if is_dict else (None, children[i])
                stack.append((False, child))
                if is_dict:
                    stack.append((True, orjson.dumps(str(key)).decode() + ":"))
                if i:
                    stack.append((True, ","))
            stack.append((True, "{" if is_dict else "["))
        else:
            pieces.append(orjson.dumps(item, default=str).decode())
    return "".join(pieces)


def _as_text(values):
    """Text fields: a number (ranking_id 123) becomes its JSON text; None stays None."""
    text = values.copy()
    other = (values.map(type).to_numpy() != str) & ~values.isna().to_numpy()
    if other.any():
        text[other] = [json_text(value) for value in values[other]]
    return text


def validate(frame, source):
    """Parse every field of a RawRows frame; return (reasons, parsed columns).

    `reasons` is an object Series, None for a row that is kept.
    """
    reasons = pd.Series(None, index=frame.index, dtype=object)

    def set_aside(mask, reason):
        reasons[np.asarray(mask, dtype=bool) & reasons.isna().to_numpy()] = reason

    set_aside(frame["malformed"], "malformed")
    fields = {name: strip_text(frame[name]) for name in FIELDS[source]}
    present = {}
    for name in FIELDS[source]:
        present[name] = ~is_missing(fields[name])
        if name not in OPTIONAL:
            set_aside(~present[name], f"missing:{name}")
    parsed = {}
    for name in FIELDS[source]:
        if name in IDS:
            parsed[name], valid = parse_ids(fields[name])
            set_aside(present[name] & ~valid, f"bad_id:{name}")
    for name in FIELDS[source]:
        if name in DATES or name in TIMESTAMPS:
            parsed[name] = (parse_dates if name in DATES else parse_timestamps)(fields[name])
            set_aside(present[name] & parsed[name].isna().to_numpy(), f"bad_time:{name}")
    if source == "impressions":
        set_aside(frame["impressions"].map(type).to_numpy() != list, "bad_impressions")
        parsed["ranking_id"] = _as_text(fields["ranking_id"])
        parsed["user_agent"] = _as_text(fields["user_agent"]).fillna("")
    return reasons, parsed


def quarantine(source_file, rows, reasons, raw):
    return pd.DataFrame({"source_file": source_file, "row": np.asarray(rows, dtype=np.int64),
                         "reason": list(reasons), "raw": list(raw)}, columns=QUARANTINE.names)


def _raw_text(frame, source):
    """The original line where there is one; otherwise the row's fields as JSON."""
    texts = []
    fields = FIELDS[source]
    for raw, values in zip(frame["raw"], frame[list(fields)].itertuples(index=False)):
        if isinstance(raw, bytes):
            texts.append(raw.decode("utf-8", "replace"))
        elif isinstance(raw, str):
            texts.append(raw)
        else:
            texts.append(json_text(dict(zip(fields, values))))
    return texts


def set_aside_rows(frame, reasons, source, source_file):
    bad = reasons.notna().to_numpy()
    rejected = frame[bad]
    return quarantine(source_file, rejected["row"], reasons[bad], _raw_text(rejected, source))


def clean_actions(frame, source, source_file):
    """RawRows frame of one action source -> (canonical actions, quarantined rows)."""
    actions, _, set_aside = clean_action_rows(frame, source, source_file)
    return actions, set_aside


def clean_action_rows(frame, source, source_file):
    """clean_actions, with the row number of each action kept: (actions, their rows, quarantined rows)."""
    reasons, parsed = validate(frame, source)
    kept = reasons.isna().to_numpy()
    action_type, item_field, time_field = ACTION_SOURCES[source]
    actions = pd.DataFrame({
        "customer_id": parsed["customer_id"][kept],
        "item_id": parsed[item_field][kept],
        "action_type": np.full(kept.sum(), action_type, dtype=np.int8),
        "occurred_at": parsed[time_field][kept].array,  # tz-aware; to_numpy() would box every value
    })
    return actions, frame["row"].to_numpy()[kept], set_aside_rows(frame, reasons, source, source_file)


def clean_impressions(frame, source_file):
    """RawRows frame of impressions -> (one row per shown item, quarantined rankings, quarantined items, rankings kept).

    The shown items carry `row` (the ranking's row in its file) so that duplicates
    across files can later be resolved in the files' order.
    """
    reasons, parsed = validate(frame, "impressions")
    kept = reasons.isna().to_numpy()
    rankings = frame["impressions"][kept]
    lengths = rankings.map(len).to_numpy(dtype=np.int64)
    entries = list(itertools.chain.from_iterable(rankings))
    owner = np.repeat(np.arange(kept.sum()), lengths)
    position = np.arange(len(entries)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    item_values = pd.Series([entry.get("item_id") if type(entry) is dict else None for entry in entries], dtype=object)
    is_order = [entry.get("is_order") if type(entry) is dict else None for entry in entries]
    item_ids, item_valid = parse_ids(item_values, strip=True)  # " 13 " is an id here as in any other field
    good = item_valid & np.array([type(value) is bool for value in is_order], dtype=bool)

    def per_ranking(values):
        return np.asarray(values)[kept][owner]

    shown = pd.DataFrame({
        "dt": per_ranking(parsed["dt"].dt.date.to_numpy()),
        "ranking_id": per_ranking(parsed["ranking_id"].to_numpy(dtype=object)),
        "customer_id": per_ranking(parsed["customer_id"]),
        "user_agent": per_ranking(parsed["user_agent"].to_numpy(dtype=object)),
        "item_id": item_ids,
        "is_order": np.array([value is True for value in is_order], dtype=bool),
        "position": position.astype(np.int32),
        "row": per_ranking(frame["row"].to_numpy()),
    })
    bad_entries = np.flatnonzero(~good)
    bad_items = quarantine(
        source_file,
        shown["row"].to_numpy()[bad_entries],
        ["bad_item"] * len(bad_entries),
        [json_text({"ranking_id": shown["ranking_id"].iat[i], "position": int(position[i]), "entry": entries[i]})
         for i in bad_entries],
    )
    return shown[good].reset_index(drop=True), set_aside_rows(frame, reasons, "impressions", source_file), bad_items


def drop_duplicate_impressions(shown):
    """Drop exact duplicate shown items, same (dt, ranking_id, customer_id, item_id, position): docs/data.md, Cleaning.

    `shown` must already be in the raw files' order; the first occurrence is kept.
    """
    duplicated = shown.duplicated(DUPLICATE_KEY).to_numpy()
    return shown[~duplicated].reset_index(drop=True), int(duplicated.sum())


def split_days(days, test_days, val_days, train_days, files_by_day=None):
    """Map each impression day to 'test', 'val', 'train' or 'unused' (docs/data.md, The split).

    The windows are calendar days counted back from the latest impression day, so a
    day with no data (an outage) does not shift train days into val.

    A split that would leave a window without impressions while older days have some is
    refused (UserError, see check_split); `files_by_day` ({day: raw files holding it}, optional)
    lets the message name the files of the days it counts back from.
    """
    days = pd.to_datetime(pd.Series(sorted(set(days))))
    if days.empty:
        return {}
    age = (days.max() - days).dt.days
    check_split(days, age.to_numpy(), test_days, val_days, train_days, files_by_day or {})
    split = np.select(
        [age < test_days, age < test_days + val_days, age < test_days + val_days + train_days],
        ["test", "val", "train"], default="unused",
    )
    return dict(zip(days.dt.date, map(str, split)))


def check_split(days, age, test_days, val_days, train_days, files_by_day):
    """Refuse a split with a window (val or train) that holds no impression day while an older day exists.

    The split counts back from the latest day, so one mistaken far-future date (2034 among days
    of 2024) would make itself the test split and leave every real day unused, or val empty,
    with exit status 0. Told apart by the data alone, never by the clock (a daily run's result
    must not depend on when it ran): real days follow one another, so a window left empty while
    older days have impressions means either a mistaken date or a gap the windows do not span;
    either way the user must decide, so nothing is labelled. A day or two of an outage inside
    a window leaves it holding days, and is not refused.
    """
    windows, start = [], 0
    for name, length in (("test", test_days), ("val", val_days), ("train", train_days)):
        windows.append((name, start, start + length))
        start += length
    empty = [(name, first, end) for name, first, end in windows
             if end > first and not ((age >= first) & (age < end)).any() and (age >= end).any()]
    if not empty:
        return
    latest = days.max()
    counted_from = days[age < empty[0][1]].dt.date.tolist()  # the days before the first empty window
    before = days[age >= empty[0][2]].max()

    def dates(first, end):
        newest, oldest = (latest - pd.Timedelta(days=age) for age in (first, end - 1))
        return f"{newest.date()}" if first == end - 1 else f"{oldest.date()} to {newest.date()}"

    files = sorted({str(file) for day in counted_from for file in files_by_day.get(day, ())})
    one = len(counted_from) == 1
    raise UserError(
        f"the split counts back from the latest impression day, {latest.date()}, which leaves "
        + _and([f"{name} ({dates(first, end)})" for name, first, end in empty])
        + f" without impressions, though older days have them (the latest, {before.date()}, "
        f"{(latest - before).days:,} days earlier): if {_and(list(map(str, counted_from)))} "
        f"{'is a mistaken date' if one else 'are mistaken dates'}, correct or remove {'its' if one else 'their'} "
        f"rankings in the raw impressions{f' ({_and(files)})' if files else ''}; otherwise choose --test-days, "
        "--val-days and --train-days that reach the days you mean")


def _and(names, limit=3):
    """'a', 'a and b', 'a, b and c', 'a, b, c and 4 more'."""
    if len(names) > limit:
        return f"{', '.join(names[:limit])} and {len(names) - limit} more"
    return " and ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else names[0]


# ---------------------------------------------------------------------------------------------
# The same rules on typed columns (raw.Block.table), for the rows that plainly pass them.
#
# A row is taken here only when every field is in the form that needs no judgement: an id
# that is an integer 1 … 2^63-1 (or, in CSV, 1 to 18 digits), text that stripping would not
# change, a date YYYY-MM-DD and a time YYYY-MM-DDTHH:MM:SS[.ffffff][Z|±HH:MM] in years 1678 … 2261
# (where pandas' and our arithmetic agree by construction). Every other row goes back to
# validate() above, so a row ends the same way whichever path read it.

# What str.strip() removes (str.isspace()); a test checks this against Python.
PYTHON_WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
                     "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_YEARS = (1678, 2261)


def _array(column):
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _typed_ids(column):
    """(ids, valid): like parse_ids, for the values that need no judgement (others are not valid here)."""
    column = _array(column)
    if pa.types.is_string(column.type):
        digits = true_where(pc.match_substring_regex(column, r"^[0-9]{1,18}$"))
        column = pc.if_else(pa.array(digits), column, None).cast(pa.int64())
    ids = pc.fill_null(column, 0).to_numpy(zero_copy_only=False)
    return ids, ids >= 1


def _plain_text(column):
    """Mask of the values that are text, not empty, and unchanged by stripping."""
    return true_where(pc.and_(pc.not_equal(column, ""), pc.equal(pc.utf8_trim(column, PYTHON_WHITESPACE), column)))


def _absent(column):
    """Mask of the values an optional field may have without a word: none, or empty text (CSV)."""
    missing = pc.is_null(column).to_numpy(zero_copy_only=False)
    if pa.types.is_string(column.type):
        missing |= true_where(pc.equal(column, ""))
    return missing


class _Text:
    """The first `width` bytes of every value of an Arrow text column, as a matrix, for reading fields at
    fixed places without a Python object per value."""

    def __init__(self, column, width):
        column = _array(column)
        offsets = np.frombuffer(column.buffers()[1], np.int64 if pa.types.is_large_string(column.type) else np.int32)
        starts = offsets[column.offset:column.offset + len(column)].astype(np.int64)
        self.lengths = offsets[column.offset + 1:column.offset + len(column) + 1] - starts
        self.lengths[~column.is_valid().to_numpy(zero_copy_only=False)] = -1  # matches no layout
        data = column.buffers()[2]
        data = np.frombuffer(data, np.uint8) if data is not None and data.size else np.zeros(1, np.uint8)
        # Bytes past a value's end are its neighbours': every layout checks the length first.
        padded = np.concatenate([data, np.zeros(width, np.uint8)])
        self.bytes = np.lib.stride_tricks.sliding_window_view(padded, width)[starts]
        self.width = width
        self.rows = np.arange(len(starts))

    def at(self, position):
        """The byte at `position` (an int, or one per value, inside the value) of every value."""
        if np.isscalar(position):
            return self.bytes[:, position]
        return self.bytes[self.rows, np.clip(position, 0, self.width - 1)]

    def digits(self, position, count):
        """(number, all digits) of the `count` bytes from `position` (an int, or one per value)."""
        number, ok = np.zeros(len(self.rows), dtype=np.int64), np.ones(len(self.rows), dtype=bool)
        for k in range(count):
            digit = self.at(position + k) - np.uint8(48)  # a byte below "0" wraps past 9
            ok &= digit <= 9
            number = number * 10 + digit
        return np.where(ok, number, 0), ok


def _days(text):
    """(days since 1970-01-01, valid) of values that begin YYYY-MM-DD, a real date in _YEARS."""
    year, ok_year = text.digits(0, 4)
    month, ok_month = text.digits(5, 2)
    day, ok_day = text.digits(8, 2)
    valid = ok_year & ok_month & ok_day & (text.at(4) == ord("-")) & (text.at(7) == ord("-"))
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    month_days = np.array([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])[np.clip(month, 0, 12)] + \
        (leap & (month == 2))
    valid &= (year >= _YEARS[0]) & (year <= _YEARS[1]) & (month >= 1) & (month <= 12) & (day >= 1) & \
        (day <= month_days)
    # Howard Hinnant's days_from_civil, for the proleptic Gregorian calendar.
    shifted = year - (month <= 2)
    era, year_of_era = shifted // 400, shifted % 400
    day_of_year = (153 * (month + np.where(month > 2, -3, 9)) + 2) // 5 + day - 1
    days = era * 146097 + year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year - 719468
    return np.where(valid, days, 0), valid


def _typed_dates(column):
    """(microseconds since 1970 UTC of midnight, valid) of the values that are exactly YYYY-MM-DD."""
    text = _Text(column, 10)
    days, valid = _days(text)
    valid &= text.lengths == 10
    return days * US_PER_DAY, valid


def _typed_times(column):
    """(microseconds since 1970 UTC, valid) of the values that are exactly
    YYYY-MM-DDTHH:MM:SS, then optionally .f to .ffffff, then optionally Z or ±HH:MM."""
    text = _Text(column, 32)  # the longest layout, YYYY-MM-DDTHH:MM:SS.ffffff+HH:MM, is 32 bytes
    days, valid = _days(text)
    valid &= (text.lengths >= 19) & (text.lengths <= 32)
    hour, ok_hour = text.digits(11, 2)
    minute, ok_minute = text.digits(14, 2)
    second, ok_second = text.digits(17, 2)
    valid &= ok_hour & ok_minute & ok_second & (text.at(10) == ord("T")) & (text.at(13) == ord(":")) & \
        (text.at(16) == ord(":")) & (hour <= 23) & (minute <= 59) & (second <= 59)
    end = text.lengths
    last = text.at(end - 1)
    sign = text.at(end - 6)
    zoned = ((sign == ord("+")) | (sign == ord("-"))) & (text.at(end - 3) == ord(":")) & (end >= 25)
    zone_hour, ok_zone_hour = text.digits(end - 5, 2)
    zone_minute, ok_zone_minute = text.digits(end - 2, 2)
    zoned &= ok_zone_hour & ok_zone_minute
    valid &= ~zoned | ((zone_hour <= 23) & (zone_minute <= 59))
    fraction_end = end - np.where(zoned, 6, np.where(last == ord("Z"), 1, 0))
    places = fraction_end - 20  # digits after the point, if there is one
    fraction = np.zeros(len(end), dtype=np.int64)
    for k in range(6):
        digit = text.at(20 + k) - np.uint8(48)
        counted = k < places
        valid &= ~counted | (digit <= 9)
        fraction = fraction * 10 + np.where(counted, digit, 0)
    valid &= (fraction_end == 19) | ((text.at(19) == ord(".")) & (places >= 1) & (places <= 6))
    east = np.where(sign == ord("-"), -1, 1)  # +05:30 is 5 h 30 ahead of UTC
    offset = np.where(zoned, east * (zone_hour * 60 + zone_minute), 0)
    instants = days * US_PER_DAY + ((hour * 60 + minute - offset) * 60 + second) * 1_000_000 + fraction
    return np.where(valid, instants, 0), valid


def _timestamps(microseconds):
    return pd.DatetimeIndex(microseconds.astype("datetime64[us]")).tz_localize("UTC").array


def typed_actions(table, rows, source):
    """(plain, actions): which rows of a Block's table plainly pass the rules, and their canonical actions
    (with `row`); the others are for validate()."""
    action_type, item_field, time_field = ACTION_SOURCES[source]
    plain = np.ones(table.num_rows, dtype=bool)
    ids = {}
    for name in FIELDS[source]:
        column = table.column(name)
        if name in IDS:
            ids[name], valid = _typed_ids(column)
            plain &= (valid | _absent(column)) if name in OPTIONAL else valid
        else:
            instants, valid = (_typed_dates if name in DATES else _typed_times)(column)
            plain &= valid
        if name == time_field:
            times = instants
    actions = pd.DataFrame({
        "customer_id": ids["customer_id"][plain],
        "item_id": ids[item_field][plain],
        "action_type": np.full(plain.sum(), action_type, dtype=np.int8),
        "occurred_at": _timestamps(times[plain]),
    })
    return plain, actions, rows[plain]


def typed_impressions(table, rows):
    """(plain, shown): which rankings of a Block's table plainly pass the rules, every entry included, and
    their shown items as clean_impressions gives them (with `row`); the others are for validate()."""
    customers, plain = _typed_ids(table.column("customer_id"))
    days, valid = _typed_dates(table.column("dt"))
    plain &= valid & _plain_text(table.column("ranking_id"))
    user_agents = table.column("user_agent")
    plain &= _absent(user_agents) | _plain_text(user_agents)
    lists = table.column("impressions").combine_chunks()
    plain &= lists.is_valid().to_numpy(zero_copy_only=False)
    entries = pc.list_flatten(lists)
    owners = pc.list_parent_indices(lists).to_numpy()
    item_ids, good = _typed_ids(entries.field("item_id"))
    good &= entries.is_valid().to_numpy(zero_copy_only=False) & entries.field("is_order").is_valid().to_numpy(
        zero_copy_only=False)
    plain[owners[~good]] = False
    taken = plain[owners]
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)[plain]
    position = np.arange(taken.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    owner = np.repeat(np.arange(plain.sum()), lengths)
    dates = (days[plain] // US_PER_DAY).astype("datetime64[D]").astype(object)
    taken_rankings = pa.array(np.flatnonzero(plain)[owner])

    def per_item(column):  # text per shown item, without a Python object per value
        return pc.take(column, taken_rankings).to_pandas()

    shown = pd.DataFrame({
        "dt": dates[owner],
        "ranking_id": per_item(table.column("ranking_id")),
        "customer_id": customers[plain][owner],
        "user_agent": per_item(pc.fill_null(user_agents, "")),
        "item_id": item_ids[taken],
        "is_order": true_where(entries.field("is_order"))[taken],
        "position": position.astype(np.int32),
        "row": rows[plain][owner],
    })
    return plain, shown
