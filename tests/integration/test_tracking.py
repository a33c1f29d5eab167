"""The three-stage pipeline logs to a real `mlflow server` (SQLite): a parent run, a nested run
per stage with step metrics, eval metrics and plots; step metrics wait out a server restart."""

from __future__ import annotations

import time

import pytest

from mlflow_support import running_mlflow_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def test_pipeline_logs_parent_nested_runs_metrics_and_plots(mlflow_server, ray_local, tmp_path):
    from mlflow.tracking import MlflowClient

    from timeexpert.data import synth
    from timeexpert.train.config import TrainConfig
    from timeexpert.train.stages import run_pipeline
    from timeexpert.train.telemetry import PHASES

    spec = synth.SynthSpec(name="mini", num_videos={"train": 4, "val": 2, "test": 1},
                           min_duration=8, max_duration=12, max_event_len=5)
    data = str(tmp_path / "data")
    synth.generate(spec, data, seed=0, workers=1)
    cfg = TrainConfig(data_root=data, storage_root=str(tmp_path / "runs"), name="pipe",
                      num_steps=2, batch_size=2, checkpoint_every=2, log_every=1,
                      expert_update_every=1, eval_max_records=1, tracking_uri=mlflow_server,
                      experiment="pipeline-test", tags={"ablation": "full"}, profile_steps=1)
    result = run_pipeline(cfg, stages=(1, 2, 3))

    assert sorted(result.stages) == [1, 2, 3]
    for n in (2, 3):  # each stage starts from the previous one's checkpoint
        assert result.stages[n].train_metrics["step"] == 2
    c = MlflowClient(mlflow_server)
    parent = c.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["ablation"] == "full"
    # MLflow names: "@" -> "_"; the sample in the name: 1 val record per task (eval_max_records)
    assert "stage3/eval/val1/mr/R1_0.5" in parent.data.metrics
    exp = c.get_experiment_by_name("pipeline-test")
    children = c.search_runs([exp.experiment_id],
                             filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert sorted(r.data.tags["stage"] for r in children) == ["1", "2", "3"]
    for run in children:
        assert run.info.status == "FINISHED"
        history = c.get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in history] == [1, 2]
        for key in ("loss_time", "aux_loss", "z_loss", "tokens_per_s", "experts/num_active",
                    "experts/mean_active/time", "eval/val1/mr/R1_0.5", "eval/val1/dvc/F1", "data/decode_s"):
            assert key in run.data.metrics, key
        # rank 0's step breakdown every log_every steps, and the stage's totals at its end
        for phase in PHASES + ("step",):
            assert [m.step for m in c.get_metric_history(run.info.run_id, f"time/{phase}")] == [1, 2]
        totals = {k: v for k, v in run.data.metrics.items() if k.startswith("time_total/")}
        assert totals["time_total/steps"] == 2 and totals["time_total/loop"] > 0
        assert sum(totals[f"time_total/{p}"] for p in PHASES) == pytest.approx(totals["time_total/loop"])
        profile = {a.path for a in c.list_artifacts(run.info.run_id, "profile")}  # profile_steps
        name = f"stage{run.data.tags['stage']}_steps2-2_rank0"
        assert profile == {f"profile/trace_{name}.json.gz", f"profile/ops_{name}.txt"}, profile
        arts = {a.path for a in c.list_artifacts(run.info.run_id, "plots")}
        stage = run.data.tags["stage"]
        assert {f"plots/loss_curves_stage{stage}.png", f"plots/expert_heatmap_stage{stage}.png",
                f"plots/active_experts_stage{stage}.png"} <= arts, arts


def test_step_metrics_wait_out_a_tracking_server_restart(tmp_path, monkeypatch):
    """The tracking server stops while a worker logs steps 3-5: `log` does not wait, the steps
    are kept and arrive, in order, once the server is back; none is dropped."""
    from mlflow.tracking import MlflowClient

    from benchmarks.local_servers import MlflowServer
    from timeexpert import tracking

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")  # MLflow's own retries: 2, 4, 8 s
    server = MlflowServer(tmp_path)
    server.start()
    try:
        run_id = tracking.create_run(server.uri, "outage", "steps")
        logger = tracking.StepLogger(server.uri, run_id)
        for step in (1, 2):
            logger.log({"loss": 1.0 / step}, step)
        deadline = time.monotonic() + 30
        while logger.sent < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert logger.sent == 2
        server.stop()
        t0 = time.perf_counter()
        for step in (3, 4, 5):
            logger.log({"loss": 1.0 / step}, step)
        assert time.perf_counter() - t0 < 0.5  # training does not wait for the server
        time.sleep(3)
        assert logger.sent == 2
        server.start()
        logger.close()
        assert (logger.sent, logger.dropped) == (5, 0)
        history = MlflowClient(server.uri).get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
    finally:
        server.stop()
