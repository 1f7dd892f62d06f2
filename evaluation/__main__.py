"""``python -m evaluation --model PATH_OR_NAME [suites...]``: score a model, print the table, log to MLflow.

Also a Ray Jobs entry point: ``ray job submit --working-dir . -- python -m evaluation --model ... --beir ...``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from evaluation.api import EvalConfig, run
from evaluation.data import DataError
from evaluation.glue import GlueConfig
from evaluation.report import format_table


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True,
                   help="our checkpoint folder, a Nomic Hub id, or a sentence-transformers model")
    p.add_argument("--suite", action="append", default=[], metavar="mteb:TASK",
                   help="mteb:NAME (task or benchmark), mteb:PATH or mteb:NAME=PATH (local BEIR folder / STS file)")
    p.add_argument("--beir", action="append", default=[], metavar="DIR", help="BEIR folder ([NAME=]DIR)")
    p.add_argument("--sts", action="append", default=[], metavar="FILE", help="STS pairs .tsv/.jsonl ([NAME=]FILE)")
    p.add_argument("--glue", action="append", default=[], metavar="TASK",
                   help="GLUE task (cola sst2 mrpc stsb qqp mnli qnli rte)")
    p.add_argument("--glue-data", default=None, help="local GLUE root (SST-2/, MRPC/, ...); default: the Hub")
    p.add_argument("--glue-recipe", default=None, metavar="YAML",
                   help="GlueConfig fields as YAML (epochs, sweep, ...)")
    p.add_argument("--glue-tune", action="store_true", help="run the GLUE sweep as Ray Tune trials")
    p.add_argument("--loco", action="append", default=[], metavar="DIR",
                   help="QMSum jsonl/folder, long-document BEIR folder, or mteb:TASK (online)")
    p.add_argument("--loco-lengths", type=_csv, default=["2048", "4096", "8192"], help="comma-separated token lengths")
    p.add_argument("--jina", action="store_true", help="the four Jina long-context MTEB tasks (needs the Hub)")
    p.add_argument("--rotary-scaling-factor", type=float, default=2.0, help="dynamic NTK alpha for long context")
    p.add_argument("--dims", type=_csv, default=[], help="Matryoshka dims and/or binary, e.g. 768,256,64,binary")
    p.add_argument("--max-length", type=int, default=None, help="truncation (default 512 for Nomic models)")
    p.add_argument("--limit", type=int, default=None,
                   help="first N queries/pairs/meetings per local task (smoke runs)")
    p.add_argument("--experiment", default="evaluation", help="MLflow experiment")
    p.add_argument("--run-name", default=None)
    p.add_argument("--run-id", default=None, help="log into this existing MLflow run")
    p.add_argument("--output", default=None, help="write the numbers as JSON here")
    p.add_argument("--ray-min-docs", type=int, default=200_000, help="encode corpora this large with Ray Data")
    p.add_argument("--ray-encode", action="store_true",
                   help="encode every suite in a Ray Data actor pool (GPU actors with --ray-gpus-per-worker)")
    p.add_argument("--ray-workers", type=int, default=2)
    p.add_argument("--ray-gpus-per-worker", type=float, default=0.0)
    p.add_argument("--ray-cpus-per-worker", type=float, default=1.0)
    p.add_argument("--device", default=None)
    p.add_argument("--cpu-bf16", action="store_true",
                   help="bf16 autocast on CPU for sentence-transformers models (AVX-512 BF16 / AMX CPUs)")
    p.add_argument("--embedding-cache", default=None, metavar="DIR",
                   help="reuse / store raw embeddings here (keyed by model content, length, precision, prompt)")
    p.add_argument("--no-mlflow", action="store_true", help="print and write JSON only")
    return p


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    mteb_tasks = []
    for suite in args.suite:
        kind, sep, task = suite.partition(":")
        if kind != "mteb" or not sep or not task:
            raise SystemExit(f"--suite {suite!r}: expected mteb:TASK")
        mteb_tasks.append(task)
    if args.glue_recipe:
        from ops.config import load_config

        glue = load_config(GlueConfig, args.glue_recipe)
    else:
        glue = GlueConfig()
    glue.tasks = args.glue or glue.tasks
    glue.data_dir = args.glue_data or glue.data_dir
    glue.use_tune = args.glue_tune or glue.use_tune
    return EvalConfig(model=args.model, mteb=mteb_tasks, beir=args.beir, sts=args.sts, glue=glue, loco=args.loco,
                      loco_lengths=[int(n) for n in args.loco_lengths], jina=args.jina,
                      rotary_scaling_factor=args.rotary_scaling_factor, dims=args.dims, max_length=args.max_length,
                      limit=args.limit, experiment=args.experiment, run_name=args.run_name, run_id=args.run_id,
                      output=args.output, ray_min_docs=args.ray_min_docs, ray_workers=args.ray_workers,
                      ray_gpus_per_worker=args.ray_gpus_per_worker, ray_encode=args.ray_encode,
                      ray_cpus_per_worker=args.ray_cpus_per_worker, device=args.device, cpu_bf16=args.cpu_bf16,
                      embedding_cache=args.embedding_cache, log_to_mlflow=not args.no_mlflow)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = config_from_args(parser().parse_args(argv))
    if not (config.mteb or config.beir or config.sts or config.glue.tasks or config.loco or config.jina):
        raise SystemExit("nothing to evaluate: give --suite, --beir, --sts, --glue, --loco or --jina")
    try:
        metrics = run(config)
    except (DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(metrics, {config.model: metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
