"""The config family: a pipeline file, its overrides and the paths it names.

Each case feeds one bad input to `unislim validate` (or `run`, which checks the same before Ray
starts) and asserts the contract in `tests.errors.refused`.
"""

from __future__ import annotations

import pickle
import time

import pytest

from tests.errors import REPO, TINY, cli, cli_process, refused, write
from unislim import yamlio
from unislim.config import ConfigError, load_config

PIPELINE = REPO / "pipeline.yaml"

BILLION_LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")) + "name: *i\n"


def test_non_utf8_yaml_names_the_file_and_the_byte(tmp_path, capsys):
    bad = write(tmp_path / "latin1.yaml", "name: caf\xe9\n".encode("latin-1"))
    line = refused(cli(capsys, "validate", bad), str(bad), "not UTF-8", "0xe9", "line 1", command="validate")
    assert "UnicodeDecodeError" not in line


def test_yaml_path_that_is_a_directory(tmp_path, capsys):
    refused(cli(capsys, "validate", tmp_path), str(tmp_path), "is a folder", command="validate")


@pytest.mark.parametrize("content", ["", "# only a comment\n# and another\n", "---\n"],
                         ids=["zero-bytes", "comments-only", "empty-document"])
def test_empty_file_is_refused_not_the_default_pipeline(tmp_path, capsys, content):
    empty = write(tmp_path / "empty.yaml", content)
    refused(cli(capsys, "validate", empty), str(empty), "has no settings", command="validate")
    runs = tmp_path / "runs"
    refused(cli(capsys, "run", empty, "--runs-dir", runs), str(empty), runs_dir=runs, command="run")
    assert not runs.exists()  # refused before anything was created


def test_explicit_empty_mapping_is_still_the_default_pipeline(tmp_path, capsys):
    r = cli(capsys, "validate", write(tmp_path / "default.yaml", "{}\n"))
    assert r.rc == 0 and "valid" in r.out, r.err


def test_override_that_is_not_yaml_names_the_key(tmp_path, capsys):
    runs = tmp_path / "runs"
    r = cli(capsys, "run", PIPELINE, "pretrain.steps=[1", "--runs-dir", runs)
    refused(r, "pretrain.steps", "'[1'", "not valid YAML", runs_dir=runs, command="run")
    assert not runs.exists()


@pytest.mark.parametrize("item", ["pretrain..steps=1", "=3", ".seed=1", "seed"])
def test_malformed_override_keys(capsys, item):
    refused(cli(capsys, "validate", PIPELINE, item), item, "key=value", command="validate")


def test_duplicate_top_level_key_names_key_and_both_lines(tmp_path, capsys):
    dup = write(tmp_path / "dup.yaml", "seed: 1\nname: x\nseed: 2\n")
    line = refused(cli(capsys, "validate", dup), str(dup), "duplicate key 'seed'", "line 3", "first given at line 1")
    assert "not valid YAML" in line


def test_duplicate_key_inside_a_section_and_in_an_override(tmp_path, capsys):
    dup = write(tmp_path / "dup.yaml", "pretrain:\n  steps: 10\n  lr: 0.1\n  steps: 20\n")
    refused(cli(capsys, "validate", dup), "duplicate key 'steps'", "line 4", "line 2")
    refused(cli(capsys, "validate", PIPELINE, "pretrain={steps: 10, steps: 20}"), "pretrain", "duplicate key 'steps'")


def test_merge_keys_may_still_override():
    data = yamlio.load("base: &b {steps: 1, lr: 0.1}\npretrain:\n  <<: *b\n  steps: 5\n")
    assert data["pretrain"] == {"steps": 5, "lr": 0.1}


def test_billion_laughs_fails_fast_without_rendering_the_value(tmp_path):
    bomb = write(tmp_path / "bomb.yaml", BILLION_LAUGHS)
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as e:
        load_config(bomb)
    assert time.monotonic() - t0 < 5
    assert "aliases expand the document" in str(e.value) and "lol" not in str(e.value)
    r = cli_process("validate", bomb, timeout=60)  # as a user sees it
    line = refused(r, str(bomb), "aliases expand", "anchor &")
    assert len(r.err) < 600 and "lol" not in r.err, line


def test_recursive_alias_is_refused(tmp_path, capsys):
    loop = write(tmp_path / "loop.yaml", "shard:\n  tasks: &t [*t]\n")
    refused(cli(capsys, "validate", loop), str(loop), "recursive alias", "line 2")


def test_a_few_aliases_are_fine():
    data = yamlio.load("w: &w {num_workers: 1}\npretrain: *w\nadapt: *w\nmod: *w\n")
    assert data["adapt"] == {"num_workers": 1}
    written = "x: [" + ", ".join(["1"] * 2000) + "]\n"  # the bound is on what aliases add, not on what is written
    assert len(yamlio.load(written)["x"]) == 2000
    with pytest.raises(yamlio.AliasExpansionError):  # 200 copies of a 1000-item list add 200k values
        yamlio.load("x: &x [" + ", ".join(["1"] * 1000) + "]\ny: [" + ", ".join(["*x"] * 200) + "]\n")


