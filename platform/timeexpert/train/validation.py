"""Grounding scored while a stage trains: what a sweep stops on (`TrainConfig.val_every`).

A small fixed subset of the validation split's MR queries (the first `val_records` by id), its
videos decoded once per worker as training decodes them (`decode_rows`), is answered by the model
in training through the one grounding API (`GroundingModel.predict_batch`, with the answer choice
of the model config) and scored by the official MR scorer (`evaluate_predictions`):
`val/mr/R1@0.5`. Every rank answers the same queries, so an expert-parallel model runs its
all-to-alls in step; the ranks hold the same model, so their scores agree and the reports keep
rank 0's.
"""

from __future__ import annotations

from dataclasses import dataclass

from timeexpert import storage
from timeexpert.config import DataConfig
from timeexpert.data import formats
from timeexpert.data.pipeline import decode_rows, record_row
from timeexpert.eval.evaluate import evaluate_predictions
from timeexpert.events import Record, Task
from timeexpert.inference import GroundingModel, PredictRequest

_BATCH = 8  # queries per predict_batch call


@dataclass
class ValidationProbe:
    """The fixed validation queries of a run, decoded, ready to be answered."""

    records: list[Record]  # scored: a query whose video could not be decoded is a miss
    ids: list[str]  # the queries answered, in `requests` order
    requests: list[PredictRequest]

    @classmethod
    def build(cls, data: DataConfig, split: str, num_records: int) -> "ValidationProbe":
        """The first `num_records` MR records (by id) of `split` under `data.root`, decoded at
        `data.video`'s frames and size; ValueError when the split holds no MR record."""
        manifest = storage.join_uri(data.root, "manifests", f"{split}.jsonl")
        records = sorted((r for r in formats.read_manifest(manifest, **data.storage_options)
                          if r.task == Task.MR), key=lambda r: r.id)[:num_records]
        if not records:
            raise ValueError(f"val_every scores MR queries, but {manifest} holds none")
        rows = [record_row(r, storage.resolve_under_root(r.video, data.root)) for r in records]
        decoded = decode_rows(rows, data)
        by_id = {r.id: r for r in records}
        requests = [
            PredictRequest(frames[mask], times[mask], Task.MR, by_id[i].query,
                           duration=by_id[i].duration, clip_len=by_id[i].clip_len)
            for i, frames, times, mask in zip(decoded["id"], decoded["frames"],
                                              decoded["timestamps"], decoded["frame_mask"])]
        return cls(records=records, ids=[str(i) for i in decoded["id"]], requests=requests)

    def score(self, model, tokenizer) -> float:
        """MR R1@0.5 of `model` (in training: its mode is given back) on the queries."""
        gm = GroundingModel.from_model(model, tokenizer)
        answers = []
        for i in range(0, len(self.requests), _BATCH):
            answers += gm.predict_batch(self.requests[i:i + _BATCH])
        return float(evaluate_predictions(self.records, dict(zip(self.ids, answers)),
                                          Task.MR)["R1@0.5"])
