"""The metrics, score and check-data subcommands, called through an argparse parser built here."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline.data.cli import add_subcommands
from tests.s3_server import FAKE_SECRET, s3_env, s3_server, upload_tree  # noqa: F401 (fixtures)
from tests.helpers import FILES, GOOD, MODALPROMPT_T10, ROOT, TEN, write_coin_layout

TASKS = ["ScienceQA", "TextVQA", "ImageNet", "GQA", "VizWiz", "Grounding", "VQAv2", "OCRVQA"]


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, Any, str]:
    """Parse ``argv`` like main.py does, run the subcommand, return (exit code, stdout JSON, stderr)."""
    parser = argparse.ArgumentParser(prog="main.py")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, json.loads(out), err


def write(path: Path, doc: Any) -> str:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


# ---- metrics --------------------------------------------------------------------------------


def test_metrics_full_matrix(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    matrix = write(tmp_path / "m.json", {"tasks": TASKS, "matrix": MODALPROMPT_T10["ModalPrompt"]})
    code, out, _ = run(capsys, "metrics", matrix)
    assert code == 0 and out["complete"] is True and out["T"] == 8
    assert out["last"] == pytest.approx(55.06, abs=0.01) and out["avg"] == pytest.approx(54.19, abs=0.01)
    assert out["B"] == pytest.approx(3.72, abs=0.01) and out["M"] == pytest.approx(56.10, abs=0.01)
    assert out["B_t"]["TextVQA"] == pytest.approx(6.55) and set(out["M_t"]) == set(TASKS[1:])
    assert out["last_per_task"]["OCRVQA"] == 59.68 and "fwt" not in out


def test_metrics_partial_matrix_with_isolation_and_nulls(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    doc = {"tasks": ["A", "B", "C"], "matrix": [[80, None, None], [60, 70, None]], "isolation": [70, 75, 85]}
    code, out, _ = run(capsys, "metrics", write(tmp_path / "m.json", doc))
    assert code == 0 and out["complete"] is False and out["tasks"] == ["A", "B"]
    assert out["last"] == 65 and out["avg_per_task"] == {"A": 60} and out["bwt"] == -10 and out["fwt"] == 2.5
    code, out, _ = run(capsys, "metrics", write(tmp_path / "one.json", {"tasks": ["A", "B"], "matrix": [[50]]}))
    assert code == 0 and "avg" not in out and "B" not in out and out["maa"] == 50


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"tasks": ["A"], "matrix": [[1], [2, 3]]}, "2 rows but only 1 tasks"),
        ({"tasks": ["A", "B"], "matrix": [[1, 2, 3]]}, "row 1 has 3 entries but there are 2 tasks"),
        ({"tasks": ["A", "B"], "matrix": [[1], [2]]}, "row 2 has 1 entries, needs 2"),
        ({"tasks": ["A", "B"], "matrix": [[1, 5], [2, 3]]}, "above the diagonal"),
        ({"tasks": ["A", "A"], "matrix": [[1]]}, "duplicate names"),
        ({"tasks": ["A", "B"], "matrix": [[1]], "isolation": [1]}, "one score per task (2)"),
        ({"matrix": [[1]]}, "'tasks' must be"),
        ("{not json", "invalid JSON"),
    ],
)
def test_metrics_invalid_files(tmp_path: Path, capsys: pytest.CaptureFixture, doc: Any, message: str) -> None:
    path = write(tmp_path / "bad.json", doc)
    code, out, _ = run(capsys, "metrics", path)
    assert code == 2 and path in out["error"] and message in out["error"]


# ---- score ----------------------------------------------------------------------------------


def _score_files(tmp_path: Path, lines: list[str]) -> tuple[str, str]:
    answers = write(tmp_path / "val.json", FILES["TextVQA/val.json"])
    predictions = tmp_path / "pred.jsonl"
    predictions.write_text("\n".join(lines) + "\n")
    return answers, str(predictions)


def test_score_textvqa(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # 102 listed first: matching is by question_id. 101: "Nike shoes" matches 3 of 10 -> 0.9
    # (the official leave-one-out average; 102: "8" against "7" -> 0).
    answers, preds = _score_files(tmp_path, ['{"question_id": 102, "text": "8"}', "", '{"question_id": 101, "text": "Nike shoes"}'])
    code, out, _ = run(capsys, "score", "--task", "TextVQA", "--answers", answers, "--predictions", preds)
    assert code == 0
    assert out == {"task": "TextVQA", "score": pytest.approx(45.0), "count": 2, "unparseable": 0}


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"question_id": 101, "text": "a"}', "{oops"], "pred.jsonl line 2: invalid JSON"),
        (['{"question_id": 101}'], "pred.jsonl line 1: field 'text'"),
        (['[1, 2]'], "pred.jsonl line 1: must be a JSON object"),
        (['{"question_id": 101, "text": "a"}', '{"question_id": "101", "text": "b"}'],
         "pred.jsonl line 2: duplicate question_id '101' (first on line 1)"),
        (['{"question_id": 101, "text": "a"}'], "missing predictions for question_ids '102'"),
    ],
)
def test_score_bad_predictions(tmp_path: Path, capsys: pytest.CaptureFixture, lines: list[str], message: str) -> None:
    answers, preds = _score_files(tmp_path, lines)
    code, out, _ = run(capsys, "score", "--task", "TextVQA", "--answers", answers, "--predictions", preds)
    assert code == 2 and message in out["error"]


def test_score_bad_ground_truth_names_record(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    answers = write(tmp_path / "test.json", [{"question_id": "r", "text": "Q", "answer_bbox": "[0, 1]", "size": [2, 2]}])
    preds = write(tmp_path / "p.jsonl", '{"question_id": "r", "text": "[0, 0, 1, 1]"}\n')
    code, out, _ = run(capsys, "score", "--task", "Grounding", "--answers", answers, "--predictions", preds)
    assert code == 2 and out["error"].startswith(f"{answers}: record 0 (id=r) field 'answer_bbox'")


# ---- check-data -----------------------------------------------------------------------------


def test_check_data_good_layout(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_coin_layout(tmp_path)
    code, out, err = run(capsys, "check-data", "--root", str(tmp_path), "--image-root", str(tmp_path / "images"),
                         "--tasks", "ScienceQA", "TextVQA", "Grounding", "--progress-every", "1")
    assert code == 0 and out["ok"] is True and out["bad_count"] == 0 and out["image_files"] == 6
    assert (out["records"], out["valid"]) == (9, 9)
    sqa = out["tasks"]["ScienceQA"]
    assert sqa["train"] | {"warnings": []} == {"file": str(tmp_path / "Instructions_Original/ScienceQA/train.json"),
                                                "records": 2, "valid": 2, "images": 2, "images_decoded": 2, "bad": [],
                                                "warnings": []}
    # sqa-2's free-text replies in a letter task are kept, with a warning each
    assert [(w["index"], w["id"], w["field"]) for w in sqa["train"]["warnings"]] == [
        (1, "sqa-2", "conversations[1].value"), (1, "sqa-2", "conversations[3].value")]
    assert out["warning_count"] == 2 and "not an option letter" in sqa["train"]["warnings"][0]["reason"]
    assert "check-data: 9 records, 9 valid, 0 bad, 2 warning(s)" in err
    assert out["tasks"]["TextVQA"]["test"]["images"] == 2
    assert "check-data: ScienceQA/train: 1/2 images decoded, 0 bad" in err
    assert "check-data: Grounding/test: 1/1 images decoded, 0 bad" in err


def test_check_data_reports_every_bad_record(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train = [GOOD, {**GOOD, "id": "two", "image": "bad/broken.png"}, {**GOOD, "id": "three", "image": "bad/broken.png"},
             {**GOOD, "id": "four", "image": "nope.png"}, 5]
    files = {"ScienceQA/train.json": train, "ScienceQA/test.json": FILES["ScienceQA/test.json"]}
    write_coin_layout(tmp_path, files)
    (tmp_path / "images" / "bad").mkdir()
    (tmp_path / "images" / "bad" / "broken.png").write_bytes(b"garbage")
    code, out, _ = run(capsys, "check-data", "--root", str(tmp_path), "--image-root", str(tmp_path / "images"),
                       "--tasks", "ScienceQA", "GQA")
    assert code == 1 and out["ok"] is False
    entry = out["tasks"]["ScienceQA"]["train"]
    assert (entry["records"], entry["valid"], entry["images_decoded"]) == (5, 1, 1)
    assert [(b["index"], b["id"], b["field"]) for b in entry["bad"]] == [
        (1, "two", "image"), (2, "three", "image"), (3, "four", "image"), (4, None, "(record)")]
    assert "cannot decode image 'bad/broken.png'" in entry["bad"][0]["reason"]
    assert out["tasks"]["ScienceQA"]["test"]["bad"] == []
    gqa = out["tasks"]["GQA"]["train"]["bad"]
    assert gqa[0]["reason"] == "file not found" and gqa[0]["file"].endswith("GQA/train.json")
    assert out["bad_count"] == 4 + 2  # GQA train and test are both missing


def test_check_data_unknown_task(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_coin_layout(tmp_path)
    code, out, _ = run(capsys, "check-data", "--root", str(tmp_path), "--tasks", "COCO", "--no-decode")
    assert code == 1 and "unknown task 'COCO'" in out["errors"][0]


def test_check_data_on_s3(tmp_path: Path, capsys: pytest.CaptureFixture, s3_env: str, s3_server: str) -> None:
    write_coin_layout(tmp_path)
    upload_tree(tmp_path, s3_env, "coin", s3_server)
    code, out, err = run(capsys, "check-data", "--root", f"s3://{s3_env}/coin", "--image-root", f"s3://{s3_env}/coin/images",
                         "--tasks", "ScienceQA", "Grounding")
    assert code == 0 and out["ok"] is True
    assert out["tasks"]["Grounding"]["test"]["file"] == f"s3://{s3_env}/coin/Instructions_Original/Grounding/test.json"
    assert out["tasks"]["ScienceQA"]["test"]["images_decoded"] == 2
    assert FAKE_SECRET not in json.dumps(out) + err


def _escaping_train(tmp_path: Path) -> list[dict]:
    """ScienceQA train records trying every way out of the image root (good ones first and last);
    on disk the root holds a link to a file and a link to a folder outside it."""
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    for name in ("secret.png", "dir/x.png"):
        (outside / name).write_bytes((tmp_path / "images" / "sqa" / "1.png").read_bytes())
    (tmp_path / "images" / "link.png").symlink_to(outside / "secret.png")
    (tmp_path / "images" / "linkdir").symlink_to(outside / "dir", target_is_directory=True)
    return [GOOD, {**GOOD, "id": "abs", "image": str(outside / "secret.png")},
            {**GOOD, "id": "up", "image": "../outside/secret.png"}, {**GOOD, "id": "filelink", "image": "link.png"},
            {**GOOD, "id": "dirlink", "image": "linkdir/x.png"}, {**GOOD, "id": "ok2", "image": "sqa/2.png"}]


def test_check_data_refuses_every_way_out_of_the_image_root(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_coin_layout(tmp_path)
    files = {"ScienceQA/train.json": _escaping_train(tmp_path), "ScienceQA/test.json": FILES["ScienceQA/test.json"]}
    write_coin_layout(tmp_path, files)
    code, out, err = run(capsys, "check-data", "--root", str(tmp_path), "--image-root", str(tmp_path / "images"),
                         "--tasks", "ScienceQA")
    assert code == 1 and out["ok"] is False and "Traceback" not in err
    entry = out["tasks"]["ScienceQA"]["train"]
    assert (entry["records"], entry["valid"], entry["images_decoded"]) == (6, 2, 2)
    assert [(b["index"], b["id"], b["field"]) for b in entry["bad"]] == [
        (1, "abs", "image"), (2, "up", "image"), (3, "filelink", "image"), (4, "dirlink", "image")]
    reasons = [b["reason"] for b in entry["bad"]]
    assert "absolute path" in reasons[0] and "contains '..'" in reasons[1]
    assert all("outside the image root" in r for r in reasons[2:])
    assert all(b["file"] == entry["file"] for b in entry["bad"])


def test_check_data_on_s3_refuses_keys_out_of_the_root(tmp_path: Path, capsys: pytest.CaptureFixture, s3_env: str,
                                                        s3_server: str) -> None:
    """An object store has no links, but absolute and '..' keys are refused the same way (the object
    the '..' key would reach exists, next to the image prefix)."""
    write_coin_layout(tmp_path)
    (tmp_path / "secret.png").write_bytes((tmp_path / "images" / "sqa" / "1.png").read_bytes())
    train = [GOOD, {**GOOD, "id": "up", "image": "../secret.png"}, {**GOOD, "id": "deep", "image": "sqa/../../secret.png"},
             {**GOOD, "id": "abs", "image": "/secret.png"}, {**GOOD, "id": "url", "image": f"s3://{s3_env}/coin/secret.png"}]
    write_coin_layout(tmp_path, {"ScienceQA/train.json": train, "ScienceQA/test.json": FILES["ScienceQA/test.json"]})
    upload_tree(tmp_path, s3_env, "coin", s3_server)
    code, out, err = run(capsys, "check-data", "--root", f"s3://{s3_env}/coin", "--image-root", f"s3://{s3_env}/coin/images",
                         "--tasks", "ScienceQA")
    assert code == 1 and out["image_files"] == 6
    entry = out["tasks"]["ScienceQA"]["train"]
    assert entry["valid"] == 1
    assert [(b["index"], b["id"], b["field"]) for b in entry["bad"]] == [
        (1, "up", "image"), (2, "deep", "image"), (3, "abs", "image"), (4, "url", "image")]
    assert entry["bad"][0]["file"] == f"s3://{s3_env}/coin/Instructions_Original/ScienceQA/train.json"
    assert FAKE_SECRET not in json.dumps(out) + err


def _turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]


def test_check_data_on_a_mixed_root_names_every_bad_record_and_counts_every_good_one(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Good records mixed with every bad kind (paths out of the root, answers that are empty, not in
    the task's format or out of range): exit 1, every bad record named, every good one counted,
    doubtful ones kept with a warning, no traceback (also through main.py in a subprocess)."""
    write_coin_layout(tmp_path)
    options = "Which?\nA. red\nB. blue\nC. green"
    sqa_train = _escaping_train(tmp_path)[:5] + [
        {**GOOD, "id": "empty", "conversations": _turns(options, "")},
        {**GOOD, "id": "range", "conversations": _turns(options, "D")},
        {**GOOD, "id": "free", "conversations": _turns(options, "It is red.")},  # a warning
        {**GOOD, "id": "ok2", "conversations": _turns(options, "B")},
    ]
    q = {"image": "sqa/1.png", "text": options}
    sqa_test = [{**q, "question_id": "q1", "answer": "A"}, {**q, "question_id": "word", "answer": "blue"},
                {**q, "question_id": "range", "answer": "E"}, {**q, "question_id": "empty", "answer": ""}]
    t = {"image": "text/a.png", "text": "What brand?"}
    text_test = [{**t, "question_id": 1, "answer": "nike", "answers": TEN},
                 {**t, "question_id": 2, "answer": "", "answers": [""] * 10},
                 {**t, "question_id": 3, "answer": "nike", "answers": ["nike"] * 3}]  # a warning
    g = {"image": "ref/g.png", "text": "Please provide the bounding box coordinate of the region this sentence describes: cat.",
         "size": [16, 12]}
    ground_test = [{**g, "question_id": "r1", "answer_bbox": "[0.1, 0.2, 0.5, 0.9]"},
                   {**g, "question_id": "big", "answer_bbox": "[0.1, 0.2, 1.5, 0.9]"},
                   {**g, "question_id": "flip", "answer_bbox": "[0.5, 0.2, 0.1, 0.9]"},
                   {**g, "question_id": "text", "answer_bbox": "the cat"}]
    ground_train = [FILES["Grounding/train.json"][0],
                    {"id": "g-2", "image": "ref/g.png", "conversations": _turns("Please ...: dog.", "[0.1, 0.2, 0.5, -0.9]")}]
    files = {"ScienceQA/train.json": sqa_train, "ScienceQA/test.json": sqa_test, "TextVQA/train.json": FILES["TextVQA/train.json"],
             "TextVQA/val.json": text_test, "Grounding/train.json": ground_train, "Grounding/test.json": ground_test}
    write_coin_layout(tmp_path, files)
    argv = ["check-data", "--root", str(tmp_path), "--image-root", str(tmp_path / "images"),
            "--tasks", "ScienceQA", "TextVQA", "Grounding", "--progress-every", "0"]
    code, out, err = run(capsys, *argv)
    assert code == 1 and out["ok"] is False and "Traceback" not in err
    tasks = out["tasks"]

    def named(task: str, split: str, key: str = "bad") -> list[tuple]:
        return [(b["index"], b["id"], b["field"]) for b in tasks[task][split][key]]

    assert named("ScienceQA", "train") == [(1, "abs", "image"), (2, "up", "image"), (3, "filelink", "image"),
                                           (4, "dirlink", "image"), (5, "empty", "conversations[1].value"),
                                           (6, "range", "conversations[1].value")]
    assert named("ScienceQA", "train", "warnings") == [(7, "free", "conversations[1].value")]
    assert named("ScienceQA", "test") == [(1, "word", "answer"), (2, "range", "answer"), (3, "empty", "answer")]
    assert named("TextVQA", "test") == [(1, "2", "answers")] and named("TextVQA", "test", "warnings") == [(2, "3", "answers")]
    assert named("Grounding", "train") == [(1, "g-2", "conversations[1].value")]
    assert named("Grounding", "test") == [(1, "big", "answer_bbox"), (2, "flip", "answer_bbox"), (3, "text", "answer_bbox")]
    valid = {(task, split): tasks[task][split]["valid"] for task in tasks for split in tasks[task]}
    assert valid == {("ScienceQA", "train"): 3, ("ScienceQA", "test"): 1, ("TextVQA", "train"): 1, ("TextVQA", "test"): 2,
                     ("Grounding", "train"): 1, ("Grounding", "test"): 1}
    assert (out["records"], out["valid"], out["bad_count"], out["warning_count"]) == (23, 9, 14, 2)
    every = [b for t in tasks.values() for sp in t.values() for b in sp["bad"]]
    assert all(b["file"].startswith(str(tmp_path / "Instructions_Original")) and b["reason"] for b in every)
    assert "check-data: 23 records, 9 valid, 14 bad, 2 warning(s) (exit 1)" in err

    proc = subprocess.run([sys.executable, "pipeline/main.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["bad_count"] == 14
