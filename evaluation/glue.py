"""GLUE fine-tuning of a masked-LM checkpoint with the sequence-classification head (spec §1.5, §4 GLUE row).

The MosaicBERT recipe: seq 128, 10 epochs, AdamW (0.9, 0.98) eps 1e-6 wd 1e-6, 6% linear warmup then linear
decay; a sweep of batch size x lr, several seeds per point; a task's score is the best sweep point's median
over seeds (on the dev set, since GLUE test labels are private). Each trial can run as a Ray Tune trial.
"""

from __future__ import annotations

import csv
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evaluation.data import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GlueTask:
    name: str
    folder: str  # the official GLUE folder name
    hub_config: str
    num_labels: int  # 1 = regression
    metrics: tuple[str, ...]  # the first is the headline
    dev_file: str = "dev.tsv"
    hub_dev_split: str = "validation"
    label_names: tuple[str, ...] = ()  # string labels of the official TSVs, in id order


TASKS = {
    "cola": GlueTask("cola", "CoLA", "cola", 2, ("matthews",)),
    "sst2": GlueTask("sst2", "SST-2", "sst2", 2, ("accuracy",)),
    "mrpc": GlueTask("mrpc", "MRPC", "mrpc", 2, ("f1", "accuracy")),
    "stsb": GlueTask("stsb", "STS-B", "stsb", 1, ("spearman", "pearson")),
    "qqp": GlueTask("qqp", "QQP", "qqp", 2, ("f1", "accuracy")),
    "mnli": GlueTask("mnli", "MNLI", "mnli", 3, ("accuracy",), "dev_matched.tsv", "validation_matched",
                     ("entailment", "neutral", "contradiction")),  # fmt: skip
    "qnli": GlueTask("qnli", "QNLI", "qnli", 2, ("accuracy",), label_names=("entailment", "not_entailment")),
    "rte": GlueTask("rte", "RTE", "rte", 2, ("accuracy",), label_names=("entailment", "not_entailment")),
}
ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "sts": "stsb"}
FROM_MNLI = ("rte", "mrpc", "stsb")  # may start from the MNLI-fine-tuned checkpoint (reference recipe)
_FIRST = ("sentence", "sentence1", "#1 String", "question", "question1")
_SECOND = ("sentence2", "#2 String", "question2")
_LABEL = ("label", "Quality", "score", "is_duplicate", "gold_label")


@dataclass
class GlueConfig:
    """The fine-tuning recipe; defaults are the reference (MosaicBERT) recipe."""

    tasks: list[str] = field(default_factory=list)
    data_dir: str | None = None  # folders SST-2/, MRPC/, ... with train.tsv + dev.tsv; None = the Hub
    max_length: int = 128
    epochs: int = 10
    batch_sizes: list[int] = field(default_factory=lambda: [16, 32])
    learning_rates: list[float] = field(default_factory=lambda: [1e-5, 2e-5, 3e-5])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    weight_decay: float = 1e-6
    warmup_ratio: float = 0.06
    max_train_examples: int | None = None  # slices, for smoke tests
    max_eval_examples: int | None = None
    mnli_checkpoint: str | None = None  # start RTE / MRPC / STS-B from this MNLI-fine-tuned encoder
    use_tune: bool = False  # run the sweep as Ray Tune trials
    trial_cpus: float = 1.0
    trial_gpus: float = 0.0


@dataclass
class Examples:
    first: list[str]
    second: list[str] | None
    labels: list[float]


def task_spec(name: str) -> GlueTask:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[key]


def _pick(header: list[str], candidates: tuple[str, ...]) -> str | None:
    return next((c for c in candidates if c in header), None)


def read_tsv(file: Path, task: GlueTask, limit: int | None = None) -> Examples:
    """An official GLUE TSV (header row; CoLA has none) or the STS pairs layout -> examples."""
    if not file.is_file():
        raise DataError(f"{file}: missing GLUE file for {task.name}")
    with file.open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise DataError(f"{file}: empty")
    if task.name == "cola":  # no header: source, label, original label, sentence
        header, body = ["source", "label", "original", "sentence"], rows
    else:
        header, body = rows[0], rows[1:]
    first, second, label = _pick(header, _FIRST), _pick(header, _SECOND), _pick(header, _LABEL)
    if first is None or label is None:
        raise DataError(f"{file}: header {header} has no text column {_FIRST} or label column {_LABEL}")
    columns = {name: i for i, name in enumerate(header)}
    out = Examples([], [] if second else None, [])
    for number, row in enumerate(body[:limit] if limit else body, 2):
        if len(row) < len(header):
            raise DataError(f"{file}: line {number} has {len(row)} fields; the header has {len(header)}")
        raw = row[columns[label]]
        if task.label_names and raw in task.label_names:
            value = float(task.label_names.index(raw))
        else:
            try:
                value = float(raw)
            except ValueError:
                raise DataError(f"{file}: line {number} has label {raw!r}") from None
        out.first.append(row[columns[first]])
        if second:
            out.second.append(row[columns[second]])
        out.labels.append(value)
    return out


