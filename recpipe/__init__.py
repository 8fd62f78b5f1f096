"""recpipe: raw e-commerce logs -> GPU-ready training data for a transformer recommender.

One module per concern; the top-level scripts only wire them together:

    cli       error handling and signals shared by every script
    cluster   the Dask client: an existing scheduler or a LocalCluster
    stage     atomic publishing, _stage.json manifests, checked reading, summaries, table writing
    folders   what the project may replace or delete, staging markers, locks on folders in use
    schemas   the explicit PyArrow schema of every table a stage writes
    raw       reading raw sources (JSON Lines, CSV, Parquet, gzip) into rows
    cleaning  the validation rules (docs/data.md) and the canonical action stream
    merge     merge_and_clean's work on the cluster
    synthetic generated raw data for demos, tests and benchmarks
"""
