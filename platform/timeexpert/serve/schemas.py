"""HTTP request / response models of the grounding service (the only pydantic in the project).

Static bounds live here (types, signs, order of times, exactly-one-of); limits that come from the
service config (query length, frames, fps, upload size, allowed roots) are checked by the ingress
against `VideoLimits` and answered with the same error body.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TaskName = Literal["mr", "vhd", "dvc", "gqa"]


class _Strict(BaseModel):
    # an unknown field is a typo the client wants to hear about
    model_config = ConfigDict(extra="forbid")


# --- inputs -------------------------------------------------------------------------------------


class VideoInput(_Strict):
    """Where the video comes from: exactly one of `uri` and `data_url`."""

    uri: str | None = Field(
        default=None,
        description="A storage URI under one of the server's allowed roots: a local path "
        "(absolute, or relative to the first root), file:// or s3://. http(s) is not fetched.",
        examples=["s3://videos/demo/clip.mp4"],
    )
    data_url: str | None = Field(
        default=None,
        description="The video itself as `data:video/mp4;base64,...` (an upload), within the "
        "server's size limit.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> "VideoInput":
        if (self.uri is None) == (self.data_url is None):
            raise ValueError("give exactly one of video.uri and video.data_url")
        return self


class TimeWindow(_Strict):
    """A time range in seconds, 0 <= start < end."""

    start: float = Field(ge=0, description="seconds from the video start")
    end: float = Field(gt=0, description="seconds from the video start, after `start`")

    @model_validator(mode="after")
    def _ordered(self) -> "TimeWindow":
        if not self.end > self.start:
            raise ValueError(f"window end ({self.end}) must be after its start ({self.start})")
        return self


class _GroundingRequest(_Strict):
    model: str | None = Field(default=None, description="served model name; default: the one")
    video: VideoInput
    num_frames: int | None = Field(
        default=None, ge=1, description="frames sampled uniformly (server limit applies); "
        "default: the model's frame count"
    )
    fps: float | None = Field(
        default=None, gt=0, description="sample at this rate instead of num_frames (capped)"
    )
    window: TimeWindow | None = Field(
        default=None, description="only return events overlapping this time range"
    )

    @model_validator(mode="after")
    def _one_sampling(self) -> "_GroundingRequest":
        if self.num_frames is not None and self.fps is not None:
            raise ValueError("give at most one of num_frames and fps")
        return self


class MomentsRequest(_GroundingRequest):
    """Moment retrieval: the windows of the video that match the query, best first."""

    query: str = Field(min_length=1, description="what to find, e.g. 'a red circle moves left'")
    max_windows: int | None = Field(default=None, ge=1, le=64, description="cap on windows")


class HighlightsRequest(_GroundingRequest):
    """Highlight detection: per-clip saliency for the query, and the top windows."""

    query: str = Field(min_length=1)
    clip_len: float = Field(default=2.0, gt=0, le=60, description="saliency clip length, s")
    max_windows: int | None = Field(default=None, ge=1, le=64)


class CaptionsRequest(_GroundingRequest):
    """Dense video captioning: the events of the video with a caption each, in time order."""

    max_events: int | None = Field(default=None, ge=1, le=64)


class AnswersRequest(_GroundingRequest):
    """POST /v1/answers (GQA): a question with answer options -> the evidence span and the
    chosen option (grounding, then answering)."""

    question: str = Field(min_length=1, description="e.g. 'what colour is the circle that grows?'")
    options: list[str] = Field(min_length=2, max_length=10,
                               description="the answer options, two or more, all different")


class ChatTextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatVideoURL(_Strict):
    url: str = Field(description="an allowed storage URI or data:video/mp4;base64,...")


class ChatVideoPart(_Strict):
    type: Literal["video_url"]
    video_url: ChatVideoURL


class ChatMessage(BaseModel):
    # lenient on extra fields (name, ...): OpenAI clients send them
    role: Literal["system", "user", "assistant"]
    content: str | list[ChatTextPart | ChatVideoPart]


class ChatCompletionRequest(BaseModel):
    """OpenAI-style chat completion with one `video_url` part in the user messages."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    task: TaskName | None = Field(
        default=None,
        description="extension: the grounding task; default 'mr' with a text part, 'dvc' without",
    )
    options: list[str] | None = Field(
        default=None, min_length=2, max_length=10,
        description="extension: the answer options of task 'gqa' (the text part is the question)",
    )
    num_frames: int | None = Field(default=None, ge=1)
    fps: float | None = Field(default=None, gt=0)
    max_tokens: int | None = Field(default=None, ge=1, description="accepted, not used")
    temperature: float | None = Field(
        default=None, ge=0, description="accepted; decoding is greedy"
    )
    stream: Literal[False] = False


# --- outputs ------------------------------------------------------------------------------------


class WindowOut(BaseModel):
    start: float
    end: float
    score: float | None


class EventOut(WindowOut):
    caption: str


UNKNOWN_WORDS = ("set when the query has words the model's vocabulary lacks: it names them and "
                 "says that the answer is unreliable")


class _GroundingResponse(BaseModel):
    request_id: str
    model: str
    duration: float = Field(description="video length, seconds")
    num_frames: int = Field(description="frames the model saw")
    warning: str | None = Field(None, description=UNKNOWN_WORDS)


class MomentsResponse(_GroundingResponse):
    task: Literal["mr"] = "mr"
    windows: list[WindowOut] = Field(description="ranked by score, best first")


class HighlightsResponse(_GroundingResponse):
    task: Literal["vhd"] = "vhd"
    clip_len: float
    saliency: list[float] = Field(description="one score per clip of clip_len seconds")
    windows: list[WindowOut]


class CaptionsResponse(_GroundingResponse):
    task: Literal["dvc"] = "dvc"
    events: list[EventOut] = Field(description="in time order")


class AnswersResponse(_GroundingResponse):
    task: Literal["gqa"] = "gqa"
    evidence: WindowOut | None = Field(description="where the video shows the answer")
    answer_index: int | None = Field(description="index of the chosen option; null when the "
                                                 "model's answer names none of them")
    answer: str | None = Field(description="the chosen option")


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    finish_reason: Literal["stop", "length"]


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage
    task: TaskName
    events: list[EventOut] = Field(description="extension: the structured answer")
    warning: str | None = Field(None, description=f"extension: {UNKNOWN_WORDS}")


class ModelInfoResponse(BaseModel):
    name: str
    checkpoint: str
    version: str
    gating: str
    num_layers: int
    max_experts: int
    active_experts: list[list[int]] = Field(description="active expert slots per decoder layer")
    ep_size: int = Field(description="expert-parallel ranks per replica (1: monolithic)")
    experts_per_rank: int = Field(description="expert slots each rank holds per layer")
    image_size: int
    num_frames: int
    max_batch_size: int
    tasks: list[TaskName]


class VideoEntry(BaseModel):
    uri: str = Field(description="what a request's video.uri takes")
    name: str = Field(description="the path under its allowed root")


class VideoListResponse(BaseModel):
    videos: list[VideoEntry] = Field(description="the videos under the allowed roots, by path")
    truncated: bool = Field(description="there are more than the listed ones")


class HealthResponse(BaseModel):
    status: Literal["ok"]


class ReadyResponse(BaseModel):
    status: Literal["ready"]
    replicas: dict[str, int] = Field(description="running replicas of each deployment")


class ErrorDetail(BaseModel):
    type: str = Field(description="machine-readable kind, e.g. invalid_request, forbidden_uri")
    message: str = Field(description="what was wrong, for a human")
    details: list[dict] | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
    request_id: str
