"""README.md's notebook table and RESULTS.md are exactly what the stored results and notebooks give."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from moe_course.course import notebooks, readme_tables

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("page", readme_tables.PAGES, ids=lambda p: p.name)
def test_pages_match_the_stored_results(page):
    text = page.read_text(encoding="utf-8")
    assert readme_tables.render(text) == text, f"run `python -m moe_course.course.readme_tables` and commit {page.name}"


def test_every_block_appears_on_a_page():
    text = "".join(p.read_text(encoding="utf-8") for p in readme_tables.PAGES)
    for name in readme_tables.TABLES:
        assert f"<!-- generated: {name} -->" in text and f"<!-- end generated: {name} -->" in text, name


def test_results_page_types_no_number_by_hand():
    text = readme_tables.RESULTS.read_text(encoding="utf-8")
    prose = re.sub(r"<!-- generated: (\w+) -->.*?<!-- end generated: \1 -->", "", text, flags=re.S)
    prose = re.sub(r"`[^`]*`", "", prose)  # commands, file names, variables
    prose = re.sub(r"notebooks? \d\d", "", prose)  # which notebook
    prose = re.sub(r"\b[A-Za-z]+-?\d+\b", "", prose)  # names such as AVX2 and SHA-256
    assert not re.findall(r".{0,30}\d.{0,30}", prose), "RESULTS.md: a number outside a generated block"


def test_readme_lists_every_notebook_with_learner_and_run_time():
    table = readme_tables.notebook_table()
    for path in sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb")):
        row = next(line for line in table.splitlines() if f"[`{path.stem}`]" in line)
        assert f"about {readme_tables.learner_minutes(path)} min" in row
        assert f"notebooks/{path.name}" in row and "colab.research.google.com" in row


def test_learner_minutes_counts_reading_code_and_exercises(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("word " * 240),  # 2 minutes
        nbformat.v4.new_markdown_cell("### Exercise\n\n**Difficulty ★★☆, about 15 minutes.**"),
        nbformat.v4.new_code_cell("\n".join(f"x{i} = {i}" for i in range(30))),  # 2 minutes
        nbformat.v4.new_code_cell("#@title Setup\nimport sys\n" * 50),  # the setup cell is not read
    ])
    path = tmp_path / "01_x.ipynb"
    nbformat.write(nb, path)
    assert readme_tables.learner_minutes(path) == 20  # 2 + 2 + 15 (+ 4 words of the exercise) rounded up to 5


def test_record_time_keeps_one_entry_per_notebook(tmp_path):
    times = tmp_path / "times.json"
    notebooks.record_time(times, "01_a.ipynb", 12.34, 0.5)
    notebooks.record_time(times, "00_b.ipynb", 3.0, 1.25)
    notebooks.record_time(times, "01_a.ipynb", 10.0, 0.0)
    import json

    data = json.loads(times.read_text())
    assert list(data["notebooks"]) == ["00_b.ipynb", "01_a.ipynb"]
    assert data["notebooks"]["01_a.ipynb"] == {"seconds": 10.0, "load_1min": 0.0}
    assert data["environment"]["cpus"] >= 1


def test_render_fills_a_block_and_refuses_an_unknown_one():
    filled = readme_tables.render("a\n<!-- generated: loss_free -->\nold\n<!-- end generated: loss_free -->\nb")
    assert "| run | MaxVio_global" in filled and filled.endswith("b")
    assert "old" not in filled and "± " in filled
    with pytest.raises(ValueError, match="unknown generated block 'nope'"):
        readme_tables.render("<!-- generated: nope -->\nx\n<!-- end generated: nope -->")


def test_loss_free_table_reports_test_half_losses_and_paired_intervals():
    from moe_course.experiments import load_result
    from moe_course.loss_free import final
    from moe_course.metrics import mean_std, paired_gaps

    result = load_result("loss_free_06", "cpu")
    none = [final(r)["test_loss"] for r in result.records_of("no balancing")]
    bias = [final(r)["test_loss"] for r in result.records_of("loss-free u=0.001")]
    m, s = mean_std(none)
    table = readme_tables.loss_free_table()
    assert "| no balancing | " in table and f"{m:.3f} ± {s:.3f}" in table
    assert paired_gaps(none, bias).interval() in table  # the no-balancing row's gap to the bias
    assert "10 paired seeds" in table and "target 0.3" in table


def test_balancing_table_reads_every_experiment_of_notebook_04():
    from moe_course.experiments import load_result
    from moe_course.metrics import paired_gaps

    table = readme_tables.balancing_table()
    sweep = load_result("aux_sweep", "cpu")
    ref, worse = ([r.test_loss for r in sweep.records_of(label)] for label in ("alpha=0", "alpha=0.01"))
    pg = paired_gaps(ref, worse)
    assert "| 0.01 | " in table and f"{pg.interval()}: α = 0 better" in table
    for heading in ("**Collapse**", "**The router z-loss**", "**Routers**", "Expert choice sees the whole batch"):
        assert heading in table


def test_gap_cell_reads_the_interval_by_the_protocol():
    from moe_course.metrics import paired_gaps

    assert readme_tables._gap_cell(paired_gaps([2.0, 2.1, 2.2], [1.9, 2.0, 2.1]), "A", "B").endswith(": B better")
    assert readme_tables._gap_cell(paired_gaps([1.9, 2.0, 2.1], [2.0, 2.1, 2.2]), "A", "B").endswith(": A better")
    assert readme_tables._gap_cell(paired_gaps([2.0, 2.1, 2.2], [2.1, 2.0, 2.2]), "A", "B").endswith(
        ": none detected")


def test_fine_grained_table_reads_the_stored_result():
    from moe_course.experiments import load_result
    from moe_course.metrics import mean_std

    result = load_result("fine_grained", "cpu")
    m, s = mean_std([r.test_loss for r in result.records_of("GShard 8 top-2, none")])
    table = readme_tables.fine_grained_table()
    assert f"| none | {m:.3f} ± {s:.3f} |" in table
    assert "chosen on the tuning half" in table and "shared expert switched off" in table


def test_bench_profile_rows_put_the_multiplies_first_then_the_largest_extra_time():
    prof = {"dense": {"steps": 5, "ms_per_step": 20.0, "categories_ms": {"GEMM": 10.0, "norms": 1.0, "optimizer": 1.0}},
            "moe": {"steps": 5, "ms_per_step": 25.0,
                    "categories_ms": {"GEMM": 4.0, "grouped GEMM": 8.0, "routing": 2.0, "optimizer": 1.5,
                                      "norms": 0.96}},
            "best": {"steps": 5, "ms_per_step": 26.0, "categories_ms": {"GEMM": 6.0, "grouped GEMM": 7.0}}}
    lines = readme_tables._profile_lines(prof)
    rows = [line.split(" | ")[0].lstrip("| ") for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert rows == ["all matrix multiplies", *list(readme_tables.PROFILE_ROWS.values())[1:], "routing", "optimizer",
                    "norms"]
    assert "| all matrix multiplies | 10.0 ms | 12.0 ms | 13.0 ms | +2.0 ms | +3.0 ms |" in lines
    assert "| norms | 1.0 ms | 1.0 ms | 0.0 ms | +0.0 ms | -1.0 ms |" in lines  # -0.04 prints as +0.0, not -0.0
    assert "cpu-moe 25.0 ms" in lines[0] and "over 5 steps" in lines[0]


def test_bench_variant_lines_name_the_closest_layout_and_whether_any_meets_the_target():
    data = {"ratio_best": 1.14, "rows": {"moe": {"total": 1.9e6, "best_ms": 180.0}},
            "variants": {"a": {"total": 1e6, "best_ms": 178.0, "ratio_best": 1.12},
                         "b": {"total": 3e6, "best_ms": 175.0, "ratio_best": 1.11}}}
    assert readme_tables._variant_lines(data)[-1] == ("Closest to the dense twin: b at 1.11; none of the layouts "
                                                      "reaches 1.10.")
    data["variants"]["b"]["ratio_best"] = 1.09
    assert readme_tables._variant_lines(data)[-1].endswith("at 1.09; within 1.10: b.")


def test_bench_width_lines_list_the_widths_within_the_target():
    data = {"rows": {"dense": {"best_ms": 150.0}}, "ratio_best": 1.14, "recipe_ratio_best": 1.16,
            "widths": {"192": {"dense_ms": 270.0, "ratio_best": 1.09, "recipe_ratio_best": 1.13},
                       "256": {"dense_ms": 440.0, "ratio_best": 1.08, "recipe_ratio_best": 1.11}}}
    gpu = {"repeats": 4, "rows": {"dense": {"best_ms": 5738.6, "tokens": 8192}}, "ratio_best": 1.06,
           "recipe_ratio_best": 1.09}
    lines = readme_tables._width_lines(data, gpu)
    assert "| 128 (the cpu presets) | 150.0 ms | 1.14 | 1.16 |" in lines
    assert "| 384 (the gpu presets: 6 layers, 8,192 tokens a batch) | 5,738.6 ms | 1.06 | 1.09 |" in lines
    assert lines[-1].startswith("Within 1.10 of the dense twin: the top-2 MoE at d_model 192, 256 and 384, the "
                                "recipe at d_model 384.")
    assert "at none of these widths" in readme_tables._width_lines(data, None)[-1]  # the recipe, without gpu rows


def test_the_title_cell_states_the_same_learner_time_as_the_readme():
    """One source: the title's stamped line and the README's column both come from learner_minutes."""
    for path in sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb")):
        title = nbformat.read(path, as_version=4).cells[0].source
        stamped = [line for line in title.splitlines() if line.startswith(notebooks.LEARNER_TIME_PREFIX)]
        assert stamped == [f"{notebooks.LEARNER_TIME_PREFIX} about {readme_tables.learner_minutes(path)} minutes "
                           "to read the notebook and do its exercises (the course table in the README counts the "
                           "same way; running it comes on top)."], path.name
        assert not re.search(r"\bAbout \d+ minutes\b", title), f"{path.name}: a typed learner time in the title"


def test_stamp_learner_time_replaces_its_line_and_does_not_count_it(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# 01 · X\n\n" + "word " * 590)])
    assert notebooks.stamp_learner_time(nb) and nb.cells[0].source.endswith("about 5 minutes to read the notebook "
                                                                            "and do its exercises (the course table "
                                                                            "in the README counts the same way; "
                                                                            "running it comes on top).")
    assert not notebooks.stamp_learner_time(nb)  # stamping twice changes nothing: the line is not counted
    assert nb.cells[0].source.count(notebooks.LEARNER_TIME_PREFIX) == 1
