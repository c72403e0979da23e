"""Where stages run: joining the Ray cluster, the guards that keep a local MLflow store on one node,
and the line a Ray Train stage prints while it queues for CPUs.

A local tracking store (`sqlite:` / `file:`) and a runs dir on one machine's disk only work while
every stage runs on the driver's node. The driver refuses them when the cluster has more than one
node or can add nodes (an autoscaler: `cluster/cluster.yaml` starts with the head alone); and since
a node can still join by hand mid-run, every stage checks again where it runs (`check_stage_node`),
as does rank 0 of a Ray Train stage before it logs (`StageContext.log_metrics`).

Quiet queuing: Ray Train V2 waits `RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S` (60 s) for its workers'
CPUs, then logs a `WorkerGroupStartupTimeoutError` traceback and retries, for as long as other
stages hold the CPUs; a run on a busy cluster reads like a crash. A stage task sets that timeout to
`QUEUE_TIMEOUT_S` and registers `QueueNotice` (`RAY_TRAIN_CALLBACKS`), which prints one line
("waiting for 1 CPU …") after `NOTICE_AFTER_S` and one when the workers start, and refuses at once a
request the cluster can never hold. A group whose placement group is already placed but whose
processes are still starting gets "starting N Ray Train worker(s) …" instead: not a queue.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import ray

from unislim.errors import ClusterError

from . import tracking

QUEUE_TIMEOUT_S = 24 * 3600.0  # how long a Ray Train stage waits for its workers' resources
NOTICE_AFTER_S = 5.0  # queued this long: say so


def connect_ray(address: str | None, timeout_s: float | None = None) -> bool:
    """Join the given cluster (or RAY_ADDRESS), or start a local one; True if we started it.

    `ray.init` gives an address with nothing behind it about 40 s per attempt, and retries, so
    a given address is probed first, bounded by `timeout_s` (default: UNISLIM_CONNECT_TIMEOUT,
    else 30 s): a TCP connect, then the HTTP/2 greeting every gRPC server (the GCS, the Ray
    Client server) answers at once. A closed port, a silent one or a server of another kind
    (the dashboard) is a `ClusterError` naming the address.
    """
    from ray._private import services

    if ray.is_initialized():
        return False
    if timeout_s is None:
        timeout_s = float(os.environ.get("UNISLIM_CONNECT_TIMEOUT") or 30)
    env = os.environ.get("RAY_ADDRESS") or None
    given = env if env and address in (None, "auto") else address
    where = f"RAY_ADDRESS {given}" if given == env and env else f"--address {given}"
    if given is not None and given.lower().startswith(("http://", "https://")):
        raise ClusterError(where, "is a dashboard / job server address; `unislim run` joins a cluster by its GCS "
                           "address (HOST:6379) or ray://HOST:10001. To use the job server, submit the run: "
                           "`ray job submit --address ... -- unislim run ...` (see cluster/README.md)")
    target = given
    if given == "auto":  # the cluster `ray start` recorded on this machine, as ray.init finds it
        try:
            target = services.canonicalize_bootstrap_address(given)
        except ConnectionError as e:
            raise ClusterError(where, f"no Ray cluster found ({' '.join(str(e).split())[:200]})") from None
    if target is not None and target != "local":
        host, sep, port = target.rpartition("://")[2].rpartition(":")
        if not host or not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ClusterError(where, "expected HOST:PORT (e.g. 127.0.0.1:6379), ray://HOST:PORT, auto or local")
        deadline = time.monotonic() + timeout_s
        greeting = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")  # + empty SETTINGS
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as sock:
                if os.environ.get("RAY_USE_TLS", "0").lower() in ("0", "false", ""):
                    sock.settimeout(max(0.1, deadline - time.monotonic()))
                    sock.sendall(greeting)
                    answer = sock.recv(9)  # a frame header: length (3), type (1) = 0x04 SETTINGS, ...
                    if len(answer) < 4 or answer[3] != 0x04:
                        raise ClusterError(where, f"answered, but not as a Ray cluster (gRPC): got {answer[:12]!r}; "
                                           "the GCS listens on HOST:6379 by default, the dashboard on :8265")
        except TimeoutError:
            raise ClusterError(where, f"no Ray cluster answered within {timeout_s:g} s (--connect-timeout)") from None
        except ConnectionRefusedError:
            raise ClusterError(where, "connection refused: no Ray cluster listens there (start one with "
                               "`ray start --head`, or leave --address out to start a local one)") from None
        except OSError as e:
            raise ClusterError(where, f"cannot connect ({e.strerror or e})") from None
    try:
        ray.init(address=address, log_to_driver=True)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
        if target is None or target == "local":
            raise  # starting a local cluster failed: not a problem of an address
        token = " (with token auth: is RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH the cluster's token?)" \
            if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" else ""
        raise ClusterError(where, f"cannot join the Ray cluster: {type(e).__name__}: "
                           f"{' '.join(str(e).split())[:300]}{token}") from e
    return True


def can_autoscale() -> bool:
    """Whether an autoscaler may add nodes to the cluster.

    Every head runs Ray's monitor, which publishes its status in the GCS key-value store; without an
    autoscaling config (`ray start` by hand, `ray.init()`) it uses the read-only provider, whose
    node types are the nodes' own ids (`node_<id>`). Node types of a `ray up` / KubeRay config
    (`ray.head.default`, `ray.worker.gpu`) mean an autoscaler that may launch more. The v2
    autoscaler reports a cluster config with node groups instead."""
    import json
    import re

    try:
        from ray._private.state import state
        from ray.experimental import internal_kv

        raw = internal_kv._internal_kv_get("__autoscaling_status", namespace=None)
        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - no autoscaler API here: assume a fixed cluster
        return False
    if config is not None and any(g.max_count == -1 or g.max_count > g.min_count for g in config.node_group_configs):
        return True
    try:
        report = json.loads(raw)["autoscaler_report"] if raw else {}
    except (ValueError, KeyError, TypeError):
        return False
    types = set(report.get("active_nodes") or {}) | set(report.get("idle_nodes") or {}) | \
        set((report.get("node_type_mapping") or {}).values())
    readonly = re.compile(r"node_[0-9a-f]{40,}")
    return bool(report.get("pending_launches") or report.get("pending_nodes")
                or any(not readonly.fullmatch(t) for t in types))


def _local_store_problem(uri: str, nodes: int) -> ClusterError:
    what = f"has {nodes} nodes" if nodes > 1 else "can add nodes (it has an autoscaler)"
    return ClusterError(f"MLflow tracking store {uri}", f"is local, but the Ray cluster {what}: stages on other nodes "
                        "cannot write to it. Start an MLflow server and pass --tracking-uri http://HOST:5000 (or set "
                        "MLFLOW_TRACKING_URI), with --runs-dir on storage every node mounts (NFS, or an S3 mount); see "
                        "cluster/README.md")


def check_cluster(uri: str, runs_dir: Path) -> None:
    """At start (driver): a local store needs a one-node cluster that stays one node."""
    if not tracking.is_local_store(uri):
        return
    nodes = len([n for n in ray.nodes() if n.get("Alive")])
    grows = can_autoscale()
    if nodes > 1 or grows:
        raise _local_store_problem(uri, nodes)


def check_stage_node(uri: str, runs_dir: Path, home_node: str, driver_lock: str) -> None:
    """At the start of every stage (in its task): the driver's checks still hold here and now.

    With a local store the stage must run on the driver's node of a one-node cluster (a node may
    have joined since the start). With any store, the runs dir must be the driver's: its lock file
    must be visible here, else this node has a folder of its own at that path, not shared storage."""
    if driver_lock and not (Path(runs_dir) / driver_lock).exists():
        raise ClusterError(f"--runs-dir {runs_dir}", f"is not shared storage: node {node_name()} does not see the "
                           "driver's files there. Every node must mount the runs dir at the same path (see "
                           "cluster/README.md)")
    if not tracking.is_local_store(uri) or not home_node:
        return
    here = ray.get_runtime_context().get_node_id()
    nodes = len([n for n in ray.nodes() if n.get("Alive")])
    if here != home_node or nodes > 1:
        e = _local_store_problem(uri, max(nodes, 2))
        raise ClusterError(e.where, f"{e.problem} (a node joined after the run started; this stage was placed on "
                           f"{node_name()})")


def check_fits(stage: str, section: Any) -> None:
    """Before a stage computes: the workers its section asks for (`num_workers` × `cpus_per_worker`,
    a GPU each with `use_gpu`: Ray Train workers, score actors) fit in the cluster at all.

    Ray would otherwise queue the request forever on a cluster that cannot grow. Only totals are
    checked: resources other stages hold now come back, and the stage waits for them."""
    workers, cpus = getattr(section, "num_workers", None), getattr(section, "cpus_per_worker", None)
    if not isinstance(workers, int) or not isinstance(cpus, (int, float)):
        return
    need = {"CPU": workers * cpus, **({"GPU": float(workers)} if getattr(section, "use_gpu", False) else {})}
    total = ray.cluster_resources()
    short = {k: v for k, v in need.items() if v > total.get(k, 0)}
    if short and not can_autoscale():
        what = " and ".join(f"{v:g} {k}" for k, v in short.items())
        has = " and ".join(f"{total.get(k, 0):g} {k}" for k in short)
        raise ClusterError(f"{stage}.num_workers / {stage}.cpus_per_worker" + (f" / {stage}.use_gpu" if "GPU" in short
                                                                                else ""),
                           f"{workers} worker(s) need {what} at once, but the Ray cluster has {has} in all and "
                           "no autoscaler: lower them, or join a larger cluster")


def node_name() -> str:
    """This host and its Ray node, for messages and the `unislim.node` tag."""
    try:
        ctx = ray.get_runtime_context()
        return f"{socket.gethostname()} (Ray node {ctx.get_node_id()[:8]})"
    except Exception:  # noqa: BLE001
        return socket.gethostname()


# ---------------------------------------------------------------------------------------------
# Quiet queuing (Ray Train V2 internals, used only if they are there)


def quiet_queuing(stage: str) -> None:
    """In a stage task, before it builds a trainer: no startup timeout tracebacks, one notice line."""
    if QueueNotice is None:
        return
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(QUEUE_TIMEOUT_S))
    os.environ["UNISLIM_STAGE"] = stage
    path = f"{QueueNotice.__module__}.{QueueNotice.__qualname__}"
    callbacks = [c for c in os.environ.get("RAY_TRAIN_CALLBACKS", "").split(",") if c.strip()]
    if path not in callbacks:
        os.environ["RAY_TRAIN_CALLBACKS"] = ",".join([*callbacks, path])


def _amounts(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items()))


try:
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback
except ImportError:  # another Ray: its own logging stays as it is
    QueueNotice = None
else:
    from contextlib import contextmanager

    class QueueNotice(WorkerGroupCallback):
        """Says once that a Ray Train worker group waits for resources, and when it got them.

        Built in the stage task (it reads the stage's name there), run in the Train controller."""

        def __init__(self):
            self.stage = os.environ.get("UNISLIM_STAGE", "train")
            self._timer: threading.Timer | None = None
            self._waiting_since: float | None = None

        def before_worker_group_start(self, worker_group_context) -> None:
            n = worker_group_context.num_workers
            need = {k: v * n for k, v in worker_group_context.resources_per_worker.items() if v}
            total = ray.cluster_resources()
            short = {k: v for k, v in need.items() if v > total.get(k, 0)}
            if short and not can_autoscale():
                raise ClusterError(f"{self.stage}", f"Ray Train needs {_amounts(need)} for {n} worker(s), but the "
                                   f"cluster has {_amounts({k: total.get(k, 0) for k in short})} in all and no "
                                   f"autoscaler: lower {self.stage}.num_workers or cpus_per_worker (or use_gpu)")
            self._waiting_since = None
            self._timer = threading.Timer(NOTICE_AFTER_S, self._notice, args=(need, n, time.monotonic()))
            self._timer.daemon = True
            self._timer.start()

        def _notice(self, need: dict[str, float], n: int, t0: float) -> None:
            if not _placement_pending():
                # placed: the resources are held, by this group among others, and its processes are
                # still starting (importing torch on a small machine takes seconds): not a queue
                _say(f"[{self.stage}] starting {n} Ray Train worker(s) ({_amounts(need)} reserved) …")
                return
            free, total = ray.available_resources(), ray.cluster_resources()
            now = ", ".join(f"{free.get(k, 0):g} of {total.get(k, 0):g} {k}" for k in need)
            self._waiting_since = t0
            _say(f"[{self.stage}] waiting for {_amounts(need)} for {n} Ray Train worker(s) (free now: {now}) …")

        @contextmanager
        def on_worker_group_start(self):
            try:
                yield
            finally:
                if self._timer is not None:
                    self._timer.cancel()
                if self._waiting_since is not None:
                    _say(f"[{self.stage}] workers placed after waiting {time.monotonic() - self._waiting_since:.0f}s")
                    self._waiting_since = None


def _placement_pending() -> bool:
    """Whether any placement group on the cluster still waits for its resources (Ray Train reserves
    its workers' resources as one)."""
    try:
        return any(pg.get("state") in ("PENDING", "RESCHEDULING") for pg in ray.util.placement_group_table().values())
    except Exception:  # noqa: BLE001 - the state API unreachable: assume queued, the old message
        return True


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")  # not print: Ray Train tees print() into its logger
    sys.stdout.flush()
