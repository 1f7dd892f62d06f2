"""A real multi-node Ray cluster on this machine: data -> mlm -> contrastive through the pipeline, data operators on
the "data" node type, Ray Train workers spread over the two "gpu" nodes, every row read once per epoch.

`ray.cluster_utils.Cluster` starts one raylet per node (a head with no CPUs for tasks, one data node, two gpu
nodes); the custom resources `data_node` and `gpu_node` are the ones cluster.yaml gives its node types, standing
in here for the node types (and for the GPUs). Storage (outputs, Ray Train checkpoints, MLflow's artifacts) is a
temporary folder, MLflow a real tracking server (as on a cluster), which every node of this one-machine cluster sees, as a shared mount or s3:// would be on a real
one. Runs in its own pytest process (marker ``cluster``); it shuts down only its own cluster, never `ray stop`.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from mlflow_server import free_port, mlflow_server

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parent.parent
WORKERS = 4


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.skip("another Ray is attached to this process; run the cluster tests in their own pytest process")
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True,
                                                          "dashboard_port": None})  # fmt: skip
    data = nodes.add_node(num_cpus=2, resources={"data_node": 2}, object_store_memory=400 * 2**20)
    gpus = [nodes.add_node(num_cpus=1, resources={"gpu_node": 2}, object_store_memory=200 * 2**20) for _ in range(2)]
    try:
        ray.init(address=nodes.address, log_to_driver=False, logging_level="WARNING")
        nodes.wait_for_nodes()
        yield {"data": data.node_id, "gpu": {n.node_id for n in gpus}}
    finally:
        ray.shutdown()
        nodes.shutdown()


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """A real `mlflow server`: a sqlite file on the driver's node is refused once work runs on other nodes."""
    state = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
               f"sqlite:///{state / 'mlflow.db'}", "--artifacts-destination", str(state / "artifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    with mlflow_server(command, port, log=state / "server.log") as url:
        yield url


def pipeline_config(tmp: Path, shared: Path):
    from ops.config import load_config
    from workflows.pipeline import PipelineConfig

    on_data, on_gpu = "resources={data_node: 1}", "run.worker_resources={gpu_node: 1}"
    trainer = [f"run.num_workers={WORKERS}", "run.cpus_per_worker=0.25", on_gpu, "run.data_resources={data_node: 1}",
               "run.log_every=1", "run.max_failures=0", "epochs=1",
               "validation.rows=0"]  # fmt: skip  (every row trained on: the row-count checks below)
    raw = {
        "name": "multinode-test", "storage": str(tmp / "out"), "experiment": "multinode-test",
        "stages": {
            "mlm_data": {"config": str(ROOT / "workflows/configs/mlm_data.yaml"), "overrides": [
                f"sources.0.path={shared}/mlm_corpus/wikipedia_en_sample.txt", "sources.0.max_rows_per_file=60",
                f"sources.1.path={shared}/mlm_corpus/gutenberg/austen-emma.txt",
                f"sources.2.path={shared}/mlm_corpus/wikitext2_raw/wiki.test.raw", "sources.2.max_rows_per_file=50",
                "row_length=128", on_data]},
            "mlm": {"config": str(ROOT / "workflows/configs/mlm.yaml"), "overrides": [
                *trainer, "model_overrides={hidden_size: 32, num_attention_heads: 2, intermediate_size: 64}",
                "global_batch=16", "micro_batch=2", "max_steps=0", "run.checkpoint_every=50",
                f"run.row_log={tmp / 'rows' / 'mlm'}"]},
            "pair_data": {"config": str(ROOT / "workflows/configs/pair_data.yaml"), "overrides": [
                "consistency_filter=false", on_data,
                *(f"sources.{i}.path={shared}/pairs/{name}" for i, name in
                  enumerate(("snli_pairs.jsonl", "stackexchange_pairs.jsonl", "wiki_title_lead.jsonl"))),
                *(f"sources.{i}.max_rows_per_file=40" for i in range(3))]},
            "contrastive": {"config": str(ROOT / "workflows/configs/contrastive.yaml"), "overrides": [
                *trainer, "global_batch=16", "grad_cache_chunk=8", "max_steps=0", "run.checkpoint_every=50",
                f"run.row_log={tmp / 'rows' / 'contrastive'}"]},
        },
    }  # fmt: skip
    return load_config(PipelineConfig, raw=raw)


def rows_by_step(folder: Path) -> dict[int, dict[int, list[int]]]:
    steps: dict[int, dict[int, list[int]]] = defaultdict(dict)
    for rank in range(WORKERS):
        for line in (folder / f"rank-{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            steps[record["step"]][rank] = record["row_ids"]
    return steps


def test_data_mlm_contrastive_on_a_multi_node_cluster(cluster, tracking_server, tmp_path, shared_data):
    from ray.util.state import list_actors, list_tasks

    from workflows.pipeline import run as run_pipeline

    os.environ["MLFLOW_TRACKING_URI"] = tracking_server
    try:
        done = run_pipeline(pipeline_config(tmp_path, shared_data))
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)

    # every Ray Train worker ran on a gpu node, and both gpu nodes were used
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=1000, detail=True)
    assert len(workers) == 2 * WORKERS and {w.node_id for w in workers} == cluster["gpu"], workers
    # every data operator (reading, tokenizing, packing, batching, masking, prefixes) ran on the data node
    # (Ray Data's own parquet footer reads, FooterReader, take no remote args and may run anywhere)
    operators = ("ReadFiles", "ReadParquet", "Tokenize", "Pack", "AssignBatches", "MaskTokens", "AddPrefixes")
    tasks = [t for t in list_tasks(limit=10000, detail=True)
             if any(op in t.name for op in operators) and "FooterReader" not in t.name]  # fmt: skip
    names = {t.name for t in tasks}
    assert all(any(op in n for n in names) for op in ("Tokenize", "AssignBatches", "MaskTokens", "AddPrefixes"))
    elsewhere = {(t.name, t.node_id) for t in tasks if t.node_id and t.node_id != cluster["data"]}
    assert not elsewhere and any(t.node_id == cluster["data"] for t in tasks), elsewhere

    for stage, rows in (("mlm", done["mlm_data"]["rows_out"]), ("contrastive", None)):
        steps = rows_by_step(tmp_path / "rows" / stage)
        assert sorted(steps) == list(range(1, done[stage]["steps"] + 1))
        seen = [r for ranks in steps.values() for rank in range(WORKERS) for r in ranks[rank]]
        assert len(seen) == len(set(seen)) == 16 * done[stage]["steps"]  # each row once in the epoch, 4 workers
        if rows is not None:
            assert len(seen) == rows - rows % 16  # all rows but the last incomplete global batch
    assert Path(done["contrastive"]["model"], "st").is_dir()
