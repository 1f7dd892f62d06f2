"""What every training stage shares, kept flat: config sections, optimizer groups, LR schedule, the session
(rank, device, checkpoints, reporting; Ray Train's or a plain folder's), atomic checkpoints, MLflow, the NaN
guard, console progress, and the driver-side `fit` that wraps `TorchTrainer`.

A stage's loop is a plain function of (config, batch iterator, session): under Ray Train the session talks to
`ray.train`; without Ray (GPU benchmarks) `Session.local` keeps checkpoints in a folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from nomicbert.checkpoint import load_state_dict_strict, read_state_dict, save_pretrained
from nomicbert.model import NomicBertBlock

log = logging.getLogger("workflows.train")
STATE_DIR = "training_state"
STATE_FILE = "state.pt"
PROGRESS_FILE = "progress.json"


# ---------------------------------------------------------------------------------------------------------
# Config sections shared by the stage configs (every key required: a missing one is an error naming it)
# ---------------------------------------------------------------------------------------------------------
@dataclass
class OptimConfig:
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float  # on >= 2-D weights only
    warmup_steps: int  # give warmup_steps or warmup_ratio, not both
    warmup_ratio: float  # fraction of the total steps (MLM: 0.06)
    schedule: Literal["linear", "cosine"]  # decay to 0 after the warm-up
    max_grad_norm: float  # 0 = no clipping (the norm is still logged)

    def __post_init__(self) -> None:
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set optim.warmup_steps or optim.warmup_ratio, not both")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1) (got {self.warmup_ratio})")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0 (got {self.lr})")


@dataclass
class RunSettings:
    name: str  # Ray Train run name; re-running the same (storage_path, name) resumes it
    storage_path: str  # Ray Train storage: checkpoints and run state (a path, s3:// or gs://)
    num_workers: int  # 0 = run the loop in the driver process (tests)
    strategy: Literal["ddp", "fsdp"]  # fsdp: FSDP2, each worker holds 1/num_workers of weights, grads, optimizer
    use_gpu: bool
    cpus_per_worker: float
    precision: Literal["fp32", "bf16"]  # bf16 autocast needs a GPU
    checkpoint_every: int  # steps
    keep_checkpoints: int
    max_failures: int  # Ray Train restarts from the last checkpoint this many times
    log_every: int  # steps between console lines and MLflow metrics
    seed: int
    row_log: str | None  # folder for per-rank JSON lines of the row ids of every step (data audit)
    fault_step: int  # chaos test: rank 0 SIGKILLs itself at this step of the first attempt; 0 = off

    def __post_init__(self) -> None:
        if self.precision == "bf16" and not self.use_gpu:
            raise ValueError("run.precision=bf16 needs run.use_gpu=true (CPU training runs in fp32)")
        for key in ("checkpoint_every", "log_every", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ValueError(f"run.{key} must be >= 1")


@dataclass
class MlflowSettings:
    experiment: str
    parent_run_id: str | None  # nest under a pipeline run; None -> $MLFLOW_PARENT_RUN_ID if set
    artifact_location: str | None  # for a new experiment; None -> beside a sqlite store, else the server's


# ---------------------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on >= 2-D weights (linear layers and embeddings), none on biases and LayerNorms.
    Tied parameters appear once (``named_parameters`` de-duplicates them)."""
    decay = [p for _, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for _, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    log.info("optimizer: %d tensors with weight decay, %d without", len(decay), len(no_decay))
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_lambda(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up to the peak, then linear or cosine decay to 0 at ``total_steps``."""
    warmup = cfg.warmup_steps or round(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; no checkpoint is written for the step, the last good one stays."""


def check_finite(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"loss is {loss} at step {step}; stopping without writing a checkpoint (the last good one is kept). "
            "Lower optim.lr, check the data, or use fp32."
        )


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: model folder (our layout) + training_state/, written to a temp folder and renamed
# ---------------------------------------------------------------------------------------------------------
def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Unsharded weights and optimizer state (keyed by parameter name) on CPU, the same for DDP and FSDP, so
    a checkpoint resumes under either strategy. Collective under FSDP: every rank calls it; rank 0 gets it."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)  # fmt: skip

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def write_checkpoint(folder: Path, model: nn.Module, tokenizer, state: dict[str, Any]) -> None:
    """Model weights (``state["weights"]``, from `full_state`) and config, loadable by
    `nomicbert.checkpoint.load_model`, plus optimizer, scheduler, step, data position and RNG under
    ``training_state/``."""
    state = dict(state)
    save_pretrained(model, folder, tokenizer, weights=state.pop("weights"))
    (folder / STATE_DIR).mkdir(exist_ok=True)
    torch.save(state, folder / STATE_DIR / STATE_FILE)
    progress = {k: v for k, v in state.items() if isinstance(v, (int, float, str))}
    (folder / STATE_DIR / PROGRESS_FILE).write_text(json.dumps(progress, indent=2))


def atomic_folder(target: Path, write: Callable[[Path], None]) -> Path:
    """Write into a temp sibling, then rename: a crash mid-write leaves no folder under ``target``'s name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        if target.exists():  # replace: move the old one aside first (rename of a non-empty dir cannot overwrite)
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_training_state(folder: Path) -> dict[str, Any]:
    return torch.load(folder / STATE_DIR / STATE_FILE, map_location="cpu", weights_only=False)


def load_weights(folder: Path, model: nn.Module) -> dict[str, Any]:
    """A checkpoint's weights into the (not yet sharded) model; returns its training state for `restore`."""
    load_state_dict_strict(model, read_state_dict(folder))
    return read_training_state(folder)


def restore(state: dict[str, Any], model: nn.Module, optimizer, sched) -> tuple[int, int]:
    """Optimizer, scheduler and RNG from a training state, after `Session.prepare`; returns (step, batches
    consumed)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return state["step"], state["batches_consumed"]


# ---------------------------------------------------------------------------------------------------------
# Session: where a loop runs
# ---------------------------------------------------------------------------------------------------------
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


def maybe_inject_fault(run: RunSettings, session: Session, step: int, marker_dir: Path) -> None:
    """Chaos test (``run.fault_step``): SIGKILL rank 0's process once, to prove that resume works."""
    if not run.fault_step or step != run.fault_step or session.rank != 0:
        return
    marker = marker_dir / f"fault-{run.name}-done"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    if session.is_ray:
        # Ray Train's controller collects reports (and registers their checkpoints) by polling the workers every
        # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S; a kill before that poll resumes from the checkpoint before -- also
        # consistent, but the chaos test is meant to resume from the newest one
        time.sleep(3 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")))
    log.warning("fault injection: killing worker pid %d at step %d", os.getpid(), step)
    os.kill(os.getpid(), signal.SIGKILL)


class RowLog:
    """Per-rank JSON lines ``{"attempt", "step", "row_ids"}``: proves every row is used once across restarts."""

    def __init__(self, folder: str | None, rank: int):
        self.file = Path(folder) / f"rank-{rank}.jsonl" if folder else None
        if self.file:
            self.file.parent.mkdir(parents=True, exist_ok=True)
        self.pid = os.getpid()

    def write(self, step: int, row_ids) -> None:
        if self.file:
            with self.file.open("a") as f:
                f.write(json.dumps({"pid": self.pid, "step": step, "row_ids": [int(r) for r in row_ids]}) + "\n")


# ---------------------------------------------------------------------------------------------------------
# Progress: console + MLflow on rank 0
# ---------------------------------------------------------------------------------------------------------
class Progress:
    """Console line (step, loss, tokens/s, ETA) and MLflow metrics ``<stage>/<name>`` every ``log_every`` steps."""

    def __init__(self, stage: str, total_steps: int, start_step: int, rank: int, mlflow_run: dict[str, str] | None,
                 log_every: int):  # fmt: skip
        self.stage, self.total, self.rank, self.log_every = stage, total_steps, rank, log_every
        self.start_step, self.start = start_step, time.perf_counter()
        self.last = self.start
        self.client = None
        if mlflow_run and rank == 0:
            from mlflow import MlflowClient

            self.client, self.run_id = MlflowClient(mlflow_run["tracking_uri"]), mlflow_run["run_id"]
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        log.setLevel(logging.INFO)

    def layout(self, model: nn.Module, strategy: str, world_size: int) -> None:
        """How the model is spread over the workers (console and MLflow tags): under FSDP each worker holds
        about 1/world_size of the parameters."""
        total = sum(p.numel() for p in model.parameters())
        local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
        if self.rank == 0:
            log.info("[%s] %d worker(s), %s: rank 0 holds %d of %d parameters", self.stage, world_size, strategy,
                     local, total)  # fmt: skip
            if self.client:
                self.client.set_tag(self.run_id, f"{self.stage}.parameters_per_worker", str(local))
                self.client.set_tag(self.run_id, f"{self.stage}.parameters", str(total))

    def step(self, step: int, tokens: int, metrics: dict[str, float]) -> dict[str, float]:
        now = time.perf_counter()
        metrics = {**metrics, "tokens_per_s": tokens / max(now - self.last, 1e-9)}
        self.last = now
        if self.rank == 0 and (step % self.log_every == 0 or step == self.total):
            per_step = (now - self.start) / max(1, step - self.start_step)
            eta = time.strftime("%H:%M:%S", time.gmtime(per_step * (self.total - step)))
            shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            log.info("[%s] step %d/%d %s eta %s", self.stage, step, self.total, shown, eta)
            if self.client:
                from mlflow.entities import Metric

                stamp = int(time.time() * 1000)
                self.client.log_batch(self.run_id, [Metric(f"{self.stage}/{k}", float(v), stamp, step)
                                                    for k, v in metrics.items()])  # fmt: skip
        return metrics


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


def grad_norm(model: nn.Module, max_norm: float) -> float:
    """Total gradient norm, clipping to ``max_norm`` when it is > 0 (over all shards under FSDP)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum floats over workers (identity with one)."""
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class SeededOrder:
    """``map_batches`` adding ``order`` = a hash of (seed, epoch, row_id): sorting on it is a shuffle that every
    worker and every restart reproduces exactly (Ray's random_shuffle depends on block layout)."""

    def __init__(self, seed: int, epoch: int):
        self.seed, self.epoch = seed, epoch

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        ids = np.asarray(batch["row_id"], dtype=np.uint64)
        key = (ids + np.uint64(self.seed * 1_000_003 + self.epoch)) * np.uint64(0x9E3779B97F4A7C15)
        key ^= key >> np.uint64(31)
        return {**batch, "order": key * np.uint64(0xBF58476D1CE4E5B9)}


def epoch_datasets(datasets: list[Any]) -> dict[str, Any]:
    """One Ray dataset per epoch (``epoch_0``, ``epoch_1``...): read one after the other by `global_batches`,
    each in its own deterministic order (a union would interleave them)."""
    return {f"epoch_{e}": ds for e, ds in enumerate(datasets)}


def global_batches(num_epochs: int, batch_size: int) -> Iterator[dict[str, Any]]:
    """Inside a Ray Train worker: the full global batches of every epoch's dataset shard, in order."""
    import ray.train

    for epoch in range(num_epochs):
        shard = ray.train.get_dataset_shard(f"epoch_{epoch}")
        yield from shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True)


def ray_data_setup() -> None:
    """Attach to Ray (a job's cluster or a new local one) and quiet Ray Data."""
    import ray

    if not ray.is_initialized():
        ray.init()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


# ---------------------------------------------------------------------------------------------------------
# Driver side: MLflow run, TorchTrainer, final export
# ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def mlflow_run(stage: str, config: Any, settings: MlflowSettings) -> Iterator[dict[str, str]]:
    """The active run (a pipeline's child run, which has the params already), else a new run named after the
    stage with the whole config as params, nested under ``parent_run_id`` / $MLFLOW_PARENT_RUN_ID if given."""
    import mlflow

    from ops.config import flatten

    uri = tracking_uri()
    active = mlflow.active_run()
    if active is not None:
        yield {"run_id": active.info.run_id, "tracking_uri": uri}
        return
    parent = settings.parent_run_id or os.environ.get("MLFLOW_PARENT_RUN_ID")
    tags = {"stage": stage, **({"mlflow.parentRunId": parent} if parent else {})}
    from evaluation.report import experiment_id

    experiment = experiment_id(settings.experiment, settings.artifact_location)
    with mlflow.start_run(experiment_id=experiment, run_name=stage, tags=tags) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(config).items()})
        yield {"run_id": run.info.run_id, "tracking_uri": uri}


