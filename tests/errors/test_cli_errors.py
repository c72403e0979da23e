"""The CLI and cluster family: flags, the runs / out dirs, the MLflow server and the Ray address.

The hang cases run `unislim` as a subprocess against closed or silent loopback ports with a small
`--connect-timeout`, and must end within it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from tests.errors import REPO, TINY, cli, cli_process, refused, write

PIPELINE = REPO / "pipeline.yaml"
TIMEOUT = 5  # --connect-timeout of the hang cases
SLACK = 40  # seconds a fresh interpreter may take to import torch, Ray and MLflow on a loaded machine


@pytest.fixture
def tiny(tmp_path):
    return write(tmp_path / "tiny.yaml", TINY)


@pytest.fixture
def silent_port():
    """A loopback port that accepts connections (the kernel's backlog) and never says a word."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock.getsockname()[1]
    sock.close()


def _closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    return port


def test_overrides_are_accepted_after_the_flags(tiny, tmp_path, capsys):
    runs = tmp_path / "runs"
    r = cli(capsys, "run", tiny, "--runs-dir", runs, "pretrain.steps=0", "--only", "shard", "seed=-5")
    refused(r, "pretrain.steps", "seed", runs_dir=runs)  # both parsed as overrides, both named
    assert "unrecognized arguments" not in r.err
    ok = cli(capsys, "validate", tiny, "--offline", "seed=3", "--debug", "pretrain.lr=0.01")
    assert ok.rc == 0, ok.err


def test_unknown_flag_is_still_refused(tiny, capsys):
    r = cli(capsys, "run", tiny, "--runs-dri", "x")
    assert r.rc == 2 and "unrecognized arguments: --runs-dri x" in r.err and "Traceback" not in r.err


def test_evaluate_zero_samples_names_both_flags(tmp_path, capsys):
    out = tmp_path / "out"
    r = cli(capsys, "evaluate", tmp_path / "ckpt", "--n-und", "0", "--n-gen", "0", "--out-dir", out)
    refused(r, "--n-und", "--n-gen", "(got 0)", command="evaluate")
    assert not out.exists()  # nothing written, not even the folder


@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--steps", "5000"), ("--cfg-scale", "0.5"),
                                         ("--seed", "-1")])
