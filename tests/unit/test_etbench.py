"""E.T. Bench scorer against the official compute_metrics.py output on the golden files, plus
hand-computed cases per metric family. The Sim model (all-MiniLM-L6-v2) loads once per module."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from timeexpert.eval import etbench
from timeexpert.eval.etbench import (
    score_captioning,
    score_choice,
    score_etbench,
    score_grounded_qa,
    score_grounding,
    score_highlight,
    score_localization,
    score_recall,
    score_summarization,
)
from timeexpert.eval.etbench_parse import parse_captions, parse_choice, parse_highlight, parse_spans

PRED_SETS = ("near", "noisy", "degenerate")


@pytest.fixture(scope="module")
def sim():
    return etbench.sentence_similarity()


@pytest.fixture(scope="module")
def golden(shared_fixtures, sim):
    """name -> (our result, official metrics.json, official Overall/Merged tables), scored once."""
    d = shared_fixtures / "etbench"
    tables = json.loads((d / "official_overall_tables.json").read_text())
    out = {}
    for name in PRED_SETS:
        samples = json.loads((d / f"pred_{name}.json").read_text())
        official = json.loads((d / f"official_metrics_{name}.json").read_text())
        out[name] = (score_etbench(samples, sim=sim), official, tables[name])
    return out


@pytest.mark.parametrize("name", PRED_SETS)
def test_golden_every_figure_matches_official(golden, name):
    ours, official, tables = golden[name]
    assert list(ours["metrics"]) == list(official)
    for task, sources in official.items():
        assert list(ours["metrics"][task]) == list(sources)
        for source, figures in sources.items():
            mine = ours["metrics"][task][source]
            assert list(mine) == list(figures), (task, source)  # the official keys, in order
            for key, value in figures.items():
                assert mine[key] == pytest.approx(value, abs=1e-4), (task, source, key)
    assert ours["overall"] == tables["overall_x100_1dp"]
    assert ours["merged"] == tables["merged_x100_1dp"]
    failed = sum(f["Failed"] for s in official.values() for f in s.values())
    assert ours["failed"] == failed and ours["parse_failure_rate"] == pytest.approx(failed / 68)


@pytest.mark.parametrize("name", PRED_SETS)
def test_golden_per_sample_parses_and_scores_match_official(shared_fixtures, sim, name):
    d = shared_fixtures / "etbench"
    samples = {(s["task"], s["source"], s["idx"]): s for s in json.loads((d / f"pred_{name}.json").read_text())}
    for row in json.loads((d / f"official_per_sample_{name}.json").read_text()):
        sample = samples[(row["task"], row["source"], row["idx"])]
        if "tvg_format" in row:
            assert parse_spans(row["a"]) == row["tvg_format"], row["a"]
        if "dvc_format" in row:
            official_parse = row["dvc_format"]
            expected = None if official_parse["timestamps"] is None else (
                official_parse["timestamps"], official_parse["sentences"])
            assert parse_captions(row["a"]) == expected, row["a"]
        if "single_sample_eval" in row:
            scorer = etbench.TASK_SCORERS[row["task"]]
            args = (sim,) if row["task"] in ("rar", "eca", "rvq", "gvq") else ()
            assert scorer([sample], *args) == pytest.approx(row["single_sample_eval"], abs=1e-5), row["a"]


def test_random_strings_follow_the_seed(shared_fixtures, sim):
    """Seed 1 moves only DVC/SLC SentSim. SLC reaches the official random.seed(1) value; DVC moves
    but not to it: the fixtures' README does not say which PYTHONHASHSEED that second run had (the
    video order decides which caption meets which random string), and 0 and 1 both miss it."""
    d = shared_fixtures / "etbench"
    tables = json.loads((d / "official_overall_tables.json").read_text())
    samples = [s for s in json.loads((d / "pred_degenerate.json").read_text()) if s["task"] in ("dvc", "slc")]
    seed1 = score_etbench(samples, seed=1, sim=sim)["metrics"]
    expected = tables["degenerate"]["differences_with_random_seed_1"]
    assert seed1["slc"]["ht_step"]["SentSim"] == pytest.approx(expected["slc/ht_step/SentSim"]["seed1"], abs=1e-4)
    assert seed1["dvc"]["youcook2"]["SentSim"] != pytest.approx(expected["dvc/youcook2/SentSim"]["seed0"], abs=1e-3)
    strict = score_etbench(samples, mode="strict", sim=sim)["metrics"]  # unmatched captions score 0
    assert strict["dvc"]["youcook2"]["SentSim"] == 0.0 and strict["slc"]["ht_step"]["SentSim"] == 0.0
    assert strict["dvc"]["youcook2"]["METEOR"] == seed1["dvc"]["youcook2"]["METEOR"]


def test_cli_joins_predictions_to_the_annotation(shared_fixtures, tmp_path):
    d = shared_fixtures / "etbench"
    samples = json.loads((d / "pred_near.json").read_text())
    keep = [s for s in samples if s["task"] in ("tvg", "rvq", "vhd")]
    gt = [{k: v for k, v in s.items() if k != "a"} for s in keep]
    first_tvg = next(i for i, s in enumerate(keep) if s["task"] == "tvg")
    preds = [{"task": s["task"], "source": s["source"], "idx": s["idx"], "a": s["a"]}
             for i, s in enumerate(keep) if i != first_tvg]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(preds))
    proc = subprocess.run([sys.executable, "-m", "timeexpert.eval.etbench", "--gt", str(tmp_path / "gt.json"),
                           "--pred", str(tmp_path / "pred.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    official = json.loads((d / "official_metrics_near.json").read_text())
    assert out["metrics"]["vhd"] == official["vhd"] and out["metrics"]["rvq"] == official["rvq"]
    # the first TVG sample has no prediction: answered "", a failed parse and a miss
    tvg = out["metrics"]["tvg"]["qvhighlights"]
    assert tvg["Failed"] == official["tvg"]["qvhighlights"]["Failed"] + 1
    assert out["overall"]["DVC (F1)"] is None and out["merged"]["F1 (cap)"] is None
    assert out["failed"] == 1 and out["total"] == len(keep)


# --- hand-computed cases ------------------------------------------------------------------------


def _s(task, a, **fields):
    return {"task": task, "source": "hand", "idx": 0, "video": f"v{len(a)}", "a": a, **fields}


def test_span_parsing_rules():
    assert parse_spans("-5.0 - 3.0 seconds") == [[3.0, 5.0]]  # minus signs dropped
    assert parse_spans("00:00:35 to 00:00:41") == [[0.0, 35.0]]
    assert parse_spans("It starts at 37.7 seconds and ends at 62.2 seconds.") is None  # one sentence
    assert parse_spans("The event starts at 0.0s.\nIt ends at 7.3s.") == [[0.0, 7.0]]  # "7.3s" -> 7
    assert parse_spans("10 - 20, 30 - 25") == [[10.0, 20.0], [25.0, 30.0]]
    assert parse_spans("No idea.") is None and parse_spans("") is None
    assert parse_spans("1..5 - 3") is None  # the official float() would raise


def test_caption_parsing_rules():
    assert parse_captions("0.0 - 10.0 seconds, a man cuts onions. 10.0 - 20.0 seconds, he fries them.") == (
        [[0.0, 10.0], [10.0, 20.0]], ["a man cuts onions.", "he fries them."])
    assert parse_captions("start time 1.0, end time 5.0, someone is doing something") is None
    assert parse_captions("0:01 - 0:13: add flour") == ([[0.0, 1.0]], [":13: add flour"])
    # the fallback keeps one event; a lone time t > 20 becomes [t - 20, t + 20]
    assert parse_captions("At 30 seconds the man waves. At 50 seconds he sits.") == (
        [[10.0, 50.0]], ["the man waves."])
    assert parse_captions("Nothing happens in this video at all.") is None


def test_choice_and_highlight_parsing_rules():
    assert parse_choice("I think it is (D).", 4).index == 3
    assert parse_choice("Best option: (b", 4).index == 1
    assert parse_choice("", 4).empty and parse_choice("", 4).counted_failed
    z = parse_choice("(Z) something", 4)  # a letter outside the map: similarity, not Failed
    assert z.index is None and not z.counted_failed
    assert parse_choice("pouring water", 4).counted_failed
    assert parse_choice("B\n41.7 - 48.7", 4, task="gvq").index is None  # '\n' is no letter end
    assert parse_highlight("0:85") == 0.0 and parse_highlight("1e3") == 1.0 and parse_highlight("-0.50") == -0.5
    assert parse_highlight("none") is None


def test_choice_accuracy_by_hand(sim):
    opts = ["opening a door", "pouring water", "cutting bread", "tying shoes"]
    samples = [_s("rar", "(B)", p=1, o=opts), _s("rar", "c.", p=1, o=opts), _s("rar", "", p=1, o=opts),
               _s("rar", "The person is pouring water.", p=1, o=opts)]
    # hits: (B) and the similarity pick; Failed: the empty answer and the similarity pick
    assert score_choice(samples, sim) == {"Total": 4, "Failed": 2, "Acc": 0.5}


def test_float32_iou_at_0_7_misses_in_tvg_and_hits_in_tal():
    tvg = score_grounding([_s("tvg", "30 - 37", tgt=[30.0, 40.0])])
    assert tvg["mIoU"] == pytest.approx(0.7, abs=1e-6)
    assert tvg["F1@0.5"] == 1.0 and tvg["F1@0.7"] == 0.0 and tvg["F1"] == 0.75
    tal = score_localization([_s("tal", "30 - 37", tgt=[[30.0, 40.0]])])
    assert tal["F1@0.7"] == 1.0 and tal["F1"] == 1.0


def test_tal_f1_with_duplicates_and_misses():
    # GT 2 spans; predictions: one exact, its duplicate, one far away -> recall 1/2, precision 2/3
    tal = score_localization([_s("tal", "0 - 10, 0 - 10, 50 - 60", tgt=[[0.0, 10.0], [20.0, 30.0]]),
                              _s("tal", "nothing", tgt=[[0.0, 10.0]])])
    rec, prc = 0.5, 2 / 3
    assert tal["F1@0.5"] == pytest.approx(round(2 * prc * rec / (prc + rec) / 2, 5))
    assert tal["Failed"] == 1


def test_evs_slots_and_parsed_only_denominator():
    # GT [0, 10), prediction [5, 15): TP 5, FP 5, FN 5 -> F1 0.5; 2.5 and 3.5 round to 2 and 4
    evs = score_summarization([_s("evs", "5 - 15", tgt=[[0.0, 10.0]]), _s("evs", "zero", tgt=[[0.0, 10.0]]),
                               _s("evs", "2.5 - 3.5", tgt=[[2.0, 4.0]])])
    assert evs == {"Total": 3, "Failed": 1, "F1": 0.75}  # mean(0.5, 1.0) over the 2 parsed


def test_vhd_tem_gvq_by_hand(sim):
    vhd = score_highlight([_s("vhd", "12", tgt=[[10.0, 20.0]]), _s("vhd", "-3", tgt=[[0.0, 5.0]]),
                           _s("vhd", "none", tgt=[[0.0, 5.0]]), _s("vhd", "65", tgt=[[[0.0, 5.0]], [[60.0, 70.0]]])])
    assert vhd == {"Total": 4, "Failed": 1, "F1": 0.5}
    tem = score_recall([_s("tem", "70 - 80", tgt=[[10.0, 20.0], [70.0, 80.0]])])
    assert tem["mRec"] == 1.0 and tem["mIoU"] == 1.0
    opts = ["on the table", "in the drawer", "on the sofa", "in my pocket"]
    gvq = score_grounded_qa([_s("gvq", "B. 40 - 50", p=1, o=opts, tgt=[40.0, 50.0]),
                             _s("gvq", "C. 40 - 50", p=1, o=opts, tgt=[40.0, 50.0])], sim)
    assert gvq["Acc"] == 0.5 and gvq["mRec"] == 0.5 and gvq["Failed"] == 0  # a wrong answer's span is not counted


def test_captioning_by_hand(sim):
    gt = dict(tgt=[[0.0, 10.0], [10.0, 20.0]], g=["a man cuts onions", "he fries them"])
    exact = score_captioning([_s("dvc", "0 - 10 seconds, a man cuts onions. 10 - 20 seconds, he fries them.", **gt)],
                             sim)
    assert exact["F1"] == 1.0 and exact["SentSim"] == pytest.approx(1.0, abs=1e-5)
    assert exact["METEOR"] > 0.9 and exact["Bleu_1"] == pytest.approx(1.0, abs=1e-5)
    # a caption 100 s away matches no GT event: compared with random letters, or 0 in strict mode
    far = [_s("dvc", "100 - 110 seconds, a man cuts onions.", **gt), _s("dvc", "no events", **gt)]
    official, strict = score_captioning(far, sim), score_captioning(far, sim, mode="strict")
    assert official["F1"] == 0.0 and official["Failed"] == 1
    assert 0.0 < abs(official["SentSim"]) < 0.3 and strict["SentSim"] == 0.0


# --- bad input ----------------------------------------------------------------------------------


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unknown task 'xyz'; E.T. Bench tasks are \['rar'"):
        score_etbench([{"task": "xyz", "source": "s", "a": ""}])
    with pytest.raises(ValueError, match=r"sample tvg/s/3 \(#0\) lacks \['tgt'\]"):
        score_etbench([{"task": "tvg", "source": "s", "idx": 3, "a": "1 - 2"}])
    with pytest.raises(ValueError, match="answer 'a' must be a string"):
        score_etbench([{"task": "vhd", "source": "s", "idx": 0, "a": None, "tgt": [[0, 1]]}])
    with pytest.raises(ValueError, match="non-empty json list"):
        score_etbench({"task": "tvg"})
    with pytest.raises(ValueError, match=r"mode must be one of \['official', 'strict'\], got 'x'"):
        score_etbench([_s("vhd", "1", tgt=[[0, 1]])], mode="x")
    with pytest.raises(ValueError, match="3 options; E.T. Bench has 4 or 5"):
        score_choice([_s("rar", "A", p=0, o=["a", "b", "c"])])
    assert etbench.main(["--pred", str(tmp_path / "absent.json")]) == 2
    assert "absent.json" in capsys.readouterr().err
    (tmp_path / "p.json").write_text(json.dumps([{"task": "tvg", "a": "1 - 2"}]))
    (tmp_path / "gt.json").write_text(json.dumps([_s("tvg", "", tgt=[0, 1])]))
    assert etbench.main(["--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "p.json")]) == 2
    assert "prediction #0 needs 'task', 'source', 'idx' and 'a'" in capsys.readouterr().err
