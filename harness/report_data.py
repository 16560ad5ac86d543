"""The data a report is made of: the records of one or more experiments, each arm labelled with its *group*
(seeds of one configuration share a group), the reference arm each group is compared with, the runs' status,
and the selection rules for matched budgets (the evaluation nearest at or below a budget level; the levels).

Groups: arms with the same name and configuration but different seeds (sweep points) pool; an arm is labelled
by what differs otherwise ('two_stage [finetune.ema_decay=0.9]'); never two runs with the same seed.
"""
from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from harness.results import collect
from harness.run_folder import load_plan

# budget name -> (records column, label)
BUDGETS = {"steps": ("total_steps", "total steps"), "images": ("images_seen", "images seen"),
           "flops": ("train_flops", "training FLOPs"), "hours": ("device_hours", "device-hours")}
_LABEL_PRIORITY = ("mask_ratio", "mask", "steps", "batch_size", "lr", "model", "data")
_REL_TOL = 1e-9  # budgets equal up to float noise count as "at or below"


def _flatten(value: object, prefix: str) -> dict[str, object]:
    """{'a': {'b': 1}} -> {'prefix.a.b': 1}; lists and plain values are leaves."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, object] = {}
    for key, item in value.items():
        out.update(_flatten(item, f"{prefix}.{key}"))
    return out


def _arm_signature(plan: dict, arm: str) -> dict[str, object]:
    """The arm's stage chain as flat `stage.key -> value`, seeds (the stage's and its evaluation's) and ids left
    out (what seeds share): the plan's
    summary keys (short names for labels), then every setting of the stage's full config (plan.json's `config`;
    plans written before it had one compare on the summary alone) that the summary does not already hold."""
    flat: dict[str, object] = {}
    for sid in plan["arms"][arm]:
        stage = plan["stages"][sid]
        for key, value in stage.items():
            if key not in ("id", "parent", "arms", "dir", "seed", "config"):
                flat[f"{stage['name']}.{key}"] = json.dumps(value, sort_keys=True)
        for key, value in (stage.get("config") or {}).items():
            # steps, lr, model, data are there verbatim; the summary's `mask` is only a name (its ratio is the
            # actual one), so two masks of another requested ratio must be compared on the config
            if stage.get(key) != value:
                for flat_key, item in _flatten(value, f"{stage['name']}.{key}").items():
                    if flat_key == f"{stage['name']}.eval.seed":  # the evaluation's sampling seed is a seed too
                        continue
                    flat[flat_key] = json.dumps(item, sort_keys=True)
    return flat


def _label_rank(key: str) -> int:
    """Where `stage.setting[.field]` comes in a label: what a sweep usually varies first."""
    setting = key.split(".")[1]
    return _LABEL_PRIORITY.index(setting) if setting in _LABEL_PRIORITY else len(_LABEL_PRIORITY)


def _with_setting(label: str, setting: str) -> str:
    """'two_stage' -> 'two_stage [x]', 'two_stage [a=1]' -> 'two_stage [a=1, x]'."""
    return f"{label[:-1]}, {setting}]" if label.endswith("]") else f"{label} [{setting}]"


def _split_same_seeds(labels: dict[tuple[str, str], str], plans: dict[str, dict]) -> dict[tuple[str, str], str]:
    """A label over two different stage chains with the same seeds is not seeds of one arm, whatever the
    signatures show (e.g. plans written before `config`, which cannot tell such runs apart): name each member."""
    chains: dict[str, dict[tuple, set[tuple[str, ...]]]] = {}
    for (member, arm), label in labels.items():
        ids = tuple(plans[member]["arms"][arm])
        seeds = tuple(plans[member]["stages"][sid].get("seed") for sid in ids)
        chains.setdefault(label, {}).setdefault(seeds, set()).add(ids)  # identical ids: one run, not two
    clashing = {label for label, by_seeds in chains.items() if any(len(ids) > 1 for ids in by_seeds.values())}
    names = [Path(m).name for m in dict.fromkeys(m for m, _ in labels)]
    unique = len(set(names)) == len(names)  # else nested sweeps: the folder name alone could merge them again
    return {(member, arm): _with_setting(label, f"experiment={Path(member).name if unique else member}")
            if label in clashing else label for (member, arm), label in labels.items()}


def _group_labels(plans: dict[str, dict]) -> dict[tuple[str, str], str]:
    """(member, arm) -> arm label; equal labels are seeds of one arm. Same-named arms that differ in config get
    the differing settings appended, e.g. 'two_stage [pretrain.mask_ratio=0.5]'."""
    signatures = {(m, arm): _arm_signature(plan, arm) for m, plan in plans.items() for arm in plan["arms"]}
    labels = {}
    for (member, arm), sig in signatures.items():
        same_name = [s for (m, a), s in signatures.items() if a == arm]
        differing = [k for k in sig if len({s.get(k) for s in same_name}) > 1]
        if not differing:
            labels[(member, arm)] = arm
            continue
        differing.sort(key=_label_rank)  # stable: then the stage order of the arm
        shown = ", ".join(f"{k}={json.loads(sig[k])}" for k in differing[:2])
        labels[(member, arm)] = f"{arm} [{shown}{', ...' if len(differing) > 2 else ''}]"
    # a shortened label must not merge two different configurations: spell those out in full
    by_label: dict[str, set[str]] = {}
    for key, label in labels.items():
        by_label.setdefault(label, set()).add(json.dumps(signatures[key], sort_keys=True))
    for (member, arm), label in labels.items():
        if len(by_label[label]) > 1:
            sig = signatures[(member, arm)]
            labels[(member, arm)] = f"{arm} [" + ", ".join(f"{k}={json.loads(v)}" for k, v in sig.items()) + "]"
    return _split_same_seeds(labels, plans)


def _arm_status(stages: pd.DataFrame) -> str:
    statuses = set(stages.status)
    if statuses == {"done"}:
        return "done"
    for status in ("failed", "running"):
        if status in statuses:
            return status
    return "running" if "done" in statuses else "pending"


@dataclass
class Data:
    """Everything a report is made of: the records of its experiment(s) with a `group` label per arm."""

    records: pd.DataFrame  # with columns member, group
    reference: str  # the arm every other is compared with ('scratch', else the first arm)
    status: dict[str, list[str]]  # group -> status of each member
    stage_dirs: dict[tuple[str, str], Path]  # (member, stage_id) -> run folder
    # group -> the external checkpoints (Stage.init_checkpoint) its stages start from: work the records cannot cost
    external: dict[str, list[str]] = field(default_factory=dict)
    # group -> the reference arm's groups at its sweep points (a reference group: itself); one = comparable
    references: dict[str, list[str]] = field(default_factory=dict)

    def reference_of(self, group: str) -> str | None:
        """The reference group `group` is compared with, or None: no sweep point of it has the reference arm,
        or its sweep points have different ones (any choice would compare with another configuration)."""
        candidates = self.references.get(group, [])
        return candidates[0] if len(candidates) == 1 else None

    def reference_groups(self) -> list[str]:
        return [g for g, refs in self.references.items() if refs == [g]]

    def groups(self) -> list[str]:
        """Every arm label, in plan order."""
        return list(dict.fromkeys(self.records.group))

    def is_done(self, group: str) -> bool:
        return all(s == "done" for s in self.status[group])

    def end_label(self, group: str) -> str:
        """How a group's last evaluation is named: 'final' only once every run of it is done."""
        return f"{group} final" if self.is_done(group) else f"{group} latest"


