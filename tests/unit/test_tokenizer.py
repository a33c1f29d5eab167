"""Token ids of the grounding model: events -> ids -> events exact, prompts, tokenizer persistence."""

from __future__ import annotations

import json

import pytest
from timeexpert.events import (
    EOS,
    IGNORE_INDEX,
    NUMBER_VOCAB,
    SWITCH,
    SYNC_ID,
    Event,
    Task,
    TokenType,
    serialize_events,
    timestamp_ids,
)
from timeexpert.models.tokenizer import TEMPLATES_FILE, GroundingTokenizer, collate

CORPUS = [
    "a person opens the door.",
    "The cat jumps onto the red sofa!",
    "a blue circle moves left, then stops",
    "someone pours water into a glass",
]


@pytest.fixture(scope="module")
def tok() -> GroundingTokenizer:
    return GroundingTokenizer.train(CORPUS, vocab_size=400)


ROUND_TRIP_CASES = {
    "no events": [],
    "mr windows": [Event(0.0, 4.5, 0.0), Event(12.3, 20.0, 0.0)],
    "vhd scored, video ends": [Event(0.0, 2.0, 4.0), Event(148.0, 150.0, 1.5)],
    "dvc captions": [
        Event(0.0, 3.2, 1.0, "a person opens the door."),
        Event(3.2, 10.0, 0.7, "The cat jumps onto the red sofa!"),
        Event(10.0, 10.0, 0.2, "unseen words: zebra Überraschung 42"),
    ],
    "missing score": [Event(1.0, 2.0, None, "x")],
}


@pytest.mark.parametrize("name", list(ROUND_TRIP_CASES))
def test_answer_round_trip_through_token_ids(tok, name):
    events = ROUND_TRIP_CASES[name]
    enc = tok.encode_answer(events)
    assert enc.labels == enc.ids and len(enc.ids) == len(enc.types)
    assert enc.ids[-1] == tok.eos_id and enc.types[-1] == TokenType.TEXT
    # numbers live in the 13-symbol vocab, text in the text vocab
    for i, t in zip(enc.ids, enc.types):
        if t in (TokenType.TIME, TokenType.SCORE):
            assert 0 <= i < len(NUMBER_VOCAB)
        else:
            assert t == TokenType.TEXT and 0 <= i < tok.text_vocab_size
    decoded = tok.decode_answer(enc.ids, enc.types)
    expected = [
        Event(e.start, e.end, 0.0 if e.score is None else e.score, e.caption) for e in events
    ]
    assert decoded == expected
    # the pieces we rebuild are exactly the serializer's
    assert tok.answer_pieces(enc.ids, enc.types) == serialize_events(events)


def test_zero_events_is_one_eos_token(tok):
    enc = tok.encode_answer([])
    assert enc.ids == [tok.eos_id] and enc.types == [TokenType.TEXT]


def test_special_tokens_are_single_ids_and_never_split(tok):
    assert tok.encode_text(SWITCH) == [tok.switch_id]
    assert tok.encode_text(EOS) == [tok.eos_id]
    assert len({tok.switch_id, tok.eos_id, tok.pad_id}) == 3
    assert tok.pad_id in tok.forbidden_text_ids
    assert tok.switch_id not in tok.forbidden_text_ids and tok.eos_id not in tok.forbidden_text_ids


def test_prompt_layout_joins_each_timestamp_to_its_frame(tok):
    enc = tok.encode_prompt(Task.MR, "the cat", [0.0, 2.5, 150.0], tokens_per_frame=3)
    expect_ids, expect_types = [], []
    for t in (0.0, 2.5, 150.0):
        ts = timestamp_ids(t)
        expect_ids += ts + [0, 0, 0]
        expect_types += [TokenType.TIME] * len(ts) + [TokenType.VISUAL] * 3
    n = len(expect_ids)
    assert enc.ids[:n] == expect_ids and enc.types[:n] == expect_types
    assert timestamp_ids(150.0)[-1] == SYNC_ID
    assert set(enc.types[n:]) == {TokenType.QUERY}
    assert "the cat" in tok.decode_text(enc.ids[n:])
    assert enc.labels == [IGNORE_INDEX] * len(enc)


def test_prompt_errors_name_the_problem(tok):
    with pytest.raises(ValueError, match="zero frames"):
        tok.encode_prompt(Task.MR, "q", [], tokens_per_frame=2)
    with pytest.raises(ValueError, match="unknown task"):
        tok.encode_prompt("captioning", "q", [0.0], tokens_per_frame=2)
    with pytest.raises(ValueError, match="needs a non-empty query"):
        tok.encode_prompt(Task.MR, "  ", [0.0], tokens_per_frame=2)
    with pytest.raises(ValueError, match="exceeds the context of 20"):
        tok.encode_prompt(Task.MR, "word " * 50, [0.0], tokens_per_frame=2, max_length=20)
    with pytest.raises(ValueError, match="finite"):
        tok.encode_prompt(Task.MR, "q", [float("nan")], tokens_per_frame=2)
    # DVC may go without a query
    assert len(tok.encode_prompt(Task.DVC, "", [0.0], tokens_per_frame=2)) > 0


