"""What the jobs tell a person at the command line: an evaluation without its videos stops and
says where it looked, a conversion names each malformed row by file and line, and `--help`
keeps its examples on their lines."""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import logging
import pathlib
import re
import sys

import mlflow
import pytest

from timeexpert.data import formats
from timeexpert.eval.evaluate import MissingVideosError, check_videos
from timeexpert.events import Event, Record, Task

ROOT = pathlib.Path(__file__).resolve().parents[2]
JOBS = ROOT / "jobs"


def _job(name: str):
    """jobs/NAME.py as a module (its _common import needs jobs/ on the path)."""
    if str(JOBS) not in sys.path:
        sys.path.insert(0, str(JOBS))
    spec = importlib.util.spec_from_file_location(f"job_{name}", JOBS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dataset(root: pathlib.Path, videos_present: bool) -> pathlib.Path:
    """ROOT/manifests/test.jsonl of two MR records on two videos, ROOT/videos/ holding them or not."""
    records = [Record(id=f"q{i}", video=f"videos/v{i}.mp4", duration=20.0, task=Task.MR,
                      query="the red square grows", events=[Event(2.0, 6.0)], split="test")
               for i in range(2)]
    manifest = root / "manifests" / "test.jsonl"
    formats.write_manifest(records, str(manifest))
    if videos_present:
        (root / "videos").mkdir()
        for i in range(2):
            (root / "videos" / f"v{i}.mp4").write_bytes(b"")
    return manifest


def test_the_dataset_root_of_a_manifest_is_the_folder_above_manifests():
    assert formats.dataset_root(".cache/demo/data/small/manifests/test.jsonl") == ".cache/demo/data/small"
    assert formats.dataset_root("s3://b/data/x/manifests/val.jsonl") == "s3://b/data/x"
    assert formats.dataset_root("elsewhere/test.jsonl") == "elsewhere"


def test_check_videos_names_the_missing_videos_and_the_root(tmp_path):
    manifest = _dataset(tmp_path, videos_present=False)
    records = formats.read_manifest(str(manifest))
    with pytest.raises(MissingVideosError) as err:
        check_videos(records, str(tmp_path / "manifests"))
    assert err.value.missing[0] == str(tmp_path / "manifests" / "videos" / "v0.mp4")
    assert err.value.num_videos == 2 and "2 of 2 videos" in str(err.value)
    (tmp_path / "videos").mkdir()
    for i in range(2):
        (tmp_path / "videos" / f"v{i}.mp4").write_bytes(b"")
    check_videos(records, str(tmp_path))  # the dataset root holds them


def test_evaluate_stops_when_videos_are_missing_and_says_how_to_fix_it(tmp_path, capsys):
    manifest = _dataset(tmp_path / "data", videos_present=False)
    code = _job("evaluate").main(["--checkpoint", str(tmp_path / "no-ckpt"), "--manifest",
                                  str(manifest), "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert code == 2
    assert str(tmp_path / "data" / "videos" / "v0.mp4") in err  # the first missing path
    assert repr(str(tmp_path / "data")) in err  # the root it looked under: the dataset root
    assert "--root" in err and "--allow-missing" in err
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_evaluate_finds_the_videos_under_the_default_root(tmp_path, capsys):
    """With the videos in place the job gets past the check (and stops at the absent checkpoint)."""
    manifest = _dataset(tmp_path / "data", videos_present=True)
    code = _job("evaluate").main(["--checkpoint", str(tmp_path / "no-ckpt"), "--manifest",
                                  str(manifest), "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot read the checkpoint" in err and "not under the root" not in err


CHARADES = """3MSZA 24.3 30.4##person turn a light on.
3MSZA 1.0 2.0 person opens a door
3MSZA zero 5.0##a person opens a door.
3MSZA 9.0 3.0##a person sits.
3MSZA 20 40##a person leaves.
3MSZA 2 3##
XXXXX 1 2##a person eats.
"""


def test_convert_names_each_malformed_row_by_file_and_line(tmp_path, capsys):
    (tmp_path / "sta.txt").write_text(CHARADES)
    (tmp_path / "durations.json").write_text(json.dumps({"3MSZA": 31.0}))
    out = tmp_path / "root" / "manifests" / "train.jsonl"
    _job("prepare_data").main(["--convert", "charades_sta", "--input", str(tmp_path / "sta.txt"),
                               "--durations", str(tmp_path / "durations.json"), "--out", str(out)])
    captured = capsys.readouterr()
    where = str(tmp_path / "sta.txt")
    lines = captured.err.splitlines()
    assert lines == [
        f"{where}:2: expected 'VID START END##QUERY', got '3MSZA 1.0 2.0 person opens a door'",
        f"{where}:3: start 'zero' is not a number of seconds",
        f"{where}:4: event needs 0 <= start <= end, got start=9.0 end=3.0",
        f"{where}:5: end 40 s is past the video's duration 31 s: clamped to 31 s",
        f"{where}:6: empty query (task mr needs one)",
        f"{where}:7: unknown video 'XXXXX': no duration given for it",
    ]
    assert "Traceback" not in captured.err
    assert "7 rows read, 2 written" in captured.out and "5 refused, 1 clamped" in captured.out
    written = formats.read_manifest(str(out))
    assert [(r.query, r.events[0].end) for r in written] == [("person turn a light on.", 30.4),
                                                            ("a person leaves.", 31.0)]


def test_a_json_format_names_the_video_of_a_malformed_row():
    problems: list[formats.RowProblem] = []
    text = json.dumps({"v1": {"duration": 10, "timestamps": [[1, "x"]], "sentences": ["a"]},
                       "v2": {"duration": 10, "timestamps": [[1, 2]], "sentences": ["b"]}})
    records = formats.parse_activitynet(text, problems=problems)
    assert [r.id for r in records] == ["v2"]
    assert problems == [formats.RowProblem("video 'v1'", "end 'x' is not a number of seconds")]
    with pytest.raises(ValueError, match="ActivityNet video 'v1': end 'x'"):
        formats.parse_activitynet(text)


def test_the_demo_keeps_its_table_in_its_log_mlflow_run_and_model_version(tmp_path, caplog):
    demo = _job("demo")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("demo-test", artifact_location=str(tmp_path / "art")))
    client.create_registered_model(demo.REGISTERED_MODEL)
    version = client.create_model_version(demo.REGISTERED_MODEL, source=str(tmp_path / "ckpt"),
                                          run_id=run.info.run_id).version
    metrics = {"mr/R1@0.5": 61.25, "mr/num_records": 80.0, "mr/distinct_windows": 62.5}
    baselines = {"mr/mean_interval": {"R1@0.5": 15.0}, "mr/random_interval": {"R1@0.5": 10.0}}
    missed, table, text = demo.print_table(metrics, baselines)
    assert "MR R1@0.5" in text and table["mr_ratio"] == pytest.approx(61.25 / 15.0, abs=1e-3)
    with caplog.at_level(logging.INFO, logger="demo"):
        demo.keep_table(text, table, metrics, uri, run.info.run_id, version)
    assert text in caplog.text  # the demo logger's records go to demo.log (_console.driver_logging)
    logged = client.get_run(run.info.run_id).data.metrics
    assert logged["test/mr/R1_0.5"] == 61.25 and logged["table/mr_ratio"] == table["mr_ratio"]
    assert logged["table/distinct_windows"] == 0.625
    artifact = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="demo_table.txt",
                                                   tracking_uri=uri, dst_path=str(tmp_path / "dl"))
    assert pathlib.Path(artifact).read_text() == text + "\n"
    model_version = client.get_model_version(demo.REGISTERED_MODEL, version)
    assert text in model_version.description
    assert model_version.tags["mr_ratio"] == str(table["mr_ratio"])


# --- the README's and --help's examples ----------------------------------------------------

COMMAND = re.compile(r"(?:python\s+-m\s+(benchmarks\.[a-z_]+)\b|(jobs/[a-z_]+\.py))")  # not NAME


def _commands(text: str) -> list[tuple[str, list[str]]]:
    """(`jobs/NAME.py` or `benchmarks.NAME`, its words) of every command in `text`: the lines of
    its code blocks (a trailing backslash joins the next line; `#` starts a comment) and its
    inline code spans (which may wrap)."""
    snippets = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        snippets += [line.split("  #")[0] for line in block.replace("\\\n", " ").splitlines()]
    snippets += re.findall(r"`([^`\n]+(?:\n[^`\n]+)*)`", re.sub(r"```.*?```", "", text, flags=re.S))
    found = []
    for snippet in snippets:
        snippet = " ".join(snippet.split())
        matches = list(COMMAND.finditer(snippet))
        for m, following in zip(matches, matches[1:] + [None]):
            words = snippet[m.end(): following.start() if following else None].split()
            found.append((m.group(1) or m.group(2), words))
    return found


def _flags(target: str, monkeypatch, capsys) -> str:
    """The --help text of a job (`main(["--help"])`) or a benchmark (`main()` on its argv)."""
    if target.startswith("jobs/"):
        call = functools.partial(_job(target[5:-3]).main, ["--help"])
    else:
        monkeypatch.syspath_prepend(str(ROOT))
        monkeypatch.setattr(sys, "argv", [target, "--help"])
        call = importlib.import_module(target).main
    with pytest.raises(SystemExit):
        call()
    return capsys.readouterr().out


def _check_flags(commands, monkeypatch, capsys) -> None:
    helps: dict[str, str] = {}
    for target, words in commands:
        if target not in helps:
            helps[target] = _flags(target, monkeypatch, capsys)
        for word in words:
            flag = word.strip("[](),;").split("=")[0]
            if flag.startswith("--") and len(flag) > 2:
                assert re.search(rf"{re.escape(flag)}\b", helps[target]), (target, flag, words)


def test_every_flag_of_the_readmes_commands_is_one_its_job_takes(monkeypatch, capsys):
    commands = _commands((ROOT / "README.md").read_text())
    assert {"jobs/evaluate.py", "jobs/prepare_data.py", "jobs/train.py"} <= {t for t, _ in commands}
    _check_flags(commands, monkeypatch, capsys)


def test_every_flag_of_the_jobs_help_examples_is_one_the_job_takes(monkeypatch, capsys):
    for path in sorted(JOBS.glob("[a-z]*.py")):
        doc = _job(path.stem).__doc__
        _check_flags([c for c in _commands(f"```\n{doc}```") if c[0] == f"jobs/{path.name}"],
                     monkeypatch, capsys)


def test_the_jobs_help_shows_its_usage_examples_line_by_line(monkeypatch, capsys):
    """Each example line of a job's docstring, as the source writes it, is a line of its --help
    (a default formatter, or a backslash-newline in a non-raw docstring, ran them together)."""
    for path in sorted(JOBS.glob("[a-z]*.py")):
        source_doc = path.read_text().split('"""')[1]
        examples = [line.rstrip() for line in source_doc.splitlines()
                    if line.lstrip().startswith(("python jobs/", "--", "[--", "ray job submit"))]
        assert examples, path.name
        shown = _flags(f"jobs/{path.name}", monkeypatch, capsys).splitlines()
        for line in examples:
            assert line in shown, (path.name, line)


def test_the_readmes_data_paths_are_the_ones_the_demo_or_its_own_commands_create():
    """`.cache/demo/...`: what `make demo` writes (its --root, the data of the sizes it renders,
    its MLflow database); `.cache/data/X`: a dataset a README command renders first."""
    demo = _job("demo")
    root = ".cache/demo"
    assert f'"--root", default="{root}"' in (JOBS / "demo.py").read_text()  # the demo's own root
    made = {f"{root}/data/{size}" for size in ("small", demo.DEFAULT_TRAIN_SIZE["small"])}
    made |= {f"{root}/mlflow.db"}
    commands = _commands((ROOT / "README.md").read_text())
    for target, words in commands:  # the datasets the README's commands render
        if "--synthetic" in words:
            size = words[words.index("--synthetic") + 1]
            out = next((words[i + 1] for i, w in enumerate(words[:-1]) if w in ("--out", "--data-root")),
                       f".cache/data/{size}")
            made.add(out)
    for target, words in commands:
        for word in words:
            for path in re.findall(r"\.cache/[^\s,`'\")]+", word):
                assert any(path == m or path.startswith(m + "/") for m in made), (path, target, words)


def test_the_training_jobs_take_the_local_stacks_env_file_as_defaults(monkeypatch):
    common = _job("_common")
    for env, expected in (({}, (".cache/runs", "")),
                          ({"TE_STORAGE_ROOT": "s3://timeexpert", "MLFLOW_TRACKING_URI": "http://127.0.0.1:5001"},
                           ("s3://timeexpert/runs", "http://127.0.0.1:5001"))):
        for key in ("TE_STORAGE_ROOT", "MLFLOW_TRACKING_URI"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        parser = argparse.ArgumentParser()
        common.add_train_flags(parser)
        args = parser.parse_args([])
        assert (args.storage_root, args.tracking_uri) == expected
