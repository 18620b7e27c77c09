"""The one kind of error a user can fix: a bad request.

Helpers raise `RequestError`; only the edges turn it into something else: a script's
`main` into one line on stderr and exit code 2, the server into HTTP 400.
"""

from __future__ import annotations

from typing import Optional


class RequestError(ValueError):
    """A bad request: the message is one line naming the problem and the fix.

    `param` names the offending input (a flag, a request field) where there is one;
    the server reports it as the OpenAI error's `param`.
    """

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


class Cancelled(Exception):
    """A generation stopped on request (the client went away, or pressed Stop), on every rank at the same step."""
