"""The explicit PyArrow schema of every table a stage writes.

Writing with these (tables.write_table) instead of letting pandas infer keeps every
file of a table identical in type, whatever its partition happened to contain.
"""

import pyarrow as pa

TIMESTAMP = pa.timestamp("us", tz="UTC")
US_PER_DAY = 86_400 * 10**6  # a day in TIMESTAMP's unit

# Action types of the canonical stream (docs/data.md, The action stream and histories).
CLICK, ADD_TO_CART, ORDER = 1, 2, 3
SOURCE_OF_ACTION_TYPE = {CLICK: "clicks", ADD_TO_CART: "add_to_carts", ORDER: "previous_orders"}

ACTIONS = pa.schema([
    ("customer_id", pa.int64()),
    ("item_id", pa.int64()),
    ("action_type", pa.int8()),
    ("occurred_at", TIMESTAMP),
])

# One row per shown item.
IMPRESSIONS = pa.schema([
    ("dt", pa.date32()),
    ("ranking_id", pa.string()),
    ("customer_id", pa.int64()),
    ("user_agent", pa.string()),
    ("item_id", pa.int64()),
    ("is_order", pa.bool_()),
    ("position", pa.int32()),
    ("split", pa.string()),
])

QUARANTINE = pa.schema([
    ("source_file", pa.string()),
    ("row", pa.int64()),
    ("reason", pa.string()),
    ("raw", pa.string()),
])

# cleaned/impressions: the impressions plus the parsed user agent (parse_ua_strings.py).
# Families are null only for an empty user agent (missing); for anything else
# ua-parser answers, with "Other" where it recognizes nothing. Versions, brand and
# model are null where ua-parser finds none: no default would be true.
USER_AGENT_FIELDS = [
    ("browser_family", pa.string()),
    ("browser_major", pa.string()),
    ("os_family", pa.string()),
    ("os_major", pa.string()),
    ("device_family", pa.string()),
    ("device_brand", pa.string()),
    ("device_model", pa.string()),
    ("is_bot", pa.bool_()),
]
CLEANED_IMPRESSIONS = pa.schema([*IMPRESSIONS, *USER_AGENT_FIELDS])
