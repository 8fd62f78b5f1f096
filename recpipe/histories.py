"""The history rule and the activity features (docs/data.md: The action stream and histories, Features),
for one customer bucket.

For a customer shown items on day D, the history is every action of that customer
with D − lookback ≤ occurred_at < D (both bounds at midnight UTC), most recent first
(occurred_at, then action_type, then item_id, all descending), of which the first
`max_history` are kept.

No join of impressions to actions: the bucket's actions arrive sorted ascending by
(customer_id, occurred_at, action_type, item_id), so the actions of one customer
before one midnight form a prefix of that customer's run, and the window of a
(customer, day) is a slice found by binary search. Because both bounds are
midnights, `t < D` is the same as `day(t) < day(D)`, so one integer key per action,
(customer rank, day), is enough to search on. The slice read backwards is the history's
order; counts per window come from cumulative sums. Cost: O((actions + keys) log
actions) and memory linear in the bucket.

The rule yields windows (history_windows): where each key's history ends in the bucket's
sorted actions, and how long it is. The compact and wide layouts expand them into one list
per key (compute_histories); the timeline layout keeps each customer's run of actions once
and the windows as (history_end, history_length) into it (timelines).
"""

import numpy as np
import pandas as pd
import pyarrow as pa

from recpipe.schemas import ADD_TO_CART, CLICK, ORDER, US_PER_DAY

COUNT_WINDOWS = (7, 30)
ACTION_NAMES = {CLICK: "clicks", ADD_TO_CART: "atc", ORDER: "orders"}
# In the order preprocess writes them (docs/data.md, Features).
NUMERIC_FEATURES = [f"num_{ACTION_NAMES[t]}_{k}d" for k in COUNT_WINDOWS for t in (CLICK, ADD_TO_CART, ORDER)] + [
    "num_actions_lookback", "num_history_len", "num_days_since_last"]
COUNT_FEATURES = NUMERIC_FEATURES[:-1]  # log1p-ed before scaling; days_since_last is not a count


def _days(timestamps_us):
    return np.floor_divide(timestamps_us, US_PER_DAY)


class Windows:
    """The history rule's answer for every key of a bucket, in the keys' order.

    end:      index (into the bucket's sorted actions) one past the key's most recent action before D
    length:   how many actions before `end` are its history (at most max_history)
    features: the raw num_* features (not yet log1p-ed or scaled), float64
    and the bucket's actions as arrays: customer, occurred_us, action_type, item_id.
    """

    def __init__(self, **fields):
        self.__dict__.update(fields)


def history_windows(actions, keys, lookback_days, max_history):
    """The history rule and the activity features for every (customer_id, dt) in `keys`.

    actions: DataFrame customer_id int64, item_id int64, action_type int8, occurred_at
             datetime64[us, UTC], sorted ascending by (customer_id, occurred_at,
             action_type, item_id) — repartitioned/ guarantees it (checked here by day).
    keys:    DataFrame customer_id int64, dt (date or datetime64) — the days each
             customer was shown items.
    """
    customer = actions["customer_id"].to_numpy(np.int64)
    occurred_us = actions["occurred_at"].dt.as_unit("us").astype("int64").to_numpy()
    action_type = actions["action_type"].to_numpy(np.int8)
    key_customer = keys["customer_id"].to_numpy(np.int64)
    key_day = pd.to_datetime(keys["dt"]).to_numpy().astype("datetime64[D]").astype(np.int64)

    # One searchable integer per action and per bound: rank of the customer among the
    # bucket's customers, then the day. Keys' customers absent from the actions sort
    # correctly too (their rank is where they would be, with empty ranges).
    customers = np.unique(np.concatenate([customer, key_customer]))
    first_day = min(_days(occurred_us).min(initial=0), key_day.min(initial=0) - lookback_days - 1)
    span = max(_days(occurred_us).max(initial=0), key_day.max(initial=0)) - first_day + 2
    action_key = np.searchsorted(customers, customer) * span + (_days(occurred_us) - first_day)
    base = np.searchsorted(customers, key_customer) * span - first_day
    if len(action_key) > 1 and (np.diff(action_key) < 0).any():
        raise ValueError("actions must be sorted by customer_id, occurred_at (as repartition.py writes them)")

    def first_at_or_after(day):
        """Index of the first action of the key's customer on or after `day` (midnight)."""
        return np.searchsorted(action_key, base + day, side="left")

    end = first_at_or_after(key_day)                       # first action at or after D: excluded
    start = first_at_or_after(key_day - lookback_days)     # first action at or after D - lookback
    length = np.minimum(end - start, max_history)

    features = {}
    for days in COUNT_WINDOWS:
        window_start = np.maximum(first_at_or_after(key_day - days), start)
        for type_code, name in ACTION_NAMES.items():
            is_type = np.zeros(len(action_type) + 1, dtype=np.int64)
            np.cumsum(action_type == type_code, out=is_type[1:])
            features[f"num_{name}_{days}d"] = (is_type[end] - is_type[window_start]).astype(np.float64)
    features["num_actions_lookback"] = (end - start).astype(np.float64)
    features["num_history_len"] = length.astype(np.float64)
    has_any = end > start
    last_us = occurred_us[np.where(has_any, end - 1, 0)] if len(occurred_us) else np.zeros(len(keys), np.int64)
    features["num_days_since_last"] = np.where(
        has_any, (key_day * US_PER_DAY - last_us) / US_PER_DAY, float(lookback_days))
    return Windows(end=end, length=length, features=features, key_customer=key_customer, key_day=key_day,
                   customer=customer, occurred_us=occurred_us, action_type=action_type,
                   item_id=actions["item_id"].to_numpy(np.int64))


