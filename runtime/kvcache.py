"""KVCache: the one owner of a model's past key/values.

Per layer a key and a value tensor [batch, kv_heads, length, head_dim]. Two layouts, one interface:
- concat (standard graphs): the graph returns present = concat(past, new), so `update` takes the presents as the new
  past on every forward; `crop` rolls back rejected draft tokens, `repeat` fans a batch-1 prefix out to n rows
  (beams, candidate paths), `gather` reorders/picks rows, `keep` keeps tree positions.
- shared (fused graphs): one preallocated [rows, kv_heads, capacity, head_dim] buffer per tensor, bound as both the
  past input and the present output, so GroupQueryAttention writes the new entries in place (`advance` counts them).
  Only `length` says what is live: `crop` is free, and `repeat`/`gather`/`keep` move the live prefix in place. The
  buffer grows (doubling, up to the model's context) when a forward would not fit.

Tensors are NumPy arrays on the CPU path (bound zero-copy as OrtValues for fused graphs). On CUDA they are
onnxruntime OrtValues left on the device by IO binding; every operation is then a Gather (along positions or rows)
run by a tiny ORT graph on that device, so the cache never goes through host memory. Building that graph needs the
`onnx` package (in the gpu extra).
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
                 dtype=np.float32, device: tuple[str, int] | None = None, shared: bool = False,
                 capacity: int = 256):
        self.max_context = max_context
        self.dtype = np.dtype(dtype)
        self.device = device  # None: NumPy on the host; ("cuda", id): OrtValues on that device
        self.shared = shared
        self.capacity = min(capacity, max_context) if shared else 0  # positions the shared buffer holds
        self.rows = batch  # rows the shared buffer holds (>= batch)
        shape = (batch, num_kv_heads, self.capacity, head_dim)
        self.keys = [self._place(np.zeros(shape, dtype)) for _ in range(num_layers)]
        self.values = [self._place(np.zeros(shape, dtype)) for _ in range(num_layers)]
        self.length = 0
        self.batch = batch
        # shared layout on the host: positions that hold the same entries in every row of the buffer (a beam draft's
        # rows share the context, so a beam reorder moves only the positions after it)
        self.same = 0
        # batch -> OrtValues over the shared buffer's first `batch` rows, for IO binding: a beam draft switches
        # between one row and W rows every round, and each set of views (and the binding over it) is made once
        self._bound: dict[int, list] = {}

    @classmethod
    def for_model(cls, spec: ModelSpec, batch: int = 1, device: tuple[str, int] | None = None,
                  shared: bool = False) -> KVCache:
        return cls(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.max_context, batch,
                   DTYPES[spec.dtype], device, shared)

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
        """Concat layout: take the graph's present.{i}.key/value outputs (k0, v0, k1, v1, ...) as the new past."""
        self.keys = list(presents[0::2])
        self.values = list(presents[1::2])
        shape = _shape(self.keys[0])
        self.batch, self.length = shape[0], shape[2]

    def reserve(self, extra: int) -> None:
        """Shared layout: make room for `extra` more positions (before a forward), growing the buffer if needed."""
        self.check_fits(extra)
        if self.length + extra > self.capacity:
            self._resize(self.rows, min(self.max_context, max(2 * self.capacity, self.length + extra)))

    def advance(self, n: int) -> None:
        """Shared layout: the graph wrote n new positions in place."""
        self.length += n

    def bound(self, row: int | None = None) -> list:
        """Shared layout: k0, v0, k1, v1, ... as OrtValues over the live rows (or one row, host only), bound as
        past and as present."""
        if row is not None:
            if self.device is not None:
                raise ValueError("one row of a device buffer cannot be bound on its own")
            from onnxruntime import OrtValue

            return [OrtValue.ortvalue_from_numpy(t[row:row + 1]) for pair in zip(self.keys, self.values)
                    for t in pair]
        live = self._bound.get(self.batch)
        if live is None:
            live = [t[: self.batch] if self.rows > self.batch else t for pair in zip(self.keys, self.values)
                    for t in pair]
            if self.device is None:
                from onnxruntime import OrtValue

                live = [OrtValue.ortvalue_from_numpy(t) for t in live]  # zero-copy views of the host buffer
            self._bound[self.batch] = live
        return live

    def reset(self) -> None:
        """Shared layout: empty and one row again, the buffers kept (a finished generation's cache, reused)."""
        self.length, self.batch, self.same = 0, 1, 0

    def crop(self, length: int) -> None:
        """Roll back to the first `length` positions (drop rejected draft tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {length}")
        if length == self.length:
            return
        if not self.shared:
            self._take(2, slice(0, length))  # a view on the host
        self.length, self.same = length, min(self.same, length)

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
        listed = rows.tolist()  # a few beams: Python's min/max are cheaper than NumPy's reductions
        if rows.ndim != 1 or not listed or min(listed) < 0 or max(listed) >= self.batch:
            raise ValueError(f"gather rows {listed} must be a non-empty list within 0..{self.batch - 1}")
        if self.shared and listed == list(range(self.batch)):
            return  # every row stays where it is (a beam step that keeps both beams' lines)
        self._take(0, rows)
        self.batch = len(rows)

    def arrays(self) -> list[np.ndarray]:
        """k0, v0, k1, v1, ... as host NumPy arrays of the live rows and positions (tests, debugging)."""
        return [_host(t)[: self.batch, :, : self.length] for pair in zip(self.keys, self.values) for t in pair]

    def _take(self, axis: int, idx: slice | np.ndarray) -> None:
        """Select idx along axis (0: rows, 2: positions) of every key and value tensor."""
        if self.shared:
            return self._take_in_place(axis, idx)
        tensors, n = self.keys + self.values, len(self.keys)
        if self.device is None:
            key = (slice(None),) * axis + (idx,)
            out = [t[key] for t in tensors]
        else:
            if isinstance(idx, slice):
                idx = np.arange(idx.start, idx.stop, dtype=np.int64)
            out = _device_gather(len(tensors), axis, self.dtype.str, self.device)(tensors, idx)
        self.keys, self.values = out[:n], out[n:]

    def _take_in_place(self, axis: int, idx: np.ndarray) -> None:
        """Shared layout: move the live prefix's selected rows/positions to the front of the buffer."""
        n_rows = len(idx) if axis == 0 else self.batch
        if self.device is None:
            if n_rows > self.rows:
                self._resize(n_rows, self.capacity)
            if axis == 0:
                # every row holds the same first `same` positions: move only those after them
                live = slice(self.same, self.length)
                moves = [(r, int(i)) for r, i in enumerate(idx) if r != i]
                if not {r for r, _ in moves} & {i for _, i in moves}:
                    # no row is read after it is overwritten: copy just the rows that change (a beam step often
                    # keeps most rows where they are), without a temporary of all of them
                    for t in self.keys + self.values:
                        for r, i in moves:
                            t[r, :, live] = t[i, :, live]
                else:
                    for t in self.keys + self.values:
                        t[: len(idx), :, live] = t[idx, :, live]
                if n_rows == self.rows and len(set(idx.tolist())) == 1:  # one row fanned out to the whole buffer
                    self.same = self.length
                return
            for t in self.keys + self.values:
                t[: self.batch, :, : len(idx)] = t[: self.batch, :, idx]
            moved = np.flatnonzero(idx != np.arange(len(idx)))  # the positions whose entries changed (live rows only)
            self.same = min(self.same, int(moved[0]) if moved.size else len(idx))
        else:  # a device gather into a new buffer (positions padded with the untouched rest): no host round trip
            if axis == 2:
                idx = np.concatenate([idx, np.arange(len(idx), self.capacity, dtype=np.int64)])
            tensors, n = self.keys + self.values, len(self.keys)
            out = _device_gather(len(tensors), axis, self.dtype.str, self.device)(tensors, idx)
            self.keys, self.values = out[:n], out[n:]
            self.rows = n_rows  # device buffers hold exactly the live rows (an OrtValue has no row views)
            self._bound = {}  # new buffers (on the host the moves stay in the bound memory)

    def _resize(self, rows: int, capacity: int) -> None:
        """Shared layout: a bigger buffer holding the live prefix (rare: capacity doubles)."""
        live = self.arrays()
        new = []
        for a in live:
            t = np.zeros((rows, a.shape[1], capacity, a.shape[3]), self.dtype)
            t[: a.shape[0], :, : a.shape[2]] = a
            new.append(self._place(t))
        self.keys, self.values = new[0::2], new[1::2]
        self.rows, self.capacity, self._bound = rows, capacity, {}
        self.same = min(self.same, self.length) if rows == len(live[0]) else 0  # new rows hold zeros

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
    from .session import session_options  # the process's thread pool (ORT refuses a pool of its own once shared)

    sess = ort.InferenceSession(model.SerializeToString(), session_options(), providers=[provider])

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
