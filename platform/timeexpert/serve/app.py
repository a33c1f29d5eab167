"""The HTTP ingress of the grounding service (FastAPI on Ray Serve) and the application builder.

    POST /v1/moments           MR: video + query -> ranked windows
    POST /v1/highlights        VHD: video + query -> per-clip saliency + top windows
    POST /v1/captions          DVC: video -> events with captions
    POST /v1/answers           GQA: video + question + options -> evidence span + chosen option
    POST /v1/chat/completions  OpenAI-style, a `video_url` content part; text + structured events
    GET  /v1/models, /v1/models/{name}   model list / model info (checkpoint, gating, experts)
    GET  /v1/videos            the videos under the allowed roots (for the page's picker)
    GET  /v1/videos/content    an allowed video's bytes (for the page's player)
    GET  /                     the web page: a video, a question, the answer on its timeline
    GET  /healthz              liveness: the ingress answers (no auth)
    GET  /readyz               readiness: 200 when the decoder and the model each have a running
                               replica, else 503 saying which has none and why (no auth)
    GET  /docs, /openapi.json  the OpenAPI page

Request flow: validate (pydantic, then the config limits in `inputs`) -> VideoDecoder deployment
(allowed URI or upload -> frames at the model's size) -> GroundingModel deployment (batched) ->
response model. The web page (`page/`: static HTML and JavaScript, no build step) calls the same
/v1/ endpoints as any client, with the bearer token the user types. The ingress keeps the
decoder's responses of recent decodes (by content version and sampling): a repeated video skips
the decoder and its frames go from the object store straight to the model replica. Every error
body is `ErrorResponse` JSON: client mistakes are 4xx saying what was wrong; anything else is a
5xx carrying the request id (Serve's, also the `X-Request-ID` header of every response) and logged
with it. Load is shed, not queued without bound: a request finding the model's queue full
(`model.max_queued_requests`) gets 503 `overloaded` with `Retry-After` at once.
"""

# No `from __future__ import annotations`: FastAPI resolves the routes' parameter types (Request,
# the body models) at runtime, and Serve's class-based view cannot resolve string annotations.

import asyncio
import logging
import mimetypes
import pathlib
import re
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import Application
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from timeexpert import storage
from timeexpert.events import Event, Task, check_options
from timeexpert.serve import schemas as S
from timeexpert.serve.deployments import (
    DecodedCache,
    GroundingModelServer,
    VideoDecoder,
    read_video,
    video_version,
)
from timeexpert.serve.edge import API_VERSION, Edge, configure_edge, error_response
from timeexpert.serve.inputs import (
    Rejection,
    RequestError,
    check_query,
    check_sampling,
    list_videos,
    resolve_video_uri,
    video_source,
)
from timeexpert.serve.settings import ServiceConfig

logger = logging.getLogger("ray.serve")

# The web page's files (served as they are; read per request, they are small).
PAGE_DIR = pathlib.Path(__file__).with_name("page")
_PAGE_ASSETS = {"page.js": "text/javascript", "page.css": "text/css"}
MAX_LISTED_VIDEOS = 1000  # the picker's list; a client may still name any allowed video

# A lost model replica: the client may retry (503); anything else is a 500.
# (RayActorError covers ActorDiedError and ActorUnavailableError.) A full queue
# (BackPressureError) is a 503 too, answered without a traceback: it is the expected answer
# under overload.
_UNAVAILABLE = (RayActorError, DeploymentUnavailableError)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes in Serve's status messages

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": S.ErrorResponse}
    for code in (400, 401, 403, 404, 413, 415, 422, 500, 503)
}

fastapi_app = FastAPI(
    title="TimeExpert grounding",
    version=API_VERSION,
    description="Video temporal grounding: moment retrieval, highlight detection and dense video "
    "captioning with an expert-guided video LLM. Videos come from allow-listed storage URIs or "
    "as base64 data URLs. Send `Authorization: Bearer TOKEN` when the server has a token.",
)


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", None) or uuid.uuid4().hex


fastapi_app.add_middleware(Edge)


@fastapi_app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    details = [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg", ""),
         "type": e.get("type", "")}
        for e in exc.errors()
    ]
    message = "; ".join(
        f"{'.'.join(d['loc'][1:] if d['loc'][:1] == ['body'] else d['loc']) or 'body'}: {d['msg']}"
        for d in details
    )
    return error_response(422, "invalid_request", message, _request_id(request), details)


