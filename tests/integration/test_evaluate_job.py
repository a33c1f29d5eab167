"""jobs/evaluate.py end to end: a saved checkpoint + real mp4s -> official-format predictions,
metrics next to the trivial baselines, a markdown report, and an MLflow run."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest
import torch

from timeexpert.data import synth
from timeexpert.inference import GroundingModel
from timeexpert.models.timeexpert import TimeExpertForGrounding
from timeexpert.models.tokenizer import GroundingTokenizer
from timeexpert.presets import get_preset

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _job():
    spec = importlib.util.spec_from_file_location("evaluate_job", ROOT / "jobs/evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _data_and_checkpoint(tmp_path):
    """The tiny synthetic benchmark under tmp_path/data and a fresh tiny model saved in
    tmp_path/ckpt."""
    data = synth.generate("tiny", str(tmp_path / "data"), seed=3)
    tok = GroundingTokenizer.train([r.query for r in data.records("train")], vocab_size=400)
    torch.manual_seed(0)
    model = TimeExpertForGrounding(get_preset("tiny_cpu").model.with_tokenizer(tok))
    GroundingModel.from_model(model, tok).save(str(tmp_path / "ckpt"))
    return data, model


def test_evaluate_job_writes_predictions_metrics_report_and_mlflow(tmp_path):
    data, _ = _data_and_checkpoint(tmp_path)
    records = data.records("test")
    # one unreadable video: skipped, counted by reason, scored as a miss
    broken = next(r for r in records if r.task.value == "mr")
    (tmp_path / "data" / broken.video).write_bytes(b"not a video")

    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "eval"
    code = _job().main([
        "--checkpoint", str(tmp_path / "ckpt"), "--manifest", data.manifests["test"],
        "--train-manifest", data.manifests["train"], "--root", str(tmp_path / "data"),
        "--out", str(out), "--no-captions", "--tracking-uri", tracking,
    ])
    assert code == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["num_records"] == len(records)
    assert summary["skipped_videos"] == {"garbage": sum(r.video == broken.video for r in records)}
    for task in ("mr", "vhd", "dvc"):
        res = summary["results"][task]
        assert res["model"]["num_records"] == sum(r.task.value == task for r in records)
        assert 0.0 <= res["model"]["parse_failure_rate"] <= 100.0  # percent
        assert 0.0 <= res["model"]["no_answer_rate"] <= 100.0
        assert res["baselines"], f"no baselines for {task}"
    assert summary["results"]["mr"]["model"]["no_answer_rate"] > 0  # the broken video
    rows = [json.loads(line) for line in (out / "mr_predictions.jsonl").read_text().splitlines()]
    assert {"qid", "vid", "pred_relevant_windows"} <= set(rows[0])
    assert "results" in json.loads((out / "dvc_predictions.json").read_text())
    report = (out / "report.md").read_text()
    assert "## MR" in report and "mr/mean_interval" in report

    import mlflow

    mlflow.set_tracking_uri(tracking)
    runs = mlflow.search_runs(experiment_ids=["0"], output_format="list")
    assert len(runs) == 1
    assert any(k.startswith("mr/model/") for k in runs[0].data.metrics)
    # one spelling with training's stage metrics (tracking.metric_key): "@" -> "_"
    assert "mr/model/R1_0.5" in runs[0].data.metrics


def test_an_actor_pool_of_replicas_answers_as_the_model_in_process(tmp_path):
    """`predict_records` streams the decoded rows (blocks of two) through two model replicas
    (Ray Data actors, off the driver); their answers equal the model's own in this process."""
    import ray

    from timeexpert.config import DataConfig, VideoConfig
    from timeexpert.data.pipeline import build_dataset
    from timeexpert.eval.evaluate import Predictor, predict_records

    data, model = _data_and_checkpoint(tmp_path)
    records = data.records("test")
    cfg = model.config
    config = DataConfig(root=str(tmp_path / "data"), decode_num_cpus=0.25, decode_batch_size=2,
                        video=VideoConfig(num_frames=cfg.num_frames, height=cfg.image_size,
                                          width=cfg.image_size))
    seen = []
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        pooled, scored, _ = predict_records(
            str(tmp_path / "ckpt"), records, config, replicas=2, num_cpus=0.5, batch_size=4,
            on_prediction=lambda record, times, p: seen.append((record.id, len(times))))
        rows = next(iter(build_dataset(config, records=records, preserve_order=True)
                         .dataset.iter_batches(batch_size=len(records), batch_format="numpy")))
    finally:
        ray.shutdown()
    assert len(pooled) == len(scored) == len(records)
    assert sorted(i for i, _ in seen) == sorted(r.id for r in records)
    assert all(n == cfg.num_frames for _, n in seen)
    local = Predictor(str(tmp_path / "ckpt"))(rows)  # the same replica, in this process
    for rid, prediction in zip(local["id"], local["prediction"]):
        assert pooled[str(rid)] == prediction, rid
