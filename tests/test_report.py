"""The comparison report: matched-budget cells, relative change, pooled seeds, partial runs, files, CLI."""
from __future__ import annotations

import base64
import math
import re

import pytest
from fixtures.synthetic_runs import StageSpec, SyntheticExperiment, add_partial_arm, standard_experiment

from harness.cli import main as cli_main
from harness.report import build_report, write_report
from harness.report_data import budget_levels, load_data
from harness.report_format import fmt_relative
from harness.report_render import to_html
from harness.report_tables import final_table, matched_table, pooled_cell

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def evals_of(data, metric="fid"):
    return data.records[data.records.metric == metric].dropna(subset=["value"])


def rows_at(table, level: str, arm: str) -> list[str]:
    hit = [r for r in table.rows if r[0] == level and r[2].split(" (")[0] == arm]
    assert len(hit) == 1, table.rows
    return hit[0]


def test_relative_change_is_formatted_like_the_paper():
    assert fmt_relative(54.0, 100.0) == "-46.0%"
    assert fmt_relative(20.0, 30.0) == "-33.3%"
    assert fmt_relative(45.0, 30.0) == "+50.0%"
    assert fmt_relative(math.nan, 30.0) == "—"


def test_budget_levels_are_reference_evals_plus_each_final(tmp_path):
    data = load_data([standard_experiment(tmp_path).dir])
    levels = budget_levels(evals_of(data), ["scratch"], "device_hours")
    assert [x for x, _ in levels] == pytest.approx([0.025, 0.05, 0.07, 0.075, 0.1])
    assert levels[2][1] == ["two_stage final"]
    assert levels[4][1] == ["scratch eval", "scratch final"]


@pytest.mark.parametrize("column, level, stage_step, fid, spent", [
    ("device_hours", 0.05, "finetune@250", 40, 0.045),  # 0.045 h <= 0.05 h; 0.07 h is over
    ("device_hours", 0.025, "pretrain@1000", 200, 0.02),  # only the pretraining fits
    ("train_flops", 75_000, "finetune@500", 20, 70_000),
    ("images_seen", 10_000, "pretrain@1000", 200, 10_000),  # exactly at the level counts
    ("total_steps", 1_499, "finetune@250", 40, 1_250),
    ("total_steps", 1_000, "pretrain@1000", 200, 1_000),
])
def test_matched_budget_takes_the_eval_nearest_at_or_below(tmp_path, column, level, stage_step, fid, spent):
    data = load_data([standard_experiment(tmp_path).dir])
    cell = pooled_cell(data, evals_of(data), "two_stage", column, level, "kid")
    assert (cell.where, cell.mean, cell.n) == (stage_step, fid, 1)
    assert cell.budget == pytest.approx(spent)
    assert cell.second == pytest.approx(0.2 if fid == 200 else fid / 1000)


def test_no_eval_within_the_budget_is_an_empty_cell(tmp_path):
    data = load_data([standard_experiment(tmp_path).dir])
    cell = pooled_cell(data, evals_of(data), "two_stage", "total_steps", 750, None)
    assert cell.n == 0 and math.isnan(cell.mean)
    table, _ = matched_table(data, "fid", "steps")
    assert rows_at(table, "750", "two_stage")[3:] == ["—"] * 7


def test_matched_table_answers_which_arm_is_lower_and_by_how_much(tmp_path):
    data = load_data([standard_experiment(tmp_path).dir])
    table, conclusions = matched_table(data, "fid", "hours")
    row = rows_at(table, "0.075 h", "two_stage")
    # 20 ± 0.6 against 40 ± 1.2 (bootstrap stds): -20 ± 1.96 * sqrt(0.6² + 1.2²) = -20 ± 2.63
    assert row[3:] == ["finetune@500", "0.07 h", "20.00 ± 0.60", "0.0200", "1.7×", "-20.00 [-22.63, -17.37] (-50.0%)",
                       "two_stage better (lower FID)"]
    assert rows_at(table, "0.075 h", "scratch")[3:] == ["train@750", "0.075 h", "40.00 ± 1.20", "0.0400",
                                                        "3.3×, not converged", "—", "reference"]
    assert rows_at(table, "0.07 h", "scratch")[3:6] == ["train@500", "0.05 h", "60.00 ± 1.80"]
    assert any("scratch's full budget (0.1 h): two_stage FID 20.00 ± 0.60 vs scratch 30.00 ± 0.90: -10.00 "
               "[-12.12, -7.88] (-33.3%) -> two_stage better (lower FID) [scratch not yet converged (2.5× floor)]."
               in c for c in conclusions)
    assert any("two_stage's full budget (0.07 h)" in c and "(-66.7%)" in c for c in conclusions)


