"""Gin parsing: search paths, recipe + overrides -> one self-contained gin text, and friendly errors.

The launcher parses a recipe once and ships the flattened text (`gin.config_str()`, no includes left) to every
worker, which re-parses it with `parse_gin_text`. Gin bindings themselves never cross a process boundary.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util  # noqa: F401  (gin 0.5.0 uses importlib.util without importing it)
import logging
import re
import tokenize
from pathlib import Path
from typing import Any

import gin
from harness.errors import HarnessError

REPO_ROOT = Path(__file__).resolve().parent.parent
GIN_DIR = REPO_ROOT / "gin"
RECIPES_DIR = REPO_ROOT / "recipes"

# Modules whose import registers the configurables a recipe may name. Imported before any parse, so that
# a worker process knows every name the launcher knew.
CONFIGURABLE_MODULES = (
    "harness.masks",
    "harness.models.config",  # UViTConfig (the network, harness.models.uvit, needs torch)
    "harness.models.dit_config",  # DiTConfig (the network, harness.models.dit, needs torch)
    "harness.diffusion",
    "harness.sampling",
    "harness.data",
    "harness.evaluate",
    "harness.experiment",
    "harness.launch",
)


def register_configurables() -> None:
    for name in CONFIGURABLE_MODULES:
        importlib.import_module(name)


class _QuietIncludeProbe(logging.Filter):
    """gin logs 'Path not found' at ERROR for every search path it tries before the one that works."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Path not found")


@contextlib.contextmanager
def _quiet_gin_search():
    root, quiet = logging.getLogger(), _QuietIncludeProbe()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def _add_search_paths(extra: list[Path]) -> None:
    for path in [GIN_DIR, RECIPES_DIR, *extra]:
        if path.is_dir():
            gin.add_config_file_search_path(str(path))


def resolve_recipe(recipe: str | Path) -> Path:
    """A recipe given as a path, or by name under recipes/ (with or without `.gin`)."""
    candidates = [Path(recipe), RECIPES_DIR / recipe, RECIPES_DIR / f"{recipe}.gin"]
    for path in candidates:
        if path.is_file():
            return path
    shipped = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.gin")))
    raise HarnessError(f"recipe '{recipe}' not found (shipped recipes: {shipped})")


