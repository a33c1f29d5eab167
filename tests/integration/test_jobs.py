"""The jobs as users run them, submitted with `ray job submit` to the `ray start --head` cluster of
the local stack (infra/local/up.sh: moto S3, MLflow server on SQLite, Ray head with job server):
a 4-trial Tune sweep (ASHA, each trial a Train run), one training pipeline stage with S3 data and
checkpoints, and a reduced ablation grid. One stack for the module."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
import time
import uuid

import pytest
from local_stack_support import stack_env

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

MINI = dict(name="mini", num_videos={"train": 4, "val": 2, "test": 1}, min_duration=8,
            max_duration=12, max_event_len=5)
# Small enough for a loaded 2-core machine: 1 worker of half a CPU, tiny batches, few steps.
COMMON = ["--preset", "tiny_cpu", "--set", "log_every=1", "--set", "batch_size=2",
          "--set", "cpus_per_worker=0.5"]
# What Ray prints on a job's terminal when left to: its workers' and actors' output (after a
# cyan "(Name pid=N)"), the raylet's messages, the C++ lines of the driver's Ray core, its own
# and Ray Data's log records, its deprecation warnings (jobs/_common.py keeps them in Ray's logs).
RAY_CHATTER = ("\x1b[36m(", "(raylet)", "core_worker.cc", "PlacementGroupCleaner", "TrainController",
               "ServeReplica", "RayDeprecationWarning", "INFO worker.py", "streaming_executor")


@pytest.fixture(scope="module")
def stack():
    """The local stack's env (RAY_ADDRESS, MLFLOW_TRACKING_URI, AWS_*, TE_STORAGE_ROOT) with the
    mini synthetic benchmark on its S3 at {TE_STORAGE_ROOT}/data/mini."""
    # A short state path: Ray's unix sockets live under it.
    state = pathlib.Path(f"/tmp/te-jobs-{uuid.uuid4().hex[:6]}")
    try:
        up = subprocess.run([str(ROOT / "infra/local/up.sh"), str(state)], capture_output=True,
                            text=True, timeout=300)
        assert up.returncode == 0, up.stderr + up.stdout
        env = stack_env(state)
        env["STATE"] = str(state)
        env["DATA"] = f"{env['TE_STORAGE_ROOT']}/data/mini"
        gen = (f"from timeexpert.data import synth; synth.generate(synth.SynthSpec(**{MINI!r}), "
               f"{env['DATA']!r}, seed=0, workers=1)")
        subprocess.run([sys.executable, "-c", gen], env=env, check=True, timeout=180)
        yield env
    finally:
        subprocess.run([str(ROOT / "infra/local/down.sh"), str(state)], capture_output=True,
                       text=True, timeout=120)


def _submit(env: dict[str, str], *entrypoint: str, timeout: int = 900) -> str:
    """`ray job submit --working-dir .` and wait; returns the job's output (asserts success)."""
    deadline = time.monotonic() + 180
    while True:
        job = subprocess.run(
            [str(ROOT / ".venv/bin/ray"), "job", "submit", "--address", env["RAY_ADDRESS"],
             "--working-dir", ".", "--", "python", *entrypoint],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
        )
        # The head's job agent registers a while after the dashboard answers (slow when the
        # machine is busy); the submission is refused before any job exists, so retry it.
        if "No available agent to submit job" not in job.stdout + job.stderr:
            break
        assert time.monotonic() < deadline, "the Ray job agent never came up: " + job.stderr[-500:]
        time.sleep(3)
    assert job.returncode == 0, job.stdout[-6000:] + job.stderr[-2000:]
    assert "succeeded" in job.stdout.lower(), job.stdout[-3000:]
    return job.stdout


def _job_args(stack: dict[str, str], name: str) -> list[str]:
    """The flags every job here shares: tiny preset, the stack's data, storage and MLflow."""
    return [*COMMON, "--data-root", stack["DATA"], "--storage-root",
            f"{stack['TE_STORAGE_ROOT']}/runs", "--name", name,
            "--tracking-uri", stack["MLFLOW_TRACKING_URI"]]


