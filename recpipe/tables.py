"""Parquet tables as every stage writes and reads them: exactly their schema, row groups of a chosen
size, folders of parts read back in the order they were written."""

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from recpipe import folders
from recpipe.cli import UserError


def write_table(frame, path, schema, row_group_size=None, **options):
    """Write a pandas frame as Parquet with exactly `schema`: no inferred or object dtypes reach disk.

    Casting here fails loudly on a column of the wrong type instead of writing a file
    whose types differ from its neighbours' (what breaks Dask reads and shuffles later).
    `options` go to pyarrow.parquet.write_table.
    """
    table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
    folders.make_parents(path)
    pq.write_table(table, path, row_group_size=row_group_size, **options)
    return table.num_rows


def write_sized(table, directory, schema, row_group_mb, basename="part"):
    """Write an Arrow table with PyArrow's dataset writer: row groups near `row_group_mb` of
    uncompressed data, files of whole row groups (at most 16), rows in their given order.
    Returns the in-memory size in bytes of each row group written.

    "Uncompressed" means as a reader holds it in memory (Arrow), which is what bounds a
    Dask worker; Parquet's own "uncompressed" size is after dictionary and run-length
    encoding, often several times smaller.
    """
    table = table.cast(schema)
    directory = Path(directory)
    folders.make_parents(directory / "part")
    if table.num_rows == 0:  # the dataset writer writes no file for no rows; keep the folder readable
        pq.write_table(table, directory / f"{basename}-00000.parquet")
        return []
    bytes_per_row = max(1.0, table.nbytes / table.num_rows)
    rows_per_group = max(1, int(row_group_mb * 2**20 / bytes_per_row))
    ds.write_dataset(
        table, directory, format="parquet", basename_template=f"{basename}-{{i}}.unnumbered",
        min_rows_per_group=rows_per_group, max_rows_per_group=rows_per_group,
        max_rows_per_file=16 * rows_per_group, preserve_order=True,
        existing_data_behavior="overwrite_or_ignore", create_dir=False,  # made above, inside its staging folder
    )
    # pyarrow numbers files 0, 1, … 10 unpadded; padded names sort in write order (part-2 before part-10).
    for written in directory.glob(f"{basename}-*.unnumbered"):
        number = int(written.name[len(basename) + 1:-len(".unnumbered")])
        written.rename(directory / f"{basename}-{number:05d}.parquet")
    return [table.slice(start, rows_per_group).nbytes for start in range(0, table.num_rows, rows_per_group)]


def read_parts(directory, schema, columns=None):
    """Every Parquet file of a folder, in name order (write order), as one table of exactly `schema`
    (or of its `columns` only: Parquet then reads nothing else).

    A missing or empty folder is an empty table: a bucket may have no rows of a table.
    """
    if columns is not None:
        schema = pa.schema([schema.field(name) for name in columns])
    files = sorted(path for path in Path(directory).glob("*.parquet") if not path.name.startswith((".", "_")))
    tables = []
    for path in files:
        try:
            tables.append(pq.read_table(path, schema=schema, columns=schema.names))
        except (OSError, pa.ArrowException) as error:
            raise UserError(f"{path}: not a readable table of {', '.join(schema.names)} ({error}); "
                            "run the stage that wrote it again") from None
    return pa.concat_tables(tables) if tables else schema.empty_table()
