"""Incremental detokenization (engine.Detokenizer): the streamed pieces join to the full decode of the tokens, for
byte-level BPE, word-level and SentencePiece-style (Metaspace + byte fallback) decoders, at any round split, with
multi-byte characters cut across rounds; a piece never ends in a cut character except the last."""
from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer, decoders, models

from mjsd.runtime.engine import Detokenizer
from tests.helpers import make_tokenizer

TEXT = "def größe(x):\n    return x ** 2  # 平方 ✓ — naïve café 🙂\n\tprint('ok')\n"


def sentencepiece_like() -> Tokenizer:
    """Llama-2's decoder over a vocabulary of a few pieces plus the 256 byte-fallback tokens."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ["▁", "▁def", "▁return", "x", "▁x", "(", "):", "▁#", "ok", "'", "\n"]:
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


def _sp_ids(tok: Tokenizer, text: str) -> list[int]:
    """Ids of text under the sentencepiece-like vocabulary: known pieces, else UTF-8 byte tokens."""
    vocab, ids = tok.get_vocab(), []
    for word in text.replace(" ", " ▁").split(" "):
        if word in vocab:
            ids.append(vocab[word])
        else:
            ids += [vocab[f"<0x{b:02X}>"] for b in word.encode()]
    return ids


def _pieces(decode, ids: list[int], rng) -> list[str]:
    detok, out, i = Detokenizer(decode), [], 0
    while i < len(ids):
        n = int(rng.integers(1, 5))
        out.append(detok.add(ids[i:i + n], final=i + n >= len(ids)))
        i += n
    return out


def test_pieces_join_to_the_full_decode():
    bpe = make_tokenizer(300).backend_tokenizer
    word = make_tokenizer(30, kind="word").backend_tokenizer
    sp = sentencepiece_like()
    cases = [(bpe, bpe.encode(TEXT).ids), (word, word.encode("a b c d e f g h").ids), (sp, _sp_ids(sp, TEXT))]
    rng = np.random.default_rng(0)
    for tok, ids in cases:
        decode = lambda t, tok=tok: tok.decode(t, skip_special_tokens=True)  # noqa: E731
        full = decode(ids)
        assert "\ufffd" not in full
        for _ in range(50):
            pieces = _pieces(decode, ids, rng)
            assert "".join(pieces) == full
            assert not any(p.endswith("\ufffd") for p in pieces)


def test_a_cut_character_waits_for_its_last_byte():
    sp = sentencepiece_like()
    euro = [sp.get_vocab()[f"<0x{b:02X}>"] for b in "€".encode()]
    decode = lambda t: sp.decode(t)  # noqa: E731
    detok = Detokenizer(decode)
    assert detok.add(euro[:1]) == "" and detok.add(euro[1:2]) == "" and detok.add(euro[2:]) == "€"
    last = Detokenizer(decode)
    assert last.add(euro[:2], final=True) == decode(euro[:2])  # the end of the generation releases what is left
