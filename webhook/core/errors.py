"""One small exception hierarchy for the whole project.

Every user-facing error names the file, field or value at fault and says what to
do.  The CLI maps these to exit codes in exactly one place (``webhook.cli``); the
admission server maps them to HTTP answers in exactly one place (``webhook.app``).
"""

from __future__ import annotations


class EcrWebhookError(Exception):
    """Base class: anything the project raises on purpose."""

    exit_code = 1


class InvalidReferenceError(EcrWebhookError, ValueError):
    """An image reference that does not follow the distribution/reference grammar."""

    def __init__(self, reference: str, why: str) -> None:
        self.reference = reference
        self.why = why
        super().__init__(f"invalid image reference {reference!r}: {why}")


class PolicyError(EcrWebhookError):
    """A policy document that fails validation.

    ``field`` is a dotted path such as ``targets[1].region``.
    """

    exit_code = 2

    def __init__(self, field: str, value: object, why: str, source: str = "policy") -> None:
        self.field = field
        self.value = value
        self.why = why
        self.source = source
        super().__init__(f"{source}: {field}: {why} (got {value!r})")


class InputError(EcrWebhookError):
    """A manifest file or document that cannot be read or understood."""

    exit_code = 2


class ReviewError(EcrWebhookError):
    """A malformed AdmissionReview.  The server answers it with HTTP 400."""

    status = 400


class ConfigError(EcrWebhookError):
    """Bad command-line or server configuration (missing file, bad port, ...)."""

    exit_code = 2


class BootstrapError(EcrWebhookError):
    """The cluster refused or could not do what ``certs bootstrap`` needs."""

    exit_code = 1
