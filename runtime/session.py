"""ModelSession: one ONNX Runtime InferenceSession over a bundle's exported graph.

`forward(tokens, cache)` runs tokens [B, S] after the cached past, grows the cache by S and returns logits
[B, S, V]. Time inside ORT's run is accumulated in `time_s` (and `calls`), so statistics can split model time from
orchestration.

CPU: plain NumPy feeds (IO binding gave no gain on CPU, platform-notes). CUDA/TensorRT: IO binding, the presents
stay on the device as OrtValues and are rebound as the next past; only logits come back to the host.
`io_binding=True` on CPU runs that same branch with host OrtValues (how the tests cover it without a GPU).

Tree-attention graphs (manifest `tree_attention`) take a 4-D additive `attention_bias` and explicit positions
instead of the rank-2 mask; `forward` feeds them a chain, `forward_tree` a token tree (see tree.py).

Fused graphs (manifest `graph_kind: fused`, export/fused_graph.py) take the mask, the positions and the bias, and
always run with IO binding over the cache's shared buffer (kvcache.py): past and present are the same memory, so
GroupQueryAttention writes the new KV in place and nothing is concatenated or copied per call.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import weakref

import numpy as np
import onnxruntime as ort

from .bundle import ModelSpec, check_session_io
from . import tree
from .errors import BundleError, ConfigError
from .kvcache import DTYPES, KVCache
from .providers import ORT_NAMES, provider_options, select_providers

log = logging.getLogger(__name__)


SPINNING = ("run", "on", "off")  # per-session intra-op thread policies (ModelSession)
_pool = {"wanted": False, "threads": None}  # the process-wide intra-op pool: opted in, and its size once created
_pool_lock = threading.Lock()


def share_thread_pool() -> None:
    """Run every ModelSession this process creates from now on on one intra-op pool (ONNX Runtime's global thread
    pool), sized by the first session's thread count, spinning between calls: the target and the draft alternate
    on the same warm threads (tools/bench_threads.py: AR 1.03x, SpS 1.15x, MTAD 1.11x against per-session "run"
    pools). ONNX Runtime then refuses any session with a pool of its own, so only a process whose sessions all come
    from mjsd may opt in: the CLI's model commands do, unless MJSD_THREAD_POOL=session."""
    _pool["wanted"] = True


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """SessionOptions on the process-wide pool once it exists or is wanted (sized by `threads` if this creates it),
    else with `threads` intra-op threads of its own. Every ORT session mjsd makes goes through here."""
    opts = ort.SessionOptions()
    with _pool_lock:
        if _pool["wanted"] and _pool["threads"] is None:
            try:
                ort.set_global_thread_pool_sizes(threads or 0, 1)
            except Exception as e:  # noqa: BLE001 - other code created ORT's global pools: use them as they are
                log.warning("intra-op threads: ONNX Runtime's global pool already exists (%s)", e)
            _pool["threads"] = threads or 0
        if _pool["threads"] is not None:
            if threads and threads != _pool["threads"]:
                log.warning("intra-op threads: this process shares one pool of %s; %d asked for",
                            _pool["threads"] or "ONNX Runtime's default", threads)
            opts.use_per_session_threads = False
            return opts
    if threads:
        opts.intra_op_num_threads = threads
    return opts


