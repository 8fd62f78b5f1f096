"""Parquet tables as every stage writes and reads them: exactly their schema, row groups of a chosen
size, folders of parts read back in the order they were written; at a local path or a URL of object
storage alike (recpipe.storage)."""

import pyarrow as pa
import pyarrow.parquet as pq

from recpipe import folders, storage
from recpipe.cli import UserError


def read(path, **options):
    """pyarrow.parquet.read_table of one file, local or in object storage (fetched whole there, in one request:
    a request costs more than the bytes of the columns left unread)."""
    if storage.is_url(path):
        return pq.read_table(pa.BufferReader(storage.read_bytes(path)), **options)
    return pq.read_table(path, **options)


def parquet_file(path, whole=False):
    """pyarrow.parquet.ParquetFile of one file, local or in object storage. `whole`: fetch it in one request
    there, for a caller that reads most of it (else its footer, then what is read, each a request)."""
    if not storage.is_url(path):
        return pq.ParquetFile(path)
    if whole:
        return pq.ParquetFile(pa.BufferReader(storage.read_bytes(path)))
    path = storage.path(path)
    return pq.ParquetFile(path.fs.open(path.path, "rb"))


def read_schema(path):
    """The Arrow schema of one Parquet file, local or in object storage (its footer only)."""
    where, filesystem = storage.arrow(path)
    return pq.read_schema(where, filesystem=filesystem)


def write(table, path, **options):
    """pyarrow.parquet.write_table to one file, local or in object storage, making the folders above it."""
    where, filesystem = storage.arrow(path)
    folders.make_parents(path)
    pq.write_table(table, where, filesystem=filesystem, **options)


def writer(path, schema, **options):
    """A pyarrow.parquet.ParquetWriter of one file, local or in object storage, made with the folders above it."""
    where, filesystem = storage.arrow(path)
    folders.make_parents(path)
    return pq.ParquetWriter(where, schema, filesystem=filesystem, **options)


def write_table(frame, path, schema, row_group_size=None, **options):
    """Write a pandas frame as Parquet with exactly `schema`: no inferred or object dtypes reach disk.

    Casting here fails loudly on a column of the wrong type instead of writing a file
    whose types differ from its neighbours' (what breaks Dask reads and shuffles later).
    `options` go to pyarrow.parquet.write_table.
    """
    table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
    write(table, path, row_group_size=row_group_size, **options)
    return table.num_rows


def write_sized(table, directory, schema, row_group_mb, basename="part"):
    """Write an Arrow table in files of whole row groups: row groups near `row_group_mb` of
    uncompressed data, files of whole row groups (at most 16), rows in their given order.
    Returns the in-memory size in bytes of each row group written.

    "Uncompressed" means as a reader holds it in memory (Arrow), which is what bounds a
    Dask worker; Parquet's own "uncompressed" size is after dictionary and run-length
    encoding, often several times smaller.
    """
    table = table.cast(schema)
    directory = storage.path(directory)
    if table.num_rows == 0:  # keep the folder readable: a table with no rows is still one file
        write(table, directory / f"{basename}-00000.parquet")
        return []
    bytes_per_row = max(1.0, table.nbytes / table.num_rows)
    rows_per_group = max(1, int(row_group_mb * 2**20 / bytes_per_row))
    rows_per_file = 16 * rows_per_group
    # Zero-padded numbers: the names sort in write order (part-00002 before part-00010).
    for number, start in enumerate(range(0, table.num_rows, rows_per_file)):
        write(table.slice(start, rows_per_file), directory / f"{basename}-{number:05d}.parquet",
              row_group_size=rows_per_group)
    return [table.slice(start, rows_per_group).nbytes for start in range(0, table.num_rows, rows_per_group)]


def read_parts(directory, schema, columns=None):
    """Every Parquet file of a folder, in name order (write order), as one table of exactly `schema`
    (or of its `columns` only: Parquet then reads nothing else).

    A missing or empty folder is an empty table: a bucket may have no rows of a table.
    """
    if columns is not None:
        schema = pa.schema([schema.field(name) for name in columns])
    files = sorted(path for path in storage.path(directory).glob("*.parquet") if not path.name.startswith((".", "_")))
    tables = []
    for path in files:
        try:
            tables.append(read(path, schema=schema, columns=schema.names))
        except (OSError, pa.ArrowException) as error:
            raise UserError(f"{path}: not a readable table of {', '.join(schema.names)} ({error}); "
                            "run the stage that wrote it again") from None
    return pa.concat_tables(tables) if tables else schema.empty_table()
