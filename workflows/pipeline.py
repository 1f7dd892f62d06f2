"""The main job: the whole Nomic Embed chain, resumable stage by stage, under one MLflow parent run.

    python -m workflows.pipeline --config workflows/configs/demo.yaml [--verbose]  # make demo: local Ray + sqlite
    ray job submit --working-dir . -- python -m workflows.pipeline --config workflows/configs/pipeline_8gpu.yaml

mlm_data -> mlm -> pair_data -> contrastive -> mine_negatives -> finetune, matryoshka -> evaluate (a trainer may
start from another earlier trainer's model instead: ``init_from``). Every stage reads its own YAML
(``stages.<name>.config`` + ``overrides``); the pipeline only wires folders under one
``storage`` root (a local folder, a shared mount, or ``s3://`` / ``gs://``, all through pyarrow filesystems): each
stage writes ``<storage>/<stage>``, Ray Train keeps checkpoints in ``<storage>/ray_results``, and the pipeline its
state in ``<storage>/pipeline_state.json``. A stage whose fingerprint (its config + the fingerprints of
the stages it reads) matches its last finished run is skipped on restart; change a config and that stage and
everything downstream runs again. A failing stage stops the job, prints its error in full, names itself and keeps
earlier outputs. The console shows stage, progress and warning lines (`ops.console`); everything else goes to
``<storage>/logs/`` and Ray's session logs (``--verbose`` shows it all). In MLflow the experiment opens on its
runs (model-training view), and every run carries ``run_kind`` and ``lineage.*`` tags (`workflows.lineage`).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation.report import experiment_id, log_evaluation_table, log_loss_curves, run_look, ui_path
from ops import console, io
from ops.config import (ConfigError, apply_overrides, arg_parser, fingerprint, flatten, from_dict, load_config,
                        read_yaml)
from ops.console import SHOW, format_duration
from workflows import lineage

log = logging.getLogger("workflows.pipeline")
STATE_FILE = "pipeline_state.json"
LOGS_DIR = "logs"
PARENT_NOTE = ("The whole pipeline: one nested run per stage (data sets in grey, trainers in blue, the evaluate stage "
               "in green with one `eval <model>` run per scored model). Artifacts: `loss_curves.png` (every "
               "trainer), `evaluation_table.md`/`evaluation_table.json` and `score_vs_dim.png`. Tags `lineage.*` say "
               "where each run came from.")  # fmt: skip


@dataclass
class StageRef:
    config: str  # the stage's YAML (relative to the working directory)
    overrides: list[str] = field(default_factory=list)  # key=value on top of it
    enabled: bool = True
    init_from: str | None = None  # a trainer: start from this earlier trainer's model instead of the recipe's


@dataclass
class RayConfig:
    address: str | None = None  # None: RAY_ADDRESS (set by `ray job submit`) or a local Ray; "local": always a new one
    num_cpus: int | None = None  # local Ray only
    object_store_mb: int | None = 512  # local Ray only


@dataclass
class PipelineConfig:
    name: str
    storage: str  # the root of every output: a local folder, a mount every node sees, or s3:// / gs://
    experiment: str
    stages: dict[str, StageRef]
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass(frozen=True)
class Stage:
    """One step: which module runs it, which config class it reads, and how its inputs are wired."""

    name: str
    module: str  # has ``run(config) -> dict`` and a config dataclass
    config_class: str
    reads: tuple[str, ...]  # upstream stages whose outputs this one consumes
    wire: Callable[[dict[str, Any], str, dict[str, dict[str, Any]]], dict[str, Any]]
    optional: tuple[str, ...] = ()  # upstream stages used when enabled; else the stage's own config says where
    init_stage: str | None = None  # a trainer: whose model it starts from when that stage runs (the recipe's chain)


def _output(name: str) -> Callable:
    def wire(raw: dict[str, Any], out: str, done: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {**raw, "output": io.join(out, name)}

    return wire


def _wire_trainer(name: str, data_stage: str) -> Callable:
    """Input data from upstream; Ray Train state under the pipeline's folder with a stable run name, so a
    restarted pipeline resumes a half-finished trainer from its last checkpoint. (The init checkpoint is wired by
    `stage_config`.)"""

    def wire(raw: dict[str, Any], out: str, done: dict[str, dict[str, Any]]) -> dict[str, Any]:
        raw = {**raw, "data": done[data_stage]["output"], "output_dir": io.join(out, name, "model")}
        raw["run"] = {**raw.get("run", {}), "storage_path": io.join(out, "ray_results"), "name": name}
        return raw

    return wire


EMBEDDING_CACHE = "embedding_cache"  # raw embeddings the mining teacher and the evaluation share (ops.embedding_cache)


def embedding_cache(out: str) -> dict[str, str]:
    """The shared embedding cache's setting: a folder under a local storage root (none under s3:// / gs://)."""
    return {} if io.is_remote(out) else {"embedding_cache": io.join(out, EMBEDDING_CACHE)}


