"""dinov2.eval.summary: one table of the three probes for the teacher beside the random-init baseline."""

import pytest
from eval_helpers import read_results

from dinov2.eval.summary import COLUMNS, main, summary_rows


def test_summary_table_teacher_beside_baseline(teacher_run, random_run, capsys):
    teacher_dir, _ = teacher_run
    random_dir, _ = random_run
    rows = summary_rows(str(teacher_dir), str(random_dir))
    # k-NN: test; linear: test; log-reg: val + test -> 4 datasets x 2 levels x (teacher, random init)
    assert len(rows) == 16
    assert [r[3] for r in rows[:2]] == ["teacher", "random init"]
    assert [tuple(r[:3]) for r in rows[::2]] == [
        ("knn", "test", "image"), ("knn", "test", "group"), ("linear", "test", "image"), ("linear", "test", "group"),
        ("log_regression", "val", "image"), ("log_regression", "val", "group"),
        ("log_regression", "test", "image"), ("log_regression", "test", "group"),
    ]
    knn = read_results(teacher_dir, "knn")
    entry = next(iter(knn["datasets"].values()))
    expected = ["n/a" if entry["image"][c] is None else f"{entry['image'][c]:.4f}" for c in COLUMNS]
    assert rows[0][7:] == expected and rows[0][4] == f"k={entry['settings']['k']}"
    assert main(["--eval-dir", str(teacher_dir), "--baseline-dir", str(random_dir)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 + 16 and lines[0].split(" | ")[0].strip() == "probe"


def test_summary_without_results_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="results_eval"):
        summary_rows(str(tmp_path))


def test_report_md_covers_every_probe(teacher_run):
    teacher_dir, _ = teacher_run
    report = (teacher_dir / "report.md").read_text()
    for probe in ("knn", "linear", "log_regression"):
        assert f"## {probe}" in report
    assert "| test | group |" in report and "(plots/linear_test_image.png)" in report
