"""Contrastive losses on embeddings (as sentence-transformers keeps maths apart from encoding).

- `info_nce`: one-directional query -> document InfoNCE with a fixed logit scale (spec §5, §7).
- `gather_with_grad`: all-gather documents across workers so every query sees the whole global batch.
- `matryoshka_info_nce`: the same loss summed over nested prefixes of a weightless-LayerNorm embedding (v1.5).
- `GradCache`: chunked embedding with cached gradients, so the global batch does not depend on GPU memory.
- `ContrastiveLoss`: the three above wired together as the trainers use them, with `get_config_dict()`.

References: Nomic Embed, arXiv 2402.01613; GradCache, arXiv 2101.06983; Matryoshka Representation
Learning, arXiv 2205.13147.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

LN_EPS = 1e-5  # the v1.5 weightless LayerNorm (spec §7.2), the same as nomicbert.embed.finalize


def info_nce(queries: torch.Tensor, documents: torch.Tensor, logit_scale: float = 50.0, stride: int = 1,
             offset: int = 0) -> torch.Tensor:  # fmt: skip
    """Mean cross-entropy of ``logit_scale * cos(q_i, d_j)`` over all documents, query i's positive at row
    ``(offset + i) * stride``.

    Inputs: ``queries`` [n, H]; ``documents`` [m, H] with ``m >= (offset + n) * stride``. Supervised data lays
    documents out query-major as ``[pos, neg_1..neg_k]`` (``stride = 1 + k``); ``offset`` is the index of the first
    local query in the global batch when documents were gathered from several workers.

    Example::

        q, d = torch.randn(4, 8), torch.randn(4, 8)
        loss = info_nce(q, d)  # query i's positive is document i
    """
    n, m = queries.shape[0], documents.shape[0]
    if m < (offset + n) * stride:
        raise ValueError(f"{m} documents cannot hold the positives of queries {offset}..{offset + n - 1} at stride {stride}")
    scores = logit_scale * F.normalize(queries.float(), dim=-1) @ F.normalize(documents.float(), dim=-1).T  # (n, m)
    labels = (torch.arange(n, device=queries.device) + offset) * stride
    return F.cross_entropy(scores, labels)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every worker's gradient for the gathered rows (an all_reduce, which gloo
    supports), then keeps this worker's slice: each document receives the gradient of every worker's queries."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def distributed() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [n, H] of all workers (rank order) into [world * n, H], differentiable. Every worker must
    pass the same ``n``. The gradient of a worker's rows is the sum over all workers' losses, so with DDP's gradient
    averaging the result equals the gradient of the global-batch mean loss."""
    _, world = distributed()
    return x if world == 1 else _GatherWithGrad.apply(x)


def matryoshka_info_nce(queries: torch.Tensor, documents: torch.Tensor, dims: Sequence[int],
                        weights: Sequence[float] | None = None, logit_scale: float = 50.0, stride: int = 1,
                        offset: int = 0) -> torch.Tensor:  # fmt: skip
    """Weighted SUM over ``dims`` of `info_nce` on the first d features of the weightless LayerNorm (eps 1e-5)
    of the mean-pooled embeddings; each prefix is L2-normalised inside `info_nce` (spec §7.2, v1.5).

    Inputs: pooled (not normalised) ``queries`` [n, H] and ``documents`` [m, H]; ``dims`` each in 1..H.

    Example::

        loss = matryoshka_info_nce(torch.randn(4, 768), torch.randn(4, 768), dims=[768, 512, 256, 128, 64])
    """
    weights = [1.0] * len(dims) if weights is None else list(weights)
    check_dims(dims, weights, queries.shape[-1])
    q = F.layer_norm(queries.float(), (queries.shape[-1],), eps=LN_EPS)
    d = F.layer_norm(documents.float(), (documents.shape[-1],), eps=LN_EPS)
    return sum(w * info_nce(q[:, :dim], d[:, :dim], logit_scale, stride, offset) for dim, w in zip(dims, weights))


def check_dims(dims: Sequence[int], weights: Sequence[float], hidden_size: int | None = None) -> None:
    """Raise ValueError for an empty, non-positive, too large or weight-mismatched dimension list."""
    if not dims:
        raise ValueError("matryoshka dims must not be empty")
    if len(weights) != len(dims):
        raise ValueError(f"{len(weights)} matryoshka weights for {len(dims)} dims")
    if any(d <= 0 for d in dims) or len(set(dims)) != len(dims):
        raise ValueError(f"matryoshka dims must be distinct positive integers (got {list(dims)})")
    if hidden_size is not None and max(dims) > hidden_size:
        raise ValueError(f"matryoshka dim {max(dims)} exceeds the embedding size {hidden_size}")


