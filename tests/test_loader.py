"""The loader on a tiny processed/ written here with PyArrow (not by the pipeline).

Every example carries its own id: num_clicks_7d and cat_position are the id, so a batch
says which examples it holds, and the fixture knows each one's customer, day and history.
"""

import json
import os
import shutil
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recpipe import stage
from recpipe.cli import UserError
from recpipe.loader import Prepare, ProcessedDataset, Timelines, make_loader
from recpipe.preprocess import HISTORIES_SCHEMA, examples_schema

L = 5
DAYS = {"train": ["2024-03-01", "2024-03-02", "2024-03-03"], "val": ["2024-03-04"]}
CUSTOMERS = range(1, 14)
LONG = (5, "2024-03-02")  # this customer's history that day is longer than L
CATEGORICAL = ["cat_position", "cat_browser", "cat_os", "cat_device"]
NUMERIC = ["num_clicks_7d", "num_days_since_last"]


def history(customer, day):
    """The fixture's history of (customer, day): the first item (most recent) is customer * 1000 + day."""
    day_number = int(day[-2:])
    length = 20 if (customer, day) == LONG else (customer + day_number) % 4  # 0 (empty) .. 3
    return [customer * 1000 + day_number * 10 + j for j in range(length)], [1 + j % 3 for j in range(length)]


def build_processed(root, max_history=20):
    """processed/ of DAYS, two bucket files per day (bucket = customer % 2), published under `root` as
    preprocess.py publishes it (stage.publish, with its manifest); returns {id: (customer, day)}."""
    with stage.publish(root.parent, root.name, {"max_history": max_history, "layout": "compact"}, []) as run:
        examples_of = write_days(run.path)
        run.extra["rows_per_split"] = {"train": 1, "val": 1, "test": 0}
    return examples_of


def write_days(root):
    examples_of, next_id = {}, 1
    names = examples_schema().names
    for split, days in DAYS.items():
        for day in days:
            for bucket in (0, 1):
                customers = [c for c in CUSTOMERS if c % 2 == bucket and (c + int(day[-2:])) % 5 != 0]
                rows = {name: [] for name in names}
                for customer in customers:
                    for _ in range(1 + (customer * int(day[-2:])) % 3):
                        example = {"customer_id": customer, "ranking_id": f"r{next_id}", "cat_item": 100 + next_id,
                                   "cat_position": next_id, "cat_browser": customer, "cat_os": 7,
                                   "cat_device": int(day[-2:]), "is_order": float(next_id % 2)}
                        for name in names:
                            if name.startswith("num_"):
                                example[name] = float(next_id) if name == "num_clicks_7d" else next_id / 2
                        for name in names:
                            rows[name].append(example[name])
                        examples_of[next_id] = (customer, day)
                        next_id += 1
                # Histories in the opposite order to the examples: the join cannot rely on file order.
                lists = [history(c, day) for c in reversed(customers)]
                write(root / split / "examples" / f"dt={day}" / f"part-bucket={bucket:05d}.parquet",
                      pa.table(rows, schema=examples_schema()))
                write(root / split / "histories" / f"dt={day}" / f"part-bucket={bucket:05d}.parquet",
                      pa.table({"customer_id": list(reversed(customers)), "actions": [a for a, _ in lists],
                                "action_types": [t for _, t in lists]}, schema=HISTORIES_SCHEMA))
    return examples_of


def rewrite_manifest(root):
    """Record the files of `root` as they are now in its manifest, as if the stage had written them so."""
    manifest = json.loads((root / "_stage.json").read_text())
    manifest["files"], manifest["tables"] = stage.describe(root)
    (root / "_stage.json").write_text(json.dumps(manifest))


def write(path, table):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "processed"
    return root, build_processed(root)


def dataset(root, split="train", **options):
    return ProcessedDataset(root, split, **{"batch_size": 7, "max_history": L, "shuffle": True, "seed": 0,
                                            "categorical": CATEGORICAL, "numeric": NUMERIC, **options})


def prepared(loader, length=L):
    """The batches as the model gets them (on the CPU here)."""
    prepare = Prepare("cpu", length)
    return [prepare(batch) for batch in loader]


