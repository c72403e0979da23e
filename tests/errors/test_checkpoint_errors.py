"""The checkpoint family: a folder `unislim evaluate` or `model.path` names, broken one way each.

Every case copies one good tiny checkpoint, breaks it, and runs `unislim evaluate` on it (which
checks the folder before loading anything) with an out dir that must stay without metrics.json.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest

from tests.errors import cli, refused, write
from unislim.errors import CheckpointError
from unislim.modeling.checks import check_checkpoint


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    from tests.modeling.tiny import tiny

    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    tiny().save_pretrained(folder)
    return folder


@pytest.fixture
def ckpt(good, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(good, copy)
    return copy


def _evaluate_refused(capsys, folder, *names):
    out = folder.parent / "out"
    line = refused(cli(capsys, "evaluate", folder, "--out-dir", out), *names, command="evaluate")
    assert not (out / "metrics.json").exists()
    return line


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_the_good_checkpoint_passes(good):
    assert check_checkpoint(good)["model_type"] == "unidigits"


def test_folder_that_does_not_exist(tmp_path, capsys):
    _evaluate_refused(capsys, tmp_path / "nope", str(tmp_path / "nope"), "does not exist")


def test_path_that_is_a_file(ckpt, capsys):
    _evaluate_refused(capsys, ckpt / "model.safetensors", str(ckpt / "model.safetensors"), "is a file")


def test_folder_without_config_json(ckpt, capsys):
    (ckpt / "config.json").unlink()
    _evaluate_refused(capsys, ckpt, str(ckpt), "no config.json")


def test_config_json_that_is_not_json(ckpt, capsys):
    write(ckpt / "config.json", '{"model_type": "unidigits",')
    _evaluate_refused(capsys, ckpt, str(ckpt / "config.json"), "not valid JSON", "line 1")


@pytest.mark.parametrize("content, problem", [("[1, 2]", "expected a JSON object, found a list"),
                                              ('{"hidden_size": 32}', "has no 'model_type'"),
                                              ('{"model_type": "no-such-model"}', "'no-such-model' is not one")])
def test_config_json_of_the_wrong_shape(ckpt, capsys, content, problem):
    write(ckpt / "config.json", content)
    _evaluate_refused(capsys, ckpt, str(ckpt / "config.json"), problem)


def test_only_pytorch_model_bin_is_never_unpickled(ckpt, capsys):
    marker = ckpt.parent / "unpickled"

    class Payload:  # unpickling this file would create `marker`
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    _evaluate_refused(capsys, ckpt, "pytorch_model.bin", "pickled", "safetensors only", "never unpickles")
    assert not marker.exists()


def test_truncated_safetensors(ckpt, capsys):
    weights = ckpt / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    _evaluate_refused(capsys, ckpt, str(weights), "is truncated", "bytes of data")


@pytest.mark.parametrize("content", [os.urandom(4096), b"", b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"not json at all!"],
                         ids=["random", "empty", "header-not-json"])
def test_random_or_empty_safetensors(ckpt, capsys, content):
    (ckpt / "model.safetensors").write_bytes(content)
    _evaluate_refused(capsys, ckpt, str(ckpt / "model.safetensors"), "safetensors")


def test_header_whose_offsets_do_not_fit_the_shape(ckpt, capsys):
    weights = ckpt / "model.safetensors"
    raw = weights.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [d * 2 for d in header[name]["shape"]]
    text = json.dumps(header).encode()
    weights.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    _evaluate_refused(capsys, ckpt, str(weights), repr(name), "needs", "offsets span")


def test_weights_whose_shapes_do_not_match_the_config(ckpt, capsys):
    _edit_config(ckpt, hidden_size=48)
    line = _evaluate_refused(capsys, ckpt, str(ckpt), "do not match config.json's shapes", "weights [",
                             "config builds [")
    assert "48" in line


def test_weights_of_another_model(ckpt, capsys):
    import torch
    from safetensors.torch import save_file

    (ckpt / "model.safetensors").unlink()
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(ckpt / "model.safetensors"))
    _evaluate_refused(capsys, ckpt, str(ckpt), "none of the 1 tensors", "encoder.weight")


def test_sharded_index_that_names_a_missing_shard(ckpt, capsys):
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00002.safetensors")
    write(ckpt / "model.safetensors.index.json", json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    _evaluate_refused(capsys, ckpt, "model.safetensors.index.json", "model-00002-of-00002.safetensors",
                      "does not exist")


def test_no_weights_at_all(ckpt, capsys):
    (ckpt / "model.safetensors").rename(ckpt / "adapter.safetensors")
    _evaluate_refused(capsys, ckpt, str(ckpt), "has no weights", "adapter.safetensors")


def test_bad_model_path_in_validate_and_run(ckpt, tmp_path, capsys):
    os.truncate(ckpt / "model.safetensors", 100)
    cfg = write(tmp_path / "p.yaml", f"model: {{source: path, path: '{ckpt}'}}\npretrain: {{enabled: false}}\n")
    refused(cli(capsys, "validate", cfg), "model.path", str(ckpt / "model.safetensors"), "truncated")
    runs = tmp_path / "runs"
    refused(cli(capsys, "run", cfg, "--runs-dir", runs), "model.path", "truncated", runs_dir=runs)
    assert not runs.exists()
    assert cli(capsys, "validate", cfg, "--offline").rc == 0


def test_check_checkpoint_raises_checkpoint_error_with_exit_code_2(ckpt):
    write(ckpt / "config.json", "not json")
    with pytest.raises(CheckpointError) as e:
        check_checkpoint(ckpt)
    assert e.value.exit_code == 2 and isinstance(e.value, ValueError)  # old `except ValueError` still catches it
    assert "\n" not in str(e.value)