def _explain_gin_error(err: Exception, source: str) -> HarnessError:
    """Turn gin's exceptions into one line that names the file and line (gin puts them on later lines)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    message = " ".join(lines[:2]) if lines else type(err).__name__
    if isinstance(err, SyntaxError) and getattr(err, "filename", None) and str(err.filename) not in message:
        message = f"{err.filename}:{err.lineno}: {message}"
    elif isinstance(err, tokenize.TokenError) and len(err.args) == 2:  # ('EOF in multi-line statement', (3, 0))
        message = f"line {err.args[1][0]}: {err.args[0]}"
    hint = ""
    if "No configurable matching" in message:
        hint = " Check the spelling of the component's name."
    elif "doesn't have a parameter" in message:
        hint = " Check the parameter name against the component's signature."
    return HarnessError(f"bad gin config ({source}): {message}.{hint}")


def explain_missing_macro(err: TypeError) -> HarnessError | None:
    """gin reports an undefined `%MACRO` only when it is used, as a TypeError about `macro`; reword it."""
    found = re.search(r"configurable 'macro' .* in scope '([^']+)'", str(err))
    if not found:
        return None
    name = found.group(1)
    return HarnessError(f"the recipe uses macro %{name} but never defines it: set it in the recipe or pass "
                        f"--gin '{name} = <value>'")


def load_recipe(recipe: str | Path, bindings: list[str] | None = None) -> str:
    """Parse a recipe plus `--gin` overrides; return the flattened gin text every worker re-parses."""
    path = resolve_recipe(recipe)
    register_configurables()
    gin.clear_config()
    _add_search_paths([path.resolve().parent])
    try:
        with _quiet_gin_search():
            gin.parse_config_files_and_bindings([str(path)], bindings or [], finalize_config=False)
    except (ValueError, KeyError, TypeError, OSError, SyntaxError, tokenize.TokenError) as err:
        source = str(path) if not bindings else f"{path} + --gin overrides"
        raise _explain_gin_error(err, source) from err
    text = gin.config_str()
    check_required(text)
    check_overrides(bindings or [], text)
    return text


def check_required(text: str) -> None:
    """Refuse settings still at `%gin.REQUIRED` (an experiment layer's required macros, t5x style). gin checks
    them only when a config is finalized, which the harness does not do (recipes may bind later), and a run would
    otherwise get the bare sentinel object as the value."""
    missing = re.findall(r"^([\w./]+) = %gin\.REQUIRED$", text, flags=re.M)
    if missing:
        example = missing[0]
        raise HarnessError(f"the recipe must set {', '.join(missing)} (required by a file it includes): bind "
                           f"{'them' if len(missing) > 1 else 'it'} after that include, or pass "
                           f"--gin '{example} = <value>'")


def described_fields(spec: Any) -> list[dataclasses.Field]:
    """A dataclass spec's fields as descriptions show them: fields marked `metadata={"added_later": True}` are
    left out while at their defaults, so that specs which do not use them describe (and hash) as before."""
    return [f for f in dataclasses.fields(spec)
            if not (f.metadata.get("added_later") and getattr(spec, f.name) == f.default)]


def check_overrides(bindings: list[str], text: str) -> None:
    """A misspelt `--gin` override is valid gin that changes nothing, and a run would train the recipe as it is.
    Refuse a macro that the recipe never uses (`%NAME`) and a scope that no component runs in (`@scope/...`)."""
    used_macros = set(re.findall(r"%([A-Za-z_]\w*)", text))
    used_scopes = {part for ref in re.findall(r"@([\w./]+)/", text) for part in ref.split("/")}
    for binding in bindings:
        for line in binding.splitlines():
            key = line.split("=", 1)[0].strip() if "=" in line and not line[:1].isspace() else ""
            if not key or key.startswith("#"):
                continue
            if "." not in key and "/" not in key:
                if key not in used_macros:
                    raise HarnessError(f"--gin {line.strip()!r}: the recipe never uses macro %{key}, so this "
                                       f"changes nothing; check the name (macros it uses: "
                                       f"{', '.join(sorted(used_macros)) or 'none'})")
                continue
            for scope in key.rpartition("/")[0].split("/") if "/" in key else []:
                if scope not in used_scopes:
                    raise HarnessError(f"--gin {line.strip()!r}: no component runs in scope '{scope}', so this "
                                       f"changes nothing; check the name (scopes: "
                                       f"{', '.join(sorted(used_scopes)) or 'none'})")


# Annotation of a plain spec field -> the Python types a binding may give it (an int is a fine float).
_PLAIN_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
_EXAMPLES = {"int": "100", "float": "2e-4", "str": "'name'", "bool": "True", "tuple[float,float]": "(0.9, 0.99)"}


def check_field_types(spec: Any, owner: str) -> None:
    """gin passes values as written: refuse `steps = 'ten'` or `lr = '1e-4'` when the spec is made, not hours
    into a run. Checks the plain fields of a dataclass spec (int, float, str, bool, optional ones, a float pair);
    fields annotated otherwise (components) are left to their own specs."""
    for f in dataclasses.fields(spec):
        annotation = str(f.type).replace(" ", "")
        base = annotation.removesuffix("|None")
        value = getattr(spec, f.name)
        if value is None and base != annotation:
            continue
        if base in _PLAIN_TYPES:
            ok = isinstance(value, _PLAIN_TYPES[base]) and (base == "bool" or not isinstance(value, bool))
        elif base == "tuple[float,float]":
            ok = (isinstance(value, (list, tuple)) and len(value) == 2
                  and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
        else:
            continue
        if not ok:
            raise HarnessError(f"{owner}: {f.name} = {value!r} is not a valid {annotation.replace('|', ' | ')}; "
                               f"fix the binding (e.g. {type(spec).__name__}.{f.name} = {_EXAMPLES.get(base, '...')})")
        # `grad_clip = 1` and `grad_clip = 1.0` are one setting: store floats as floats, so that both spellings
        # describe (and hash to) the same stage
        if base == "float" and not isinstance(value, float):
            object.__setattr__(spec, f.name, float(value))
        elif base == "tuple[float,float]":
            object.__setattr__(spec, f.name, tuple(float(v) for v in value))


def parse_gin_text(text: str) -> None:
    """Re-parse a flattened gin text (from `load_recipe`) in this process, replacing any previous config."""
    register_configurables()
    gin.clear_config()
    try:
        gin.parse_config(text)
    except Exception as err:  # gin raises several types; the text came from us, so say so
        raise _explain_gin_error(err, "the gin text shipped to this worker") from err


def operative_config() -> str:
    """The bindings actually used so far in this process (written as config.gin in each run folder)."""
    return gin.operative_config_str()
