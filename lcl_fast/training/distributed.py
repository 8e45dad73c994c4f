"""Process groups as torchrun launches them (gloo on CPU, NCCL on GPU), DDP / FSDP2 wrapping, collectives.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and the rendezvous address); a plain
``python -m lcl_fast.train`` is a world of one and creates no process group.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: ``rank`` of ``world_size``, its ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(request: str, local_rank: int, local_world_size: int = 1) -> torch.device:
    """This rank's device: ``cuda:<local_rank>``, one GPU per rank (never shared), or the CPU."""
    if request == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible to this process")
    if request == "cuda" or (request == "auto" and torch.cuda.is_available()):
        visible = torch.cuda.device_count()
        if max(local_world_size, local_rank + 1) > visible:
            raise ConfigError(
                f"{max(local_world_size, local_rank + 1)} ranks on this node but {visible} visible CUDA "
                f"device(s): start at most {visible} per node (torchrun --nproc_per_node) or use --device cpu"
            )
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


DEFAULT_TIMEOUT_S = 300.0  # collectives and group set-up; a dead peer's closed socket is seen at once


def restart_store(rank: int, world_size: int, timeout: datetime.timedelta):
    """The rendezvous store, its keys under a prefix of this torchrun restart round (None: not torchrun).

    torchrun's agent keeps one TCPStore for the whole job (static and c10d rendezvous alike) and
    workers reach it at ``MASTER_ADDR:MASTER_PORT`` with no per-round prefix. Gloo's full-mesh
    set-up reads each peer's address from that store: after a restart it could read the address
    the killed round-0 peer left there and retry it until the timeout (``connectFullMesh failed …
    Connection refused``). Keys under ``lcl_fast/restart_<TORCHELASTIC_RESTART_COUNT>/`` are new
    in every round.
    """
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ or "MASTER_ADDR" not in os.environ:
        return None
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
    return dist.PrefixStore(f"lcl_fast/restart_{os.environ['TORCHELASTIC_RESTART_COUNT']}/", store)


