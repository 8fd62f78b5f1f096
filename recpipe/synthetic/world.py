"""The simulated world: item popularity, customer activity, the action stream and the rankings with their signal."""

import numpy as np
import pandas as pd

from recpipe.schemas import ADD_TO_CART, CLICK, ORDER, US_PER_DAY

FIRST_IMPRESSION_DAY = np.datetime64("2024-03-01", "D")
DAYS_BEFORE = 28  # action days before the first impression day
SIGNAL_DAYS = 14

ZIPF_EXPONENT = 1.1
ACTIVITY_SIGMA = 1.5
ACTION_MIX = (0.7, 0.2, 0.1)  # click, add-to-cart, order
FAVOURITES = 20  # size of each customer's personal item set
FAVOURITE_P = 0.35
RANKED_FRACTION = 0.2
MEAN_RANKING_LENGTH = 11  # 10 with p 0.6, else 5..20 uniformly
RECENT_SLOT_P = 0.3
ORDER_P_RECENT, ORDER_P_OTHER = 0.25, 0.02


class _World:
    """Sizes, dates and item popularity: what every block of customers shares."""

    def __init__(self, rng, customers, items, days, actions_per_customer):
        self.customers, self.items, self.days = customers, items, days
        self.first_action_day = int((FIRST_IMPRESSION_DAY - DAYS_BEFORE).astype(np.int64))  # days since epoch
        self.action_days = DAYS_BEFORE + days
        # Item ids are 1..items, but popularity rank is shuffled so that id says nothing.
        self.item_by_rank = rng.permutation(items).astype(np.int64) + 1
        weights = 1.0 / np.arange(1, items + 1) ** ZIPF_EXPONENT
        self.item_cdf = np.cumsum(weights / weights.sum())
        self.activity_mu = np.log(actions_per_customer) - ACTIVITY_SIGMA**2 / 2  # so that the mean is as asked

    def popular_items(self, rng, size):
        ranks = np.searchsorted(self.item_cdf, rng.random(size), side="right")
        return self.item_by_rank[np.minimum(ranks, self.items - 1)]


class _Block:
    """Customers first..first + customers - 1 of the world: their activity and favourite items.

    Everything a block's rows need is drawn from the block's own generators, so that blocks
    are generated (and their rows written) one after the other, in memory bounded by one block.
    """

    def __init__(self, rng, world, first, customers):
        self.world, self.first, self.customers = world, first, customers
        self.activity = rng.lognormal(world.activity_mu, ACTIVITY_SIGMA, customers)
        self.favourites = world.popular_items(rng, (customers, FAVOURITES))
        # Each block ranks its own share of customers, so that its rows do not depend on the blocks after it.
        self.ranked_per_day = max(1, round(RANKED_FRACTION * customers))


def _actions(rng, block):
    """The block's clicks, add-to-carts and orders: customer_id, item_id, action_type (CLICK, ADD_TO_CART, ORDER),
    day, time_us (UTC)."""
    world = block.world
    per_customer = rng.poisson(block.activity)
    customer = np.repeat(np.arange(block.first, block.first + block.customers, dtype=np.int64), per_customer)
    n = len(customer)
    item = world.popular_items(rng, n)
    favourite = rng.random(n) < FAVOURITE_P
    item[favourite] = block.favourites[customer[favourite] - block.first,
                                       rng.integers(FAVOURITES, size=int(favourite.sum()))]
    # ACTION_MIX weighs CLICK, ADD_TO_CART and ORDER, whose codes are 1, 2, 3: the index drawn, plus one.
    action_type = (np.searchsorted(np.cumsum(ACTION_MIX), rng.random(n) * sum(ACTION_MIX), side="right") + CLICK)
    action_type = np.minimum(action_type, ORDER).astype(np.int8)
    day = world.first_action_day + rng.integers(0, world.action_days, n)
    # Shopping peaks in the evening; a fifth of the traffic is spread over the whole day.
    evening = (rng.normal(19.5 * 3600, 4 * 3600, n) % 86_400) * 1e6
    anytime = rng.random(n) * US_PER_DAY
    time_of_day = np.where(rng.random(n) < 0.8, evening, anytime).astype(np.int64).clip(0, US_PER_DAY - 1)
    time_us = day * US_PER_DAY + time_of_day
    return {"customer_id": customer, "item_id": item, "action_type": action_type, "day": day, "time_us": time_us}