def test_example_labels_only_on_the_answer_and_collate(tok):
    ex = tok.encode_example(
        Task.DVC, "", [0.0, 1.0], [Event(0.0, 1.0, 1.0, "a person")], tokens_per_frame=2
    )
    prompt = tok.encode_prompt(Task.DVC, "", [0.0, 1.0], tokens_per_frame=2)
    assert ex.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert ex.labels[len(prompt) :] == ex.ids[len(prompt) :]
    short = tok.encode_prompt(Task.MR, "cat", [0.0], tokens_per_frame=2)
    for side in ("left", "right"):
        b = collate([ex, short], padding_side=side)
        assert b["input_ids"].shape == (2, len(ex))
        assert int(b["attention_mask"][1].sum()) == len(short)
        real = b["attention_mask"][1].bool()
        assert b["position_ids"][1][real].tolist() == list(range(len(short)))
        assert b["input_ids"][1][real].tolist() == short.ids
    with pytest.raises(ValueError, match="exceeds the context"):
        tok.encode_example(
            Task.DVC, "", [0.0], [Event(0, 1, 1, "x " * 40)], tokens_per_frame=2, max_length=30
        )


def test_save_and_reload_keeps_ids_and_templates(tok, tmp_path):
    tok.templates[Task.MR.value] = "Custom MR instruction: {query}"
    try:
        tok.save_pretrained(tmp_path)
        again = GroundingTokenizer.from_pretrained(tmp_path)
    finally:
        tok.templates[Task.MR.value] = GroundingTokenizer(tok.text).templates[Task.MR.value]
    assert (again.switch_id, again.eos_id, again.pad_id, again.text_vocab_size) == (
        tok.switch_id,
        tok.eos_id,
        tok.pad_id,
        tok.text_vocab_size,
    )
    assert again.templates[Task.MR.value] == "Custom MR instruction: {query}"
    events = ROUND_TRIP_CASES["dvc captions"]
    assert again.encode_answer(events).ids == tok.encode_answer(events).ids
    assert again.captions == []  # a tokenizer without captions writes no captions file


def test_training_captions_are_kept_most_frequent_first_and_saved(tmp_path):
    """`train_tokenizer` keeps the training split's distinct captions (the candidates of DVC by
    grounding), most frequent first, and they survive save / load."""
    from timeexpert.events import Record
    from timeexpert.train.config import TrainConfig
    from timeexpert.train.fit import train_tokenizer

    def dvc(vid, captions):
        return Record(id=vid, video=f"{vid}.mp4", duration=10.0, task=Task.DVC, query="",
                      events=[Event(0.0, 1.0, caption=c) for c in captions])

    records = [dvc("a", ["the red circle grows", "the blue square blinks", ""]),
               dvc("b", ["the blue square blinks ", "a green diamond shrinks"]),
               dvc("c", ["the blue square blinks"])]
    tok = train_tokenizer(TrainConfig(data_root="unused", preset="tiny_cpu"), records)
    assert tok.captions == ["the blue square blinks", "the red circle grows",
                            "a green diamond shrinks"]
    tok.save_pretrained(tmp_path)
    assert GroundingTokenizer.from_pretrained(tmp_path).captions == tok.captions


def test_any_local_hf_tokenizer_dir_works(tmp_path):
    """A plain Hugging Face tokenizer directory (no grounding tokens yet) gets them added."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "cat": 3}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(tmp_path)
    tok = GroundingTokenizer.from_pretrained(tmp_path)
    assert tok.text_vocab_size == 4 + 3  # pad, switch, eos added through the API
    enc = tok.encode_answer([Event(1.0, 2.0, 0.5, "hello cat")])
    assert tok.decode_answer(enc.ids, enc.types) == [Event(1.0, 2.0, 0.5, "hello cat")]
    with pytest.raises(ValueError, match="does not exist"):
        GroundingTokenizer.from_pretrained(tmp_path / "missing")


def test_gqa_prompt_holds_the_question_and_its_options_and_old_templates_load(tmp_path):
    tok = GroundingTokenizer.train(["what colour is the circle that grows?", "red", "blue"],
                                   vocab_size=300)
    prompt = tok.encode_prompt(Task.GQA, "what colour is the circle that grows?", [0.5, 1.5],
                               tokens_per_frame=2, options=["red", "blue"])
    text = tok.decode_text([i for i, t in zip(prompt.ids, prompt.types) if t == TokenType.QUERY])
    assert text.endswith("what colour is the circle that grows? Options: red; blue.")
    with pytest.raises(ValueError, match="task gqa needs two or more non-empty answer options"):
        tok.encode_prompt(Task.GQA, "which colour?", [0.5], tokens_per_frame=2)
    # a tokenizer saved before the gqa task existed gets its default template
    tok.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / TEMPLATES_FILE).read_text())
    del saved["gqa"]
    (tmp_path / TEMPLATES_FILE).write_text(json.dumps(saved))
    assert GroundingTokenizer.from_pretrained(tmp_path).templates["gqa"] == tok.templates["gqa"]
