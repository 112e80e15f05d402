"""The API server's refusals as one hierarchy, told apart by the ``reason`` of its ``Status``, never by its words.

Every request labkit makes (a notebook's, the node agent's, the control plane's
own set-up) raises one of these when the API server says no, with the server's
own message; a server that does not answer raises ``Unreachable`` (also an
``OSError``, as a dropped connection is). Each is a ``LabkitError``, so a trainee
sees the message and a hint, without a traceback.

    NotFound, AlreadyExists, Conflict, Invalid, BadRequest, Forbidden, Unauthorized, Expired (a
    watch's resourceVersion is too old: list again), TooManyRequests; NamespaceGone (the request's
    namespace is being deleted, or is gone): NamespaceTerminating, a Forbidden, and NamespaceMissing,
    a NotFound, by what the server's details say.
"""

from __future__ import annotations

import json
from typing import Any

from labkit.errors import LabkitError


class Unreachable(LabkitError, OSError):
    """The API server did not answer (refused, reset, timed out, TLS failed)."""


class APIError(LabkitError):
    """A request the API server refused: its HTTP ``status``, its ``reason`` and ``message``, and ``details``."""

    reason_name = ""  # the Status reason a subclass stands for

    def __init__(self, status: int, message: str, *, reason: str = "", details: dict | None = None, body: str = "",
                 hint: str | None = None) -> None:  # fmt: skip
        self.status = status
        self.reason = reason
        self.details = details or {}
        self.body = body
        super().__init__(message, hint=hint)

    @property
    def causes(self) -> list[dict]:
        return self.details.get("causes") or []


class NotFound(APIError):
    reason_name = "NotFound"


class AlreadyExists(APIError):
    reason_name = "AlreadyExists"


class Conflict(APIError):
    reason_name = "Conflict"


class Invalid(APIError):
    reason_name = "Invalid"


class BadRequest(APIError):
    reason_name = "BadRequest"


class Forbidden(APIError):
    reason_name = "Forbidden"


class Unauthorized(APIError):
    reason_name = "Unauthorized"


class Expired(APIError):
    reason_name = "Expired"


class TooManyRequests(APIError):
    reason_name = "TooManyRequests"


class NamespaceGone(APIError):
    """Refused because the request's namespace is being deleted or does not exist (one of the two below)."""


class NamespaceTerminating(NamespaceGone, Forbidden):
    """Forbidden, with the cause ``NamespaceTerminating``: nothing new can be made in a namespace being deleted."""


class NamespaceMissing(NamespaceGone, NotFound):
    """NotFound, of the namespace itself."""


_BY_REASON = {cls.reason_name: cls for cls in (NotFound, AlreadyExists, Conflict, Invalid, BadRequest, Forbidden,
                                               Unauthorized, Expired, TooManyRequests)}  # fmt: skip
_BY_STATUS = {404: NotFound, 409: Conflict, 422: Invalid, 400: BadRequest, 403: Forbidden, 401: Unauthorized,
              410: Expired, 429: TooManyRequests}  # fmt: skip
# What a person should do about a refusal (the notebooks' client adds them; a component's logs keep to the facts).
HINTS = {
    Forbidden: "Your credentials do not allow this here. Labs only act inside the lab's own namespace.",
    Unauthorized: "The cluster did not accept your credentials; they may have expired. Log in again, then rerun the cell.",
}


def with_hint(error: APIError) -> APIError:
    """``error`` with the hint its kind has for a person (``HINTS``), if it has none yet."""
    if error.hint is None:
        error.hint = next((text for base, text in HINTS.items() if isinstance(error, base)), None)
        error.args = (str(error),)
    return error


def api_error(status: int, body: str | bytes) -> APIError:
    """The API server's answer ``body`` (a ``Status``, as a rule) as the error its reason names."""
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body)
    try:
        parsed: Any = json.loads(text)
    except ValueError:
        parsed = {}
    parsed = parsed if isinstance(parsed, dict) else {}
    reason = str(parsed.get("reason") or "")
    details = parsed.get("details") if isinstance(parsed.get("details"), dict) else {}
    message = str(parsed.get("message") or text.strip() or f"HTTP {status}")
    kind = _BY_REASON.get(reason) or _BY_STATUS.get(status, APIError)
    if kind is Forbidden and any(c.get("reason") == "NamespaceTerminating" for c in details.get("causes") or []):
        kind = NamespaceTerminating
    elif kind is NotFound and details.get("kind") == "namespaces":
        kind = NamespaceMissing
    return kind(status, message, reason=reason, details=details, body=text)
