"""MCSD: multi-candidate speculative decoding (Yang et al. 2024), algorithms.md sections 6-8.

The draft grows a candidate tree level by level (k_config children per node, with or without replacement; the
draft cache fanned out to one row per node); the target scores it; the exact walk of candidates.py accepts a path
and draws the next token, so the output follows the target's distribution (AR greedy at T = 0). Strategy "batch":
each root-to-leaf path is one row of ONE target call of B x (depth + 1) tokens; afterwards both caches keep the
winner's row, cropped to the accepted text. The walk only needs each node's target logits, so a tree-attention
strategy replaces `target_levels_batch` and the row bookkeeping, nothing else.
"""
from __future__ import annotations

from collections.abc import Iterator
from math import prod

import numpy as np

from ..candidates import (CandidateTree, level_probs_from_rows, propose_children, relative_node, top_children,
                          verify_tree)
from ..errors import ConfigError
from ..sampling import shared_vocab
from .common import DecodeContext

MAX_PATHS = 256  # batch rows of one target call; more would cost far more than the tokens they could win


def mcsd(ctx: DecodeContext) -> Iterator[list[int]]:
    # checked when the driver creates the generator, before any round
    cfg = ctx.cfg
    if cfg.mcsd_strategy != "batch":
        raise ConfigError(f"mcsd_strategy={cfg.mcsd_strategy!r} needs tree-attention verification, which this "
                          "version does not run yet: use mcsd_strategy='batch'")
    if prod(cfg.k_config) > MAX_PATHS:
        raise ConfigError(f"k_config={cfg.k_config} makes {prod(cfg.k_config)} candidate paths; the batch strategy "
                          f"verifies at most {MAX_PATHS} in one call: use fewer children per depth")
    return _rounds(ctx)


def draft_tree(ctx: DecodeContext) -> CandidateTree:
    """Grow the candidate tree with the draft, one call per level; the draft cache ends with one row per node of
    the last internal level (the leaves are never fed)."""
    cfg, cache = ctx.cfg, ctx.draft_cache
    tree, feed = CandidateTree(cfg.k_config), [ctx.unfed(cache)]
    for s, k in enumerate(cfg.k_config):
        if s:
            cache.gather(np.repeat(np.arange(cache.batch), cfg.k_config[s - 1]))  # one row per child
        logits = shared_vocab(ctx.draft.forward(feed, cache)[:, -1], ctx.vocab_size)
        q = ctx.dist(logits)
        if cfg.temperature == 0 and not cfg.mcsd_replacement:
            children = top_children(logits, k)
        else:
            children = propose_children(ctx.rng, q, k, cfg.mcsd_replacement)
        tree.add_level(q, children)
        feed = children.reshape(-1, 1)
    return tree


def target_levels_batch(ctx: DecodeContext, tree: CandidateTree) -> list[np.ndarray]:
    """Batch strategy: one target call over every root-to-leaf path; returns the logits at every tree level's
    nodes. The target cache is left with one row per path."""
    paths = tree.paths()
    feed = np.column_stack([np.tile(ctx.unfed(ctx.target_cache), (len(paths), 1)), paths])
    ctx.target_cache.repeat(len(paths))
    logits = ctx.target.forward(feed, ctx.target_cache)[:, -(paths.shape[1] + 1):]
    return level_probs_from_rows(logits, tree.k_config)


def _rounds(ctx: DecodeContext) -> Iterator[list[int]]:
    k_config, depth = ctx.cfg.k_config, len(ctx.cfg.k_config)
    while True:
        base = len(ctx.ids)  # accepted text incl. the pending token
        tree = draft_tree(ctx)
        target = [ctx.dist(level) for level in target_levels_batch(ctx, tree)]
        accepted, node, token = verify_tree(ctx.rng, tree, target, ctx.cfg.mcsd_replacement)
        n = len(accepted)
        # keep the rows on the accepted path: any leaf under the last accepted node (target), its node at the last
        # internal level (draft, which never saw a leaf token: the next round feeds it)
        ctx.target_cache.gather([relative_node(k_config, n, node, depth)])
        ctx.target_cache.crop(base + n)
        ctx.draft_cache.gather([relative_node(k_config, n, node, depth - 1)])
        ctx.draft_cache.crop(min(ctx.draft_cache.length, base + n))
        ctx.stats.record_round(depth, n)
        new = accepted + [token]
        ctx.ids += new
        yield new
