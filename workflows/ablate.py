"""Ray Tune ablation of the fine-tuning stage: hard negatives per query x dataset mixture (spec §7.1), optionally
x a grid of other fine-tuning settings (``search``: learning rate, epochs, document length, ...).

    python -m workflows.ablate --config workflows/configs/ablate.yaml [key=value ...]
    ray job submit --working-dir . -- python -m workflows.ablate --config workflows/configs/ablate.yaml

Every trial is a real `workflows.finetune` run (the finetune YAML + ``finetune_overrides`` + the trial's
``num_negatives``, ``source_weights`` and ``search`` setting) followed by `evaluation.run` on the ``evaluate``
suites; the trial reports ``metric`` to Tune. MLflow: one parent run (``name``) in ``experiment``; every trial is a
child run named ``negatives=<n>,mixture=<name>[,<key>=<value>...]`` with params ``num_negatives``, ``mixture``,
``search.<key>``, the whole finetune config, the
training metrics and the evaluation scores. The best trial is chosen on held-out validation data only
(``evaluate``: BEIR validation folders of `evaluation.beir_split`, STS dev files; a test split there is an error),
printed, tagged on the parent run (``best_trial``, ``best_num_negatives``, ``best_mixture``, ``selected_on``) and
returned; the test splits of ``report`` are scored in the same evaluation run and logged beside the choice
(``ablate/test_score`` per trial, ``ablate/best_test_score`` on the parent), never used to make it.

Scheduling: a grid search with no early-stopping scheduler. The score being compared is an evaluation run after
training; the training loop reports into Ray Train, not Tune, so there is no intermediate value of that score
for ASHA to cut trials on (early-stopping on the training loss would compare losses that are not comparable
across negative counts: more negatives, harder softmax). Resources: each trial asks Tune for ``trial_cpus`` /
``trial_gpus``. On CPU (tests) use ``run.num_workers=0`` (training in the trial process). On GPUs either give
each trial ``trial_gpus: 1`` with ``run.num_workers=0, run.use_gpu=true`` or keep ``trial_gpus: 0, trial_cpus:
0.01`` and let each trial's TorchTrainer request ``run.num_workers`` GPU workers; ``max_concurrent_trials``
trials then share the cluster's GPUs through Ray's scheduler.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from workflows import finetune


log = logging.getLogger(__name__)

VALIDATION_NAMES = ("validation", "dev", "val")
SEARCH_RESERVED = ("num_negatives", "source_weights", "data", "output_dir", "init_checkpoint")  # not in `search`


@dataclass
class AblateEval:
    """The suites that pick the best trial: held-out validation data only, never a test split (``report``
    scores the test split beside it, never used to choose)."""

    beir: list[str] = field(default_factory=list)  # [NAME=]PATH validation/ folders of `evaluation.beir_split`
    sts: list[str] = field(default_factory=list)  # [NAME=]PATH STS dev/validation files
    limit: int | None = None  # first N queries / pairs of each task (CI)
    cpu_bf16: bool = False  # bf16 autocast on CPU (evaluation.EvalConfig.cpu_bf16): the same for every trial

    def __post_init__(self) -> None:
        for kind, items in (("beir", self.beir), ("sts", self.sts)):
            for item in items:
                path = item.rpartition("=")[2]
                if not any(part in VALIDATION_NAMES for part in Path(path).stem.lower().replace("_", "-").split("-")):
                    raise ValueError(f"evaluate.{kind}: {path} is not a validation split; the best trial is chosen "
                                     f"on held-out validation data ({'/'.join(VALIDATION_NAMES)} in the name: "
                                     "`python -m evaluation.beir_split` makes one from a BEIR set's train queries, "
                                     "STS-B has dev.tsv), never on the test split it is reported on")  # fmt: skip


@dataclass
class AblateReport:
    """Test splits scored for every trial in the same evaluation run and logged beside the validation score
    (``ablate/test_score`` = ``report_metric``): what the chosen trial scores where it will be reported."""

    beir: list[str] = field(default_factory=list)  # [NAME=]PATH BEIR folders (their test qrels)
    sts: list[str] = field(default_factory=list)  # [NAME=]PATH STS test files


@dataclass
class AblateConfig:
    finetune: str  # the finetune YAML every trial starts from
    finetune_overrides: list[str]  # key=value applied to it (paths, steps, run.num_workers, ...)
    num_negatives: list[int]  # grid over hard negatives per query (0 = in-batch only)
    mixtures: dict[str, dict[str, float] | None]  # name -> source weights (0 leaves a source out); null = by size
    evaluate: AblateEval
    metric: str  # an evaluation metric name, e.g. beir/scifact/ndcg_at_10 or sts/stsb/spearman
    mode: Literal["max", "min"]
    max_concurrent_trials: int
    trial_cpus: float  # Tune resources of one trial (> 0)
    trial_gpus: float
    storage_path: str  # Tune results, trial checkpoints and trained models
    experiment: str  # MLflow experiment of the parent and child runs
    name: str  # Tune run name and MLflow parent run name
    report: AblateReport = field(default_factory=AblateReport)
    report_metric: str | None = None  # a metric of the report suites, e.g. beir/scifact/ndcg_at_10
    search: dict[str, list[Any]] = field(default_factory=dict)  # finetune key (dotted) -> values, gridded too

    def __post_init__(self) -> None:
        if not self.num_negatives or min(self.num_negatives) < 0:
            raise ValueError("num_negatives must be a non-empty list of counts >= 0")
        for key, values in self.search.items():
            if key in SEARCH_RESERVED or key.split(".")[0] in ("run", "mlflow"):
                raise ValueError(f"search.{key}: not searchable here (num_negatives and mixtures have their own "
                                 "grids; data, paths, run.* and mlflow.* are the same for every trial)")  # fmt: skip
            if not isinstance(values, list) or not values:
                raise ValueError(f"search.{key} must be a non-empty list of values")
        if not self.mixtures:
            raise ValueError("mixtures must name at least one mixture (e.g. {all: null})")
        for name, weights in self.mixtures.items():
            if weights is not None and (not weights or min(weights.values()) < 0 or not sum(weights.values()) > 0):
                raise ValueError(f"mixture {name!r}: weights must be >= 0 with a positive sum (or null)")
        if not (self.evaluate.beir or self.evaluate.sts):
            raise ValueError("evaluate needs at least one beir or sts task to score the trials")
        names = lambda items: {item.partition("=")[0] for item in items if "=" in item}  # noqa: E731
        clash = names(self.evaluate.beir + self.evaluate.sts) & names(self.report.beir + self.report.sts)
        if clash:
            raise ValueError(f"report names {sorted(clash)} are also validation names; name the test sets apart")
        if self.report_metric and not (self.report.beir or self.report.sts):
            raise ValueError("report_metric needs report.beir or report.sts (the test splits it is read from)")
        if self.trial_cpus <= 0 or self.trial_gpus < 0 or self.max_concurrent_trials < 1:
            raise ValueError("trial_cpus must be > 0, trial_gpus >= 0, max_concurrent_trials >= 1")


def settings(config: AblateConfig) -> list[dict[str, Any]]:
    """The ``search`` grid as one dict per combination ([{}] without a search)."""
    keys = list(config.search)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(config.search[k] for k in keys))]


def trial_name(num_negatives: int, mixture: str, setting: dict[str, Any] | None = None) -> str:
    return ",".join([f"negatives={num_negatives}", f"mixture={mixture}",
                     *(f"{k}={v}" for k, v in (setting or {}).items())])  # fmt: skip


def finetune_raw(config: AblateConfig) -> dict[str, Any]:
    from ops.config import apply_overrides, read_yaml

    return apply_overrides(read_yaml(config.finetune), config.finetune_overrides)


def trial_config(raw: dict[str, Any], config: AblateConfig, num_negatives: int, mixture: str,
                 trial_id: str, setting: dict[str, Any] | None = None) -> finetune.FinetuneConfig:  # fmt: skip
    from ops.config import apply_overrides, from_dict

    raw = apply_overrides(raw, [f"{k}={json.dumps(v)}" for k, v in (setting or {}).items()])
    root = Path(config.storage_path).resolve() / config.name / f"negatives{num_negatives}-{mixture}-{trial_id}"
    raw.update(num_negatives=num_negatives, source_weights=config.mixtures[mixture], output_dir=str(root / "model"))
    raw["run"] = {**raw["run"], "name": "finetune", "storage_path": str(root / "ray")}
    raw["mlflow"] = {**raw["mlflow"], "experiment": config.experiment, "registered_model": None}  # trials: no versions
    return from_dict(finetune.FinetuneConfig, raw, where=f"trial {trial_name(num_negatives, mixture, setting)}")


def check_data(raw: dict[str, Any], config: AblateConfig) -> None:
    """Fail before any trial starts: negatives beyond what every row holds, or mixtures naming unknown sources."""
    import pyarrow.parquet as pq

    data = str(raw["data"])
    if "://" in data:  # remote data: the trials check it themselves
        return
    files = sorted(Path(data).glob("part-*.parquet"))
    if not files:
        raise ValueError(f"finetune data {data} has no part-*.parquet files")
    columns = pq.read_schema(files[0]).names
    wanted = max(config.num_negatives)
    if wanted:
        if "negatives" not in columns:
            raise ValueError(f"num_negatives up to {wanted} but {data} has no negatives column (mine them first)")
        held = min(min((len(x) for x in pq.read_table(f, columns=["negatives"])["negatives"].to_pylist()), default=0)
                   for f in files)  # fmt: skip
        if wanted > held:
            raise ValueError(f"num_negatives {wanted} exceeds the {held} hard negatives the rows of {data} hold; "
                             f"use counts <= {held} or mine more")  # fmt: skip
    sources = set().union(*(set(pq.read_table(f, columns=["source"])["source"].to_pylist()) for f in files))
    for name, weights in config.mixtures.items():
        unknown = set(weights or {}) - sources
        if unknown:
            raise ValueError(f"mixture {name!r} names sources {sorted(unknown)} not in {data} ({sorted(sources)})")


def numeric(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}  # fmt: skip


def trial(params: dict[str, Any], setup: dict[str, Any]) -> None:
    """One Tune trial: a thin driver that runs `fine_tune_and_evaluate` as a Ray task holding ``trial_cpus`` /
    ``trial_gpus`` outside the trial's placement group (Ray Data and Ray Train inside the task then schedule their
    own tasks and workers on the cluster), and reports its score to Tune."""
    import ray
    from ray import tune
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    config: AblateConfig = setup["config"]
    task = ray.remote(fine_tune_and_evaluate).options(
        num_cpus=config.trial_cpus, num_gpus=config.trial_gpus, max_retries=0,
        runtime_env={"env_vars": setup["mlflow_client_env"]},  # the trial logs with the driver's MLflow credentials
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))  # fmt: skip
    tune.report(ray.get(task.remote(params, setup, tune.get_context().get_trial_id())))


def fine_tune_and_evaluate(params: dict[str, Any], setup: dict[str, Any], trial_id: str) -> dict[str, Any]:
    """Fine-tune, evaluate, return the Tune metrics -- all inside one child MLflow run."""
    import mlflow

    from evaluation import EvalConfig
    from evaluation import run as evaluate
    from ops.config import flatten

    config: AblateConfig = setup["config"]
    os.environ["MLFLOW_TRACKING_URI"] = setup["tracking_uri"]  # finetune and evaluation read it too
    negatives, mixture, setting = int(params["num_negatives"]), str(params["mixture"]), dict(params["setting"])
    cfg = trial_config(setup["finetune"], config, negatives, mixture, trial_id, setting)
    tags = {"mlflow.parentRunId": setup["parent_run_id"], "ablation": config.name, "tune_trial_id": trial_id}
    name = trial_name(negatives, mixture, setting)
    with mlflow.start_run(experiment_id=setup["experiment_id"], run_name=name, tags=tags):
        mlflow.log_params({"num_negatives": negatives, "mixture": mixture,
                           **{f"search.{k}": str(v) for k, v in setting.items()},
                           **{f"finetune.{k}": str(v)[:500] for k, v in flatten(cfg).items()
                              if k not in ("num_negatives",)}})  # fmt: skip
        result = finetune.run(cfg)  # logs its metrics and model into this (active) run
        # one evaluation run (one model load) scores the validation suites and the report (test) suites
        scores = evaluate(EvalConfig(model=result["model"], beir=[*config.evaluate.beir, *config.report.beir],
                                     sts=[*config.evaluate.sts, *config.report.sts], limit=config.evaluate.limit,
                                     cpu_bf16=config.evaluate.cpu_bf16, experiment=config.experiment,
                                     log_to_mlflow=True))  # fmt: skip
        for metric in filter(None, (config.metric, config.report_metric)):
            if metric not in scores:
                raise KeyError(f"metric {metric!r} not among the evaluation scores {sorted(scores)}")
        test_score = scores[config.report_metric] if config.report_metric else None
        mlflow.log_metrics({"ablate/score": scores[config.metric],
                            **({"ablate/test_score": test_score} if test_score is not None else {})})  # fmt: skip
        return {"score": scores[config.metric], "test_score": test_score, "steps": result["steps"],
                "mlflow_run_id": mlflow.active_run().info.run_id,
                **{f"train_{k}": v for k, v in numeric(result["metrics"]).items() if "/" not in k}}


def warn_if_no_cpu_left(config: AblateConfig) -> None:
    """The trials' tasks hold ``trial_cpus`` each; their data tasks (1 CPU each) need what is left. Warn when the
    cluster as it is now leaves less than one CPU (an autoscaler may still add nodes)."""
    import ray

    trials = len(config.num_negatives) * len(config.mixtures) * len(settings(config))
    held = config.trial_cpus * min(config.max_concurrent_trials, trials)
    total = ray.cluster_resources().get("CPU", 0.0)
    if total - held < 1:
        log.warning("ablate: %d concurrent trial(s) x trial_cpus %.2f hold %.2f of the cluster's %.2f CPUs, leaving "
                    "less than the 1 CPU each data task needs: trials will wait until nodes are added (lower "
                    "trial_cpus or max_concurrent_trials)", min(config.max_concurrent_trials, trials),
                    config.trial_cpus, held, total)  # fmt: skip


def run(config: AblateConfig) -> dict[str, Any]:
    """Run the grid; returns {"best": {num_negatives, mixture, setting, source_weights, score, mlflow_run_id}, "metric",
    "trials": [...] (one per trial), "parent_run_id", "experiment_id"}."""
    import mlflow
    from ray import tune

    from evaluation.report import experiment_id
    from ops.config import flatten
    from workflows import ingest, tracking

    raw = finetune_raw(config)
    check_data(raw, config)
    for mixture in config.mixtures:  # every trial config must be valid before the first trial starts
        for negatives in config.num_negatives:
            for setting in settings(config):
                trial_config(raw, config, negatives, mixture, "check", setting)
    ingest.ray_data_setup()
    warn_if_no_cpu_left(config)
    uri = tracking.tracking_uri()
    os.environ["MLFLOW_TRACKING_URI"] = uri  # the environment, not mlflow's global: that would outlive this call
    experiment = experiment_id(config.experiment)  # in the driver: trials must not create it (own CWD)
    storage = str(Path(config.storage_path).resolve())
    with mlflow.start_run(experiment_id=experiment, run_name=config.name, tags={"ablation": config.name}) as parent:
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(config).items()})
        setup = {"config": config, "finetune": raw, "tracking_uri": uri, "experiment_id": experiment,
                 "parent_run_id": parent.info.run_id, "mlflow_client_env": tracking.client_env()}  # fmt: skip
        # the trial itself only waits; its task holds trial_cpus / trial_gpus (see `trial`)
        # no CPU for the waiting trial itself (Tune needs some resource: 1 byte of memory), so that a trial costs
        # exactly trial_cpus: with 0.01 here, trial_cpus=1 on 2 CPUs left 0.99 and the 1-CPU data tasks never ran
        trainable = tune.with_resources(tune.with_parameters(trial, setup=setup), {"cpu": 0, "memory": 1})
        tuner = tune.Tuner(
            trainable,
            param_space={"num_negatives": tune.grid_search(list(config.num_negatives)),
                         "mixture": tune.grid_search(list(config.mixtures)),
                         "setting": tune.grid_search(settings(config))},  # fmt: skip
            tune_config=tune.TuneConfig(metric="score", mode=config.mode,
                                        max_concurrent_trials=config.max_concurrent_trials),  # fmt: skip
            run_config=tune.RunConfig(name=config.name, storage_path=storage, verbose=0),
        )
        grid = tuner.fit()
        trials = []
        for result in grid:
            entry = {"num_negatives": result.config["num_negatives"], "mixture": result.config["mixture"],
                     "setting": dict(result.config["setting"]),
                     "score": (result.metrics or {}).get("score"),
                     "test_score": (result.metrics or {}).get("test_score"),
                     "mlflow_run_id": (result.metrics or {}).get("mlflow_run_id"),
                     "error": None if result.error is None else f"{type(result.error).__name__}: {result.error}"}
            trials.append(entry)
        mlflow.log_metric("ablate/failed_trials", sum(t["error"] is not None for t in trials))
        done = [t for t in trials if t["score"] is not None]
        if not done:
            raise RuntimeError(f"every ablation trial failed: {[t['error'] for t in trials]}")
        best = (max if config.mode == "max" else min)(done, key=lambda t: t["score"])
        best = {**best, "source_weights": config.mixtures[best["mixture"]]}
        mlflow.set_tags({"best_trial": trial_name(best["num_negatives"], best["mixture"], best["setting"]),
                         "selected_on": "validation",
                         "best_num_negatives": str(best["num_negatives"]), "best_mixture": best["mixture"],
                         "best_mlflow_run_id": str(best["mlflow_run_id"]), "metric": config.metric})  # fmt: skip
        mlflow.log_metric("ablate/best_score", best["score"])
        if best["test_score"] is not None:  # reported beside the choice, never used for it
            mlflow.log_metric("ablate/best_test_score", best["test_score"])
            mlflow.set_tag("report_metric", config.report_metric)
        print(f"[ablate] {len(done)}/{len(trials)} trials finished; best {config.metric} = {best['score']:.4f} "
              f"with {trial_name(best['num_negatives'], best['mixture'], best['setting'])}")  # fmt: skip
        for t in sorted(done, key=lambda t: t["score"], reverse=config.mode == "max"):
            test = f" (test {config.report_metric} {t['test_score']:.4f})" if t["test_score"] is not None else ""
            print(f"[ablate]   {trial_name(t['num_negatives'], t['mixture'], t['setting'])}: {t['score']:.4f}{test}")
        return {"best": best, "metric": config.metric, "trials": trials, "parent_run_id": parent.info.run_id,
                "experiment_id": experiment}


def main(argv: list[str] | None = None) -> None:
    from ops.config import cli

    run(cli(AblateConfig, "Ray Tune ablation over hard negatives, dataset mixtures and fine-tuning settings", argv))


if __name__ == "__main__":
    main()
