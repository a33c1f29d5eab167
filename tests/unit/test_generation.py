"""The answer grammar as a state machine, driven by hand: every answer THE serializer writes for
MR, VHD, DVC and D2VLM evidence is allowed token by token, and what the grammar forbids (malformed
numbers, a head out of turn, past a cap, anything after EOS) is masked."""

from __future__ import annotations

import pytest
import torch
from timeexpert.events import (
    DIGIT_IDS,
    DOT_ID,
    NUM_NUMBER_TOKENS,
    SEP_ID,
    SYNC_ID,
    Event,
    Task,
    TokenType,
)
from timeexpert.models.evidence import add_evidence_tokens, encode_evidence_example
from timeexpert.models.generation import AnswerGrammar, answer_room
from timeexpert.models.tokenizer import GroundingTokenizer
from timeexpert.presets import get_preset

U = NUM_NUMBER_TOKENS
CAPTIONS = ["a person opens the door", "the cat jumps on the sofa"]


@pytest.fixture(scope="module")
def tok() -> GroundingTokenizer:
    return GroundingTokenizer.train(CAPTIONS + ["the cat", "a door"], vocab_size=400)


def grammar(tok, batch=1, max_events=8, max_caption_tokens=16, max_number_symbols=7):
    return AnswerGrammar(
        text_vocab_size=tok.text_vocab_size,
        switch_id=tok.switch_id,
        eos_id=tok.eos_id,
        forbidden_text_ids=tok.forbidden_text_ids,
        max_events_B=torch.full((batch,), max_events),
        max_caption_tokens=max_caption_tokens,
        max_number_symbols=max_number_symbols,
    )


def column(tok, kind: int, local: int) -> int:
    """A token's column in the heads' concatenated logits [text V | time U | score U]."""
    offset = {TokenType.TEXT: 0, TokenType.TIME: tok.text_vocab_size,
              TokenType.SCORE: tok.text_vocab_size + U}[TokenType(kind)]
    return offset + local


def walk(tok, g: AnswerGrammar, ids, types) -> None:
    """Feed one sequence token by token: each must be allowed, and `advance` returns it."""
    for i, (local, kind) in enumerate(zip(ids, types)):
        col = column(tok, kind, local)
        assert bool(g.allowed()[0, col]), f"token {i} ({TokenType(kind).name} {local}) forbidden"
        got_local, got_kind = g.advance(torch.tensor([col]))
        assert (int(got_local), int(got_kind)) == (local, kind)


def allowed_set(tok, g: AnswerGrammar, row: int = 0) -> set[tuple[str, int]]:
    """{(head, local id)} a sequence may choose next."""
    V = tok.text_vocab_size
    cols = g.allowed()[row].nonzero().flatten().tolist()
    return {("text", c) if c < V else ("time", c - V) if c < V + U else ("score", c - V - U)
            for c in cols}


def digits(head: str) -> set[tuple[str, int]]:
    return {(head, d) for d in DIGIT_IDS}


@pytest.mark.parametrize("task, events", [
    (Task.MR, [Event(1.0, 2.5, 1.0), Event(4.0, 7.5, 0.6)]),
    (Task.VHD, [Event(0.0, 2.0, 3.5), Event(6.0, 8.0, 1.0), Event(10.0, 12.0, 2.0)]),
    (Task.DVC, [Event(0.0, 12.3, 0.5, CAPTIONS[0]), Event(12.3, 40.0, 0.9, CAPTIONS[1])]),
    (Task.DVC, []),
])
def test_every_serialized_answer_is_allowed_and_ends_in_done(tok, task, events):
    answer = tok.encode_answer(events)
    g = grammar(tok)
    walk(tok, g, answer.ids, answer.types)
    assert not bool(g.alive_B[0]) and int(g.events_B[0]) == len(events)
    # after EOS a sequence may only repeat EOS (the generator drops it)
    assert allowed_set(tok, g) == {("text", tok.eos_id)}


def test_each_state_hands_the_turn_to_its_head(tok):
    g = grammar(tok)
    text = allowed_set(tok, g)
    assert ("text", tok.switch_id) in text and ("text", tok.eos_id) in text
    assert all(head == "text" for head, _ in text)
    assert not {("text", i) for i in tok.forbidden_text_ids} & text  # pad is never generated
    walk(tok, g, [tok.switch_id], [TokenType.TEXT])
    assert allowed_set(tok, g) == digits("time")  # START: a number begins with a digit
    walk(tok, g, [DIGIT_IDS[1]], [TokenType.TIME])
    assert allowed_set(tok, g) == digits("time") | {("time", DOT_ID), ("time", SEP_ID)}
    walk(tok, g, [SEP_ID], [TokenType.TIME])
    assert allowed_set(tok, g) == digits("time")  # END
    walk(tok, g, [DIGIT_IDS[2]], [TokenType.TIME])
    assert allowed_set(tok, g) == digits("time") | {("time", DOT_ID), ("time", SYNC_ID)}
    walk(tok, g, [SYNC_ID], [TokenType.TIME])
    assert allowed_set(tok, g) == digits("score")  # SCORE: the score head's turn
    walk(tok, g, [DIGIT_IDS[3], SYNC_ID], [TokenType.SCORE] * 2)
    assert allowed_set(tok, g) == text  # back to TEXT
    assert int(g.events_B[0]) == 1


