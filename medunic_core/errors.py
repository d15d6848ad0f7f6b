"""One error hierarchy, so that a CLI can map each kind of problem to an exit code.

Every message names the thing (file, row, key), the value, what was expected and what to do.
"""

from __future__ import annotations


class MedunicError(Exception):
    """Base class of every error medunic raises on purpose."""

    exit_code = 1


class ConfigError(MedunicError):
    """An unknown key, a wrong type or an impossible value in a config."""

    exit_code = 2


class SiteDataError(MedunicError):
    """A data file, manifest row or report that cannot be used for training."""

    exit_code = 3


class CheckpointMismatchError(MedunicError):
    """A checkpoint whose keys or shapes do not match the model it is loaded into."""

    exit_code = 4


class VocabMismatchError(MedunicError):
    """A tokenizer whose vocabulary differs from the one the model was built with."""

    exit_code = 5


class FederationError(MedunicError):
    """A federated run that cannot go on (too few sites, no usable update)."""

    exit_code = 6


class PrivacyBudgetError(MedunicError):
    """A release that a site's privacy budget, DP requirement or release floors do not allow."""

    exit_code = 7


class DivergenceError(MedunicError):
    """A loss or weight that is not finite: training stops before anything is saved."""

    exit_code = 8
