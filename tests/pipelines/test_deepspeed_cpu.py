"""DeepSpeed on CPU never JIT-builds its shared-memory all-reduce op: that build sits behind a lock
file in ~/.cache/torch_extensions, and a build killed half-way (a SIGKILLed driver) left the lock for
every later engine start to wait on forever. `deepspeed_engine` replaces the builder; this checks
that the replacement is the one DeepSpeed calls (an `import deepspeed.comm.torch as …` bound the
torch module instead, and the op was built anyway)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from tests.test_cluster import _free_ports

_ENGINE = """
import os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
os.environ.pop("DS_ACCELERATOR", None)
import torch, torch.distributed as dist
dist.init_process_group("gloo")
import deepspeed
from unislim.pipelines.training import deepspeed_engine
model = torch.nn.Linear(4, 4)
engine = deepspeed_engine(model, torch.optim.AdamW(model.parameters()), micro_batch_size=1)
loss = engine(torch.ones(1, 4)).sum()
engine.backward(loss)
engine.step()
print("shm_comm_op", deepspeed.comm.comm.cdb.shm_comm_op)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed's CPU backend only")
def test_the_cpu_engine_never_builds_the_shared_memory_op():
    (port,) = _free_ports(1)
    r = subprocess.run([sys.executable, "-c", _ENGINE, str(port)], capture_output=True, text=True, cwd=REPO,
                       timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "shm_comm_op None" in r.stdout, out[-3000:]
    assert "deepspeed_shm_comm" not in out, out[-3000:]  # "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"
