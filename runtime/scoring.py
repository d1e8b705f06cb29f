"""Joint decoding's scoring in one ONNX Runtime call each: a draft step's best children, a round's target scores.

A beam step needs, per beam row of the draft's logits [B, V], only its best few children and their log-likelihoods:
the `width` best under the unfiltered log-softmax (beam search, algorithms.md section 4), or the top-k support of
the filtered distribution (beam sampling); a round's acceptance test needs the target's log-likelihood of each draft
token. In NumPy that is a dozen calls over [rows, V] on the CPU caches a model call just flushed (~70 us a draft step
at T = 0, ~110 us at T = 1, BENCHMARKS.md "Fifth pass"); as a graph it is one call of ~20 us. The graphs are tiny,
fixed and shipped prebuilt in runtime/data/ (the runtime does not need the `onnx` package); `build_graphs()` makes
them and tests/test_scoring.py checks the shipped bytes against it.

beam graph:  logits [B, V'], vocab [1], k [1] -> TopK(LogSoftmax(logits[:, :vocab]), k): values, indices [B, k]
token graph: logits, vocab, temperature [1], tokens [B] -> LogSoftmax(logits[:, :vocab] / T)[b, tokens[b]]: values [B]
             (the target's scores of a draft, unfiltered)
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
GRAPHS = {"beam": DATA / "beam_scores.onnx", "top_k": DATA / "top_k_scores.onnx", "token": DATA / "token_scores.onnx"}
SETTINGS = {"vocab": np.int64, "k": np.int64, "temperature": np.float32, "top_p": np.float32}  # bound once


class Scorer:
    """Runs the scoring graphs on the host over float32 logits [R, V'] (V' >= vocab: padded columns are sliced off in
    the graph). Thread-safe: one call at a time."""

    def __init__(self):
        from .session import session_options  # the process's intra-op pool, like every mjsd session

        opts = session_options()
        if opts.use_per_session_threads:  # no shared pool: a graph this small needs no threads of its own to spin
            opts.intra_op_num_threads = 1
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        self._sess = {name: ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
                      for name, path in GRAPHS.items()}
        self._lock = threading.Lock()
        # (graph, rows, settings...) -> (IOBinding with the settings bound, output arrays, the settings' arrays): a
        # call then binds only the logits (rebinding the rest costs more than the graph runs)
        self._bindings: dict[tuple, tuple] = {}

    def beam(self, logits: np.ndarray, vocab: int, width: int) -> tuple[list[list[float]], list[list[int]]]:
        """Each row's `width` best children under the log-softmax: (log-likelihoods, token ids), best first."""
        return self._run("beam", logits, vocab=vocab, k=min(width, vocab))

    def top_k(self, logits: np.ndarray, vocab: int, temperature: float, top_k: int,
              top_p: float) -> tuple[list[list[float]], list[list[int]]]:
        """Each row's top-k support of the filtered distribution: (log-probabilities, token ids), largest first."""
        # top_p = 1 filters nothing: float32 sums of the probabilities before the last token may round to 1
        return self._run("top_k", logits, vocab=vocab, k=min(top_k, vocab), temperature=temperature,
                         top_p=top_p if top_p < 1 else np.inf)

    def token_logprobs(self, logits: np.ndarray, vocab: int, temperature: float, tokens) -> list[float]:
        """log softmax(logits / T)[token] of each row's token (unfiltered)."""
        return self._run("token", logits, np.asarray(tokens, np.int64), vocab=vocab, temperature=temperature)[0]

    def _run(self, name: str, logits: np.ndarray, tokens: np.ndarray | None = None, **settings) -> list:
        key = (name, len(logits), *settings.values())
        with self._lock:
            entry = self._bindings.get(key)
            if entry is None:
                entry = self._bindings[key] = self._bind(name, len(logits), settings)
            io, outputs, bound = entry  # (the settings' arrays stay alive with their binding)
            if not logits.flags.c_contiguous:
                logits = np.ascontiguousarray(logits)
            # a binding reads its array's memory at run time: a draft step's logits are the same session buffer every
            # step, so the binding is kept while the memory and shape are (rebinding costs ~9 us on cold caches)
            where = (logits.__array_interface__["data"][0], logits.shape)
            if bound.get("logits") != where:
                io.bind_cpu_input("logits", logits)  # the binding keeps the array alive: its address stays its own
                bound["logits"] = where
            if tokens is not None:
                io.bind_cpu_input("tokens", tokens)
            self._sess[name].run_with_iobinding(io)
            return [a.tolist() for a in outputs]

    def _bind(self, name: str, rows: int, settings: dict) -> tuple:
        io = self._sess[name].io_binding()
        bound = {k: np.array([v], SETTINGS[k]) for k, v in settings.items()}
        for input_name, a in bound.items():
            io.bind_ortvalue_input(input_name, ort.OrtValue.ortvalue_from_numpy(a))
        if name == "token":
            outputs = {"values": np.empty(rows, np.float32)}
        else:
            k = settings["k"]
            outputs = {"values": np.empty((rows, k), np.float32), "indices": np.empty((rows, k), np.int64)}
        for output_name, a in outputs.items():
            io.bind_ortvalue_output(output_name, ort.OrtValue.ortvalue_from_numpy(a))
        if len(self._bindings) > 64:  # settings seen over a long service life: start over rather than grow
            self._bindings.clear()
        return io, list(outputs.values()), bound


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
    token = helper.make_graph(
        [vocab_slice,
         helper.make_node("Div", ["x", "temperature"], ["scaled"]),
         helper.make_node("LogSoftmax", ["scaled"], ["log_probs"], axis=-1),
         helper.make_node("Unsqueeze", ["tokens", "last"], ["token_column"]),
         helper.make_node("GatherElements", ["log_probs", "token_column"], ["picked"], axis=-1),
         helper.make_node("Squeeze", ["picked", "last"], ["values"])],
        "mjsd_token_scores",
        [common[0], common[1], value("temperature", f, [1]), value("tokens", i64, ["batch"])],
        [value("values", f, ["batch"])], const)
    return {name: helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9,
                                    producer_name="mjsd").SerializeToString()
            for name, g in (("beam", beam), ("top_k", top_k), ("token", token))}
