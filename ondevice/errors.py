"""The project's own error types: every failure a user can cause is one of these."""


class OndeviceError(Exception):
    """Base class. The CLI prints ``str(err)`` on one line and exits with code 1."""


class ModelFormatError(OndeviceError):
    """A model file or directory is missing, truncated, corrupt or inconsistent."""


class UnsupportedModelError(OndeviceError):
    """The model uses an architecture, tensor type or feature this runtime does not support."""


class TokenizerError(OndeviceError):
    """The tokenizer or chat template is missing, invalid, or failed to render."""


class SamplingError(OndeviceError, ValueError):
    """Invalid sampling parameters. ``field`` names the :class:`~ondevice.SamplingParams`
    field at fault (None when the error is not about one field, e.g. bad logits), so that
    callers such as the HTTP server can point at the parameter without parsing the text."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


class RequestError(OndeviceError, ValueError):
    """A request cannot be served as asked (for example a prompt longer than the context).

    ``code`` is a stable machine-readable reason when there is one (``"model_closed"``: the
    model was closed while the request ran or before it was submitted)."""

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        self.code = code


class BackendUnavailableError(OndeviceError):
    """A backend was asked for but cannot run on this machine; the message says why."""


class PolicyConfigError(OndeviceError):
    """A device profile, cloud configuration or model manifest for the policy is invalid."""


class PolicyError(OndeviceError):
    """The policy cannot place a request anywhere it is allowed to run (for example a private
    request that does not fit on this device); the message says why."""


class CloudError(OndeviceError):
    """A cloud endpoint failed: unreachable, timed out, or answered with an error. The message
    never contains the API key."""


class UnknownSamplingOptionError(SamplingError, TypeError):
    """A keyword that is not a :class:`~ondevice.SamplingParams` field (often a typo).
    ``field`` is the unknown keyword; the message lists the accepted ones. Also a
    ``TypeError``, which is what Python raises for an unexpected keyword argument."""
