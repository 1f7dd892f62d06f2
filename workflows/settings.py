"""Config sections every training stage shares (every key required: a missing one is an error naming it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


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
    max_skipped_in_row: int  # non-finite steps are skipped; this many in a row stop the job (not retried)

    def __post_init__(self) -> None:
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set optim.warmup_steps or optim.warmup_ratio, not both")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1) (got {self.warmup_ratio})")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0 (got {self.lr})")
        if self.max_skipped_in_row < 1:
            raise ValueError(f"optim.max_skipped_in_row must be >= 1 (got {self.max_skipped_in_row})")


@dataclass
class RunSettings:
    name: str  # Ray Train run name; re-running the same (storage_path, name) resumes it
    storage_path: str  # Ray Train storage: checkpoints and run state (a path, s3:// or gs://)
    num_workers: int  # 0 = run the loop in the driver process (tests)
    strategy: Literal["ddp", "fsdp"]  # fsdp: FSDP2, each worker holds 1/num_workers of weights, grads, optimizer
    use_gpu: bool
    cpus_per_worker: float
    worker_resources: dict[str, float]  # custom resources per worker: the node type trainers run on (cluster.yaml)
    data_resources: dict[str, float]  # custom resources per input-pipeline task: the node type data runs on
    precision: Literal["fp32", "bf16"]  # bf16 autocast: a GPU, or a CPU with AVX-512 BF16 / AMX (else slower than fp32)
    compile: bool  # torch.compile each encoder block (dynamic shapes: one graph for all packed batch sizes)
    checkpoint_every: int  # steps
    keep_checkpoints: int
    max_failures: int  # Ray Train restarts from the last checkpoint this many times
    log_every: int  # steps between console lines and MLflow metrics
    seed: int
    threads: int = 0  # torch CPU threads per worker; 0 = Ray's default (1 per reserved CPU). More uses idle cores
    # test-only switches (`workflows.chaos`): never in the user YAMLs, set by tests through overrides
    row_log: str | None = None  # folder for per-rank JSON lines of the row ids of every step (data audit)
    fault_step: int = 0  # chaos test: rank 0 SIGKILLs itself at this step of the first attempt; 0 = off

    def __post_init__(self) -> None:
        for key in ("checkpoint_every", "log_every", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ValueError(f"run.{key} must be >= 1")
        if self.threads < 0:
            raise ValueError(f"run.threads must be >= 0 (got {self.threads})")


@dataclass
class MlflowSettings:
    experiment: str
    parent_run_id: str | None  # nest under a pipeline run; None -> $MLFLOW_PARENT_RUN_ID if set
    artifact_location: str | None  # for a new experiment; None -> beside a sqlite store, else the server's
    registered_model: str | None  # encoders: a new version of this Model Registry name (sentence-transformers flavour)


@dataclass
class ValidationSettings:
    """A held-out slice scored during training, so a run shows in MLflow whether it learns before it ends. The
    slice is the first rows (row-id order) of each source, in proportion to its size, and never reaches a training
    batch."""

    rows: int  # held-out rows (masked-LM: packed rows; embedding stages: pairs); 0 = off; a few hundred at most
    every: int  # steps between evaluations (and one at the last step)

    def __post_init__(self) -> None:
        if self.rows < 0 or self.every < 1:
            raise ValueError(f"validation.rows must be >= 0 and validation.every >= 1 (got {self.rows}, {self.every})")

    def check_workers(self, workers: int) -> None:
        """Every worker scores an equal share of the slice (a forward is a collective under DDP and FSDP)."""
        if self.rows and self.rows < workers:
            raise ValueError(f"validation.rows ({self.rows}) must be 0 or at least the {workers} workers")
