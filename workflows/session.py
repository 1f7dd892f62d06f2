"""Where a loop runs: rank, world size, device, checkpoint restore and report (Ray Train's session or a plain
folder's), and the collective helpers a loop needs."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from nomicbert.attention import host_to_device
from nomicbert.model import NomicBertBlock
from workflows.checkpoints import atomic_folder
from workflows.settings import RunSettings


class Session:
    """Rank, world size, device, checkpoint restore and report; Ray Train's (`from_ray`) or a folder's (`local`)."""

    def __init__(self, rank: int, world_size: int, device: torch.device, checkpoint_root: Path | None):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.checkpoint_root = checkpoint_root  # local mode only
        self.staging: Path | None = None  # where rank 0 writes a checkpoint before Ray takes it

    @classmethod
    def from_ray(cls, run: RunSettings) -> Session:
        import ray.train
        import ray.train.torch

        from ops.console import quiet_worker

        quiet_worker()  # the worker's console: warnings and progress lines; the rest to Ray Train's logs
        if run.threads:  # Ray gives a worker one thread per reserved CPU; a CPU trainer beside 1-CPU data tasks
            torch.set_num_threads(run.threads)  # reserves 1 and computes on every core
        ctx = ray.train.get_context()
        session = cls(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(), None)
        if "://" not in run.storage_path:  # stage checkpoints beside the run, not in /tmp (num_workers=0 keeps them)
            session.staging = Path(run.storage_path) / run.name / "staging"
        return session

    @classmethod
    def local(cls, checkpoint_root: str | os.PathLike, device: str | torch.device | None = None) -> Session:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(0, 1, device, Path(checkpoint_root))

    @property
    def is_ray(self) -> bool:
        return self.checkpoint_root is None

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor on this worker's device, without making the host wait for the copy."""
        return host_to_device(tensor, self.device)

    def prepare(self, net: nn.Module, strategy: str = "ddp") -> nn.Module:
        """Move to the device; with several workers wrap in DDP, or shard with FSDP2 (each transformer block
        one unit, the rest -- embeddings, heads -- in the root unit, so tied weights stay together).
        ``net``'s ``forward`` must run the whole model: FSDP gathers parameters in forward hooks."""
        if not self.is_ray:
            return net.to(self.device)
        import ray.train.torch

        if strategy != "fsdp" or self.world_size == 1:
            return ray.train.torch.prepare_model(net)
        from torch.distributed.fsdp import fully_shard

        net.to(self.device)
        for module in net.modules():
            if isinstance(module, NomicBertBlock):
                fully_shard(module)
        return fully_shard(net)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        if self.is_ray:
            import ray.train

            checkpoint = ray.train.get_checkpoint()
            if checkpoint is None:
                yield None
            else:
                with checkpoint.as_directory() as folder:
                    yield Path(folder)
        else:
            steps = sorted(self.checkpoint_root.glob("step-*")) if self.checkpoint_root.is_dir() else []
            yield steps[-1] if steps else None

    def report(self, metrics: dict[str, float], step: int, write: Callable[[Path], None]) -> None:
        """Checkpoint (rank 0 writes) and report; every rank calls this equally often (a barrier under Ray)."""
        if self.is_ray:
            import ray.train

            checkpoint = None
            if self.rank == 0:  # Ray uploads it to storage and deletes the local copy (kept in num_workers=0 mode)
                if self.staging is not None:
                    self.staging.mkdir(parents=True, exist_ok=True)
                folder = atomic_folder(Path(tempfile.mkdtemp(prefix="ckpt-", dir=self.staging)) / "checkpoint", write)
                checkpoint = ray.train.Checkpoint.from_directory(str(folder))
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint-{step:08d}",
                             delete_local_checkpoint_after_upload=True)
        else:
            atomic_folder(self.checkpoint_root / f"step-{step:08d}", write)


def no_sync(net: nn.Module) -> Callable[[], contextlib.AbstractContextManager] | None:
    """A context that skips the gradient all-reduce / reduce-scatter of a micro-batch (gradient accumulation),
    or None with a single worker."""
    if hasattr(net, "no_sync"):  # DDP
        return net.no_sync
    if not hasattr(net, "set_requires_gradient_sync"):
        return None

    @contextlib.contextmanager
    def fsdp_no_sync() -> Iterator[None]:  # FSDP2: gradients accumulate unsharded until the synced backward
        net.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            net.set_requires_gradient_sync(True)

    return fsdp_no_sync


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a device tensor over workers, on the device (identity with one worker); nothing is read back."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
