"""MCSD: multi-candidate speculative decoding (Yang et al. 2024), algorithms.md sections 6-8.

The draft grows a candidate tree level by level (k_config children per node, with or without replacement; the
draft cache fanned out to one row per node); the target scores it; the exact walk of candidates.py accepts a path
and draws the next token, so the output follows the target's distribution (AR greedy at T = 0). Strategy "batch":
each root-to-leaf path is one row of ONE target call of B x (depth + 1) tokens; afterwards both caches keep the
winner's row, cropped to the accepted text. Strategy "tree" (needs a tree-attention target graph): every node once,
in one sequence of one call with the tree bias, so shared prefixes are computed once; afterwards the target cache
keeps the accepted path's positions. The walk only needs each node's target logits, so the strategies differ in
`target_levels_*` and the target cache bookkeeping, nothing else. A fused target graph always runs the tree strategy.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from math import prod

import numpy as np

from ..candidates import (CandidateTree, level_probs_from_rows, propose_children, relative_node, top_children,
                          verify_tree)
from ..errors import ConfigError
from ..sampling import shared_vocab
from ..tree import after_chain
from .common import DecodeContext, require_tree_attention

MAX_PATHS = 256  # batch rows of one target call; more would cost far more than the tokens they could win


def mcsd(ctx: DecodeContext) -> Iterator[list[int]]:
    # checked when the driver creates the generator, before any round
    cfg = ctx.cfg
    if cfg.mcsd_strategy == "batch" and ctx.target.fused:
        # GroupQueryAttention verifies no batch of several tokens after a past; the tree strategy accepts the same
        # tokens in one row, with shared prefixes computed once
        ctx.cfg = cfg = replace(cfg, mcsd_strategy="tree")
    if cfg.mcsd_strategy == "tree":
        require_tree_attention(ctx, "mcsd_strategy='tree'")
    elif prod(cfg.k_config) > MAX_PATHS:
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
        logits = shared_vocab(ctx.draft.forward(feed, cache, last=1)[:, -1], ctx.vocab_size)
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


def node_index(k_config, level: int, node):
    """Position in the tree strategy's sequence (levels 1..d in order) of a level's node(s)."""
    return sum(prod(k_config[:s]) for s in range(1, level)) + node


def node_parents(k_config) -> np.ndarray:
    """The candidate tree's nodes in that sequence as a tree.py parents array (-1: a child of the context)."""
    parents = [np.full(k_config[0], -1)]
    for s in range(2, len(k_config) + 1):
        parents.append(node_index(k_config, s - 1, np.arange(prod(k_config[:s])) // k_config[s - 1]))
    return np.concatenate(parents)


def target_levels_tree(ctx: DecodeContext, tree: CandidateTree) -> tuple[list[np.ndarray], int]:
    """Tree strategy: one tree-attention call over every node of the candidate tree; returns the logits at every
    tree level's nodes and the cache position of the first node (the target cache grows by all the nodes)."""
    unfed, k_config = ctx.unfed(ctx.target_cache), tree.k_config
    first = ctx.target_cache.length + len(unfed)
    logits = ctx.target.forward_tree(unfed + np.concatenate(tree.tokens).tolist(),
                                     after_chain(node_parents(k_config), len(unfed)), ctx.target_cache)[0]
    starts = [len(unfed) + node_index(k_config, s, 0) for s in range(1, len(k_config) + 1)]
    return [logits[len(unfed) - 1:len(unfed)]] + [logits[a:a + len(t)] for a, t in zip(starts, tree.tokens)], first


def _rounds(ctx: DecodeContext) -> Iterator[list[int]]:
    k_config, depth = ctx.cfg.k_config, len(ctx.cfg.k_config)
    while True:
        base = len(ctx.ids)  # accepted text incl. the pending token
        tree = draft_tree(ctx)
        if ctx.cfg.mcsd_strategy == "tree":
            levels, first = target_levels_tree(ctx, tree)
        else:
            levels = target_levels_batch(ctx, tree)
        target = [ctx.dist(level) for level in levels]
        accepted, node, token = verify_tree(ctx.rng, tree, target, ctx.cfg.mcsd_replacement)
        n = len(accepted)
        # keep the accepted path: its positions (tree) or any leaf row under the last accepted node (batch); the
        # draft keeps that node's row at the last internal level (it never saw a leaf token: the next round feeds it)
        if ctx.cfg.mcsd_strategy == "tree":
            path = [node_index(k_config, s, relative_node(k_config, n, node, s)) for s in range(1, n + 1)]
            ctx.target_cache.keep(np.r_[np.arange(first), first + np.array(path, np.int64)])
        else:
            ctx.target_cache.gather([relative_node(k_config, n, node, depth)])
            ctx.target_cache.crop(base + n)
        ctx.draft_cache.gather([relative_node(k_config, n, node, depth - 1)])
        ctx.draft_cache.crop(min(ctx.draft_cache.length, base + n))
        ctx.stats.record_round(depth, n)
        new = accepted + [token]
        ctx.ids += new
        yield new
