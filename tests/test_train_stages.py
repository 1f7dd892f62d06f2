"""The four stages chained on real data with a tiny model on CPU (Ray Train in-process, real MLflow):
mlm -> contrastive (from the MLM checkpoint) -> finetune and matryoshka (from the contrastive checkpoint)."""

from __future__ import annotations

import json
import os

import mlflow
import numpy as np
import pytest
from train_helpers import make_mlm_data, make_pairs, metric_history, pair_rows, stage_config

from nomicbert.checkpoint import load_model, save_pretrained
from nomicbert.config import tiny
from nomicbert.embed import Embedder
from nomicbert.model import NomicBertModel
from nomicbert.tokenizer import load_tokenizer
from workflows import contrastive, finetune, matryoshka, mlm
from workflows.lineage import manifest_hash

OPTIM_FAST = {"optim.lr": 2e-3, "optim.warmup_steps": 2, "optim.warmup_ratio": 0.0}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, ray_session, shared_data):
    tmp = tmp_path_factory.mktemp("stages")
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    yield tmp
    os.environ.pop("MLFLOW_TRACKING_URI") if previous is None else os.environ.update(MLFLOW_TRACKING_URI=previous)


@pytest.fixture(scope="module")
def mlm_result(workdir, shared_data):
    data = make_mlm_data(shared_data, workdir / "mlm-data", rows=56, row_length=64)  # 8 held out, 48 trained on
    cfg = stage_config(mlm.MLMConfig, "mlm", workdir, data=str(data), output_dir=str(workdir / "ckpt" / "mlm"),
                       model="tiny", model_overrides={}, global_batch=8, micro_batch=4, epochs=2, max_steps=0,
                       **{"run.checkpoint_every": 6, "optim.lr": 5e-3, "validation.rows": 8, "validation.every": 3,
                          "run.row_log": str(workdir / "rows" / "mlm")})  # fmt: skip
    return mlm.run(cfg)


def held_out_and_trained(result: dict, row_log) -> tuple[set[int], list[int]]:
    """The validation rows a run logged (MLflow artifact) and every row id it trained on (the row log)."""
    held = mlflow.artifacts.load_dict(f"runs:/{result['mlflow_run_id']}/validation/held_out.json")
    trained = [r for line in (row_log / "rank-0.jsonl").read_text().splitlines() for r in json.loads(line)["row_ids"]]
    return {r for start, end in held["row_id_ranges"] for r in range(start, end)}, trained


def test_mlm_validation_on_held_out_rows_falls_and_is_never_trained_on(mlm_result, workdir):
    """val/ metrics every 3 steps and at the end, with the step; the held-out rows (the first 8) in no batch."""
    val_loss = metric_history(mlm_result["mlflow_run_id"], "val/mlm_loss")
    val_accuracy = metric_history(mlm_result["mlflow_run_id"], "val/mlm_accuracy")
    assert sorted(val_loss) == sorted(val_accuracy) == [3, 6, 9, 12]
    assert val_loss[12] < val_loss[3] - 0.5, val_loss  # learning, on rows it never saw
    assert all(0 <= a <= 1 for a in val_accuracy.values()), val_accuracy
    assert mlm_result["metrics"]["val/mlm_loss"] == pytest.approx(val_loss[12])  # in Ray Train's metrics too
    held, trained = held_out_and_trained(mlm_result, workdir / "rows" / "mlm")
    assert held == set(range(8)) and mlflow.get_run(mlm_result["mlflow_run_id"]).data.tags["mlm.validation_rows"] == "8"
    assert not held & set(trained) and set(trained) == set(range(8, 56))


