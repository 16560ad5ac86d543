"""The tidy results table: known cells from synthetic run folders, cumulative cost, status marking, idempotence."""
from __future__ import annotations

import math

import pandas as pd
import pytest
from fixtures.synthetic_runs import FLOOR_FID, FLOOR_KID, add_partial_arm, standard_experiment

from harness.errors import HarnessError
from harness.results import COLUMNS, UNCERTAINTY_COLUMNS, collect, read_records, write_records
from harness.run_folder import find_experiments


def cell(df: pd.DataFrame, arm: str, stage: str, step: int, metric: str) -> pd.Series:
    hit = df[(df.arm == arm) & (df.stage == stage) & (df.step == step) & (df.metric == metric)]
    assert len(hit) == 1, hit
    return hit.iloc[0]


def test_one_row_per_arm_stage_step_metric(tmp_path):
    df = collect(standard_experiment(tmp_path).dir)
    assert list(df.columns) == COLUMNS
    assert not df.duplicated(["arm", "stage_id", "step", "metric"]).any()
    # scratch: 4 evals x (fid, kid, kid_std) + final loss; two_stage: 1 + 2 evals x 3 + 2 final losses
    assert (df.arm == "scratch").sum() == 13
    assert (df.arm == "two_stage").sum() == 11
    assert set(df.metric) == {"fid", "kid", "kid_std", "loss"}  # the floor and intervals are columns, not metrics
    row = cell(df, "scratch", "train", 500, "fid")
    assert row.value == 60 and row.status == "done" and row["mask"] == "none" and row.seed == 0


def test_fine_tuned_arm_cost_includes_its_pretraining(tmp_path):
    df = collect(standard_experiment(tmp_path).dir)
    row = cell(df, "two_stage", "finetune", 250, "fid")
    assert row.value == 40 and row.stage_index == 1
    assert row.total_steps == 1000 + 250
    assert row.images_seen == 10_000 + 2_500
    assert row.tokens_seen == 1000 * 10 * 9 + 250 * 10 * 65  # 9 tokens/image masked, 65 unmasked
    assert row.train_flops == 1000 * 20 + 250 * 100
    assert row.train_seconds == pytest.approx(72 + 90)
    assert row.device_hours == pytest.approx(0.045)
    assert (row.stage_images_seen, row.stage_train_flops) == (2_500, 25_000)
    assert row.stage_device_hours == pytest.approx(0.025)
    pre = cell(df, "two_stage", "pretrain", 1000, "fid")
    assert (pre["mask"], pre.mask_ratio, pre.train_flops) == ("block4", 0.875, 20_000)
    assert pd.isna(pre.parent_id)
    assert cell(df, "two_stage", "finetune", 250, "fid").parent_id == pre.stage_id


def test_final_loss_row_takes_the_cost_from_cost_json(tmp_path):
    df = collect(standard_experiment(tmp_path).dir)
    row = cell(df, "two_stage", "finetune", 500, "loss")
    assert row.value == pytest.approx(0.1)
    assert row.device_hours == pytest.approx(0.07)
    assert row.train_flops == 70_000


def test_running_failed_and_pending_stages_are_marked_not_dropped(tmp_path):
    exp = standard_experiment(tmp_path)
    pre, fine = add_partial_arm(exp)
    df = collect(exp.dir)
    running = df[df.stage_id == pre]
    assert set(running.status) == {"running"}
    assert cell(df, "mask50", "pretrain", 500, "fid").value == 150
    loss = cell(df, "mask50", "pretrain", 500, "loss")
    # no cost.json yet: the cost at the eval of the same step
    assert loss.images_seen == 5000 and loss.device_hours == pytest.approx(0.025)
    pending = df[df.stage_id == fine]
    assert len(pending) == 1 and pending.iloc[0].status == "pending"
    assert pd.isna(pending.iloc[0].metric) and math.isnan(pending.iloc[0].value)

    exp.fail(pre)
    df = collect(exp.dir)
    assert set(df[df.stage_id == pre].status) == {"failed"}


