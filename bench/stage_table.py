"""What each stage of one pipeline run produced, as Markdown tables: the evaluation of every
checkpoint (active parameters, FLOPs and NLL per task, agreement with the source, CPU latency) and
the accelerate stage's rows (FLOPs, speed-ups by wall clock and by CPU time, interleaved in one
process by the stage).

    python bench/stage_table.py RUNS_DIR und,gen      # a unified model's run
    python bench/stage_table.py RUNS_DIR text         # a causal LM's run
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STAGES = ["evaluate", "evaluate-prune", "evaluate-partition", "evaluate-adapt-eft", "evaluate-adapt",
          "evaluate-mod", "evaluate-search"]


def output(runs: Path, stage: str) -> Path | None:
    for manifest in sorted((runs / stage).glob("*/manifest.json")):
        data = json.loads(manifest.read_text())
        if data.get("complete"):
            return Path(data["dir"])
    return None


def _cell(metrics: dict, key: str, scale: float = 1.0, fmt: str = "{:.3f}") -> str:
    return fmt.format(metrics[key] / scale) if key in metrics else "—"


def evaluation_table(runs: Path, tasks: list[str]) -> list[str]:
    columns = ([(f"params active {t}", f"params/active_{t}", 1, "{:,.0f}") for t in tasks]
               + [(f"MFLOPs / {t} sample", f"flops/{t}_per_sample", 1e6, "{:.3f}") for t in tasks]
               + [(f"NLL {t}", f"nll/{t}", 1, "{:.3f}") for t in tasks]
               + [(f"agreement {t}", f"agreement/{t}", 1, "{:.3f}") for t in tasks]
               + [(f"ms / {t} sample", f"latency_ms/{t}_per_sample", 1, "{:.2f}") for t in tasks])
    lines = ["| checkpoint | " + " | ".join(c[0] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for stage in STAGES:
        folder = output(runs, stage)
        if folder is None:
            continue
        m = json.loads((folder / "metrics.json").read_text())
        name = "source" if stage == "evaluate" else stage.removeprefix("evaluate-")
        lines.append(f"| {name} | " + " | ".join(_cell(m, key, scale, fmt) for _, key, scale, fmt in columns) + " |")
    return lines


def accelerate_table(runs: Path) -> list[str]:
    folder = output(runs, "accelerate")
    if folder is None:
        return []
    report = json.loads((folder / "accelerate.json").read_text())
    keys = sorted({k for row in report["rows"].values() for k in row if k.startswith(("flops/", "speedup"))})
    lines = ["| technique | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, row in report["rows"].items():
        cells = [("—" if k not in row else f"{row[k]:.2f}×" if k.startswith("speedup") else f"{row[k] / 1e6:.3f} M")
                 for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Not applicable: " + "; ".join(f"*{k}*: {v}" for k, v in report.get("not_applicable", {}).items())]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path)
    ap.add_argument("tasks", help="comma-separated task names, e.g. und,gen or text")
    args = ap.parse_args()
    print("\n".join(evaluation_table(args.runs, args.tasks.split(","))))
    accel = accelerate_table(args.runs)
    if accel:
        print()
        print("\n".join(accel))


if __name__ == "__main__":
    main()