def _line(out: str, prefix: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith(prefix)]
    assert lines, f"no {prefix!r} line in the job output: {out[-3000:]}"
    return lines[-1].removeprefix(prefix)


def _common_worker_line() -> str:
    """jobs/_common.py's WORKER_LINE: the lines of our Train workers that a job prints."""
    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        import _common
    finally:
        sys.path.remove(str(ROOT / "jobs"))
    return _common.WORKER_LINE


def _mlflow(env):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])


def test_four_trial_sweep(stack):
    name = f"sweep-{uuid.uuid4().hex[:4]}"
    out = _submit(stack, "jobs/sweep.py", *_job_args(stack, name), "--workers", "1",
                  "--steps", "4", "--set", "checkpoint_every=4", "--num-samples", "4",
                  "--max-concurrent", "2")
    trials = json.loads(_line(out, "TRIALS "))
    assert len(trials) == 4
    assert [t["error"] for t in trials] == [None] * 4
    steps = sorted(t["step"] for t in trials)
    assert all(1 <= s <= 4 for s in steps), steps  # ASHA may stop weak trials at a rung
    assert steps[-1] == 4  # the best trial ran to the end
    # every trial reported its validation score, what ASHA ranked them by (not the loss)
    assert all(0.0 <= t["val"] <= 100.0 for t in trials), trials
    best = json.loads(_line(out, "BEST "))
    assert {"lr", "alpha", "tau_min", "lambda_1", "lambda_2"} <= set(best)
    assert max(t["val"] for t in trials) == next(t["val"] for t in trials if t["hp"] == best)
    # its settings, where jobs/train.py --settings reads them
    import s3fs

    fs = s3fs.S3FileSystem(key=stack["AWS_ACCESS_KEY_ID"], secret=stack["AWS_SECRET_ACCESS_KEY"],
                           client_kwargs={"endpoint_url": stack["AWS_ENDPOINT_URL"]})
    saved = json.loads(fs.cat_file(f"{stack['TE_STORAGE_ROOT']}/runs/sweeps/{name}.json"
                                   .removeprefix("s3://")))
    assert saved["lr"] == best["lr"]
    assert {k: saved["moe"][k] for k in ("alpha", "tau_min", "lambda_1", "lambda_2")} == {
        k: best[k] for k in ("alpha", "tau_min", "lambda_1", "lambda_2")}

    c = _mlflow(stack)
    exp = c.get_experiment_by_name("timeexpert")
    parents = c.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{name}'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {"best_loss", "best_val/mr/R1_0.5"} <= set(parents[0].data.metrics)
    runs = c.search_runs([exp.experiment_id], f"tags.sweep = '{name}'")
    assert len(runs) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parents[0].info.run_id}
    assert all(r.info.status in ("FINISHED", "KILLED") for r in runs)  # none left RUNNING
    assert all("lr" in r.data.params for r in runs)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert finished and all({"final_loss", "final_val/mr/R1_0.5"} <= set(r.data.metrics)
                            for r in finished)
    assert any("loss" in r.data.metrics for r in runs)  # the workers' step metrics


