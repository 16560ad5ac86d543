"""A report of more than two arms (recipes/methods_faces32.gin has four): every arm is compared with scratch, in the
summary table, the cost-to-reach table, the matched-budget tables, the notes and the figure.

Synthetic run folders (tests/fixtures/synthetic_runs.py), each arm spending scratch's 100k FLOPs (and 0.1 h: a
step's seconds are 0.0036 x its FLOPs), one seed, bootstrap std 3% of the FID:

    scratch            train 1000 steps x 100 FLOPs, evals 250..1000: FID 100, 60, 40, 30
    maskdm_two_stage   pretrain 1000 x 20 (block4 87.5%, not evaluated), finetune 800 x 100: FID 40 @400, 20 @800
    maskdit_two_stage  pretrain 1000 x 50 (patch 50%, not evaluated), finetune 500 x 100: FID 45 @250, 31 @500
    curriculum         one masked stage, 1600 x 62.5: FID 70 @800, 45 @1600
"""
from __future__ import annotations

import math

import pytest
from fixtures.synthetic_runs import Z95, StageSpec, SyntheticExperiment

from harness.report import build_report, write_report
from harness.report_data import load_data
from harness.report_figures import curve_figure
from harness.report_render import to_markdown

ARMS = ["scratch", "maskdm_two_stage", "maskdit_two_stage", "curriculum"]
STD = 0.03  # the fixtures' bootstrap std, relative to the FID


def spec(arm, name, parent, steps, flops, **kw) -> StageSpec:
    return StageSpec([arm], name, parent, steps, 10, flops_per_step=flops, seconds_per_step=0.0036 * flops, **kw)


def four_arms(root) -> SyntheticExperiment:
    exp = SyntheticExperiment(root, "methods")
    scratch = exp.stage("scratch000000000", spec("scratch", "scratch", None, 1000, 100))
    for step, fid in ((250, 100), (500, 60), (750, 40), (1000, 30)):
        exp.evaluate(scratch, step, fid)
    exp.finish(scratch)
    for arm, prefix, mask, ratio, flops, steps, evals in (
            ("maskdm_two_stage", "maskdm", "block4", 0.875, 20, 800, ((400, 40), (800, 20))),
            ("maskdit_two_stage", "maskdit", "patch", 0.5, 50, 500, ((250, 45), (500, 31)))):
        pre = exp.stage(f"{prefix}pre".ljust(16, "0"), spec(arm, f"{prefix}_pretrain", None, 1000, flops, mask=mask,
                                                            mask_ratio=ratio))
        exp.finish(pre)
        fine = exp.stage(f"{prefix}fin".ljust(16, "0"), spec(arm, f"{prefix}_finetune", pre, steps, 100))
        for step, fid in evals:
            exp.evaluate(fine, step, fid)
        exp.finish(fine)
    curriculum = exp.stage("curriculum000000", spec("curriculum", "curriculum", None, 1600, 62.5, mask="block4",
                                                    mask_ratio=0.875))
    for step, fid in ((800, 70), (1600, 45)):
        exp.evaluate(curriculum, step, fid)
    exp.finish(curriculum)
    return exp


@pytest.fixture
def report(tmp_path):
    return build_report(load_data([four_arms(tmp_path).dir]), "t")


def test_every_arm_is_compared_with_scratch(tmp_path):
    data = load_data([four_arms(tmp_path).dir])
    assert data.reference == "scratch" and data.groups() == ARMS
    assert {g: data.reference_of(g) for g in ARMS} == dict.fromkeys(ARMS, "scratch")
    assert data.reference_groups() == ["scratch"]