def test_a_step_evaluated_twice_keeps_the_last_row(tmp_path):
    exp = standard_experiment(tmp_path)
    sid = exp.arms["scratch"][0]
    exp.evaluate(sid, 500, 55.0)  # a resumed stage evaluating step 500 again
    df = collect(exp.dir)
    assert cell(df, "scratch", "train", 500, "fid").value == 55
    assert len(df[(df.arm == "scratch") & (df.metric == "fid")]) == 4


def test_aggregating_twice_gives_the_same_table(tmp_path):
    exp = standard_experiment(tmp_path)
    add_partial_arm(exp)
    first = write_records(exp.dir)
    csv_first = (exp.dir / "records.csv").read_text()
    second = write_records(exp.dir)
    pd.testing.assert_frame_equal(first, second)
    pd.testing.assert_frame_equal(read_records(exp.dir), first)
    assert (exp.dir / "records.csv").read_text() == csv_first
    assert len(pd.read_csv(exp.dir / "records.csv")) == len(first)
    assert not [p for p in exp.dir.iterdir() if p.name.startswith(".")]  # no temp files left


def test_find_experiments_and_plan_errors(tmp_path):
    a = standard_experiment(tmp_path / "sweep", "a").dir
    b = standard_experiment(tmp_path / "sweep", "b").dir
    assert find_experiments(tmp_path / "sweep") == [a, b]
    assert find_experiments(a) == [a]
    with pytest.raises(HarnessError, match="no experiment"):
        find_experiments(tmp_path / "sweep" / "a" / "scratch")
    with pytest.raises(HarnessError, match="plan.json"):
        collect(tmp_path / "sweep")


def test_each_metric_row_carries_its_spread_interval_and_noise_floor(tmp_path):
    df = collect(standard_experiment(tmp_path).dir)
    fid = cell(df, "scratch", "train", 1000, "fid")
    assert fid.value == 30 and fid.value_std == pytest.approx(0.9)
    assert (fid.ci_low, fid.ci_high) == pytest.approx((30 - 1.96 * 0.9, 30 + 1.96 * 0.9), abs=1e-3)
    assert fid.floor == FLOOR_FID and (fid.floor_n_a, fid.floor_n_b, fid.n_reference) == (100, 400, 400)
    assert (fid.bootstrap_method, fid.bootstrap_resamples, fid.floor_note) == ("percentile-shifted", 200, "")
    kid = cell(df, "scratch", "train", 1000, "kid")
    assert kid.floor == FLOOR_KID and kid.value_std == pytest.approx(0.003)  # kid_std
    assert (kid.ci_low, kid.ci_high) == pytest.approx((0.024, 0.036))
    loss = cell(df, "scratch", "train", 1000, "loss")
    assert math.isnan(loss.floor) and math.isnan(loss.value_std)


def test_rows_without_uncertainty_keys_still_collect_with_empty_columns(tmp_path):
    """Run folders evaluated before the bootstrap and the floor existed; a NaN floor (not computed) reads NaN."""
    df = collect(standard_experiment(tmp_path, legacy=True).dir)
    fid = df[df.metric == "fid"]
    assert len(fid) == 7 and fid[["value_std", "ci_low", "ci_high", "floor"]].isna().all().all()
    assert set(fid.floor_note) == {""} and set(fid.bootstrap_method) == {""}
    exp = standard_experiment(tmp_path / "nan")
    exp.evaluate(exp.arms["scratch"][0], 1000, 30.0, floor_fid=float("nan"), floor_note="reduced split")
    row = cell(collect(exp.dir), "scratch", "train", 1000, "fid")
    assert math.isnan(row.floor) and row.floor_note == "reduced split"


def test_records_written_before_the_uncertainty_columns_read_back(tmp_path):
    exp = standard_experiment(tmp_path)
    df = write_records(exp.dir)
    df.drop(columns=UNCERTAINTY_COLUMNS).to_parquet(exp.dir / "records.parquet", index=False)
    old = read_records(exp.dir)
    assert list(old.columns) == COLUMNS and old.floor.isna().all() and len(old) == len(df)
