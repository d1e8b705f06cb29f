"""Tree attention: the tree-capable export, tree masks, KV path selection, MMTAD and the MCSD tree strategy, on real
exported graphs (the llama bundles have GQA: 4 heads over 2 KV heads)."""
import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

from mjsd.runtime import tree
from mjsd.runtime.bundle import load_bundle
from mjsd.runtime.cli import main
from mjsd.runtime.config import GenerationConfig
from mjsd.runtime.decoding import ALGORITHMS, generate_ids, prefill
from mjsd.runtime.decoding.mmtad import best_node, path_logp
from mjsd.runtime.errors import ConfigError, ExportError
from mjsd.runtime.kvcache import KVCache
from mjsd.runtime.session import ModelSession
from mjsd.runtime.stats import GenerationStats
from tests.test_ar_sps import NoisyDraft
from tests.test_mcsd import PROMPTS, run_rounds

# exactness tests compare with the raw model: no repetition control (mcsd, mmtad and PyTorch do not apply it)
RAW = dict(no_repeat_ngram_size=0)

PARENTS = [-1, 0, 0, 1, -1, 4, 3, 2]  # two roots, siblings, branches, depth 4


@pytest.fixture(scope="module")
def llama(llama_tree_bundle):
    """The bundle, target and draft sessions, and a second target session: a perfect draft, and the base of noisy
    drafts (`noisy(twin)`: a fresh one per run, so two runs see the same noise)."""
    b = load_bundle(llama_tree_bundle)
    return b, ModelSession(b.target, threads=1), ModelSession(b.draft, threads=1), ModelSession(b.target, threads=1)


def noisy(twin, seed=3):
    return NoisyDraft(twin, scale=1.0, seed=seed)


# ---- tree description: pure NumPy -----------------------------------------------------------------------------

def test_masks_positions_and_paths():
    anc = tree.ancestors(PARENTS)
    assert anc[6].nonzero()[0].tolist() == [0, 1, 3, 6] and anc[5].nonzero()[0].tolist() == [4, 5]
    assert tree.depths(PARENTS).tolist() == [1, 2, 2, 3, 1, 2, 4, 3]
    assert tree.positions(PARENTS, 10).tolist() == [10, 11, 11, 12, 10, 11, 13, 12]
    bias = tree.attention_bias(PARENTS, 3)
    assert bias.shape == (1, 1, 8, 11) and (bias[0, 0, :, :3] == 0).all()
    np.testing.assert_array_equal(bias[0, 0, :, 3:] == 0, anc)
    assert tree.path(PARENTS, 6) == [0, 1, 3, 6] and tree.path(PARENTS, -1) == []
    chain = tree.attention_bias(tree.chain(4), 0)[0, 0] == 0
    np.testing.assert_array_equal(chain, np.tril(np.ones((4, 4), bool)))
    assert tree.after_chain([-1, 0, -1], 2).tolist() == [-1, 0, 1, 2, 1]
    for bad in ([0], [-1, 1], [-2], [[-1]]):
        with pytest.raises(ValueError, match="parents"):
            tree.ancestors(bad)


def test_best_node_takes_the_deepest_passing_depth_then_the_highest_logp():
    depth = np.array([1, 1, 2, 2, 3])
    logq = np.zeros(5)
    # the depth-3 node fails; of the depth-2 nodes both pass, the higher logP wins even though a shallower is higher
    assert best_node(depth, np.log([0.9, 0.95, 0.6, 0.7, 0.1]), logq, 0.5) == 3
    assert best_node(depth, np.log([0.9, 0.95, 0.6, 0.7, 0.8]), logq, 0.5) == 4
    assert best_node(depth, np.log([0.1, 0.2, 0.1, 0.1, 0.1]), logq, 0.5) == -1
    assert best_node(depth, np.array([-np.inf] * 5), np.array([-np.inf] * 5), 0.5) == -1
    assert path_logp(np.array([-1, 0, 0, 1]), np.array([-1.0, -2.0, -3.0, -4.0])).tolist() == [-1, -3, -4, -7]


def test_keep_gathers_sequence_positions():
    c = KVCache(2, 2, 3, 32)
    c.update([np.arange(2 * 2 * 6 * 3, dtype=np.float32).reshape(2, 2, 6, 3) + i for i in range(4)])
    keys = c.arrays()[0]
    c.keep([0, 1, 3, 5])
    assert c.length == 4 and c.batch == 2
    np.testing.assert_array_equal(c.arrays()[0], keys[:, :, [0, 1, 3, 5]])
    c.keep([0, 1])
    assert c.length == 2
    with pytest.raises(ValueError, match="keep positions"):
        c.keep([0, 2])


