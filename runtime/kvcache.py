"""KVCache: the one owner of a model's past key/values.

Per layer a key and a value tensor [batch, kv_heads, length, head_dim]. The exported graphs return
present = concat(past, new), so the cache grows by the fed tokens on every forward; `crop` rolls back rejected draft
tokens, `repeat` fans a batch-1 prefix out to n rows (beams, candidate paths), `gather` reorders/picks rows.

Tensors are NumPy arrays on the CPU path. On CUDA they are onnxruntime OrtValues left on the device by IO binding;
crop/repeat/gather then go through host memory (correct, but a copy: see session.py).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .bundle import ModelSpec
from .errors import ContextLengthError

DTYPES = {"float32": np.float32, "float16": np.float16}


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_context: int, batch: int = 1,
                 dtype=np.float32, device: tuple[str, int] | None = None):
        self.max_context = max_context
        self.device = device  # None: NumPy on the host; ("cuda", id): OrtValues on that device
        empty = np.zeros((batch, num_kv_heads, 0, head_dim), dtype=dtype)
        self.keys = [self._place(empty) for _ in range(num_layers)]
        self.values = [self._place(empty) for _ in range(num_layers)]
        self.length = 0
        self.batch = batch

    @classmethod
    def for_model(cls, spec: ModelSpec, batch: int = 1, device: tuple[str, int] | None = None) -> KVCache:
        return cls(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.max_context, batch,
                   DTYPES[spec.dtype], device)

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def check_fits(self, extra: int) -> None:
        """Refuse, before any work, a forward that would grow the cache past the model's context."""
        if self.length + extra > self.max_context:
            raise ContextLengthError(
                f"{self.length} cached + {extra} new tokens exceed the model's context of {self.max_context}; "
                f"only {max(0, self.max_context - self.length)} more fit. Use a shorter prompt or fewer new tokens.")

    def update(self, presents: Sequence) -> None:
        """Take the graph's present.{i}.key/value outputs (k0, v0, k1, v1, ...) as the new past."""
        self.keys = list(presents[0::2])
        self.values = list(presents[1::2])
        shape = _shape(self.keys[0])
        self.batch, self.length = shape[0], shape[2]

    def crop(self, length: int) -> None:
        """Roll back to the first `length` positions (drop rejected draft tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {length}")
        if length == self.length:
            return
        self._apply(lambda t: t[:, :, :length])
        self.length = length

    def keep(self, positions: Sequence[int] | np.ndarray) -> None:
        """Keep only these cache positions, in this order (after tree verification: the context plus the accepted
        root-to-node path; the rejected branches' entries are dropped)."""
        pos = np.asarray(positions, dtype=np.int64)
        if pos.ndim != 1 or (pos.size and (pos.min() < 0 or pos.max() >= self.length)):
            raise ValueError(f"keep positions must be a list within 0..{self.length - 1}")
        self._apply(lambda t: t[:, :, pos])
        self.length = len(pos)

    def repeat(self, n: int) -> None:
        """Fan a batch-1 cache out to n identical rows (beams or candidate paths sharing the prefix)."""
        if self.batch != 1:
            raise ValueError(f"repeat needs a batch-1 cache, this one has {self.batch} rows")
        self._apply(lambda t: np.repeat(t, n, axis=0))
        self.batch = n

    def gather(self, rows: Sequence[int] | np.ndarray) -> None:
        """Keep rows in the given order (beam reorder by parent, or pick the winner with [row])."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or len(rows) == 0 or rows.min() < 0 or rows.max() >= self.batch:
            raise ValueError(f"gather rows {rows.tolist()} must be a non-empty list within 0..{self.batch - 1}")
        self._apply(lambda t: t[rows])
        self.batch = len(rows)

    def keep(self, positions: Sequence[int] | np.ndarray) -> None:
        """Keep these sequence positions in this order (after tree verification: the context and the accepted
        path's nodes), so the cache equals a plain forward over the accepted text."""
        pos = np.asarray(positions, dtype=np.int64)
        if pos.ndim != 1 or (pos.size and (pos.min() < 0 or pos.max() >= self.length)):
            raise ValueError(f"keep positions {pos.tolist()} must be a list within 0..{self.length - 1}")
        if np.array_equal(pos, np.arange(pos.size)):
            return self.crop(pos.size)  # a prefix: slicing, no copy
        self._apply(lambda t: t[:, :, pos])
        self.length = pos.size

    def arrays(self) -> list[np.ndarray]:
        """k0, v0, k1, v1, ... as host NumPy arrays (tests, debugging)."""
        return [_host(t) for pair in zip(self.keys, self.values) for t in pair]

    def _apply(self, fn) -> None:
        self.keys = [self._place(fn(_host(t))) for t in self.keys]
        self.values = [self._place(fn(_host(t))) for t in self.values]

    def _place(self, a: np.ndarray):
        if self.device is None:
            return a
        from onnxruntime import OrtValue

        return OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), *self.device)


def _shape(t) -> tuple[int, ...]:
    return tuple(t.shape) if isinstance(t, np.ndarray) else tuple(t.shape())


def _host(t) -> np.ndarray:
    return t if isinstance(t, np.ndarray) else t.numpy()