def test_final_table_includes_pretraining_cost(tmp_path):
    data = load_data([standard_experiment(tmp_path).dir])
    rows = {r[0]: r for r in final_table(data, "fid").rows}
    assert rows["two_stage"] == ["two_stage", "done", "finetune@500", "1,500", "15k", "70k", "0.07 h",
                                 "20.00 ± 0.60", "1.7×", "-33.3%"]
    assert rows["scratch"][-3:] == ["30.00 ± 0.90", "2.5×, not converged", "—"]


def test_seeds_of_one_arm_are_pooled_with_mean_std_and_count(tmp_path):
    sweep = tmp_path / "sweep"
    dirs = [standard_experiment(sweep, f"seed{s}", seed=s, fid_shift=2.0 * s).dir for s in (0, 1, 2)]
    data = load_data(dirs)
    assert sorted(set(data.records.group)) == ["scratch", "two_stage"]
    cell = pooled_cell(data, evals_of(data), "scratch", "device_hours", 0.1, None)
    assert (cell.mean, cell.n) == (32.0, 3)  # 30, 32, 34
    assert cell.std == pytest.approx(2.0)
    rows = {r[0]: r for r in final_table(data, "fid").rows}
    assert rows["two_stage"][7] == "22.00 ± 2.00 (n=3)"
    assert rows["two_stage"][9] == fmt_relative(22.0, 32.0)


def test_same_arm_with_another_config_is_not_pooled_as_a_seed(tmp_path):
    sweep = tmp_path / "sweep"
    a = standard_experiment(sweep, "a")
    b = SyntheticExperiment(sweep, "b")
    pre = b.stage("bpretrain0000000", StageSpec(["two_stage"], "pretrain", None, 1000, 10, mask="block4",
                                                mask_ratio=0.5))
    b.evaluate(pre, 1000, 90.0)
    data = load_data([a.dir, b.dir])
    groups = set(data.records.group)
    assert "scratch" in groups
    # the differing setting that matters most comes first in the label
    assert "two_stage [pretrain.mask_ratio=0.5]" in groups
    assert any(g.startswith("two_stage [pretrain.mask_ratio=0.875, finetune.") for g in groups)
    assert len(groups) == 3


def test_arms_that_differ_only_beyond_the_plan_summary_are_not_pooled_as_seeds(tmp_path):
    """E.g. a sweep over finetune/Stage.ema_decay: same steps, lr, mask, model and data, yet another model. The
    plan's full `config` tells them apart (and names the setting); two seeds of one config still pool."""
    sweep = tmp_path / "sweep"
    for name, seed, ema in (("a", 0, 0.999), ("b", 1, 0.999), ("c", 0, 0.9)):
        exp = SyntheticExperiment(sweep, name)
        sid = exp.stage(f"{name}finetune000000", StageSpec(["two_stage"], "finetune", None, 1000, 10, seed=seed,
                                                          config={"ema_decay": ema, "lr": 1e-4, "seed_free": 1}))
        exp.evaluate(sid, 1000, 20.0 + seed + (ema == 0.9) * 10)
        exp.finish(sid)
    data = load_data(sorted(sweep.iterdir()))
    assert set(data.records.group) == {"two_stage [finetune.ema_decay=0.9]", "two_stage [finetune.ema_decay=0.999]"}
    rows = {r[0]: r for r in final_table(data, "fid").rows}
    assert rows["two_stage [finetune.ema_decay=0.999]"][7] == "20.50 ± 0.71 (n=2)"  # the two seeds
    assert rows["two_stage [finetune.ema_decay=0.9]"][7] == "30.00 ± 0.90"