def setup(device_request: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Join the process group torchrun describes (if any) and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    device = pick_device(device_request, local_rank, local_world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict = {"device_id": device} if device.type == "cuda" else {}
        timeout = datetime.timedelta(seconds=timeout_s)
        store = restart_store(rank, world_size, timeout)
        if store is not None:
            kwargs.update(store=store, rank=rank, world_size=world_size)
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def cleanup(*, drain: bool = False) -> None:
    """Destroy the process group (a no-op without one).

    ``drain`` (a run every rank finished normally): a barrier first. Gloo's worker threads drop a
    finished collective's tensors after the caller has moved on, and that needs the GIL; when the
    last reference to the process group goes at exit, its destructor joins those threads while
    holding the GIL, and a thread still dropping an all-gather's tensors never returns (seen as a
    hang at exit after the run's last all_gather_object). While waiting at the barrier the caller
    releases the GIL, so those threads finish; the barrier's own work holds no Python tensors.
    """
    if dist.is_available() and dist.is_initialized():
        if drain:
            dist.barrier()
        dist.destroy_process_group()


def residual_blocks(lcl: nn.Module) -> list[nn.Module]:
    """The residual blocks of both towers (what FSDP2 shards one by one, and what compile takes under it)."""
    return [block for tower in (lcl.visual, lcl.text) for block in tower.transformer.resblocks]


def scalar_params(model: nn.Module) -> list[nn.Parameter]:
    """0-dim parameters (``logit_scale``): FSDP2 cannot shard them, so they stay replicated."""
    return [p for p in model.parameters() if p.ndim == 0]


def fsdp_mixed_precision(precision: str) -> Any:
    """FSDP2's ``MixedPrecisionPolicy`` for ``--precision`` (None under fp32: no policy).

    amp_bf16 (amp: fp16): the all-gathered (unsharded) parameters in bf16 (fp16), half the fp32
    traffic of the forward's and the backward's all-gathers; gradients reduce-scattered in fp32,
    torchtitan's default, so that the sum over ranks keeps fp32's mantissa (bf16 would halve that
    traffic too, at 8 bits of mantissa). The sharded parameters and the optimizer stay fp32.
    """
    dtype = {"amp_bf16": torch.bfloat16, "amp": torch.float16}.get(precision)
    if dtype is None:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def wrap_model(model: nn.Module, env: DistEnv, *, fsdp: bool = False, precision: str = "fp32") -> nn.Module:
    """DDP across ranks, or FSDP2 (``fully_shard`` on every residual block, then on the whole model).

    Under FSDP2 the scalar parameters are left out of sharding; :func:`average_grads` syncs theirs;
    ``precision`` (resolved ``--precision``) picks the :func:`fsdp_mixed_precision` policy.
    """
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        policy = fsdp_mixed_precision(precision)
        options = {"mesh": mesh} if policy is None else {"mesh": mesh, "mp_policy": policy}
        for block in residual_blocks(model):
            fully_shard(block, **options)
        fully_shard(model, ignored_params=set(scalar_params(model)) or None, **options)
        return model
    if env.distributed:
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model


def average_grads(params: list[nn.Parameter], env: DistEnv) -> None:
    """Mean of the gradients of replicated (not FSDP-managed) parameters over ranks, in one all-reduce."""
    if not env.distributed or not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.stack([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= env.world_size
    for p, g in zip(params, flat):
        p.grad.copy_(g.view_as(p.grad))


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global L2 norm of the gradients (clipped to ``max_norm`` if finite), sharded (DTensor) or not.

    A float32 0-dim tensor on the gradients' device: nothing is read back to the host here."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    norms = []
    for group in (sharded, plain):
        if group:
            norm = torch.nn.utils.get_total_norm(group)
            norms.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).float())
    if not norms:
        return torch.zeros((), device=params[0].device if params else None)
    total = torch.linalg.vector_norm(torch.stack(norms))
    if max_norm != float("inf"):
        for group in (sharded, plain):
            if group:
                torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def unwrap(model: nn.Module) -> nn.Module:
    """The LCL module under DDP / torch.compile wrappers (FSDP2 modifies the module in place)."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def no_sync(model: nn.Module, last_micro_step: bool):
    """Skip the gradient all-reduce (DDP) / reduce-scatter (FSDP2) on all but the last micro-step."""
    inner = getattr(model, "_orig_mod", model)
    if hasattr(inner, "set_requires_gradient_sync"):  # FSDP2
        inner.set_requires_gradient_sync(last_micro_step)
        return nullcontext()
    if last_micro_step or not isinstance(inner, nn.parallel.DistributedDataParallel):
        return nullcontext()
    return inner.no_sync()


@contextmanager
def full_params(model: nn.Module) -> Iterator[nn.Module]:
    """The unwrapped model, parameters usable by ``encode_image``/``encode_text`` (FSDP2: root unsharded).

    Under FSDP2 every rank must enter this together: the blocks unshard themselves in their forward.
    """
    module = unwrap(model)
    unshard = getattr(module, "unshard", None)
    if unshard is None:
        yield module
        return
    # Encoders bypass the root's forward, which is where FSDP2 initialises itself; do it first (else
    # the first block to run would claim to be the root).
    state = getattr(module, "_get_fsdp_state", None)
    if state is not None:
        state()._lazy_init()
    unshard()
    try:
        yield module
    finally:
        module.reshard()


def agree_step(bad: torch.Tensor, stop: bool, counts: tuple[int, int], env: DistEnv) -> tuple[bool, bool, int, int]:
    """``(bad on any rank, stop on any rank, samples, tokens summed over ranks)`` of one step, in one read.

    ``bad`` is a 0-dim bool tensor on this rank's device (a non-finite loss or norm), ``stop`` and
    ``counts`` are host values. One small all-reduce (several ranks), then one device-to-host read:
    the step's only host sync on one rank. The host values travel to the device without waiting.
    """
    if not env.distributed:
        return bool(bad), stop, counts[0], counts[1]
    host = torch.tensor([int(stop), counts[0], counts[1]], dtype=torch.int64)
    t = torch.cat([bad.reshape(1).to(torch.int64), host.to(bad.device, non_blocking=True)])
    dist.all_reduce(t)
    n_bad, n_stop, samples, tokens = t.tolist()
    return n_bad > 0, n_stop > 0, samples, tokens


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()
