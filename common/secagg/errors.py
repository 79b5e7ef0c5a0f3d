"""The errors of secure aggregation."""

from common.errors import HyBNNError


class SecAggError(HyBNNError):
    """A secure-aggregation message or state that breaks the protocol: what was wrong, and whose."""


class RoundSkipped(SecAggError):
    """Too few clients remain (or too few shares to unmask them) for the round to give a sum."""