# ---- the export and the graph ---------------------------------------------------------------------------------

def test_manifest_marks_the_tree_graph(llama_tree_bundle, llama_bundle):
    b = load_bundle(llama_tree_bundle)
    assert b.target.tree_attention and not b.draft.tree_attention
    assert tree.BIAS in b.target.inputs and "attention_mask" not in b.target.inputs
    assert "position_ids" in b.target.inputs
    assert b.target.outputs == load_bundle(llama_bundle).target.outputs  # presents named as the optimum graph's
    tree_check = b.manifest["models"]["target"]["validation"]["tree"]
    assert tree_check["max_abs_diff"] < 1e-4 and tree_check["top1_agreement"] == 1.0
    assert b.manifest["provenance"]["options"]["tree_attention"] is True
    plain = load_bundle(llama_bundle).target
    assert plain.tree_attention == (plain.graph_kind == "fused")  # a fused graph always takes a tree bias


def test_every_node_equals_a_causal_forward_over_its_path(llama, llama_bundle):
    """After a context, one tree call: each node's logits and KV equal the standard (optimum) graph's plain causal
    forward over context + the node's root-to-node path."""
    b, target, _, _ = llama
    plain = ModelSession(load_bundle(llama_bundle).target, threads=1)
    context, nodes = [1, 17, 42, 99, 7], [5, 250, 3, 8, 60, 61, 62, 5]
    cache = target.new_cache()
    target.forward(context, cache)
    logits = target.forward_tree(nodes, PARENTS, cache)[0]
    assert logits.shape == (len(PARENTS), b.target.vocab_size) and cache.length == len(context) + len(PARENTS)
    for i in range(len(PARENTS)):
        path = tree.path(PARENTS, i)
        fresh = plain.new_cache()
        want = plain.forward(context + [nodes[j] for j in path], fresh)[0, -1]
        np.testing.assert_allclose(logits[i], want, atol=1e-4)
    # keeping the deepest path's positions leaves the cache of a plain forward over that path
    fresh = plain.new_cache()
    plain.forward(context + [nodes[j] for j in tree.path(PARENTS, 6)], fresh)
    cache.keep(list(range(len(context))) + [len(context) + j for j in tree.path(PARENTS, 6)])
    for got, ref in zip(cache.arrays(), fresh.arrays()):
        np.testing.assert_allclose(got, ref, atol=1e-5)


def test_causal_forward_on_the_tree_graph_equals_the_standard_graph(llama, llama_bundle):
    _, target, _, _ = llama
    plain = ModelSession(load_bundle(llama_bundle).target, threads=1)
    ids = np.array([[1, 17, 42, 99], [5, 250, 3, 8]])
    c1, c2 = target.new_cache(2), plain.new_cache(2)
    np.testing.assert_allclose(target.forward(ids, c1), plain.forward(ids, c2), atol=1e-4)
    np.testing.assert_allclose(target.forward(ids[:, :3], c1), plain.forward(ids[:, :3], c2), atol=1e-4)


def test_export_validation_refuses_a_wrong_tree(llama_tree_bundle, llama_checkpoints):
    from mjsd.export import graph, validate

    b = load_bundle(llama_tree_bundle)
    ids, tree_ids = validate.sample_ids(b.vocab_size), validate.sample_tree_ids(b.vocab_size)
    ref, tree_ref = validate.reference_logits(llama_checkpoints[0], ids, tree_ids)
    io = graph.read_io(b.target.path)
    stats = validate.validate_graph(b.target.path, io, ref, ids, "fp32", "target", (tree_ids, tree_ref))
    assert stats["tree"]["rel"] < 1e-5
    # reference logits of the paths as if every node saw every earlier node (a causal mask, not the tree's)
    context = validate.DEFAULT_LENGTHS["tree_context"]
    causal = validate.reference_logits(llama_checkpoints[0], tree_ids[None])[0, context:]
    with pytest.raises(ExportError, match="tree of 7 nodes"):
        validate.validate_graph(b.target.path, io, ref, ids, "fp32", "target", (tree_ids, causal))


def test_cli_export_passes_the_flag(monkeypatch, tmp_path):
    import mjsd.export

    seen = {}

    def fake_export(target, draft, out, **kwargs):
        seen.update(kwargs)
        raise ExportError("stop here")

    monkeypatch.setattr(mjsd.export, "export_bundle", fake_export)
    result = CliRunner().invoke(main, ["export", "--target", "t", "--draft", "d", "--out", str(tmp_path / "b"),
                                       "--tree-attention"])
    assert "stop here" in result.output and seen["tree_attention"] is True