def test_ray_job_submit_train(stack):
    import s3fs

    name = f"submitted-{uuid.uuid4().hex[:4]}"
    out = _submit(stack, "jobs/train.py", *_job_args(stack, name), "--stages", "2", "--steps", "2",
                  "--workers", "2", "--ep", "2", "--set", "eval_max_records=1",
                  "--register-model", f"{name}-model")
    assert "[stage 2] step 2/2" in out  # the progress line reached the user
    # ... and of Ray's output only our Train workers' lines (after Ray's prefix), nothing else
    job = out.split("Tailing logs until the job exits")[1].splitlines()  # not the CLI's lines
    prefix = re.compile(r"\x1b\[36m\(RayTrainWorker pid=\d+(, ip=[\d.]+)?\)\x1b\[0m ")
    worker_line = re.compile(_common_worker_line())
    ours = [line for line in job if prefix.match(line)
            and worker_line.match(prefix.sub("", line, count=1))]
    assert ours, job
    rest = "\n".join(line for line in job if line not in ours)
    for chatter in RAY_CHATTER:
        assert chatter not in rest, rest[-3000:]
    result = json.loads(_line(out, "RESULT "))
    uri = result["checkpoint_uri"]
    assert uri.startswith(f"{stack['TE_STORAGE_ROOT']}/runs/{name}-stage2/"), uri
    fs = s3fs.S3FileSystem(key=stack["AWS_ACCESS_KEY_ID"], secret=stack["AWS_SECRET_ACCESS_KEY"],
                           client_kwargs={"endpoint_url": stack["AWS_ENDPOINT_URL"]})
    files = {p.rsplit("/", 1)[1] for p in fs.ls(uri.removeprefix("s3://"))}
    assert "config.json" in files and any(f.endswith(".safetensors") for f in files), files
    assert "mr/R1@0.5" in result["stages"]["2"]["eval"]
    parent = _mlflow(stack).get_run(result["parent_run_id"])  # logged to the stack's MLflow
    assert parent.info.status == "FINISHED"
    # the final checkpoint, registered on the stack's MLflow server
    assert result["registered"] == f"models:/{name}-model/1"
    version = _mlflow(stack).get_model_version(f"{name}-model", "1")
    assert version.run_id == result["parent_run_id"] and version.source.endswith("/checkpoint")


