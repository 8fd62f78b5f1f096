"""The raw files, each written a piece at a time (one block of customers' rows), so that a file may be any size."""

import zlib

import pyarrow.parquet as pq

GZIP_LEVEL = 6


class _TextFile:
    """JSON Lines or CSV: the pieces' bytes end to end after the header; a .gz file is one gzip stream of them.

    zlib's output does not depend on how its input is cut into pieces, so a file has the bytes
    that compressing its whole text at once gives (gzip header with mtime 0, no file name).
    The file is opened for each piece, not held open: a long --days means thousands of files.
    """

    def __init__(self, path, header=None):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        self.path = path
        self.deflate = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31) if path.name.endswith(".gz") else None
        if header:
            self.append(header.encode() + b"\n")

    def append(self, data):
        self._write(self.deflate.compress(data) if self.deflate else data)

    def close(self):
        if self.deflate:
            self._write(self.deflate.flush())
            self.deflate = None

    def _write(self, data):
        if data:
            with open(self.path, "ab") as file:
                file.write(data)


class _ParquetFile:
    """One row group (or more) per piece with rows; a file without any is one empty row group, as write_table makes."""

    def __init__(self, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.writer, self.empty = path, None, None

    def append(self, table):
        if not table.num_rows:
            self.empty = table
            return
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema)
        self.writer.write_table(table)

    def close(self):
        if self.writer is None:
            if self.empty is not None:
                pq.write_table(self.empty, self.path)
            return
        self.writer.close()
        self.writer = None
