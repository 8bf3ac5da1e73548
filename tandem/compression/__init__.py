"""Compression toolkit for ACE-Sync (seed 004): pure numpy, no Flower imports.

- :mod:`.groups`: parameter groups (tensors or chunks of them) and their
  flattening (eq. 1).
- :mod:`.codecs`: full / half / int8 and sign·scale (eq. 6) / top-k / defer
  payloads, their exact byte sizes and expected fidelities; hostile payloads
  rejected.
- :mod:`.feedback`: error feedback ``g̃ = g + γ·e`` (eq. 7).
- :mod:`.knapsack`: one codec per group within a byte budget (eq. 2 and the
  seed's knapsack).
- :mod:`.budget`: bandwidth to compression ratio to byte budget (eq. 5).
"""

from tandem.compression.budget import byte_budget, compression_ratio
from tandem.compression.codecs import (
    CODECS,
    DEFAULT_OPTIONS,
    FIDELITY_HALF,
    FIDELITY_INT8,
    FIDELITY_SIGN,
    Codec,
    CodecError,
    Option,
    decode,
    encode,
    encoded_nbytes,
    fidelity,
    option_table,
    payload_keys,
    realized_fidelity,
    topk_count,
)
from tandem.compression.feedback import (
    ErrorFeedback,
    FeedbackStep,
    compensate,
    feedback_step,
)
from tandem.compression.groups import (
    ParamGroup,
    flatten,
    group_sizes,
    make_groups,
    unflatten,
)
from tandem.compression.knapsack import Selection, select_options

__all__ = [
    "CODECS",
    "DEFAULT_OPTIONS",
    "FIDELITY_HALF",
    "FIDELITY_INT8",
    "FIDELITY_SIGN",
    "Codec",
    "CodecError",
    "ErrorFeedback",
    "FeedbackStep",
    "Option",
    "ParamGroup",
    "Selection",
    "byte_budget",
    "compensate",
    "compression_ratio",
    "decode",
    "encode",
    "encoded_nbytes",
    "feedback_step",
    "fidelity",
    "flatten",
    "group_sizes",
    "make_groups",
    "option_table",
    "payload_keys",
    "realized_fidelity",
    "select_options",
    "topk_count",
    "unflatten",
]
