"""Secure aggregation (SecAgg+): the server learns the sum of the clients' vectors, not one of them.

:mod:`common.secagg.crypto` wraps the primitives (X25519, HKDF-SHA256, ChaCha20-Poly1305,
ChaCha20 masks, Shamir sharing); :mod:`common.secagg.protocol` is the four-stage protocol, as
pure client functions and the server's :class:`ServerRound`, free of any transport.
"""

from common.secagg.errors import RoundSkipped, SecAggError
from common.secagg.protocol import (
    RoundSpec,
    ServerRound,
    ciphertexts_from_message,
    client_keys,
    client_masked_input,
    client_shares,
    client_unmask,
    default_threshold,
    keys_from_message,
    local_threshold,
    neighbourhood_degree,
    neighbours,
    new_round_spec,
    spec_from_config,
    spec_to_config,
    unmask_request_from_message,
)

__all__ = [
    "RoundSkipped", "RoundSpec", "SecAggError", "ServerRound", "ciphertexts_from_message", "client_keys",
    "client_masked_input", "client_shares", "client_unmask", "default_threshold", "keys_from_message",
    "local_threshold", "neighbourhood_degree", "neighbours", "new_round_spec", "spec_from_config",
    "spec_to_config", "unmask_request_from_message",
]
