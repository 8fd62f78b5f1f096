"""One class per raw source: its rows, files and defects, its part of _generated.json, and the writing of each file."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from recpipe.schemas import ADD_TO_CART, CLICK, ORDER
from recpipe.synthetic.defects import (BAD_FRACTION, BAD_ITEMS, CSV_BAD_DATES, CSV_BAD_IDS, CSV_BAD_TIMESTAMPS,
                                       DUPLICATE_FRACTION, FORMAT_CODES, JSON_BAD_DATES, JSON_BAD_IDS,
                                       JSON_BAD_TIMESTAMPS, JSON_NOT_LISTS, KINDS, PARQUET_BAD_IDS, _csv_field,
                                       _json_field, _malformed_csv, _malformed_json, _with_duplicates)
from recpipe.synthetic.files import _ParquetFile, _TextFile
from recpipe.synthetic.text import (_dates, _ints, _json_objects, _quoted, _ranking_ids, _replace, _session_ids,
                                    _text_bytes, _timestamps)
from recpipe.synthetic.world import DAYS_BEFORE, FIRST_IMPRESSION_DAY

BACKFILL_ORDERS = 300

CLICK_OFFSETS_MIN = np.array([60, 120, 330, -300, -240, -480, 540, -180, 600, 345])
APP_VERSIONS = ["5.9.2", "5.10.0", "5.11.1", "5.12.0", "5.12.3", "6.0.0-beta"]
CHANNELS = ["web", "app", "app", "web", "marketplace"]


class _Planted:
    """What the blocks so far planted in one source: the defect kinds, whether a duplicate, how many rows and bad
    rows (so that the bad fraction is rounded once over all of them, not per block), and backfilled orders."""

    def __init__(self):
        self.kinds, self.duplicate = set(), False
        self.rows = self.bad = self.backfill = 0


class _Source:
    """One block's rows of one source sorted by file, with their planted defects and duplicates.

    Subclasses set `file_of_row` (file index per row, non-decreasing), `file_names`
    and `file_formats`, call `_plant`, and implement `expected()` (their part of
    _generated.json, which adds up over the blocks) and `write_piece(file, index)` (the
    block's rows of one file, appended to it, from the rows alone, so that the files of a block
    can be written in any order, in parallel, with the same bytes).
    """

    name = None

    def _plant(self, rng, n, planted):
        """Draw one defect (or none) and the duplicate flag of every row, plus their variant draws; `planted`
        (what earlier blocks planted) is updated."""
        formats = np.array([FORMAT_CODES[fmt] for fmt in self.file_formats], dtype=np.int8)[self.file_of_row]
        kinds = KINDS[self.name]
        self.reasons = list(dict.fromkeys(reason for fmt in kinds for reason in kinds[fmt]))
        defect = np.full(n, -1, dtype=np.int16)
        # One row of every kind first, so that even a tiny dataset exercises them all.
        for code, reason in enumerate(self.reasons):
            if reason in planted.kinds:
                continue
            allowed = np.isin(formats, [FORMAT_CODES[fmt] for fmt in kinds if reason in kinds[fmt]])
            free = np.flatnonzero(allowed & (defect < 0))
            if len(free):
                defect[free[rng.integers(len(free))]] = code
        more = max(0, min(n, round(BAD_FRACTION * (planted.rows + n)) - planted.bad) - int((defect >= 0).sum()))
        free = np.flatnonzero(defect < 0)
        extra = free[rng.permutation(len(free))[:more]]
        for fmt, fmt_reasons in kinds.items():
            rows = extra[formats[extra] == FORMAT_CODES[fmt]]
            codes = np.array([self.reasons.index(reason) for reason in fmt_reasons], dtype=np.int16)
            defect[rows] = codes[rng.integers(len(codes), size=len(rows))]
        self.defect = defect
        self.variant = rng.integers(0, 2**31, n)
        self.cut = rng.random(n)
        candidates = self._duplicable() & (defect < 0)
        self.duplicate = candidates & (rng.random(n) < DUPLICATE_FRACTION)
        if candidates.any() and not self.duplicate.any() and not planted.duplicate:  # so that a tiny dataset has one
            self.duplicate[np.flatnonzero(candidates)[rng.integers(int(candidates.sum()))]] = True
        planted.kinds.update(self.reasons[code] for code in np.unique(defect[defect >= 0]))
        planted.rows += n
        planted.bad += int((defect >= 0).sum())
        planted.duplicate |= bool(self.duplicate.any())
        self.placement = rng.random(n)
        bounds = np.searchsorted(self.file_of_row, np.arange(len(self.file_names) + 1))
        self.file_bounds = list(zip(bounds[:-1], bounds[1:]))

    def _duplicable(self):
        return np.zeros(len(self.defect), dtype=bool)

    @property
    def n_files(self):
        return len(self.file_names)

    def open_file(self, folder, index):
        path = folder / self.file_names[index]
        return _ParquetFile(path) if self.file_formats[index] == "parquet" else _TextFile(path, self._header(index))

    def _header(self, index):
        return None

    def rows_in(self):
        return int(len(self.defect) + self.duplicate.sum())

    def quarantined(self, exclude=()):
        codes, counts = np.unique(self.defect[self.defect >= 0], return_counts=True)
        return {self.reasons[code]: int(count) for code, count in zip(codes, counts)
                if self.reasons[code] not in exclude}

    def _action_expected(self, key_columns):
        """rows_in, quarantined by reason, and exact duplicates among the valid rows on the canonical key."""
        valid = np.flatnonzero(self.defect < 0)
        rows = np.concatenate([valid, np.flatnonzero(self.duplicate)])
        keys = pd.DataFrame({name: column[rows] for name, column in key_columns.items()})
        return {"rows_in": self.rows_in(), "quarantined": dict(sorted(self.quarantined().items())),
                "exact_duplicates": int(keys.duplicated().sum())}


class _Impressions(_Source):
    name = "impressions"

    def __init__(self, rng, world, rankings, shown, user_agents, planted):
        self.rankings, self.shown = rankings, shown
        n = len(rankings["customer_id"])
        self.file_of_row = rankings["impression_day"]
        days = np.arange(world.days)
        self.dates = [str(FIRST_IMPRESSION_DAY + int(day)) for day in days]
        self.file_formats = ["parquet" if day == world.days - 3 else "jsonl" for day in days]
        self.file_names = [f"{date}.parquet" if fmt == "parquet" else f"{date}.jsonl" + (".gz" if day % 2 else "")
                           for day, date, fmt in zip(days, self.dates, self.file_formats)]
        self._plant(rng, n, planted)
        self.ranking_id = _ranking_ids(rng, n)
        self.ua_table, self.ua_code = user_agents
        self.ua_json = pa.array(["null" if agent is None else json.dumps(agent) for agent in self.ua_table])
        # An index into APP_VERSIONS + [None]: most rows do not carry the field.
        self.app_version = np.where(rng.random(n) < 0.03, rng.integers(0, len(APP_VERSIONS), n), len(APP_VERSIONS))
        # Bad entries inside rankings whose defect is bad_item: one, or two at distinct positions.
        self.entry_defect = np.full(len(shown["item_id"]), -1, dtype=np.int8)
        bad = np.flatnonzero(self.defect == self.reasons.index("bad_item"))
        length, offset = rankings["length"][bad], rankings["offset"][bad]
        first = (rng.random(len(bad)) * length).astype(np.int64)
        second = (first + 1 + (rng.random(len(bad)) * (length - 1)).astype(np.int64)) % length
        two = rng.random(len(bad)) < 0.3
        positions = np.concatenate([offset + first, (offset + second)[two]])
        self.entry_defect[positions] = rng.integers(0, len(BAD_ITEMS), len(positions))

    def _duplicable(self):
        return np.ones(len(self.rankings["customer_id"]), dtype=bool)

    def expected(self):
        length = self.rankings["length"]
        kept = (self.defect < 0) | (self.defect == self.reasons.index("bad_item"))
        duplicate_items = int(length[self.duplicate].sum())
        return {
            "rankings_in": self.rows_in(),
            "rankings_quarantined": dict(sorted(self.quarantined(exclude={"bad_item"}).items())),
            "shown_items_in": int(length[kept].sum()) + duplicate_items,
            "shown_items_quarantined": {"bad_item": int((self.entry_defect >= 0).sum())},
            "shown_items_duplicates": duplicate_items,
        }

    def write_piece(self, file, index):
        start, stop = self.file_bounds[index]
        entries = slice(self.rankings["offset"][start], self.rankings["offset"][stop])
        order = pa.array(_with_duplicates(stop - start, self.duplicate[start:stop], self.placement[start:stop]))
        if self.file_formats[index] == "parquet":
            file.append(self._table(start, stop, entries).take(order))
        else:
            file.append(_text_bytes(self._lines(start, stop, entries).take(order)))

    def _lines(self, start, stop, entries):
        rows = slice(start, stop)
        defect, variant = self.defect[rows], self.variant[rows]
        entry_defect = self.entry_defect[entries]
        item_text = _ints(self.shown["item_id"][entries])
        order_text = pc.take(pa.array(["false", "true"]), pa.array(self.shown["is_order"][entries].astype(np.int8)))
        for code, (bad_item, bad_order) in enumerate(BAD_ITEMS):
            mask = entry_defect == code
            if bad_item != "":
                item_text = _replace(item_text, mask, [bad_item], np.zeros(len(mask), dtype=np.int64))
            if bad_order != "":
                order_text = _replace(order_text, mask, [bad_order], np.zeros(len(mask), dtype=np.int64))
        entry_text = _json_objects({"item_id": item_text, "is_order": order_text})
        offsets = self.rankings["offset"][start:stop + 1] - self.rankings["offset"][start]
        joined = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), entry_text), ",")
        impressions = pc.binary_join_element_wise("[", joined, "]", "")
        reasons = self.reasons
        fields = {
            "dt": _json_field(_quoted(_dates(self.rankings["day"][rows])), "dt", reasons, defect, variant,
                              {"bad_time": JSON_BAD_DATES}),
            "ranking_id": _json_field(_quoted(self.ranking_id[start:stop]), "ranking_id", reasons, defect, variant, {}),
            "customer_id": _json_field(_ints(self.rankings["customer_id"][rows]), "customer_id", reasons, defect,
                                       variant, {"bad_id": JSON_BAD_IDS}),
            "user_agent": pc.take(self.ua_json, pa.array(self.ua_code[rows])),
            "impressions": _json_field(impressions, "impressions", reasons, defect, variant, {}),
            "app_version": pc.take(pa.array([f'"{version}"' for version in APP_VERSIONS] + [None], pa.string()),
                                   pa.array(self.app_version[rows])),
        }
        mask = defect == reasons.index("bad_impressions")
        fields["impressions"] = _replace(fields["impressions"], mask, JSON_NOT_LISTS, variant)
        lines = _json_objects(fields)
        return _malformed_json(lines, defect == reasons.index("malformed"), variant, self.cut[rows])

    def _table(self, start, stop, entries):
        rows = slice(start, stop)
        defect, variant = self.defect[rows], self.variant[rows]
        reasons = self.reasons

        def has(reason):
            return defect == reasons.index(reason)

        entry_defect = self.entry_defect[entries]
        # A bad entry in Parquet is a null field: its types cannot hold "x" or "yes".
        entry_struct = pa.StructArray.from_arrays(
            [pa.array(self.shown["item_id"][entries], pa.int64(), mask=(entry_defect >= 0) & (entry_defect < 3)),
             pa.array(self.shown["is_order"][entries], pa.bool_(), mask=entry_defect >= 3)],
            names=["item_id", "is_order"])
        offsets = self.rankings["offset"][start:stop + 1] - self.rankings["offset"][start]
        impressions = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), entry_struct,
                                               mask=pa.array(has("missing:impressions")))
        dt = _replace(_dates(self.rankings["day"][rows]), has("bad_time:dt"), [s.strip('"') for s in JSON_BAD_DATES],
                      variant)
        customer = self.rankings["customer_id"][rows].copy()
        bad_ids = has("bad_id:customer_id")
        customer[bad_ids] = np.array(PARQUET_BAD_IDS)[variant[bad_ids] % len(PARQUET_BAD_IDS)]
        ua = pa.array(self.ua_table, pa.string()).take(pa.array(self.ua_code[rows]))
        return pa.table({
            "dt": pc.if_else(pa.array(has("missing:dt")), pa.scalar(None, pa.string()), dt),
            "ranking_id": pc.if_else(pa.array(has("missing:ranking_id")), pa.scalar(None, pa.string()),
                                     self.ranking_id[start:stop]),
            "customer_id": pa.array(customer, pa.int64(), mask=has("missing:customer_id")),
            "user_agent": ua,
            "impressions": impressions,
            "app_version": pa.array(APP_VERSIONS + [None], pa.string()).take(pa.array(self.app_version[rows])),
        })


class _Actions(_Source):
    """Clicks or add-to-carts: one file per action day, rows in time order."""

    action_type = None

    def __init__(self, rng, world, actions, planted):
        mine = np.flatnonzero(actions["action_type"] == self.action_type)
        mine = mine[np.lexsort((actions["time_us"][mine],))]
        self.customer_id = actions["customer_id"][mine]
        self.item_id = actions["item_id"][mine]
        self.time_us = actions["time_us"][mine]
        self.day = actions["day"][mine]
        self.file_of_row = self.day - world.first_action_day
        self.dates = [str(FIRST_IMPRESSION_DAY - DAYS_BEFORE + day) for day in range(world.action_days)]
        self._set_files(world)
        self._plant(rng, len(mine), planted)
        self._draw(rng, len(mine))

    def _duplicable(self):
        return np.ones(len(self.customer_id), dtype=bool)

    def expected(self):
        return self._action_expected({"customer_id": self.customer_id, "item": self.item_id,
                                      "occurred_at": self.time_us})

    def write_piece(self, file, index):
        start, stop = self.file_bounds[index]
        lines = self._lines(start, stop, index)
        order = _with_duplicates(stop - start, self.duplicate[start:stop], self.placement[start:stop])
        file.append(_text_bytes(lines.take(pa.array(order))))


class _Clicks(_Actions):
    name = "clicks"
    action_type = CLICK

    def _set_files(self, world):
        self.file_formats = ["jsonl"] * world.action_days
        self.file_names = [f"{date}.jsonl.gz" for date in self.dates]

    def _draw(self, rng, n):
        # 10% carry a non-UTC offset (the same instant), 20% end in Z, the rest carry no offset (UTC).
        draw = rng.random(n)
        self.offset_code = np.where(draw < 0.1, rng.integers(0, len(CLICK_OFFSETS_MIN), n), -1)
        self.zulu = draw >= 0.8
        self.with_session = rng.random(n) < 0.05

    def _lines(self, start, stop, index):
        rows = slice(start, stop)
        defect, variant, reasons = self.defect[rows], self.variant[rows], self.reasons
        offset_code = self.offset_code[rows]
        offset_min = np.where(offset_code >= 0, CLICK_OFFSETS_MIN[offset_code], 0)
        suffixes = [f"{'+' if m >= 0 else '-'}{abs(m) // 60:02d}:{abs(m) % 60:02d}" for m in CLICK_OFFSETS_MIN]
        suffix = pa.array(suffixes + ["", "Z"]).take(
            pa.array(np.where(offset_code >= 0, offset_code, len(suffixes) + self.zulu[rows])))
        # Local wall-clock time plus its offset: the same instant as time_us.
        click_time = pc.binary_join_element_wise(_timestamps(self.time_us[rows] + offset_min * 60 * 10**6), suffix, "")
        session = _quoted(_session_ids(self.customer_id[rows], self.day[rows]))
        fields = {
            "dt": _json_field(_quoted(_dates(self.day[rows])), "dt", reasons, defect, variant,
                              {"bad_time": JSON_BAD_DATES}),
            "customer_id": _json_field(_ints(self.customer_id[rows]), "customer_id", reasons, defect, variant,
                                       {"bad_id": JSON_BAD_IDS}),
            "item_id": _json_field(_ints(self.item_id[rows]), "item_id", reasons, defect, variant,
                                   {"bad_id": JSON_BAD_IDS}),
            "click_time": _json_field(_quoted(click_time), "click_time", reasons, defect, variant,
                                      {"bad_time": JSON_BAD_TIMESTAMPS}),
            "session_id": pc.if_else(pa.array(self.with_session[rows]), session, pa.scalar(None, pa.string())),
        }
        return _malformed_json(_json_objects(fields), defect == reasons.index("malformed"), variant, self.cut[rows])


class _AddToCarts(_Actions):
    name = "add_to_carts"
    action_type = ADD_TO_CART
    columns = ["dt", "customer_id", "config_id", "simple_id", "occur_at"]

    def _set_files(self, world):
        self.file_formats = ["csv"] * world.action_days
        self.file_names = [f"{date}.csv" + (".gz" if day % 3 == 2 else "") for day, date in enumerate(self.dates)]
        self.with_channel = [day % 10 == 4 for day in range(world.action_days)]

    def _draw(self, rng, n):
        # The size variant: optional, so left empty on some rows.
        self.simple_id = np.where(rng.random(n) < 0.08, -1, self.item_id * 10 + rng.integers(1, 8, n))
        self.zulu = rng.random(n) < 0.3
        self.channel = rng.integers(0, len(CHANNELS), n)

    def _header(self, index):
        return ",".join(self.columns + (["channel"] if self.with_channel[index] else []))

    def _lines(self, start, stop, index):
        rows = slice(start, stop)
        defect, variant, reasons = self.defect[rows], self.variant[rows], self.reasons
        simple = self.simple_id[rows]
        occur_at = pc.binary_join_element_wise(
            _timestamps(self.time_us[rows]), pa.array(["", "Z"]).take(pa.array(self.zulu[rows].astype(np.int8))), "")
        values = [
            _csv_field(_dates(self.day[rows]), "dt", reasons, defect, variant, {"bad_time": CSV_BAD_DATES}),
            _csv_field(_ints(self.customer_id[rows]), "customer_id", reasons, defect, variant,
                       {"bad_id": CSV_BAD_IDS}),
            _csv_field(_ints(self.item_id[rows]), "config_id", reasons, defect, variant, {"bad_id": CSV_BAD_IDS}),
            pc.if_else(pa.array(simple < 0), "", _ints(simple)),
            _csv_field(occur_at, "occur_at", reasons, defect, variant, {"bad_time": CSV_BAD_TIMESTAMPS}),
        ]
        if self.with_channel[index]:
            values.append(pa.array(CHANNELS).take(pa.array(self.channel[rows])))
        lines = pc.binary_join_element_wise(*values, ",")
        return _malformed_csv(lines, defect == reasons.index("malformed"), variant)


class _PreviousOrders(_Source):
    """Orders from the action stream plus every ordered shown item: weekly Parquet files and one JSON Lines backfill."""

    name = "previous_orders"

    def __init__(self, rng, block, actions, rankings, shown, planted):
        world = block.world
        ordered = actions["action_type"] == ORDER
        shown_ordered = shown["is_order"]
        day = np.concatenate([actions["day"][ordered], rankings["day"][shown["owner"]][shown_ordered]])
        customer = np.concatenate([actions["customer_id"][ordered],
                                   rankings["customer_id"][shown["owner"]][shown_ordered]])
        config = np.concatenate([actions["item_id"][ordered], shown["item_id"][shown_ordered]])
        weeks = (world.action_days + 6) // 7
        file_of_row = (day - world.first_action_day) // 7
        # The block's share of BACKFILL_ORDERS (at most a quarter of its orders), and one at least until the
        # backfill has one, so that a tiny dataset has its JSON Lines defects too.
        share = (round(BACKFILL_ORDERS * (block.first - 1 + block.customers) / world.customers)
                 - round(BACKFILL_ORDERS * (block.first - 1) / world.customers))
        take = min(share, len(day) // 4)
        if not planted.backfill:
            take = max(1, take)
        backfill = rng.permutation(len(day))[:take]
        planted.backfill += len(backfill)
        file_of_row[backfill] = weeks
        order = np.lexsort((config, customer, day, file_of_row))
        self.day, self.customer_id, self.config_id = day[order], customer[order], config[order]
        self.file_of_row = file_of_row[order]
        self.file_formats = ["parquet"] * weeks + ["jsonl"]
        self.file_names = [f"{FIRST_IMPRESSION_DAY - DAYS_BEFORE + 7 * week}.parquet" for week in range(weeks)]
        self.file_names.append("backfill.jsonl")
        self._plant(rng, len(day), planted)
        self.with_channel = rng.random(len(day)) < 0.2
        self.channel = rng.integers(0, len(CHANNELS), len(day))

    def _duplicable(self):
        return np.zeros(len(self.day), dtype=bool)  # repeated orders occur naturally

    def expected(self):
        return self._action_expected({"customer_id": self.customer_id, "item": self.config_id,
                                      "occurred_at": self.day})

    def write_piece(self, file, index):
        start, stop = self.file_bounds[index]
        rows = slice(start, stop)
        defect, variant, reasons = self.defect[rows], self.variant[rows], self.reasons

        def has(reason):
            return defect == reasons.index(reason)

        if self.file_formats[index] == "parquet":
            order_date = _replace(_dates(self.day[rows]), has("bad_time:order_date"), CSV_BAD_DATES, variant)
            ids = {}
            for name, values in (("customer_id", self.customer_id), ("config_id", self.config_id)):
                values = values[rows].copy()
                bad = has(f"bad_id:{name}")
                values[bad] = np.array(PARQUET_BAD_IDS)[variant[bad] % len(PARQUET_BAD_IDS)]
                ids[name] = pa.array(values, pa.int64(), mask=has(f"missing:{name}"))
            table = pa.table({
                "order_date": pc.if_else(pa.array(has("missing:order_date")), pa.scalar(None, pa.string()),
                                         order_date),
                **ids,
            })
            file.append(table)
            return
        fields = {
            "order_date": _json_field(_quoted(_dates(self.day[rows])), "order_date", reasons, defect, variant,
                                      {"bad_time": JSON_BAD_DATES}),
            "customer_id": _json_field(_ints(self.customer_id[rows]), "customer_id", reasons, defect, variant,
                                       {"bad_id": JSON_BAD_IDS}),
            "config_id": _json_field(_ints(self.config_id[rows]), "config_id", reasons, defect, variant,
                                     {"bad_id": JSON_BAD_IDS}),
            "channel": pc.if_else(pa.array(self.with_channel[rows]),
                                  pa.array([f'"{c}"' for c in CHANNELS]).take(pa.array(self.channel[rows])),
                                  pa.scalar(None, pa.string())),
        }
        lines = _malformed_json(_json_objects(fields), has("malformed"), variant, self.cut[rows])
        file.append(_text_bytes(lines))