def ids_in_order(loader):
    return [int(i) for batch in loader for i in batch["numeric"][:, 0]]


def split_ids(examples_of, split):
    return sorted(i for i, (_, day) in examples_of.items() if day in DAYS[split])


def test_loader_yields_every_example_once_per_epoch_with_0_1_2_workers(processed):
    root, examples_of = processed
    data = dataset(root)
    orders = {workers: ids_in_order(make_loader(data, num_workers=workers)) for workers in (0, 1, 2)}
    for order in orders.values():
        assert sorted(order) == split_ids(examples_of, "train")
    # Batches are dealt to the workers in turn and taken back in turn: the same order for any count.
    assert orders[0] == orders[1] == orders[2]
    assert len(data) == len(orders[0])
    assert sum(1 for _ in make_loader(data)) == data.num_batches


def test_loader_days_are_dealt_to_the_workers_in_turn(processed, monkeypatch):
    root, examples_of = processed
    shares = []
    for worker in range(2):
        monkeypatch.setattr("recpipe.loader.get_worker_info", lambda: types.SimpleNamespace(id=worker, num_workers=2))
        shares.append({examples_of[i][1] for i in ids_in_order(dataset(root))})
    assert shares == [{DAYS["train"][0], DAYS["train"][2]}, {DAYS["train"][1]}]
    # More workers than days: the idle ones yield nothing.
    monkeypatch.setattr("recpipe.loader.get_worker_info", lambda: types.SimpleNamespace(id=5, num_workers=8))
    assert ids_in_order(dataset(root)) == []


def test_loader_each_file_is_read_once_per_epoch_by_one_worker(processed, tmp_path, monkeypatch):
    """Every DataLoader worker used to read every day; W workers read the data W times."""
    import recpipe.loader
    log = tmp_path / "reads"
    read = recpipe.loader._read

    def logged(paths, columns):
        with open(log, "a") as f:  # appends of a line are atomic: the workers may log at once
            f.writelines(f"{os.getpid()} {path}\n" for path in paths)
        return read(paths, columns)

    monkeypatch.setattr(recpipe.loader, "_read", logged)  # the workers are forked: they read through it too
    root = processed[0]
    data = dataset(root)
    for workers in (0, 1, 2):
        log.unlink(missing_ok=True)
        data.set_epoch(workers)
        assert len(ids_in_order(make_loader(data, num_workers=workers))) == len(data)
        reads = [line.split() for line in log.read_text().splitlines()]
        files = sorted(str(path) for path in (root / "train").rglob("*.parquet"))
        assert sorted(path for _, path in reads) == files  # every file once, in all
        assert len({pid for pid, _ in reads}) == max(workers, 1)


def test_loader_days_come_in_date_order_each_shuffled_within(processed):
    root, examples_of = processed
    shuffled = ids_in_order(dataset(root))
    in_order = ids_in_order(dataset(root, shuffle=False))
    assert in_order == split_ids(examples_of, "train")  # files' order: day, then bucket file, then row
    days = [examples_of[i][1] for i in shuffled]
    assert days == sorted(days)
    assert shuffled != in_order
    for day in DAYS["train"]:
        of_day = [i for i in in_order if examples_of[i][1] == day]
        assert sorted(i for i in shuffled if examples_of[i][1] == day) == of_day


def test_loader_order_depends_on_seed_and_epoch_also_in_persistent_workers(processed):
    root, _ = processed
    data = dataset(root)
    loader = make_loader(data, num_workers=2)  # persistent workers: set_epoch must reach them
    orders = {}
    for epoch in (0, 1, 0):
        data.set_epoch(epoch)
        orders.setdefault(epoch, []).append(ids_in_order(loader))
    assert orders[0][0] == orders[0][1]
    assert orders[1][0] != orders[0][0]
    other_seed = dataset(root, seed=1)
    assert ids_in_order(make_loader(other_seed)) != orders[0][0]
    other_seed.set_epoch(1)
    assert ids_in_order(make_loader(other_seed)) != orders[1][0]


