"""torch.distributed ranks: who am I, how many are we, and one-time initialisation.

Ranks come from the launcher's environment: ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (torchrun, the
deepspeed launcher, tests) or, under Slurm with one task per GPU, ``SLURM_PROCID``/``SLURM_NTASKS``/
``SLURM_LOCALID`` (no launcher inside a launcher). Stages use this module for I/O and logging only.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host() -> str | None:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True,
                             text=True, timeout=20, check=True).stdout.split()
        return out[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return nodes.split(",")[0].split("[")[0]


def rank_info() -> RankInfo:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return RankInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "OMPI_COMM_WORLD_RANK" in env:  # mpiexec/mpirun of Open MPI
        return RankInfo(int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                        int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_JOB_ID" in env:
        return RankInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                        int(env.get("SLURM_LOCALID", 0)))
    return RankInfo(0, 1, 0)


def export_rendezvous(info: RankInfo) -> None:
    """Set the variables torch.distributed's env:// rendezvous reads, from Slurm if needed."""
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("WORLD_SIZE", str(info.world_size))
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    if "OMPI_COMM_WORLD_SIZE" in os.environ and "SLURM_JOB_ID" not in os.environ:
        # under mpiexec: rank 0 picks the address and port, MPI tells the others
        from mpi4py import MPI

        mine = (socket.gethostname(), _free_port()) if info.rank == 0 else None
        host, port = MPI.COMM_WORLD.bcast(mine, root=0)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1" if host == socket.gethostname() else host)
        os.environ.setdefault("MASTER_PORT", str(port))
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _first_slurm_host() or "127.0.0.1"
    if "MASTER_PORT" not in os.environ:
        job = int(os.environ.get("SLURM_JOB_ID", "0") or 0)
        os.environ["MASTER_PORT"] = str(20000 + job % 20000) if job else str(_free_port())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pick_device(preference: str, info: RankInfo) -> str:
    import torch

    if preference == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
        return f"cuda:{info.local_rank % torch.cuda.device_count()}"
    if preference == "cuda":
        from replandscape.errors import UserError

        raise UserError("no CUDA device visible", key="extract.device", fix="use device: auto or cpu")
    return "cpu"


def init_distributed(device: str) -> RankInfo:
    """Initialise the process group once (gloo on CPU, nccl on GPU) through DeepSpeed."""
    info = rank_info()
    if info.world_size == 1 and "RANK" not in os.environ:
        return info
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return info
    export_rendezvous(info)
    import deepspeed

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "gloo":
        skip_cpu_shm_op()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return info


def skip_cpu_shm_op() -> None:
    """Keep DeepSpeed from compiling its CPU shared-memory all-reduce op (75-90 s on first use):
    gloo does the job on CPU ranks. ``deepspeed.ops.__compatible_ops__`` is read only by op
    builders; setting it before first use also skips probing every op with a compiler."""
    import deepspeed.ops

    ops = deepspeed.ops.__dict__
    if "__compatible_ops__" not in ops:
        ops["__compatible_ops__"] = {"deepspeed_shm_comm": False}
    else:
        ops["__compatible_ops__"]["deepspeed_shm_comm"] = False


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_distributed():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def print0(*args: Any, **kwargs: Any) -> None:
    if rank_info().is_main:
        stream = kwargs.pop("file", sys.stderr)
        print(*args, file=stream, flush=True, **kwargs)


def zero3_bounded_memory(hidden_size: int | None) -> dict[str, Any]:
    """ZeRO-3 settings that keep each rank to its share of the weights plus the layer in use and
    a bounded prefetch, for inference and training alike.

    DeepSpeed keeps a gathered weight alive when its next use is nearer than
    ``stage3_max_reuse_distance`` elements (default 1e9) and up to ``stage3_max_live_parameters``
    (1e9) of them: in training the backward pass reuses every weight of the forward, so with the
    defaults any model under a billion parameters per rank stayed whole on every rank (measured:
    2.9 GB per rank of anonymous memory for LoRA on a 760 MB model over 2 ranks). Releasing each
    weight after use costs one more gather per weight in the backward pass, which ZeRO-3 is
    designed around. Prefetching is bounded by the model's width (0.9 x hidden^2 elements, about
    one attention projection, DeepSpeed's suggestion for transformers).
    """
    zero: dict[str, Any] = {"stage": 3, "stage3_max_reuse_distance": 0}
    if hidden_size:
        bucket = int(0.9 * hidden_size * hidden_size)
        zero["stage3_prefetch_bucket_size"] = bucket
        zero["stage3_max_live_parameters"] = 4 * bucket
    return zero


def model_hidden_size(path: str, revision: str | None = None) -> int | None:
    """The width of a saved model, from its config alone (None when it names none)."""
    from transformers import AutoConfig

    size = getattr(AutoConfig.from_pretrained(path, revision=revision), "hidden_size", None)
    return int(size) if isinstance(size, int) else None