def local_folder(data_dir: Path, task: GlueTask) -> Path:
    """``<data_dir>/<GLUE name>``; STS-B also from a sibling ``stsb/`` folder (the shared data layout)."""
    for candidate in (data_dir / task.folder, data_dir.parent / "stsb" if task.name == "stsb" else None):
        if candidate is not None and (candidate / "train.tsv").is_file():
            return candidate
    raise DataError(f"{data_dir / task.folder}: no train.tsv for GLUE {task.name}")


def load_task(task: GlueTask, data_dir: str | None, max_train: int | None,
              max_eval: int | None) -> tuple[Examples, Examples]:  # fmt: skip
    if data_dir is not None:
        from ops.io import local_copy

        folder = local_folder(Path(local_copy(data_dir)), task)  # a local folder, or s3:// / gs:// copied
        return read_tsv(folder / "train.tsv", task, max_train), read_tsv(folder / task.dev_file, task, max_eval)
    from datasets import load_dataset

    hub = load_dataset("nyu-mll/glue", task.hub_config)

    def convert(split: str, limit: int | None) -> Examples:
        rows = hub[split] if limit is None else hub[split].select(range(min(limit, len(hub[split]))))
        names = rows.column_names
        first, second = _pick(names, ("sentence", "sentence1", "question", "question1", "premise")), _pick(
            names, ("sentence2", "question2", "hypothesis"))  # fmt: skip
        if task.name == "qnli":
            first, second = "question", "sentence"
        return Examples(list(rows[first]), list(rows[second]) if second else None, [float(x) for x in rows["label"]])

    return convert("train", max_train), convert(task.hub_dev_split, max_eval)


