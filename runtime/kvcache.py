"""KVCache: the one owner of a model's past key/values.

Per layer a key and a value tensor [batch, kv_heads, length, head_dim]. The exported graphs return
present = concat(past, new), so the cache grows by the fed tokens on every forward; `crop` rolls back rejected draft
tokens, `repeat` fans a batch-1 prefix out to n rows (beams, candidate paths), `gather` reorders/picks rows.

Tensors are NumPy arrays on the CPU path. On CUDA they are onnxruntime OrtValues left on the device by IO binding;
every operation is then a Gather (along positions or rows) run by a tiny ORT graph on that device, so the cache
never goes through host memory. Building that graph needs the `onnx` package (in the gpu extra).
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from .bundle import ModelSpec
from .errors import ContextLengthError

DTYPES = {"float32": np.float32, "float16": np.float16}


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_context: int, batch: int = 1,
                 dtype=np.float32, device: tuple[str, int] | None = None):
        self.max_context = max_context
        self.dtype = np.dtype(dtype)
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
        self._take(2, slice(0, length))  # a view on the host
        self.length = length

    def keep(self, positions: Sequence[int] | np.ndarray) -> None:
        """Keep only these cache positions, in this order (after tree verification: the context plus the accepted
        root-to-node path; the rejected branches' entries are dropped)."""
        pos = np.asarray(positions, dtype=np.int64)
        if pos.ndim != 1 or (pos.size and (pos.min() < 0 or pos.max() >= self.length)):
            raise ValueError(f"keep positions {pos.tolist()} must be a list within 0..{self.length - 1}")
        if np.array_equal(pos, np.arange(pos.size)):
            return self.crop(pos.size)  # a prefix: a view on the host, no copy
        self._take(2, pos)
        self.length = pos.size

    def repeat(self, n: int) -> None:
        """Fan a batch-1 cache out to n identical rows (beams or candidate paths sharing the prefix)."""
        if self.batch != 1:
            raise ValueError(f"repeat needs a batch-1 cache, this one has {self.batch} rows")
        self._take(0, np.zeros(n, dtype=np.int64))
        self.batch = n

    def gather(self, rows: Sequence[int] | np.ndarray) -> None:
        """Keep rows in the given order (beam reorder by parent, or pick the winner with [row])."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or len(rows) == 0 or rows.min() < 0 or rows.max() >= self.batch:
            raise ValueError(f"gather rows {rows.tolist()} must be a non-empty list within 0..{self.batch - 1}")
        self._take(0, rows)
        self.batch = len(rows)

    def arrays(self) -> list[np.ndarray]:
        """k0, v0, k1, v1, ... as host NumPy arrays (tests, debugging)."""
        return [_host(t) for pair in zip(self.keys, self.values) for t in pair]

    def _take(self, axis: int, idx: slice | np.ndarray) -> None:
        """Select idx along axis (0: rows, 2: positions) of every key and value tensor."""
        tensors, n = self.keys + self.values, len(self.keys)
        if self.device is None:
            key = (slice(None),) * axis + (idx,)
            out = [t[key] for t in tensors]
        else:
            if isinstance(idx, slice):
                idx = np.arange(idx.start, idx.stop, dtype=np.int64)
            out = _device_gather(len(tensors), axis, self.dtype.str, self.device)(tensors, idx)
        self.keys, self.values = out[:n], out[n:]

    def _place(self, a: np.ndarray):
        if self.device is None:
            return a
        from onnxruntime import OrtValue

        return OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), *self.device)


def _shape(t) -> tuple[int, ...]:
    return tuple(t.shape) if isinstance(t, np.ndarray) else tuple(t.shape())


def _host(t) -> np.ndarray:
    return t if isinstance(t, np.ndarray) else t.numpy()


@lru_cache(maxsize=None)
def _device_gather(n: int, axis: int, dtype: str, device: tuple[str, int]):
    """A function gathering idx along `axis` of n same-dtype OrtValues on `device` in one ORT call."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    elem = TensorProto.FLOAT16 if np.dtype(dtype) == np.float16 else TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Gather", [f"x{i}", "idx"], [f"y{i}"], axis=axis) for i in range(n)], "kv_gather",
        [helper.make_tensor_value_info(f"x{i}", elem, None) for i in range(n)]
        + [helper.make_tensor_value_info("idx", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info(f"y{i}", elem, None) for i in range(n)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    provider = ("CUDAExecutionProvider", {"device_id": device[1]}) if device[0] == "cuda" else "CPUExecutionProvider"
    sess = ort.InferenceSession(model.SerializeToString(), providers=[provider])

    def gather(tensors: list, idx: np.ndarray) -> list:
        binding = sess.io_binding()
        for i, t in enumerate(tensors):
            binding.bind_ortvalue_input(f"x{i}", t)
        binding.bind_cpu_input("idx", np.ascontiguousarray(idx, dtype=np.int64))
        for i in range(n):
            binding.bind_output(f"y{i}", *device)
        sess.run_with_iobinding(binding)
        return binding.get_outputs()

    return gather