def log_manifest(data_dir: str) -> None:
    """The dataset manifest of the stage's input folder as an MLflow artifact (and a few params)."""
    import mlflow

    from ops.io import exists, join, read_manifest

    if not exists(join(data_dir, "manifest.json")):
        log.warning("no manifest.json in %s; the run records no dataset manifest", data_dir)
        return
    manifest = read_manifest(data_dir)
    mlflow.log_dict(manifest, "dataset/manifest.json")
    mlflow.set_tag("dataset", data_dir)


def export_final(checkpoint_dir: Path, output_dir: str, kind: str) -> Path:
    """The last checkpoint -> ``output_dir``: our layout + ``hf/`` (+ ``st/`` for encoders) + ``training_state/``,
    replaced atomically."""
    from nomicbert.checkpoint import export_all, load_model
    from nomicbert.tokenizer import load_tokenizer

    model = load_model(checkpoint_dir, kind=kind)
    tokenizer = load_tokenizer(checkpoint_dir)

    def write(folder: Path) -> None:
        export_all(model, folder, tokenizer)
        shutil.copytree(checkpoint_dir / STATE_DIR, folder / STATE_DIR)

    return atomic_folder(Path(output_dir), write)


def absolute_paths(config: Any) -> Any:
    """Local paths made absolute in the driver: Ray workers need not share its working directory."""
    import dataclasses

    def fix(value: str | None, must_exist: bool = False) -> str | None:
        if value is None or "://" in value or (must_exist and not Path(value).exists()):
            return value
        return str(Path(value).resolve())

    changes = {k: fix(getattr(config, k)) for k in ("data", "output_dir", "init_checkpoint") if hasattr(config, k)}
    if hasattr(config, "model"):
        changes["model"] = fix(config.model, must_exist=True)
    run = dataclasses.replace(config.run, row_log=fix(config.run.row_log))
    return dataclasses.replace(config, **changes, run=run)


