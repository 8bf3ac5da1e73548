"""The contract between the cloud and the edge of each method.

One module per method: the message keys, typed builders and readers of each
message, and the method's options dataclass. Strategies (``tandem.strategies``)
and clients (``tandem.clients``) both import these modules and never each
other.
"""