def load_data(experiment_dirs: list[Path]) -> Data:
    frames, plans, stage_dirs = [], {}, {}
    for exp_dir in experiment_dirs:
        member = str(exp_dir)
        plans[member] = load_plan(exp_dir)
        frames.append(collect(exp_dir).assign(member=member))
        stage_dirs.update({(member, sid): exp_dir / s["dir"] for sid, s in plans[member]["stages"].items()})
    records = pd.concat(frames, ignore_index=True)
    labels = _group_labels(plans)
    records["group"] = [labels[(m, a)] for m, a in zip(records.member, records.arm)]
    # the same stages reached from two sweep points (identical ids, same seed) are one run, not two seeds
    seen, dropped = set(), set()
    for (group, member), rows in records.groupby(["group", "member"], sort=False):
        chain = (group, tuple(dict.fromkeys(rows.stage_id)))
        if chain in seen:
            dropped.add((group, member))
        seen.add(chain)
    keep = [(g, m) not in dropped for g, m in zip(records.group, records.member)]
    records = records[keep].reset_index(drop=True)
    groups = list(dict.fromkeys(records.group))
    reference = "scratch" if (records.arm == "scratch").any() else str(records.arm.iloc[0])
    status = {g: [_arm_status(d) for _, d in records[records.group == g].groupby("member", sort=False)]
              for g in groups}
    external: dict[str, list[str]] = {}
    for (member, arm), group in labels.items():
        for sid in plans[member]["arms"][arm]:
            path = (plans[member]["stages"][sid].get("config") or {}).get("init_checkpoint")
            if path and group in groups and path not in external.setdefault(group, []):
                external[group].append(path)
    return Data(records, reference, status, stage_dirs, {g: paths for g, paths in external.items() if paths},
                _references(labels, reference, groups))