def test_numbers_are_well_formed(tok):
    g = grammar(tok, max_number_symbols=4)
    walk(tok, g, [tok.switch_id], [TokenType.TEXT])
    walk(tok, g, [DIGIT_IDS[1], DOT_ID], [TokenType.TIME] * 2)
    # right after '.': a digit only (no second '.', no <sep> on "1.")
    assert allowed_set(tok, g) == digits("time")
    walk(tok, g, [DIGIT_IDS[5]], [TokenType.TIME])
    assert allowed_set(tok, g) == digits("time") | {("time", SEP_ID)}  # one '.' per number
    walk(tok, g, [DIGIT_IDS[5]], [TokenType.TIME])
    assert allowed_set(tok, g) == {("time", SEP_ID)}  # "1.55" is max_number_symbols long
    walk(tok, g, [SEP_ID], [TokenType.TIME])
    walk(tok, g, [DIGIT_IDS[1], DIGIT_IDS[2], DIGIT_IDS[3]], [TokenType.TIME] * 3)
    # a '.' as the last of 4 symbols would end the number on '.': not allowed
    assert allowed_set(tok, g) == digits("time") | {("time", SYNC_ID)}


def test_event_and_caption_caps(tok):
    g = grammar(tok, max_events=1, max_caption_tokens=2)
    word = tok.encode_text("cat")[0]
    walk(tok, g, [word, word], [TokenType.TEXT] * 2)  # a preface of 2 tokens
    assert allowed_set(tok, g) == {("text", tok.switch_id), ("text", tok.eos_id)}
    answer = tok.encode_answer([Event(1.0, 2.0, 3.0)])
    walk(tok, g, answer.ids[:-1], answer.types[:-1])  # the event, not its EOS
    # the caption counter restarted at SWITCH; the one event allowed is used up
    assert ("text", tok.switch_id) not in allowed_set(tok, g)
    walk(tok, g, [word, word], [TokenType.TEXT] * 2)
    assert allowed_set(tok, g) == {("text", tok.eos_id)}  # both caps reached: only EOS


def test_zero_events_allowed_means_text_then_eos(tok):
    g = grammar(tok, max_events=0)
    assert ("text", tok.switch_id) not in allowed_set(tok, g)
    assert ("text", tok.eos_id) in allowed_set(tok, g)


def test_evidence_answers_are_allowed(tok):
    ev_tok = GroundingTokenizer.train(CAPTIONS + ["the cat", "a door"], vocab_size=400)
    evi, evi_end = add_evidence_tokens(ev_tok)
    g = grammar(ev_tok)
    forbidden = set(ev_tok.forbidden_text_ids) - {evi, evi_end}  # as config.with_tokenizer does
    g.text_ok_V[:] = True
    g.text_ok_V[sorted(forbidden) + [ev_tok.switch_id, ev_tok.eos_id]] = False
    assert {("text", evi), ("text", evi_end)} <= allowed_set(ev_tok, g)
    events = [Event(0.0, 1.5, 0.5, "the cat jumps"), Event(2.0, 4.0, 0.9, "a door")]
    enc, _ = encode_evidence_example(ev_tok, Task.DVC, "", [0.0, 1.0, 2.0], events,
                                     tokens_per_frame=2, duration=4.0)
    answer = [i for i, label in enumerate(enc.labels) if label != -100]
    walk(ev_tok, g, [enc.ids[i] for i in answer], [enc.types[i] for i in answer])
    assert not bool(g.alive_B[0]) and int(g.events_B[0]) == 2


def test_a_batch_moves_each_sequence_on_its_own(tok):
    g = grammar(tok, batch=2)
    V = tok.text_vocab_size
    # row 0 opens an event, row 1 ends at once
    g.advance(torch.tensor([tok.switch_id, tok.eos_id]))
    assert g.alive_B.tolist() == [True, False]
    assert allowed_set(tok, g, 0) == digits("time") and allowed_set(tok, g, 1) == {("text", tok.eos_id)}
    local, kind = g.advance(torch.tensor([V + DIGIT_IDS[4], tok.eos_id]))
    assert local.tolist() == [DIGIT_IDS[4], tok.eos_id]
    assert kind.tolist() == [TokenType.TIME, TokenType.TEXT]


def test_config_caps_and_bad_values(tok):
    cfg = get_preset("tiny_cpu").model
    with pytest.raises(ValueError, match="with_tokenizer"):
        AnswerGrammar.from_config(cfg, batch_size=1)
    cfg = cfg.with_tokenizer(tok)
    g = AnswerGrammar.from_config(cfg, batch_size=3, max_events=[0, 1, 2])
    assert g.max_events_B.tolist() == [0, 1, 2]
    assert AnswerGrammar.from_config(cfg, batch_size=2).max_events_B.tolist() == [cfg.max_events] * 2
    with pytest.raises(ValueError, match="max_events must be >= 0"):
        AnswerGrammar.from_config(cfg, batch_size=2, max_events=[1, -1])
    assert answer_room(cfg, 10, 5) == 5
    assert answer_room(cfg, cfg.max_position_embeddings - 3, 100) == 3
    with pytest.raises(ValueError, match="no room to answer"):
        answer_room(cfg, cfg.max_position_embeddings, 1)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        answer_room(cfg, 10, 0)