def tracking_uri() -> str:
    """MLflow's tracking URI with a relative sqlite path made absolute (workers run elsewhere)."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def fit(stage: str, config: Any, loop: Callable[[dict], Any], datasets: list[Any], total_steps: int,
        kind: str, extra_loop_config: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Run ``loop`` on ``config.run.num_workers`` Ray Train workers (DDP) over the per-epoch ``datasets``, export
    the final model, log it.

    Returns ``{"stage", "model" (the exported folder), "checkpoint" (Ray's last checkpoint), "steps", "metrics",
    "mlflow_run_id"}``.
    """
    import mlflow
    import ray.train
    from ray.train.torch import TorchTrainer

    from ops.config import to_dict

    config = absolute_paths(config)
    run = config.run
    ordered = ray.train.DataConfig.default_ingest_options()
    ordered.preserve_order = True
    resources = {"CPU": run.cpus_per_worker, **({"GPU": 1} if run.use_gpu else {})}
    with mlflow_run(stage, config, config.mlflow) as mlrun:
        log_manifest(config.data)
        trainer = TorchTrainer(
            loop,
            train_loop_config={"config": to_dict(config), "total_steps": total_steps, "mlflow": mlrun,
                               "num_epochs": len(datasets),
                               **(extra_loop_config or {})},
            scaling_config=ray.train.ScalingConfig(num_workers=run.num_workers, use_gpu=run.use_gpu,
                                                   resources_per_worker=resources),  # fmt: skip
            run_config=ray.train.RunConfig(
                name=run.name,
                storage_path=str(Path(run.storage_path).resolve()) if "://" not in run.storage_path else run.storage_path,
                failure_config=ray.train.FailureConfig(max_failures=run.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=run.keep_checkpoints),
            ),
            datasets=epoch_datasets(datasets),
            # every worker reads the same ordered stream and keeps its slice of each global batch (exact resume)
            dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=ordered),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        with result.checkpoint.as_directory() as folder:
            model_dir = export_final(Path(folder), config.output_dir, kind)
            progress = json.loads((Path(folder) / STATE_DIR / PROGRESS_FILE).read_text())
        mlflow.log_artifacts(str(model_dir), "model")
        return {"stage": stage, "model": str(model_dir), "checkpoint": result.checkpoint.path,
                "steps": progress["step"], "metrics": dict(result.metrics or {}), "mlflow_run_id": mlrun["run_id"]}
