"""Compression toolkit for ACE-Sync (seed 004): numpy and numba, no Flower imports.

- :mod:`.groups`: parameter groups (tensors or chunks of them) and their
  flattening (eq. 1).
- :mod:`.layout`: a model's groups as edge and cloud both cut them.
- :mod:`.codecs`: the codec registry: full / half / int8 and sign·scale
  (eq. 6) / top-k / defer payloads, their exact byte sizes and expected
  fidelities; hostile payloads rejected.
- :mod:`.int8`: the int8 quantization formula (codec and activations).
- :mod:`.kernels`: compiled loops (numba) for the int8 and sign encoders,
  the knapsack's scan and the zeros per group, the numpy formulas' exact
  steps group by group.
- :mod:`.packing`: all of a node's groups as one codec table and one stream.
- :mod:`.rows`: groups of one size as the rows of a matrix (the vectorized
  encode and decode).
- :mod:`.feedback`: error feedback ``g̃ = g + γ·e`` (eq. 7).
- :mod:`.pipeline`: one round of compression at the edge and the fill of
  unsent groups, shared by edge and cloud.
- :mod:`.knapsack`: one codec per group within a byte budget (eq. 2 and the
  seed's knapsack).
- :mod:`.budget`: bandwidth to compression ratio to byte budget (eq. 5).
"""

from tandem.compression.budget import byte_budget, compression_ratio
from tandem.compression.codecs import (
    DEFAULT_OPTIONS,
    FIDELITY_HALF,
    FIDELITY_INT8,
    FIDELITY_SIGN,
    REGISTRY,
    Codec,
    CodecError,
    Option,
    codec_rule,
    decode,
    encode,
    encoded_nbytes,
    fidelity,
    format_codecs,
    option_table,
    parse_codecs,
    payload_keys,
    register,
    topk_count,
)
from tandem.compression.feedback import compensate
from tandem.compression.groups import (
    ParamGroup,
    flatten,
    group_sizes,
    make_groups,
    unflatten,
)
from tandem.compression.knapsack import Selection, select_options

__all__ = [
    "DEFAULT_OPTIONS",
    "FIDELITY_HALF",
    "FIDELITY_INT8",
    "FIDELITY_SIGN",
    "REGISTRY",
    "Codec",
    "CodecError",
    "Option",
    "ParamGroup",
    "Selection",
    "byte_budget",
    "codec_rule",
    "compensate",
    "compression_ratio",
    "decode",
    "encode",
    "encoded_nbytes",
    "fidelity",
    "flatten",
    "format_codecs",
    "group_sizes",
    "make_groups",
    "option_table",
    "parse_codecs",
    "payload_keys",
    "register",
    "select_options",
    "topk_count",
    "unflatten",
]