@fastapi_app.exception_handler(StarletteHTTPException)
async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, kind, str(exc.detail), _request_id(request))


@fastapi_app.exception_handler(Exception)
async def _crash(request: Request, exc: Exception) -> JSONResponse:
    """Last resort (the routes answer their own failures): JSON 500 with the request id."""
    rid = _request_id(request)
    logger.error("request %s failed: %r", rid, exc)
    return error_response(500, "internal_error", f"internal error; report request id {rid}", rid)


# Module-level helpers used by the routes sit ABOVE the ingress class: `serve.ingress` pickles the
# routes by value when the class body is executed, with the module globals defined by then.


def _raise_rejection(value) -> None:
    if isinstance(value, Rejection):
        raise RequestError(value.status, value.kind, value.message)


def _running_replicas(app_name: str, deployments: list[str]) -> dict[str, tuple[int, str]]:
    """Per deployment of the application: (running replicas, its status and message)."""
    app = serve.status().applications.get(app_name)
    out = {}
    for name in deployments:
        d = app.deployments.get(name) if app is not None else None
        if d is None:
            out[name] = (0, "not deployed")
            continue
        running = sum(n for state, n in d.replica_states.items()
                      if str(getattr(state, "value", state)) == "RUNNING")
        # Serve's message is a sentence and, after a failed start, the replica's traceback:
        # keep the sentence and the traceback's last line (the error itself)
        lines = [line.strip() for line in _ANSI.sub("", d.message or "").splitlines()
                 if line.strip()]
        said = " ... ".join(dict.fromkeys([lines[0].split(" Error:")[0], lines[-1]])) if lines else ""
        out[name] = (running, f"{getattr(d.status, 'value', d.status)}: {said}"[:1000])
    return out


def _overlaps(event: Event, window: S.TimeWindow | None) -> bool:
    if window is None:
        return True
    return event.end >= window.start and event.start <= window.end


def _window(e: Event) -> S.WindowOut:
    return S.WindowOut(start=e.start, end=e.end, score=e.score)


def _event(e: Event) -> S.EventOut:
    return S.EventOut(start=e.start, end=e.end, score=e.score, caption=e.caption)


def _describe(events: list[Event], task: Task) -> str:
    """The chat answer: one line per event, in the model's order (GQA: the evidence span, then
    the answer)."""
    if task == Task.GQA:
        span = f"{events[0].start:.1f}-{events[0].end:.1f} s" if events else "none found"
        said = events[-1].caption if events and events[-1].caption else "none of the options"
        return f"Evidence: {span}. Answer: {said}."
    if not events:
        return "No matching moment found." if task != Task.DVC else "No events found."
    lines = []
    for e in events:
        line = f"{e.start:.1f}-{e.end:.1f} s"
        if e.score is not None:
            line += f" (score {e.score:.1f})"
        if e.caption:
            line += f": {e.caption}"
        lines.append(line)
    return "\n".join(lines)