def test_mlm_loss_and_accuracy_improve(mlm_result):
    assert mlm_result["steps"] == 12  # 48 rows / 8 per step x 2 epochs
    loss = metric_history(mlm_result["mlflow_run_id"], "mlm/loss")
    accuracy = metric_history(mlm_result["mlflow_run_id"], "mlm/accuracy")
    assert sorted(loss) == list(range(1, 13))
    assert loss[1] > 9.5 and np.mean([loss[s] for s in (10, 11, 12)]) < loss[1] - 1.5, loss
    assert np.mean([accuracy[s] for s in (10, 11, 12)]) > accuracy[1] + 0.015, accuracy  # from ~0: frequent tokens
    for key in ("mlm/lr", "mlm/tokens_per_s", "mlm/grad_norm"):
        assert len(metric_history(mlm_result["mlflow_run_id"], key)) == 12
    run = mlflow.get_run(mlm_result["mlflow_run_id"])
    assert run.info.run_name == "mlm" and run.data.params["optim.betas"] == "(0.9, 0.98)"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"model", "dataset", "loss_curve.png"} <= artifacts
    # a run started on its own says where it came from too: the data it read and the preset it started from
    data_dir = run.data.params["data"]
    assert run.data.tags["lineage.data.mlm-data"] == manifest_hash(data_dir) and run.data.tags["run_kind"] == "stage"
    assert run.data.tags["lineage.checkpoint"] == "tiny" and run.data.tags["lineage.git_commit"]
    out = mlm_result["model"]
    assert {"model.safetensors", "config.json", "hf", "training_state"} <= set(os.listdir(out))
    assert json.loads(open(os.path.join(out, "training_state", "progress.json")).read())["step"] == 12
    load_model(out, kind="mlm")


def retrieval_accuracy(model_dir, rows) -> float:
    """In-batch retrieval: query i must rank its own document first among all documents of the set."""
    embedder = Embedder.from_pretrained(model_dir, device="cpu")
    q = embedder.encode([r["query"] for r in rows], task="search_query")
    d = embedder.encode([r["document"] for r in rows], task="search_document")
    return float(np.mean((q @ d.T).argmax(1) == np.arange(len(rows))))


@pytest.fixture(scope="module")
def contrastive_result(workdir, shared_data, mlm_result):
    # 16 pairs held out in proportion (12 wikipedia, 4 snli): 96 + 32 trained on
    data = make_pairs(pair_rows(shared_data, wiki=108, snli=36), workdir / "pairs", negatives=False)
    cfg = stage_config(contrastive.ContrastiveConfig, "contrastive", workdir, data=str(data),
                       output_dir=str(workdir / "ckpt" / "unsup"), init_checkpoint=mlm_result["model"],
                       global_batch=32, grad_cache_chunk=16, epochs=3,
                       **{**OPTIM_FAST, "validation.rows": 16, "validation.every": 5,
                          "run.row_log": str(workdir / "rows" / "contrastive")})  # fmt: skip
    return contrastive.run(cfg)


def test_contrastive_starts_from_mlm_and_raises_held_out_retrieval(contrastive_result, mlm_result, shared_data):
    assert contrastive_result["steps"] == 12  # (3 wikipedia + 1 snli) single-source batches x 3 epochs
    held_out = [r for r in pair_rows(shared_data, wiki=64, snli=0, skip=108)]
    before, after = retrieval_accuracy(mlm_result["model"], held_out), retrieval_accuracy(contrastive_result["model"], held_out)
    assert after > before + 0.1, (before, after)
    loss = metric_history(contrastive_result["mlflow_run_id"], "contrastive/loss")
    assert loss[1] > loss[12]
    assert os.path.isdir(os.path.join(contrastive_result["model"], "st"))


def test_contrastive_validation_retrieval_on_a_held_out_pair_slice(contrastive_result, workdir):
    """Query -> own document among the 16 held-out pairs every 5 steps and at the end; those pairs in no batch."""
    run_id = contrastive_result["mlflow_run_id"]
    history = {k: metric_history(run_id, f"val/{k}") for k in ("retrieval_accuracy", "mrr", "info_nce_loss")}
    assert all(sorted(h) == [5, 10, 12] for h in history.values()), history
    accuracy, mrr, loss = history["retrieval_accuracy"], history["mrr"], history["info_nce_loss"]
    assert all(0 <= accuracy[s] <= mrr[s] <= 1 and loss[s] > 0 for s in (5, 10, 12))
    assert accuracy[12] > 1 / 16 and loss[12] < loss[5], history  # above chance (1 of 16) and learning
    held, trained = held_out_and_trained(contrastive_result, workdir / "rows" / "contrastive")
    assert held == set(range(12)) | set(range(108, 112))  # the first rows of each source, in proportion
    assert not held & set(trained) and set(trained) == set(range(144)) - held


