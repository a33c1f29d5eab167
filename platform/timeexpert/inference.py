"""Checkpoint -> events: the one-call grounding API that evaluation and serving share.

    gm = GroundingModel.load("runs/ckpt")            # a local dir, file:// or s3://
    pred = gm.predict(frames_THWC, timestamps_T, "mr", "a person opens the door")
    pred.events  # [Event(start, end, score, caption)], pred.saliency (VHD, per clip)

`predict_batch` runs one batched prompt pass (vision + prefill) and one batched decoding loop;
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
    RELEVANT, clip_saliency, dense_events_from_relevance, pad_caption_ids, windows_from_relevance,
)
from timeexpert.models.generation import generate_answer
from timeexpert.models.processor import TimeExpertProcessor
from timeexpert.models.timeexpert import TimeExpertForGrounding
from timeexpert.models.tokenizer import GroundingTokenizer, collate


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
        if not requests:
            return []
        cfg = self.model.config
        prompts, pixels, durations, tasks, caps = [], [], [], [], []
        for i, r in enumerate(requests):
            try:
                prompt, pixel_values = self.processor.encode_request(r.frames_THWC, r.timestamps_T,
                                                                     r.task, r.query, r.options)
                ts = np.asarray(r.timestamps_T, dtype=np.float64).reshape(-1)
                duration = _default_duration(ts) if r.duration is None else float(r.duration)
                if not duration > 0:
                    raise ValueError(f"duration must be > 0, got {r.duration}")
                cap = cfg.max_events if r.max_events is None else int(r.max_events)
                if cap < 0:
                    raise ValueError(f"max_events must be >= 0, got {r.max_events}")
            except ValueError as err:
                raise ValueError(f"request {i}: {err}" if len(requests) > 1 else str(err)) from None
            prompts.append(prompt)
            pixels.append(pixel_values)
            durations.append(duration)
            tasks.append(Task.parse(r.task))
            caps.append(cap)
        batch = collate(prompts, padding_side="left")
        dev = self.device
        was_training = self.model.training  # a model lent by a training loop gets its mode back
        self.model.eval()
        try:
            with torch.inference_mode():
                generated, extras = generate_answer(
                    self.model, batch["input_ids"].to(dev), batch["token_types"].to(dev),
                    batch["attention_mask"].to(dev), pixel_values=torch.cat(pixels).to(dev),
                    max_new_tokens=cfg.max_position_embeddings - batch["input_ids"].shape[1],
                    max_events=caps, return_extras=True)
                predictions = [
                    self._prediction(ids, kinds, tasks[b], durations[b], requests[b].clip_len)
                    for b, (ids, kinds) in enumerate(generated)
                ]
                if extras["frame_relevance"] is not None:
                    self._read_relevance(requests, predictions, extras["frame_relevance"],
                                         durations, pixels, caps)
        finally:
            self.model.train(was_training)
        if extras["token_density"] is not None:  # per request, its frames' share of the density
            density = extras["token_density"].tolist()
            bounds = np.cumsum([0] + [p.shape[0] for p in pixels])
            for b, p in enumerate(predictions):
                p.token_density = density[bounds[b]:bounds[b + 1]]
        if getattr(cfg, "evidence", None) is not None:
            self._read_evidence(requests, predictions, extras["evidence"], durations)
        for r, p in zip(requests, predictions):
            if Task.parse(r.task) == Task.GQA:
                p.answer = read_gqa_answer(p.events, r.options)[1]
            p.unknown_words = self.tokenizer.unknown_words(" ".join([r.query, *(r.options or [])]))
        return predictions

    def _read_evidence(self, requests, predictions, evidence, durations) -> None:
        """D2VLM: each generated `<evi>`'s per-frame grounding and the interval of its salient
        frames."""
        for b, p in enumerate(predictions):
            p.evidence = evidence[b]
            p.evidence_intervals = []
            if p.evidence:  # (E, T): one row per generated <evi>
                prob_ET = torch.as_tensor(p.evidence)
                salient_ET = self.model.evidence_head.salient(prob_ET, torch.ones_like(prob_ET))
                p.evidence_intervals = [
                    interval_from_salient(row, requests[b].timestamps_T, durations[b])
                    for row in salient_ET
                ]

    def _read_relevance(self, requests, predictions, relevance, durations, pixels, caps) -> None:
        """Frame relevance (config `frame_relevance`): MR / VHD windows read off the relevant
        frames (and VHD's clip saliency from their probabilities), and the GQA evidence span
        (the chosen option stays the generated one, or with `answer_from_frames` the option
        whose hypothesis is the most relevant); DVC events from the training captions grounded
        (`ground_captions`), or the runs of relevant frames (`dvc_from_frames`), or each
        generated DVC event placed where its caption, asked as an MR query, is relevant
        (`locate_captions`)."""
        cfg = self.model.config
        threshold = cfg.frame_threshold
        dvc, gqa, grounded = [], [], []
        for b, (r, p) in enumerate(zip(requests, predictions)):
            p.frame_relevance = relevance[b]
            task = Task.parse(r.task)
            if task in (Task.MR, Task.VHD) and cfg.windows_from_frames:
                p.events = windows_from_relevance(relevance[b], r.timestamps_T, durations[b],
                                                  threshold)[: caps[b]]
                if task == Task.VHD:
                    p.saliency = clip_saliency(relevance[b], r.timestamps_T, durations[b],
                                               r.clip_len)
            elif task == Task.GQA and cfg.answer_from_frames and r.options:
                gqa.append(b)
            elif task == Task.GQA and cfg.windows_from_frames:
                best = windows_from_relevance(relevance[b], r.timestamps_T, durations[b],
                                              threshold)[0]
                caption = p.events[-1].caption if p.events else ""
                p.events = [Event(start=best.start, end=best.end, score=best.score,
                                  caption=caption)]
            elif task == Task.DVC and cfg.dvc_from_captions and self.caption_ids is not None:
                grounded.append(b)
            elif task == Task.DVC and cfg.dvc_from_frames:
                p.events = dense_events_from_relevance(relevance[b], r.timestamps_T,
                                                       durations[b], p.events, caps[b], threshold)
            elif task == Task.DVC and cfg.locate_captions and any(e.caption for e in p.events):
                dvc.append(b)
        if dvc:
            self.locate_captions([requests[b] for b in dvc], [predictions[b] for b in dvc],
                                 [pixels[b] for b in dvc], [durations[b] for b in dvc])
        if grounded:
            self.ground_captions([requests[b] for b in grounded],
                                 [predictions[b] for b in grounded],
                                 [pixels[b] for b in grounded], [durations[b] for b in grounded],
                                 [caps[b] for b in grounded])
        if gqa:
            self.answer_from_frames([requests[b] for b in gqa], [predictions[b] for b in gqa],
                                    [pixels[b] for b in gqa], [durations[b] for b in gqa])

    def ask_frames(self, asks: list[tuple[PredictRequest, torch.Tensor, str]]
                   ) -> list[np.ndarray | None]:
        """Texts asked as MR queries over frames already preprocessed, in one batched prompt
        pass: for each (request, its pixels, text) the (T,) frame probabilities, None for a text
        too long to ask. The vision tower runs once per request: its visual tokens, or its
        patches where each prompt reads them with its own text (`patch_relevance`: the patch
        score; `query_slots`: the slot compression). Frames given as (T, P, V) patches already
        (`encode_patches`) are not encoded again."""
        cfg = self.model.config
        dev = self.device
        kind = "patches" if cfg.query_slots or cfg.patch_relevance else "visual_embeds"
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

    def locate_captions(self, requests, predictions, pixels, durations) -> None:
        """Dense captioning with frame relevance: every generated event with a caption is asked
        as an MR query over the same frames (`ask_frames`), and takes the best window of its
        relevant frames; events without a caption, or whose caption no frame is relevant to,
        keep their generated times."""
        asks, where = [], []
        for r, p, px, duration in zip(requests, predictions, pixels, durations):
            for e in p.events:
                if e.caption:
                    asks.append((r, px, e.caption))
                    where.append((e, r.timestamps_T, duration))
        for (e, timestamps_T, duration), p_T in zip(where, self.ask_frames(asks)):
            if p_T is None or float(p_T.max()) < RELEVANT:
                continue  # not asked, or no frame is relevant: its generated times stand
            best = windows_from_relevance(p_T.tolist(), timestamps_T, duration,
                                          self.model.config.frame_threshold)[0]
            e.start, e.end = best.start, best.end
        for p in predictions:
            p.events.sort(key=lambda e: (e.start, e.end))

    def ground_captions(self, requests, predictions, pixels, durations, caps) -> None:
        """Dense captioning by grounding the training captions (`dvc_from_captions`): per video,
        the tokenizer's captions ranked by their best patch match over its frames
        (`caption_scores`, no decoder pass), the top `dvc_candidates` asked as MR queries
        (`ask_frames`); each gives its best window, scored by its peak relevance. The events are
        the distinct windows of the most relevant candidates, up to the request's cap, each with
        its caption, in time order. A video none of whose candidates could be asked keeps its
        generated answer."""
        captions = self.tokenizer.captions
        M = min(self.model.config.dvc_candidates, len(captions))
        asks, chosen = [], []
        with torch.inference_mode():
            for r, px in zip(requests, pixels):
                patches = self.model.encode_patches(px.to(self.device))  # once: scored and asked
                best_K = self.model.caption_scores(patches, self.caption_ids).amax(-1)
                top = best_K.topk(M).indices.tolist()
                chosen.append(top)
                asks += [(r, patches, captions[k]) for k in top]
        probs = iter(self.ask_frames(asks))
        for r, p, duration, cap, top in zip(requests, predictions, durations, caps, chosen):
            found = []
            for k, p_T in zip(top, [next(probs) for _ in top]):
                if p_T is not None:
                    best = windows_from_relevance(p_T.tolist(), r.timestamps_T, duration,
                                                  self.model.config.frame_threshold)[0]
                    found.append(Event(start=best.start, end=best.end, score=best.score,
                                       caption=captions[k]))
            if not found:
                continue
            events, seen = [], set()
            for e in sorted(found, key=lambda e: -e.score):
                if (e.start, e.end) not in seen and len(events) < cap:
                    seen.add((e.start, e.end))
                    events.append(e)
            p.events = sorted(events, key=lambda e: (e.start, e.end))

    def answer_from_frames(self, requests, predictions, pixels, durations) -> None:
        """Grounded QA by grounding each option (`answer_from_frames`): the question with an
        option is one hypothesis ("what colour is the circle that grows? red"), asked as an MR
        query over the frames (`ask_frames`); the answer is the option whose most relevant frame
        is the most relevant, its best window the evidence. A question none of whose hypotheses
        could be asked keeps its generated answer."""
        asks = [(r, px, gqa_hypothesis(r.query, option)) for r, px in zip(requests, pixels)
                for option in r.options]
        probs = iter(self.ask_frames(asks))
        for r, p, duration in zip(requests, predictions, durations):
            per_option = [next(probs) for _ in r.options]
            peaks = [-1.0 if p_T is None else float(p_T.max()) for p_T in per_option]
            k = int(np.argmax(peaks))
            if per_option[k] is None:
                continue
            best = windows_from_relevance(per_option[k].tolist(), r.timestamps_T, duration,
                                          self.model.config.frame_threshold)[0]
            p.events = [Event(start=best.start, end=best.end, score=peaks[k],
                              caption=r.options[k])]

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
