"""Find every place a piece of code makes the host wait for the device.

On CUDA, torch's own sync debug mode (``torch.cuda.set_sync_debug_mode``) reports each synchronising call. A CPU
has no device to wait for, so there the audit tracks which tensors *would* live on the device -- parameters, their
gradients and optimizer state, whatever `nomicbert.attention.host_to_device` returns, and everything computed from
those -- and reports each operation that would read such a tensor back on a GPU: ``.item()``, ``int()``/``float()``
/``bool()``, ``.tolist()``, ``.numpy()``, ``.cpu()``, and the ops whose output size depends on the data
(``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``, ``equal``, ``repeat_interleave`` without
``output_size``). ``.to(device)`` cannot be judged on a CPU (host and device are one), so a stray device-to-host
``.to("cpu")`` is left to the CUDA audit. Reads inside functions named as allowed (the periodic loss read,
checkpointing) are counted apart.
"""

from __future__ import annotations

import contextlib
import traceback
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten
DATA_DEPENDENT = {aten.nonzero.default, aten.argwhere.default, aten.equal.default, aten.is_nonzero.default,
                  aten.masked_select.default, aten._unique2.default, aten.unique_consecutive.default,
                  aten.unique_dim.default, aten._local_scalar_dense.default}  # fmt: skip
READS = {"item", "tolist", "numpy", "__array__", "cpu", "__float__", "__int__", "__bool__", "__index__"}


class SyncAudit:
    """``with SyncAudit(device_type) as audit: ...`` then ``audit.unexpected`` (where the host waited outside the
    allowed functions) and ``audit.allowed`` (per allowed function, how many of its calls waited)."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.unexpected: list[str] = []
        self.allowed: Counter[str] = Counter()
        self._inside: list[str] = []
        self._waits = 0
        self._tracked: dict[int, weakref.ref] = {}

    # -- allowed contexts ------------------------------------------------------------------------------------
    def allow(self, owner: object, name: str, monkeypatch) -> None:
        """Waits inside ``owner.name`` (a function or method) are expected: count them apart."""
        original = getattr(owner, name)
        audit = self

        def wrapped(*args, **kwargs):
            audit._inside.append(name)
            waited = audit._waits
            try:
                return original(*args, **kwargs)
            finally:
                audit._inside.pop()
                if audit._waits > waited:
                    audit.allowed[name] += 1

        monkeypatch.setattr(owner, name, wrapped)

    def _record(self, what: str) -> None:
        self._waits += 1
        if not self._inside:
            where = "".join(traceback.format_stack(limit=8)[:-3])
            self.unexpected.append(f"{what}\n{where}")

    # -- CPU: provenance ---------------------------------------------------------------------------------------
    def track(self, tensor: torch.Tensor) -> torch.Tensor:
        key = id(tensor)
        self._tracked[key] = weakref.ref(tensor, lambda _, k=key: self._tracked.pop(k, None))
        return tensor

    def on_device(self, value: object) -> bool:
        if not isinstance(value, torch.Tensor):
            return False
        if isinstance(value, torch.nn.Parameter):
            return True
        ref = self._tracked.get(id(value))
        return ref is not None and ref() is value

    @contextlib.contextmanager
    def _cpu(self, monkeypatch) -> Iterator[None]:
        import nomicbert.attention

        original = nomicbert.attention.host_to_device
        monkeypatch.setattr(nomicbert.attention, "host_to_device", lambda t, d: self.track(original(t, d).clone()))
        import workflows.session

        monkeypatch.setattr(workflows.session, "host_to_device", nomicbert.attention.host_to_device)
        with _Reads(self), _Provenance(self):
            yield

    # -- CUDA: torch's sync debug mode -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _cuda(self) -> Iterator[None]:
        previous = torch.cuda.get_sync_debug_mode()
        shown = warnings.showwarning

        def show(message, category, *args, **kwargs):
            if "synchronizing cuda operation" in str(message).lower():  # not the "prototype feature" notice
                self._record(str(message))
            else:
                shown(message, category, *args, **kwargs)

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode(previous)
                warnings.showwarning = shown

    def run(self, monkeypatch) -> contextlib.AbstractContextManager:
        return self._cuda() if self.device_type == "cuda" else self._cpu(monkeypatch)


class _Reads(TorchFunctionMode):
    """Python-level reads of device tensors."""

    def __init__(self, audit: SyncAudit):
        super().__init__()
        self.audit = audit

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in READS and args and self.audit.on_device(args[0]):
            self.audit._record(f"{name}() of a device tensor")
        return func(*args, **kwargs)


class _Provenance(TorchDispatchMode):
    """Marks the outputs of every op with a device input as device tensors; reports data-dependent ops on them."""

    def __init__(self, audit: SyncAudit):
        super().__init__()
        self.audit = audit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        device = any(self.audit.on_device(x) for x in inputs)
        if device and _waits(func, args, kwargs):
            self.audit._record(f"{func} on a device tensor")
        out = func(*args, **kwargs)
        if device:
            for x in tree_leaves(out):
                if isinstance(x, torch.Tensor):
                    self.audit.track(x)
        return out


def _waits(func: Callable, args: tuple, kwargs: dict) -> bool:
    if func in DATA_DEPENDENT:
        return True
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        masks = (torch.bool, torch.uint8)
        return any(isinstance(i, torch.Tensor) and i.dtype in masks for i in args[1] if i is not None)
    if func in (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor):
        return kwargs.get("output_size") is None
    return False
