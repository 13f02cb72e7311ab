"""The SDK's named exceptions. Each message says what was wrong and what to do."""


class RcLLMError(Exception):
    """Base class of every error the SDK raises on purpose."""


class DataFormatError(RcLLMError):
    """An input file is malformed (the message names file, line and column)."""


class FeatureRepoError(RcLLMError):
    """The feature repository is missing, not ingested, or invalid."""


class UnknownUserError(RcLLMError):
    """The user id is not in the feature store."""


class EmptyHistoryError(RcLLMError):
    """The user exists but has no interactions to condition on."""


class ModelLoadError(RcLLMError):
    """The model path or URI does not hold a usable causal LM with rotary positions."""


class NotEnoughCandidatesError(RcLLMError):
    """More items were asked for than the retriever could supply."""


class InvalidRequestError(RcLLMError, ValueError):
    """A request argument has the wrong type or is out of range (a bool, float or string user id,
    a non-integer ``k``); nothing was served."""


class ConfigError(RcLLMError):
    """A configuration value is invalid."""


class InvariantError(RcLLMError, ValueError):
    """Tensors or blocks handed to the runtime or a kernel break what it relies on (shape,
    dtype, device, offsets, one system block per batch): a bug in the caller, not a setting."""


class TrainingDataError(RcLLMError):
    """The training data cannot train the asked-for ranker (too few sequences or examples)."""


class CompileError(RcLLMError):
    """A compiled item-LM ranker's constants or shapes violate a safety margin it depends on."""


class ServiceStartError(RcLLMError, RuntimeError):
    """A local helper service (redis-server, an LMCache server) could not be started."""