def _rankings(rng, block, actions):
    """The block's rankings (customer_id, day, offset, length) and their shown items (item_id, is_order), with the
    signal planted."""
    world, per_day = block.world, block.ranked_per_day
    # Weighted sampling without replacement, all days at once: the top keys of log(w) + Gumbel noise.
    keys = 0.5 * np.log(block.activity) + rng.gumbel(size=(world.days, block.customers))
    chosen = np.argpartition(-keys, per_day - 1, axis=1)[:, :per_day] if per_day < block.customers \
        else np.tile(np.arange(block.customers), (world.days, 1))
    customer = chosen.ravel().astype(np.int64) + block.first
    impression_day = np.repeat(np.arange(world.days), per_day)
    order = np.lexsort((rng.random(len(customer)), impression_day))  # a random order within each day
    customer, impression_day = customer[order], impression_day[order]
    day = world.first_action_day + DAYS_BEFORE + impression_day
    n = len(customer)
    length = np.where(rng.random(n) < 0.6, 10, rng.integers(5, 21, n)).astype(np.int64)
    offset = np.concatenate([[0], np.cumsum(length)])

    owner = np.repeat(np.arange(n), length)
    shown_customer, shown_day = customer[owner], day[owner]
    # Each customer's clicks and carts, sorted by (customer, day): a window is one searchsorted away.
    engaged = np.isin(actions["action_type"], [CLICK, ADD_TO_CART])
    by_customer_day = actions["customer_id"][engaged] * (world.first_action_day + world.action_days) \
        + actions["day"][engaged]
    sort = np.argsort(by_customer_day, kind="stable")
    by_customer_day, engaged_items = by_customer_day[sort], actions["item_id"][engaged][sort]
    base = shown_customer * (world.first_action_day + world.action_days)
    low = np.searchsorted(by_customer_day, base + shown_day - SIGNAL_DAYS)
    high = np.searchsorted(by_customer_day, base + shown_day)
    item = world.popular_items(rng, len(owner))
    recent = (rng.random(len(owner)) < RECENT_SLOT_P) & (high > low)
    pick = low[recent] + (rng.random(int(recent.sum())) * (high - low)[recent]).astype(np.int64)
    item[recent] = engaged_items[pick]
    # A carousel does not show an item twice: redraw repeats from popularity until none are left.
    # Each round looks only at the rankings that still had a repeat (their entries are contiguous).
    check = np.arange(len(owner))
    for _ in range(100):
        repeated = check[pd.Series(owner[check] * (world.items + 1) + item[check]).duplicated().to_numpy()]
        if not len(repeated):
            break
        item[repeated] = world.popular_items(rng, len(repeated))
        check = check[np.isin(owner[check], owner[repeated])]

    # Membership of (customer, item) in the window, via a sorted (customer, item, day) key.
    days_span = world.first_action_day + world.action_days
    engaged_key = np.sort((actions["customer_id"][engaged] * (world.items + 1) + actions["item_id"][engaged])
                          * days_span + actions["day"][engaged])
    shown_key = (shown_customer * (world.items + 1) + item) * days_span + shown_day
    in_window = (np.searchsorted(engaged_key, shown_key - SIGNAL_DAYS)
                 < np.searchsorted(engaged_key, shown_key))
    is_order = rng.random(len(owner)) < np.where(in_window, ORDER_P_RECENT, ORDER_P_OTHER)
    rankings = {"customer_id": customer, "impression_day": impression_day, "day": day,
                "length": length, "offset": offset}
    shown = {"item_id": item, "is_order": is_order, "owner": owner}
    return rankings, shown
