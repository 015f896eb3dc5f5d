"""Small project exceptions. Each is a ``ValueError`` so callers that catch ``ValueError`` keep working."""

from __future__ import annotations


class SAEConfigError(ValueError):
    """A configuration value (or a config.json on disk) is invalid. The message names the key, the value and the fix."""


class SAEInputError(ValueError):
    """A tensor passed to an SAE has the wrong shape, dtype, device or contents."""


class SAELoadError(ValueError):
    """Weights or config on disk do not match what the SAE class expects (shapes, keys, truncated files)."""
