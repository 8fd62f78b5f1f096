"""The explicit PyArrow schema of every table a stage writes.

Writing with these (stage.write_table) instead of letting pandas infer keeps every
file of a table identical in type, whatever its partition happened to contain.
"""

import pyarrow as pa

TIMESTAMP = pa.timestamp("us", tz="UTC")

# Action types of the canonical stream (SPEC section 6).
CLICK, ADD_TO_CART, ORDER = 1, 2, 3

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
