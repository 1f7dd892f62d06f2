"""MLM data job: raw text -> tokenized -> packed ``row_length`` rows -> ``mlm-data/`` (spec §4).

    python -m ops.mlm_data --config workflows/configs/mlm_data.yaml [key=value ...]
    ray job submit --working-dir . -- python -m ops.mlm_data --config workflows/configs/mlm_data.yaml

Read (one task per file) -> `Tokenize` -> `Pack` run fused as one Ray Data task per batch of ``docs_per_pack``
documents; the reference packs per batch of 1000 documents and drops each batch's remainder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ops import io
from ops.config import cli, fingerprint, to_dict
from ops.jobs import data_context, ensure_ray, log, setup_logging, tokenizer_fingerprint
from ops.pack import Pack
from ops.readers import SourceConfig, preflight, read_sources
from ops.tokenize import Tokenize


@dataclass
class MlmDataConfig:
    sources: list[SourceConfig]
    output: str  # local folder, s3:// or gs://
    tokenizer: str | None = None  # None: offline bert-base-uncased (nomicbert.tokenizer.load_tokenizer)
    row_length: int = 2048
    docs_per_pack: int = 1000  # documents concatenated per packing batch (reference: datasets.map default 1000)
    max_doc_chars: int = 5_000_000  # longer documents are quarantined as "too_long" (Moby-Dick is 1.2M)
    num_cpus: float = 1.0  # logical CPUs per read and per tokenize+pack task
    resources: dict[str, float] = field(default_factory=dict)  # custom resources per task, e.g. {data_node: 1}
    workers: int | None = None  # at most this many tokenize+pack tasks at once (None: as many as CPUs allow)
    preserve_order: bool = True  # rows in input order (reproducible); false is a little faster
    overwrite: bool = False
    extra: dict[str, str] = field(default_factory=dict)  # free-form notes copied into the manifest

    def __post_init__(self) -> None:
        if self.row_length < 2:
            raise ValueError(f"row_length must be at least 2, got {self.row_length}")
        if self.docs_per_pack < 1:
            raise ValueError(f"docs_per_pack must be positive, got {self.docs_per_pack}")
        if self.num_cpus <= 0:
            raise ValueError(f"num_cpus must be positive, got {self.num_cpus}")


def tokenize_and_pack(ds, config: MlmDataConfig, stats_output: str | None = None):
    """Text rows -> packed rows; the operator chain the job and the benchmark share."""
    import ray

    compute = ray.data.TaskPoolStrategy(size=config.workers) if config.workers else None
    return ds.map_batches(Tokenize(config.tokenizer), batch_size=config.docs_per_pack, batch_format="pyarrow",
                          num_cpus=config.num_cpus, compute=compute, resources=config.resources).map_batches(
        Pack(config.row_length, stats_output), batch_size=config.docs_per_pack, batch_format="pyarrow",
        num_cpus=config.num_cpus, compute=compute, resources=config.resources)  # fmt: skip


def pack_stats(output: str) -> dict[str, int]:
    fs, path = io.resolve(io.join(output, io.STATS_DIR, "pack"))
    total = {"pack_batches": 0, "tokens_in": 0, "tokens_out": 0, "tokens_dropped_remainder": 0}
    if fs.get_file_info(path).type == io.pafs.FileType.NotFound:
        return total
    for info in fs.get_file_info(io.pafs.FileSelector(path)):
        with fs.open_input_stream(info.path) as f:
            stats = json.loads(f.read())
        total["pack_batches"] += 1
        for key in ("tokens_in", "tokens_out", "tokens_dropped_remainder"):
            total[key] += stats[key]
    return total


def run(config: MlmDataConfig) -> dict:
    """Run the job (attaching to Ray or starting it) and return the manifest."""
    plans = preflight(config.sources, "text")
    tokenizer = tokenizer_fingerprint(config.tokenizer)
    ensure_ray()
    data_context(config.preserve_order)
    io.prepare_output(config.output, config.overwrite)
    ds = read_sources(config.sources, "text", config.output, config.max_doc_chars, config.num_cpus, plans,
                      config.resources)
    io.write_parts(tokenize_and_pack(ds, config, config.output), config.output, "mlm_data", len(plans))
    rows_out = io.finalize(config.output)
    stats = io.sum_stats(io.collect_stats(config.output))
    packing = pack_stats(config.output)
    io.drop_scratch(config.output)
    manifest = io.write_manifest(config.output, {
        "kind": "mlm-data", "rows_in": stats["rows_in"], "rows_out": rows_out,
        "dropped_by_reason": stats["dropped_by_reason"], "dropped_per_source": stats["dropped_per_source"],
        "rows_per_source": stats["rows_read_per_source"], "rows_unit": {"in": "documents", "out": "packed rows"},
        "row_length": config.row_length, "packing": packing, "tokenizer": tokenizer,
        "config_fingerprint": fingerprint(config), "config": to_dict(config), "input_files": len(plans)})  # fmt: skip
    log.info("mlm-data: %d documents in, %d rows of %d out, dropped %s, remainder tokens dropped %d",
             stats["rows_in"], rows_out, config.row_length, stats["dropped_by_reason"],
             packing["tokens_dropped_remainder"])
    return manifest


def main() -> None:
    setup_logging()
    summary = run(cli(MlmDataConfig, "Tokenize and pack raw text into fixed-length MLM rows"))
    keys = ("rows_in", "rows_out", "dropped_by_reason", "rows_per_source")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))


if __name__ == "__main__":
    main()
