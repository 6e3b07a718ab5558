"""The input errors of firm.rewards; all are FirmErrors, which the CLI prints as one line."""

from __future__ import annotations

from firm.errors import FirmError


class RewardSpecError(FirmError, ValueError):
    """A reward spec names nothing loadable, or what it names cannot serve as a reward model."""


class RewardModelError(FirmError, ValueError):
    """A reward-model directory cannot be loaded, or a fit request cannot be carried out."""


class PairFileError(FirmError, ValueError):
    """A preference-pair source is missing or malformed; the message names path:line."""
