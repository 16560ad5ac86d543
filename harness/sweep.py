"""Sweeps: `--grid 'KEY=[v1, v2]'` options -> the cartesian product of points -> one experiment per point.

Each point's gin text is the recipe's flattened text plus the point's bindings plus a new experiment name
(`<recipe's name>-<key>=<value>-...`), so a point is an ordinary experiment that any worker can re-parse.
Stages that no grid binding reaches keep their id across points (e.g. the from-scratch baseline of a mask-ratio
sweep) and the launcher runs them once.

A sweep's points live in a folder of their own, `<results>/<recipe's name>-sweep-<hash>/` (with the sweep record,
sweep.json), so that `harness report` / `harness status` on it see that sweep only; running the same sweep again
reuses the folder (and resumes it). The hash covers the points and the stage ids they plan, see sweep_folder_name.
"""
from __future__ import annotations

import ast
import hashlib
import itertools
import json
import re
from dataclasses import dataclass

from harness.errors import HarnessError
from harness.launch.jobs import Variant

_KEY = re.compile(r"^[A-Za-z_][\w./]*$")


@dataclass
class Grid:
    key: str  # a gin binding target: a macro (MASK_RATIO) or a parameter (pretrain/BlockMask.ratio)
    values: list[str]  # gin value texts, e.g. '0.5', "'cosine'", '@BlockMask()'


@dataclass
class Point:
    bindings: list[tuple[str, str]]  # (key, gin value text), in grid order

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.bindings)

    def gin_lines(self) -> list[str]:
        return [f"{k} = {v}" for k, v in self.bindings]


def parse_grid(text: str) -> Grid:
    """'MASK_RATIO=[0.1,0.5]' or "MASK=['@PatchMask()', @BlockMask()]" -> a Grid."""
    example = "e.g. --grid 'MASK_RATIO=[0.1,0.5,0.9]'"
    key, sep, rhs = text.partition("=")
    key, rhs = key.strip(), rhs.strip()
    if not sep or not _KEY.match(key):
        raise HarnessError(f"--grid {text!r} is not KEY=[values] with KEY a gin macro or binding ({example})")
    if not (rhs.startswith("[") and rhs.endswith("]")):
        raise HarnessError(f"--grid {text!r}: the values must be a bracketed list ({example})")
    values = [_gin_value(item, text) for item in _split_top_level(rhs[1:-1])]
    if not values:
        raise HarnessError(f"--grid {text!r} has no values ({example})")
    if len(set(values)) != len(values):
        raise HarnessError(f"--grid {text!r} lists a value twice")
    return Grid(key=key, values=values)


def _split_top_level(body: str) -> list[str]:
    """Split on commas outside quotes and brackets."""
    items, depth, quote, current = [], 0, "", []
    for ch in body:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    last = "".join(current).strip()
    return [item for item in items + [last] if item]


def _gin_value(item: str, source: str) -> str:
    """One grid value as gin text. A quoted '@Ref()' or '%MACRO' becomes the reference itself."""
    if item.startswith(("@", "%")):
        return item
    try:
        value = ast.literal_eval(item)
    except (ValueError, SyntaxError) as err:
        raise HarnessError(f"--grid {source!r}: cannot read the value {item!r} (numbers, quoted strings, "
                           "True/False/None, lists, or gin references like @BlockMask())") from err
    if isinstance(value, str) and value.startswith(("@", "%")):
        return value
    return repr(value)


def grid_points(grids: list[Grid]) -> list[Point]:
    keys = [g.key for g in grids]
    if len(set(keys)) != len(keys):
        raise HarnessError(f"--grid keys repeat: {keys}; give each key once with all its values")
    return [Point(list(zip(keys, combo))) for combo in itertools.product(*(g.values for g in grids))]


def sweep_folder_name(sweep: list[SweepPoint]) -> str:
    """`<name>-sweep-<8 hex digits>`: a hash of the points and of every stage id they plan. The same sweep again
    (launcher settings may differ: they change no stage) reuses its folder and resumes; another grid, or `--gin`
    bindings or a recipe edit that change what trains, get a new folder (finished stages are linked there)."""
    blob = json.dumps({"points": [v.point.label for v in sweep],
                       "stages": sorted({sid for v in sweep for sid in v.plan.stages})}, separators=(",", ":"))
    return f"{sweep[0].base}-sweep-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def point_suffix(point: Point) -> str:
    """A folder-safe name for a point: 'mask_ratio=0.5-mask=BlockMask'."""
    parts = []
    for key, value in point.bindings:
        short = re.split(r"[./]", key)[-1].lower()
        clean = re.sub(r"[^A-Za-z0-9._+-]", "", value.replace("@", "").replace("()", "")) or "x"
        parts.append(f"{short}={clean}")
    return "-".join(parts)


@dataclass
class SweepPoint:
    """A grid point and the experiment it makes: `variant` is what the launcher takes (its label the point's)."""

    point: Point
    base: str  # the recipe's experiment name
    variant: Variant  # the point's gin text and plan; its experiment is <base>-<point suffix>

    @property
    def experiment(self) -> str:
        return self.variant.plan.experiment

    @property
    def plan(self) -> object:  # harness.experiment.Plan
        return self.variant.plan

    @property
    def gin_text(self) -> str:
        return self.variant.gin_text


def build_sweep(recipe: str, bindings: list[str], grids: list[Grid]) -> list[SweepPoint]:
    """One experiment variant per grid point (parses the recipe once, each point's text once more)."""
    from harness.config import load_recipe
    from harness.experiment import plan_from_gin

    if any(g.key in ("Experiment.name", "name") for g in grids):
        raise HarnessError("--grid cannot sweep Experiment.name: each point gets its own name already")
    base_text = load_recipe(recipe, bindings)
    points = grid_points(grids)
    for point in points:  # before any plan: a misspelt key plans fine and changes nothing
        check_point_bindings(point, _point_text(base_text, point, None))
    first = plan_from_gin(_point_text(base_text, points[0], None))
    variants, names, seen = [], set(), {}
    for point in points:
        name = f"{first.experiment}-{point_suffix(point)}"
        if name in names:  # two values that clean up to the same text
            name = f"{name}-{len(names)}"
        names.add(name)
        text = _point_text(base_text, point, name)
        plan = plan_from_gin(text)
        ids = tuple(sorted(plan.stages))
        if ids in seen:
            raise HarnessError(f"grid points {seen[ids]!r} and {point.label!r} give identical stages: does the "
                               "recipe use every --grid key? (an unused macro or binding changes nothing)")
        seen[ids] = point.label
        variants.append(SweepPoint(point=point, base=first.experiment,
                                   variant=Variant(gin_text=text, plan=plan, label=point.label)))
    return variants


def check_point_bindings(point: Point, text: str) -> None:
    """The `--gin` check (config.check_overrides) on a point's bindings: a macro the recipe never uses or a scope
    no component runs in changes nothing, which a one-value grid would not otherwise reveal."""
    from harness.config import check_overrides

    try:
        check_overrides(point.gin_lines(), text)
    except HarnessError as err:
        raise HarnessError(str(err).replace("--gin", "--grid", 1)) from None


def _point_text(base_text: str, point: Point, name: str | None) -> str:
    lines = [base_text.rstrip(), "", f"# sweep point: {point.label}", *point.gin_lines()]
    if name is not None:
        lines.append(f"Experiment.name = {name!r}")
    return "\n".join(lines) + "\n"
