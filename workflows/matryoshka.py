"""Stage 4: Matryoshka fine-tuning -> nomic-embed-text-v1.5 (spec §7.2).

    python -m workflows.matryoshka --config workflows/configs/matryoshka.yaml [key=value ...]
    ray job submit --working-dir . -- python -m workflows.matryoshka --config workflows/configs/matryoshka_8gpu.yaml

The fine-tuning loop with the loss summed over ``matryoshka_dims`` after the weightless LayerNorm
(`nomicbert.losses.matryoshka_info_nce`); the exported model carries ``embedding_recipe: v1.5``, so the
embedding API applies the LayerNorm and truncates to any of those dims. Unlike the reference, gradient caching
works here too: the cache holds the pooled embeddings and the loss is computed on them whatever it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from nomicbert.losses import check_dims
from workflows import contrastive


@dataclass
class MatryoshkaConfig(contrastive.ContrastiveConfig):
    stage: ClassVar[str] = "matryoshka"

    def validate_stage(self) -> None:
        check_dims(self.matryoshka_dims, self.matryoshka_weights)


def run(config: MatryoshkaConfig) -> dict[str, Any]:
    """Train and export; returns {"model": output folder, "checkpoint", "steps", "metrics", "mlflow_run_id"}."""
    return contrastive.run(config)


def main(argv: list[str] | None = None) -> None:
    from ops.config import cli

    result = run(cli(MatryoshkaConfig, "Stage 4: Matryoshka fine-tuning (v1.5)", argv))
    print(f"[matryoshka] done: {result['steps']} steps, model in {result['model']}")


if __name__ == "__main__":
    main()
