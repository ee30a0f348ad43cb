"""The errors a client gets, as OpenAI's body ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

from pydantic import ValidationError

from hf_cb.entrypoints.streams import EngineDeadError, RequestFailed


class APIError(Exception):
    """An error the client gets as OpenAI's body, with its HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# What reading a request's stream raises when the engine refused, failed or lost it (`engine_error`).
ENGINE_ERRORS = (RequestFailed, EngineDeadError, ValueError)


def engine_error(error: BaseException) -> APIError:
    """The API error for a request the engine refused when it took it (400: it changed since the
    front end checked), failed (500) or could not take (503)."""
    if isinstance(error, EngineDeadError):
        return APIError(503, str(error), type="server_error", code="engine_dead")
    if isinstance(error, ValueError):
        return APIError(400, str(error))
    return APIError(500, str(error), type="server_error")


def _is_type_tag(part: object) -> bool:
    """Pydantic names each member of a union by its type (``str``, ``list[int]``)."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """OpenAI-style message and param for pydantic's first error. A field of several types
    (``prompt``) fails once per type: that is reported as one wrong type."""
    locs = [[str(part) for part in e.get("loc", ()) if part != "body"] for e in errors]
    first, loc = errors[0], locs[0]
    param = loc[0] if loc else None
    if first.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {'.'.join(loc)}", param
    branches = [lc[1] for lc in locs if len(lc) > 1 and lc[0] == param and _is_type_tag(lc[1])]
    if len(set(branches)) > 1:
        kinds = " or ".join(dict.fromkeys(branches))
        return f"{param}: expected {kinds}, got {_json_type(first.get('input'))}", param
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return (f"{'.'.join(loc)}: {msg}" if loc else msg), param


def validation_error(error: ValidationError) -> APIError:
    """A 400 naming the field pydantic refused."""
    message, param = validation_message(error.errors())
    return APIError(400, message, param=param)


def _json_type(value: object) -> str:
    """How JSON names ``value``'s type."""
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