def test_ablation_grid_with_seeds(stack):
    """2 variants x 2 seeds on the mini benchmark: the JSON has mean / std / n per variant and
    metric, the paired differences to the reference, and the table's means are those of the
    seed runs logged to MLflow (experiment per grid, parent per variant, child per seed)."""
    name = f"abl-{uuid.uuid4().hex[:4]}"
    out = _submit(stack, "jobs/ablate.py", *_job_args(stack, name), "--grid", "timeexpert",
                  "--only", "full,dense", "--seeds", "2", "--stages", "2", "--steps", "2",
                  "--workers", "1", "--json")
    # the runner's last line, before `ray job submit`'s own closing lines
    result = json.loads(next(line for line in reversed(out.splitlines())
                             if line.startswith('{"grid"')))
    assert result["grid"] == "timeexpert" and set(result["variants"]) == {"full", "dense"}
    for variant, metrics in result["variants"].items():
        for key in ("mr/R1@0.5", "mr/mIoU", "vhd/HL-min-VeryGood-Hit1", "dvc/F1", "gqa/Acc@QA",
                    "train/experts_per_token", "train/seconds_per_step"):
            assert set(metrics[key]) == {"mean", "std", "n"} and metrics[key]["n"] == 2, (variant, key)
    assert result["variants"]["dense"]["train/experts_per_token"]["mean"] == 1.0
    assert set(result["differences"]) == {"dense"} and result["differences"]["dense"]["mr/R1@0.5"]["n"] == 2
    assert result["chosen_on_val"] in {"full", "dense"}
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert any(line.startswith("| dense | 2 | ") for line in table), table

    c = _mlflow(stack)
    exp = c.get_experiment_by_name("ablation-timeexpert")
    for variant in ("full", "dense"):
        parents = c.search_runs([exp.experiment_id], f"tags.variant = '{variant}' and "
                                "attributes.run_name = '" + variant + "'")
        parent = max(parents, key=lambda r: r.info.start_time)
        children = c.search_runs([exp.experiment_id],
                                 f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert sorted(r.data.tags["seed"] for r in children) == ["0", "1"]
        assert all(r.info.status == "FINISHED" for r in children + [parent])
        seeds = [r.data.metrics["test/mr/R1_0.5"] for r in children]
        mean = sum(seeds) / len(seeds)
        assert result["variants"][variant]["mr/R1@0.5"]["mean"] == pytest.approx(mean)
        assert parent.data.metrics["test/mr/R1_0.5/mean"] == pytest.approx(mean)
        # each seed run holds its pipeline's stage run
        stage_runs = c.search_runs([exp.experiment_id], "tags.mlflow.parentRunId = '"
                                   + children[0].info.run_id + "'")
        assert [r.data.tags["stage"] for r in stage_runs] == ["2"]
    summary = c.search_runs([exp.experiment_id], "tags.role = 'summary'",
                            order_by=["attributes.start_time DESC"])[0]
    assert {a.path for a in c.list_artifacts(summary.info.run_id)} >= {
        "table.md", "result.json", "comparison.png"}


def test_demo_on_the_local_stack(stack, tmp_path):
    """`jobs/demo.py --local-stack STATE` on the stack that is up: data copied to its S3, the
    three stages on its Ray head, checkpoints on S3, runs on its MLflow server, Serve answering
    over HTTP; the stack it did not bring up stays up."""
    import s3fs

    out = subprocess.run(
        [sys.executable, "jobs/demo.py", "--local-stack", stack["STATE"], "--root", str(tmp_path),
         "--preset", "tiny_cpu", "--size", "tiny", "--steps", "6", "--json"],
        cwd=ROOT, env=stack, capture_output=True, text=True, timeout=1200,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    text = out.stdout
    assert f"using the local stack already up in {stack['STATE']}" in text
    assert f"copying it to {stack['TE_STORAGE_ROOT']}/data/tiny" in text
    assert "training the three stages (1, 2, 3 steps" in text
    assert "MR R1@0.5" in text and "DVC F1" in text  # the table against the baselines
    for label in ("MR R1@0.5", "DVC F1"):  # ... and the frame-grid ceiling, read off the checkpoint
        assert re.search(rf"^{re.escape(label)} .*x (met   |MISSED)\s+\d+\.\d\d$", text, re.M), text[-3000:]
    for path in ("/v1/moments", "/v1/highlights", "/v1/captions", "/v1/answers"):
        assert f"POST {path} (" in text, text[-3000:]
    table = json.loads(text.strip().splitlines()[-1])  # --json: the table, last line
    for key in ("mr_ratio", "vhd_ratio", "dvc_ratio", "gqa_ratio"):
        assert isinstance(table[key], float), table
    assert 0.0 <= table["distinct_windows"] <= 1.0, table
    checkpoint = _line(text, "  checkpoint:  ")
    assert re.match(rf"{stack['TE_STORAGE_ROOT']}/runs/demo-\d{{8}}-\d{{6}}-stage3/", checkpoint), (
        checkpoint
    )
    fs = s3fs.S3FileSystem(key=stack["AWS_ACCESS_KEY_ID"], secret=stack["AWS_SECRET_ACCESS_KEY"],
                           client_kwargs={"endpoint_url": stack["AWS_ENDPOINT_URL"]})
    assert fs.exists(checkpoint.removeprefix("s3://") + "/config.json")
    parent_id = _line(text, "  MLflow runs: ").split("parent run ")[1].rstrip(")")
    client = _mlflow(stack)
    assert client.get_run(parent_id).info.status == "FINISHED"
    stages = client.search_runs(
        [client.get_run(parent_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
    )
    # each stage's evaluation named by its sample: eval/val<N>/mr/R1_0.5, N val records
    assert len(stages) == 3 and all(any(re.fullmatch(r"eval/val\d+/mr/R1_0\.5", k) for k in r.data.metrics)
                                    for r in stages)
    assert (pathlib.Path(stack["STATE"]) / "env").exists()  # not torn down: it was already up
    # the final checkpoint is a version of the registered model, on the stack's MLflow server
    registered = _line(text, "  registered:  ").split()[0]
    name, version = registered.removeprefix("models:/").split("/")
    assert name == "timeexpert-demo" and table["registered"] == registered
    assert client.get_model_version(name, version).run_id == parent_id
    # a console a person can read: the demo's lines and bars, nothing of Ray's
    console = out.stdout + out.stderr
    for chatter in (*RAY_CHATTER, "RayTrainWorker"):
        assert chatter not in console, console[-3000:]
    assert len(console.splitlines()) <= 120, console
