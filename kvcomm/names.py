"""The names the whole project shares, each spelled in one place: the modes a turn can run in and the default model.

Every module that checks a mode or defaults a model imports these; nothing here imports torch, so a command line can
use them without loading a model.
"""
from __future__ import annotations

MODES = ("dense", "dense-prefix", "naive", "cacheblend", "kvcomm", "hybrid")
DENSE_MODES = ("dense", "dense-prefix")                # prefill every token; reuse nothing
BASE_MODES = ("naive", "cacheblend", "kvcomm", "hybrid")   # assemble shared contents from their base KV
POOL_MODES = ("kvcomm", "hybrid")                      # read and write the anchor pool

FIRST_READ_REASON = "first_read"     # a turn's reason when it read its contents first (kvcomm.engine)

EMBEDDED_MODEL = "smollm2-135m-instruct"   # the model shipped with the project, and every command's default

__all__ = ["BASE_MODES", "DENSE_MODES", "EMBEDDED_MODEL", "FIRST_READ_REASON", "MODES", "POOL_MODES"]