def test_the_evaluation_seed_is_a_seed_too(tmp_path):
    """recipes/mini_study.gin gives each point `EvalConfig.seed = %SEED` as well as `Stage.seed`: those runs are
    seeds of one arm, not arms of different configs; another evaluation setting still keeps arms apart."""
    sweep = tmp_path / "sweep"
    for name, seed, samples in (("a", 0, 250), ("b", 1, 250), ("c", 2, 500)):
        exp = SyntheticExperiment(sweep, name)
        sid = exp.stage(f"{name}scratch0000000", StageSpec(
            ["scratch"], "train", None, 1000, 10, seed=seed,
            config={"eval": {"type": "EvalConfig", "seed": seed, "num_samples": samples}}))
        exp.evaluate(sid, 1000, 30.0 + seed)
        exp.finish(sid)
    data = load_data(sorted(sweep.iterdir()))
    assert set(data.records.group) == {"scratch [train.eval.num_samples=250]", "scratch [train.eval.num_samples=500]"}
    rows = {r[0]: r for r in final_table(data, "fid").rows}
    assert rows["scratch [train.eval.num_samples=250]"][7] == "30.50 ± 0.71 (n=2)"


def test_real_plans_carry_the_full_stage_config_without_seed_or_run_options(tiny_recipe):
    from harness.config import load_recipe
    from harness.experiment import plan_from_gin

    load_recipe(tiny_recipe, ["Stage.compile = 'default'", "Stage.seed = 3", "finetune/Stage.ema_decay = 0.9"])
    stages = {s["name"]: s for s in plan_from_gin().to_json()["stages"].values()}
    config = stages["finetune"]["config"]
    assert config["ema_decay"] == 0.9 and stages["pretrain"]["config"]["ema_decay"] == 0.999  # the default
    assert config["diffusion"]["schedule"] == "cosine" and config["mask"]["type"] == "NoMask"
    assert not {"seed", "compile", "attention", "name"} & set(config) and stages["finetune"]["seed"] == 3


def test_a_final_level_holds_every_seeds_final_evaluation(tmp_path):
    """Two seeds of scratch whose steps cost 0.6 h and 0.8 h in all: at the level 'scratch final' both seeds'
    last evaluations are read (with a mean level of 0.7 h the costlier seed would fall back to step 500)."""
    sweep = tmp_path / "sweep"
    dirs = []
    for seed, seconds, fids in ((0, 2.16, (60, 41)), (1, 2.88, (62, 43))):
        exp = SyntheticExperiment(sweep, f"seed{seed}")
        sid = exp.stage(f"{seed:02d}scratch0000000", StageSpec(["scratch"], "train", None, 1000, 10, seed=seed,
                                                              seconds_per_step=seconds))
        for step, fid in zip((500, 1000), fids):
            exp.evaluate(sid, step, float(fid))
        exp.finish(sid)
        dirs.append(exp.dir)
    data = load_data(dirs)
    levels = dict((round(x, 6), sources) for x, sources in budget_levels(evals_of(data), ["scratch"], "device_hours"))
    assert levels[0.8] == ["scratch eval", "scratch final"] and 0.4 in levels  # the costlier seed's figures
    cell = pooled_cell(data, evals_of(data), "scratch", "device_hours", 0.8, None)
    assert (cell.mean, cell.n, cell.where) == (42.0, 2, "train@1000")


def test_an_arm_started_from_an_external_checkpoint_is_flagged(tmp_path):
    """Its pretraining happened elsewhere (e.g. a converted MaskDM release): the records cannot cost it, and the
    report must say that its budgets leave it out."""
    exp = standard_experiment(tmp_path)
    sid = exp.stage("mfinetune0000000", StageSpec(["maskdm"], "finetune", None, 500, 10,
                                                  config={"init_checkpoint": "ckpt/maskdm_celebahq256.pt"}))
    exp.evaluate(sid, 500, 15.0)
    exp.finish(sid)
    report = build_report(load_data([exp.dir]), "t")
    flagged = [line for line in report.notes if "external checkpoint" in line]
    assert flagged == ["Arm 'maskdm' starts from an external checkpoint (ckpt/maskdm_celebahq256.pt): what training "
                       "it cost is not in its budgets, so matched-budget comparisons flatter this arm."]


def test_partial_results_are_marked(tmp_path):
    exp = standard_experiment(tmp_path)
    pre, _ = add_partial_arm(exp)
    data = load_data([exp.dir])
    rows = {r[0]: r for r in final_table(data, "fid").rows}
    assert rows["mask50"][1] == "running" and rows["mask50"][2] == "pretrain@500"
    table, _ = matched_table(data, "fid", "hours")
    assert rows_at(table, "0.1 h", "mask50")[2] == "mask50 (running)"

    exp.fail(pre)
    data = load_data([exp.dir])
    assert {r[0]: r for r in final_table(data, "fid").rows}["mask50"][1] == "failed"
    table, _ = matched_table(data, "fid", "hours")
    assert rows_at(table, "0.1 h", "mask50")[2] == "mask50 (failed)"


