"""A torchrun worker for test_restart: rank 1 SIGKILLs itself once (restart round 0); all ranks finish."""

import os
import signal

import torch
import torch.distributed as dist

from lcl_fast.training import distributed as D

env = D.setup("cpu", timeout_s=20)
t = torch.ones(4)
for i in range(6):
    if i == 3 and env.rank == 1 and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        os.kill(os.getpid(), signal.SIGKILL)
    dist.all_reduce(t)
print(f"done rank {env.rank} restart {os.environ['TORCHELASTIC_RESTART_COUNT']}", flush=True)
D.cleanup(drain=True)
