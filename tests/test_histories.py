"""The history rule and activity features, pinned on hand-built actions and held to a plain loop."""

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from recpipe.histories import NUMERIC_FEATURES, compute_histories, history_item_counts, history_windows

D = dt.date(2024, 3, 10)


def actions_frame(*rows):
    """(customer_id, item_id, action_type, occurred_at ISO) rows, sorted as repartition.py writes them."""
    frame = pd.DataFrame(rows, columns=["customer_id", "item_id", "action_type", "occurred_at"])
    frame["occurred_at"] = pd.to_datetime(frame["occurred_at"], utc=True, format="ISO8601").dt.as_unit("us")
    frame["action_type"] = frame["action_type"].astype(np.int8)
    return frame.sort_values(["customer_id", "occurred_at", "action_type", "item_id"], ignore_index=True)


def histories_of(actions, keys, lookback_days=365, max_history=1000):
    """compute_histories at literal parameters (preprocess.py's defaults unless a test says otherwise)."""
    keys = pd.DataFrame(keys, columns=["customer_id", "dt"])
    return compute_histories(actions, keys, lookback_days, max_history).to_pandas()


def test_histories_exclude_midnight_of_d_and_include_midnight_of_d_minus_lookback():
    actions = actions_frame(
        (1, 10, 1, "2024-03-10T00:00:00Z"),         # exactly midnight of D: excluded
        (1, 11, 1, "2024-03-09T23:59:59.999999Z"),  # last microsecond before D: included
        (1, 12, 1, "2024-03-03T00:00:00Z"),         # exactly D - 7 days with lookback 7: included
        (1, 13, 1, "2024-03-02T23:59:59.999999Z"),  # just before D - lookback: excluded
    )
    row = histories_of(actions, [(1, D)], lookback_days=7).iloc[0]
    assert list(row.history_items) == [11, 12]


def test_histories_break_time_ties_by_action_type_then_item_descending():
    actions = actions_frame((1, 5, 1, "2024-03-05T12:00:00Z"), (1, 9, 1, "2024-03-05T12:00:00Z"),
                            (1, 7, 3, "2024-03-05T12:00:00Z"), (1, 8, 2, "2024-03-05T12:00:00Z"),
                            (1, 1, 1, "2024-03-06T00:00:00Z"))
    row = histories_of(actions, [(1, D)]).iloc[0]
    assert list(row.history_items) == [1, 7, 8, 9, 5]
    assert list(row.history_action_types) == [1, 3, 2, 1, 1]


def test_histories_keep_the_1000_most_recent_of_1500():
    times = pd.date_range("2024-01-01", periods=1500, freq="h", tz="UTC")
    actions = actions_frame(*[(1, i, 1, t.isoformat()) for i, t in enumerate(times)])
    row = histories_of(actions, [(1, D)]).iloc[0]
    assert list(row.history_items) == list(range(1499, 499, -1))
    assert row.num_history_len == 1000 and row.num_actions_lookback == 1500


def test_histories_customer_without_actions_has_empty_lists_and_lookback_days_since_last():
    actions = actions_frame((1, 10, 1, "2024-03-01T00:00:00Z"))
    row = histories_of(actions, [(2, D)], lookback_days=365).iloc[0]
    assert list(row.history_items) == [] and list(row.history_action_types) == []
    assert row.num_days_since_last == 365
    assert row[[n for n in NUMERIC_FEATURES if n != "num_days_since_last"]].sum() == 0


def test_histories_an_order_counts_at_midnight_of_its_date():
    # merge_and_clean gives orders midnight UTC; an order dated D is not in D's history.
    actions = actions_frame((1, 10, 3, "2024-03-09T00:00:00Z"), (1, 11, 3, "2024-03-10T00:00:00Z"))
    row = histories_of(actions, [(1, D)]).iloc[0]
    assert list(row.history_items) == [10]
    assert row.num_days_since_last == 1.0
    assert row.num_orders_7d == 1


