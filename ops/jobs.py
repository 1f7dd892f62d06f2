"""What every data-preparation job shares: attaching to Ray, the Ray Data context, fingerprints."""

from __future__ import annotations

import functools
import hashlib
import logging

log = logging.getLogger("ops")


def ensure_ray() -> None:
    """Attach to the running Ray (``ray job submit`` sets RAY_ADDRESS; the pipeline may have one already)."""
    import ray

    if not ray.is_initialized():
        ray.init()


def data_context(preserve_order: bool) -> None:
    """Quiet Ray Data; keep input order when asked (reproducible row ids at a small throughput cost)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = preserve_order
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


@functools.lru_cache(maxsize=4)
def tokenizer_fingerprint(source: str | None) -> dict[str, object]:
    """Which vocabulary produced the ids: a trainer refuses data made with another one."""
    from nomicbert.tokenizer import load_tokenizer

    tok = load_tokenizer(source)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    digest = hashlib.sha256("\n".join(t for t, _ in vocab).encode()).hexdigest()[:16]
    return {"source": source or "bert-base-uncased (offline vocab)", "vocab_size": len(vocab), "vocab_sha256": digest,
            "lowercase": True}  # fmt: skip


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
