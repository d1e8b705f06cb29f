"""A draft step's scoring in one ONNX Runtime call: the few best children of each beam, as Python floats.

A beam step needs, per beam row of the draft's logits [B, V], only its best few children and their log-likelihoods:
the `width` best under the unfiltered log-softmax (beam search, algorithms.md section 4), or the top-k support of
the filtered distribution (beam sampling). In NumPy that is a dozen calls over [B, V] on the CPU caches a model call
just flushed (~70 us a step at T = 0, ~110 us at T = 1, BENCHMARKS.md "Fifth pass"); as a graph it is one call of
~15 us. The two graphs are tiny, fixed and shipped prebuilt in runtime/data/ (the runtime does not need the `onnx`
package); `build_graphs()` makes them and tests/test_scoring.py checks the shipped bytes against it.

beam graph:  logits [B, V'], vocab [1], k [1] -> TopK(LogSoftmax(logits[:, :vocab]), k): values, indices [B, k]
top-k graph: logits, vocab, k, temperature [1], top_p [1] -> over each row's k largest of logits[:, :vocab] / T,
             largest first: log-probabilities of softmax(top_p(those)) (-inf where top-p drops a token), indices.
             Top-p keeps a token while the probability mass strictly before it is below top_p (sampling.py's rule).
Ties rank the lower token id first (ONNX TopK), as argmax does.
"""
from __future__ import annotations

import threading
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnxruntime as ort

DATA = Path(__file__).parent / "data"
GRAPHS = {"beam": DATA / "beam_scores.onnx", "top_k": DATA / "top_k_scores.onnx"}


class Scorer:
    """Runs the scoring graphs on the host over float32 logits [B, V'] (V' >= vocab: padded columns are sliced off in
    the graph). Thread-safe: one call at a time."""

    def __init__(self):
        from .session import session_options  # the process's intra-op pool, like every mjsd session

        opts = session_options()
        opts.log_severity_level = 3
        self._sess = {name: ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
                      for name, path in GRAPHS.items()}
        self._lock = threading.Lock()
        # (graph, rows, vocab, k, temperature, top_p) -> (IOBinding with those inputs bound, output arrays): a call
        # then binds only the logits (rebinding the rest costs more than the graph runs)
        self._bindings: dict[tuple, tuple] = {}

    def beam(self, logits: np.ndarray, vocab: int, width: int) -> tuple[list[list[float]], list[list[int]]]:
        """Each row's `width` best children: (log-softmax values, token ids), best first."""
        return self._run(("beam", len(logits), vocab, min(width, vocab)), logits)

    def top_k(self, logits: np.ndarray, vocab: int, temperature: float, top_k: int,
              top_p: float) -> tuple[list[list[float]], list[list[int]]]:
        """Each row's top-k support of the filtered distribution: (log-probabilities, token ids), largest first."""
        # top_p = 1 filters nothing: float32 sums of the probabilities before the last token may round to 1
        return self._run(("top_k", len(logits), vocab, min(top_k, vocab), temperature, top_p if top_p < 1 else np.inf),
                         logits)

    def _run(self, key: tuple, logits: np.ndarray) -> tuple[list[list[float]], list[list[int]]]:
        with self._lock:
            entry = self._bindings.get(key)
            if entry is None:
                entry = self._bindings[key] = self._bind(key)
            io, values, indices, _ = entry  # (the small inputs' arrays stay alive with their binding)
            io.bind_cpu_input("logits", logits if logits.flags.c_contiguous else np.ascontiguousarray(logits))
            self._sess[key[0]].run_with_iobinding(io)
            return values.tolist(), indices.tolist()

    def _bind(self, key: tuple) -> tuple:
        name, rows, vocab, k, *filters = key
        io = self._sess[name].io_binding()
        small = {"vocab": np.array([vocab], np.int64), "k": np.array([k], np.int64)}
        if filters:
            small["temperature"], small["top_p"] = (np.array([x], np.float32) for x in filters)
        for input_name, a in small.items():
            io.bind_ortvalue_input(input_name, ort.OrtValue.ortvalue_from_numpy(a))
        values, indices = np.empty((rows, k), np.float32), np.empty((rows, k), np.int64)
        io.bind_ortvalue_output("values", ort.OrtValue.ortvalue_from_numpy(values))
        io.bind_ortvalue_output("indices", ort.OrtValue.ortvalue_from_numpy(indices))
        if len(self._bindings) > 64:  # settings seen over a long service life: start over rather than grow
            self._bindings.clear()
        return io, values, indices, small


@lru_cache(maxsize=1)
def scorer() -> Scorer:
    """The process's Scorer (made on first use)."""
    return Scorer()


def build_graphs() -> dict[str, bytes]:
    """The scoring graphs, serialised (needs the `onnx` package: export extra). Opset 18, IR 9."""
    from onnx import TensorProto, helper

    def value(name, elem, shape):
        return helper.make_tensor_value_info(name, elem, shape)

    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    common = [value("logits", f, ["batch", "width"]), value("vocab", i64, [1]), value("k", i64, [1])]
    outputs = [value("values", f, ["batch", "k"]), value("indices", i64, ["batch", "k"])]
    const = [helper.make_tensor("zero", i64, [1], [0]), helper.make_tensor("last", i64, [1], [-1]),
             helper.make_tensor("minus_inf", f, [], [-np.inf])]
    vocab_slice = helper.make_node("Slice", ["logits", "zero", "vocab", "last"], ["x"])
    beam = helper.make_graph(
        [vocab_slice,
         helper.make_node("LogSoftmax", ["x"], ["log_probs"], axis=-1),
         helper.make_node("TopK", ["log_probs", "k"], ["values", "indices"], axis=-1)],
        "mjsd_beam_scores", common, outputs, const)
    top_k = helper.make_graph(
        [vocab_slice,
         helper.make_node("Div", ["x", "temperature"], ["scaled"]),
         helper.make_node("TopK", ["scaled", "k"], ["top", "indices"], axis=-1),
         helper.make_node("Softmax", ["top"], ["p"], axis=-1),
         helper.make_node("CumSum", ["p", "last_axis"], ["before"], exclusive=1),
         helper.make_node("Less", ["before", "top_p"], ["kept"]),
         helper.make_node("Where", ["kept", "top", "minus_inf"], ["filtered"]),
         helper.make_node("LogSoftmax", ["filtered"], ["values"], axis=-1)],
        "mjsd_top_k_scores", common + [value("temperature", f, [1]), value("top_p", f, [1])], outputs,
        const + [helper.make_tensor("last_axis", i64, [], [-1])])
    return {name: helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9,
                                    producer_name="mjsd").SerializeToString()
            for name, g in (("beam", beam), ("top_k", top_k))}
