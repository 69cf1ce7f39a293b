"""Errors as OpenAI clients expect them: an HTTP status and {"error": {message, type, param, code}}.

Every refusal the server makes is an APIError raised before any session is touched; the app turns
it (and whatever else escapes a route) into this body, so a client never sees a traceback.
"""

from __future__ import annotations


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(404, message, param=param, code=code)


def overloaded(message: str) -> APIError:
    # OpenAI answers a full server with 429 as well; clients back off and retry.
    return APIError(429, message, type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})


def timed_out(seconds: float) -> APIError:
    return APIError(504, f"the request did not finish within {seconds:g} s; the session keeps what was done",
                    type="timeout_error", code="timeout")


def server_error(message: str) -> APIError:
    return APIError(500, message, type="server_error", code="internal_error")


def absorption_failed(message: str) -> APIError:
    # Not a bug and not the request's form: this content could not be absorbed (NaN or divergence).
    return APIError(422, message, type="absorption_error", code="round_rolled_back")
