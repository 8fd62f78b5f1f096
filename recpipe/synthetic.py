"""Generated raw data as docs/data.md (Raw input) describes it, for demos, tests and benchmarks.

`generate(out_dir, ...)` writes one sub-directory per source, in a mix of formats, with
a learnable signal and a known set of bad rows planted (docs/data.md, Cleaning), and
`<out_dir>/_generated.json` holding the parameters and the exact accounting that the
cleaning stage must reproduce. The same parameters give the same bytes on every run:
every random draw comes from `numpy.random.default_rng(seed)` (one spawned child per
concern, so that changing one part of the generator leaves the others' draws alone),
gzip headers carry mtime 0, and nothing reads the clock.

Dates are fixed so that outputs are reproducible: the impression days are the
`days` days from 2024-03-01; actions (clicks, add-to-carts, orders) span those days
plus the 28 days before them.

Layout (day index i counts impression days from 0, action days from 0 at the first
action day):

    impressions/YYYY-MM-DD.jsonl       i even (JSON Lines)
    impressions/YYYY-MM-DD.jsonl.gz    i odd
    impressions/YYYY-MM-DD.parquet     the last-but-two impression day (i = days - 3)
    clicks/YYYY-MM-DD.jsonl.gz         every action day
    add_to_carts/YYYY-MM-DD.csv        every action day; .csv.gz where i % 3 == 2;
                                       an extra `channel` column where i % 10 == 4
    previous_orders/YYYY-MM-DD.parquet one per week of action days (named by its first day)
    previous_orders/backfill.jsonl     a few hundred orders drawn at random from all of them

The world:
  - item popularity is a Zipf-like long tail (p proportional to 1/rank^1.1);
  - customer activity is lognormal (sigma 1.5) around `actions_per_customer`, so a few
    customers have thousands of actions (the pipeline caps histories at 1000); actions
    are 70% clicks, 20% add-to-carts, 10% orders; a third of a customer's actions go
    to a small personal set of favourite items, which makes repeats common;
  - each customer has a mostly-stable user agent from a pool of a few thousand
    real-looking strings (about 40 templates with varied versions); a few per cent of
    rankings carry a null, empty or blank user agent, a few hundredths of a per cent a
    garbage one (random bytes read as latin-1, or a 10 KB string);
  - each impression day about 20% of customers, weighted toward the active ones, get
    a ranking of 5-20 items (usually 10), without repeated items.

The planted signal: each slot of a ranking for customer c on day D shows, with
probability 0.3, an item c clicked or carted in [D - 14 days, D) (when there is one),
otherwise a popularity sample; `is_order` is true with p = 0.25 for items among c's
clicks and carts in that window and p = 0.02 otherwise. Every ordered shown item is
also a previous_orders row with order_date D.

The bad rows: 2% of the rows of every source carry exactly one defect, of a kind the
file's format can express, with at least one row of every kind per source. Besides,
0.5% of good rankings, clicks and add-to-carts are repeated verbatim later in the same
file, and some rows carry an unknown extra field (which is not a defect).
"""

import concurrent.futures
import gzip
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recpipe import folders
from recpipe.repartition import splitmix64
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
RECENT_SLOT_P = 0.3
ORDER_P_RECENT, ORDER_P_OTHER = 0.25, 0.02

BAD_FRACTION = 0.02
DUPLICATE_FRACTION = 0.005
BACKFILL_ORDERS = 300

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

CLICK_OFFSETS_MIN = np.array([60, 120, 330, -300, -240, -480, 540, -180, 600, 345])
APP_VERSIONS = ["5.9.2", "5.10.0", "5.11.1", "5.12.0", "5.12.3", "6.0.0-beta"]
CHANNELS = ["web", "app", "app", "web", "marketplace"]


GENERATED = "_generated.json"