def test_syntax_error_names_line_and_column_on_one_line(tmp_path, capsys):
    bad = write(tmp_path / "bad.yaml", "pretrain:\n  steps: [1, 2\nseed: 3\n")
    line = refused(cli(capsys, "validate", bad), str(bad), "not valid YAML", "line ")
    assert "^" not in line  # no source snippet with a caret


@pytest.mark.parametrize("content, problem", [("pretrain: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
                                              ("- model\n- pretrain\n", "<root>: must be a mapping of sections"),
                                              ("a: 1\n---\nb: 2\n", "expected a single document")],
                         ids=["deep", "list", "two-documents"])
def test_other_unusable_yaml(tmp_path, capsys, content, problem):
    bad = write(tmp_path / "bad.yaml", content)
    refused(cli(capsys, "validate", bad), str(bad), problem)


def test_config_error_is_one_class_for_old_and_new_imports():
    from unislim import config, errors

    assert config.ConfigError is errors.ConfigError and issubclass(errors.ConfigError, (ValueError, errors.UserError))
    one = errors.ConfigError("p.yaml", ["seed: bad"])
    assert str(one) == "p.yaml: seed: bad" and one.errors == ["seed: bad"] and one.exit_code == 2
    for error in (one, errors.ConfigError("p.yaml", ["a: x", "b: y"]), errors.DataError("shard.tasks[t] row 3", "nan"),
                  errors.CheckpointError("ckpt/model.safetensors", "truncated")):  # Ray pickles a task's error
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and str(again) == str(error)


def test_missing_file(tmp_path, capsys):
    refused(cli(capsys, "validate", tmp_path / "nope.yaml"), "nope.yaml", "file not found")


def test_planning_error_is_a_config_error_not_a_crash(tmp_path, capsys):
    r = cli(capsys, "validate", PIPELINE, "pretrain.enabled=false")
    refused(r, str(PIPELINE), "pretrain.enabled=true", command="validate")  # exit 2, not 1
    runs = tmp_path / "runs"
    refused(cli(capsys, "run", PIPELINE, "pretrain.enabled=false", "--runs-dir", runs), "pretrain.enabled",
            runs_dir=runs)


def test_model_path_that_does_not_exist(tmp_path, capsys):
    cfg = write(tmp_path / "p.yaml", "model: {source: path, path: " + str(tmp_path / "ckpt") + "}\n"
                "pretrain: {enabled: false}\n")
    refused(cli(capsys, "validate", cfg), "model.path", str(tmp_path / "ckpt"), "does not exist")
    assert cli(capsys, "validate", cfg, "--offline").rc == 0  # for a config meant for a cluster


def test_model_path_that_is_a_folder_without_config_json(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    cfg = write(tmp_path / "p.yaml",
                f"model: {{source: path, path: {tmp_path / 'ckpt'}}}\npretrain: {{enabled: false}}\n")
    runs = tmp_path / "runs"
    refused(cli(capsys, "run", cfg, "--runs-dir", runs), "model.path", "no config.json", runs_dir=runs)
    assert not runs.exists()


def _parquet_task(path) -> str:
    return f"shard.tasks=[{{name: t, kind: und, source: parquet, path: '{path}'}}]"


def test_parquet_path_problems_are_listed_together(tmp_path, capsys):
    (tmp_path / "empty-folder").mkdir()
    not_parquet = write(tmp_path / "rows.parquet", "id,text\n1,hello\n")
    tasks = ("shard.tasks=[{name: a, kind: und, source: parquet, path: '" + str(tmp_path / "missing.parquet") + "'}, "
             "{name: b, kind: und, source: parquet, path: '" + str(tmp_path / "empty-folder") + "'}, "
             "{name: c, kind: und, source: parquet, path: '" + str(not_parquet) + "'}]")
    r = cli(capsys, "validate", PIPELINE, tasks)
    refused(r, "3 errors", "shard.tasks[0].path", "does not exist", "shard.tasks[1].path", "no .parquet files",
            "shard.tasks[2].path", "is not a Parquet file")


def test_a_real_parquet_file_passes(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [[0.0] * 128] * 2, "question": ["what is on the left ?"] * 2,
                             "answer": ["one", "two"]}), tmp_path / "ok.parquet")
    r = cli(capsys, "validate", PIPELINE, _parquet_task(tmp_path / "ok.parquet"))
    assert r.rc == 0, r.err
    truncated = tmp_path / "cut.parquet"
    truncated.write_bytes((tmp_path / "ok.parquet").read_bytes()[:-20])
    refused(cli(capsys, "validate", PIPELINE, _parquet_task(truncated)), str(truncated), "truncated?")


def test_shipped_tiny_config_still_validates(tmp_path, capsys):
    r = cli(capsys, "validate", write(tmp_path / "tiny.yaml", TINY), "seed=3")
    assert r.rc == 0 and "shard → pretrain" in r.out, r.err