def test_the_summary_has_a_row_and_a_verdict_for_every_arm(report):
    rows = {row[0]: row for row in report.summary.rows}
    assert list(rows) == ARMS
    assert rows["scratch"][-1].startswith("reference") and rows["scratch"][5] == "0.1 h (itself)"

    def interval(arm_fid, scratch_fid=30.0):
        half = Z95 * math.hypot(STD * arm_fid, STD * scratch_fid)
        d = arm_fid - scratch_fid
        return f"{d:+.2f} [{d - half:+.2f}, {d + half:+.2f}] ({d / scratch_fid:+.1%})"

    # each arm at scratch's full budget (0.1 h: every arm's own end) against scratch's final FID 30
    assert rows["maskdm_two_stage"][-1].startswith("maskdm_two_stage better (lower FID): " + interval(20.0))
    assert rows["maskdit_two_stage"][-1].startswith("within noise")
    assert interval(31.0) in rows["maskdit_two_stage"][-1]
    assert rows["curriculum"][-1].startswith("scratch better (lower FID): " + interval(45.0))
    # reaching scratch's final FID: maskdm between FID 40 at 0.06 h and 20 at 0.1 h, halfway in log cost
    assert rows["maskdm_two_stage"][5].startswith(f"{math.sqrt(0.06 * 0.1):.3g} h = {math.sqrt(0.6):.1%} [")
    assert rows["maskdit_two_stage"][5].startswith("not reached")
    assert rows["curriculum"][5] == "not reached (even within the evaluations' noise)"
    for arm in ARMS:
        assert rows[arm][4] == "0.1 h"  # matched budgets: every arm spent scratch's device-hours


def test_the_cost_to_reach_table_and_the_notes_name_every_arm(report):
    [table] = report.sections
    final = [row for row in table.rows if row[0] == "30.00 (scratch final)"]
    assert [row[1] for row in final] == ARMS
    assert final[0][table.columns.index("training FLOPs")] == "100k"  # scratch itself
    # one target per scratch evaluation, each with a row per arm
    assert len(table.rows) == 4 * len(ARMS)
    headlines = [line for line in report.notes if "scratch final FID (30.00)" in line]
    assert [line.split()[0] for line in headlines] == ARMS[1:]
    assert headlines[0].startswith(f"maskdm_two_stage reaches scratch final FID (30.00) at {math.sqrt(0.6):.1%}")
    assert headlines[1].startswith("maskdit_two_stage does not reach") and headlines[2].startswith(
        "curriculum does not reach")


def test_the_matched_budget_tables_compare_every_arm_at_every_level(report):
    steps, hours = (next(t for t in report.details if t.title == f"FID at equal {label}")
                    for label in ("total steps", "device-hours"))
    for table in (steps, hours):
        levels = list(dict.fromkeys(row[0] for row in table.rows))
        for level in levels:
            assert [row[2] for row in table.rows if row[0] == level] == ARMS
    at_full = {row[2]: row for row in hours.rows if row[0] == "0.1 h"}
    assert at_full["scratch"][-1] == "reference"
    assert at_full["maskdm_two_stage"][-1] == "maskdm_two_stage better (lower FID)"
    assert at_full["maskdit_two_stage"][-1].startswith("within noise")
    assert at_full["curriculum"][-1] == "scratch better (lower FID)"
    for arm in ARMS[1:]:
        assert any(line.startswith("Equal device-hours") and f": {arm} FID" in line for line in report.detail_lines)


def test_the_figure_draws_every_arm_with_its_boundary_and_reach(tmp_path):
    figure = curve_figure(load_data([four_arms(tmp_path).dir]), "fid", "flops")
    assert list(dict.fromkeys(s.group for s in figure.series)) == ARMS
    # the curriculum is one masked stage; the two-stage arms' evaluated stages are their unmasked ones
    assert {(s.group, s.stage, s.masked) for s in figure.series} == {
        ("scratch", "scratch", False), ("maskdm_two_stage", "maskdm_finetune", False),
        ("maskdit_two_stage", "maskdit_finetune", False), ("curriculum", "curriculum", True)}
    assert figure.boundaries == [("maskdm_two_stage", pytest.approx(20_000)),
                                 ("maskdit_two_stage", pytest.approx(50_000))]
    assert figure.target == 30.0 and figure.target_label == "scratch final FID"
    [(arm, cost)] = figure.reached
    assert arm == "maskdm_two_stage" and cost == pytest.approx(math.sqrt(60_000 * 100_000))
    assert [s.x[-1] for s in figure.series] == pytest.approx([100_000] * 4)  # matched FLOPs at every arm's end


def test_the_written_report_shows_every_arm(tmp_path):
    exp = four_arms(tmp_path)
    [html] = write_report(exp.dir, show=False)
    md = (exp.dir / "report.md").read_text()
    summary = md[md.index("## Summary"):md.index("## Cost to reach")]
    for arm in ARMS:
        assert f"| {arm} |" in summary
        assert arm in html.read_text()
    assert to_markdown(build_report(load_data([exp.dir]), "t")).count("| maskdit_two_stage |") >= 3
