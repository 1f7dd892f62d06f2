"""Console progress and MLflow metrics of a training loop (rank 0)."""

from __future__ import annotations

import logging
import time

from torch import nn

from ops.console import SHOW, format_duration

log = logging.getLogger("workflows.train")


class Progress:
    """Console line (step, loss, tokens/s, ETA) and MLflow metrics ``<stage>/<name>`` every ``log_every`` steps."""

    def __init__(self, stage: str, total_steps: int, start_step: int, rank: int, mlflow_run: dict[str, str] | None,
                 log_every: int):  # fmt: skip
        self.stage, self.total, self.rank, self.log_every = stage, total_steps, rank, log_every
        self.start_step, self.start = start_step, time.perf_counter()
        self.last, self.tokens = self.start, 0
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

    def count(self, tokens: int) -> None:
        """Every step: the global batch's tokens (a host count), for the rate over the next logged window."""
        self.tokens += tokens

    def due(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total

    def log_validation(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """A held-out evaluation (values already read): MLflow metrics ``val/<name>`` at ``step`` and a line in the
        log file, not on the console (its line budget is per stage, not per evaluation). Returns the ``val/`` names."""
        named = {f"val/{k}": v for k, v in metrics.items()}
        if self.rank == 0:
            shown = " ".join(f"{k} {v:.4g}" for k, v in named.items())
            log.info("[%s] step %d/%d validation %s", self.stage, step, self.total, shown)
            self._log_metrics(step, named)
        return named

    def _log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self.client:
            from mlflow.entities import Metric

            stamp = int(time.time() * 1000)
            self.client.log_batch(self.run_id, [Metric(k, float(v), stamp, step) for k, v in metrics.items()])

    def log(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """At a logged step (its values already read from the device): tokens/s over the window since the last log,
        the console line on rank 0 and the MLflow metrics ``<stage>/<name>``."""
        now = time.perf_counter()
        metrics = {**metrics, "tokens_per_s": self.tokens / max(now - self.last, 1e-9)}
        self.last, self.tokens = now, 0
        if self.rank == 0:
            per_step = (now - self.start) / max(1, step - self.start_step)
            eta = format_duration(per_step * (self.total - step))
            shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            log.info("[%s] step %d/%d %s eta %s", self.stage, step, self.total, shown, eta, extra=SHOW)
            self._log_metrics(step, {f"{self.stage}/{k}": v for k, v in metrics.items()})
        return metrics