def _wire_mining(raw: dict[str, Any], out: str, done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    raw = {**raw, "output": io.join(out, "mine_negatives")}
    raw["teacher"] = {**embedding_cache(out), **raw.get("teacher", {})}
    if "beir_split" in done:  # the first source mines the split's train queries against the whole corpus
        split = done["beir_split"]["output"]
        first = {**raw["sources"][0], "path": io.join(split, "train.jsonl")}
        raw["sources"] = [first, *raw["sources"][1:]]
        raw["corpora"] = {**raw.get("corpora", {}), first["name"]: io.join(split, "corpus.jsonl")}
    return raw


def _wire_baseline(raw: dict[str, Any], out: str, done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    split = done["beir_split"]["output"]
    return {**raw, "data": io.join(split, "train.jsonl"), "output_dir": io.join(out, "st_baseline")}


def _wire_evaluate(raw: dict[str, Any], out: str, done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    models = {name: done[name]["model"] for name in ("contrastive", "finetune", "matryoshka") if name in done}
    if "st_baseline" in done:
        raw = {**raw, "baselines": {**raw.get("baselines", {}), "st_mnrl": done["st_baseline"]["model"]}}
    if "beir_split" in done:  # the held-out validation queries, scored beside the test set
        split = done["beir_split"]
        held_out = f"{split.get('validation_task', 'validation')}={io.join(split['output'], 'validation')}"
        raw = {**raw, "beir": [*raw.get("beir", []), held_out]}
    raw = {**embedding_cache(out), **raw, "models": {**models, **raw.get("models", {})},
           "output": io.join(out, "evaluate")}  # fmt: skip
    if "mlm" in done and raw.get("glue", {}).get("tasks"):
        raw["glue_model"] = done["mlm"]["model"]
    if "matryoshka" in done and raw.get("dims"):
        raw.setdefault("dims_models", ["matryoshka"])
    # each scored checkpoint this pipeline trained gets the lineage of the stage that trained it
    trained = trained_models(done)
    scored = {**raw["models"], **({"glue": raw["glue_model"]} if raw.get("glue_model") else {})}
    raw["lineage"] = {label: trained[str(path)] for label, path in scored.items() if str(path) in trained}
    return raw


def trained_models(done: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    """{model folder: the lineage its trainer handed downstream} for the trainers finished so far."""
    return {str(result["model"]): result["lineage"] for result in done.values() if "model" in result}


STAGES = (
    Stage("mlm_data", "ops.mlm_data", "MlmDataConfig", (), _output("mlm_data")),
    Stage("mlm", "workflows.mlm", "MLMConfig", ("mlm_data",), _wire_trainer("mlm", "mlm_data")),
    Stage("pair_data", "ops.pair_data", "PairDataConfig", (), _output("pair_data")),
    Stage("contrastive", "workflows.contrastive", "ContrastiveConfig", ("pair_data", "mlm"),
          _wire_trainer("contrastive", "pair_data"), init_stage="mlm"),
    Stage("beir_split", "evaluation.beir_split", "BeirSplitConfig", (), _output("beir_split")),
    Stage("mine_negatives", "ops.mine_negatives", "MineNegativesConfig", (), _wire_mining, ("beir_split",)),
    Stage("finetune", "workflows.finetune", "FinetuneConfig", ("mine_negatives",),
          _wire_trainer("finetune", "mine_negatives"), ("contrastive",), init_stage="contrastive"),
    Stage("matryoshka", "workflows.matryoshka", "MatryoshkaConfig", ("mine_negatives",),
          _wire_trainer("matryoshka", "mine_negatives"), ("contrastive",), init_stage="contrastive"),
    Stage("st_baseline", "workflows.st_baseline", "StBaselineConfig", ("beir_split",), _wire_baseline),
    Stage("evaluate", "workflows.evaluate", "EvaluateConfig", (),
          _wire_evaluate, ("mlm", "contrastive", "finetune", "matryoshka", "beir_split", "st_baseline")),
)  # fmt: skip
STAGE_NAMES = tuple(stage.name for stage in STAGES)
TRAINERS = ("mlm", "contrastive", "finetune", "matryoshka")  # the stages that export a model another starts from


class StageFailed(RuntimeError):
    """A stage raised: the message names it; outputs of earlier stages are untouched."""


def validate(config: PipelineConfig) -> None:
    unknown = sorted(set(config.stages) - set(STAGE_NAMES))
    if unknown:
        raise ConfigError(f"pipeline: unknown stage(s) {unknown}; stages are {list(STAGE_NAMES)}")
    enabled = {name for name, ref in config.stages.items() if ref.enabled}
    for stage in STAGES:
        if stage.name not in enabled:
            continue
        if not Path(config.stages[stage.name].config).is_file():
            raise ConfigError(f"pipeline: stage {stage.name}: config file {config.stages[stage.name].config} "
                              "does not exist")  # fmt: skip
        missing = [r for r in stage.reads if r not in enabled]
        if missing:
            raise ConfigError(f"pipeline: stage {stage.name} reads {missing}, which are not enabled")
        init_from = config.stages[stage.name].init_from
        if init_from is not None:
            if stage.init_stage is None:
                raise ConfigError(f"pipeline: stage {stage.name}: init_from is for the trainers that start from a "
                                  f"model ({', '.join(s.name for s in STAGES if s.init_stage)})")  # fmt: skip
            earlier = [s.name for s in STAGES[:STAGES.index(stage)] if s.name in TRAINERS and s.name in enabled]
            if init_from not in earlier:
                raise ConfigError(f"pipeline: stage {stage.name}: init_from {init_from!r} is not an enabled "
                                  f"trainer that runs before it (those are {earlier})")  # fmt: skip


def stage_inputs(stage: Stage, ref: StageRef) -> tuple[str, ...]:
    """The upstream stages whose fingerprints and lineage this stage carries: what it reads, what it may read,
    and the trainer it starts from."""
    return stage.reads + stage.optional + ((ref.init_from,) if ref.init_from else ())


def stage_config(stage: Stage, ref: StageRef, out: str, done: dict[str, dict[str, Any]]) -> Any:
    """Read the stage YAML, apply the user's overrides, wire the folders, then validate against its class."""
    module = importlib.import_module(stage.module)
    raw = apply_overrides(read_yaml(ref.config), ref.overrides)
    raw = stage.wire(raw, out, done)
    start = ref.init_from or stage.init_stage
    if start in done:  # else (adapting a published model, say) the stage's own ``init_checkpoint``
        raw["init_checkpoint"] = done[start]["model"]
    return from_dict(getattr(module, stage.config_class), raw, where=f"{ref.config} (stage {stage.name})")


def load_state(out: str) -> dict[str, Any]:
    file = io.join(out, STATE_FILE)
    return json.loads(io.read_text(file)) if io.exists(file) else {"stages": {}}


def save_state(out: str, state: dict[str, Any]) -> None:
    text = json.dumps(state, indent=2, default=str)
    if io.is_remote(out):
        io.write_text(io.join(out, STATE_FILE), text)  # one object PUT: readers see the old or the new state
        return
    tmp = Path(out) / (STATE_FILE + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, Path(out) / STATE_FILE)  # atomic: a crash never leaves half a state file


def start_ray(config: RayConfig) -> None:
    """Attach to ``address`` / RAY_ADDRESS or start a local Ray. Either way every Ray worker process first runs
    `ops.console.setup_ray_worker` (known-harmless messages dropped, routine lines kept to Ray's log files)."""
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"worker_process_setup_hook": "ops.console.setup_ray_worker",
                   "env_vars": console.process_env(console.verbose())}  # fmt: skip
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        context = ray.init(address=address, runtime_env=runtime_env, logging_level=logging.INFO)
    else:  # "local": a new Ray of this job even when another one runs on the machine
        store = config.object_store_mb * 2**20 if config.object_store_mb else None
        # one machine has nothing to preempt, and starting Ray Train's preemption watcher prints a C++ error line
        # about restartable actors (ray-project/ray#53727) that no logger can filter
        runtime_env["env_vars"]["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
        context = ray.init(address=address, num_cpus=config.num_cpus, object_store_memory=store,
                           include_dashboard=False, logging_level=logging.INFO, runtime_env=runtime_env)  # fmt: skip
    cpus = int(ray.cluster_resources().get("CPU", 0))
    where = address if address and address != "local" else "local"
    log.info("[pipeline] Ray: %s, %d CPUs; Ray's own logs: %s", where, cpus,
             Path(context.address_info["session_dir"]) / "logs", extra=SHOW)  # fmt: skip


def tracking_setup(experiment: str) -> str:
    """The tracking URI (``MLFLOW_TRACKING_URI`` or ``sqlite:///<cwd>/mlflow.db``) and the experiment id."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"
    os.environ["MLFLOW_TRACKING_URI"] = uri  # trainers' workers inherit it; mlflow's global would outlive this call
    return experiment_id(experiment)


def enabled_stages(config: PipelineConfig) -> list[Stage]:
    return [s for s in STAGES if s.name in config.stages and config.stages[s.name].enabled]


def run(config: PipelineConfig) -> dict[str, Any]:
    """Run (or resume) every enabled stage; return {stage: its result summary and ``lineage`` tags}."""
    import mlflow

    validate(config)
    out = io.absolute(config.storage)
    fs, root = io.resolve(out)
    fs.create_dir(root, recursive=True)
    state = load_state(out)
    experiment = tracking_setup(config.experiment)
    start_ray(config.ray)
    stages = enabled_stages(config)
    log.info("[pipeline] %s: %d stages (%s), outputs in %s", config.name, len(stages),
             ", ".join(s.name for s in stages), out, extra=SHOW)  # fmt: skip
    parent_id = state.get("parent_run_id")
    if parent_id is None or mlflow.get_run(parent_id).info.experiment_id != experiment:
        parent_id = mlflow.start_run(experiment_id=experiment, run_name=config.name).info.run_id
        mlflow.end_run()
        state = {"stages": {}, "parent_run_id": parent_id}
    done: dict[str, dict[str, Any]] = {}
    fingerprints: dict[str, str] = {}
    with mlflow.start_run(run_id=parent_id):
        mlflow.set_tags({"pipeline": config.name, "storage": out, "mlflow.note.content": PARENT_NOTE,
                         **run_look("pipeline"), **lineage.run_tags("pipeline", fingerprint(config))})  # fmt: skip
        if not state.get("params_logged"):
            mlflow.log_params({f"pipeline.{k}": str(v)[:500] for k, v in flatten(config).items()})
            state["params_logged"] = True
        for number, stage in enumerate(stages, 1):
            ref = config.stages[stage.name]
            stage_cfg = stage_config(stage, ref, out, done)
            upstream_fingerprints = {r: fingerprints.get(r) for r in stage_inputs(stage, ref)
                                     if r in fingerprints or r in stage.reads}  # fmt: skip
            fingerprints[stage.name] = fingerprint({"config": dataclasses.asdict(stage_cfg),
                                                    "upstream": upstream_fingerprints})  # fmt: skip
            if hasattr(stage_cfg, "run") and hasattr(stage_cfg.run, "name"):
                # same config after a crash: Ray Train resumes this run; a changed config starts a fresh one
                stage_cfg.run.name = f"{stage.name}-{fingerprints[stage.name]}"
            upstream = lineage.data_of([done[r]["lineage"] for r in stage_inputs(stage, ref) if r in done])
            start = getattr(stage_cfg, "init_checkpoint", None) or getattr(stage_cfg, "model", None)
            if isinstance(start, str):  # a trainer: the checkpoint (or the preset) it starts from
                upstream.update(lineage.started_from(start, trained_models(done)))
            previous = state["stages"].get(stage.name, {})
            if previous.get("status") == "finished" and previous.get("fingerprint") == fingerprints[stage.name]:
                log.info("[pipeline] %s: finished earlier (fingerprint %s), skipped", stage.name,
                         fingerprints[stage.name], extra=SHOW)  # fmt: skip
                result = previous["result"]
                product = lineage.product(stage.name, result, previous["run_id"], upstream)
            else:
                log.info("[pipeline] %s: started (stage %d of %d)", stage.name, number, len(stages), extra=SHOW)
                result, product = run_stage(stage, stage_cfg, fingerprints[stage.name], upstream, previous, state, out)
            done[stage.name] = {**result, "lineage": product}
        mlflow.set_tags({k: v for stage in done.values() for k, v in stage["lineage"].items()
                         if k.startswith(lineage.DATA_PREFIX)})  # fmt: skip
        summary = json.loads(json.dumps(done, default=str))
        io.write_text(io.join(out, "summary.json"), json.dumps(summary, indent=2))
        mlflow.log_dict(summary, "summary.json")
        log_overview(state, done)
    return done


def run_stage(stage: Stage, stage_cfg: Any, stage_fingerprint: str, upstream: dict[str, str], previous: dict[str, Any],
              state: dict[str, Any], out: str) -> tuple[dict[str, Any], dict[str, str]]:  # fmt: skip
    """One child run named after the stage; the stage's own run function does the work. Returns the stage's
    result and the lineage it hands downstream."""
    import mlflow

    module = importlib.import_module(stage.module)
    started = time.monotonic()
    experiment = mlflow.active_run().info.experiment_id  # the parent's; mlflow would not inherit it
    with mlflow.start_run(experiment_id=experiment, run_name=stage.name, nested=True) as child:
        mlflow.set_tags({"stage": stage.name, **stage_look(stage), **lineage.run_tags("stage", stage_fingerprint,
                                                                                        upstream)})  # fmt: skip
        if previous.get("run_id"):
            mlflow.set_tag("supersedes", previous["run_id"])
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(stage_cfg).items()})
        state["stages"][stage.name] = {"status": "running", "fingerprint": stage_fingerprint, "run_id": child.info.run_id}
        save_state(out, state)
        try:
            result = module.run(stage_cfg) or {}
        except Exception as err:
            state["stages"][stage.name].update(status="failed", error=f"{type(err).__name__}: {err}")
            save_state(out, state)
            mlflow.set_tag("error", f"{type(err).__name__}: {err}"[:5000])
            mlflow.log_text(traceback.format_exc(), "error.txt")
            mlflow.end_run(status="FAILED")
            log.error("[pipeline] %s: failed after %s", stage.name, format_duration(time.monotonic() - started),
                      exc_info=err)  # fmt: skip
            raise StageFailed(f"stage '{stage.name}' failed: {type(err).__name__}: {err}") from err
        result = stage_result(stage, stage_cfg, result)
        product = lineage.product(stage.name, result, child.info.run_id, upstream)
        mlflow.set_tags({k: v for k, v in product.items() if k == lineage.DATA_PREFIX + stage.name})
        mlflow.log_metric("stage_seconds", time.monotonic() - started)
    state["stages"][stage.name] = {"status": "finished", "fingerprint": stage_fingerprint, "run_id": child.info.run_id,
                                   "result": result, "finished_at": datetime.datetime.now().isoformat()}  # fmt: skip
    save_state(out, state)
    log.info("[pipeline] %s: finished in %s%s", stage.name, format_duration(time.monotonic() - started),
             describe(result), extra=SHOW)  # fmt: skip
    return result, product


def stage_look(stage: Stage) -> dict[str, str]:
    """Data stages grey, trainers blue, the evaluate stage green and marked as an evaluation run."""
    if stage.name == "evaluate":
        return run_look("evaluate", evaluation=True)
    return run_look("trainer" if stage.module.startswith("workflows.") else "data")


def describe(result: dict[str, Any]) -> str:
    """What a stage made, for its finish line: rows of a data set, steps and folder of a model."""
    if "model" in result:
        return f": {result.get('steps', '?')} steps, model in {result['model']}"
    if "rows_out" in result:
        return f": {result['rows_out']} rows in {result.get('output')}"
    return ""


def log_overview(state: dict[str, Any], done: dict[str, dict[str, Any]]) -> None:
    """The parent run as the pipeline's front page: every trainer's loss curve in one figure, and the evaluate
    stage's table (also as an MLflow table) and score-vs-dimension figure."""
    import mlflow

    trainers = {name: state["stages"][name]["run_id"] for name, result in done.items()
                if "model" in result and name in state["stages"]}  # fmt: skip
    log_loss_curves(trainers, "loss_curves.png")
    if "evaluate" not in done:
        return
    folder = done["evaluate"]["output"]  # under the storage root: local or a URI
    log_evaluation_table(json.loads(io.read_text(io.join(folder, "results.json"))))
    for name in ("evaluation_table.md", "score_vs_dim.png"):
        if io.exists(io.join(folder, name)):
            mlflow.log_artifact(io.local_copy(io.join(folder, name)))


def stage_result(stage: Stage, stage_cfg: Any, result: dict[str, Any]) -> dict[str, Any]:
    """What downstream stages need: ``output`` (a data folder) or ``model`` (a checkpoint folder)."""
    result = json.loads(json.dumps(result, default=str))
    if hasattr(stage_cfg, "output") and "output" not in result:
        result["output"] = stage_cfg.output
    return result


def main(argv: list[str] | None = None) -> None:
    parser = arg_parser("The whole Nomic Embed pipeline")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's and the libraries' routine log lines (always in the log files)")
    args = parser.parse_args(argv)
    config = load_config(PipelineConfig, args.config, args.overrides)
    log_file = log_folder(config) / f"pipeline-{datetime.datetime.now():%Y%m%d-%H%M%S}.log"
    handlers = console.setup(log_file, args.verbose)
    log.info("[pipeline] full log: %s", log_file, extra=SHOW)
    try:
        done = run(config)
    except StageFailed as err:
        log.error("[pipeline] stopped: %s. Earlier stages' outputs are kept in %s; fix the cause and run the same "
                  "command again to resume. Full log: %s", err, config.storage, log_file)  # fmt: skip
        raise SystemExit(1) from None
    finally:
        console.teardown(handlers)
    print_where_to_look(config, done)


def log_folder(config: PipelineConfig) -> Path:
    """``<storage>/logs`` for a local storage root; ``logs/<pipeline name>`` in the working directory when the
    storage is ``s3://`` / ``gs://`` (a log file is written as it goes, which an object store cannot take)."""
    if io.is_remote(config.storage):
        return Path(LOGS_DIR) / config.name
    return Path(config.storage) / LOGS_DIR


def print_where_to_look(config: PipelineConfig, done: dict[str, Any]) -> None:
    uri = os.environ["MLFLOW_TRACKING_URI"]
    table = io.join(io.absolute(config.storage), "evaluate", "evaluation_table.md")
    if io.exists(table):
        print(io.read_text(table))
    print(f"Done: {', '.join(done)}. Outputs in {config.storage}.")
    print(f"MLflow UI: mlflow ui --backend-store-uri {uri} --port 5000, then open "
          f"http://127.0.0.1:5000/{ui_path(experiment_id(config.experiment))} (the runs of '{config.experiment}'; "
          f"parent run '{config.name}', its stages nested under it)")  # fmt: skip
    print(f"Side-by-side table: python -m evaluation.compare --experiment {config.experiment} --filter beir/")


if __name__ == "__main__":
    main()
