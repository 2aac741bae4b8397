"""Counting the places where the host reads device data (a sync on a GPU) — the CPU-testable half of "the decode
step is one CUDA graph".

Two layers catch them: Python calls that turn a tensor into a Python value (``tolist``, ``item``, ``bool(t)``, ...)
through a ``TorchFunctionMode``, and ATen ops whose output size or value depends on the data (``nonzero``,
``_local_scalar_dense``, ``bincount``, ...) through a ``TorchDispatchMode``, which also sees the backward pass.
"""

from __future__ import annotations

import traceback
from collections import Counter

from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

PYTHON_READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__"}
DATA_DEPENDENT_OPS = {
    "_local_scalar_dense", "nonzero", "is_nonzero", "equal", "bincount", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "masked_select", "repeat_interleave",
}


class _PythonReads(TorchFunctionMode):
    def __init__(self, counts, where):
        super().__init__()
        self.counts, self.where = counts, where

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in PYTHON_READS:
            self.counts[name] += 1
            frame = traceback.extract_stack(limit=2)[0]
            self.where.append(f"{name} at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}")
        return func(*args, **(kwargs or {}))


class _DataDependentOps(TorchDispatchMode):
    def __init__(self, counts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        if name in DATA_DEPENDENT_OPS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


class HostReads:
    """``with HostReads() as reads: ...`` then ``reads.total``, ``reads.counts`` (by name) and ``reads.where``."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.where: list[str] = []

    def __enter__(self):
        self._modes = [_PythonReads(self.counts, self.where), _DataDependentOps(self.counts)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        return False

    @property
    def total(self) -> int:
        return sum(self.counts.values())