def test_loader_batches_have_the_promised_shapes_and_dtypes(processed):
    root, _ = processed
    batches = prepared(make_loader(dataset(root), num_workers=2))
    expected = {"item": (torch.int64, 1), "history_items": (torch.int64, 2), "history_action_types": (torch.int8, 2),
                "categorical": (torch.int64, 2), "numeric": (torch.float32, 2), "target": (torch.float32, 1)}
    for batch in batches:
        assert set(batch) == set(expected)
        size = len(batch["item"])
        assert 1 <= size <= 7
        for name, (dtype, dims) in expected.items():
            assert batch[name].dtype == dtype and batch[name].dim() == dims
            assert batch[name].shape[0] == size
        assert batch["history_items"].shape == batch["history_action_types"].shape == (size, L)
        assert batch["categorical"].shape[1] == len(CATEGORICAL) and batch["numeric"].shape[1] == len(NUMERIC)
    assert any(len(batch["item"]) < 7 for batch in batches)  # a day's last batch is smaller, not dropped


def test_loader_columns_line_up_with_their_example(processed):
    root, examples_of = processed
    for batch in prepared(make_loader(dataset(root))):
        ids = batch["numeric"][:, 0].long()
        assert torch.equal(batch["categorical"][:, 0], ids)  # cat_position, in the order asked for
        assert torch.equal(batch["item"], 100 + ids)
        assert torch.equal(batch["target"], (ids % 2).float())
        assert torch.equal(batch["numeric"][:, 1], ids.float() / 2)
        customers = torch.tensor([examples_of[int(i)][0] for i in ids])
        assert torch.equal(batch["categorical"][:, 1], customers)


def test_loader_histories_line_up_and_a_long_one_is_cut_to_its_first_L(processed):
    root, examples_of = processed
    seen_long = seen_empty = False
    for batch in prepared(make_loader(dataset(root), num_workers=2)):
        for number, items, action_types in zip(batch["numeric"][:, 0].tolist(), batch["history_items"],
                                               batch["history_action_types"]):
            customer, day = examples_of[int(number)]
            expected_items, expected_types = history(customer, day)
            length = min(len(expected_items), L)
            assert items.tolist() == expected_items[:L] + [0] * (L - length)  # right-padded, no spill
            assert action_types.tolist() == expected_types[:L] + [0] * (L - length)
            seen_long |= (customer, day) == LONG
            seen_empty |= not expected_items
    assert seen_long and seen_empty


def test_loader_empty_histories_gives_zeros_of_the_same_shapes(processed):
    root, _ = processed
    full = prepared(make_loader(dataset(root)))
    empty = prepared(make_loader(dataset(root, empty_histories=True), num_workers=2))
    assert len(full) == len(empty)
    for with_history, without in zip(full, empty):
        for name in ("history_items", "history_action_types"):
            assert without[name].shape == with_history[name].shape
            assert without[name].dtype == with_history[name].dtype
            assert not without[name].any()
        for name in ("item", "categorical", "numeric", "target"):
            assert torch.equal(without[name], with_history[name])


def test_loader_defaults_columns_to_the_files_order_and_L_to_the_manifest(processed):
    root, _ = processed
    data = ProcessedDataset(root, "val")
    assert data.categorical == ["cat_position", "cat_browser", "cat_os", "cat_device"]
    assert data.numeric == [name for name in examples_schema().names if name.startswith("num_")]
    assert data.max_history == 20
    batch = next(iter(make_loader(data)))
    assert batch["history_items"].shape[1] == 20 and batch["numeric"].shape[1] == len(data.numeric)
    assert len(ProcessedDataset(root, "test")) == 0  # preprocess.py recorded no test day: an empty split


def test_loader_missing_or_corrupt_processed_is_a_user_error(processed, tmp_path):
    root = tmp_path / "processed"
    shutil.copytree(processed[0], root)
    with pytest.raises(UserError, match="nowhere/ is missing: run preprocess.py first"):
        dataset(tmp_path / "nowhere")
    with pytest.raises(UserError, match="has no column cat_colour"):
        dataset(root, categorical=["cat_colour"])
    shutil.rmtree(root / "val" / "histories" / "dt=2024-03-04")
    with pytest.raises(UserError, match=r"processed/ is not as preprocess.py published it: 2 files missing: "
                                        r"val/histories/dt=2024-03-04/part-bucket=00000.parquet, .*; run "
                                        r"`python pipeline.py run --from processed`"):
        dataset(root, "val")
    corrupt = root / "train" / "examples" / "dt=2024-03-02" / "part-bucket=00001.parquet"
    corrupt.write_bytes(b"not parquet")
    with pytest.raises(UserError, match=r"1 file changed \(size or rows\): train/examples/dt=2024-03-02/part-bucket"):
        dataset(root)
    (root / "_stage.json").unlink()
    with pytest.raises(UserError, match=r"is incomplete \(no _stage.json\): run preprocess.py first"):
        dataset(root)


