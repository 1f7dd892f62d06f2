"""Small real datasets in the trainers' folder contracts (mlm-data/, pairs/, triplets/), made from ../shared/data
without Ray, and stage configs read from the shipped YAML files with test-sized overrides."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ops.config import load_config

PROJECT = Path(__file__).resolve().parent.parent


def write_folder(folder: Path, table: pa.Table, parts: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    step = -(-table.num_rows // parts)
    for i in range(parts):
        pq.write_table(table.slice(i * step, step), folder / f"part-{i:05d}.parquet")
    (folder / "manifest.json").write_text(json.dumps({"rows_out": table.num_rows, "made_by": "tests/train_helpers"}))
    return folder


def make_mlm_data(shared: Path, folder: Path, rows: int, row_length: int) -> Path:
    """Wikipedia sample articles tokenized with [CLS]/[SEP] and packed back to back into rows (spec §4)."""
    from nomicbert.tokenizer import load_tokenizer

    text = (shared / "mlm_corpus" / "wikipedia_en_sample.txt").read_text()[: rows * row_length * 6]
    docs = [d for d in text.split("\n\n") if d.strip()]
    enc = load_tokenizer()(docs, return_special_tokens_mask=True, return_attention_mask=False)
    ids = np.concatenate([np.asarray(x, np.int32) for x in enc["input_ids"]])
    special = np.concatenate([np.asarray(x, np.int8) for x in enc["special_tokens_mask"]])
    bounds = np.cumsum([len(x) for x in enc["input_ids"]])
    if len(ids) < rows * row_length:
        raise ValueError("not enough text for the requested rows")
    doc_lengths = []
    for r in range(rows):
        start, end = r * row_length, (r + 1) * row_length
        cuts = [start, *bounds[(bounds > start) & (bounds < end)].tolist(), end]
        doc_lengths.append(np.diff(cuts).astype(np.int32).tolist())
    table = pa.table({
        "row_id": pa.array(np.arange(rows), pa.int64()),
        "input_ids": pa.array([ids[r * row_length : (r + 1) * row_length].tolist() for r in range(rows)], pa.list_(pa.int32())),
        "doc_lengths": pa.array(doc_lengths, pa.list_(pa.int32())),
        "special_tokens_mask": pa.array([special[r * row_length : (r + 1) * row_length].tolist() for r in range(rows)],
                                        pa.list_(pa.int8())),
    })  # fmt: skip
    return write_folder(folder, table)


def masked_rows(folder: Path) -> dict[str, np.ndarray]:
    """An mlm-data folder's rows masked (seed 0) as the trainer's Ray Data pipeline hands them over, for running
    `workflows.mlm.train` without Ray."""
    from ops.mask import MaskTokens

    table = pq.read_table(sorted(folder.glob("part-*.parquet"))).to_pydict()
    doc_lengths = np.empty(len(table["row_id"]), dtype=object)
    doc_lengths[:] = table.pop("doc_lengths")  # ragged lists, as Ray Data hands them over
    return MaskTokens(0.3, seed=0)({**{k: np.array(v) for k, v in table.items()}, "doc_lengths": doc_lengths})


def read_jsonl(path: Path, limit: int, skip: int = 0) -> list[dict]:
    with path.open() as f:
        lines = [json.loads(line) for _, line in zip(range(skip + limit), f)]
    return lines[skip:]


def pair_rows(shared: Path, wiki: int, snli: int, skip: int = 0) -> list[dict]:
    """Two real sources: Wikipedia title -> lead paragraph and SNLI premise -> entailment (+ contradiction)."""
    rows = [{"source": "wikipedia", "query": r["query"], "document": r["document"], "query_prefix": "search_query",
             "document_prefix": "search_document", "negatives": []}
            for r in read_jsonl(shared / "pairs" / "wiki_title_lead.jsonl", wiki, skip)]  # fmt: skip
    rows += [{"source": "snli", "query": r["anchor"], "document": r["positive"], "query_prefix": "classification",
              "document_prefix": "classification", "negatives": [r["negative"]]}
             for r in read_jsonl(shared / "pairs" / "snli_triplets.jsonl", snli, skip)]  # fmt: skip
    return rows


def make_pairs(rows: list[dict], folder: Path, negatives: bool) -> Path:
    table = pa.table({
        "row_id": pa.array(range(len(rows)), pa.int64()),
        **{k: pa.array([r[k] for r in rows], pa.string())
           for k in ("source", "query", "document", "query_prefix", "document_prefix")},
    })  # fmt: skip
    if negatives:
        table = table.append_column("negatives", pa.array([r["negatives"] for r in rows], pa.list_(pa.string())))
    return write_folder(folder, table)


def stage_config(cls, name: str, tmp: Path, **overrides):
    """The shipped demo YAML with paths under ``tmp`` and the given overrides (dotted keys). Validation is off
    (``validation.rows=0``: tests count exact rows and steps) unless a test turns it on."""
    base = {"run.storage_path": str(tmp / "ray"), "run.name": f"{name}-test", "run.num_workers": 0,
            "run.log_every": 1, "mlflow.experiment": "train-tests", "validation.rows": 0}  # fmt: skip
    items = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in {**base, **overrides}.items()]
    return load_config(cls, PROJECT / "workflows" / "configs" / f"{name}.yaml", items)


def metric_history(run_id: str, key: str) -> dict[int, float]:
    """MLflow metric per step (the last value logged for a step wins: a resumed run re-logs its replayed steps)."""
    from mlflow import MlflowClient

    history = sorted(MlflowClient().get_metric_history(run_id, key), key=lambda m: m.timestamp)
    return {m.step: m.value for m in history}


def local_mlm_batches(data: Path, batch_rows: int) -> list[dict]:
    """`masked_rows` cut into the trainer's numpy batches of ``batch_rows`` rows."""
    rows = masked_rows(data)
    return [{k: v[i : i + batch_rows] for k, v in rows.items()} for i in range(0, len(rows["row_id"]), batch_rows)]


def poison_gradients(model, steps: set[int]) -> None:
    """Test-only hook: the gradient of one weight becomes inf on the given optimizer steps (1-based; one backward
    per step, i.e. no gradient accumulation)."""
    import torch

    calls = {"n": 0}

    def hook(grad):
        calls["n"] += 1
        return torch.full_like(grad, float("inf")) if calls["n"] in steps else grad

    next(p for p in model.parameters() if p.ndim == 2).register_hook(hook)


def inf_gradient_loop(loop_config: dict) -> dict:
    """A Ray Train worker loop: the masked-LM stage with `poison_gradients` on ``loop_config["inf_steps"]``, and a
    line per attempt in ``loop_config["attempts"]`` (a retry would add one)."""
    from workflows import mlm

    with open(loop_config["attempts"], "a") as f:
        f.write("attempt\n")
    build = mlm.build_model

    def poisoned(cfg):
        model = build(cfg)
        poison_gradients(model, set(loop_config["inf_steps"]))
        return model

    mlm.build_model = poisoned
    try:
        return mlm.train_loop_per_worker(loop_config)
    finally:
        mlm.build_model = build
