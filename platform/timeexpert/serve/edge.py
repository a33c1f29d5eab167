"""The edge of the HTTP service: what every request meets before a route runs, and the error body.

`Edge` (a plain ASGI middleware on the ingress's FastAPI app) gives each request its id, refuses
a /v1/ request without the configured bearer token (401) and a body over the limit by its
Content-Length (413) before the body is read. Its settings are per ingress replica process:
`configure_edge` sets them from the replica's constructor. They live in this module, not on the
app, because Serve serves a copy of the FastAPI app (built when the ingress class is pickled), so
the constructor cannot reach the served app's `state`; this module is imported by name in the
replica process, so the constructor and the middleware see the same settings.
"""

from __future__ import annotations

import hmac
import re
import uuid
from dataclasses import dataclass

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from timeexpert.serve import schemas as S

API_VERSION = "v1"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass
class EdgeSettings:
    auth_token: str = ""  # "" = no auth
    max_body_bytes: int | None = None  # None = no limit


SETTINGS = EdgeSettings()  # this replica process's (one ingress per replica process)


def configure_edge(*, auth_token: str, max_body_bytes: int | None) -> None:
    """Set this replica process's edge settings (the ingress constructor calls it)."""
    SETTINGS.auth_token, SETTINGS.max_body_bytes = auth_token, max_body_bytes


def error_response(status: int, kind: str, message: str, request_id: str,
                   details=None, retry_after_s: int | None = None) -> JSONResponse:
    """The JSON body of every error (`ErrorResponse`), with the request id; `retry_after_s`:
    the Retry-After header of a 503 (overloaded, not ready)."""
    body = S.ErrorResponse(
        error=S.ErrorDetail(type=kind, message=message, details=details), request_id=request_id
    )
    headers = None if retry_after_s is None else {"Retry-After": str(retry_after_s)}
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


class Edge:
    """Request id, bearer auth on /v1/*, and the body-size limit before the body is read.

    Serve's proxy puts its request id in the `x-request-id` request header (the client's own, if
    it sent one) and returns it as the response header; the error bodies carry the same id.
    A plain ASGI middleware: Starlette's `@app.middleware("http")` (BaseHTTPMiddleware) runs
    every response through a task group and a memory stream, milliseconds per request here.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given = headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid  # `request.state.request_id`
        response = refuse_at_the_edge(scope, headers, rid)
        if response is None:
            await self.app(scope, receive, send)
        else:
            await response(scope, receive, send)


def refuse_at_the_edge(scope, headers: Headers, rid: str) -> JSONResponse | None:
    """The 401 of a /v1/ request without the configured bearer token, the 413 of a body over
    the limit by its Content-Length; None when neither applies."""
    path = scope["path"]
    root_path = scope.get("root_path", "")  # the app's route prefix, if any
    if root_path and path.startswith(root_path):
        path = path[len(root_path):]
    token = SETTINGS.auth_token
    if token and path.startswith(f"/{API_VERSION}/"):
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            credentials.strip().encode(), token.encode()
        ):
            response = error_response(401, "unauthorized", "missing or wrong bearer token", rid)
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
    limit = SETTINGS.max_body_bytes
    length = headers.get("content-length")
    if limit and length and length.isdigit() and int(length) > limit:
        return error_response(
            413, "upload_too_large",
            f"request body is {length} bytes; the limit is {limit} (the video upload limit "
            "plus base64 and JSON overhead)", rid,
        )
    return None
