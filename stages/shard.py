"""Stage `shard`: calibration samples per task, written as Parquet shards with Ray Data.

For each task of `shard.tasks`: draw `n` rows (seeded) from the reference task, or take the first
`n` rows of the user's Parquet after checking its schema, and write `calib/<task>/part-*.parquet`.
A task with no rows, a missing file or a missing column is an error that names the task and file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
from ray.data import SaveMode
from ray.data.datasource import FilenameProvider

from unislim.modeling.calibration import check_columns, reference_rows


class _PartNames(FilenameProvider):
    def __init__(self):
        super().__init__(file_format="parquet")

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{task_index:05d}.parquet"


def run(cfg: Any, inputs: dict, ctx: Any) -> dict[str, str]:
    sh = cfg.shard
    ray.data.DataContext.get_current().enable_progress_bars = False  # stage progress lines instead
    counts = {}
    for task in sh.tasks:
        table = _reference_table(task, sh) if task.source == "reference" else _user_table(task, sh.n)
        folder = Path(ctx.out_dir) / "calib" / task.name
        n_files = max(1, -(-table.num_rows // sh.rows_per_file))
        ds = ray.data.from_arrow(table).repartition(n_files)
        ds.write_parquet(str(folder), filename_provider=_PartNames(), mode=SaveMode.OVERWRITE)  # a fresh folder
        counts[task.name] = table.num_rows
        ctx.progress(f"{task.name} ({task.kind}, {task.source}): {table.num_rows} rows → {n_files} shard(s)")
    (Path(ctx.out_dir) / "tasks.json").write_text(json.dumps(
        {t.name: {"kind": t.kind, "rows": counts[t.name]} for t in sh.tasks}, indent=2))
    (Path(ctx.out_dir) / "metrics.json").write_text(json.dumps({f"shard/rows/{k}": v for k, v in counts.items()}))
    return {"calib": "calib", "tasks": "tasks.json"}


def _reference_table(task, sh) -> pa.Table:
    return pa.Table.from_pylist(reference_rows(task.kind, sh.n, sh.seed + _task_salt(task.name)))


def _task_salt(name: str) -> int:
    return sum(ord(c) * 31**i for i, c in enumerate(name)) % 100_003


def _user_table(task, n: int) -> pa.Table:
    where = f"shard.tasks[{task.name}] ({task.path})"
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
            raise ValueError(f"shard.tasks[{task.name}] ({f}): not a readable Parquet file ({e})") from None
        check_columns(task.kind, t.column_names, f"shard.tasks[{task.name}] ({f})")
        tables.append(t.select(list(dict.fromkeys(t.column_names))))
    table = pa.concat_tables(tables, promote_options="default").slice(0, n)
    if table.num_rows == 0:
        raise ValueError(f"{where}: no rows")
    return table