def compute_histories(actions, keys, lookback_days, max_history):
    """Histories and activity features for every (customer_id, dt) in `keys` (see history_windows).

    Returns an Arrow table, one row per key in the keys' order: customer_id, dt, the
    raw (not yet log1p-ed or scaled) num_* features, and the lists history_items (raw
    item ids), history_action_types and history_occurred_at (µs since the epoch, kept
    so that the leak guard can check what was produced), most recent first.
    """
    windows = history_windows(actions, keys, lookback_days, max_history)
    offsets, taken = window_indices(windows)

    def lists(values, dtype):
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values[taken], dtype))

    return pa.table({
        "customer_id": pa.array(windows.key_customer, pa.int64()),
        "dt": pa.array(keys["dt"].to_numpy().astype("datetime64[D]"), pa.date32()),
        **{name: pa.array(windows.features[name], pa.float64()) for name in NUMERIC_FEATURES},
        "history_items": lists(windows.item_id, pa.int64()),
        "history_action_types": lists(windows.action_type, pa.int8()),
        "history_occurred_at": lists(windows.occurred_us, pa.int64()),
    })


def window_indices(windows):
    """(offsets, taken): every key's history as indices into the bucket's actions, most recent first, one
    key after another (`offsets`, one more than keys, say where each key's begin)."""
    offsets = np.zeros(len(windows.length) + 1, dtype=np.int64)
    np.cumsum(windows.length, out=offsets[1:])
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], windows.length)
    return offsets, np.repeat(windows.end - 1, windows.length) - within


def history_item_counts(windows):
    """How often each item occurs in the keys' histories, counted without expanding them: a Series of
    counts indexed by item id, for the items that occur. An action lies in as many histories as windows
    cover it, which a running sum of window starts and ends gives."""
    actions = len(windows.item_id)
    starts = np.bincount(windows.end - windows.length, minlength=actions + 1)
    ends = np.bincount(windows.end, minlength=actions + 1)
    covered = np.cumsum(starts - ends)[:actions]
    codes, items = pd.factorize(windows.item_id)
    counts = np.bincount(codes, weights=covered, minlength=len(items)).astype(np.int64)
    return pd.Series(counts, index=items, dtype="int64")[counts > 0]


def timelines(windows):
    """Each customer's actions once, oldest first, and every key's window into them (docs/data.md, Layouts).

    A customer's timeline is its run of the bucket's sorted actions, cut to what its keys'
    windows reach (from the earliest window's start to the latest window's end). Returns
    (customers, offsets, taken, history_end): the customers with keys, ascending; their
    timelines' bounds in `taken` (offsets, one more than customers); `taken`, the indices of
    the timelines' actions in the bucket's arrays; and per key, history_end into its
    customer's timeline (history_length is windows.length).
    """
    order = np.argsort(windows.key_customer, kind="stable")
    customers, first = np.unique(windows.key_customer[order], return_index=True)
    window_start = windows.end - windows.length
    starts = np.minimum.reduceat(window_start[order], first) if len(order) else np.zeros(0, np.int64)
    ends = np.maximum.reduceat(windows.end[order], first) if len(order) else np.zeros(0, np.int64)
    sizes = ends - starts
    offsets = np.zeros(len(customers) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    taken = np.repeat(starts, sizes) + (np.arange(offsets[-1]) - np.repeat(offsets[:-1], sizes))
    row_of_key = np.searchsorted(customers, windows.key_customer)
    history_end = windows.end - starts[row_of_key]
    return customers, offsets, taken, history_end


def padded(lists, rows, length, dtype):
    """The lists at `rows` as a [len(rows), length] array, right-padded with 0 (numpy, no row loop)."""
    offsets = lists.offsets.to_numpy()
    values = lists.values.to_numpy()
    starts, lengths = offsets[rows], np.minimum(offsets[rows + 1] - offsets[rows], length)
    out = np.zeros((len(rows), length), dtype=dtype)
    row_of = np.repeat(np.arange(len(rows)), lengths)
    column = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[row_of, column] = values[np.repeat(starts, lengths) + column]
    return out