def test_an_arm_without_evaluations_gets_dashes(tmp_path):
    exp = SyntheticExperiment(tmp_path, "fresh")
    exp.stage("onlypending00000", StageSpec(["baseline"], "train", None, 100, 4))
    data = load_data([exp.dir])
    assert data.reference == "baseline"  # no 'scratch' arm: the first arm is the reference
    report = build_report(data, "fresh")
    assert report.details[0].rows == [["baseline", "pending"] + ["—"] * 8]
    assert report.summary.rows == [["baseline", "pending", "—", "—", "—", "—", "no evaluation yet"]]
    assert "No 'fid' evaluations yet" in report.notes[0]


def test_html_is_self_contained_with_its_figures(tmp_path):
    exp = standard_experiment(tmp_path)
    add_partial_arm(exp)
    [html_path] = write_report(exp.dir, show=False)
    html = html_path.read_text()
    images = re.findall(r'<img(?: id="[^"]+")? alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', html)
    assert [name for name, _ in images] == ["fid_vs_cost.png", "fid_vs_flops.png", "fid_vs_images.png",
                                            "samples.png"]  # the lead figure (device-hours) first
    for name, data in images:
        png = base64.b64decode(data)
        assert png.startswith(PNG_MAGIC)
        assert (exp.dir / "figures" / name).read_bytes() == png
    assert "<td>-33.3%</td>" in html and "mask50 (running)" in html
    markdown = (exp.dir / "report.md").read_text()
    assert ("| 0.075 h | scratch eval | two_stage | finetune@500 | 0.07 h | 20.00 ± 0.60 | 0.0200 | 1.7× | "
            "-20.00 [-22.63, -17.37] (-50.0%) | two_stage better (lower FID) |") in markdown
    assert (exp.dir / "records.csv").is_file() and (exp.dir / "records.parquet").is_file()


