"""Token ids for the model: the text tokenizer, the prompt layout and the answer codec.

The text tokenizer is any local Hugging Face tokenizer directory, or a byte-level BPE trained
in-process with `tokenizers` on the dataset's text. The answer's special pieces (SWITCH, EOS) and
a pad token are added through the tokenizer API. Number pieces (time / score) are not text: they
take ids in the 13-symbol number vocabulary (`timeexpert.events`).

A sequence is two aligned lists: `ids` (each id local to its token type's vocabulary: text ids for
TEXT and QUERY, number ids for TIME and SCORE, a placeholder 0 for VISUAL) and `types`
(TokenType). Layout (TimeExpert sec. 3.1, TRACE)::

    [ts(frame_1) <sync>  S visual tokens] ... [ts(frame_T) <sync>  S visual tokens]
    [instruction + query : QUERY]   [answer : serialize_events(events) -> TEXT/TIME/SCORE]

or, with `query_first` (the model config's prompt layout), the instruction before the frames.

The answer is what `timeexpert.events.serialize_events` writes; this module only maps its pieces
to ids and back (`parse_pieces` reads them).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from timeexpert.events import (
    EOS,
    IGNORE_INDEX,
    NUMBER_VOCAB,
    SWITCH,
    Event,
    Task,
    TokenType,
    number_symbol_id,
    parse_pieces,
    prompt_query,
    serialize_events,
    timestamp_ids,
)

PAD = "<pad>"
TEMPLATES_FILE = "grounding_templates.json"
CAPTIONS_FILE = "grounding_captions.json"  # `GroundingTokenizer.captions`

# One instruction per task; `{query}` is replaced by the query (DVC: an optional instruction).
DEFAULT_TEMPLATES: dict[str, str] = {
    Task.MR.value: "Find the moments that match the query: {query}",
    Task.VHD.value: "Find the highlights for the query and rate their saliency: {query}",
    Task.DVC.value: "Describe every event of the video with its start and end time. {query}",
    Task.GQA.value: "Answer the question: first the moment that shows the answer, then the "
                    "option. {query}",
}


@dataclass
class Encoded:
    """One tokenized sequence: ids local to their type's vocabulary, types, and labels."""

    ids: list[int]
    types: list[int]
    labels: list[int] = field(default_factory=list)  # IGNORE_INDEX on the prompt

    def __len__(self) -> int:
        return len(self.ids)


def train_text_tokenizer(texts: Iterable[str], *, vocab_size: int = 1000):
    """A byte-level BPE trained in-process on `texts` (exact decode of any string)."""
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (256 bytes + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = list(texts) + list(DEFAULT_TEMPLATES.values())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)


