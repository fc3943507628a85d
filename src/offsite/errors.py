"""Errors users see. Every message is one line that names the problem."""


class OffsiteError(Exception):
    """Base class: anything offsite rejects on purpose."""


class UnsupportedModelError(OffsiteError):
    """The model's architecture cannot be split into embedding / blocks / norm / head."""


class ConfigError(OffsiteError):
    """An invalid combination of settings (e.g. k > number of middle blocks)."""


class UsageError(ConfigError):
    """The command line itself is wrong: a missing, unknown or conflicting option (exit status 2)."""


class BundleError(OffsiteError):
    """A bundle is missing, corrupt, foreign or does not match what it claims."""


class PluginError(OffsiteError):
    """An adapter bundle cannot be plugged into the given full model."""


class AssetError(OffsiteError):
    """A real model or dataset that ships as a package is not installed or is damaged."""


class SigningError(OffsiteError):
    """A signing or verification key is missing, unreadable or of the wrong kind."""
