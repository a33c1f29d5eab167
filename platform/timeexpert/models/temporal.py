"""Time and score encoders over the number vocabulary, separate from the text tokenizer.

TimeExpert sec. 3.1 (following TRACE): timestamps and saliency scores are written with 11 number
symbols (0-9 and '.'), `<sep>` between the two numbers of a segment and `<sync>` closing a number
sequence (NUMBER_VOCAB and their ids in `timeexpert.events`). Time tokens and score tokens each have their own
embedding table (the encoders) and their own output head (in `timeexpert.py`). Every frame's
timestamp is written with the same symbols and placed right before that frame's visual tokens.

Shape letters: N tokens, D model width, V number vocab (13).
"""

from __future__ import annotations

import torch
from torch import nn

from timeexpert.events import NUM_NUMBER_TOKENS


class NumberEncoder(nn.Module):
    """Embedding of number tokens; one instance encodes time tokens, another score tokens."""

    def __init__(self, dim: int, *, init_std: float = 0.02) -> None:
        super().__init__()
        self.embed = nn.Embedding(NUM_NUMBER_TOKENS, dim)
        nn.init.normal_(self.embed.weight, std=init_std)

    def forward(self, ids_N: torch.Tensor) -> torch.Tensor:
        return self.embed(ids_N)


class NumberHead(nn.Module):
    """Logits over the number vocabulary (the time head or the score head)."""

    def __init__(self, dim: int, *, init_std: float = 0.02) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, NUM_NUMBER_TOKENS, bias=False)
        nn.init.normal_(self.proj.weight, std=init_std)

    def forward(self, h_ND: torch.Tensor) -> torch.Tensor:
        return self.proj(h_ND)
