"""Vectorised text building: dates, timestamps and ids as Arrow strings, JSON objects, file bytes."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recpipe.repartition import splitmix64
from recpipe.schemas import US_PER_DAY

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


def _text_bytes(lines):
    """The lines joined by newlines, with a trailing newline (nothing for no lines)."""
    lines = lines.combine_chunks() if isinstance(lines, pa.ChunkedArray) else lines
    if not len(lines):
        return b""
    one_list = pa.ListArray.from_arrays(pa.array([0, len(lines)], pa.int32()), lines)
    return pc.binary_join(one_list, "\n")[0].as_buffer().to_pybytes() + b"\n"
