"""Decoding algorithms, one module each; every one is a generator `algo(ctx) -> Iterator[list[int]]` (common.py).

Register a new algorithm in ALGORITHMS; the driver (`generate_ids`, `stream_ids`) does the rest.
"""
from .ar import ar
from .common import DecodeContext
from .driver import check_context, generate_ids, prefill, stream_ids
from .mcsd import mcsd
from .mjgd import mjgd
from .mjsd import mjsd, mtad
from .mmtad import mmtad
from .sps import sps, sps_verify

ALGORITHMS = {
    "ar": ar,
    "sps": sps,
    "mjgd": mjgd, "mjsd": mjsd, "mtad": mtad, "mmtad": mmtad, "mcsd": mcsd,
}

__all__ = ["ALGORITHMS", "DecodeContext", "ar", "check_context", "generate_ids", "prefill", "sps", "sps_verify", "stream_ids"]
