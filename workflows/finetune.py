"""Stage 3: supervised fine-tuning with hard negatives -> nomic-embed-text-v1 (spec §7.1).

    python -m workflows.finetune --config workflows/configs/finetune.yaml [key=value ...]
    ray job submit --working-dir . -- python -m workflows.finetune --config workflows/configs/finetune_8gpu.yaml

The contrastive loop (`workflows.contrastive.train`) with documents laid out [positive, negative_1..negative_n]
per query: every query is scored against all positives and hard negatives of the global batch. ``num_negatives``
and ``source_weights`` are the knobs of the Tune ablation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from workflows import contrastive


@dataclass
class FinetuneConfig(contrastive.ContrastiveConfig):
    stage: ClassVar[str] = "finetune"

    def validate_stage(self) -> None:
        if self.matryoshka_dims:
            raise ValueError("matryoshka_dims are set: run workflows.matryoshka for the v1.5 loss")


def run(config: FinetuneConfig) -> dict[str, Any]:
    """Train and export; returns {"model": output folder, "checkpoint", "steps", "metrics", "mlflow_run_id"}."""
    return contrastive.run(config)


def main(argv: list[str] | None = None) -> None:
    from ops.config import cli

    result = run(cli(FinetuneConfig, "Stage 3: supervised fine-tuning with hard negatives", argv))
    print(f"[finetune] done: {result['steps']} steps, model in {result['model']}")


if __name__ == "__main__":
    main()
