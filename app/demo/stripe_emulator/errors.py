"""Stripe-shaped API errors: `{"error": {"type", "code", "message", "param", ...}}`."""

from __future__ import annotations

from typing import Any

__all__ = ["StripeError"]


class StripeError(Exception):
    """An error answer of the emulated API, rendered exactly as Stripe renders one."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.should_retry = should_retry

    def body(self, request_id: str) -> dict[str, Any]:
        error: dict[str, Any] = {"message": self.message, "type": self.type}
        if self.code is not None:
            error["code"] = self.code
            error["doc_url"] = f"https://stripe.com/docs/error-codes/{self.code.replace('_', '-')}"
        if self.param is not None:
            error["param"] = self.param
        error["request_log_url"] = f"https://dashboard.stripe.com/test/logs/{request_id}"
        return {"error": error}

    @classmethod
    def invalid(
        cls, message: str, *, param: str | None = None, code: str | None = None
    ) -> StripeError:
        return cls(400, message, code=code, param=param)

    @classmethod
    def missing(cls, param: str) -> StripeError:
        return cls(400, f"Missing required param: {param}.", code="parameter_missing", param=param)

    @classmethod
    def no_such(cls, kind: str, object_id: str, *, param: str = "id") -> StripeError:
        return cls(404, f"No such {kind}: '{object_id}'", code="resource_missing", param=param)