def test_histories_count_windows_by_type_with_the_strict_before_rule():
    actions = actions_frame((1, 1, 1, "2024-03-09T10:00:00Z"), (1, 2, 2, "2024-03-03T00:00:00Z"),
                            (1, 3, 1, "2024-03-02T00:00:00Z"), (1, 4, 3, "2024-02-09T00:00:00Z"),
                            (1, 5, 3, "2024-02-08T23:00:00Z"), (1, 6, 1, "2024-03-10T01:00:00Z"))
    row = histories_of(actions, [(1, D)]).iloc[0]
    assert (row.num_clicks_7d, row.num_atc_7d, row.num_orders_7d) == (1, 1, 0)
    assert (row.num_clicks_30d, row.num_atc_30d, row.num_orders_30d) == (2, 1, 1)
    assert row.num_actions_lookback == 5
    assert row.num_days_since_last == pytest.approx(14 / 24)


def reference_histories(actions, keys, lookback_days, max_history):
    """The obviously-correct version: for each key, filter, sort, cut."""
    rows = []
    for customer_id, day in keys:
        d = pd.Timestamp(day, tz="UTC")
        mine = actions[(actions.customer_id == customer_id) & (actions.occurred_at < d)
                       & (actions.occurred_at >= d - pd.Timedelta(days=lookback_days))]
        mine = mine.sort_values(["occurred_at", "action_type", "item_id"], ascending=False).head(max_history)
        rows.append((list(mine.item_id), list(mine.action_type)))
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_histories_agree_with_a_plain_pandas_loop_on_random_data(seed):
    rng = np.random.default_rng(seed)
    n = 3000
    start = pd.Timestamp("2024-01-01", tz="UTC").value // 1000
    occurred = start + rng.integers(0, 70 * 86_400_000_000, n)
    occurred[rng.random(n) < 0.3] //= 86_400_000_000  # a third at exact midnights, like orders
    occurred[occurred < start] *= 86_400_000_000
    actions = pd.DataFrame({
        "customer_id": rng.integers(1, 40, n), "item_id": rng.integers(1, 30, n),
        "action_type": rng.integers(1, 4, n).astype(np.int8),
        "occurred_at": pd.to_datetime(occurred, unit="us", utc=True).astype("datetime64[us, UTC]"),
    }).sort_values(["customer_id", "occurred_at", "action_type", "item_id"], ignore_index=True)
    keys = sorted({(int(c), dt.date(2024, 1, 1) + dt.timedelta(days=int(d)))
                   for c, d in zip(rng.integers(1, 45, 300), rng.integers(0, 75, 300))})
    got = histories_of(actions, keys, lookback_days=20, max_history=25)
    expected = reference_histories(actions, keys, lookback_days=20, max_history=25)
    assert [(list(a), list(b)) for a, b in zip(got.history_items, got.history_action_types)] == expected


@pytest.mark.parametrize("seed", [0, 1])
def test_histories_item_counts_equal_counting_the_expanded_histories(seed):
    rng = np.random.default_rng(seed)
    n = 2000
    start = pd.Timestamp("2024-01-01", tz="UTC").value // 1000
    actions = pd.DataFrame({
        "customer_id": rng.integers(1, 30, n), "item_id": rng.integers(1, 50, n) * 10**12,  # ids far apart
        "action_type": rng.integers(1, 4, n).astype(np.int8),
        "occurred_at": pd.to_datetime(start + rng.integers(0, 60 * 86_400_000_000, n), unit="us", utc=True
                                      ).astype("datetime64[us, UTC]"),
    }).sort_values(["customer_id", "occurred_at", "action_type", "item_id"], ignore_index=True)
    keys = pd.DataFrame(sorted({(int(c), dt.date(2024, 1, 1) + dt.timedelta(days=int(d)))
                                for c, d in zip(rng.integers(1, 35, 200), rng.integers(0, 65, 200))}),
                        columns=["customer_id", "dt"])
    windows = history_windows(actions, keys, lookback_days=15, max_history=20)
    expanded = compute_histories(actions, keys, 15, 20).column("history_items").combine_chunks().flatten()
    expected = pd.Series(expanded.to_numpy()).value_counts()
    got = history_item_counts(windows)
    assert got.sort_index().to_dict() == expected.sort_index().to_dict() and got.dtype == np.int64
    assert (got > 0).all()
