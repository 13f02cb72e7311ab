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


class UnsupportedModelError(ModelLoadError):
    """The checkpoint loads but the block runner cannot serve it: not a rotary causal LM of a
    supported family, a RoPE scaling that depends on the sequence, active sliding-window
    attention, or code outside ``transformers`` (``trust_remote_code``)."""


class UnsupportedDtypeError(ModelLoadError):
    """The ranker cannot be served in the asked-for dtype (an item-lm ranker needs float32)."""


class DeviceUnavailableError(RcLLMError):
    """The asked-for device (``cuda``, ``cuda:N``) is not available on this machine."""


class NotEnoughCandidatesError(RcLLMError):
    """More items were asked for than the retriever could supply."""


class InvalidRequestError(RcLLMError, ValueError):
    """A request argument has the wrong type or is out of range (a bool, float or string user id,
    a non-integer ``k``); nothing was served."""


class ConfigError(RcLLMError):
    """A configuration value is invalid."""


class TemplateError(ConfigError):
    """A prompt template (YAML file or saved ``rcllm_template.json``) has an unknown key, a bad
    value, or asks for something the tokenizer or the ranker cannot do (BOS, chat template)."""


class LabelTokenError(ConfigError):
    """A candidate label is not one token of its own in this tokenizer as the label block writes
    it, or two labels share a token id: the ranking could not be read from the label logits."""


class InvariantError(RcLLMError, ValueError):
    """Tensors or blocks handed to the runtime or a kernel break what it relies on (shape,
    dtype, device, offsets, one system block per batch): a bug in the caller, not a setting."""


class TrainingDataError(RcLLMError):
    """The training data cannot train the asked-for ranker (too few sequences or examples)."""


class CompileError(RcLLMError):
    """A compiled item-LM ranker's constants or shapes violate a safety margin it depends on."""


class ServiceStartError(RcLLMError, RuntimeError):
    """A local helper service (redis-server, an LMCache server) could not be started."""


class UnknownItemError(RcLLMError):
    """A requested item id (a client-supplied candidate) is not in the catalog."""


class Overloaded(RcLLMError):
    """The server's admission queue is full (or it is shutting down): retry after a pause.
    HTTP 503 with ``Retry-After``."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(RcLLMError):
    """A request waited in the admission queue past its deadline and was not served (HTTP 504)."""


class AuthenticationError(RcLLMError):
    """A request to the HTTP service lacks the bearer API key the server requires (HTTP 401)."""


class PipelineBusyError(RcLLMError):
    """Another ``rcllm pipeline run`` holds the feature repo's pipeline lock; wait for it to finish."""


class PipelineStepError(RcLLMError):
    """A pipeline step could not finish (e.g. some blocks could not be written); serving stays on
    the current champion. Run the pipeline again to resume."""
