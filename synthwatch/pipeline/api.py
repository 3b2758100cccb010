"""The HTTP API and review page of `synthwatch serve` (issue 19), on FastAPI.

API (JSON; the OpenAPI document is served at `/openapi.json`):

- `POST /v1/scans`: a multipart upload (`file`) or a URL (JSON `{"url": ...}`), with an
  optional `callback_url`; 202, the scan record and a
  `Location`. An upload over `api.max_upload_bytes` is refused with 413 while it
  streams in (to a file under the data directory, never into memory).
- `GET /v1/scans` (recent first; `decision`, `status`, `limit`), `GET /v1/scans/{id}`.
- `GET /v1/scans/{id}/report`: the bundle's `report.html` when it has one, else its
  `report.json`; 409 while the scan runs, 404 with the error when the scan failed.
  `GET /v1/scans/{id}/evidence/{name}`: the bundle's other objects (frames, maps).
- `POST /v1/scans/{id}/review`: `{"decision": "flag"|"review"|"pass", "reason": ...}`.

Scans run in this process with one long-lived engine (`api.mode=embedded`, the
default), or in the running pipeline (`api.mode=cluster`: the scan becomes a MediaRef
on the refs topic and its verdict, alert or dead letter comes back from the topics;
`pipeline/cluster.py`). Either way every finished scan has a signed evidence bundle.

Every error is `{"detail": "<one line>"}`. Clients authenticate with `X-API-Key: <key>`
or `Authorization: Bearer <key>` (keys per client in `api.keys` / `api.keys_file`,
compared in constant time); 401 otherwise.

Review page (`/`): sign in with an API key (a server-side session behind an HttpOnly,
SameSite=Strict cookie; every form also carries the session's CSRF token), list recent
scans, filter by decision, upload a file, open a scan and its report, record a review.
Pages are Jinja2 templates (autoescaped) and load nothing from elsewhere: the
Content-Security-Policy says so. FastAPI's `/docs` would load its scripts from a CDN,
so it is not served; `/openapi.json` is.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import jinja2
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Security
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from synthwatch import __version__
from synthwatch.errors import ConfigError, SynthwatchError
from synthwatch.pipeline.scans import (
    SCAN_ID_PATTERN,
    Decision,
    EvidenceAltered,
    NotReady,
    ReviewRequest,
    Scan,
    ScanNotFound,
    ScanRequest,
    ScanService,
    Status,
)
from synthwatch.pipeline.settings import ApiSettings, Settings

SESSION_COOKIE = "synthwatch_session"
MIN_KEY_CHARS = 16
MAKE_KEY = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
_CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
JSON_BODY_MAX = 64 * 1024
FORM_FIELD_MAX = 16 * 1024
FORM_OVERHEAD = 1024 * 1024
"""Multipart framing and small fields allowed on top of the upload cap."""

PAGE_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
REPORT_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
    "form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
"""Reports are written by the evidence stage, with their styles inline; no scripts."""

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".json": "application/json",
    ".jpg": "image/jpeg",
    ".png": "image/png",
    ".pem": "application/x-pem-file",
}


class Problem(BaseModel):
    detail: str


def _problem(status: int, what: str) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": Problem, "description": what}}


UNAUTHORIZED = _problem(401, "No API key, or a wrong one.")
INVALID = _problem(422, "The request does not validate; `detail` says which part and why.")
NOT_FOUND = _problem(404, "No such scan (or, for a report, no report: `detail` says why).")


# --- keys and sessions -------------------------------------------------------------------


def load_keys(api: ApiSettings) -> dict[str, str]:
    """Client name -> key from `api.keys` and `api.keys_file`. Raises ConfigError for
    an unreadable file, a malformed line, a bad client name, a short key, or one key
    given to two clients (the audit log could not tell them apart)."""
    keys = {name: secret.get_secret_value() for name, secret in api.keys.items()}
    if api.keys_file is not None:
        keys.update(_read_keys_file(api.keys_file))
    seen: dict[str, str] = {}
    for name, key in keys.items():
        if not _CLIENT_NAME.match(name):
            raise ConfigError(
                f"API client name {name[:80]!r}: use 1-64 letters, digits and ._@- "
                "(it is what the audit log records)"
            )
        if len(key) < MIN_KEY_CHARS:
            raise ConfigError(
                f"the API key of client {name!r} has {len(key)} characters; use at least "
                f"{MIN_KEY_CHARS}, e.g. {MAKE_KEY}"
            )
        if key in seen:
            raise ConfigError(f"API clients {seen[key]!r} and {name!r} have the same key")
        seen[key] = name
    return keys


def _read_keys_file(path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"api.keys_file {path}: cannot read ({exc.strerror or exc})") from None
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            raise ConfigError(f"api.keys_file {path}: not a JSON object") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ConfigError(f"api.keys_file {path}: expected a JSON object of name -> key")
        return {str(k): v for k, v in data.items()}
    keys = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, key = line.partition(":")
        if not sep:
            # The line is not quoted: it may be a bare key.
            raise ConfigError(f"api.keys_file {path} line {number}: expected name:key")
        keys[name.strip()] = key.strip()
    return keys


class Auth:
    """Which client a key belongs to. `keys=None`: no authentication (local use only)."""

    def __init__(self, keys: Mapping[str, str] | None) -> None:
        self.enabled = keys is not None
        # Digests have one length, so compare_digest's time depends on neither key.
        self._digests = {
            name: hashlib.sha256(key.encode()).digest() for name, key in (keys or {}).items()
        }

    def client(self, key: str | None) -> str | None:
        if not self.enabled:
            return "anonymous"
        if not key:
            return None
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for name, known in self._digests.items():
            if hmac.compare_digest(digest, known):  # no early exit: every key is compared
                found = name
        return found


@dataclass(frozen=True)
class Session:
    client: str
    csrf: str
    expires: float


class Sessions:
    """Review-page logins, in memory: a restart signs everyone out."""

    def __init__(self, ttl_s: float) -> None:
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}

    def create(self, client: str) -> tuple[str, Session]:
        token = secrets.token_urlsafe(32)
        session = Session(client, secrets.token_urlsafe(32), time.time() + self._ttl_s)
        with self._lock:
            now = time.time()
            self._sessions = {t: s for t, s in self._sessions.items() if s.expires > now}
            self._sessions[token] = session
        return token, session

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        with self._lock:
            session = self._sessions.get(token)
        if session is None or session.expires <= time.time():
            return None
        return session

    def drop(self, token: str | None) -> None:
        with self._lock:
            self._sessions.pop(token or "", None)


# --- uploads -----------------------------------------------------------------------------


class UploadTooLarge(Exception):
    """The upload passed `api.max_upload_bytes` while streaming in (413)."""


class BadForm(Exception):
    """The multipart body is malformed or lacks its `file` part (422)."""


class _FormReader:
    """Streams a multipart body: the part named `file` to `dest` (counting, refusing
    past `cap`), every other field into memory (at most FORM_FIELD_MAX each)."""

    def __init__(self, dest: Path, cap: int) -> None:
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.file_bytes = 0
        self._dest = dest
        self._cap = cap
        self._out: Any = None
        self._headers: dict[bytes, bytes] = {}
        self._field, self._value = b"", b""
        self._name = ""
        self._in_file = False
        self._buffer = bytearray()

    def callbacks(self) -> Any:
        return {
            "on_part_begin": self._part_begin,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
        }

    def _part_begin(self) -> None:
        self._headers, self._buffer, self._in_file, self._name = {}, bytearray(), False, ""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        _kind, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        if self._name == "file":
            if self._out is not None:
                raise BadForm("send one file per scan")
            # curl -F 'file=<photo.jpg' sends no file name: the part is the file all the same.
            self.filename = options.get(b"filename", b"upload").decode("utf-8", "replace")
            self._out = self._dest.open("xb")
            self._in_file = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.file_bytes += end - start
            if self.file_bytes > self._cap:
                raise UploadTooLarge
            self._out.write(data[start:end])
            return
        self._buffer += data[start:end]
        if len(self._buffer) > FORM_FIELD_MAX:
            raise BadForm(f"form field {self._name!r} is over {FORM_FIELD_MAX} bytes")

    def _part_end(self) -> None:
        if self._in_file:
            self._in_file = False
        elif self._name:
            self.fields[self._name] = self._buffer.decode("utf-8", "replace")

    def close(self) -> None:
        if self._out is not None:
            self._out.close()


async def read_form(request: Request, dest: Path, cap: int) -> tuple[dict[str, str], str | None]:
    """(fields, uploaded file name or None) of a multipart/form-data request, the file
    streamed to `dest`. Raises UploadTooLarge (the partial file is deleted) or BadForm."""
    _ctype, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if not boundary:
        raise BadForm("multipart/form-data without a boundary")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap + FORM_OVERHEAD:
        raise UploadTooLarge
    reader = _FormReader(dest, cap)
    parser = MultipartParser(boundary, reader.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        dest.unlink(missing_ok=True)
        raise BadForm(f"malformed multipart body ({exc})") from None
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    finally:
        reader.close()
    if reader.filename is not None and not reader.filename and reader.file_bytes == 0:
        # A browser sends an empty, nameless part for a file input left empty.
        dest.unlink(missing_ok=True)
        return reader.fields, None
    return reader.fields, reader.filename


def too_large(cap: int) -> HTTPException:
    return HTTPException(
        413,
        f"the upload is larger than this server accepts ({cap} bytes, "
        "SYNTHWATCH_API__MAX_UPLOAD_BYTES)",
    )


# --- the app -----------------------------------------------------------------------------

_MULTIPART_SCHEMA = {
    "type": "object",
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "The media to scan."},
        "callback_url": {"type": "string", "description": "POSTed the record when done."},
    },
    "required": ["file"],
}
_SCAN_REQUEST_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
        "application/json": {"schema": ScanRequest.model_json_schema()},
    },
}


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("synthwatch.pipeline", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["when"] = lambda t: (
        "" if t is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
    )
    env.filters["score"] = lambda s: "–" if s is None else f"{s:.3f}"
    return env


_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="The client's API key.")
_BEARER = HTTPBearer(auto_error=False, description="The client's API key as a bearer token.")


def api_client(
    request: Request,
    key: Annotated[str | None, Security(_KEY_HEADER)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)],
) -> str:
    """The client a request acts for. A review-page session counts for reading (the
    page links to reports); changes through the API need a key."""
    auth: Auth = request.app.state.auth
    sessions: Sessions = request.app.state.sessions
    given = key if key is not None else credentials.credentials if credentials else None
    if given is not None:
        client = auth.client(given)
        if client is None:
            raise HTTPException(401, "wrong API key", {"WWW-Authenticate": "Bearer"})
        return client
    if request.method in ("GET", "HEAD"):
        session = sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is not None:
            return session.client
    if not auth.enabled:
        return "anonymous"
    raise HTTPException(
        401,
        "send an API key in X-API-Key (or Authorization: Bearer)",
        {"WWW-Authenticate": "Bearer"},
    )


Client = Annotated[str, Depends(api_client)]
ScanId = Annotated[str, PathParam(pattern=SCAN_ID_PATTERN, description="The scan's id.")]


def create_app(service: ScanService, auth: Auth) -> FastAPI:
    """The API and review page over `service`, which the caller starts and closes."""
    api_settings = service.settings.api
    cap = api_settings.max_upload_bytes
    sessions = Sessions(api_settings.session_ttl_s)
    pages = _templates()
    app = FastAPI(
        title="synthwatch",
        version=__version__,
        description="Scan media for synthetic content; review the decisions.",
        docs_url=None,
        redoc_url=None,
    )
    app.state.auth = auth
    app.state.sessions = sessions

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid')}"}, 422)

    @app.middleware("http")
    async def _headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", PAGE_CSP)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    # -- API ----------------------------------------------------------------------------

    @app.post(
        "/v1/scans",
        status_code=202,
        response_model=Scan,
        summary="Scan an uploaded file or a URL",
        responses={
            **UNAUTHORIZED,
            **_problem(413, "The upload is over `api.max_upload_bytes`."),
            **_problem(415, "Neither multipart/form-data nor application/json."),
            **INVALID,
        },
        openapi_extra={"requestBody": _SCAN_REQUEST_BODY},
    )
    async def create_scan(request: Request, response: Response, client: Client) -> Scan:
        """Multipart: `file` (the media) and optionally `callback_url`. JSON:
        `{"url": ..., "callback_url": ...}`. 202 with the queued scan and its
        `Location`; a URL or callback URL the fetcher would refuse is a 422 now."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > JSON_BODY_MAX:
                    raise HTTPException(413, f"a JSON request is at most {JSON_BODY_MAX} bytes")
            try:
                req = ScanRequest.model_validate_json(bytes(body))
            except ValidationError as exc:
                raise HTTPException(422, _validation_line(exc)) from None
            scan = await _submit(client, url=req.url, callback_url=req.callback_url)
        elif kind == "multipart/form-data":
            scan_id = service.new_id()
            fields, filename = await _read_upload(request, scan_id)
            scan = await _submit(
                client,
                scan_id=scan_id,
                filename=filename,
                callback_url=fields.get("callback_url") or None,
            )
        else:
            raise HTTPException(
                415, "send a file as multipart/form-data, or a url as application/json"
            )
        response.headers["Location"] = f"/v1/scans/{scan.id}"
        return scan

    async def _read_upload(request: Request, scan_id: str) -> tuple[dict[str, str], str | None]:
        try:
            return await read_form(request, service.upload_path(scan_id), cap)
        except UploadTooLarge:
            raise too_large(cap) from None
        except BadForm as exc:
            raise HTTPException(422, str(exc)) from None

    async def _submit(
        client: str,
        *,
        scan_id: str | None = None,
        filename: str | None = None,
        url: str | None = None,
        callback_url: str | None = None,
    ) -> Scan:
        upload = service.upload_path(scan_id) if scan_id and filename is not None else None
        if upload is None and url is None:
            raise HTTPException(422, "file: a multipart request carries the media in `file`")
        try:
            # Checking a URL may resolve its host name: off the event loop.
            return await run_in_threadpool(
                service.submit,
                client,
                scan_id=scan_id,
                upload=upload,
                filename=filename or "",
                url=url,
                callback_url=callback_url,
            )
        except SynthwatchError as exc:
            raise HTTPException(422, str(exc)) from None

    @app.get(
        "/v1/scans",
        response_model=list[Scan],
        summary="Recent scans, newest first",
        responses={**UNAUTHORIZED, **INVALID},
    )
    def list_scans(
        client: Client,
        decision: Annotated[
            Decision | None, Query(description="Only scans whose effective decision is this.")
        ] = None,
        status: Annotated[Status | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[Scan]:
        return service.recent(decision=decision, status=status, limit=limit)

    @app.get(
        "/v1/scans/{scan_id}",
        response_model=Scan,
        summary="One scan: status, decisions, verdict",
        responses={**UNAUTHORIZED, **NOT_FOUND, **INVALID},
    )
    def get_scan(scan_id: ScanId, client: Client) -> Scan:
        try:
            return service.get(scan_id)
        except ScanNotFound as exc:
            raise HTTPException(404, str(exc)) from None

    @app.get(
        "/v1/scans/{scan_id}/report",
        summary="The scan's forensic report",
        response_class=Response,
        responses={
            200: {
                "description": "report.html when the bundle has one, else report.json.",
                "content": {
                    "text/html": {"schema": {"type": "string"}},
                    "application/json": {"schema": {"type": "object"}},
                },
            },
            **UNAUTHORIZED,
            **NOT_FOUND,
            **_problem(409, "The scan has not finished yet."),
            **INVALID,
            **_problem(500, "The stored report no longer matches its manifest."),
        },
    )
    def get_report(scan_id: ScanId, client: Client) -> Response:
        data, name = _bundle_call(service.report, scan_id)
        return _object_response(data, name)

    @app.get(
        "/v1/scans/{scan_id}/evidence/{name}",
        summary="An object of the scan's evidence bundle, by its manifest name",
        response_class=Response,
        responses={
            200: {
                "description": "The object's bytes.",
                "content": {
                    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                    "image/png": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            **UNAUTHORIZED,
            **NOT_FOUND,
            **_problem(409, "The scan has not finished yet."),
            **INVALID,
            **_problem(500, "The stored object no longer matches its manifest."),
        },
    )
    def get_evidence(
        scan_id: ScanId, name: Annotated[str, PathParam(max_length=200)], client: Client
    ) -> Response:
        data = _bundle_call(service.evidence_object, scan_id, name)
        return _object_response(data, name)

    def _bundle_call(fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except ScanNotFound as exc:
            raise HTTPException(404, str(exc)) from None
        except NotReady as exc:
            raise HTTPException(409, str(exc)) from None
        except EvidenceAltered as exc:
            raise HTTPException(500, str(exc)) from None

    @app.post(
        "/v1/scans/{scan_id}/review",
        response_model=Scan,
        summary="Record a human decision; it overrides the automatic one",
        responses={
            **UNAUTHORIZED,
            **NOT_FOUND,
            **_problem(409, "The scan has not finished, or failed: nothing to review."),
            **INVALID,
        },
    )
    def review_scan(scan_id: ScanId, body: ReviewRequest, client: Client) -> Scan:
        try:
            return service.review(scan_id, client, body)
        except ScanNotFound as exc:
            raise HTTPException(404, str(exc)) from None
        except NotReady as exc:
            raise HTTPException(409, str(exc)) from None

    # -- review page --------------------------------------------------------------------

    def page(name: str, status: int = 200, **context: Any) -> Response:
        defaults = {"refresh": None, "client": None, "csrf": ""}
        html = pages.get_template(name).render(**{**defaults, **context})
        return Response(html, status, media_type="text/html; charset=utf-8")

    def session_of(request: Request) -> Session | None:
        return sessions.get(request.cookies.get(SESSION_COOKIE))

    def to_login() -> Response:
        return RedirectResponse("/login", 303)

    def check_csrf(session: Session, token: str | None) -> None:
        if not token or not hmac.compare_digest(token.encode(), session.csrf.encode()):
            raise HTTPException(403, "the form is stale or not from this site: reload the page")

    @app.get("/static/review.css", include_in_schema=False)
    def stylesheet() -> Response:
        css = resources.files("synthwatch.pipeline").joinpath("templates/review.css")
        return Response(
            css.read_bytes(), media_type="text/css", headers={"Cache-Control": "max-age=300"}
        )

    @app.get("/login", include_in_schema=False)
    def login_page(request: Request) -> Response:
        return page("login.html", client=None, auth=auth.enabled, error=None)

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = await request.form(max_files=0, max_fields=4)
        key = form.get("key")
        client = auth.client(key if isinstance(key, str) else None)
        if client is None:
            return page("login.html", 401, client=None, auth=True, error="That key is not valid.")
        token, _session = sessions.create(client)
        response = RedirectResponse("/", 303)
        response.set_cookie(
            SESSION_COOKIE,
            token,
            max_age=int(api_settings.session_ttl_s),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return response

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        session = session_of(request)
        if session is not None:
            form = await request.form(max_files=0, max_fields=4)
            token = form.get("csrf")
            check_csrf(session, token if isinstance(token, str) else None)
            sessions.drop(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("/login", 303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @app.get("/", include_in_schema=False)
    def index(request: Request, decision: str | None = None) -> Response:
        session = session_of(request)
        if session is None:
            return to_login()
        chosen = decision if decision in ("flag", "review", "pass", "inconclusive") else None
        scans = service.recent(decision=chosen, limit=200)  # type: ignore[arg-type]
        busy = any(s.status in ("queued", "running") for s in scans)
        return page(
            "index.html",
            client=session.client,
            csrf=session.csrf,
            scans=scans,
            decision=chosen,
            refresh=2 if busy else None,
            max_upload=cap,
        )

    @app.post("/ui/scans", include_in_schema=False)
    async def upload_page(request: Request) -> Response:
        session = session_of(request)
        if session is None:
            return to_login()
        scan_id = service.new_id()
        fields, filename = await _read_upload(request, scan_id)
        upload = service.upload_path(scan_id)
        try:
            check_csrf(session, fields.get("csrf"))
        except HTTPException:
            upload.unlink(missing_ok=True)
            raise
        if filename is None:
            return RedirectResponse("/", 303)
        scan = await _submit(session.client, scan_id=scan_id, filename=filename)
        return RedirectResponse(f"/scans/{scan.id}", 303)

    @app.get("/scans/{scan_id}", include_in_schema=False)
    def scan_page(request: Request, scan_id: ScanId) -> Response:
        session = session_of(request)
        if session is None:
            return to_login()
        try:
            scan = service.get(scan_id)
        except ScanNotFound as exc:
            raise HTTPException(404, str(exc)) from None
        return _scan_page(session, scan)

    def _scan_page(session: Session, scan: Scan, status: int = 200, error: str = "") -> Response:
        return page(
            "scan.html",
            status,
            client=session.client,
            csrf=session.csrf,
            scan=scan,
            refresh=2 if scan.status in ("queued", "running") else None,
            error=error,
            notes=(scan.verdict or {}).get("notes", []),
        )

    @app.post("/ui/scans/{scan_id}/review", include_in_schema=False)
    async def review_page(request: Request, scan_id: ScanId) -> Response:
        session = session_of(request)
        if session is None:
            return to_login()
        form = await request.form(max_files=0, max_fields=8)
        values = {k: v for k, v in form.items() if isinstance(v, str)}
        check_csrf(session, values.get("csrf"))
        try:
            body = ReviewRequest(decision=values.get("decision"), reason=values.get("reason", ""))  # type: ignore[arg-type]
            await run_in_threadpool(service.review, scan_id, session.client, body)
        except ValidationError as exc:
            return _scan_page(session, service.get(scan_id), 422, _validation_line(exc))
        except ScanNotFound as exc:
            raise HTTPException(404, str(exc)) from None
        except NotReady as exc:
            return _scan_page(session, service.get(scan_id), 409, str(exc))
        return RedirectResponse(f"/scans/{scan_id}", 303)

    return app


def _validation_line(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def _object_response(data: bytes, name: str) -> Response:
    suffix = Path(name).suffix.lower()
    headers = {"Content-Security-Policy": REPORT_CSP} if suffix == ".html" else {}
    return Response(
        data, media_type=CONTENT_TYPES.get(suffix, "application/octet-stream"), headers=headers
    )


# --- serving -----------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(settings: Settings, *, insecure_no_auth: bool = False) -> None:
    """Run the API on uvicorn until interrupted. Raises ConfigError when no API key is
    configured (unless `insecure_no_auth`, only on a loopback address), and
    ModelUnavailable like `synthwatch scan`."""
    import uvicorn

    api = settings.api
    keys = load_keys(api)
    if insecure_no_auth:
        if keys:
            raise ConfigError("--insecure-no-auth with API keys configured: drop one or the other")
        if not is_loopback(api.host):
            raise ConfigError(
                f"--insecure-no-auth serves only on a loopback address, not {api.host}"
            )
    elif not keys:
        raise ConfigError(
            "no API keys: set SYNTHWATCH_API__KEYS_FILE (a JSON object or name:key lines) "
            'or SYNTHWATCH_API__KEYS=\'{"client": "<key>"}\'; make a key with '
            f"{MAKE_KEY}. For local use only, --insecure-no-auth serves without keys on "
            "127.0.0.1"
        )
    service = ScanService(settings)
    service.start()
    try:
        app = create_app(service, Auth(None if insecure_no_auth else keys))
        config = uvicorn.Config(
            app,
            host=api.host,
            port=api.port,
            log_config=None,
            server_header=False,
            lifespan="off",
        )
        uvicorn.Server(config).run()
    finally:
        service.close()