def test_loader_an_example_without_its_history_row_is_a_user_error(processed, tmp_path):
    root = tmp_path / "processed"
    shutil.copytree(processed[0], root)
    path = root / "val" / "histories" / "dt=2024-03-04" / "part-bucket=00000.parquet"
    pq.write_table(pq.read_table(path).slice(1), path)
    rewrite_manifest(root)  # as a buggy stage would have published it
    with pytest.raises(UserError, match="has no histories row for customer"):
        list(dataset(root, "val"))


def test_loader_make_loader_gives_whole_batches_from_persistent_workers(processed):
    root, _ = processed
    data = dataset(root)
    loader = make_loader(data, num_workers=2, pin_memory=False)
    assert loader.batch_size is None and loader.num_workers == 2 and loader.persistent_workers
    assert not make_loader(data).persistent_workers
    assert make_loader(data).pin_memory == torch.cuda.is_available()


def test_loader_a_file_gone_or_corrupted_after_the_start_is_a_user_error(processed, tmp_path):
    root = tmp_path / "processed"
    shutil.copytree(processed[0], root)
    data = dataset(root)
    (root / "train" / "histories" / "dt=2024-03-01" / "part-bucket=00001.parquet").write_bytes(b"junk")
    with pytest.raises(UserError, match=r"histories/dt=2024-03-01/part-bucket=00001.parquet: not a readable Parquet"):
        list(data)
    shutil.rmtree(root / "train")
    with pytest.raises(UserError, match="has gone: processed/ was replaced or removed while this run read it"):
        list(data)


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_processed_published_again_midway_stops_with_one_line(processed, tmp_path, workers):
    """preprocess.py publishing a new processed/ (a whole folder renamed into place) while a run reads
    the old one: the next day read stops the run, also from inside a DataLoader worker."""
    root = tmp_path / "data" / "processed"
    shutil.copytree(processed[0], root)
    batches = iter(make_loader(dataset(root), num_workers=workers))
    next(batches)  # the first day is read, from the version the run started with
    build_processed(root, max_history=19)
    with pytest.raises(UserError) as stopped:
        for _ in batches:
            pass
    assert str(stopped.value).splitlines() == [
        f"{root}/ was replaced or removed while this run read it (preprocess.py ran again, or it was copied over): "
        "what was read so far is from the earlier version, so this run stopped; start train.py again on the new one"]


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_loader_timeline_and_compact_layouts_give_the_model_the_same_batches(processed_data, compact_data, workers):
    """The same data and seed through both layouts (preprocess.py's own), an epoch of batches each: equal,
    tensor for tensor, histories cut from 60 to 25 included."""
    def epoch(data_dir):
        checked = stage.open_stage(data_dir, "processed")
        timelines = Timelines.load(checked) if checked.manifest["parameters"]["layout"] == "timeline" else None
        data = ProcessedDataset(checked.path, "train", batch_size=64, max_history=25, seed=3, checked=checked,
                                timelines=timelines)
        data.set_epoch(1)
        prepare = Prepare("cpu", 25, timelines)
        return [prepare(batch) for batch in make_loader(data, num_workers=workers)]

    timeline, compact = epoch(processed_data[0]), epoch(compact_data[0])
    assert len(timeline) == len(compact) > 100
    for from_timeline, from_compact in zip(timeline, compact):
        assert from_timeline.keys() == from_compact.keys()
        for name in from_compact:
            assert from_timeline[name].dtype == from_compact[name].dtype, name
            assert torch.equal(from_timeline[name], from_compact[name]), name
    assert any(batch["history_items"][:, -1].any() for batch in timeline)  # some histories fill all 25 slots
