"""Notebook 11's recap (course_lib.lessons.recap): read runs and banners, name what is missing, never train."""

from __future__ import annotations

import json
from pathlib import Path

from course_lib.lessons import recap
from course_lib.lessons.inspect_llava import COURSE

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _summary(stage: str, train_type: str | None, trainable: int) -> dict:
    return {"stage": stage, "train_type": train_type, "steps": 10, "epochs": 1.0, "samples": 320, "tokens": 5000,
            "seconds": 12.345, "final_loss": 0.123456, "losses": [[5, 2.5], [10, 0.2]],
            "param_table": [{"module": "total", "total": 1000, "trainable": trainable, "frozen": 1000 - trainable}]}


def test_runs_table_reads_the_summaries_and_names_the_notebook_of_each_missing_run(tmp_path):
    for name, stage, train_type, trainable in (("pretrain", "pretrain", None, 25), ("finetune_none", "finetune", "none",
                                                                                     1000)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "training_summary.json").write_text(json.dumps(_summary(stage, train_type, trainable)))
    rows, missing = recap.runs_table(tmp_path)
    assert [r["run"] for r in rows] == ["pretrain", "finetune_none"]
    assert rows[0]["trainable"] == "2.50%" and rows[0]["train type"] == "-" and rows[0]["final loss"] == 0.1235
    assert rows[0]["first loss"] == 2.5
    assert rows[1]["trainable"] == "100.00%" and rows[1]["seconds"] == 12.3
    assert "finetune_use_lora: not trained yet; run notebook 05_finetune" in missing
    assert "finetune_freeze_vision_11_epochs: not trained yet; run notebook 06_compare_train_types" in missing
    assert len(rows) + len(missing) == len(recap.RUNS)
    assert not any(p.name.startswith("finetune_use_lora") for p in tmp_path.iterdir())  # nothing was trained


def test_scoreboard_reads_notebook_06s_file_or_names_it(tmp_path):
    assert recap.scoreboard(tmp_path) == ([], "compare_train_types.json: not written yet; run notebook "
                                              "06_compare_train_types")
    board = {"use_lora": {"accuracy": 0.5, "by_type": {"shape": {"accuracy": 0.75}, "color": {"accuracy": 0.25}},
                          "folder": "x"}}
    (tmp_path / "compare_train_types.json").write_text(json.dumps(board))
    rows, message = recap.scoreboard(tmp_path)
    assert message is None
    assert rows == [{"model": "use_lora", "overall": 50.0, "color": 25.0, "shape": 75.0}]


def test_course_recap_has_every_notebook_and_its_banner():
    rows = recap.course_recap(NOTEBOOKS)
    assert [r["notebook"] for r in rows] == [name for name, _, _ in COURSE]
    assert all(r["builds"] for r in rows)
    assert recap.banner(NOTEBOOKS / "00_orientation.ipynb")["Needs"].startswith("nothing but")