def not_a_generated_folder(folder):
    """None when a folder holds nothing but the files generate() wrote there (its _generated.json lists
    them), so that it may be replaced; otherwise what was found."""
    try:
        files = json.loads((Path(folder) / GENERATED).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"it has no {GENERATED} listing the files the generator wrote"
    unexpected = folders.unexpected_entries(folder, {*files, GENERATED, folders.MARKER})
    if unexpected:
        return f"it holds {folders.listing(unexpected)}, which the generator did not write"
    return None


def generate(out_dir, *, customers=2000, items=5000, days=18, actions_per_customer=60, seed=0):
    """Write a raw dataset under `out_dir` (replacing it) and return its `_generated.json` content plus a summary.

    The returned dict has "parameters" and "expected" (what `_generated.json` holds)
    and "summary": files, rows and bad rows planted per source, and actions generated.
    """
    for name, value in (("customers", customers), ("items", items), ("days", days)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not actions_per_customer > 0:
        raise ValueError(f"actions_per_customer must be positive, got {actions_per_customer!r}")
    parameters = {
        "customers": int(customers), "items": int(items), "days": int(days),
        "actions_per_customer": float(actions_per_customer), "seed": int(seed),
        "first_action_day": str(FIRST_IMPRESSION_DAY - DAYS_BEFORE),
        "first_impression_day": str(FIRST_IMPRESSION_DAY),
        "last_impression_day": str(FIRST_IMPRESSION_DAY + int(days) - 1),
        "bad_fraction": BAD_FRACTION, "duplicate_fraction": DUPLICATE_FRACTION,
        "signal": {"recent_slot_p": RECENT_SLOT_P, "window_days": SIGNAL_DAYS,
                   "order_p_recent": ORDER_P_RECENT, "order_p_other": ORDER_P_OTHER},
    }
    rng = dict(zip(["world", "actions", "rankings", "user_agents", "impressions", "clicks", "add_to_carts",
                    "previous_orders"], np.random.default_rng(seed).spawn(8)))
    world = _World(rng["world"], int(customers), int(items), int(days), float(actions_per_customer))
    actions = _actions(rng["actions"], world)
    rankings, shown = _rankings(rng["rankings"], world, actions)
    user_agents = _user_agents(rng["user_agents"], world, rankings)

    sources = {
        "impressions": _Impressions(rng["impressions"], world, rankings, shown, user_agents),
        "clicks": _Clicks(rng["clicks"], world, actions),
        "add_to_carts": _AddToCarts(rng["add_to_carts"], world, actions),
        "previous_orders": _PreviousOrders(rng["previous_orders"], world, actions, rankings, shown),
    }
    expected = {name: source.expected() for name, source in sources.items()}
    result = {"parameters": parameters, "expected": expected}

    out_dir = Path(out_dir)
    with folders.claiming(out_dir, not_a_generated_folder, "replace",
                          "point --out at a new or empty folder, or at one generate_data.py wrote"):
        staging = folders.make_staging(out_dir)
        try:
            with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
                # zlib, pyarrow and most of numpy release the GIL, so files are built in parallel.
                jobs = [pool.submit(source.write_file, staging / name, index)
                        for name, source in sources.items() for index in range(source.n_files)]
                for job in jobs:
                    job.result()
            # The files it wrote prove a folder is the generator's, which it may then replace.
            files = sorted(str(path.relative_to(staging)) for path in staging.rglob("*")
                           if path.is_file() and path.name != folders.MARKER)
            (staging / GENERATED).write_text(json.dumps({**result, "files": files}, indent=2, sort_keys=True) + "\n")
            folders.replace(staging, out_dir)
        except BaseException:
            folders.discard(staging)
            raise
    summary = {
        "actions": int(len(actions["customer_id"])),
        "files": {name: source.n_files for name, source in sources.items()},
        "rows": {name: source.rows_in() for name, source in sources.items()},
        "bad_rows": {name: int((source.defect >= 0).sum()) for name, source in sources.items()},
        "duplicate_rows": {name: int(source.duplicate.sum()) for name, source in sources.items()},
    }
    return {**result, "summary": summary}


# ---------------------------------------------------------------- the world


class _World:
    """Sizes, dates, item popularity and customer activity."""

    def __init__(self, rng, customers, items, days, actions_per_customer):
        self.customers, self.items, self.days = customers, items, days
        self.first_action_day = int((FIRST_IMPRESSION_DAY - DAYS_BEFORE).astype(np.int64))  # days since epoch
        self.action_days = DAYS_BEFORE + days
        # Item ids are 1..items, but popularity rank is shuffled so that id says nothing.
        self.item_by_rank = rng.permutation(items).astype(np.int64) + 1
        weights = 1.0 / np.arange(1, items + 1) ** ZIPF_EXPONENT
        self.item_cdf = np.cumsum(weights / weights.sum())
        mu = np.log(actions_per_customer) - ACTIVITY_SIGMA**2 / 2  # so that the mean is actions_per_customer
        self.activity = rng.lognormal(mu, ACTIVITY_SIGMA, customers)
        self.favourites = self.popular_items(rng, (customers, FAVOURITES))

    def popular_items(self, rng, size):
        ranks = np.searchsorted(self.item_cdf, rng.random(size), side="right")
        return self.item_by_rank[np.minimum(ranks, self.items - 1)]


def _actions(rng, world):
    """Every click, add-to-cart and order: customer_id, item_id, action_type (CLICK, ADD_TO_CART, ORDER), day,
    time_us (UTC)."""
    per_customer = rng.poisson(world.activity)
    customer = np.repeat(np.arange(1, world.customers + 1, dtype=np.int64), per_customer)
    n = len(customer)
    item = world.popular_items(rng, n)
    favourite = rng.random(n) < FAVOURITE_P
    item[favourite] = world.favourites[customer[favourite] - 1, rng.integers(FAVOURITES, size=int(favourite.sum()))]
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


def _rankings(rng, world, actions):
    """Rankings (customer_id, day, offset, length) and their shown items (item_id, is_order), with the signal planted."""
    per_day = max(1, round(RANKED_FRACTION * world.customers))
    # Weighted sampling without replacement, all days at once: the top keys of log(w) + Gumbel noise.
    keys = 0.5 * np.log(world.activity) + rng.gumbel(size=(world.days, world.customers))
    chosen = np.argpartition(-keys, per_day - 1, axis=1)[:, :per_day] if per_day < world.customers \
        else np.tile(np.arange(world.customers), (world.days, 1))
    customer = chosen.ravel().astype(np.int64) + 1
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


# ---------------------------------------------------------------- user agents

_UA_TEMPLATES = [  # (weight, template)
    (18, "Mozilla/5.0 (iPhone; CPU iPhone OS {ios} like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
         "Version/{ios_short} Mobile/15E148 Safari/604.1"),
    (3, "Mozilla/5.0 (iPhone; CPU iPhone OS {ios} like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "CriOS/{chrome} Mobile/15E148 Safari/604.1"),
    (1, "Mozilla/5.0 (iPhone; CPU iPhone OS {ios} like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "GSA/{gsa} Mobile/15E148 Safari/604.1"),
    (1, "Mozilla/5.0 (iPhone; CPU iPhone OS {ios} like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Mobile/15E148 Instagram {meta} (iPhone14,5; iOS {ios}; en_US; en; scale=3.00; 1170x2532; 532277346)"),
    (1, "Mozilla/5.0 (iPhone; CPU iPhone OS {ios} like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Mobile/15E148 [FBAN/FBIOS;FBAV/{meta};FBBV/572336521;FBDV/iPhone15,2;FBMD/iPhone;FBSN/iOS;"
        "FBSV/{ios_dot};FBSS/3;FBCR/;FBID/phone;FBLC/en_US;FBOP/80]"),
    (3, "Mozilla/5.0 (iPad; CPU OS {ios} like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/{ios_short} Mobile/15E148 Safari/604.1"),
    (0.5, "Mozilla/5.0 (iPad; CPU OS {ios} like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
          "CriOS/{chrome} Mobile/15E148 Safari/604.1"),
    (8, "Mozilla/5.0 (Linux; Android {android}; {samsung}) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/{chrome} Mobile Safari/537.36"),
    (3, "Mozilla/5.0 (Linux; Android {android}; {samsung}) AppleWebKit/537.36 (KHTML, like Gecko) "
        "SamsungBrowser/{samsung_browser} Chrome/{chrome_major}.0.0.0 Mobile Safari/537.36"),
    (4, "Mozilla/5.0 (Linux; Android {android}; {pixel}) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/{chrome} Mobile Safari/537.36"),
    (3, "Mozilla/5.0 (Linux; Android {android}; {xiaomi}) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/{chrome} Mobile Safari/537.36"),
    (1, "Mozilla/5.0 (Linux; U; Android {android}; en-us; {xiaomi} Build/{build}) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Version/4.0 Chrome/{chrome_major}.0.0.0 Mobile Safari/537.36 "
        "XiaoMi/MiuiBrowser/{miui}"),
    (4, "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/{chrome_major}.0.0.0 Mobile Safari/537.36"),
    (2, "Mozilla/5.0 (Linux; Android {android}; {pixel} Build/{build}; wv) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Version/4.0 Chrome/{chrome} Mobile Safari/537.36"),
    (0.5, "Mozilla/5.0 (Android {android}; Mobile; rv:{firefox}) Gecko/{firefox} Firefox/{firefox}"),
    (1, "Mozilla/5.0 (Linux; Android {android}; {oneplus}) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/{chrome} Mobile Safari/537.36"),
    (1, "Mozilla/5.0 (Linux; Android {android}; {huawei}) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/{chrome} Mobile Safari/537.36"),
    (1, "Mozilla/5.0 (Linux; Android {android}; {moto}) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/{chrome} Mobile Safari/537.36"),
    (1, "Mozilla/5.0 (Linux; Android {android}; {samsung_tab}) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/{chrome} Safari/537.36"),
    (12, "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
         "Chrome/{chrome} Safari/537.36"),
    (5, "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/{chrome_major}.0.0.0 Safari/537.36 Edg/{edge}"),
    (3, "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:{firefox}) Gecko/20100101 Firefox/{firefox}"),
    (0.5, "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/{chrome_major}.0.0.0 Safari/537.36 OPR/{opera}"),
    (5, "Mozilla/5.0 (Macintosh; Intel Mac OS X {macos}) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/{ios_short} Safari/605.1.15"),
    (5, "Mozilla/5.0 (Macintosh; Intel Mac OS X {macos}) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/{chrome} Safari/537.36"),
    (1, "Mozilla/5.0 (Macintosh; Intel Mac OS X {macos_dot}; rv:{firefox}) Gecko/20100101 Firefox/{firefox}"),
    (0.5, "Mozilla/5.0 (Macintosh; Intel Mac OS X {macos}) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/{chrome_major}.0.0.0 Safari/537.36 Edg/{edge}"),
    (1, "Mozilla/5.0 (X11; Linux x86_64; rv:{firefox}) Gecko/20100101 Firefox/{firefox}"),
    (1, "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:{firefox}) Gecko/20100101 Firefox/{firefox}"),
    (1, "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{chrome} Safari/537.36"),
    (0.5, "Mozilla/5.0 (X11; CrOS x86_64 {cros}) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/{chrome} Safari/537.36"),
    (3, "ShopApp/{app} (iPhone; iOS {ios_dot}; Scale/3.00)"),
    (3, "ShopApp/{app} (Linux; Android {android}; {samsung}) okhttp/4.12.0"),
    (0.3, "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"),
    (0.3, "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/{chrome} Mobile Safari/537.36 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"),
    (0.3, "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; bingbot/2.0; "
          "+http://www.bing.com/bingbot.htm) Chrome/{chrome_major}.0.0.0 Safari/537.36"),
    (0.1, "Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)"),
    (0.1, "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)"),
    (0.1, "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_5) AppleWebKit/605.1.15 (KHTML, like Gecko) "
          "Version/13.1.1 Safari/605.1.15 (Applebot/0.1; +http://www.apple.com/go/applebot)"),
    (0.1, "python-requests/2.{minor}.0"),
    (0.2, "Mozilla/5.0 (Linux; Android 9; KFTRWI) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Silk/{silk} like Chrome/{chrome} Safari/537.36"),
    (0.1, "Mozilla/5.0 (SMART-TV; LINUX; Tizen {tizen}) AppleWebKit/537.36 (KHTML, like Gecko) "
          "{chrome_major}.0.0.0/{tizen} TV Safari/537.36"),
]
_SAMSUNG = ["SM-S918B", "SM-S911B", "SM-G991B", "SM-G998B", "SM-A536B", "SM-A546B", "SM-A145R", "SM-N986B",
            "SM-S928B", "SM-A256B", "SM-G781B", "SM-F946B"]
_PIXEL = ["Pixel 6", "Pixel 6a", "Pixel 7", "Pixel 7 Pro", "Pixel 8", "Pixel 8 Pro", "Pixel 9", "Pixel 7a"]
_XIAOMI = ["Redmi Note 12", "Redmi Note 11", "2201117TG", "M2101K6G", "23049PCD8G", "Mi 11", "22111317G", "POCO F5"]
_ONEPLUS = ["CPH2449", "CPH2581", "LE2123", "NE2213", "CPH2411"]
_HUAWEI = ["ELS-NX9", "VOG-L29", "ANA-NX9", "JNY-LX1", "MAR-LX1A"]
_MOTO = ["moto g(60)", "moto g(30)", "motorola edge 30", "moto g54 5G", "moto e(7)"]
_SAMSUNG_TAB = ["SM-X200", "SM-T220", "SM-X710", "SM-T505"]
_MACOS = ["10_15_7", "13_6", "14_2_1", "14_4", "12_7_1"]


def _ua_values(rng):
    """One set of version numbers and models for the templates."""
    def draw(options):
        return options[int(rng.integers(len(options)))]

    ios_major, ios_minor, ios_patch = int(rng.integers(15, 19)), int(rng.integers(0, 8)), int(rng.integers(0, 4))
    chrome_major = int(rng.integers(110, 132))
    firefox = f"{int(rng.integers(115, 134))}.0"
    android = str(int(rng.integers(10, 16)))
    macos = draw(_MACOS)
    return {
        "ios": f"{ios_major}_{ios_minor}" + (f"_{ios_patch}" if ios_patch else ""),
        "ios_dot": f"{ios_major}.{ios_minor}" + (f".{ios_patch}" if ios_patch else ""),
        "ios_short": f"{ios_major}.{ios_minor}",
        "chrome": f"{chrome_major}.0.{int(rng.integers(5000, 6800))}.{int(rng.integers(0, 250))}",
        "chrome_major": chrome_major,
        "edge": f"{chrome_major}.0.{int(rng.integers(1500, 2600))}.{int(rng.integers(0, 120))}",
        "firefox": firefox, "android": android, "macos": macos, "macos_dot": macos.replace("_", "."),
        "samsung": draw(_SAMSUNG), "pixel": draw(_PIXEL), "xiaomi": draw(_XIAOMI), "oneplus": draw(_ONEPLUS),
        "huawei": draw(_HUAWEI), "moto": draw(_MOTO), "samsung_tab": draw(_SAMSUNG_TAB),
        "samsung_browser": f"{int(rng.integers(20, 26))}.0",
        "gsa": f"{int(rng.integers(300, 330))}.0.{int(rng.integers(6 * 10**8, 7 * 10**8 - 1))}",
        "meta": f"{int(rng.integers(300, 460))}.0.0.{int(rng.integers(10, 60))}.{int(rng.integers(10, 120))}",
        "miui": f"14.{int(rng.integers(1, 12))}.{int(rng.integers(1, 40))}-gn",
        "build": draw(["TQ3A.230805.001", "UP1A.231005.007", "AP1A.240305.019", "SKQ1.211019.001", "TKQ1.221114.001"]),
        "opera": f"{int(rng.integers(100, 112))}.0.0.0",
        "cros": f"{int(rng.integers(15000, 15900))}.{int(rng.integers(0, 90))}.0",
        "app": f"5.{int(rng.integers(0, 14))}.{int(rng.integers(0, 5))}",
        "minor": int(rng.integers(25, 33)), "silk": f"{int(rng.integers(100, 130))}.{int(rng.integers(1, 6))}.1",
        "tizen": draw(["5.5", "6.0", "6.5", "7.0"]),
    }


def _user_agents(rng, world, rankings, pool_target=3000):
    """The user agent of every ranking: (table of strings, with None for null; code per ranking into it)."""
    weights = np.array([weight for weight, _ in _UA_TEMPLATES])
    template_cdf = np.cumsum(weights / weights.sum())
    pool, starts, counts = [], [], []
    for weight, template in _UA_TEMPLATES:
        variants = dict.fromkeys(template.format(**_ua_values(rng))
                                 for _ in range(max(3, round(pool_target * weight / weights.sum()))))
        starts.append(len(pool))
        counts.append(len(variants))
        pool.extend(variants)
    starts, counts = np.array(starts), np.array(counts)

    def sample(size):
        template = np.minimum(np.searchsorted(template_cdf, rng.random(size), side="right"), len(starts) - 1)
        return starts[template] + (rng.random(size) * counts[template]).astype(np.int64)

    # Table: null, empty, blank, the pool, the pool with stray whitespace, then the garbage.
    special = 3
    primary = special + sample(world.customers)
    n = len(rankings["customer_id"])
    code = primary[rankings["customer_id"] - 1]
    draw = rng.random(n)
    other = draw < 0.06  # a second device
    code[other] = special + sample(int(other.sum()))
    padded = (draw >= 0.06) & (draw < 0.065)
    code[padded] += len(pool)
    code[(draw >= 0.065) & (draw < 0.085)] = 0
    code[(draw >= 0.085) & (draw < 0.095)] = 1
    code[(draw >= 0.095) & (draw < 0.097)] = 2
    garbage = np.flatnonzero(draw >= 0.9995)
    table = [None, "", "   ", *pool, *(f" {agent}  " for agent in pool)]
    for row in garbage:
        code[row] = len(table)
        if rng.random() < 0.5:
            table.append(rng.bytes(int(rng.integers(16, 256))).decode("latin-1"))
        else:
            table.append("Mozilla/5.0 (" + "Windows NT 10.0; " * int(rng.integers(590, 700)) + ")")
    return table, code


# ---------------------------------------------------------------- text building (vectorized)

_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_TWO_DIGITS = np.array([[48 + i // 10, 48 + i % 10] for i in range(100)], dtype=np.uint8)


def _strings(chars):
    """A pyarrow string array from an (n, width) uint8 matrix of ASCII characters."""
    n, width = chars.shape
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(chars).tobytes()))


def _date_chars(epoch_days):
    first = int(epoch_days.min()) if len(epoch_days) else 0
    span = np.arange(first, (int(epoch_days.max()) if len(epoch_days) else 0) + 1).astype("datetime64[D]")
    table = np.frombuffer(np.datetime_as_string(span).astype("S10").tobytes(), dtype=np.uint8).reshape(-1, 10)
    return table[epoch_days - first]


def _dates(epoch_days):
    """'YYYY-MM-DD' strings."""
    return _strings(_date_chars(np.asarray(epoch_days, dtype=np.int64)).reshape(-1, 10))


def _timestamps(time_us):
    """'YYYY-MM-DDTHH:MM:SS.ffffff' strings (no offset) for epoch microseconds."""
    day, rest = np.divmod(np.asarray(time_us, dtype=np.int64), US_PER_DAY)
    chars = np.empty((len(day), 26), dtype=np.uint8)
    chars[:, :10] = _date_chars(day).reshape(-1, 10)
    seconds, micro = np.divmod(rest, 10**6)
    hours, seconds = np.divmod(seconds, 3600)
    minutes, seconds = np.divmod(seconds, 60)
    chars[:, 10] = ord("T")
    chars[:, 11:13] = _TWO_DIGITS[hours]
    chars[:, 13] = chars[:, 16] = ord(":")
    chars[:, 14:16] = _TWO_DIGITS[minutes]
    chars[:, 17:19] = _TWO_DIGITS[seconds]
    chars[:, 19] = ord(".")
    chars[:, 20:22] = _TWO_DIGITS[micro // 10_000]
    chars[:, 22:24] = _TWO_DIGITS[micro // 100 % 100]
    chars[:, 24:26] = _TWO_DIGITS[micro % 100]
    return _strings(chars)


def _ranking_ids(rng, n):
    """uuid-shaped hex ids."""
    chars = _HEX[rng.integers(0, 16, size=(n, 36), dtype=np.uint8)]
    chars[:, [8, 13, 18, 23]] = ord("-")
    return _strings(chars)


def _session_ids(customer_id, day):
    """16 hex digits that are the same for one customer's day (a splitmix64 hash, no random draws)."""
    with np.errstate(over="ignore"):
        x = splitmix64((customer_id.astype(np.uint64) * np.uint64(1_000_003) + day.astype(np.uint64))
                       * np.uint64(0x9E3779B97F4A7C15))
    nibbles = (x[:, None] >> (np.uint64(4) * np.arange(15, -1, -1, dtype=np.uint64))) & np.uint64(15)
    return _strings(_HEX[nibbles.astype(np.uint8)])


def _ints(values):
    return pc.cast(pa.array(np.asarray(values, dtype=np.int64)), pa.string())


def _quoted(text):
    return pc.binary_join_element_wise('"', text, '"', "")


def _replace(text, mask, choices, variant):
    """`text` with the rows in `mask` replaced by choices[variant % len(choices)] (None: null)."""
    if not mask.any():
        return text
    replacement = np.array(choices, dtype=object)[variant[mask] % len(choices)]
    return pc.replace_with_mask(text, pa.array(mask), pa.array(list(replacement), pa.string()))


def _json_objects(fields):
    """'{"name":value,...}' per row from {name: JSON text array}; a null value leaves the field out."""
    fragments = [pc.binary_join_element_wise(f'"{name}":', text, "") for name, text in fields.items()]
    body = pc.binary_join_element_wise(*fragments, ",", null_handling="skip")
    return pc.binary_join_element_wise("{", body, "}", "")


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


def _text_bytes(lines, header=None):
    """One file's bytes: the lines joined by newlines, with a trailing newline."""
    lines = lines.combine_chunks() if isinstance(lines, pa.ChunkedArray) else lines
    body = b""
    if len(lines):
        one_list = pa.ListArray.from_arrays(pa.array([0, len(lines)], pa.int32()), lines)
        body = pc.binary_join(one_list, "\n")[0].as_buffer().to_pybytes() + b"\n"
    return (header.encode() + b"\n" if header else b"") + body


def _write_bytes(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    path.write_bytes(data)


# ---------------------------------------------------------------- sources


class _Source:
    """Rows of one source sorted by file, with their planted defects and duplicates.

    Subclasses set `file_of_row` (file index per row, non-decreasing), `file_names`
    and `file_formats`, call `_plant`, and implement `expected()` (their part of
    _generated.json) and `write_file(folder, index)` (one file, from the rows alone, so
    that files can be written in any order, in parallel, with the same bytes).
    """

    name = None

    def _plant(self, rng, n):
        """Draw one defect (or none) and the duplicate flag of every row, plus their variant draws."""
        formats = np.array([FORMAT_CODES[fmt] for fmt in self.file_formats], dtype=np.int8)[self.file_of_row]
        kinds = KINDS[self.name]
        self.reasons = list(dict.fromkeys(reason for fmt in kinds for reason in kinds[fmt]))
        defect = np.full(n, -1, dtype=np.int16)
        # One row of every kind first, so that even a tiny dataset exercises them all.
        for code, reason in enumerate(self.reasons):
            allowed = np.isin(formats, [FORMAT_CODES[fmt] for fmt in kinds if reason in kinds[fmt]])
            free = np.flatnonzero(allowed & (defect < 0))
            if len(free):
                defect[free[rng.integers(len(free))]] = code
        more = max(0, min(n, round(BAD_FRACTION * n)) - int((defect >= 0).sum()))
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
        if candidates.any() and not self.duplicate.any():  # so that even a tiny dataset has one
            self.duplicate[np.flatnonzero(candidates)[rng.integers(int(candidates.sum()))]] = True
        self.placement = rng.random(n)
        bounds = np.searchsorted(self.file_of_row, np.arange(len(self.file_names) + 1))
        self.file_bounds = list(zip(bounds[:-1], bounds[1:]))

    def _duplicable(self):
        return np.zeros(len(self.defect), dtype=bool)

    @property
    def n_files(self):
        return len(self.file_names)

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

    def __init__(self, rng, world, rankings, shown, user_agents):
        self.rankings, self.shown = rankings, shown
        n = len(rankings["customer_id"])
        self.file_of_row = rankings["impression_day"]
        days = np.arange(world.days)
        self.dates = [str(FIRST_IMPRESSION_DAY + int(day)) for day in days]
        self.file_formats = ["parquet" if day == world.days - 3 else "jsonl" for day in days]
        self.file_names = [f"{date}.parquet" if fmt == "parquet" else f"{date}.jsonl" + (".gz" if day % 2 else "")
                           for day, date, fmt in zip(days, self.dates, self.file_formats)]
        self._plant(rng, n)
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

    def write_file(self, folder, index):
        start, stop = self.file_bounds[index]
        entries = slice(self.rankings["offset"][start], self.rankings["offset"][stop])
        if self.file_formats[index] == "parquet":
            table = self._table(start, stop, entries)
            order = _with_duplicates(stop - start, self.duplicate[start:stop], self.placement[start:stop])
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(table.take(pa.array(order)), folder / self.file_names[index])
            return
        lines = self._lines(start, stop, entries)
        order = _with_duplicates(stop - start, self.duplicate[start:stop], self.placement[start:stop])
        _write_bytes(folder / self.file_names[index], _text_bytes(lines.take(pa.array(order))))

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

    def __init__(self, rng, world, actions):
        mine = np.flatnonzero(actions["action_type"] == self.action_type)
        mine = mine[np.lexsort((actions["time_us"][mine],))]
        self.customer_id = actions["customer_id"][mine]
        self.item_id = actions["item_id"][mine]
        self.time_us = actions["time_us"][mine]
        self.day = actions["day"][mine]
        self.file_of_row = self.day - world.first_action_day
        self.dates = [str(FIRST_IMPRESSION_DAY - DAYS_BEFORE + day) for day in range(world.action_days)]
        self._set_files(world)
        self._plant(rng, len(mine))
        self._draw(rng, len(mine))

    def _duplicable(self):
        return np.ones(len(self.customer_id), dtype=bool)

    def expected(self):
        return self._action_expected({"customer_id": self.customer_id, "item": self.item_id,
                                      "occurred_at": self.time_us})

    def write_file(self, folder, index):
        start, stop = self.file_bounds[index]
        lines = self._lines(start, stop, index)
        order = _with_duplicates(stop - start, self.duplicate[start:stop], self.placement[start:stop])
        _write_bytes(folder / self.file_names[index], _text_bytes(lines.take(pa.array(order)), self._header(index)))

    def _header(self, index):
        return None


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

    def __init__(self, rng, world, actions, rankings, shown):
        ordered = actions["action_type"] == ORDER
        shown_ordered = shown["is_order"]
        day = np.concatenate([actions["day"][ordered], rankings["day"][shown["owner"]][shown_ordered]])
        customer = np.concatenate([actions["customer_id"][ordered],
                                   rankings["customer_id"][shown["owner"]][shown_ordered]])
        config = np.concatenate([actions["item_id"][ordered], shown["item_id"][shown_ordered]])
        weeks = (world.action_days + 6) // 7
        file_of_row = (day - world.first_action_day) // 7
        backfill = rng.permutation(len(day))[:min(BACKFILL_ORDERS, max(1, len(day) // 4))]
        file_of_row[backfill] = weeks
        order = np.lexsort((config, customer, day, file_of_row))
        self.day, self.customer_id, self.config_id = day[order], customer[order], config[order]
        self.file_of_row = file_of_row[order]
        self.file_formats = ["parquet"] * weeks + ["jsonl"]
        self.file_names = [f"{FIRST_IMPRESSION_DAY - DAYS_BEFORE + 7 * week}.parquet" for week in range(weeks)]
        self.file_names.append("backfill.jsonl")
        self._plant(rng, len(day))
        self.with_channel = rng.random(len(day)) < 0.2
        self.channel = rng.integers(0, len(CHANNELS), len(day))

    def _duplicable(self):
        return np.zeros(len(self.day), dtype=bool)  # repeated orders occur naturally

    def expected(self):
        return self._action_expected({"customer_id": self.customer_id, "item": self.config_id,
                                      "occurred_at": self.day})

    def write_file(self, folder, index):
        start, stop = self.file_bounds[index]
        rows = slice(start, stop)
        defect, variant, reasons = self.defect[rows], self.variant[rows], self.reasons

        def has(reason):
            return defect == reasons.index(reason)

        path = folder / self.file_names[index]
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
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path)
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
        _write_bytes(path, _text_bytes(lines))
