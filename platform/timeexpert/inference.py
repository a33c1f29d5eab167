"""Checkpoint -> events: the one-call grounding API that evaluation and serving share.

    gm = GroundingModel.load("runs/ckpt")            # a local dir, file:// or s3://
    pred = gm.predict(frames_THWC, timestamps_T, "mr", "a person opens the door")
    pred.events  # [Event(start, end, score, caption)], pred.saliency (VHD, per clip)

Each task's answer is read by one reader, chosen once from the model config's `AnswerChoice`
(`READERS`): off the generated tokens, off the frames' relevance of one prompt pass (nothing
generated), or off the relevance of texts asked over the frames (the training captions for DVC,
each option for GQA). `predict_batch` batches each kind of pass over the requests that need it;
Serve's `@serve.batch` calls it. Bad input raises ValueError naming the problem, never a silent
truncation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from timeexpert.checkpoints import local_checkpoint
from timeexpert.events import (EOS, SWITCH, Event, Task, TokenType, gqa_hypothesis,
                               read_gqa_answer, saliency_from_events)
from timeexpert.models.evidence import interval_from_salient
from timeexpert.models.frame_relevance import (
    clip_saliency, dense_events_from_relevance, pad_caption_ids, windows_from_relevance,
)
from timeexpert.models.generation import frame_relevance, generate_answer
from timeexpert.models.processor import TimeExpertProcessor
from timeexpert.models.timeexpert import TimeExpertForGrounding
from timeexpert.models.tokenizer import GroundingTokenizer, collate


@dataclass(frozen=True)
class _Reader:
    """How one (task, answer choice) is answered."""

    method: str  # the GroundingModel method that reads the answer
    reads: str  # what it needs first: "generation", "prompt" (one prompt pass) or "asks" (its own)
    fallback: str = ""  # the choice that answers a request this reader cannot


READERS = {
    (Task.MR, "frames"): _Reader("read_windows", "prompt"),
    (Task.MR, "generated"): _Reader("read_generated", "generation"),
    (Task.VHD, "frames"): _Reader("read_windows", "prompt"),
    (Task.VHD, "generated"): _Reader("read_generated", "generation"),
    (Task.DVC, "captions"): _Reader("ground_captions", "asks", fallback="generated"),
    (Task.DVC, "frames"): _Reader("read_dense_frames", "generation"),
    (Task.DVC, "generated"): _Reader("read_generated", "generation"),
    (Task.GQA, "options"): _Reader("ground_options", "asks", fallback="frames"),
    (Task.GQA, "frames"): _Reader("read_generated_option", "generation"),
    (Task.GQA, "generated"): _Reader("read_generated", "generation"),
}


@dataclass
class _Asked:
    """A request as the model reads it."""

    prompt: dict  # the tokenizer's encoding of the prompt
    pixels: torch.Tensor  # (T, 3, H, W) normalised frames
    duration: float
    task: Task
    cap: int  # events at most


@dataclass
class Prediction:
    """The answer to one request."""

    events: list[Event]  # MR / VHD: ranked by score; DVC: in time order
    saliency: list[float] | None  # VHD: one score per clip of `clip_len` seconds, else None
    text: str  # the raw generated answer, pieces joined (for logs and chat)
    num_tokens: int  # generated tokens
    token_density: list[float] | None = None  # GroundVTS: kept visual tokens / frame, per frame
    evidence: list[list[float]] | None = None  # D2VLM: per generated <evi>, per-frame grounding
    # D2VLM: per generated <evi>, the interval its salient frames form (p >= threshold_ratio *
    # max p, D2VLM sec. 4), None when no frame is salient
    evidence_intervals: list[tuple[float, float] | None] | None = None
    # frame relevance: per frame, the probability that it shows the queried moment
    frame_relevance: list[float] | None = None
    # GQA: the index of the option the answer chose (None when it names none); its evidence span
    # is events[0]
    answer: int | None = None
    # the words of the query (and GQA options) the model's tokenizer does not know
    # (`GroundingTokenizer.unknown_words`): the model cannot have read them
    unknown_words: list[str] = field(default_factory=list)

    @property
    def warning(self) -> str | None:
        """What to tell the asker when the query has unknown words, else None."""
        if not self.unknown_words:
            return None
        return (f"the model's vocabulary lacks {', '.join(map(repr, self.unknown_words))}: it never "
                "learnt these words, so this answer is unreliable")


@dataclass
class PredictRequest:
    """One request of a batch (the arguments of `GroundingModel.predict`)."""

    frames_THWC: np.ndarray  # uint8 RGB frames, resized by the pipeline to the model's size
    timestamps_T: np.ndarray  # seconds of each frame
    task: Task | str
    query: str = ""
    duration: float | None = None  # video length; default: last timestamp + one frame gap
    max_events: int | None = None  # default: the model config's cap
    clip_len: float = 2.0  # saliency clip length (VHD), QVHighlights uses 2 s
    options: list[str] | None = None  # GQA: the answer options of the question in `query`


def _default_duration(timestamps_T: np.ndarray) -> float:
    gap = float(np.median(np.diff(timestamps_T))) if len(timestamps_T) > 1 else 1.0
    return float(timestamps_T[-1]) + max(gap, 0.0)


class GroundingModel:
    """A TimeExpert model with its tokenizer, ready to answer MR / VHD / DVC requests."""

    def __init__(self, model, tokenizer, *, device: str = "cpu") -> None:
        self.model = model.to(device)
        self.tokenizer = tokenizer
        self.device = device
        _check_compatible(model.config, tokenizer)
        self.choice = model.config.answer_choice()
        if self.choice.dvc == "captions" and not tokenizer.captions:
            raise ValueError("the model answers DVC by grounding the training captions (answer "
                             "choice dvc='captions'), but its tokenizer holds no captions")
        self.processor = TimeExpertProcessor.from_config(model.config, tokenizer)

    @functools.cached_property
    def caption_ids(self) -> torch.Tensor | None:
        """The tokenizer's captions as (K, L) text ids, -1 padding, on the model's device: the
        candidates of `ground_captions`; None when it has none."""
        if not self.tokenizer.captions:
            return None
        return pad_caption_ids(self.tokenizer.caption_ids).to(self.device)

    @classmethod
    def from_model(cls, model, tokenizer) -> "GroundingModel":
        """Wrap an in-memory model (e.g. during training or evaluation)."""
        device = str(next(model.parameters()).device)
        return cls(model, tokenizer, device=device)

    @classmethod
    def load(cls, uri: str, *, device: str = "cpu") -> "GroundingModel":
        """Load model + tokenizer saved by `save` from any checkpoint URI of
        `timeexpert.checkpoints` (a local dir, `file://`, `s3://`, `models:/`, `runs:/`); a
        remote copy is removed once both are in memory."""
        with local_checkpoint(uri) as local:
            model = TimeExpertForGrounding.from_pretrained(local).eval()
            tokenizer = GroundingTokenizer.from_pretrained(local)
        return cls(model, tokenizer, device=device)

    def save(self, path: str) -> None:
        """Model (safetensors + config, routing state included) and processor (tokenizer
        included) in one dir: `AutoModel` and `AutoProcessor` load it."""
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)

    # --- prediction ----------------------------------------------------------------------------

    def predict(
        self,
        frames_THWC: np.ndarray,
        timestamps_T: np.ndarray,
        task: Task | str,
        query: str = "",
        *,
        duration: float | None = None,
        max_events: int | None = None,
        clip_len: float = 2.0,
        options: list[str] | None = None,
    ) -> Prediction:
        request = PredictRequest(
            frames_THWC=frames_THWC,
            timestamps_T=timestamps_T,
            task=task,
            query=query,
            duration=duration,
            max_events=max_events,
            clip_len=clip_len,
            options=options,
        )
        return self.predict_batch([request])[0]

    def predict_batch(self, requests: list[PredictRequest]) -> list[Prediction]:
        """Every request answered by its task's reader (`AnswerChoice`): the answers read off the
        frames need one prompt pass, the others generate; a frame-read answer that cannot be
        read (a GQA question without options, hypotheses or captions too long to ask) is
        generated instead, by its reader's fallback."""
        if not requests:
            return []
        asked = [self._encode(r, i if len(requests) > 1 else None) for i, r in enumerate(requests)]
        readers = [READERS[(a.task, self.choice.of(a.task))] for a in asked]
        predictions: list[Prediction] = [Prediction(events=[], saliency=None, text="", num_tokens=0)
                                         for _ in requests]
        was_training = self.model.training  # a model lent by a training loop gets its mode back
        self.model.eval()
        try:
            with torch.inference_mode():
                self._generate(requests, asked, [b for b, rd in enumerate(readers)
                                                 if rd.reads == "generation"], predictions)
                self._prompt_pass(asked, [b for b, rd in enumerate(readers)
                                          if rd.reads == "prompt"], predictions)
                retry = self._read(requests, asked, readers, predictions, range(len(requests)))
                if retry:  # their readers' fallbacks
                    fallbacks = list(readers)
                    for b in retry:
                        fallbacks[b] = READERS[(asked[b].task, readers[b].fallback)]
                    self._generate(requests, asked, retry, predictions)
                    self._read(requests, asked, fallbacks, predictions, retry)
        finally:
            self.model.train(was_training)
        for r, a, p in zip(requests, asked, predictions):
            if a.task == Task.GQA:
                p.answer = read_gqa_answer(p.events, r.options)[1]
            p.unknown_words = self.tokenizer.unknown_words(" ".join([r.query, *(r.options or [])]))
        return predictions

    def _encode(self, r: PredictRequest, index: int | None) -> "_Asked":
        """A request as the model reads it; a ValueError names the request (`index`) and what is
        wrong with it."""
        try:
            prompt, pixel_values = self.processor.encode_request(r.frames_THWC, r.timestamps_T,
                                                                 r.task, r.query, r.options)
            ts = np.asarray(r.timestamps_T, dtype=np.float64).reshape(-1)
            duration = _default_duration(ts) if r.duration is None else float(r.duration)
            if not duration > 0:
                raise ValueError(f"duration must be > 0, got {r.duration}")
            cap = self.model.config.max_events if r.max_events is None else int(r.max_events)
            if cap < 0:
                raise ValueError(f"max_events must be >= 0, got {r.max_events}")
        except ValueError as err:
            raise ValueError(str(err) if index is None else f"request {index}: {err}") from None
        return _Asked(prompt=prompt, pixels=pixel_values, duration=duration,
                      task=Task.parse(r.task), cap=cap)

    def _generate(self, requests, asked, rows: list[int], predictions) -> None:
        """The generated answers of `rows` (one batched prompt pass and decoding loop), with
        their frames' relevance, GroundVTS token density and D2VLM evidence."""
        if not rows:
            return
        dev = self.device
        batch = collate([asked[b].prompt for b in rows], padding_side="left")
        generated, extras = generate_answer(
            self.model, batch["input_ids"].to(dev), batch["token_types"].to(dev),
            batch["attention_mask"].to(dev),
            pixel_values=torch.cat([asked[b].pixels for b in rows]).to(dev),
            max_new_tokens=self.model.config.max_position_embeddings - batch["input_ids"].shape[1],
            max_events=[asked[b].cap for b in rows], return_extras=True)
        density = None if extras["token_density"] is None else extras["token_density"].tolist()
        start = 0
        for k, (b, (ids, kinds)) in enumerate(zip(rows, generated)):
            p = self._prediction(ids, kinds, asked[b].task, asked[b].duration,
                                 requests[b].clip_len)
            if extras["frame_relevance"] is not None:
                p.frame_relevance = extras["frame_relevance"][k]
            frames = asked[b].pixels.shape[0]
            if density is not None:  # per request, its frames' share of the density
                p.token_density = density[start:start + frames]
            start += frames
            if self.model.evidence_head is not None:
                self._read_evidence(requests[b], p, extras["evidence"][k], asked[b].duration)
            predictions[b] = p

    def _prompt_pass(self, asked, rows: list[int], predictions) -> None:
        """The frames' relevance of `rows` from one batched prompt pass, nothing generated: what
        the answers read off the frames need."""
        if not rows:
            return
        dev = self.device
        batch = collate([asked[b].prompt for b in rows], padding_side="left")
        out = self.model(batch["input_ids"].to(dev), batch["token_types"].to(dev),
                         attention_mask=batch["attention_mask"].to(dev),
                         pixel_values=torch.cat([asked[b].pixels for b in rows]).to(dev),
                         return_logits=False)
        for b, relevance in zip(rows, frame_relevance(out)):
            predictions[b].frame_relevance = relevance

    def _read(self, requests, asked, readers, predictions, rows) -> list[int]:
        """Each reader over its requests among `rows`, batched; the requests it could not
        answer, for their fallback."""
        groups: dict[str, list[int]] = {}
        for b in rows:
            groups.setdefault(readers[b].method, []).append(b)
        retry = []
        for method, group in groups.items():
            unread = getattr(self, method)([requests[b] for b in group],
                                           [asked[b] for b in group],
                                           [predictions[b] for b in group])
            retry += [group[k] for k in unread]
        return retry

    # --- the readers: (requests, their _Asked, their predictions) -> the ones not answered ------

    def read_generated(self, requests, asked, predictions) -> list[int]:
        """The generated answer as it is."""
        return []

    def read_windows(self, requests, asked, predictions) -> list[int]:
        """MR / VHD off the frames: the windows of the relevant frames, best first, and VHD's
        clip saliency from their probabilities."""
        threshold = self.model.config.frame_threshold
        for r, a, p in zip(requests, asked, predictions):
            p.events = windows_from_relevance(p.frame_relevance, r.timestamps_T, a.duration,
                                              threshold)[: a.cap]
            if a.task == Task.VHD:
                p.saliency = clip_saliency(p.frame_relevance, r.timestamps_T, a.duration,
                                           r.clip_len)
        return []

    def read_generated_option(self, requests, asked, predictions) -> list[int]:
        """GQA: the generated option, its evidence the best window of the frames relevant to the
        question."""
        for r, a, p in zip(requests, asked, predictions):
            best = windows_from_relevance(p.frame_relevance, r.timestamps_T, a.duration,
                                          self.model.config.frame_threshold)[0]
            caption = p.events[-1].caption if p.events else ""
            p.events = [Event(start=best.start, end=best.end, score=best.score, caption=caption)]
        return []

    def read_dense_frames(self, requests, asked, predictions) -> list[int]:
        """DVC: the runs of relevant frames, each with the caption of the generated event it
        overlaps most (`dense_events_from_relevance`)."""
        for r, a, p in zip(requests, asked, predictions):
            p.events = dense_events_from_relevance(p.frame_relevance, r.timestamps_T, a.duration,
                                                   p.events, a.cap,
                                                   self.model.config.frame_threshold)
        return []

    def ask_frames(self, asks: list[tuple[PredictRequest, torch.Tensor, str]]
                   ) -> list[np.ndarray | None]:
        """Texts asked as MR queries over frames already preprocessed, in one batched prompt
        pass: for each (request, its pixels, text) the (T,) frame probabilities, None for a text
        too long to ask. The vision tower runs once per request: its visual tokens, or its
        patches where each prompt reads them with its own text (`patch_relevance`: the patch
        score). Frames given as (T, P, V) patches already
        (`encode_patches`) are not encoded again."""
        cfg = self.model.config
        dev = self.device
        kind = "patches" if cfg.patch_relevance else "visual_embeds"
        prompts, visual, where = [], [], []
        encoded: dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            for i, (r, px, text) in enumerate(asks):
                try:
                    prompt = self.tokenizer.encode_prompt(
                        Task.MR, text, np.asarray(r.timestamps_T).tolist(),
                        tokens_per_frame=cfg.tokens_per_frame, query_first=True,
                        max_length=cfg.max_position_embeddings)
                except ValueError:  # too long to ask
                    continue
                if id(px) not in encoded:
                    px_dev = px.to(dev)
                    patches = px_dev if px_dev.ndim == 3 else self.model.encode_patches(px_dev)
                    encoded[id(px)] = (patches if kind == "patches"
                                       else self.model.project_patches(patches))
                prompts.append(prompt)
                visual.append(encoded[id(px)])
                where.append(i)
            out: list[np.ndarray | None] = [None] * len(asks)
            if not prompts:
                return out
            batch = collate(prompts, padding_side="right")
            frames = {kind: torch.cat(visual)}
            result = self.model(batch["input_ids"].to(dev), batch["token_types"].to(dev),
                                attention_mask=batch["attention_mask"].to(dev), **frames,
                                return_logits=False)
        prob_BT = torch.sigmoid(result.frame_logits.float())
        for i, p_T, m_T in zip(where, prob_BT, result.frame_mask):
            out[i] = p_T[m_T].cpu().numpy()
        return out

    def ground_captions(self, requests, asked, predictions) -> list[int]:
        """DVC by grounding the training captions (answer choice `dvc: captions`): per video,
        the tokenizer's captions ranked by their best patch match over its frames
        (`caption_scores`, no decoder pass), the top `dvc_candidates` asked as MR queries
        (`ask_frames`); each gives its best window, scored by its peak relevance. The events are
        the distinct windows of the most relevant candidates, up to the request's cap, each with
        its caption, in time order. A video none of whose candidates could be asked is not
        answered (its fallback generates)."""
        captions = self.tokenizer.captions
        M = min(self.model.config.dvc_candidates, len(captions))
        asks, chosen = [], []
        with torch.inference_mode():
            for r, a in zip(requests, asked):
                patches = self.model.encode_patches(a.pixels.to(self.device))  # once: scored and asked
                best_K = self.model.caption_scores(patches, self.caption_ids).amax(-1)
                top = best_K.topk(M).indices.tolist()
                chosen.append(top)
                asks += [(r, patches, captions[k]) for k in top]
        probs = iter(self.ask_frames(asks))
        unread = []
        for i, (r, a, p, top) in enumerate(zip(requests, asked, predictions, chosen)):
            found = []
            for k, p_T in zip(top, [next(probs) for _ in top]):
                if p_T is not None:
                    best = windows_from_relevance(p_T.tolist(), r.timestamps_T, a.duration,
                                                  self.model.config.frame_threshold)[0]
                    found.append(Event(start=best.start, end=best.end, score=best.score,
                                       caption=captions[k]))
            if not found:
                unread.append(i)
                continue
            events, seen = [], set()
            for e in sorted(found, key=lambda e: -e.score):
                if (e.start, e.end) not in seen and len(events) < a.cap:
                    seen.add((e.start, e.end))
                    events.append(e)
            p.events = sorted(events, key=lambda e: (e.start, e.end))
        return unread

    def ground_options(self, requests, asked, predictions) -> list[int]:
        """GQA by grounding each option (answer choice `gqa: options`): the question with an
        option is one hypothesis ("what colour is the circle that grows? red"), asked as an MR
        query over the frames (`ask_frames`); the answer is the option whose most relevant frame
        is the most relevant, its best window the evidence, and the frames' relevance is that
        hypothesis's. A question none of whose hypotheses could be asked is not answered (its
        fallback generates)."""
        asks = [(r, a.pixels, gqa_hypothesis(r.query, option)) for r, a in zip(requests, asked)
                for option in r.options]
        probs = iter(self.ask_frames(asks))
        unread = []
        for i, (r, a, p) in enumerate(zip(requests, asked, predictions)):
            per_option = [next(probs) for _ in r.options]
            peaks = [-1.0 if p_T is None else float(p_T.max()) for p_T in per_option]
            k = int(np.argmax(peaks))
            if per_option[k] is None:
                unread.append(i)
                continue
            best = windows_from_relevance(per_option[k].tolist(), r.timestamps_T, a.duration,
                                          self.model.config.frame_threshold)[0]
            p.events = [Event(start=best.start, end=best.end, score=peaks[k],
                              caption=r.options[k])]
            p.frame_relevance = per_option[k].tolist()
        return unread

    def _read_evidence(self, request, p: Prediction, evidence, duration: float) -> None:
        """D2VLM: each generated `<evi>`'s per-frame grounding and the interval of its salient
        frames."""
        p.evidence = evidence
        p.evidence_intervals = []
        if p.evidence:  # (E, T): one row per generated <evi>
            prob_ET = torch.as_tensor(p.evidence)
            salient_ET = self.model.evidence_head.salient(prob_ET, torch.ones_like(prob_ET))
            p.evidence_intervals = [interval_from_salient(row, request.timestamps_T, duration)
                                    for row in salient_ET]

    def _prediction(self, ids, kinds, task: Task, duration: float, clip_len: float) -> Prediction:
        pieces = self.tokenizer.answer_pieces(ids, kinds)
        events = self.tokenizer.decode_answer(ids, kinds, order_times=True)
        for e in events:  # a generated time past the video's end means its end
            e.start, e.end = min(e.start, duration), min(e.end, duration)
        if task in (Task.MR, Task.VHD):
            events = sorted(events, key=lambda e: -(e.score or 0.0))  # ranked, stable
        saliency = saliency_from_events(events, duration, clip_len) if task == Task.VHD else None
        text = "".join(
            f" {p}" if kind == TokenType.TEXT and p not in (SWITCH, EOS) else p
            for kind, p in pieces
        )
        return Prediction(events=events, saliency=saliency, text=text.strip(), num_tokens=len(ids))


def _check_compatible(config, tokenizer) -> None:
    expected = {
        "text_vocab_size": tokenizer.text_vocab_size,
        "switch_token_id": tokenizer.switch_id,
        "answer_end_token_id": tokenizer.eos_id,
    }
    bad = {k: (getattr(config, k), v) for k, v in expected.items() if getattr(config, k) != v}
    if bad:
        raise ValueError(
            "model config and tokenizer do not match: "
            + ", ".join(f"{k}: config {a!r} vs tokenizer {b!r}" for k, (a, b) in bad.items())
        )