# ---- MMTAD ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [dict(), dict(temperature=1.0, seed=3), dict(temperature=0.8, top_k=20, seed=4)])
def test_mmtad_with_one_beam_equals_mtad(llama, extra):
    _, target, draft, twin = llama
    for prompt in PROMPTS:
        for make in (lambda: draft, lambda: noisy(twin)):
            cfg = dict(max_new_tokens=30, beam_width=1, gamma=3, tau=0.3, **extra)
            mtad, ref = generate_ids(target, prompt, GenerationConfig(**RAW, algo="mtad", **cfg), draft=make())
            mmtad, stats = generate_ids(target, prompt, GenerationConfig(algo="mmtad", **cfg), draft=make())
            assert mmtad == mtad and stats.accepted_tokens == ref.accepted_tokens
            assert stats.target_calls == stats.rounds + (len(prompt) > 1)  # one tree call per round


@pytest.mark.parametrize("cfg", [dict(), dict(temperature=1.0, seed=5), dict(beam_width=3, gamma=5, tau=0.1)])
def test_mmtad_kv_state_after_every_round_equals_a_fresh_forward(llama, cfg):
    """The target cache holds the accepted text minus the pending token; the draft cache a prefix of it: the
    accepted node's beam may have died out, and the draft keeps the row sharing most of its path."""
    _, target, _, twin = llama
    draft = noisy(twin)
    cfg = GenerationConfig(algo="mmtad", **cfg).resolved()
    ctx = prefill(target, [1, 17, 42, 99], cfg, GenerationStats(), draft=draft)
    rounds, accepted, lags = ALGORITHMS["mmtad"](ctx), [], []
    for _ in range(10):
        before = ctx.stats.accepted_tokens
        new = next(rounds)
        accepted.append(ctx.stats.accepted_tokens - before)
        assert len(new) == accepted[-1] + 1
        assert ctx.target_cache.length == len(ctx.ids) - 1 and ctx.draft_cache.length <= len(ctx.ids) - 1
        lags.append(len(ctx.ids) - 1 - ctx.draft_cache.length)
        for model, cache in ((target, ctx.target_cache), (twin, ctx.draft_cache)):
            fresh = model.new_cache()
            model.forward(ctx.ids[:cache.length], fresh)
            assert cache.batch == 1
            for got, want in zip(cache.arrays(), fresh.arrays()):
                np.testing.assert_allclose(got, want, atol=2e-5)
    assert min(accepted) < cfg.gamma and max(accepted) > 0  # partial acceptance: the draft rows must be chosen
    assert max(lags) <= cfg.gamma


@pytest.mark.parametrize("extra", [dict(), dict(temperature=1.0, seed=0)])
def test_mmtad_with_a_perfect_draft_accepts_full_depth(llama, extra):
    _, target, _, twin = llama
    _, stats = generate_ids(target, [1, 17], GenerationConfig(algo="mmtad", max_new_tokens=25, tau=1.0, gamma=4,
                                                                    beam_width=4, **extra),
                            draft=twin)
    assert stats.rounds == 5 and stats.accepted_tokens == 20


def test_mmtad_reaches_at_least_mtad_acceptance_on_the_same_tree(llama):
    """Deterministic mode: the MTAD chain (the best final beam) is a path of MMTAD's tree, so from the same context
    MMTAD's accepted depth is never shorter than MTAD's."""
    _, target, _, twin = llama
    for prompt in PROMPTS + [[1, 2, 3], [7, 8, 9, 10]]:
        got = {}
        for algo in ("mtad", "mmtad"):
            ctx = prefill(target, prompt, GenerationConfig(**RAW, algo=algo, beam_width=3, tau=0.2), GenerationStats(),
                          draft=noisy(twin))
            next(ALGORITHMS[algo](ctx))
            got[algo] = ctx.stats.accepted_tokens
        assert got["mmtad"] >= got["mtad"]


# ---- MCSD tree strategy -------------------------------------------------------------------------------------

@pytest.mark.parametrize("k_config", [(1,), (2, 2, 1), (3, 1, 2, 2)])
@pytest.mark.parametrize("replacement", [False, True])
def test_greedy_mcsd_tree_equals_ar_greedy(llama, k_config, replacement):
    _, target, draft, twin = llama
    for prompt in PROMPTS:
        ref, _ = generate_ids(target, prompt, GenerationConfig(**RAW, algo="ar", max_new_tokens=30))
        for d in (draft, twin, noisy(twin)):  # never / always / sometimes accepted
            out, stats = generate_ids(target, prompt, GenerationConfig(
                algo="mcsd", mcsd_strategy="tree", max_new_tokens=30, k_config=k_config,
                mcsd_replacement=replacement), draft=d)
            assert out == ref
            assert stats.target_calls == stats.rounds + (len(prompt) > 1)


