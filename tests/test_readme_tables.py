"""README.md's generated tables are exactly what the stored results give (python -m moe_course.readme_tables)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_course import readme_tables

ROOT = Path(__file__).resolve().parents[1]


def test_readme_tables_match_the_stored_results():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in readme_tables.TABLES:
        assert f"<!-- generated: {name} -->" in text and f"<!-- end generated: {name} -->" in text, name
    assert readme_tables.render(text) == text, "run `python -m moe_course.readme_tables` and commit README.md"


def test_render_fills_a_block_and_refuses_an_unknown_one():
    filled = readme_tables.render("a\n<!-- generated: loss_free -->\nold\n<!-- end generated: loss_free -->\nb")
    assert filled.startswith("a\n<!-- generated: loss_free -->\n| run | MaxVio_global") and filled.endswith("b")
    assert "old" not in filled and "± " in filled
    with pytest.raises(ValueError, match="unknown generated block 'nope'"):
        readme_tables.render("<!-- generated: nope -->\nx\n<!-- end generated: nope -->")


def test_loss_free_table_uses_the_sample_std():
    from moe_course.experiments import load_result
    from moe_course.loss_free import final
    from moe_course.metrics import mean_std

    result = load_result("loss_free_06", "cpu")
    m, s = mean_std([final(r)["val_loss"] for r in result.records_of("no balancing")])
    table = readme_tables.loss_free_table()
    assert "| no balancing | " in table and f"{m:.3f} ± {s:.3f}" in table