class GroundingTokenizer:
    """Text tokenizer + number vocab + task templates: events and prompts <-> ids."""

    def __init__(self, text_tokenizer, *, templates: dict[str, str] | None = None,
                 captions: Sequence[str] = ()) -> None:
        self.text = text_tokenizer
        # the distinct captions of the training split, most frequent first: the candidates of
        # dense captioning by grounding (answer choice `dvc: captions`)
        self.captions = list(captions)
        if self.text.pad_token is None:
            self.text.add_special_tokens({"pad_token": PAD})
        self.text.add_tokens([SWITCH, EOS], special_tokens=True)
        self.templates = dict(DEFAULT_TEMPLATES if templates is None else templates)
        missing = {t.value for t in Task} - set(self.templates)
        if missing:
            raise ValueError(f"templates lack tasks {sorted(missing)}")
        self.switch_id = self.text.convert_tokens_to_ids(SWITCH)
        self.eos_id = self.text.convert_tokens_to_ids(EOS)
        self.pad_id = self.text.pad_token_id

    # --- construction and persistence ---------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], *, vocab_size: int = 1000,
              captions: Sequence[str] = ()) -> "GroundingTokenizer":
        return cls(train_text_tokenizer(texts, vocab_size=vocab_size), captions=captions)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "GroundingTokenizer":
        path = str(path)
        if not os.path.isdir(path):
            raise ValueError(f"tokenizer directory {path!r} does not exist")
        text = AutoTokenizer.from_pretrained(path, clean_up_tokenization_spaces=False)
        templates = None
        if os.path.exists(os.path.join(path, TEMPLATES_FILE)):
            with open(os.path.join(path, TEMPLATES_FILE)) as f:
                # a task added after the tokenizer was saved (gqa) gets its default template
                templates = {**DEFAULT_TEMPLATES, **json.load(f)}
        captions = []
        if os.path.exists(os.path.join(path, CAPTIONS_FILE)):
            with open(os.path.join(path, CAPTIONS_FILE)) as f:
                captions = json.load(f)
        return cls(text, templates=templates, captions=captions)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        self.text.save_pretrained(str(path))
        with open(os.path.join(str(path), TEMPLATES_FILE), "w") as f:
            json.dump(self.templates, f, indent=2)
        if self.captions:
            with open(os.path.join(str(path), CAPTIONS_FILE), "w") as f:
                json.dump(self.captions, f, indent=1)

    @functools.cached_property
    def caption_ids(self) -> list[list[int]]:
        """`captions` as text ids (encoded once)."""
        return [self.encode_text(c) for c in self.captions]

    @property
    def text_vocab_size(self) -> int:
        return len(self.text)

    @property
    def forbidden_text_ids(self) -> list[int]:
        """Text ids generation must never emit: every special token but SWITCH and EOS."""
        return sorted(set(self.text.all_special_ids) - {self.switch_id, self.eos_id})

    # --- text -------------------------------------------------------------------------------

    def encode_text(self, text: str) -> list[int]:
        return self.text.encode(text, add_special_tokens=False)

    def unknown_words(self, text: str) -> list[str]:
        """The words of `text` (lower-cased, each once, in order) that the text tokenizer has no
        token of its own for. A byte-level BPE encodes any string, and merges the words it was
        trained on into tokens: a word it splits into pieces is one the model never learnt as a
        word (single letters are always tokens, so never reported)."""
        words = dict.fromkeys(w.lower() for w in re.findall(r"[A-Za-z][A-Za-z'-]*", text))
        return [w for w in words
                if not any(len(self.encode_text(form)) == 1 for form in (f" {w}", w))]

    def decode_text(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return self.text.decode(
            list(ids), skip_special_tokens=skip_special, clean_up_tokenization_spaces=False
        )

    # --- prompt -----------------------------------------------------------------------------

    def instruction(self, task: Task | str, query: str, options: Sequence[str] | None = None) -> str:
        """The task's template filled with the query (GQA: the question and its `options`)."""
        task = Task.parse(task)
        if task in (Task.MR, Task.VHD, Task.GQA) and not query.strip():
            raise ValueError(f"task {task.value} needs a non-empty query")
        return self.templates[task.value].format(query=prompt_query(task, query, options)).strip()

    def encode_prompt(
        self,
        task: Task | str,
        query: str,
        timestamps: Sequence[float],
        *,
        tokens_per_frame: int,
        max_length: int | None = None,
        query_first: bool = False,
        options: Sequence[str] | None = None,
    ) -> Encoded:
        """Frames (timestamp tokens + visual placeholders) then the instruction (QUERY), or with
        `query_first` the instruction then the frames (every frame token sees the query). GQA
        needs the question's `options`."""
        if len(timestamps) == 0:
            raise ValueError("got zero frames; a video needs at least one frame")
        ids: list[int] = []
        types: list[int] = []
        for t in timestamps:
            if not (math.isfinite(float(t)) and float(t) >= 0):
                raise ValueError(f"frame timestamps must be finite and >= 0, got {t}")
            ts = timestamp_ids(float(t))
            ids += ts + [0] * tokens_per_frame
            types += [TokenType.TIME] * len(ts) + [TokenType.VISUAL] * tokens_per_frame
        text_ids = self.encode_text(self.instruction(task, query, options))
        if query_first:
            ids, types = text_ids + ids, [TokenType.QUERY] * len(text_ids) + types
        else:
            ids, types = ids + text_ids, types + [TokenType.QUERY] * len(text_ids)
        if max_length is not None and len(ids) > max_length:
            raise ValueError(
                f"prompt of {len(ids)} tokens ({len(timestamps)} frames, instruction of "
                f"{len(text_ids)} tokens) exceeds the context of {max_length} tokens; use fewer "
                "frames or a shorter query"
            )
        return Encoded(ids=ids, types=[int(t) for t in types], labels=[IGNORE_INDEX] * len(ids))

    # --- answer -----------------------------------------------------------------------------

    def encode_answer(self, events: Sequence[Event]) -> Encoded:
        """Events -> ids/types via THE serializer (`serialize_events`)."""
        ids: list[int] = []
        types: list[int] = []
        for kind, piece in serialize_events(events):
            if kind == TokenType.TEXT:
                if piece == SWITCH:
                    new = [self.switch_id]
                elif piece == EOS:
                    new = [self.eos_id]
                else:
                    new = self.encode_text(piece)
            else:
                new = [number_symbol_id(piece)]
            ids += new
            types += [int(kind)] * len(new)
        return Encoded(ids=ids, types=types, labels=list(ids))

    def answer_pieces(
        self, ids: Sequence[int], types: Sequence[int], *, skip_special: bool = False
    ) -> list[tuple[TokenType, str]]:
        """Ids/types (as generated) -> serializer pieces; runs of caption ids decode to one piece.

        `skip_special` drops special text tokens inside captions (D2VLM's `<evi>` markers): the
        events' captions are plain text, the raw answer keeps them."""
        pieces: list[tuple[TokenType, str]] = []
        run: list[int] = []

        def flush() -> None:
            if run:
                pieces.append((TokenType.TEXT, self.decode_text(run, skip_special=skip_special)))
                run.clear()

        for i, kind in zip(ids, types):
            kind = TokenType(int(kind))
            if kind == TokenType.TEXT and i not in (self.switch_id, self.eos_id):
                run.append(int(i))
                continue
            flush()
            if kind == TokenType.TEXT:
                pieces.append((kind, SWITCH if i == self.switch_id else EOS))
            elif kind in (TokenType.TIME, TokenType.SCORE):
                pieces.append((kind, NUMBER_VOCAB[int(i)]))
            else:
                raise ValueError(f"an answer holds no {kind.name} tokens")
        flush()
        return pieces

    def decode_answer(
        self, ids: Sequence[int], types: Sequence[int], *, order_times: bool = False
    ) -> list[Event]:
        """Ids/types -> events via THE parser (`parse_pieces`)."""
        pieces = self.answer_pieces(ids, types, skip_special=True)
        return parse_pieces(pieces, order_times=order_times)

    # --- training examples and batches ---------------------------------------------------------

    def encode_example(
        self,
        task: Task | str,
        query: str,
        timestamps: Sequence[float],
        events: Sequence[Event],
        *,
        tokens_per_frame: int,
        max_length: int | None = None,
        query_first: bool = False,
        options: Sequence[str] | None = None,
    ) -> Encoded:
        """Prompt + answer with labels on the answer only (teacher forcing)."""
        prompt = self.encode_prompt(task, query, timestamps, tokens_per_frame=tokens_per_frame,
                                    query_first=query_first, options=options)
        answer = self.encode_answer(events)
        total = len(prompt) + len(answer)
        if max_length is not None and total > max_length:
            raise ValueError(
                f"example of {total} tokens (prompt {len(prompt)}, answer {len(answer)}) exceeds "
                f"the context of {max_length} tokens"
            )
        return Encoded(
            ids=prompt.ids + answer.ids,
            types=prompt.types + answer.types,
            labels=prompt.labels + answer.labels,
        )


def collate(batch: Sequence[Encoded], *, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad sequences to one batch: input_ids, token_types, attention_mask, labels, position_ids.

    Padding positions get id 0, type TEXT, mask 0, label IGNORE_INDEX; `position_ids` count real
    tokens only, so left padding (generation) and right padding (training) give the same positions.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not batch:
        raise ValueError("cannot collate an empty batch")
    n = max(len(e) for e in batch)
    out = {
        "input_ids": torch.zeros(len(batch), n, dtype=torch.long),
        "token_types": torch.full((len(batch), n), int(TokenType.TEXT), dtype=torch.long),
        "attention_mask": torch.zeros(len(batch), n, dtype=torch.long),
        "labels": torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.zeros(len(batch), n, dtype=torch.long),
    }
    for b, e in enumerate(batch):
        sl = slice(0, len(e)) if padding_side == "right" else slice(n - len(e), n)
        out["input_ids"][b, sl] = torch.tensor(e.ids, dtype=torch.long)
        out["token_types"][b, sl] = torch.tensor(e.types, dtype=torch.long)
        out["attention_mask"][b, sl] = 1
        out["labels"][b, sl] = torch.tensor(e.labels or [IGNORE_INDEX] * len(e), dtype=torch.long)
        out["position_ids"][b, sl] = torch.arange(len(e))
    return out
