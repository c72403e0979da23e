"""Bad data: `unislim run` refuses it before anything starts, naming the task, the file and the rows,
with counts: NaN / ±inf / 0..255 image values, images of the wrong size, words outside the
vocabulary, token ids outside it or negative, rows longer than the model's context, empty rows,
missing columns. The same checks run again in the shard stage (every row, for API users)."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForCausalLM

from tests.causal_lms import config as lm_config
from tests.errors import cli, refused, write

GOOD_IMAGE = [0.0] * 128


def _und(path, images, questions=None, answers=None):
    n = len(images)
    pq.write_table(pa.table({"image": images, "question": questions or ["what is on the left ?"] * n,
                             "answer": answers or ["one"] * n}), path)
    return path


def _digits_config(tmp_path, und):
    return write(tmp_path / "p.yaml", "model: {source: reference, size: tiny}\n"
                 "pretrain: {steps: 4, batch_size: 4, warmup_steps: 1, checkpoint_every: 2, log_every: 2}\n"
                 f"shard: {{n: 4, tasks: [{{name: mine, kind: und, source: parquet, path: '{und}'}}, "
                 "{name: gen, kind: gen}]}\n")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm") / "qwen2"
    AutoModelForCausalLM.from_config(lm_config("qwen2")).save_pretrained(folder)  # vocab 64, context 64
    return folder


def _text_config(tmp_path, lm, rows):
    data = write_rows(tmp_path / "text.parquet", rows)
    return write(tmp_path / "p.yaml", f"model: {{source: path, path: '{lm}'}}\npretrain: {{enabled: false}}\n"
                 f"shard: {{n: 4, tasks: [{{name: text, kind: text, source: parquet, path: '{data}'}}]}}\n"), data


def write_rows(path, rows):
    pq.write_table(pa.table({"input_ids": pa.array(rows, type=pa.list_(pa.int64()))}), path)
    return path


@pytest.mark.parametrize("case,images,named", [
    ("nan", [GOOD_IMAGE, [math.nan] * 128], "1 with NaN or infinite image values (first: row 1"),
    ("inf", [[math.inf] + [0.0] * 127, GOOD_IMAGE], "1 with NaN or infinite image values (first: row 0"),
    ("0..255", [[200.0] * 128, [255.0] * 128], "2 with image values outside [-1, 1]"),
    ("size", [[0.0] * 64, GOOD_IMAGE, GOOD_IMAGE], "1 with an image of other than 128 values (8 x 16) (first: row 0, 64"),
])
def test_bad_images_are_refused_naming_task_file_and_row(tmp_path, capsys, case, images, named):
    und = _und(tmp_path / f"{case}.parquet", images)
    runs = tmp_path / "runs"
    r = cli(capsys, "run", _digits_config(tmp_path, und), "--runs-dir", runs)
    line = refused(r, "shard.tasks[mine]", str(und), named, runs_dir=runs, command="run")
    assert f"of {len(images)} rows rejected" in r.err, line


def test_words_outside_the_vocabulary_are_counted(tmp_path, capsys):
    und = _und(tmp_path / "words.parquet", [GOOD_IMAGE] * 3, answers=["one", "banana", "kiwi"])
    runs = tmp_path / "runs"
    r = cli(capsys, "run", _digits_config(tmp_path, und), "--runs-dir", runs)
    refused(r, "shard.tasks[mine]", "2 of 3 rows rejected", "answer words outside the reference vocabulary",
            "'banana'", runs_dir=runs, command="run")


@pytest.mark.parametrize("rows,named", [
    ([[1, 2, 3], [4, 70, 5]], "token ids outside 0..63 (the model's vocabulary) (first: row 1, found 4..70)"),
    ([[1, 2, 3], [-1, 2, 3]], "token ids outside 0..63 (the model's vocabulary) (first: row 1, found -1..3)"),
    ([[1, 2, 3], list(range(60)) * 2], "longer than the model's context of 64 tokens (first: row 1, 120 tokens)"),
    ([[], [1, 2, 3], [7]], "2 of 3 rows rejected: 2 with fewer than 2 tokens (first: row 0, 0 tokens)"),
])
def test_bad_token_rows_are_refused_against_the_model(tmp_path, capsys, lm, rows, named):
    config, data = _text_config(tmp_path, lm, rows)
    runs = tmp_path / "runs"
    r = cli(capsys, "run", config, "--runs-dir", runs)
    refused(r, "shard.tasks[text]", str(data), named, runs_dir=runs, command="run")


def test_a_missing_column_names_what_the_task_needs(tmp_path, capsys, lm):
    data = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"text": ["hello", "world"]}), data)
    config = write(tmp_path / "p.yaml", f"model: {{source: path, path: '{lm}'}}\npretrain: {{enabled: false}}\n"
                   f"shard: {{tasks: [{{name: text, kind: text, source: parquet, path: '{data}'}}]}}\n")
    r = cli(capsys, "validate", config)
    refused(r, "shard.tasks[text]", str(data), "needs columns ['input_ids']", "missing ['input_ids']",
            command="validate")


def test_the_shard_stage_checks_every_row_again(tmp_path):
    """Called without the CLI (a notebook, a test): the same error, before anything is written."""
    from types import SimpleNamespace

    from unislim.config import CalibrationTask, DataConfig, ShardConfig
    from unislim.errors import DataError
    from unislim.pipelines.context import StageContext
    from unislim.stages import shard

    und = _und(tmp_path / "nan.parquet", [GOOD_IMAGE, [math.nan] * 128])
    cfg = SimpleNamespace(shard=ShardConfig(tasks=[CalibrationTask(name="mine", kind="und", source="parquet",
                                                                   path=str(und))]),
                          data=DataConfig(), training_tasks=[], train_rows={}, family="digits",
                          trust_remote_code=False)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"shard.tasks\[mine\].*nan.parquet.*1 of 2 rows rejected"):
        shard.run(cfg, {}, StageContext.local("shard", out))
    assert not list(out.rglob("*.parquet"))
