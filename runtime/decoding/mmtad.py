"""MMTAD: multi-candidate MTAD (Qin et al. 2025), algorithms.md section 5. Needs a tree-attention target graph.

The draft beam-decodes gamma steps with W beams exactly as MTAD does (beam sampling, or beam search at T = 0), but
every beam of every depth is kept as a node of a token tree (parent = the beam it extended). One target call scores
all nodes with tree attention. A node passes if logP(path) - logQ(path) > log(tau); the deepest depth with a passing
node wins, among its passing nodes the one with the highest target joint logP. Its path and one target token
(argmax at T = 0, else a sample of the filtered target distribution) are appended. With W = 1 the tree is MTAD's
single chain and the output is MTAD's, token for token.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .. import tree
from ..joint import LOG_TOL
from .common import DecodeContext, require_tree_attention
from .mjsd import beam_step, score


def best_node(depth: np.ndarray, logp: np.ndarray, logq: np.ndarray, tau: float) -> int:
    """MMTAD's choice over nodes with path log-likelihoods logp, logq [N] at depths [N]: among the nodes with
    logp - logq > log(tau), the deepest, ties to the highest logp; -1 (the context) if none passes."""
    with np.errstate(invalid="ignore"):  # -inf - -inf is NaN, which fails like -inf
        passing = np.flatnonzero(logp - logq > np.log(tau) - LOG_TOL)
    if not passing.size:
        return -1
    deepest = passing[depth[passing] == depth[passing].max()]
    return int(deepest[np.argmax(logp[deepest])])


def path_logp(parents: np.ndarray, token_logp: np.ndarray) -> np.ndarray:
    """Joint log-likelihood of each node's path from the log-likelihoods of the nodes' own tokens (parents first)."""
    total = np.zeros(len(parents))
    for i, p in enumerate(parents):
        total[i] = (total[p] if p >= 0 else 0.0) + token_logp[i]
    return total


def draft_tree(ctx: DecodeContext, sampling: bool, gamma: int):
    """Beam-decode gamma draft steps, keeping every beam of every depth as a tree node (level by level).

    Returns tokens [N], parents [N] (-1 at depth 1), each node's path logQ [N], and rows [R, gamma-1]: for each row
    the draft cache ends with, the nodes of depths 1..gamma-1 it holds (the deepest level is never fed)."""
    cache, width = ctx.draft_cache, ctx.cfg.beam_width
    feed = [ctx.unfed(cache)]
    tokens, parents, logq_path = [], [], []  # per depth
    level, rows = np.full(1, -1), np.zeros((1, 0), np.int64)  # node ids of the current beams (-1: the context)
    cum, greedy = [0.0], 0
    for s in range(gamma):
        if s:
            cache.gather(beam_parents)
            rows = np.column_stack([rows[beam_parents], level])
        logits = ctx.draft.forward(feed, cache, copy=False, last=1)[:, -1]
        beam_parents, toks, cum, picked, greedy = beam_step(ctx, logits, cum, greedy, sampling)  # MTAD's step
        first = sum(map(len, tokens))
        tokens.append(toks)
        parents.append(level[beam_parents])
        # summed exactly as MTAD sums its chain's logQ, so W = 1 decides the same at the threshold
        logq_path.append((logq_path[-1][beam_parents] if s else 0.0) + np.array(picked, np.float64))
        level = first + np.arange(len(toks))
        feed = [[t] for t in toks]
    return np.concatenate(tokens), np.concatenate(parents), np.concatenate(logq_path), rows


def mmtad(ctx: DecodeContext) -> Iterator[list[int]]:
    require_tree_attention(ctx, "mmtad")  # checked when the driver creates the generator, before any round
    return _rounds(ctx, sampling=ctx.cfg.temperature > 0)


def _rounds(ctx: DecodeContext, sampling: bool) -> Iterator[list[int]]:
    while True:
        gamma = ctx.draft_len()
        base = len(ctx.ids)  # accepted text incl. the pending token
        tokens, parents, logq, rows = draft_tree(ctx, sampling, gamma)
        unfed, start = ctx.unfed(ctx.target_cache), ctx.target_cache.length
        logits = ctx.target.forward_tree(unfed + tokens.tolist(), tree.after_chain(parents, len(unfed)),
                                         ctx.target_cache)[0]
        # node i was scored at its parent's row: the last unfed token's for depth 1
        scored_at = np.where(parents < 0, -1, parents) + len(unfed)
        logp = path_logp(parents, score(ctx, logits)[scored_at, tokens])
        node = best_node(tree.depths(parents), logp, logq, ctx.cfg.tau)
        path = tree.path(parents, node)
        token = ctx.pick(logits[len(unfed) + node])  # node -1: the last unfed token's row
        ctx.target_cache.keep(np.r_[np.arange(start + len(unfed)), start + len(unfed) + np.array(path, np.int64)])
        # the draft keeps the row sharing most of the path (a beam may have died out); it feeds the rest next round
        shared = (rows[:, :len(path)] == np.array(path[:rows.shape[1]], np.int64)).cumprod(axis=1).sum(axis=1)
        ctx.draft_cache.gather([int(np.argmax(shared))])
        ctx.draft_cache.crop(base + int(shared.max()))
        n = len(path)
        ctx.stats.record_round(gamma, n)
        new = tokens[path].tolist() + [token]
        ctx.ids += new
        yield new