@serve.deployment(name="GroundingIngress", max_ongoing_requests=256)
@serve.ingress(fastapi_app)
class GroundingIngress:
    """Validates requests, sends the video to the decoder and the frames to the model."""

    def __init__(self, config: ServiceConfig, decoder: DeploymentHandle, model: DeploymentHandle):
        self.config = config
        self.decoder = decoder
        self.model = model
        self._info = None  # the model's ModelInfo, asked once
        self._decoded = DecodedCache(config.video.decode_cache_entries)
        self._app_name = serve.get_replica_context().app_name
        self.shed = 0  # requests answered 503 overloaded (a full model queue)
        # base64 + JSON around the largest upload
        configure_edge(auth_token=config.auth_token,
                       max_body_bytes=config.video.max_upload_bytes * 4 // 3 + 64 * 1024)

    # --- endpoints ------------------------------------------------------------------------------

    @fastapi_app.get("/healthz", response_model=S.HealthResponse)
    async def healthz(self) -> S.HealthResponse:
        """Liveness: this process answers (a model that cannot load does not restart it)."""
        return S.HealthResponse(status="ok")

    @fastapi_app.get("/readyz", response_model=S.ReadyResponse, responses=_ERRORS)
    async def readyz(self, request: Request):
        """Readiness (Kubernetes' readinessProbe): 200 when the decoder and the model each have
        a running replica (constructed: the checkpoint loaded; health checks passing), else 503
        naming the deployment without one and its status (a bad checkpoint's error)."""
        names = [self.decoder.deployment_name, self.model.deployment_name]
        running = await asyncio.to_thread(_running_replicas, self._app_name, names)
        missing = {name: why for name, (n, why) in running.items() if n == 0}
        if missing:
            return error_response(
                503, "not_ready", "no running replica of "
                + "; ".join(f"{name} ({why})" for name, why in missing.items()),
                _request_id(request), retry_after_s=self.config.ingress.retry_after_s)
        return S.ReadyResponse(status="ready", replicas={k: n for k, (n, _) in running.items()})

    @fastapi_app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        """The web page: pick or upload a video, ask, see the answer on the video's timeline."""
        return HTMLResponse((PAGE_DIR / "index.html").read_text())

    @fastapi_app.get("/page/{name}", include_in_schema=False)
    async def page_asset(self, name: str) -> Response:
        if name not in _PAGE_ASSETS:
            raise StarletteHTTPException(404, f"no page file {name!r}")
        return Response((PAGE_DIR / name).read_bytes(), media_type=_PAGE_ASSETS[name])

    @fastapi_app.get(
        f"/{API_VERSION}/videos", response_model=S.VideoListResponse, responses=_ERRORS
    )
    async def videos(self, request: Request):
        """The videos under the allowed roots, by path (at most 1000): a request's `video.uri`."""
        return await self._guarded(request, self._videos())

    @fastapi_app.get(f"/{API_VERSION}/videos/content", responses=_ERRORS)
    async def video_content(self, uri: str, request: Request):
        """The bytes of the video at `uri`, under the same allow-list and size limit as a
        request's `video.uri`."""
        return await self._guarded(request, self._video_bytes(uri))

    @fastapi_app.get(f"/{API_VERSION}/models", responses=_ERRORS)
    async def list_models(self) -> dict:
        """The served model, in the OpenAI list format."""
        return {"object": "list", "data": [
            {"id": self.config.model_name, "object": "model", "owned_by": "timeexpert"}
        ]}

    @fastapi_app.get(
        f"/{API_VERSION}/models/{{name}}", response_model=S.ModelInfoResponse, responses=_ERRORS
    )
    async def model_info(self, name: str, request: Request):
        """Checkpoint, gating mode, active experts per layer, sharding, version."""
        return await self._guarded(request, self._model_info(name))

    @fastapi_app.post(
        f"/{API_VERSION}/moments", response_model=S.MomentsResponse, responses=_ERRORS
    )
    async def moments(self, body: S.MomentsRequest, request: Request):
        return await self._guarded(request, self._ground(request, body, Task.MR))

    @fastapi_app.post(
        f"/{API_VERSION}/highlights", response_model=S.HighlightsResponse, responses=_ERRORS
    )
    async def highlights(self, body: S.HighlightsRequest, request: Request):
        return await self._guarded(request, self._ground(request, body, Task.VHD))

    @fastapi_app.post(
        f"/{API_VERSION}/captions", response_model=S.CaptionsResponse, responses=_ERRORS
    )
    async def captions(self, body: S.CaptionsRequest, request: Request):
        return await self._guarded(request, self._ground(request, body, Task.DVC))

    @fastapi_app.post(
        f"/{API_VERSION}/answers", response_model=S.AnswersResponse, responses=_ERRORS
    )
    async def answers(self, body: S.AnswersRequest, request: Request):
        return await self._guarded(request, self._ground(request, body, Task.GQA))

    @fastapi_app.post(
        f"/{API_VERSION}/chat/completions", response_model=S.ChatCompletionResponse,
        responses=_ERRORS,
    )
    async def chat_completions(self, body: S.ChatCompletionRequest, request: Request):
        return await self._guarded(request, self._chat(request, body))

    # --- the work -------------------------------------------------------------------------------

    async def _guarded(self, request: Request, work) -> Any:
        """Await `work`; a RequestError is its 4xx, anything else a 5xx with the request id."""
        rid = _request_id(request)
        retry_after = self.config.ingress.retry_after_s
        try:
            return await work
        except RequestError as err:
            return error_response(err.status, err.kind, err.message, rid)
        except BackPressureError:
            self.shed += 1
            return error_response(
                503, "overloaded", f"the service is at capacity (the model's queue of "
                f"{self.config.model.max_queued_requests} requests is full); retry after "
                f"{retry_after} s", rid, retry_after_s=retry_after)
        except Exception as err:  # noqa: BLE001 - the one place internal failures are answered
            unavailable = isinstance(err, _UNAVAILABLE)
            logger.exception("request %s failed", rid)
            return error_response(
                503 if unavailable else 500,
                "model_unavailable" if unavailable else "internal_error",
                f"{'the model replica was lost' if unavailable else 'internal error'} "
                f"({type(err).__name__}); retry, or report request id {rid}",
                rid, retry_after_s=retry_after if unavailable else None,
            )

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise RequestError(
                404, "model_not_found",
                f"unknown model {name!r}; this server serves {self.config.model_name!r}",
            )

    async def _model_meta(self):
        if self._info is None:
            self._info = await self.model.info.remote()
        return self._info

    async def _videos(self) -> S.VideoListResponse:
        found, truncated = await asyncio.to_thread(
            list_videos, self.config.video.allowed_roots, MAX_LISTED_VIDEOS)
        return S.VideoListResponse(
            videos=[S.VideoEntry(uri=uri, name=name) for uri, name in found], truncated=truncated)

    async def _video_bytes(self, uri: str) -> Response:
        limits = self.config.video
        resolved = resolve_video_uri(uri, limits.allowed_roots)
        data = await asyncio.to_thread(read_video, resolved, limits.max_upload_bytes)
        kind = mimetypes.guess_type(resolved)[0] or "application/octet-stream"
        return Response(data, media_type=kind)

    async def _model_info(self, name: str) -> S.ModelInfoResponse:
        self._check_model(name)
        info = await self._model_meta()
        return S.ModelInfoResponse(
            name=self.config.model_name, version=self.config.version,
            checkpoint=info.checkpoint, gating=info.gating, num_layers=info.num_layers,
            max_experts=info.max_experts, active_experts=info.active_experts,
            ep_size=info.ep_size, experts_per_rank=info.experts_per_rank,
            image_size=info.image_size, num_frames=info.num_frames,
            max_batch_size=info.max_batch_size, tasks=[t.value for t in Task],
        )

    async def _answer(
        self, *, uri: str | None, data_url: str | None, task: Task, query: str,
        num_frames: int | None, fps: float | None, max_events: int | None = None,
        clip_len: float = 2.0, options: list[str] | None = None,
    ):
        """Video + task -> (Prediction, duration, number of frames sampled).

        A video seen before (same content version and sampling) goes straight to the model as
        the decoder's earlier response; a new one is decoded by the VideoDecoder first."""
        limits = self.config.video
        query = check_query(query, limits.max_query_chars)
        if task == Task.GQA:
            try:
                check_options(options)
            except ValueError as err:
                raise RequestError(422, "invalid_request", str(err)) from None
        info = await self._model_meta()
        num_frames, fps = check_sampling(
            num_frames, fps, info.num_frames, limits.max_frames, limits.max_fps
        )
        source = video_source(uri, data_url, limits.allowed_roots, limits.max_upload_bytes)
        size = (info.image_size, info.image_size)
        if source.uri is not None and storage.split_scheme(source.uri)[0] in ("", "file"):
            version = video_version(source)  # one local stat: cheaper than a thread hop
        else:  # an S3 HEAD, or hashing an upload: off the event loop
            version = await asyncio.to_thread(video_version, source)
        key = (version, num_frames, fps, size)
        prediction, (_, duration, frames) = await self._decoded.run(
            key,
            decode=lambda: self._decode(source, num_frames, fps, size),
            use=lambda decoded: self.model.predict.remote(
                decoded, task=task, query=query, max_events=max_events, clip_len=clip_len,
                options=options,
            ),
        )
        _raise_rejection(prediction)
        return prediction, duration, frames

    async def _decode(self, source, num_frames, fps, size) -> tuple:
        """The VideoDecoder's answer for `source` as (response, duration, frame count); a
        Rejection (undecodable video, ...) is raised as its RequestError.

        The response is kept, not its value: passed to the model's handle call, Serve hands the
        model replica the decoder's object ref (Serve's documented model composition), so the
        frames go from the object store to the model without passing through the ingress."""
        response: DeploymentResponse = self.decoder.decode.remote(
            source, num_frames=num_frames, fps=fps, size=size
        )
        video = await response
        _raise_rejection(video)
        return response, float(video.duration), len(video.timestamps)

    def decode_cache_stats(self) -> dict:
        """Hits and misses of this replica's decoded-video cache."""
        return self._decoded.stats()

    async def _ground(self, request: Request, body, task: Task):
        self._check_model(body.model)
        max_events = getattr(body, "max_windows", None) or getattr(body, "max_events", None)
        clip_len = getattr(body, "clip_len", 2.0)
        query = body.question if task == Task.GQA else getattr(body, "query", "")
        prediction, duration, frames = await self._answer(
            uri=body.video.uri, data_url=body.video.data_url, task=task,
            query=query, num_frames=body.num_frames, fps=body.fps,
            max_events=max_events, clip_len=clip_len, options=getattr(body, "options", None),
        )
        events = [e for e in prediction.events if _overlaps(e, body.window)]
        common = dict(
            request_id=_request_id(request), model=self.config.model_name,
            duration=duration, num_frames=frames, warning=prediction.warning,
        )
        if task == Task.MR:
            return S.MomentsResponse(**common, windows=[_window(e) for e in events])
        if task == Task.GQA:  # the evidence is the answer's first span, whatever `window` says
            chosen = prediction.answer
            return S.AnswersResponse(
                **common, evidence=_window(prediction.events[0]) if prediction.events else None,
                answer_index=chosen, answer=None if chosen is None else body.options[chosen])
        if task == Task.VHD:
            return S.HighlightsResponse(
                **common, clip_len=clip_len, saliency=list(prediction.saliency or []),
                windows=[_window(e) for e in events],
            )
        return S.CaptionsResponse(**common, events=[_event(e) for e in events])

    async def _chat(self, request: Request, body: S.ChatCompletionRequest):
        self._check_model(body.model)
        texts, videos = [], []
        for message in body.messages:
            if message.role != "user":
                continue
            if isinstance(message.content, str):
                texts.append(message.content)
                continue
            for part in message.content:
                if part.type == "text":
                    texts.append(part.text)
                else:
                    videos.append(part.video_url.url)
        if len(videos) != 1:
            raise RequestError(
                422, "invalid_request",
                f"the user messages need exactly one video_url part, got {len(videos)}",
            )
        text = " ".join(t.strip() for t in texts if t.strip())
        task = Task.parse(body.task) if body.task else (Task.MR if text else Task.DVC)
        if task != Task.DVC and not text:
            raise RequestError(422, "invalid_request", f"task {task.value!r} needs a text part")
        if (task == Task.GQA) != (body.options is not None):
            raise RequestError(422, "invalid_request",
                               "options go with task 'gqa' (the text part is the question), "
                               "and task 'gqa' needs them")
        url = videos[0]
        is_data = url.lower().startswith("data:")
        prediction, *_ = await self._answer(
            uri=None if is_data else url, data_url=url if is_data else None, task=task,
            query=text, num_frames=body.num_frames, fps=body.fps, options=body.options,
        )
        events = prediction.events
        return S.ChatCompletionResponse(
            id=f"chatcmpl-{_request_id(request)}", created=int(time.time()),
            model=self.config.model_name,
            choices=[S.ChatChoice(
                index=0, message=S.ChatChoiceMessage(content=_describe(events, task)),
                finish_reason="stop",
            )],
            usage=S.ChatUsage(
                prompt_tokens=0, completion_tokens=prediction.num_tokens,
                total_tokens=prediction.num_tokens,
            ),
            task=task.value, events=[_event(e) for e in events], warning=prediction.warning,
        )


# --- the application ----------------------------------------------------------------------------


def build_application(config: ServiceConfig) -> Application:
    """Bind the three deployments into one Serve application, each with the options its section
    of `config` gives (`settings.*.deployment_options`)."""
    model = GroundingModelServer.options(**config.model.deployment_options()).bind(config.model)
    decoder = VideoDecoder.options(**config.decoder.deployment_options()).bind(config.video)
    ingress = GroundingIngress.options(**config.ingress.deployment_options())
    return ingress.bind(config, decoder, model)