class ModelSession:
    def __init__(self, spec: ModelSpec, providers=("cpu",), threads: int | None = None, *, max_batch: int = 1,
                 fp16: bool = False, engine_cache_path: str | None = None, device_id: int = 0,
                 io_binding: bool | None = None, spinning: str = "run"):
        chosen, reasons = select_providers(list(providers), ort.get_available_providers())
        for reason in reasons:
            log.warning("%s model: %s", spec.role, reason)
        if chosen[0] != ORT_NAMES["cpu"] and "MJSD_ORT_LOG" not in os.environ:
            # onnxruntime-gpu 1.31 logs "No registered plugin EP device found for 'CUDAExecutionProvider'" on its
            # default logger for every CUDA session and OrtValue (plugin-EP discovery; CUDA works): errors only
            ort.set_default_logger_severity(3)
        if fp16 and spec.graph_kind == "fused" and spec.dtype == "float32" and chosen[0] != ORT_NAMES["cpu"]:
            from .fp16 import fp16_spec

            log.warning("%s model: a float32 fused graph on %s runs as its fp16 copy (converted once, cached)",
                        spec.role, chosen[0])
            spec = fp16_spec(spec)
        opts = session_options(threads)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # ORT's own warnings (e.g. unused initializers) are noise for users
        # Per-session pools (tools/bench_threads.py, BENCHMARKS.md "thread policy"): "run" (the default) spins
        # within a call and stops when it returns, so target and draft calls do not steal each other's cores; "on"
        # spins between calls too (two such pools fight: SpS/MTAD 0.6x); "off" never spins (AR 0.54x). A process
        # that shares one pool (share_thread_pool) spins between calls on it instead: "shared".
        if spinning not in SPINNING:
            raise ConfigError(f"spinning={spinning!r}: choose one of {', '.join(SPINNING)}")
        if opts.use_per_session_threads:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0" if spinning == "off" else "1")
            opts.add_session_config_entry("session.force_spinning_stop", "1" if spinning == "run" else "0")
        else:
            spinning = "shared"
        self.spinning = spinning  # the policy in effect
        provs = [(name, provider_options(name, spec, max_context=spec.max_context, max_batch=max_batch, fp16=fp16,
                                         engine_cache_path=engine_cache_path, device_id=device_id))
                 for name in chosen]
        self._load_args = (opts, provs)
        # A fused model with a chain graph runs chains on it and opens its tree graph on the first tree only
        chain = spec.chain_path is not None and spec.graph_kind == "fused"
        self._sess = self._load(spec, "chain" if chain else "model")
        self._tree_sess = None if chain else self._sess
        self._positional = not chain  # whether self._sess takes position_ids and attention_bias
        self.spec = spec
        self.providers = self._sess.get_providers()
        on_gpu = self.providers[0] in (ORT_NAMES["cuda"], ORT_NAMES["tensorrt"])
        bound = on_gpu if io_binding is None else io_binding
        self.device = (("cuda", device_id) if on_gpu else ("cpu", 0)) if bound else None  # where the KV lives
        self._past = [n for pair in spec.past_names() for n in pair]
        self._present = [n for pair in spec.present_names() for n in pair]
        self._outputs = ["logits", *self._present]
        self._has_positions = "position_ids" in spec.inputs
        self._keeps = "logits_to_keep" in spec.inputs  # a fused graph that can skip the lm_head (forward's last)
        # a fused draft's beam graph (forward_top), opened on the first beam step like the tree graph on the first tree
        self.beam_head = chain and spec.beam_path is not None
        self._beam_sess, self._beam_bindings = None, weakref.WeakKeyDictionary()
        self.fused = spec.graph_kind == "fused"  # its cache is a shared buffer, bound in place (host or device)
        # cache -> {rows: its _Binding}: reused while that cache's buffers stay the same; weak, so a finished
        # generation's buffers are not kept alive by the session
        self._bindings: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._tree_bindings = weakref.WeakKeyDictionary() if chain else self._bindings  # the tree session's
        # weak references to the last call's cache and its _Binding: the next call on it needs no dictionary lookup
        self._last = (lambda: None, lambda: None)
        self._on_host = self.device is None or self.device[0] == "cpu"  # the KV buffers are host memory
        self._buffers: dict[str, np.ndarray] = {}  # _filled's
        self._spare: list[KVCache] = []  # released caches, reused by new_cache
        if self.fused:
            check_fused_support(spec, on_gpu)
        self.time_s = 0.0  # accumulated time inside ORT run calls
        self.calls = 0

    def _load(self, spec: ModelSpec, graph: str = "model") -> ort.InferenceSession:
        """An InferenceSession over the model's "model", "chain" or "beam" graph, I/O checked against the manifest."""
        path = spec.graph_io(graph)[0]
        try:
            sess = ort.InferenceSession(str(path), self._load_args[0], providers=self._load_args[1])
        except Exception as e:  # ORT's Fail/InvalidProtobuf/InvalidGraph...: the graph file is unusable
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BundleError(f"{spec.role} model {path}: ONNX Runtime could not load the graph ({first}); "
                              "the file is corrupt or incompatible, re-export the bundle with `mjsd export`") from None
        check_session_io(spec, sess.get_inputs(), sess.get_outputs(), graph)
        return sess

    def _tree(self) -> ort.InferenceSession:
        if self._tree_sess is None:
            log.info("%s model: opening the tree graph for the first token tree", self.spec.role)
            self._tree_sess = self._load(self.spec)
        return self._tree_sess

    def _beam(self) -> ort.InferenceSession:
        if self._beam_sess is None:
            log.info("%s model: opening the beam graph for the first beam step", self.spec.role)
            self._beam_sess = self._load(self.spec, "beam")
        return self._beam_sess

    def new_cache(self, batch: int = 1) -> KVCache:
        if batch == 1 and self._spare:
            try:
                return self._spare.pop()
            except IndexError:  # another thread took the last one
                pass
        return KVCache.for_model(self.spec, batch, self.device, shared=self.fused)

    def release(self, cache: KVCache) -> None:
        """Take back a finished generation's cache: the next new_cache reuses its buffers and their binding instead
        of allocating and first-touching them again (~1 ms a generation for the built-in target). Host buffers of
        fused graphs only; the caller must not use the cache afterwards."""
        if cache.shared and cache.device is None and len(self._spare) < SPARE_CACHES:
            cache.reset()
            self._spare.append(cache)

    def forward(self, tokens, cache: KVCache, copy: bool = True, last: int = 0) -> np.ndarray:
        """Run tokens [B, S] (or [S]) after the cache's past; the cache grows by S. Returns float32 logits [B,S,V],
        or of the last `last` positions only [B,last,V] (a graph with a logits_to_keep input skips the lm_head on the
        others: a prompt pass needs one row or none). copy=False may return the session's own output array,
        overwritten by the next call on this cache: for a caller that is done with the logits before then (AR), it
        saves a copy of them a token."""
        ids = _rows(tokens)
        if self.fused:
            return self._run_fused(ids, cache, None, copy, last)
        logits = self._run(ids, cache, tree.chain(ids.shape[1]) if self.spec.tree_attention else None)
        return logits[:, -last:] if last else logits

    def step(self, token: int, cache: KVCache) -> np.ndarray:
        """forward([token], cache, copy=False, last=1)[0, -1]: the logits [V] after one more token of a one-row
        cache, valid until the next call on it. AR calls this per token: when the last call ran on the same cache
        on the host with room left, it writes the token and one mask entry and runs, skipping forward's general
        checks, whose cold Python (the call just flushed the CPU's caches) cost ~10 us a token here."""
        entry = self._last[1]()
        if (entry is not None and self._on_host and self._last[0]() is cache and entry.shape == (1, 1, 1)
                and not entry.positional and entry.filled == cache.length < cache.capacity and entry.kv is cache.bound()):
            entry.ids[0, 0] = token
            entry.mask[0, entry.filled] = 1
            entry.filled += 1
            t0 = time.perf_counter()
            self._sess.run_with_iobinding(entry.io)
            self.time_s += time.perf_counter() - t0
            self.calls += 1
            cache.advance(1)
            return entry.logits[0, 0]
        return self.forward([token], cache, copy=False, last=1)[0, -1]

    def forward_top(self, tokens, cache: KVCache, k: int, banned=None) -> tuple[list[list[float]], list[list[int]]]:
        """forward(tokens, cache, last=1) on a fused draft's beam graph (`beam_head`): each row's k best next tokens
        under the log-softmax of its logits, with that row's `banned` tokens removed first (a row whose every token is
        banned keeps them all, as repetition.ban_tokens does): (log-likelihoods, token ids), best first. The same
        numbers as Scorer.beam over the banned logits, out of the model call itself."""
        ids = _rows(tokens)
        if ids.shape[0] > 1 and ids.shape[1] > 1:
            raise ValueError("forward_top takes one token per row, or one row")
        self._run_fused(ids, cache, None, copy=False, last=1, top=(k, banned))
        return self._top

    def forward_tree(self, tokens, parents, cache: KVCache) -> np.ndarray:
        """Run a token tree [S] (parents[i]: node i's parent, -1 for the context) after the past in one call; every
        node's logits and KV equal a causal forward over its root-to-node path. The cache grows by all S nodes
        (drop the rejected ones with cache.keep). Returns float32 logits [1, S, V]."""
        if not self.spec.tree_attention:
            raise ConfigError(f"the {self.spec.role} graph has no tree attention; re-export the bundle with "
                              "`mjsd export --tree-attention`")
        ids = _rows(tokens)
        p = tree.check_parents(parents)
        if ids.shape != (1, p.size):
            raise ValueError(f"a tree of {p.size} parents needs {p.size} tokens in one row, got shape {ids.shape}")
        return self._run(ids, cache, p)

    def _run(self, ids: np.ndarray, cache: KVCache, parents: np.ndarray | None = None) -> np.ndarray:
        b, s = ids.shape
        if b != cache.batch:
            raise ValueError(f"{b} token rows for a cache of {cache.batch} rows")
        if self.fused:
            return self._run_fused(ids, cache, parents)
        cache.check_fits(s)
        past = cache.length
        if parents is None:
            feeds = {"input_ids": ids, "attention_mask": np.ones((b, past + s), dtype=np.int64)}
            if self._has_positions:
                feeds["position_ids"] = np.repeat(np.arange(past, past + s, dtype=np.int64)[None], b, axis=0)
        else:
            bias = tree.attention_bias(parents, past, DTYPES[self.spec.dtype])
            feeds = {"input_ids": ids, "position_ids": np.repeat(tree.positions(parents, past)[None], b, axis=0),
                     tree.BIAS: np.repeat(bias, b, axis=0)}
        if self.device is None:
            feeds.update(zip(self._past, (t for pair in zip(cache.keys, cache.values) for t in pair)))
            t0 = time.perf_counter()
            outs = self._sess.run(self._outputs, feeds)
            self.time_s += time.perf_counter() - t0
            logits, presents = outs[0], outs[1:]
        else:
            logits, presents = self._run_bound(feeds, cache)
        self.calls += 1
        cache.update(presents)
        return logits.astype(np.float32, copy=False)

    def _run_fused(self, ids: np.ndarray, cache: KVCache, parents: np.ndarray | None, copy: bool = True,
                   last: int = 0, top: tuple | None = None):
        """Fused graph: the cache's shared buffer is bound as past and present; the new KV is written in place."""
        b, s = ids.shape
        if b != cache.batch:
            raise ValueError(f"{b} token rows for a cache of {cache.batch} rows")
        past = cache.length
        if past == 0 and parents is not None and s > 1 and np.any(parents != tree.chain(s)):
            # with no past, GroupQueryAttention ignores position_ids and the bias (its first-prompt path): feed the
            # root first, then the tree below it (node i's parent p becomes p - 1)
            if np.any(parents[1:] < 0):
                raise ValueError("a fused graph needs one root first for a tree without a context")
            first = self._run_fused(ids[:, :1], cache, None)
            return np.concatenate([first, self._run_fused(ids[:, 1:], cache, parents[1:] - 1)], axis=1)
        cache.reserve(s)
        if b > 1 and s > 1 and past:
            # GroupQueryAttention refuses several rows of several tokens after a past: one row at a time (MJGD's
            # enumeration; beams feed one token a step and MCSD verifies as a tree, so decoding never gets here)
            positions, bias = self._inputs(parents, past, s)
            logits = np.concatenate([self._bind_run(ids[r:r + 1], past, positions, bias, cache.bound(r), last=last)
                                     for r in range(b)])
        elif parents is None and self._on_host and (past or b == 1):
            # the kept full-width inputs; a prompt pass too, whose wide mask sends GroupQueryAttention down its
            # past-context path (the same logits to the bit; refused for several rows of several tokens)
            logits = self._bind_run(ids, past, None, None, cache.bound(), cache, copy, last=last, top=top)
        else:
            logits = self._bind_run(ids, past, *self._inputs(parents, past, s), cache.bound(), cache, copy,
                                    on_tree=parents is not None, last=last, top=top)
        cache.advance(s)
        return logits

    def _inputs(self, parents: np.ndarray | None, past: int, s: int) -> tuple[np.ndarray | None, np.ndarray]:
        """positions [1, S] (None: a chain) and attention bias [1, 1, S, past + S] of a call."""
        if parents is None:  # a chain: GroupQueryAttention is causal by itself, the bias adds nothing
            return None, self._filled("zeros", s * (past + s)).reshape(1, 1, s, past + s)
        return tree.positions(parents, past)[None], tree.attention_bias(parents, past, DTYPES[self.spec.dtype])

    def _bind_run(self, ids: np.ndarray, past: int, positions: np.ndarray | None, bias: np.ndarray | None, kv: list,
                  cache: KVCache | None = None, copy: bool = True, on_tree: bool = False, last: int = 0,
                  top: tuple | None = None) -> np.ndarray:
        """One run over the KV OrtValues kv (bound as past and present), on the tree graph's session if `on_tree`,
        the beam graph's with `top`.
        positions: [1, S] (None: a chain after `past`). bias None: a chain on the host, run on the binding's kept
        mask and zero bias as wide as the whole buffer (GroupQueryAttention reads the length from the mask's ones),
        so such a call writes a few ints and rebinds nothing. A cache's binding is kept while its buffers and the
        call's shape stay the same, with the arrays bound to it (token ids, positions, logits): right after a call,
        whose weights flushed the CPU caches, each rebinding costs ~20 us of cold Python and pybind. A session
        without position_ids and attention_bias (a chain graph) is fed neither. copy=False returns the host logits
        array itself, valid until the next call on this cache. last: logits of the last positions only (forward).
        top: (k, banned rows) for the beam head (forward_top); its results go to self._top."""
        b, s = ids.shape
        keep = min(last, s) if last and self._keeps else s  # the logit rows the graph computes
        if top is not None:
            sess, bindings = self._beam(), self._beam_bindings
        else:
            sess, bindings = (self._tree(), self._tree_bindings) if on_tree else (self._sess, self._bindings)
        chain = not on_tree and top is None  # the chain graph's last binding is kept at hand
        # a binding per row count (a beam draft alternates between 1 and W rows) and for one token a row or more
        # (decode steps vs prompt passes, verifications and a draft's catch-up): each keeps its arrays bound
        key, entry = (b, s == 1), None
        if cache is not None:
            entry = self._last[1]() if chain and self._last[0]() is cache else None
            if entry is None or entry.kv is not kv or entry.key != key:
                entry = bindings.setdefault(cache, {}).get(key)
        if entry is None or entry.kv is not kv:
            entry = _Binding(sess.io_binding(), kv, key, positional=on_tree or self._positional)
            for past_name, present_name, t in zip(self._past, self._present, kv):
                entry.io.bind_ortvalue_input(past_name, t)
                entry.io.bind_ortvalue_output(present_name, t)
            if cache is not None:
                bindings[cache][key] = entry
        if cache is not None and chain and self._last[1]() is not entry:
            self._last = (weakref.ref(cache), weakref.ref(entry))
        io = entry.io
        if entry.shape != (b, s, keep):  # rebind only what the new shape changes (a prompt pass: the token ids)
            old = entry.shape or (None, None, None)
            if old[:2] != (b, s):
                if old[0] != b or entry.positional:  # the mask's rows, or the bias's [S, width]
                    entry.mask = None
                entry.ids, entry.positions = np.empty((b, s), np.int64), np.empty((b, s), np.int64)
                io.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(entry.ids))
                if entry.positional:
                    io.bind_ortvalue_input("position_ids", ort.OrtValue.ortvalue_from_numpy(entry.positions))
            entry.shape = (b, s, keep)
            kept = keep if keep < s else 0  # logits_to_keep: 0 = every position
            if self._keeps and (entry.keep is None or entry.keep[0] != kept):
                entry.keep = np.array([kept], np.int64)
                io.bind_ortvalue_input("logits_to_keep", ort.OrtValue.ortvalue_from_numpy(entry.keep))
            if old[0] != b or old[2] != keep:
                # ORT writes the logits into this host array, copying them from a GPU: get_outputs() would wrap
                # every output, in binding order (the presents were bound first)
                entry.logits = np.empty((b, keep, self.spec.vocab_size), np.float32)
                io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(entry.logits))
        if b == s == 1:  # a scalar write: every NumPy call here runs on cold caches
            entry.ids[0, 0] = ids[0, 0]
        else:
            entry.ids[...] = ids
        if entry.positional:
            if s == 1:
                entry.positions[:, 0] = past if positions is None else positions[:, 0]
            else:
                entry.positions[...] = np.arange(past, past + s) if positions is None else positions
        if bias is None:
            entry.fill(past + s, cache.capacity, DTYPES[self.spec.dtype])
        else:
            entry.mask = None
            io.bind_cpu_input("attention_mask", self._filled("ones", b * bias.shape[-1]).reshape(b, -1))
            if entry.positional:
                io.bind_cpu_input(tree.BIAS, bias)
        banned = self._head(entry, b, *top) if top is not None else ()
        t0 = time.perf_counter()
        try:
            sess.run_with_iobinding(io)
        finally:
            for r, t in banned:  # back to nothing banned, even after a failed run: the bias is kept for the next
                entry.ban[r, t] = 0
        self.time_s += time.perf_counter() - t0
        self.calls += 1
        if top is not None:
            self._top = (entry.top[0].tolist(), entry.top[1].tolist())
        logits = entry.logits
        if last and last < logits.shape[1]:  # a graph without logits_to_keep
            logits = logits[:, -last:]
        return logits.copy() if copy else logits

    def _head(self, entry: _Binding, b: int, k: int, banned) -> list[tuple[int, int]]:
        """Bind the beam head's k, bias and outputs (once per k) and write the banned tokens' -inf into the bias;
        returns the (row, token) pairs written."""
        vocab = self.spec.vocab_size
        if entry.ban is None or entry.ban.shape[0] != b:
            entry.ban, entry.top = np.zeros((b, vocab), np.float32), None
            entry.io.bind_ortvalue_input("beam_bias", ort.OrtValue.ortvalue_from_numpy(entry.ban))
        if entry.top is None or entry.top[0].shape[1] != k:
            entry.beam_k = np.array([k], np.int64)
            entry.top = (np.empty((b, k), np.float32), np.empty((b, k), np.int64))
            entry.io.bind_ortvalue_input("beam_k", ort.OrtValue.ortvalue_from_numpy(entry.beam_k))
            for name, a in zip(("beam_logprobs", "beam_ids"), entry.top):
                entry.io.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(a))
        if not banned:
            return []
        pairs = [(r, t) for r, row in enumerate(banned) if len(row) < vocab for t in row if t < vocab]
        for r, t in pairs:  # a draft step bans a few tokens: scalar writes
            entry.ban[r, t] = -np.inf
        return pairs

    def _filled(self, kind: str, n: int) -> np.ndarray:
        """n ones (int64: the attention mask) or zeros (the model dtype: a chain's bias), a view of a kept buffer:
        these never change, so they are not rebuilt per call."""
        buf = self._buffers.get(kind)
        if buf is None or buf.size < n:
            size = max(n, 2 * (buf.size if buf is not None else 256))
            buf = np.ones(size, np.int64) if kind == "ones" else np.zeros(size, DTYPES[self.spec.dtype])
            self._buffers[kind] = buf
        return buf[:n]

    def _run_bound(self, feeds: dict, cache: KVCache):
        """GPU branch: past and present stay on the device; only the logits are copied to the host."""
        binding = self._sess.io_binding()
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, arr)
        for name, t in zip(self._past, (t for pair in zip(cache.keys, cache.values) for t in pair)):
            binding.bind_ortvalue_input(name, t)
        binding.bind_output("logits", "cpu")
        for name in self._present:
            binding.bind_output(name, *self.device)
        t0 = time.perf_counter()
        self._sess.run_with_iobinding(binding)
        self.time_s += time.perf_counter() - t0
        outs = binding.get_outputs()
        return outs[0].numpy(), outs[1:]