class ContrastiveLoss:
    """InfoNCE of local queries against the documents of the whole global batch (gathered from all workers),
    optionally as the Matryoshka sum.

    Args: ``logit_scale`` fixed (50 = temperature 0.02, not trainable); ``stride`` documents per query (1 + number
    of hard negatives); ``dims``/``weights`` switch on the Matryoshka sum (None: plain v1 loss).

    Inputs: pooled ``queries`` [n, H] and ``documents`` [n * stride, H] of this worker; every worker the same n.

    Relations: with `GradCache` the loss is computed once on the cached embeddings of the whole local batch.

    Example::

        loss_fn = ContrastiveLoss(stride=8)   # 7 hard negatives per query
        loss = loss_fn(q_pooled, d_pooled)
    """

    def __init__(self, logit_scale: float = 50.0, stride: int = 1, dims: Sequence[int] | None = None,
                 weights: Sequence[float] | None = None):  # fmt: skip
        if stride < 1:
            raise ValueError(f"stride must be >= 1 (got {stride})")
        self.logit_scale, self.stride = logit_scale, stride
        self.dims = list(dims) if dims else None
        self.weights = (list(weights) if weights else [1.0] * len(dims)) if dims else None
        if self.dims:
            check_dims(self.dims, self.weights)

    def __call__(self, queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
        if documents.shape[0] != queries.shape[0] * self.stride:
            raise ValueError(f"{documents.shape[0]} documents for {queries.shape[0]} queries at stride {self.stride}")
        rank, _ = distributed()
        everything = gather_with_grad(documents)
        offset = rank * queries.shape[0]
        if self.dims:
            return matryoshka_info_nce(queries, everything, self.dims, self.weights, self.logit_scale, self.stride, offset)
        return info_nce(queries, everything, self.logit_scale, self.stride, offset)

    def get_config_dict(self) -> dict[str, Any]:
        return {"logit_scale": self.logit_scale, "stride": self.stride, "matryoshka_dims": self.dims,
                "matryoshka_weights": self.weights}  # fmt: skip


class _RngState:
    """CPU and (if used) CUDA RNG state at a chunk's first forward, so its re-forward replays dropout exactly."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def replay(self):
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


class GradCache:
    """Gradient caching (GradCache, arXiv 2101.06983): the loss of a whole batch with the memory of one chunk.

    1. Embed every chunk of every input group without a graph, recording the RNG state per chunk.
    2. Compute the loss on detached, grad-requiring copies of the embeddings; its backward yields dL/d(embedding).
    3. Re-embed each chunk with a graph under the recorded RNG state and backpropagate ``<embedding, cached grad>``;
       gradient synchronisation (DDP ``no_sync``) is skipped for every chunk but the last.

    The result (loss and parameter gradients) equals one un-chunked forward/backward up to float rounding.
    Inputs: ``embed(items) -> [len(items), H]`` for a list of raw items (e.g. token-id lists); groups such as
    ``[queries, documents]``; ``loss_fn(*embeddings) -> scalar``.

    Example::

        cache = GradCache(chunk_size=64)
        loss = cache.step(lambda ids: encode(model, ids), [query_ids, doc_ids], ContrastiveLoss(), model.no_sync)
        optimizer.step()
    """

    def __init__(self, chunk_size: int, device: torch.device | str = "cpu"):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 (got {chunk_size})")
        self.chunk_size, self.device = chunk_size, torch.device(device)

    def step(self, embed: Callable[[list], torch.Tensor], groups: Sequence[Sequence[Any]],
             loss_fn: Callable[..., torch.Tensor],
             no_sync: Callable[[], contextlib.AbstractContextManager] | None = None) -> torch.Tensor:  # fmt: skip
        """Run the three steps; returns the detached loss with parameter gradients accumulated."""
        chunked = [[list(g[i : i + self.chunk_size]) for i in range(0, len(g), self.chunk_size)] for g in groups]
        # 1. embed every chunk without a graph, remembering the RNG state each one started from
        states: list[list[_RngState]] = []
        cached: list[torch.Tensor] = []
        with torch.no_grad():
            for chunks in chunked:
                states.append([])
                parts = []
                for chunk in chunks:
                    states[-1].append(_RngState(self.device))
                    parts.append(embed(chunk))
                cached.append(torch.cat(parts))
        # 2. loss on leaf copies of the embeddings -> dL/d(embedding)
        leaves = [c.detach().requires_grad_() for c in cached]
        loss = loss_fn(*leaves)
        loss.backward()
        # 3. re-embed chunk by chunk with a graph and push the cached gradient through it
        last = (len(chunked) - 1, len(chunked[-1]) - 1)
        for g, chunks in enumerate(chunked):
            grads = leaves[g].grad.split([len(c) for c in chunks])
            for c, (chunk, grad) in enumerate(zip(chunks, grads)):
                sync = no_sync is None or (g, c) == last
                with states[g][c].replay(), contextlib.nullcontext() if sync else no_sync():
                    torch.sum(embed(chunk).float() * grad).backward()
        return loss.detach()

    def get_config_dict(self) -> dict[str, Any]:
        return {"chunk_size": self.chunk_size}