def task_metrics(task: GlueTask, labels: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
    """The metrics GLUE defines for the task (Matthews for CoLA, F1+accuracy for MRPC/QQP, Pearson/Spearman
    for STS-B, accuracy otherwise)."""
    from scipy.stats import pearsonr, spearmanr

    if task.num_labels == 1:
        return {"spearman": float(spearmanr(labels, outputs).statistic),
                "pearson": float(pearsonr(labels, outputs).statistic)}  # fmt: skip
    predictions = outputs.argmax(-1)
    labels = labels.astype(int)
    scores = {"accuracy": float((predictions == labels).mean())}
    tp, tn = float(((predictions == 1) & (labels == 1)).sum()), float(((predictions == 0) & (labels == 0)).sum())
    fp, fn = float(((predictions == 1) & (labels == 0)).sum()), float(((predictions == 0) & (labels == 1)).sum())
    scores["f1"] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0  # positive class 1, as GLUE's MRPC/QQP F1
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    scores["matthews"] = (tp * tn - fp * fn) / denominator if denominator else 0.0
    return {k: scores[k] for k in task.metrics}


def _batches(tokenizer, examples: Examples, order: list[int], batch_size: int, max_length: int):
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        first = [examples.first[i] for i in rows]
        second = [examples.second[i] for i in rows] if examples.second is not None else None
        encoded = tokenizer(first, second, truncation=True, max_length=max_length, padding=True,
                            return_tensors="pt", return_token_type_ids=True)  # fmt: skip
        yield encoded, torch.tensor([examples.labels[i] for i in rows])


def finetune(model_source: str, task: GlueTask, train: Examples, dev: Examples, batch_size: int, lr: float,
             seed: int, config: GlueConfig, device: str | None = None) -> dict[str, float]:  # fmt: skip
    """One fine-tuning trial -> the task's dev metrics after the last epoch."""
    from nomicbert.checkpoint import load_model
    from nomicbert.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(model_source, kind="classifier", num_labels=task.num_labels).to(device)
    tokenizer = load_tokenizer(model_source if Path(model_source).is_dir() else None)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.98), eps=1e-6)  # fmt: skip
    steps = config.epochs * math.ceil(len(train.labels) / batch_size)
    warmup = max(1, int(config.warmup_ratio * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: s / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
    generator = torch.Generator().manual_seed(seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(train.labels), generator=generator).tolist()
        for encoded, labels in _batches(tokenizer, train, order, batch_size, config.max_length):
            with autocast:
                loss, _ = model(encoded["input_ids"].to(device), encoded["attention_mask"].to(device),
                                labels.to(device), encoded["token_type_ids"].to(device))  # fmt: skip
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
    model.eval()
    outputs = []
    with torch.inference_mode(), autocast:
        for encoded, _ in _batches(tokenizer, dev, list(range(len(dev.labels))), 64, config.max_length):
            _, logits = model(encoded["input_ids"].to(device), encoded["attention_mask"].to(device),
                              token_type_ids=encoded["token_type_ids"].to(device))  # fmt: skip
            outputs.append(logits.float().cpu())
    result = torch.cat(outputs).numpy()
    return task_metrics(task, np.asarray(dev.labels), result[:, 0] if task.num_labels == 1 else result)


def _sweep_points(config: GlueConfig) -> list[dict[str, Any]]:
    return [{"batch_size": b, "lr": lr, "seed": s} for b in config.batch_sizes for lr in config.learning_rates
            for s in config.seeds]  # fmt: skip


def _run_trials_tune(model_source: str, task: GlueTask, train: Examples, dev: Examples,
                     config: GlueConfig) -> list[tuple[dict[str, Any], dict[str, float]]]:  # fmt: skip
    import tempfile

    import ray
    from ray import tune

    def trial(point: dict[str, Any], train: Examples, dev: Examples) -> None:
        scores = finetune(model_source, task, train, dev, point["batch_size"], point["lr"], point["seed"], config)
        tune.report(scores)

    if not ray.is_initialized():
        ray.init()
    points = _sweep_points(config)
    space = {key: tune.grid_search(sorted({p[key] for p in points})) for key in ("batch_size", "lr", "seed")}
    trainable = tune.with_resources(tune.with_parameters(trial, train=train, dev=dev),
                                    {"cpu": config.trial_cpus, "gpu": config.trial_gpus})  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="glue-tune-") as storage:
        run_config = tune.RunConfig(name=f"glue-{task.name}", storage_path=storage, verbose=0)
        tuner = tune.Tuner(trainable, param_space=space, run_config=run_config)
        grid = tuner.fit()
        if grid.errors:
            raise RuntimeError(f"GLUE {task.name}: {len(grid.errors)} Tune trial(s) failed: {grid.errors[0]}")
        return [({k: r.config[k] for k in ("batch_size", "lr", "seed")}, {m: r.metrics[m] for m in task.metrics})
                for r in grid]  # fmt: skip


def evaluate_glue(model_source: str, config: GlueConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Every task in ``config.tasks`` -> (metrics ``glue/<task>/<metric>`` + ``glue/avg_main_metric``, the mean of
    each task's main (first) metric, chosen sweep points)."""
    metrics: dict[str, float] = {}
    chosen: dict[str, Any] = {}
    for name in config.tasks:
        task = task_spec(name)
        train, dev = load_task(task, config.data_dir, config.max_train_examples, config.max_eval_examples)
        source = config.mnli_checkpoint if config.mnli_checkpoint and task.name in FROM_MNLI else model_source
        if config.use_tune:
            trials = _run_trials_tune(source, task, train, dev, config)
        else:
            trials = [(p, finetune(source, task, train, dev, p["batch_size"], p["lr"], p["seed"], config))
                      for p in _sweep_points(config)]  # fmt: skip
        by_point: dict[tuple[int, float], list[dict[str, float]]] = {}
        for point, scores in trials:
            by_point.setdefault((point["batch_size"], point["lr"]), []).append(scores)
        medians = {key: {m: statistics.median(s[m] for s in runs) for m in task.metrics}
                   for key, runs in by_point.items()}  # fmt: skip
        best = max(medians, key=lambda key: medians[key][task.metrics[0]])
        for metric, value in medians[best].items():
            metrics[f"glue/{task.name}/{metric}"] = value
        chosen[f"glue/{task.name}/batch_size"], chosen[f"glue/{task.name}/lr"] = best
        chosen[f"glue/{task.name}/source"] = source
        log.info("GLUE %s: best bs=%d lr=%g -> %s", task.name, best[0], best[1], medians[best])
    if config.tasks:
        main = [metrics[f"glue/{task_spec(t).name}/{task_spec(t).metrics[0]}"] for t in config.tasks]
        metrics["glue/avg_main_metric"] = statistics.mean(main)
    return metrics, chosen