SPARE_CACHES = 2  # released caches a session keeps for reuse (concurrent generations each take one)

# GroupQueryAttention with position_ids and attention_bias inputs (tree verification) needs this onnxruntime
MIN_ORT_FUSED = (1, 22)


def check_fused_support(spec, on_gpu: bool, version: str = ort.__version__) -> None:
    """Refuse, at load, a fused graph this onnxruntime or execution provider cannot run right."""
    have = tuple(int(x) for x in version.split(".")[:2] if x.isdigit())
    if have < MIN_ORT_FUSED:
        raise BundleError(f"{spec.role} model is a fused graph (GroupQueryAttention with tree inputs), which needs "
                          f"onnxruntime >= {'.'.join(map(str, MIN_ORT_FUSED))}; this is {version}: upgrade "
                          "onnxruntime, or re-export with `mjsd export --graph-kind standard`")
    if on_gpu and spec.dtype == "float32":
        raise BundleError(f"{spec.role} model is a float32 fused graph, and GroupQueryAttention has no float32 CUDA "
                          "kernel: pass --fp16 (fp16=True) to run an fp16 copy, re-export with `mjsd export --fp16`, "
                          "or run it with --provider cpu")


class _Binding:
    """A fused session's IOBinding over one cache's KV OrtValues, with the kept arrays bound to its small inputs."""
    __slots__ = ("io", "kv", "key", "positional", "shape", "ids", "positions", "logits", "keep", "mask", "bias", "filled",
                 "beam_k", "ban", "top", "__weakref__")

    def __init__(self, io, kv: list, key: tuple, positional: bool):
        self.io, self.kv, self.key, self.positional, self.shape = io, kv, key, positional, None
        self.ids = self.positions = self.logits = self.keep = self.mask = self.bias = None
        self.beam_k = self.ban = self.top = None
        self.filled = 0

    def fill(self, length: int, width: int, dtype) -> None:
        """Bind (once per shape and buffer width) a [B, width] mask and a [1, 1, S, width] zero bias, and set the
        mask's first `length` columns to one, the rest to zero, writing only the columns that changed."""
        if self.mask is None or self.mask.shape[1] != width:
            self.mask, self.filled = np.zeros((self.shape[0], width), np.int64), 0
            self.io.bind_ortvalue_input("attention_mask", ort.OrtValue.ortvalue_from_numpy(self.mask))
            if self.positional:  # a chain graph takes no bias
                self.bias = np.zeros((1, 1, self.shape[1], width), dtype)
                self.io.bind_ortvalue_input(tree.BIAS, ort.OrtValue.ortvalue_from_numpy(self.bias))
        if length == self.filled + 1 and self.shape[0] == 1:  # one token of one row: a scalar write
            self.mask[0, self.filled] = 1
        elif length > self.filled:
            self.mask[:, self.filled:length] = 1
        elif length < self.filled:
            self.mask[:, length:self.filled] = 0
        self.filled = length


def _rows(tokens) -> np.ndarray:
    ids = np.asarray(tokens, dtype=np.int64)
    return ids[None] if ids.ndim == 1 else ids
