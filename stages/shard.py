"""Stage `shard`: every row the pipeline reads, as Parquet shards (read back with Ray Data).

For each calibration task of `shard.tasks`: `n` rows (drawn from the family's own data, or the first
`n` of the user's Parquet) → `calib/<task>/part-*.parquet`. For each training task of `data.tasks`
(default: the calibration tasks): `heldout` rows → `heldout/<task>/` (what evaluate's held-out NLL
and agreement read) and the rest → `train/<task>/` (what pretrain, adapt, mod and search trials read
through `ray.train.get_dataset_shard`). A reference task generates its training rows (as many as
the longest training stage reads: one epoch) from the train split and its held-out rows from the
held-out split; a Parquet task is shuffled with `data.seed`, then split.

Every user file is checked by the family before anything is written (columns, values, lengths
against the model's vocabulary and context): a bad row is an error naming the task, the file and
the row.
`tasks.json` lists every task with its kind, role, rows and mixing weight.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from unislim.modeling.families import DataError, family_for, get_family


def run(cfg: Any, inputs: dict, ctx: Any) -> dict[str, str]:
    sh, data = cfg.shard, cfg.data
    model_config = _model_config(inputs, cfg.trust_remote_code)
    # a checkpoint from a path: its family by name, or from its config.json (`model.family: auto`)
    family = (get_family(cfg.family) if model_config is None else
              family_for(model_config, name=cfg.family, trust_remote_code=cfg.trust_remote_code))
    out = Path(ctx.out_dir)
    tasks: dict[str, dict[str, Any]] = {}
    for task in sh.tasks:
        where = f"shard.tasks[{task.name}]"
        if task.source == "reference":
            table = pa.Table.from_pylist(family.reference_rows(task.kind, sh.n, sh.seed + _task_salt(task.name)))
        else:
            table = _user_table(task, where, family, model_config).slice(0, sh.n)
        _write(table, out / "calib" / task.name, sh.rows_per_file)
        tasks[task.name] = {"kind": task.kind, "role": "calib", "rows": table.num_rows}
        ctx.progress(f"calib {task.name} ({task.kind}, {task.source}): {table.num_rows} rows")
    for task in cfg.training_tasks:
        where = f"data.tasks[{task.name}]"
        train_rows = cfg.train_rows.get(task.name)
        if task.source == "reference":
            salt = data.seed + _task_salt(task.name) + 1_000_003
            heldout = pa.Table.from_pylist(family.reference_rows(task.kind, data.heldout, salt, "heldout", targets=True))
            ctx.progress(f"train {task.name}: generating {train_rows} rows from the train split")
            train = pa.Table.from_pylist(family.reference_rows(task.kind, train_rows, salt + 7, "train", targets=True))
        else:
            table = _user_table(task, where, family, model_config)
            order = np.random.default_rng(data.seed).permutation(table.num_rows)
            table = table.take(pa.array(order))
            if table.num_rows <= data.heldout:
                raise DataError(f"{where} ({task.path}): {table.num_rows} rows, but data.heldout keeps "
                                f"{data.heldout} out of training: nothing left to train on")
            heldout, train = table.slice(0, data.heldout), table.slice(data.heldout)
            if train_rows is not None:
                train = train.slice(0, train_rows)
        for role, table in (("heldout", heldout), ("train", train)):
            _write(table, out / role / task.name, data.rows_per_file)
        tasks[f"{task.name}"] = {**tasks.get(task.name, {}), "kind": task.kind, "weight": task.weight,
                                 "train_rows": train.num_rows, "heldout_rows": heldout.num_rows}
        ctx.progress(f"{task.name}: {train.num_rows} training rows, {heldout.num_rows} held out")
    for name, info in tasks.items():  # a task only in data.tasks is no calibration task
        info.setdefault("rows", 0)
    (out / "tasks.json").write_text(json.dumps(tasks, indent=2))
    metrics = {f"shard/rows/{k}": v["rows"] for k, v in tasks.items() if v.get("rows")}
    metrics.update({f"shard/train_rows/{k}": v["train_rows"] for k, v in tasks.items() if "train_rows" in v})
    (out / "metrics.json").write_text(json.dumps(metrics))
    outputs = {"calib": "calib", "tasks": "tasks.json"}
    if cfg.training_tasks:
        outputs.update({"train": "train", "heldout": "heldout"})
    return outputs


def _model_config(inputs: dict, trust_remote_code: bool):
    if "checkpoint" not in inputs:
        return None
    from unislim.modeling.loading import read_config

    return read_config(inputs["checkpoint"].path, trust_remote_code)


def _write(table: pa.Table, folder: Path, rows_per_file: int) -> None:
    """`folder/part-00000.parquet`, ... of `rows_per_file` rows each, in row order. Written here with
    pyarrow: the table is already in this process, and starting a Ray Data job per folder costs
    seconds; the stages that read the shards (training, scoring) read them with Ray Data."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(range(0, max(table.num_rows, 1), rows_per_file)):
        pq.write_table(table.slice(start, rows_per_file), folder / f"part-{i:05d}.parquet")


def _task_salt(name: str) -> int:
    return sum(ord(c) * 31**i for i, c in enumerate(name)) % 100_003


def _user_table(task, where: str, family, model_config) -> pa.Table:
    where = f"{where} ({task.path})"
    path = Path(task.path)
    if not path.exists():
        raise FileNotFoundError(f"{where}: no such file or folder")
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{where}: no .parquet files in the folder")
    tables = []
    for f in files:
        try:
            t = pq.read_table(f)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{where.split(' (')[0]} ({f}): not a readable Parquet file ({e})") from None
        family.check_table(task.kind, t, f"{where.split(' (')[0]} ({f})", model_config)
        tables.append(t.select(list(dict.fromkeys(t.column_names))))
    table = pa.concat_tables(tables, promote_options="default")
    if table.num_rows == 0:
        raise DataError(f"{where}: no rows")
    return table