def _references(labels: dict[tuple[str, str], str], reference: str, groups: list[str]) -> dict[str, list[str]]:
    """group -> the labels of the reference arm in the members (sweep points) holding it. Matching by member
    compares each variant with the scratch run of its own sweep point, e.g. batch 20 with batch 20; a scratch
    shared by several points (a mask sweep) carries one label there, so they all find it."""
    found: dict[str, list[str]] = {g: [] for g in groups}
    for (member, arm), group in labels.items():
        ref = group if arm == reference else labels.get((member, reference))
        if group in found and ref in groups and ref not in found[group]:
            found[group].append(ref)
    return found


def evals_of(data: Data, metric: str) -> pd.DataFrame:
    ev = data.records[data.records.metric == metric]
    return ev.dropna(subset=["value"])


def select_at(points: pd.DataFrame, column: str, level: float) -> pd.Series | None:
    """The evaluation nearest at or below `level` (the latest such one), or None."""
    below = points[points[column] <= level * (1 + _REL_TOL)]
    if below.empty:
        return None
    return below.sort_values([column, "total_steps"]).iloc[-1]


def last_evals(points: pd.DataFrame) -> list[pd.Series]:
    """The latest evaluation (by cumulative steps) of each member among `points`."""
    return [p.sort_values("total_steps").iloc[-1] for _, p in points.groupby("member", sort=False)]


def budget_levels(evals: pd.DataFrame, references: Collection[str], column: str,
                  unfinished: Collection[str] = ()) -> list[tuple[float, list[str]]]:
    """(level, where it comes from): the reference groups' evaluation points, then every arm's final one ('latest'
    for the `unfinished` groups: it is not their full budget). Seeds of an arm spend a little more or less device
    time for the same steps: a level is the costliest seed's figure, so that every seed's own evaluation at that
    point lies within it (with the mean, a seed above it would be read at its previous evaluation, or not at
    all)."""
    levels: dict[float, list[str]] = {}
    for reference in references:
        ref = evals[evals.group == reference].groupby(["stage_index", "step"])[column].max()
        for (_, step), x in ref.dropna().items():
            levels.setdefault(float(x), []).append(f"{reference} eval")
    for group, points in evals.groupby("group", sort=False):
        x = pd.Series([row[column] for row in last_evals(points)], dtype=float).max()
        if not pd.isna(x):
            levels.setdefault(float(x), []).append(f"{group} {'latest' if group in unfinished else 'final'}")
    merged: list[tuple[float, list[str]]] = []
    for x in sorted(levels):
        if merged and abs(x - merged[-1][0]) <= _REL_TOL * max(abs(x), 1.0):
            merged[-1][1].extend(levels[x])
        else:
            merged.append((x, levels[x]))
    return [(x, list(dict.fromkeys(sources))) for x, sources in merged]
