"""Generation: the loop that chooses the answer's tokens under the answer grammar.

The model (`timeexpert.py`) maps tensors to tensors; this module decodes with it. `AnswerGrammar`
is the grammar of `timeexpert.events` as a batched state machine whose state says which tokens
may come next; `generate_answer` asks the three heads, masks what the grammar forbids, takes one
argmax per step for the whole batch, and feeds the choice back through the KV cache.

Shape letters: B batch, N prompt tokens, D model width, V text vocab, U number vocab (13),
X = V + 2U the three heads' logits side by side, E `<evi>` tokens chosen in one step, T frames.
"""

from __future__ import annotations

from typing import Sequence

import torch

from timeexpert.events import DIGIT_IDS, DOT_ID, NUM_NUMBER_TOKENS, SEP_ID, SYNC_ID, TokenType
from timeexpert.models.evidence import aggregate_frames


class AnswerGrammar:
    """The answer grammar over the three heads' logits `[text V | time U | score U]`, one state
    per sequence of a batch (TimeExpert sec. 3.2: the switching token hands over between heads).

    States: TEXT (LM head: caption tokens, SWITCH, EOS), START and END (time head: the event's two
    times), SCORE (score head), DONE (after EOS). SWITCH opens an event's numbers; the start's
    `<sep>` moves to END, the end's `<sync>` to SCORE, the score's `<sync>` back to TEXT; EOS ends.
    Numbers are well formed: digits with at most one '.', neither first nor last, never empty, at
    most `max_number_symbols` symbols. Each sequence holds at most its `max_events_B` events and
    `max_caption_tokens` text tokens per caption. A finished sequence may only repeat EOS (the
    caller drops those tokens).
    """

    TEXT, START, END, SCORE, DONE = range(5)

    def __init__(
        self,
        *,
        text_vocab_size: int,
        switch_id: int,
        eos_id: int,
        forbidden_text_ids: Sequence[int],
        max_events_B: torch.Tensor,
        max_caption_tokens: int,
        max_number_symbols: int,
    ) -> None:
        if (max_events_B < 0).any():
            raise ValueError(f"max_events must be >= 0, got {max_events_B.tolist()}")
        B, device = max_events_B.shape[0], max_events_B.device
        self.V, self.U = text_vocab_size, NUM_NUMBER_TOKENS
        self.switch_id, self.eos_id = switch_id, eos_id
        self.max_events_B = max_events_B
        self.max_caption_tokens, self.max_number_symbols = max_caption_tokens, max_number_symbols
        self.text_ok_V = torch.ones(self.V, dtype=torch.bool, device=device)
        self.text_ok_V[list(forbidden_text_ids)] = False
        self.text_ok_V[[switch_id, eos_id]] = False  # allowed by state, in `allowed`
        self.digit_U = torch.zeros(self.U, dtype=torch.bool, device=device)
        self.digit_U[list(DIGIT_IDS)] = True
        self.state_B = torch.full((B,), self.TEXT, device=device)
        self.events_B = torch.zeros(B, dtype=torch.long, device=device)  # events completed
        self.caption_B = torch.zeros(B, dtype=torch.long, device=device)  # tokens of this caption
        self.num_len_B = torch.zeros(B, dtype=torch.long, device=device)  # symbols of this number
        self.has_dot_B = torch.zeros(B, dtype=torch.bool, device=device)  # this number has a '.'
        self.last_dot_B = torch.zeros(B, dtype=torch.bool, device=device)  # ... as its last symbol

    @classmethod
    def from_config(
        cls, config, batch_size: int, max_events: int | Sequence[int] | None = None, device=None
    ) -> "AnswerGrammar":
        """The grammar of a TimeExpertConfig (its answer ids and caps); `max_events`: one cap or
        one per sequence, by default the config's."""
        if config.switch_token_id is None or config.answer_end_token_id is None:
            raise ValueError("config has no switch/answer-end ids; call config.with_tokenizer()")
        max_events = config.max_events if max_events is None else max_events
        max_events_B = torch.as_tensor(max_events, dtype=torch.long, device=device)
        return cls(
            text_vocab_size=config.text_vocab_size,
            switch_id=config.switch_token_id,
            eos_id=config.answer_end_token_id,
            forbidden_text_ids=config.forbidden_text_ids,
            max_events_B=max_events_B.expand(batch_size),
            max_caption_tokens=config.max_caption_tokens,
            max_number_symbols=config.max_number_symbols,
        )

    @property
    def alive_B(self) -> torch.Tensor:
        """Sequences that have not ended."""
        return self.state_B != self.DONE

    @property
    def in_text_B(self) -> torch.Tensor:
        """Sequences whose next token comes from the LM head."""
        return self.state_B == self.TEXT

    def allowed(self) -> torch.Tensor:
        """(B, X) bool: the tokens each sequence may choose next."""
        state_B, num_len_B, cap = self.state_B, self.num_len_B, self.max_number_symbols
        in_text = state_B == self.TEXT
        text_BV = (in_text & (self.caption_B < self.max_caption_tokens))[:, None] & self.text_ok_V
        text_BV[:, self.switch_id] = in_text & (self.events_B < self.max_events_B)
        text_BV[:, self.eos_id] = in_text | (state_B == self.DONE)
        nonempty_B = (num_len_B > 0) & ~self.last_dot_B
        number_BU = torch.zeros(state_B.shape[0], self.U, dtype=torch.bool, device=state_B.device)
        number_BU |= self.digit_U & (num_len_B < cap)[:, None]
        number_BU[:, DOT_ID] = ~self.has_dot_B & (num_len_B > 0) & (num_len_B < cap - 1)
        number_BU[:, SEP_ID] = nonempty_B & (state_B == self.START)
        number_BU[:, SYNC_ID] = nonempty_B & ((state_B == self.END) | (state_B == self.SCORE))
        time_BU = number_BU & ((state_B == self.START) | (state_B == self.END))[:, None]
        score_BU = number_BU & (state_B == self.SCORE)[:, None]
        return torch.cat([text_BV, time_BU, score_BU], dim=1)

    def split(self, choice_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Columns of `[text V | time U | score U]` -> (id local to its vocabulary, TokenType)."""
        V, U = self.V, self.U
        kind_B = torch.where(
            choice_B < V,
            int(TokenType.TEXT),
            torch.where(choice_B < V + U, int(TokenType.TIME), int(TokenType.SCORE)),
        )
        local_B = torch.where(
            choice_B < V, choice_B, torch.where(choice_B < V + U, choice_B - V, choice_B - V - U)
        )
        return local_B, kind_B

    def advance(self, choice_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Take each sequence's chosen column (one `allowed` permits); returns `split(choice_B)`."""
        local_B, kind_B = self.split(choice_B)
        state_B = self.state_B
        in_text = state_B == self.TEXT
        is_number = (state_B == self.START) | (state_B == self.END) | (state_B == self.SCORE)
        is_term = is_number & ((local_B == SEP_ID) | (local_B == SYNC_ID))
        self.num_len_B = torch.where(is_term, 0, self.num_len_B + is_number.long())
        is_dot = is_number & (local_B == DOT_ID)
        self.has_dot_B = torch.where(is_term, False, self.has_dot_B | is_dot)
        self.last_dot_B = is_dot
        is_switch = in_text & (local_B == self.switch_id)
        is_eos = in_text & (local_B == self.eos_id)
        self.caption_B = torch.where(
            is_switch, 0, self.caption_B + (in_text & ~is_switch & ~is_eos).long()
        )
        self.events_B = self.events_B + (is_term & (state_B == self.SCORE)).long()
        new_state = state_B.clone()
        new_state[is_switch] = self.START
        new_state[is_eos] = self.DONE
        new_state[is_term & (state_B == self.START)] = self.END
        new_state[is_term & (state_B == self.END)] = self.SCORE
        new_state[is_term & (state_B == self.SCORE)] = self.TEXT
        self.state_B = new_state
        return local_B, kind_B


def answer_room(config, prompt_len: int, max_new_tokens: int) -> int:
    """`max_new_tokens`, cut to what the context leaves after a prompt of `prompt_len` tokens."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    room = config.max_position_embeddings - prompt_len
    if room < 1:
        raise ValueError(
            f"prompt of {prompt_len} tokens leaves no room to answer in the context of "
            f"{config.max_position_embeddings}"
        )
    return min(max_new_tokens, room)


@torch.no_grad()
def generate_answer(model, input_ids: torch.Tensor, token_types: torch.Tensor,
                    attention_mask: torch.Tensor | None = None,
                    pixel_values: torch.Tensor | None = None,
                    visual_embeds: torch.Tensor | None = None, *, max_new_tokens: int = 256,
                    max_events: int | Sequence[int] | None = None, return_extras: bool = False):
    """Greedy decoding of the answer grammar for a LEFT-padded batch with a TimeExpertForGrounding.

    Each step masks the heads' logits by `AnswerGrammar.allowed`; one argmax serves the batch.
    Finished sequences stay in the batch, masked (no expert compute, no routing statistics). With
    evidence tokens (config `evidence`) each chosen `<evi>` is grounded (`ground_evidence`).
    Returns per sequence the generated (ids, types), EOS included when reached; with
    `return_extras`, `(answers, extras)`: "token_density" (M,) kept visual tokens per frame
    (GroundVTS, else None), "evidence" per sequence the per-frame probabilities of each `<evi>`,
    "frame_relevance" per sequence its frames' relevance probabilities (else None).
    """
    cfg, (B, N) = model.config, input_ids.shape
    grammar = AnswerGrammar.from_config(cfg, B, max_events, device=input_ids.device)
    max_new_tokens = answer_room(cfg, N, max_new_tokens)
    if attention_mask is None:
        attention_mask = torch.ones(B, N, dtype=torch.long, device=input_ids.device)
    out = model(input_ids, token_types, attention_mask=attention_mask, pixel_values=pixel_values,
                visual_embeds=visual_embeds, use_cache=True)
    position_B = (attention_mask.long().sum(-1) - 1).clamp_min(0)
    if out.attention_mask is not None:  # token sampling dropped visual tokens of the prompt
        attention_mask, position_B = out.attention_mask, out.position_ids[:, -1]
    h_BD, cache = out.hidden_states[:, -1], out.past_key_values
    evidence_on = model.evidence_head is not None and out.frame_features is not None
    evidence: list[list[list[float]]] = [[] for _ in range(B)]
    tokens, kinds, alive = [], [], []
    for _ in range(max_new_tokens):
        logits_BX = torch.cat([model.lm_head(h_BD), model.time_head(h_BD), model.score_head(h_BD)],
                              dim=1)
        choice_B = logits_BX.float().masked_fill(~grammar.allowed(), float("-inf")).argmax(-1)
        was_alive_B, was_text_B = grammar.alive_B, grammar.in_text_B
        local_B, kind_B = grammar.advance(choice_B)
        tokens.append(local_B)
        kinds.append(kind_B)
        alive.append(was_alive_B)
        if not bool(grammar.alive_B.any()):
            break
        is_evi_B = was_text_B & (local_B == cfg.evidence_token_id) if evidence_on else None
        evidence_embeds = ground_evidence(model, out, h_BD, is_evi_B, evidence)
        position_B = position_B + 1
        still_B1 = (was_alive_B & grammar.alive_B).long()[:, None]
        attention_mask = torch.cat([attention_mask, still_B1], dim=1)
        step = model(local_B[:, None], kind_B[:, None], attention_mask=attention_mask,
                     position_ids=position_B[:, None], past_key_values=cache, use_cache=True,
                     return_logits=False, evidence_embeds=evidence_embeds)
        h_BD, cache = step.hidden_states[:, -1], step.past_key_values
    answers = generated_tokens(tokens, kinds, alive)
    if not return_extras:
        return answers
    return answers, {"token_density": out.token_density, "evidence": evidence,
                     "frame_relevance": frame_relevance(out)}


def ground_evidence(model, prompt_out, h_BD: torch.Tensor, is_evi_B: torch.Tensor | None,
                    evidence: list[list[list[float]]]) -> torch.Tensor | None:
    """D2VLM at generation: each sequence that just chose `<evi>` grounds it from the hidden
    state that chose it (its per-frame probabilities are appended to `evidence`), and gets its
    salient frames' pooled features as the next step's input addition (B, 1, D); None when no
    sequence chose one."""
    if is_evi_B is None or not bool(is_evi_B.any()):
        return None
    rows_E = is_evi_B.nonzero().flatten()
    frames_ETD, mask_ET = prompt_out.frame_features[rows_E], prompt_out.frame_mask[rows_E]
    prob_ET = model.evidence_head(h_BD[rows_E], frames_ETD, mask_ET)
    salient_ET = model.evidence_head.salient(prob_ET, mask_ET)
    embeds_B1D = h_BD.new_zeros(h_BD.shape[0], 1, h_BD.shape[-1])
    embeds_B1D[rows_E, 0] = aggregate_frames(frames_ETD, salient_ET).to(h_BD.dtype)
    for r, p_T, m_T in zip(rows_E.tolist(), prob_ET, mask_ET):
        evidence[r].append(p_T[m_T].tolist())
    return embeds_B1D


def generated_tokens(tokens, kinds, alive) -> list[tuple[list[int], list[int]]]:
    """The per-step (B,) choices -> per sequence its (ids, types) while it was alive."""
    tokens_BS = torch.stack(tokens, 1).tolist()
    kinds_BS = torch.stack(kinds, 1).tolist()
    alive_BS = torch.stack(alive, 1).tolist()
    return [
        (
            [t for t, a in zip(tokens_BS[b], alive_BS[b]) if a],
            [k for k, a in zip(kinds_BS[b], alive_BS[b]) if a],
        )
        for b in range(len(tokens_BS))
    ]


def frame_relevance(out) -> list[list[float]] | None:
    """Per sequence, its real frames' relevance probabilities (config `frame_relevance`)."""
    if out.frame_logits is None:
        return None
    prob_BT = torch.sigmoid(out.frame_logits.float())
    return [p_T[m_T].tolist() for p_T, m_T in zip(prob_BT, out.frame_mask)]