@pytest.mark.parametrize("cfg", [dict(temperature=1.0, seed=11), dict(temperature=0.7, top_p=0.9, seed=12,
                                                                      mcsd_replacement=True, k_config=(3, 2))])
def test_tree_and_batch_strategies_accept_the_same_tokens(llama, cfg):
    _, target, draft, twin = llama
    for prompt in PROMPTS:
        for make in (lambda: draft, lambda: noisy(twin)):
            outs = [generate_ids(target, prompt, GenerationConfig(algo="mcsd", mcsd_strategy=s, max_new_tokens=30,
                                                                  **cfg), draft=make()) for s in ("batch", "tree")]
            assert outs[0][0] == outs[1][0]
            assert outs[0][1].accepted_tokens == outs[1][1].accepted_tokens


@pytest.mark.parametrize("cfg", [dict(), dict(temperature=1.0, seed=3, mcsd_replacement=True),
                                 dict(temperature=0.8, top_k=20, seed=4, k_config=(3, 1, 2))])
def test_mcsd_tree_kv_state_after_every_round_equals_a_fresh_forward(llama, cfg):
    _, target, _, twin = llama
    accepted = run_rounds(target, noisy(twin), [1, 17, 42, 99], 10, algo="mcsd", mcsd_strategy="tree", **cfg)
    assert min(accepted) < len(cfg.get("k_config", (2, 2, 1)))


# ---- refusals -----------------------------------------------------------------------------------------------

def test_tree_algorithms_are_refused_without_a_tree_graph(llama_bundle):
    b = load_bundle(llama_bundle)
    if b.target.graph_kind == "fused":
        pytest.skip("a fused graph takes a tree bias: the tree algorithms run on it")
    target, draft = ModelSession(b.target, threads=1), ModelSession(b.draft, threads=1)
    for cfg in (GenerationConfig(algo="mmtad"), GenerationConfig(algo="mcsd", mcsd_strategy="tree")):
        with pytest.raises(ConfigError, match="--tree-attention"):
            generate_ids(target, [1], cfg, draft=draft)
    with pytest.raises(ConfigError, match="--tree-attention"):
        target.forward_tree([1, 2], [-1, 0], target.new_cache())
    assert target.calls == 0


def test_mmtad_lookahead_counts_every_node():
    assert GenerationConfig(algo="mmtad", gamma=3, beam_width=4).lookahead == 12
    assert dataclasses.replace(GenerationConfig(algo="mtad", gamma=3), beam_width=4).lookahead == 3


def test_cli_generate_with_the_tree_algorithms(llama_tree_bundle, llama_bundle):
    def run(bundle, *args):
        res = CliRunner().invoke(main, ["generate", "def main():", "--bundle", str(bundle), "-n", "10",
                                        "--ignore-eos", "--json", *args])
        return res.exit_code, res.output

    code, out = run(llama_tree_bundle, "--algo", "ar", "--no-repeat-ngram-size", "0")
    greedy = json.loads(out)["tokens"]
    code, out = run(llama_tree_bundle, "--algo", "mcsd", "--mcsd-strategy", "tree")
    assert code == 0 and json.loads(out)["tokens"] == greedy
    code, out = run(llama_tree_bundle, "--algo", "mmtad", "--beam-width", "2")
    assert code == 0 and json.loads(out)["stats"]["algo"] == "mmtad"
    code, out = run(llama_bundle, "--algo", "mmtad")
    if load_bundle(llama_bundle).target.graph_kind == "fused":
        assert code == 0 and json.loads(out)["stats"]["algo"] == "mmtad"
    else:
        assert code == 1 and "--tree-attention" in out


def test_gpt2_exports_a_tree_graph_too(gpt2_checkpoints, tmp_path):
    from mjsd.export import export_bundle

    manifest = export_bundle(*gpt2_checkpoints, tmp_path / "b", progress=False, tree_attention=True)
    assert manifest["models"]["target"]["validation"]["tree"]["rel"] < 1e-5
    b = load_bundle(tmp_path / "b")
    target, draft = ModelSession(b.target, threads=1), ModelSession(b.draft, threads=1)
    greedy, _ = generate_ids(target, [1, 17, 42], GenerationConfig(**RAW, algo="ar", max_new_tokens=12))
    out, _ = generate_ids(target, [1, 17, 42], GenerationConfig(algo="mcsd", mcsd_strategy="tree",
                                                                max_new_tokens=12), draft=draft)
    assert out == greedy