def test_cli_reports_an_experiment_and_a_sweep(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for s in (0, 1):
        standard_experiment(sweep, f"seed{s}", seed=s, fid_shift=float(s))
    assert cli_main(["report", str(sweep / "seed0"), "--budget", "flops"]) == 0
    out = capsys.readouterr().out
    assert "FID at equal training FLOPs" in out and "-33.3%" in out
    assert "FID at equal device-hours" not in (sweep / "seed0" / "report.md").read_text()

    assert cli_main(["report", str(sweep), "--quiet"]) == 0
    for folder in (sweep / "seed0", sweep / "seed1", sweep):
        assert (folder / "report.html").is_file()
    assert "30.50 ± 0.71 (n=2)" in (sweep / "report.md").read_text()

    assert cli_main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_to_html_escapes_text(tmp_path):
    data = load_data([standard_experiment(tmp_path).dir])
    report = build_report(data, "<script>", budgets=["steps"])
    page = to_html(report)
    assert "<script>" not in page
    assert "<title>&lt;script&gt;" in page and "<h1>&lt;script&gt;" in page  # escaped, not dropped


def batch_size_sweep(root, points=((10, 30.0, 25.0), (20, 15.0, 20.0)), arms=("scratch", "two_stage")):
    """A sweep over a setting that reaches both arms (`--grid 'Stage.batch_size=[10,20]'`): each point has its
    own scratch run, with FIDs (batch, scratch final, two_stage final)."""
    dirs = []
    for bs, scratch_fid, two_stage_fid in points:
        exp = SyntheticExperiment(root, f"bs{bs}-{'+'.join(arms)}")
        if "scratch" in arms:
            s = exp.stage(f"{bs:02d}scratch0000000", StageSpec(["scratch"], "train", None, 1000, bs))
            exp.evaluate(s, 1000, scratch_fid)
            exp.finish(s)
        p = exp.stage(f"{bs:02d}pretrain000000", StageSpec(["two_stage"], "pretrain", None, 500, bs, mask="block4",
                                                           mask_ratio=0.875))
        exp.finish(p)
        f = exp.stage(f"{bs:02d}finetune000000", StageSpec(["two_stage"], "finetune", p, 500, bs))
        exp.evaluate(f, 500, two_stage_fid)
        exp.finish(f)
        dirs.append(exp.dir)
    return dirs


BS10, BS20 = "two_stage [pretrain.batch_size=10, finetune.batch_size=10]", \
    "two_stage [pretrain.batch_size=20, finetune.batch_size=20]"


def test_each_arm_is_compared_with_the_scratch_of_its_own_sweep_point(tmp_path):
    """At batch 20, two_stage FID 20 vs its own scratch's 15 is +33.3%, not -33.3% against batch 10's scratch."""
    data = load_data(batch_size_sweep(tmp_path / "sweep"))
    rows = {r[0]: r for r in final_table(data, "fid").rows}
    assert [rows[g][9] for g in (BS10, BS20, "scratch [train.batch_size=20]")] == ["-16.7%", "+33.3%", "—"]
    table, conclusions = matched_table(data, "fid", "steps")
    assert rows_at(table, "1,000", BS20)[-2:] == ["+5.00 [+3.53, +6.47] (+33.3%)",
                                                 "scratch [train.batch_size=20] better (lower FID)"]
    assert rows_at(table, "1,000", "scratch [train.batch_size=20]")[-2:] == ["—", "reference"]
    assert any(f"{BS20} FID 20.00 ± 0.60 vs scratch [train.batch_size=20] 15.00 ± 0.45: +5.00 [+3.53, +6.47] "
               "(+33.3%) -> scratch [train.batch_size=20] better (lower FID)" in c for c in conclusions)
    assert data.reference_of(BS20) == "scratch [train.batch_size=20]"
    assert not any(f"{BS20} FID" in c and "batch_size=10]" in c.split(" vs ")[1] for c in conclusions)


def test_an_arm_without_a_scratch_of_its_own_is_not_compared(tmp_path):
    """A batch-20 point run without its scratch arm: no other point's scratch stands in for it."""
    sweep = tmp_path / "sweep"
    data = load_data(batch_size_sweep(sweep, points=((10, 30.0, 25.0),))
                     + batch_size_sweep(sweep, points=((20, 0.0, 20.0),), arms=("two_stage",)))
    assert {r[0]: r for r in final_table(data, "fid").rows}[BS20][9] == "no match"
    table, conclusions = matched_table(data, "fid", "steps")
    assert rows_at(table, "1,000", BS20)[-2:] == ["no match", ""]
    assert rows_at(table, "1,000", BS10)[-2].endswith("(-16.7%)")
    assert not any(f"{BS20} FID" in c for c in conclusions)
    report = build_report(data, "t", budgets=["steps"])
    assert f"Arm '{BS20}' is not compared: none of its sweep points has a 'scratch' arm." in report.notes
    assert {r[0]: r for r in report.summary.rows}[BS20][-2:] == ["no match", "not compared (see notes)"]
    assert data.reference_of(BS20) is None


def test_an_arm_pooled_over_points_with_different_scratch_runs_is_not_compared(tmp_path):
    """A sweep over train/Stage.lr: two_stage is one run shared by both points, each with another scratch."""
    sweep = tmp_path / "sweep"
    dirs = []
    for lr, fid in ((1e-4, 30.0), (3e-4, 10.0)):
        exp = SyntheticExperiment(sweep, f"lr{lr}")
        s = exp.stage(f"{lr}scratch", StageSpec(["scratch"], "train", None, 1000, 10, config={"lr": lr}))
        exp.evaluate(s, 1000, fid)
        exp.finish(s)
        f = exp.stage("sharedfinetune00", StageSpec(["two_stage"], "finetune", None, 1000, 10, config={"lr": 1e-4}))
        exp.evaluate(f, 1000, 20.0)
        exp.finish(f)
        dirs.append(exp.dir)
    data = load_data(dirs)
    assert {r[0]: r for r in final_table(data, "fid").rows}["two_stage"][9] == "no match"
    report = build_report(data, "t", budgets=["steps"])
    assert not any("two_stage FID" in line for line in report.notes + report.detail_lines)
    assert data.references["two_stage"] == ["scratch [train.lr=0.0001]", "scratch [train.lr=0.0003]"]


def test_an_unfinished_scratch_is_flagged_and_its_last_evaluation_is_not_final(tmp_path):
    exp = SyntheticExperiment(tmp_path, "exp")
    s = exp.stage("00scratch0000000", StageSpec(["scratch"], "train", None, 1500, 10))
    for step, fid in ((250, 100.0), (500, 60.0)):  # running: evaluated up to step 500 of 1500
        exp.evaluate(s, step, fid)
    exp.log(s, 500, 0.3)
    p = exp.stage("00pretrain000000", StageSpec(["two_stage"], "pretrain", None, 1000, 10, mask="block4",
                                                mask_ratio=0.875))
    exp.evaluate(p, 500, 150.0)
    exp.finish(p)
    f = exp.stage("00finetune000000", StageSpec(["two_stage"], "finetune", p, 500, 10))
    exp.evaluate(f, 500, 45.0)
    exp.finish(f)
    data = load_data([exp.dir])
    table, conclusions = matched_table(data, "fid", "steps")
    assert rows_at(table, "500", "scratch")[1] == "scratch eval, scratch latest"
    assert conclusions == [
        "Equal total steps, scratch's latest evaluation (500): two_stage FID 150.00 ± 4.50 vs scratch 60.00 ± 1.80: "
        "+90.00 [+80.50, +99.50] (+150.0%) -> scratch better (lower FID) [scratch running; two_stage not yet "
        "converged (12× floor); scratch not yet converged (5× floor)].",
        "Equal total steps, two_stage's full budget (1,500): two_stage FID 45.00 ± 1.35 vs scratch 60.00 ± 1.80: "
        "-15.00 [-19.41, -10.59] (-25.0%) -> two_stage better (lower FID) [scratch running; two_stage not yet "
        "converged (3.8× floor); scratch not yet converged (5× floor)]."]
    report = build_report(data, "t")
    assert not any("scratch final" in line or "scratch's full budget" in line
                   for line in report.notes + report.detail_lines)
    assert any("scratch latest FID (60.00)" in line for line in report.notes)


def test_mask_ratios_with_the_same_actual_ratio_are_not_pooled_as_seeds(tmp_path):
    """MASK_RATIO 0.85 and 0.87 both mask 13 of 16 blocks (actual 0.8125): the plan summary's `mask` and
    `mask_ratio` agree, the requested ratio in the config does not."""
    sweep = tmp_path / "sweep"
    for seed, ratio in ((0, 0.85), (1, 0.87)):
        exp = SyntheticExperiment(sweep, f"mask{ratio}")
        sid = exp.stage(f"{seed}pretrain", StageSpec(
            ["two_stage"], "pretrain", None, 1000, 10, mask="block4", mask_ratio=0.8125, seed=seed,
            config={"steps": 1000, "mask": {"type": "BlockMask", "ratio": ratio, "block_size": 4}}))
        exp.evaluate(sid, 1000, 50.0 + seed)
        exp.finish(sid)
    data = load_data(sorted(sweep.iterdir()))
    assert set(data.records.group) == {"two_stage [pretrain.mask.ratio=0.85]", "two_stage [pretrain.mask.ratio=0.87]"}


def test_runs_with_the_same_seed_are_never_pooled_as_seeds(tmp_path):
    """Plans without `config` cannot show what differs, but two stage chains with one seed are two
    configurations: each gets its own label. A scratch run shared by both (same stage ids) stays one."""
    sweep = tmp_path / "sweep"
    for name in ("a", "b"):
        exp = SyntheticExperiment(sweep, name)
        s = exp.stage("00scratch0000000", StageSpec(["scratch"], "train", None, 1000, 10))
        exp.evaluate(s, 1000, 30.0)
        exp.finish(s)
        sid = exp.stage(f"{name}finetune", StageSpec(["two_stage"], "finetune", None, 1000, 10))
        exp.evaluate(sid, 1000, 20.0 if name == "a" else 40.0)
        exp.finish(sid)
    data = load_data(sorted(sweep.iterdir()))
    assert set(data.records.group) == {"scratch", "two_stage [experiment=a]", "two_stage [experiment=b]"}
    rows = {r[0]: r for r in final_table(data, "fid").rows}
    assert [rows[f"two_stage [experiment={n}]"][7:] for n in "ab"] == [
        ["20.00 ± 0.60", "1.7×", "-33.3%"], ["40.00 ± 1.20", "3.3×, not converged", "+33.3%"]]
