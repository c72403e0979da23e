"""What a stage gets besides its config and inputs: where to write, how to report.

A plain picklable dataclass, so it crosses into Ray tasks and Ray Train workers. A test can
build one by hand (`StageContext.local("score", tmp_path)`) and call a stage without Ray or MLflow:
with no `run_id`, `log_metrics` does nothing.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


_warned: list[bool] = []  # a failed live-metrics call was reported in this process


@dataclass
class StageContext:
    stage: str
    key: str
    out_dir: Path  # the (temp) folder this stage writes into
    runs_dir: Path
    tracking_uri: str | None = None
    run_id: str | None = None  # this stage's MLflow child run
    started: float = field(default_factory=time.time)
    home_node: str = ""  # with a local MLflow store: the one Ray node that may write to it

    @classmethod
    def local(cls, stage: str, out_dir: str | Path) -> StageContext:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        return cls(stage=stage, key="local", out_dir=out_dir, runs_dir=out_dir)

    def progress(self, message: str) -> None:
        """One progress line: `[stage]  12.3s  message`."""
        # sys.stdout.write, not print: Ray Train V2 tees print() into its logger (each line twice)
        sys.stdout.write(f"[{self.stage}] {time.time() - self.started:7.1f}s  {message}\n")
        sys.stdout.flush()

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Live metrics into this stage's MLflow run (call from the driver task or rank 0 only).

        A failing MLflow call does not stop the stage: it is reported once (per process) and the
        metrics of that step are lost; the stage's final metrics are logged again at its end. With a
        local store, a call from another node than the driver's is refused (`ClusterError`): that
        node cannot reach the driver's sqlite file."""
        if not (self.run_id and self.tracking_uri):
            return
        from . import tracking

        if self.home_node:
            import ray

            from unislim.errors import ClusterError

            if ray.is_initialized() and ray.get_runtime_context().get_node_id() != self.home_node:
                raise ClusterError("--tracking-uri", f"{self.stage} logs from another Ray node than the driver's, "
                                   f"but the tracking store is local ({self.tracking_uri}); a node joined the "
                                   "cluster mid-run: use an MLflow server (see cluster/README.md)")
        try:
            tracking.log_metrics(self.tracking_uri, self.run_id, metrics, step)
        except Exception as e:  # noqa: BLE001 - live metrics are a nicety; the stage goes on
            if not _warned:
                _warned.append(True)
                self.progress(f"WARNING: live metrics not logged to MLflow ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]}); training goes on")

    @property
    def train_run_name(self) -> str:
        """Ray Train run name: stable across reruns of the same cache key, so a rerun resumes."""
        return f"{self.stage}-{self.key}"

    @property
    def train_storage(self) -> str:
        return str((Path(self.runs_dir) / "ray_train").resolve())
