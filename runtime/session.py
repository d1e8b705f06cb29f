"""ModelSession: one ONNX Runtime InferenceSession over a bundle's exported graph.

`forward(tokens, cache)` runs tokens [B, S] after the cached past, grows the cache by S and returns logits
[B, S, V]. Time inside ORT's run is accumulated in `time_s` (and `calls`), so statistics can split model time from
orchestration.

A tree-attention graph (bundle flag `tree_attention`) takes an additive bias [B, 1, S, past+S] instead of the rank-2
mask; `forward` feeds it a causal bias, and `forward_tree(tokens, parents, cache)` verifies a whole token tree in one
call (tree.py describes trees).

CPU: plain NumPy feeds (IO binding gave no gain on CPU, platform-notes). CUDA/TensorRT: IO binding, the presents
stay on the device as OrtValues and are rebound as the next past; only logits come back to the host.
`io_binding=True` on CPU runs that same branch with host OrtValues (how the tests cover it without a GPU).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import onnxruntime as ort

from .bundle import ModelSpec, check_session_io
from . import tree
from .errors import BundleError, ConfigError
from .kvcache import DTYPES, KVCache
from .providers import ORT_NAMES, provider_options, select_providers

log = logging.getLogger(__name__)


class ModelSession:
    def __init__(self, spec: ModelSpec, providers=("cpu",), threads: int | None = None, *, max_batch: int = 1,
                 fp16: bool = False, engine_cache_path: str | None = None, device_id: int = 0,
                 io_binding: bool | None = None):
        chosen, reasons = select_providers(list(providers), ort.get_available_providers())
        for reason in reasons:
            log.warning("%s model: %s", spec.role, reason)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # ORT's own warnings (e.g. unused initializers) are noise for users
        if threads:
            opts.intra_op_num_threads = threads
        # target and draft alternate: idle worker threads spinning for one session would steal the cores the other
        # session (and the NumPy orchestration) needs
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        provs = [(name, provider_options(name, spec, max_context=spec.max_context, max_batch=max_batch, fp16=fp16,
                                         engine_cache_path=engine_cache_path, device_id=device_id))
                 for name in chosen]
        try:
            self._sess = ort.InferenceSession(str(spec.path), opts, providers=provs)
        except Exception as e:  # ORT's Fail/InvalidProtobuf/InvalidGraph...: the graph file is unusable
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BundleError(f"{spec.role} model {spec.path}: ONNX Runtime could not load the graph ({first}); "
                              "the file is corrupt or incompatible, re-export the bundle with `mjsd export`") from None
        check_session_io(spec, [i.name for i in self._sess.get_inputs()], [o.name for o in self._sess.get_outputs()])
        self.spec = spec
        self.providers = self._sess.get_providers()
        on_gpu = self.providers[0] in (ORT_NAMES["cuda"], ORT_NAMES["tensorrt"])
        bound = on_gpu if io_binding is None else io_binding
        self.device = (("cuda", device_id) if on_gpu else ("cpu", 0)) if bound else None  # where the KV lives
        self._past = [n for pair in spec.past_names() for n in pair]
        self._present = [n for pair in spec.present_names() for n in pair]
        self._outputs = ["logits", *self._present]
        self._has_positions = "position_ids" in spec.inputs
        self.time_s = 0.0  # accumulated time inside ORT run calls
        self.calls = 0

    def new_cache(self, batch: int = 1) -> KVCache:
        return KVCache.for_model(self.spec, batch, self.device)

    def forward(self, tokens, cache: KVCache) -> np.ndarray:
        """Run tokens [B, S] (or [S]) after the cache's past; the cache grows by S. Returns float32 logits [B,S,V]."""
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        b, s = ids.shape
        if b != cache.batch:
            raise ValueError(f"{b} token rows for a cache of {cache.batch} rows")
        cache.check_fits(s)
        past = cache.length
        positions = np.repeat(np.arange(past, past + s, dtype=np.int64)[None], b, axis=0)
        if self.spec.tree_attention:
            bias = np.repeat(tree.attention_bias(tree.chain(s), past, DTYPES[self.spec.dtype]), b, axis=0)
            return self._run({"input_ids": ids, "position_ids": positions, tree.BIAS: bias}, cache)
        feeds = {"input_ids": ids, "attention_mask": np.ones((b, past + s), dtype=np.int64)}
        if self._has_positions:
            feeds["position_ids"] = positions
        return self._run(feeds, cache)

    def forward_tree(self, tokens, parents, cache: KVCache) -> np.ndarray:
        """Run a token tree (tokens [S], parents [S] as in tree.py) after a batch-1 cache's past in one call; the
        cache grows by S (keep the accepted path with `cache.keep`). Returns logits [S, V]: row i predicts node i's
        children, exactly as a plain forward over node i's path would."""
        if not self.spec.tree_attention:
            raise ConfigError(f"{self.spec.role} model {self.spec.path}: this graph has no tree attention; "
                              "re-export the bundle with `mjsd export --tree-attention`")
        ids = np.asarray(tokens, dtype=np.int64).reshape(1, -1)
        parents = tree.check_parents(parents)
        if parents.size != ids.shape[1] or cache.batch != 1:
            raise ValueError(f"a tree of {ids.shape[1]} tokens, {parents.size} parents and a cache of {cache.batch} "
                             "rows: forward_tree needs one parent per token and a batch-1 cache")
        cache.check_fits(ids.shape[1])
        past = cache.length
        feeds = {"input_ids": ids, "position_ids": tree.positions(parents, past)[None],
                 tree.BIAS: tree.attention_bias(parents, past, DTYPES[self.spec.dtype])}
        return self._run(feeds, cache)[0]

    def _run(self, feeds: dict, cache: KVCache) -> np.ndarray:
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