def test_evaluate_flag_bounds(tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    refused(cli(capsys, "evaluate", tmp_path / "ckpt", flag, value, "--out-dir", out), flag, f"(got {value}")
    assert not (out / "metrics.json").exists()


def test_out_dir_that_is_a_file(tmp_path, capsys):
    taken = write(tmp_path / "taken", "x")
    refused(cli(capsys, "evaluate", tmp_path / "ckpt", "--out-dir", taken), "--out-dir", str(taken), "is a file")
    assert taken.read_text() == "x"


def test_runs_dir_that_is_a_file(tiny, tmp_path, capsys):
    taken = write(tmp_path / "runs", "x")
    refused(cli(capsys, "run", tiny, "--runs-dir", taken), "--runs-dir", str(taken), "is a file", command="run")
    refused(cli(capsys, "run", tiny, "--runs-dir", taken / "sub"), "--runs-dir", "cannot be created")


def _read_only_dir(tmp_path):
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return ro
    for candidate in ("/sys", "/proc"):  # root ignores modes; these refuse even root a new file
        try:
            open(os.path.join(candidate, ".unislim-probe"), "w").close()
        except OSError:
            return candidate
    pytest.skip("no folder here refuses writes to this user")


def test_runs_dir_that_is_read_only(tiny, tmp_path, capsys):
    ro = _read_only_dir(tmp_path)
    refused(cli(capsys, "run", tiny, "--runs-dir", ro), "--runs-dir", str(ro), "not writable")


@pytest.mark.parametrize("uri, problem", [
    ("garbage", "has no URI scheme"), ("foo://127.0.0.1:5000", "unknown scheme 'foo'"), ("http://", "names no host"),
    ("http://127.0.0.1:port", "cannot be parsed"), ("sqlite:///no/such/folder/mlflow.db", "does not exist")])
def test_tracking_uri_garbage_or_unknown_scheme(tiny, tmp_path, capsys, uri, problem):
    runs = tmp_path / "runs"
    r = cli(capsys, "run", tiny, "--runs-dir", runs, "--tracking-uri", uri)
    refused(r, "--tracking-uri", uri, problem, runs_dir=runs)
    assert not (runs / "mlflow.db").exists() and not list(runs.iterdir())


def test_tracking_uri_from_the_environment_is_named_as_such(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nonsense")
    refused(cli(capsys, "run", tiny, "--runs-dir", tmp_path / "runs"), "MLFLOW_TRACKING_URI", "nonsense")


def test_mlflow_server_not_listening_fails_at_once(tiny, tmp_path):
    uri = "http://127.0.0.1:9"
    runs = tmp_path / "runs"
    r = cli_process("run", tiny, "--runs-dir", runs, "--tracking-uri", uri, "--connect-timeout", TIMEOUT,
                    timeout=TIMEOUT + SLACK)
    refused(r, uri, "cannot reach an MLflow server", "Connection refused", runs_dir=runs, command="run")


def test_mlflow_server_that_never_answers_times_out(tiny, tmp_path, silent_port):
    uri = f"http://127.0.0.1:{silent_port}"
    runs = tmp_path / "runs"
    r = cli_process("run", tiny, "--runs-dir", runs, "--tracking-uri", uri, "--connect-timeout", 2, timeout=2 + SLACK)
    refused(r, uri, "did not answer within 2 s", runs_dir=runs)


def test_ray_address_with_no_cluster_fails_at_once(tiny, tmp_path):
    runs = tmp_path / "runs"
    r = cli_process("run", tiny, "--runs-dir", runs, "--address", "127.0.0.1:1", "--connect-timeout", TIMEOUT,
                    timeout=TIMEOUT + SLACK)
    refused(r, "--address 127.0.0.1:1", "connection refused", runs_dir=runs, command="run")
    assert not (runs / "mlflow.db").exists()  # refused before a run was opened


def test_ray_address_that_never_answers_times_out(tiny, tmp_path, silent_port):
    runs = tmp_path / "runs"
    address = f"127.0.0.1:{silent_port}"
    r = cli_process("run", tiny, "--runs-dir", runs, "--connect-timeout", 2, timeout=2 + SLACK,
                    env={"RAY_ADDRESS": address})
    refused(r, f"RAY_ADDRESS {address}", "no Ray cluster answered within 2 s", runs_dir=runs)


def test_ray_address_of_another_kind_of_server(tiny, tmp_path):
    """A server that answers, but not with gRPC (here: HTTP/1, as the dashboard on :8265 would)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)

    def answer():
        conn, _ = server.accept()
        conn.recv(64)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    runs = tmp_path / "runs"
    r = cli_process("run", tiny, "--runs-dir", runs, "--address", address, "--connect-timeout", TIMEOUT,
                    timeout=TIMEOUT + SLACK)
    server.close()
    refused(r, address, "not as a Ray cluster", "HTTP/1.1", runs_dir=runs)


_FORMS_SCRIPT = """
import json, sys
from unislim.errors import ClusterError
from unislim.pipelines.runner import _connect_ray
out = []
for address in sys.argv[1:]:
    try:
        _connect_ray(address, timeout_s=%s)
        out.append([address, 0, "connected"])
    except ClusterError as e:
        out.append([address, e.exit_code, str(e)])
print(json.dumps(out))
"""


def test_ray_address_forms():
    """Each form refused before `ray.init`, in one fresh interpreter (none of them may join anything)."""
    forms = {f"http://127.0.0.1:{_closed_port()}": "is a dashboard / job server address",
             "127.0.0.1": "expected HOST:PORT", "127.0.0.1:70000": "expected HOST:PORT", "nonsense": "expected HOST:PORT",
             f"ray://127.0.0.1:{_closed_port()}": "connection refused"}
    proc = subprocess.run([sys.executable, "-c", _FORMS_SCRIPT % TIMEOUT, *forms], capture_output=True, text=True,
                          check=False, timeout=TIMEOUT + SLACK, cwd=REPO)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    for address, code, message in json.loads(proc.stdout.strip().splitlines()[-1]):
        assert code == 2 and message.startswith(f"--address {address}: ") and forms[address] in message, message
        assert "\n" not in message


@pytest.mark.parametrize("value", ["0", "-1", "1e9", "nan"])
def test_connect_timeout_bounds(tiny, tmp_path, capsys, value):
    refused(cli(capsys, "run", tiny, "--runs-dir", tmp_path / "runs", "--connect-timeout", value),
            "--connect-timeout", "must be seconds in (0, 3600]")


def test_unknown_only_and_force_stages(tiny, tmp_path, capsys):
    runs = tmp_path / "runs"
    refused(cli(capsys, "run", tiny, "--runs-dir", runs, "--only", "nosuch"), "--only", "nosuch", runs_dir=runs)
    refused(cli(capsys, "run", tiny, "--runs-dir", runs, "--force", "nosuch"), "--force", "nosuch", runs_dir=runs)


def test_traceback_only_with_debug(tmp_path):
    empty = write(tmp_path / "empty.yaml", "")
    plain = cli_process("validate", empty, timeout=60)
    refused(plain, str(empty), "has no settings")
    debug = cli_process("validate", empty, "--debug", timeout=60)
    assert debug.rc == 2 and "Traceback (most recent call last)" in debug.err and "ConfigError" in debug.err
    assert debug.err.rstrip().splitlines()[-1] == plain.err.strip()  # the same line, last
    env = cli_process("validate", empty, timeout=60, env={"UNISLIM_DEBUG": "1"})
    assert env.rc == 2 and "Traceback" in env.err


def test_ui_port_and_runs_dir(tmp_path, capsys):
    refused(cli(capsys, "ui", "--port", "0", "--runs-dir", tmp_path / "runs"), "--port", "(got 0)", command="ui")
    taken = write(tmp_path / "file", "x")
    refused(cli(capsys, "ui", "--runs-dir", taken), "--runs-dir", "is a file")


def test_help_lists_the_new_flags(capsys):
    for command, flags in (("run", ("--connect-timeout", "UNISLIM_CONNECT_TIMEOUT", "--offline", "--debug")),
                           ("validate", ("--offline", "--debug"))):
        r = cli(capsys, command, "--help")
        assert r.rc == 0 and all(f in r.out for f in flags), r.out


def test_a_server_that_answers_passes_the_mlflow_check():
    """The check is bounded, not strict: any HTTP answer (even 401 from an auth proxy) is a server."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from unislim.pipelines.tracking import check_server

    class Unauthorized(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_server(f"http://127.0.0.1:{server.server_address[1]}", 2)
    finally:
        server.shutdown()


@pytest.mark.slow
def test_a_live_cluster_still_joins_after_the_probe(ray_cluster, tiny, tmp_path):
    port = ray_cluster.rsplit(":", 1)[1]  # the GCS listens on every interface: reach it on loopback
    runs = tmp_path / "runs"
    r = cli_process("run", tiny, "--only", "shard", "--runs-dir", runs, "--address", f"127.0.0.1:{port}",
                    "--connect-timeout", TIMEOUT, timeout=300)
    assert r.rc == 0, r.out[-2000:] + r.err[-2000:]
    assert "pipeline ok" in r.out