def test_finetune_with_hard_negatives_from_contrastive(workdir, shared_data, contrastive_result):
    rows = [r for r in pair_rows(shared_data, wiki=0, snli=64)]
    data = make_pairs(rows, workdir / "triplets", negatives=True)
    cfg = stage_config(finetune.FinetuneConfig, "finetune", workdir, data=str(data),
                       output_dir=str(workdir / "ckpt" / "v1"), init_checkpoint=contrastive_result["model"],
                       global_batch=16, num_negatives=1, epochs=2, **OPTIM_FAST)  # fmt: skip
    result = finetune.run(cfg)
    assert result["steps"] == 8
    loss = metric_history(result["mlflow_run_id"], "finetune/loss")
    assert np.isfinite(list(loss.values())).all() and loss[8] < loss[1]


def test_finetune_refuses_rows_with_too_few_negatives_before_training(workdir, shared_data):
    """A short row is found before the first step: counted by Ray Data, or from the mining manifest's guarantee."""
    rows = pair_rows(shared_data, wiki=0, snli=32)
    rows = [{**r, "negatives": r["negatives"] + [rows[i - 1]["document"], rows[i - 2]["document"]]}
            for i, r in enumerate(rows)]  # fmt: skip
    rows[5]["negatives"] = rows[5]["negatives"][:1]
    data = make_pairs(rows, workdir / "short-triplets", negatives=True)
    cfg = stage_config(finetune.FinetuneConfig, "finetune", workdir, data=str(data), global_batch=16, num_negatives=2)
    with pytest.raises(ValueError, match="hold only 1 hard negatives.*min_negatives >= 2"):
        contrastive.build_dataset(cfg)
    (data / "manifest.json").write_text(json.dumps({"min_negatives": 1}))
    with pytest.raises(ValueError, match="hold only 1 hard negatives"):
        contrastive.build_dataset(cfg)
    assert contrastive.build_dataset(stage_config(finetune.FinetuneConfig, "finetune", workdir, data=str(data),
                                                  global_batch=16, num_negatives=1))[1].total_steps > 0


def test_finetune_rejects_bad_combinations(workdir):
    with pytest.raises(ValueError, match="workflows.matryoshka"):
        stage_config(finetune.FinetuneConfig, "finetune", workdir, matryoshka_dims=[64], matryoshka_weights=[1])
    with pytest.raises(ValueError, match="num_negatives: 0"):
        stage_config(contrastive.ContrastiveConfig, "contrastive", workdir, num_negatives=3)
    with pytest.raises(ValueError, match="multiple of the 3 workers"):
        stage_config(contrastive.ContrastiveConfig, "contrastive", workdir, global_batch=64, **{"run.num_workers": 3})
    with pytest.raises(ValueError, match="unknown key"):
        stage_config(mlm.MLMConfig, "mlm", workdir, mask_probability=0.3)


def test_matryoshka_embeddings_work_at_every_dim(workdir, shared_data):
    """A 768-wide (1-layer) encoder trained with the Matryoshka loss serves 768..64 dims through the API."""
    init = workdir / "wide-init"
    save_pretrained(NomicBertModel(tiny(hidden_size=768, num_attention_heads=12, num_hidden_layers=1,
                                        intermediate_size=256)), init, load_tokenizer())  # fmt: skip
    rows = [r for r in pair_rows(shared_data, wiki=0, snli=32, skip=64)]
    data = make_pairs(rows, workdir / "triplets-wide", negatives=True)
    cfg = stage_config(matryoshka.MatryoshkaConfig, "matryoshka", workdir, data=str(data), init_checkpoint=str(init),
                       output_dir=str(workdir / "ckpt" / "v1.5"), global_batch=16, num_negatives=1, epochs=1,
                       matryoshka_dims=[768, 512, 256, 128, 64], matryoshka_weights=[1, 1, 1, 1, 1],
                       **{"run.checkpoint_every": 10, **OPTIM_FAST})  # fmt: skip
    result = matryoshka.run(cfg)
    assert result["steps"] == 2
    embedder = Embedder.from_pretrained(result["model"], device="cpu")
    assert embedder.config.embedding_recipe == "v1.5"
    texts = [r["query"] for r in rows[:5]]
    for dim in (768, 512, 256, 128, 64):
        vectors = embedder.encode(texts, task="classification", dim=dim)
        assert vectors.shape == (5, dim) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
