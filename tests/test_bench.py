"""fiberbench.bench: the plain-text table the CLI prints without --json."""
from __future__ import annotations

from fiberbench.bench import format_table


def _invariance_like() -> dict:
    """A result shaped like ``bench invariance --json`` (made-up numbers; metamer with JSON nulls)."""
    run = {"references": 12, "n": 8}
    return {
        "ndtm": {"recovery_auroc": 0.875, "rank_correlation": 0.6123, "pairs_estimated": 28,
                 "feature_match": 0.75, "validity": 0.9, "seconds_per_sample": 2.5,
                 "training_seconds": 0.0, "per_extractor": [{"extractor": "x"}], "table": [], "run": run},
        "metamer": {"recovery_auroc": None, "rank_correlation": None, "pairs_estimated": 0,
                    "feature_match": 0.88, "validity": 0.0, "seconds_per_sample": 0.19,
                    "training_seconds": 0.0, "run": run},
        "conditional": {"recovery_auroc": 1.0, "rank_correlation": 0.7, "pairs_estimated": 14,
                        "feature_match": 0.5, "validity": 0.95, "seconds_per_sample": 0.05,
                        "training_seconds": 1321.4, "run": run},
    }


def _row(text: str, method: str) -> list[str]:
    return next(line for line in text.splitlines() if line.split()[0] == method).split()


def test_format_table_has_invariance_columns():
    text = format_table(_invariance_like())
    header = text.splitlines()[0].split()
    assert header == ["method", "feature_match", "validity", "seconds_per_sample", "recovery_auroc",
                      "rank_correlation", "pairs_estimated", "training_seconds"]
    cols = {k: i for i, k in enumerate(header)}
    ndtm = _row(text, "ndtm")
    assert ndtm[cols["recovery_auroc"]] == "0.875"
    assert ndtm[cols["rank_correlation"]] == "0.612"
    assert ndtm[cols["pairs_estimated"]] == "28"
    assert ndtm[cols["training_seconds"]] == "0.000"
    cond = _row(text, "conditional")  # 11 characters: the name column widens instead of running into the numbers
    assert cond[0] == "conditional" and cond[cols["training_seconds"]] == "1321.400"
    assert cond[cols["recovery_auroc"]] == "1.000"
    metamer = _row(text, "metamer")  # JSON null (no valid sample) prints as '-'
    assert metamer[cols["recovery_auroc"]] == "-" and metamer[cols["rank_correlation"]] == "-"
    assert metamer[cols["validity"]] == "0.000"
    assert len(text.splitlines()) == 4


def test_format_table_quality_keeps_its_columns():
    out = {"ndtm": {"feature_match": 0.9, "validity": 0.5, "diversity": 0.3, "shape_kept": 1.0,
                    "color_changed": 0.7, "seconds_per_sample": 1.25, "overhead_vs_unguided": 12.0}}
    text = format_table(out)
    header = text.splitlines()[0].split()
    assert header == ["method", "feature_match", "validity", "diversity", "shape_kept", "color_changed",
                      "seconds_per_sample", "overhead_vs_unguided"]
    assert "recovery_auroc" not in text and "training_seconds" not in text
    assert _row(text, "ndtm")[header.index("overhead_vs_unguided")] == "12.000"


def test_format_table_perf_rows_print_as_dict():
    text = format_table({"ndtm": {"rows": [{"batch": 1, "steps": 25, "seconds_per_sample": 0.5}]}})
    assert "'batch': 1" in text and text.splitlines()[1].startswith("ndtm")
