"""The TimeExpert model's config (`TimeExpertConfig`, a Hugging Face config saved as config.json),
as transformers gives each model's configuration a module of its own beside its modeling one
(`timeexpert.py`).

Reading order: the fields a checkpoint must agree on (`ARCHITECTURE_FIELDS`) -> how each task's
answer is read (`AnswerChoice`) -> the fields an old config.json may still carry
(`LEGACY_ANSWER_FIELDS`, `REMOVED_FIELDS`) -> `TimeExpertConfig`, validated when built -> whether
a saved checkpoint's config.json agrees with a given config (`check_checkpoint_config`) -> its
registration with `AutoConfig` (`AutoConfig.from_pretrained` of a saved checkpoint).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from transformers import AutoConfig, PretrainedConfig

from timeexpert.config import MoEConfig
from timeexpert.events import Task
from timeexpert.models.evidence import EvidenceConfig, add_evidence_tokens
from timeexpert.models.token_sampling import TokenSamplingConfig
from timeexpert.models.vision import siglip_config_from_path


# Config fields that decide parameter shapes or the computed function: a checkpoint must agree.
ARCHITECTURE_FIELDS = (
    "vision_encoder",
    "vision_siglip",
    "image_size",
    "patch_size",
    "vision_width",
    "vision_num_layers",
    "vision_num_heads",
    "tokens_per_frame",
    "compressor_num_heads",
    "text_vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "attention_bias",
    "moe",
    "query_first",
    "frame_relevance",
    "bidirectional_frames",
    "patch_relevance",
)


@dataclass(frozen=True, kw_only=True)
class AnswerChoice:
    """How each task's answer is read (`inference.READERS` holds one reader per choice).

    - mr, vhd: "frames" (the windows of the relevant frames; VHD's saliency from them) or
      "generated" (the decoded times and scores);
    - dvc: "captions" (the training captions that best match the frames, grounded as MR queries;
      needs patch_relevance and a tokenizer with captions), "frames" (the runs of relevant
      frames, captioned by the generated events) or "generated";
    - gqa: "options" (each option with the question grounded as an MR query; the most relevant
      one answers), "frames" (the generated option, its evidence the question's relevant
      frames) or "generated".

    Every choice but "generated" reads the frame-relevance head: it needs frame_relevance.
    """

    mr: str
    vhd: str
    dvc: str
    gqa: str

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "mr": ("frames", "generated"), "vhd": ("frames", "generated"),
        "dvc": ("captions", "frames", "generated"), "gqa": ("options", "frames", "generated")}

    @classmethod
    def resolve(cls, answer: dict | None, *, frame_relevance: bool,
                patch_relevance: bool) -> "AnswerChoice":
        """`answer` over the defaults (with frame relevance: MR, VHD and GQA's evidence off the
        frames, DVC generated; without: all generated); ValueError for an unknown task or
        choice, or a choice the model's heads cannot read."""
        read = "frames" if frame_relevance else "generated"
        chosen = {"mr": read, "vhd": read, "dvc": "generated", "gqa": read}
        for task, choice in (answer or {}).items():
            if task not in cls.CHOICES:
                raise ValueError(f"answer has an unknown task {task!r}; tasks: "
                                 f"{', '.join(cls.CHOICES)}")
            if choice not in cls.CHOICES[task]:
                raise ValueError(f"answer[{task!r}] must be one of {', '.join(cls.CHOICES[task])}, "
                                 f"got {choice!r}")
            chosen[task] = choice
        for task, choice in chosen.items():
            if choice != "generated" and not frame_relevance:
                raise ValueError(f"answer[{task!r}] = {choice!r} reads the frame-relevance head: "
                                 "it needs frame_relevance=True")
        if chosen["dvc"] == "captions" and not patch_relevance:
            raise ValueError("answer['dvc'] = 'captions' ranks the captions by the patch score: "
                             "it needs patch_relevance=True")
        return cls(**chosen)

    def of(self, task: Task) -> str:
        return getattr(self, Task.parse(task).value)


# The answer booleans that `answer` replaced, and the formulations removed with them (their
# value when off; None: dropped whatever it is): an old config.json still loads through `TimeExpertConfig._convert_legacy`.
LEGACY_ANSWER_FIELDS = ("windows_from_frames", "answer_from_frames", "dvc_from_frames",
                        "dvc_from_captions")
REMOVED_FIELDS = {"patch_motion": False, "frame_words": False, "loss_weight_words": None,
                  "relevance_token_max": False, "query_slots": False, "caption_negatives": 0,
                  "locate_captions": False}
REMOVED_AFTER = "78b7118"


class TimeExpertConfig(PretrainedConfig):
    """The whole model's config (a Hugging Face config, saved as config.json).

    Flat fields by component; the MoE FFN's own fields (`timeexpert.config.MoEConfig` minus its
    widths, which come from `hidden_size` / `intermediate_size`) sit in the `moe` dict. No field is
    named like a transformers generation parameter (`top_k`, `max_length`, ...).
    """

    model_type = "timeexpert"

    # vision
    vision_encoder: str = "vit"  # "vit": a small ViT built from the fields below; "siglip"
    vision_path: str = ""  # local SigLIP checkpoint that `create_model` loads weights from
    vision_siglip: dict | None = None  # SigLIP vision config (read from vision_path if empty)
    image_size: int = 32  # frames are resized to image_size x image_size
    patch_size: int = 8  # ViT patch size (pixels)
    vision_width: int = 64  # width V of the frame encoder's patch tokens
    vision_num_layers: int = 2  # ViT blocks
    vision_num_heads: int = 4  # ViT attention heads
    image_mean: list = field(default_factory=lambda: [0.5, 0.5, 0.5])  # pixel normalisation
    image_std: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    tokens_per_frame: int = 8  # S: slot tokens each frame is compressed to
    compressor_num_heads: int = 4  # heads of the slot cross-attention
    num_frames: int = 8  # frames sampled per video by the data pipeline and inference
    # decoder
    text_vocab_size: int = 1000  # V, len(tokenizer) including the added special tokens
    hidden_size: int = 64  # D
    intermediate_size: int = 128  # width F of each SwiGLU expert
    num_hidden_layers: int = 2  # decoder blocks
    num_attention_heads: int = 4  # H
    num_key_value_heads: int = 4  # G (grouped-query attention when G < H)
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2 has it)
    rope_theta: float = 10000.0  # rotary position base
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 1024  # the context length (prompt + answer), enforced
    initializer_range: float = 0.02
    moe: dict | None = None  # MoEConfig fields without dim / hidden_dim; None: MoEConfig defaults
    token_sampling: dict | None = None  # GroundVTS sampler (TokenSamplingConfig fields); None: off
    evidence: dict | None = None  # D2VLM evidence tokens (EvidenceConfig fields); None: off
    # query-conditioned frame relevance (`frame_relevance.py`): the instruction and query come
    # before the frames, so that every frame token sees the query in the causal decoder, and a
    # head on each frame's decoder states says whether the frame shows the queried moment;
    # MR / VHD windows are then read off the relevant frames
    query_first: bool = False  # prompt layout: [instruction + query] [frames] instead of the reverse
    frame_relevance: bool = False  # the per-frame relevance head and its BCE (needs query_first)
    # prefix-LM attention over the video (as PaliGemma over its image): the visual tokens of one
    # call attend to each other in both directions, so a frame's state knows the frames after it
    # (whether an object is on screen the whole video, where it moves next); everything else stays
    # causal. Off: the plain causal decoder
    bidirectional_frames: bool = False
    # GroundVTS's query-guided token scoring on the vision tower's patches (`PatchQueryScore`):
    # the best match of the query's words among a frame's patches is added to its relevance logit,
    # and every caption of a DVC row's video is contrasted against the others on each frame
    # (`caption_contrast_loss`): the words bound to the objects before the slots mix them.
    # Needs frame_relevance; frames are then passed as pixels (the patches are not in
    # visual_embeds)
    patch_relevance: bool = False
    loss_weight_captions: float = 1.0  # weight of the caption contrast in the loss
    captions_every_row: bool = False  # the caption contrast (and frame words) on every row of a
    # video, each row carrying its video's captioned events (the pipeline's `video_captions`);
    # off: on the DVC rows alone
    frame_threshold: float = 0.6  # salient: this share of the most relevant frame's probability
    # or above (D2VLM's 60%)
    # how each task's answer is read (`AnswerChoice`): {"mr": .., "vhd": .., "dvc": .., "gqa": ..},
    # the tasks left out take their default; None: every default
    answer: dict | None = None
    dvc_candidates: int = 16  # DVC by grounding captions: the captions asked per video
    loss_weight_frames: float = 1.0  # weight of the per-frame BCE in the loss
    # text ids of the answer grammar, taken from the tokenizer (`with_tokenizer`)
    switch_token_id: int | None = None  # SWITCH: the next tokens are an event's numbers
    answer_end_token_id: int | None = None  # EOS of the answer
    forbidden_text_ids: list = field(default_factory=list)  # special ids never generated
    evidence_token_id: int | None = None  # <evi> (when `evidence` is on)
    evidence_end_token_id: int | None = None  # </evi>
    # generation caps
    max_events: int = 16  # events per answer
    max_caption_tokens: int = 32  # text tokens per caption
    max_number_symbols: int = 7  # symbols of one number ('12345.6')
    # losses
    loss_weight_time: float = 1.0
    loss_weight_score: float = 1.0
    loss_weight_text: float = 1.0
    # initialisation (used by `create_model` only)
    upcycle_from: str = ""  # local dense causal-LM checkpoint to sparse-upcycle the decoder from
    upcycle_noise_std: float = 0.01  # relative perturbation of each expert's copy of the FFN

    def __post_init__(self, **kwargs: Any) -> None:
        kwargs = self._convert_legacy(kwargs)
        if self.vision_encoder not in ("vit", "siglip"):
            raise ValueError(
                f"vision_encoder must be 'vit' or 'siglip', got {self.vision_encoder!r}"
            )
        if self.vision_encoder == "siglip":
            if not self.vision_siglip:
                if not self.vision_path:
                    raise ValueError("vision_encoder='siglip' needs vision_path or vision_siglip")
                self.vision_siglip = siglip_config_from_path(self.vision_path)
            # the SigLIP config is the source of truth for the encoder's geometry
            self.image_size = int(self.vision_siglip["image_size"])
            self.patch_size = int(self.vision_siglip["patch_size"])
            self.vision_width = int(self.vision_siglip["hidden_size"])
        for name in (
            "tokens_per_frame",
            "num_frames",
            "hidden_size",
            "num_hidden_layers",
            "text_vocab_size",
            "max_position_embeddings",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.vision_width % self.compressor_num_heads:
            raise ValueError(
                f"vision_width ({self.vision_width}) must be divisible by compressor_num_heads "
                f"({self.compressor_num_heads})"
            )
        if self.moe is None:
            self.moe = {}
        self.moe_config()  # validates the MoE fields
        if self.token_sampling is not None:
            TokenSamplingConfig.from_dict(self.token_sampling)  # validates
        if self.evidence is not None:
            EvidenceConfig.from_dict(self.evidence)  # validates
        if self.frame_relevance and not self.query_first:
            raise ValueError(
                "frame_relevance needs query_first=True: a frame token sees the query only when "
                "the query comes before it in the causal decoder"
            )
        self.answer_choice()  # validates `answer` against the heads the model has
        if self.dvc_candidates < 1:
            raise ValueError(f"dvc_candidates must be >= 1, got {self.dvc_candidates}")
        if self.patch_relevance and not self.frame_relevance:
            raise ValueError("patch_relevance needs frame_relevance=True (its score is added to "
                             "the frame-relevance logit)")
        if self.frame_relevance and self.token_sampling is not None:
            raise ValueError("frame_relevance and token_sampling cannot be combined: the sampler "
                             "drops frame tokens the relevance head reads")
        if not 0.0 < float(self.frame_threshold) < 1.0:
            raise ValueError(f"frame_threshold must be in (0, 1), got {self.frame_threshold}")
        super().__post_init__(**kwargs)

    def answer_choice(self) -> AnswerChoice:
        """The validated answer choice (`answer` over the defaults of the model's heads)."""
        return AnswerChoice.resolve(self.answer, frame_relevance=self.frame_relevance,
                                    patch_relevance=self.patch_relevance)

    def _convert_legacy(self, kwargs: dict) -> dict:
        """config.json files written before the answer choice (docs/experiments.md, "Answer
        switches"): the four answer booleans become `answer`; a formulation that was removed
        loads only when it was off (it is then dropped), else ValueError naming the last commit
        that has it."""
        for name, off in REMOVED_FIELDS.items():
            if kwargs.pop(name, off) != off and off is not None:
                raise ValueError(
                    f"this config sets {name}, a formulation removed after commit "
                    f"{REMOVED_AFTER} (docs/experiments.md): load it with that commit")
        legacy = {k: kwargs.pop(k) for k in LEGACY_ANSWER_FIELDS if k in kwargs}
        if legacy and self.answer is None:
            frames = self.frame_relevance and legacy.get("windows_from_frames", True)
            self.answer = {
                "mr": "frames" if frames else "generated",
                "vhd": "frames" if frames else "generated",
                "dvc": ("captions" if self.frame_relevance and legacy.get("dvc_from_captions")
                        else "frames" if self.frame_relevance and legacy.get("dvc_from_frames")
                        else "generated"),
                "gqa": ("options" if self.frame_relevance and legacy.get("answer_from_frames")
                        else "frames" if frames else "generated"),
            }
        return kwargs

    def moe_config(self) -> MoEConfig:
        """The MoEConfig of every decoder FFN."""
        fields = dict(self.moe or {})
        for key in ("dim", "hidden_dim"):
            if key in fields:
                raise ValueError(
                    f"moe[{key!r}] is set by hidden_size / intermediate_size; remove it"
                )
        return MoEConfig(dim=self.hidden_size, hidden_dim=self.intermediate_size, **fields)

    def with_tokenizer(self, tokenizer) -> "TimeExpertConfig":
        """Take the text vocab size and the answer grammar's ids from a GroundingTokenizer (with
        `evidence` on, `<evi>` / `</evi>` are added to it first and become generable)."""
        if self.evidence is not None:
            self.evidence_token_id, self.evidence_end_token_id = add_evidence_tokens(tokenizer)
        self.text_vocab_size = tokenizer.text_vocab_size
        self.switch_token_id = tokenizer.switch_id
        self.answer_end_token_id = tokenizer.eos_id
        evidence_ids = (
            {self.evidence_token_id, self.evidence_end_token_id}
            if self.evidence is not None
            else set()
        )
        self.forbidden_text_ids = [i for i in tokenizer.forbidden_text_ids if i not in evidence_ids]
        return self

    def architecture_diff(self, other: "TimeExpertConfig | dict") -> dict[str, tuple[Any, Any]]:
        """Fields of ARCHITECTURE_FIELDS where `other` differs: {name: (self, other)}."""
        theirs = other if isinstance(other, dict) else other.to_dict()
        mine = self.to_dict()
        # a field an older config.json lacks has the class default (e.g. query_first)
        theirs = {k: theirs.get(k, getattr(TimeExpertConfig, k, None)) for k in ARCHITECTURE_FIELDS}
        return {
            k: (mine.get(k), theirs.get(k))
            for k in ARCHITECTURE_FIELDS
            if json.dumps(mine.get(k), sort_keys=True) != json.dumps(theirs.get(k), sort_keys=True)
        }


def check_checkpoint_config(path: str, config: Any = None) -> None:
    """What `TimeExpertForGrounding.from_pretrained` refuses before it reads a weight: ValueError
    unless `path` holds a TimeExpert config.json whose architecture fields agree with `config`
    (when one is given)."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"{path!r} is not a TimeExpert checkpoint directory (no config.json)")
    with open(config_file) as f:
        saved = json.load(f)
    if saved.get("model_type") != TimeExpertConfig.model_type:
        raise ValueError(
            f"{path!r} holds a {saved.get('model_type')!r} checkpoint, not {TimeExpertConfig.model_type!r}"
        )
    if isinstance(config, TimeExpertConfig):
        diff = config.architecture_diff(saved)
        if diff:
            raise ValueError(
                f"checkpoint {path!r} does not match the given config: "
                + ", ".join(
                    f"{k}: config {a!r} vs checkpoint {b!r}"
                    for k, a, b in ((k, *v) for k, v in diff.items())
                )
            )


AutoConfig.register(TimeExpertConfig.model_type, TimeExpertConfig, exist_ok=True)
