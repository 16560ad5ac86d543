"""Run folders -> one tidy pandas table: a row per (arm, stage, step, metric), with what it cost to get there.

The table is what the report (and anyone's own notebook) reads, so it carries everything needed to compare arms
at equal cost without opening the run folders again:

- identity: experiment, arm, stage (name), stage_id, parent_id, stage_index (0 for the first stage of the arm),
  stage_dir, status (done | running | failed | pending), seed, mask, mask_ratio;
- the measurement: step (within the stage), metric, value. Metrics come from eval.jsonl (torch-fidelity's long
  names shortened: fid, kid, kid_std, isc, precision, recall) and the stage's last logged training loss from
  metrics.jsonl (metric 'loss');
- the measurement's uncertainty and noise floor, from the same eval.jsonl row (NaN / empty in run folders
  evaluated before harness.evaluate recorded them): value_std (FID: fid_boot_std, the bootstrap std over
  generated and reference features; KID: kid_std), ci_low / ci_high (the 95% interval: fid_ci_*, kid_ci_*),
  floor (the metric between two disjoint real sets at the evaluation's counts: floor_fid, floor_kid,
  floor_precision, floor_recall), and the evaluation's n_samples, n_reference, floor_n_a, floor_n_b, floor_note
  (why the split was reduced, else empty), bootstrap_method, bootstrap_resamples;
- cost at that step, cumulative along the arm: total_steps, images_seen, tokens_seen, train_flops,
  device_hours, train_seconds. A fine-tuning stage adds its parent chain's final cost.json totals, because
  the fine-tuned model's cost includes its pretraining. (A stage started from an external checkpoint,
  Stage.init_checkpoint, has no such record to add: the report says so.) The stage-local numbers are the
  stage_* columns.

A stage with nothing to show yet (pending, failed early) still gets one row with metric and value empty, so a
report can mark it instead of silently dropping an arm. Reading is side-effect free and deterministic: collecting
twice gives the same table; a step evaluated twice (a resumed stage) keeps its last row only.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from harness.errors import HarnessError
from harness.fileio import atomic_write_bytes, read_jsonl
from harness.run_folder import COST_FILE, EVAL_FILE, METRICS_FILE, PLAN_FILE, load_plan, stage_status

RECORDS_PARQUET, RECORDS_CSV = "records.parquet", "records.csv"

# cost keys: stage-local in eval.jsonl / cost.json, cumulative along the arm in the table
COST_KEYS = ("images_seen", "tokens_seen", "train_flops", "device_hours", "train_seconds")
# torch-fidelity's metric names -> the short names used in the table and on the command line
METRIC_ALIASES = {
    "frechet_inception_distance": "fid",
    "kernel_inception_distance_mean": "kid",
    "kernel_inception_distance_std": "kid_std",
    "inception_score_mean": "isc",
    "inception_score_std": "isc_std",
}
# metric -> eval.jsonl keys of its spread: (std, 95% interval low, high); and of its noise floor
SPREAD_KEYS = {"fid": ("fid_boot_std", "fid_ci_low", "fid_ci_high"),
               "kid": ("kernel_inception_distance_std", "kid_ci_low", "kid_ci_high")}
FLOOR_KEYS = {"fid": "floor_fid", "kid": "floor_kid", "precision": "floor_precision", "recall": "floor_recall"}
# per-evaluation columns copied onto each of its metric rows as they are (numbers, except the two strings)
EVAL_INFO_KEYS = ("n_samples", "n_reference", "floor_n_a", "floor_n_b", "floor_note", "bootstrap_method",
                  "bootstrap_resamples")
_STRING_INFO = ("floor_note", "bootstrap_method")
# eval.jsonl keys that describe the evaluation rather than measure the model
_EVAL_CONTEXT_KEYS = {"step", "n_samples", "n_reference", "sampler", "sampler_steps", "eta", "reference", "seed",
                      "kid_subset_size", "sample_seconds", "score_seconds", "time", "steps", *COST_KEYS,
                      *EVAL_INFO_KEYS, *(k for keys in SPREAD_KEYS.values() for k in keys[1:]), "fid_boot_std",
                      *FLOOR_KEYS.values()}
UNCERTAINTY_COLUMNS = ["value_std", "ci_low", "ci_high", "floor", *EVAL_INFO_KEYS]

COLUMNS = [
    "experiment", "arm", "stage", "stage_id", "parent_id", "stage_index", "stage_dir", "status", "seed", "mask",
    "mask_ratio", "step", "metric", "value", *UNCERTAINTY_COLUMNS, "total_steps", *COST_KEYS,
    *(f"stage_{k}" for k in COST_KEYS),
]


def status_after_parent(status: str, parent_status: str | None) -> str:
    """A pending stage whose parent failed (or is itself blocked) is `blocked`: it cannot run until the parent is
    run again and finishes. Shared by the records (and so the report) and `harness status`."""
    return "blocked" if status == "pending" and parent_status in ("failed", "blocked") else status


def read_cost(stage_dir: Path) -> dict[str, Any] | None:
    path = stage_dir / COST_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a torn file cannot happen with atomic writes; treat an edited-by-hand one as absent


def _last_per_step(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per step (the last one written wins), in step order."""
    by_step: dict[int, dict[str, Any]] = {}
    for row in rows:
        if isinstance(row.get("step"), (int, float)):
            by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _metrics_of(row: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in row.items():
        if key not in _EVAL_CONTEXT_KEYS and _is_number(value):
            out[METRIC_ALIASES.get(key, key)] = float(value)
    return out


def _number(value: Any) -> float:
    return float(value) if _is_number(value) else math.nan  # JSON null or absent -> NaN (NaN itself stays)


def _uncertainty_of(metric: str, row: dict[str, Any]) -> dict[str, Any]:
    """The spread, interval and floor of `metric` in an eval.jsonl row, and the evaluation's counts (NaN / ''
    for what an older row lacks)."""
    std, low, high = SPREAD_KEYS.get(metric, (None, None, None))
    out: dict[str, Any] = {"value_std": _number(row.get(std)), "ci_low": _number(row.get(low)),
                           "ci_high": _number(row.get(high)), "floor": _number(row.get(FLOOR_KEYS.get(metric)))}
    for key in EVAL_INFO_KEYS:
        value = row.get(key)
        out[key] = (value if isinstance(value, str) else "") if key in _STRING_INFO else _number(value)
    return out


def _stage_cost_at(step: int, row: dict[str, Any], info: dict[str, Any], cost: dict[str, Any] | None) -> dict:
    """Stage-local cost after `step` steps: the row's own cost keys, else what cost.json lets us derive."""
    out = {k: float(row[k]) for k in COST_KEYS if _is_number(row.get(k))}
    if cost is not None and cost.get("steps") == step:  # the stage's final numbers
        out = {**{k: float(cost[k]) for k in COST_KEYS if _is_number(cost.get(k))}, **out}
    # images grow exactly linearly with the step; FLOPs and tokens too, when every step masks the same count
    # (under a mask-ratio schedule they do not: left unknown between the rows that record them)
    out.setdefault("images_seen", float(step * info.get("batch_size", math.nan)))
    fixed_mask = cost is not None and not cost.get("mask_schedule")
    if fixed_mask and _is_number(cost.get("flops_per_step")) and cost["flops_per_step"] > 0:
        out.setdefault("train_flops", float(step * cost["flops_per_step"]))
    if fixed_mask and cost.get("images_seen"):
        out.setdefault("tokens_seen", out["images_seen"] * cost["tokens_seen"] / cost["images_seen"])
    return {k: out.get(k, math.nan) for k in COST_KEYS}


def _final_totals(stage_dir: Path, info: dict[str, Any]) -> dict[str, float]:
    """What a finished stage cost in all (cost.json), plus its steps; NaN where unknown."""
    cost = read_cost(stage_dir) or {}
    totals = {k: float(cost[k]) if _is_number(cost.get(k)) else math.nan for k in COST_KEYS}
    totals["steps"] = float(cost.get("steps", info.get("steps", math.nan)))
    return totals


def _stage_rows(experiment_dir: Path, plan: dict, arm: str, sid: str, offset: dict[str, float]) -> list[dict]:
    info = plan["stages"][sid]
    stage_dir = experiment_dir / info["dir"]
    status = stage_status(stage_dir)
    cost = read_cost(stage_dir)
    base = {
        "experiment": plan.get("experiment", experiment_dir.name), "arm": arm, "stage": info["name"],
        "stage_id": sid, "parent_id": info.get("parent"), "stage_index": None, "stage_dir": info["dir"],
        "status": status, "seed": info.get("seed"), "mask": info.get("mask"), "mask_ratio": info.get("mask_ratio"),
    }
    measured: list[tuple[int, str, float, dict, dict]] = []
    evals = {int(row["step"]): row for row in _last_per_step(read_jsonl(stage_dir / EVAL_FILE))}
    for step, row in evals.items():
        local = _stage_cost_at(step, row, info, cost)
        measured += [(step, metric, value, local, _uncertainty_of(metric, row))
                     for metric, value in sorted(_metrics_of(row).items())]
    logged = _last_per_step(read_jsonl(stage_dir / METRICS_FILE))
    if logged and _is_number(logged[-1].get("loss")):
        step = int(logged[-1]["step"])
        local = _stage_cost_at(step, evals.get(step, {}), info, cost)
        measured.append((step, "loss", float(logged[-1]["loss"]), local, _uncertainty_of("loss", {})))

    rows = []
    for step, metric, value, local, spread in sorted(measured, key=lambda m: (m[0], m[1])):
        row = {**base, "step": step, "metric": metric, "value": value, **spread,
               "total_steps": offset["steps"] + step}
        row.update({k: offset[k] + local[k] for k in COST_KEYS})
        row.update({f"stage_{k}": local[k] for k in COST_KEYS})
        rows.append(row)
    if not rows:  # nothing measured yet: keep the stage visible with its status
        empty = {k: math.nan for k in COST_KEYS}
        rows.append({**base, "step": None, "metric": None, "value": math.nan, **_uncertainty_of("", {}),
                     "total_steps": None, **empty,
                     **{f"stage_{k}": math.nan for k in COST_KEYS}})
    return rows


def collect(experiment_dir: str | Path) -> pd.DataFrame:
    """The tidy table of one experiment folder (results/<experiment>), in plan order (arm, stage, step, metric)."""
    experiment_dir = Path(experiment_dir)
    plan = load_plan(experiment_dir)
    rows: list[dict] = []
    for arm, chain in plan["arms"].items():
        offset = {k: 0.0 for k in (*COST_KEYS, "steps")}
        parent_status = None
        for index, sid in enumerate(chain):
            if sid not in plan["stages"]:
                raise HarnessError(f"{experiment_dir / PLAN_FILE}: arm '{arm}' lists stage {sid} that the plan "
                                   "does not describe; rerun `harness run` to rewrite the plan")
            stage_rows = _stage_rows(experiment_dir, plan, arm, sid, offset)
            for row in stage_rows:
                row["stage_index"] = index
                row["status"] = status_after_parent(row["status"], parent_status)
            parent_status = stage_rows[0]["status"]
            rows += stage_rows
            totals = _final_totals(experiment_dir / plan["stages"][sid]["dir"], plan["stages"][sid])
            offset = {k: offset[k] + totals[k] for k in offset}
    return _typed(pd.DataFrame(rows, columns=COLUMNS))


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    """Stable dtypes, so that a table read back from parquet equals the collected one."""
    for col in ("step", "total_steps", "stage_index", "seed"):
        df[col] = pd.to_numeric(df[col]).astype("Int64")
    numeric = [c for c in UNCERTAINTY_COLUMNS if c not in _STRING_INFO]
    for col in ("value", "mask_ratio", *numeric, *COST_KEYS, *(f"stage_{k}" for k in COST_KEYS)):
        df[col] = pd.to_numeric(df[col]).astype("float64")
    for col in ("experiment", "arm", "stage", "stage_id", "parent_id", "stage_dir", "status", "mask", "metric",
                *_STRING_INFO):
        df[col] = df[col].astype("string")
    return df.reset_index(drop=True)


def write_records(experiment_dir: str | Path) -> pd.DataFrame:
    """Collect the experiment and (re)write records.parquet and records.csv atomically; returns the table."""
    df = collect(experiment_dir)
    write_table(df, experiment_dir)
    return df


def write_table(df: pd.DataFrame, folder: str | Path) -> None:
    """Write `df` as folder/records.parquet and folder/records.csv, each through a temp file and a rename."""
    buffer = io.BytesIO()
    df.to_parquet(buffer, index=False)
    atomic_write_bytes(Path(folder) / RECORDS_PARQUET, buffer.getvalue())
    atomic_write_bytes(Path(folder) / RECORDS_CSV, df.to_csv(index=False).encode())


def read_records(experiment_dir: str | Path) -> pd.DataFrame:
    """records.parquet as written by `write_records` (one written before the uncertainty columns gets them
    empty)."""
    df = pd.read_parquet(Path(experiment_dir) / RECORDS_PARQUET)
    for col in UNCERTAINTY_COLUMNS:
        if col not in df:
            df[col] = "" if col in _STRING_INFO else math.nan
    return _typed(df[[c for c in COLUMNS if c in df]])
