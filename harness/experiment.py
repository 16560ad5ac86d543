"""What a recipe declares (Experiment -> arms -> Stages) and the plan made from it.

A `Stage` is a gin-configurable dataclass holding plain values and component *specs* (mask, model, data,
diffusion, eval), never live modules, so a plan is cheap to build and every stage describes itself as plain
data. A stage's id hashes that description together with its parent's id: change anything upstream and every
stage below gets a new id (and a new run folder); declare the same stage in two arms and it runs once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gin
from harness.errors import HarnessError
from harness.run_folder import DONE_MARKER, PLAN_FILE

if TYPE_CHECKING:  # the component specs; imported for real inside Stage.__post_init__ (planning stays cheap)
    from harness.data import DataConfig
    from harness.diffusion import DiffusionConfig
    from harness.evaluate import EvalConfig
    from harness.masks import Mask, RatioSchedule
    from harness.models.config import UViTConfig
    from harness.models.dit_config import DiTConfig

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@=+,-]*$")


def check_name(name: str, what: str) -> str:
    """Names become folder names: refuse anything that could escape the results directory."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise HarnessError(f"{what} name {name!r} is not allowed: use letters, digits and _ . - = + , @ "
                           f"(no '/', no '..', not starting with a dot)")
    return name


# auto: bf16 autocast on a GPU, fp32 on a CPU; auto_fp16: fp16 autocast with loss scaling on a GPU (MaskDM's
# training), fp32 on a CPU (where fp16 autocast is slow); fp32 | bf16 | fp16 everywhere
PRECISIONS = ("auto", "auto_fp16", "fp32", "bf16", "fp16")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")  # torch.compile's modes, or off
# Which kernel computes attention (torch's SDPA backends); "auto" lets torch choose. On CPU: auto, flash or math.
ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
EMA_WARMUP_RULES = ("ratio", "ema_pytorch")  # see Stage.ema_warmup_rule
WEIGHT_DECAY_EXEMPT = ("vectors_and_embeddings", "none")  # see Stage.weight_decay_exempt
LR_SCHEDULES = ("constant", "cosine", "linear")  # see Stage.lr_schedule (update.lr_at)


@gin.configurable
@dataclass
class Stage:
    """One training stage: masked pretraining, fine-tuning or training from scratch.

    Defaults follow the MaskDM reference (AdamW betas (0.99, 0.99), weight decay 0.03, clip 1.0).
    Components left as None are built from gin's unscoped/scoped bindings of their class, so
    `pretrain/BlockMask.ratio = 0.9` or `UViTConfig.embed_dim = 512` reach the stage without naming it.
    """

    name: str = ""  # defaults to the gin scope (`pretrain/Stage` -> 'pretrain')
    steps: int = 1000
    batch_size: int = 64  # global batch: split across ranks, then into micro-batches
    micro_batch_size: int | None = None  # gradient accumulation when a device cannot hold the batch
    lr: float = 2e-4
    warmup_steps: int = 0
    weight_decay: float = 0.03
    betas: tuple[float, float] = (0.99, 0.99)
    grad_clip: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.999  # what nearly every MaskDM config uses (its LSUN church config: 0.9999)
    ema_warmup: bool = True  # ramp the decay up to ema_decay by `ema_warmup_rule`; False: ema_decay from step 0
    mask: Mask | None = None  # None = NoMask()
    model: UViTConfig | DiTConfig | None = None  # the backbone; None = UViTConfig()
    data: DataConfig | None = None  # None = DataConfig()
    diffusion: DiffusionConfig | None = None  # None = DiffusionConfig()
    eval: EvalConfig | None = None  # None: no FID
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | auto_fp16 (fp16 on GPU) | fp32 | bf16 | fp16
    compile: str = "off"  # torch.compile mode for training and sampling: off | default | reduce-overhead (CUDA
    # graphs: for small steps such as masked ones on a GPU) | max-autotune; the first steps compile
    attention: str = "auto"  # attention kernel for training and sampling: auto (torch's choice) | flash | cudnn |
    # efficient | math; the same mathematics, so it changes speed and the last bits only
    init_from: str = "raw"  # which weights of the parent stage to start from: raw | ema (MaskDM: raw)
    init_checkpoint: str | None = None  # start from an external checkpoint (e.g. converted MaskDM weights)
    nan_policy: str = "stop"  # stop | skip (skip the batch and go on)
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 50
    sample_every: int = 0  # 0: a sample grid at the end only
    num_sample_images: int = 16
    sample_steps: int = 50  # DDIM steps for the sample grids (FID uses eval's sampler)
    # Fields added later (docs/fidelity.md): left out of stage descriptions while at their defaults, so that
    # existing stage ids do not move; the defaults are the harness's behaviour before they existed.
    # 'ratio': min(ema_decay, (1 + s) / (10 + s)); 'ema_pytorch': copy the weights for the first 100 steps, then
    # min(ema_decay, 1 - (s - 99) ** (-2/3)) (MaskDM's ema-pytorch defaults; update.ema_decay_at)
    ema_warmup_rule: str = field(default="ratio", metadata={"added_later": True})
    # which parameters AdamW does not decay: 'vectors_and_embeddings' (biases, norms, position and class
    # embeddings) | 'none' (every parameter decayed, as MaskDM)
    weight_decay_exempt: str = field(default="vectors_and_embeddings", metadata={"added_later": True})
    # the learning rate after the warm-up: 'constant' (MaskDM) | 'cosine' | 'linear' decay to 0 at the last step
    lr_schedule: str = field(default="constant", metadata={"added_later": True})
    # the mask ratio as a function of the step: a masks.RatioSchedule (None: the mask's own, fixed ratio); the mask
    # then takes the ratio of step 0 (what the description and the plan show) and each step's in turn
    mask_schedule: RatioSchedule | None = field(default=None, metadata={"added_later": True})
    # TensorBoard event files in the stage folder (harness/tensorboard_events.py); a run option, not in the id
    tensorboard: bool = field(default=False, metadata={"added_later": True})

    def __post_init__(self) -> None:
        # Imported when a stage is made, so that importing this module stays cheap. None of these modules imports
        # torch: planning does not need it, and tests/test_planning.py keeps it so.
        from harness.config import check_field_types
        from harness.data import DataConfig
        from harness.diffusion import DiffusionConfig
        from harness.evaluate import EvalConfig
        from harness.masks import Mask, NoMask
        from harness.models.config import UViTConfig
        from harness.models.dit_config import DiTConfig

        if not self.name:
            self.name = gin.current_scope_str().split("/")[-1] or "train"
        check_name(self.name, "stage")
        check_field_types(self, f"stage '{self.name}'")
        self.mask = self.mask if self.mask is not None else NoMask()
        self.model = self.model if self.model is not None else UViTConfig()
        self.data = self.data if self.data is not None else DataConfig()
        self.diffusion = self.diffusion if self.diffusion is not None else DiffusionConfig()
        self.betas = tuple(self.betas)
        backbones = (UViTConfig, DiTConfig)  # the backbone specs a stage can train
        for key, kinds in (("mask", (Mask,)), ("model", backbones), ("data", (DataConfig,)),
                           ("diffusion", (DiffusionConfig,)), ("eval", (EvalConfig,))):
            value = getattr(self, key)
            if value is not None and not isinstance(value, kinds):
                names = " or ".join(kind.__name__ for kind in kinds)
                raise HarnessError(f"stage '{self.name}': {key} = {value!r} is not a {names}; bind it to one, "
                                   f"e.g. Stage.{key} = @{'BlockMask' if kinds[0] is Mask else kinds[0].__name__}()")
        for key, allowed in (("precision", PRECISIONS), ("init_from", ("raw", "ema")), ("compile", COMPILE_MODES),
                             ("attention", ATTENTION_BACKENDS), ("nan_policy", ("stop", "skip")),
                             ("ema_warmup_rule", EMA_WARMUP_RULES), ("weight_decay_exempt", WEIGHT_DECAY_EXEMPT),
                             ("lr_schedule", LR_SCHEDULES)):
            if getattr(self, key) not in allowed:
                raise HarnessError(f"stage '{self.name}': {key} = {getattr(self, key)!r}; use one of {allowed}")
        for key in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every"):
            if int(getattr(self, key)) < 1:
                raise HarnessError(f"stage '{self.name}': {key} must be at least 1, got {getattr(self, key)}")
        for key, ok, rule in (("lr", self.lr > 0, "must be positive"),
                              ("warmup_steps", self.warmup_steps >= 0, "must be 0 or more"),
                              ("weight_decay", self.weight_decay >= 0, "must be 0 or more"),
                              ("grad_clip", self.grad_clip >= 0, "must be 0 (off) or more"),
                              ("ema_decay", 0 <= self.ema_decay <= 1, "must be between 0 and 1"),
                              ("betas", all(0 <= b < 1 for b in self.betas), "must both be in [0, 1)"),
                              ("sample_every", self.sample_every >= 0, "must be 0 (at the end only) or more"),
                              ("num_sample_images", self.num_sample_images >= 0, "must be 0 (no grids) or more"),
                              ("sample_steps", self.sample_steps >= 1, "must be at least 1")):
            if not ok:
                raise HarnessError(f"stage '{self.name}': {key} = {getattr(self, key)!r} {rule}")
        backbone = type(self.model).__name__
        if self.data.latent is not None:  # the backbone sees the VAE's latents: their channels and grid size
            try:
                self.data.latent.check_backbone(self.data.resolution, self.model)
            except HarnessError as err:
                raise HarnessError(f"stage '{self.name}': {err}") from None
        elif self.data.resolution != self.model.img_size:  # else the first step fails, maybe after a long queue
            raise HarnessError(f"stage '{self.name}': DataConfig.resolution = {self.data.resolution} but "
                               f"{backbone}.img_size = {self.model.img_size}; make them equal")
        if self.model.num_classes > 0:  # the data carries no labels: the class embedding would never be trained
            raise HarnessError(f"stage '{self.name}': {backbone}.num_classes = {self.model.num_classes}, but "
                               "training takes no class labels; set it to 0 (class-conditional models can be "
                               "converted, not trained)")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise HarnessError(f"stage '{self.name}': micro_batch_size must be at least 1 (or None), got "
                               f"{self.micro_batch_size}")
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise HarnessError(f"stage '{self.name}': micro_batch_size {self.micro_batch_size} must divide "
                               f"batch_size {self.batch_size}")
        self.mask.validate(self.model.grid)
        if self.mask_schedule is not None:
            from harness.masks import RatioSchedule

            if not isinstance(self.mask_schedule, RatioSchedule):
                raise HarnessError(f"stage '{self.name}': mask_schedule = {self.mask_schedule!r} is not a "
                                   "RatioSchedule; bind it to one, e.g. Stage.mask_schedule = @RatioSchedule()")
            try:
                self.mask_schedule.check(self.mask, self.model.grid, self.steps)
            except HarnessError as err:
                raise HarnessError(f"stage '{self.name}': {err}") from None
            self.mask = self.mask_schedule.mask_at(self.mask, 0, self.steps)
        try:  # MaskDiT's reconstruction weight needs a decoder that predicts masked patches, and a mask
            self.diffusion.check_backbone(self.model, masked=not isinstance(self.mask, NoMask))
        except HarnessError as err:
            raise HarnessError(f"stage '{self.name}': {err}") from None
        # Samplers meet the schedule only at the first sample grid or evaluation, maybe hours in: check now.
        if self.num_sample_images > 0 and self.sample_steps > self.diffusion.timesteps:
            raise HarnessError(f"stage '{self.name}': sample_steps = {self.sample_steps} is more than the "
                               f"diffusion's {self.diffusion.timesteps} timesteps; lower it")
        if self.eval is not None:
            try:
                self.eval.sampler.time_pairs(self.diffusion.timesteps)
            except HarnessError as err:
                raise HarnessError(f"stage '{self.name}', EvalConfig.sampler: {err}") from None

    def describe(self) -> dict[str, Any]:
        """The stage as plain data: what its id hashes and what stage.json records."""
        return _plain(self)


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {"type": type(obj).__name__}
        # Fields added after the first release stay out at their defaults: stages keep their ids and folders.
        from harness.config import described_fields

        out.update({f.name: _plain(getattr(obj, f.name)) for f in described_fields(obj)})
        return out
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise HarnessError(f"cannot describe {obj!r} in a stage: components must be gin-configurable dataclasses")


@gin.configurable
@dataclass
class Experiment:
    """A named comparison: arms, each a list of stages trained one after another (each from its parent)."""

    name: str = gin.REQUIRED
    arms: dict[str, list[Stage]] = gin.REQUIRED

    def __post_init__(self) -> None:
        check_name(self.name, "experiment")
        if not isinstance(self.arms, dict) or not self.arms:
            raise HarnessError(f"experiment '{self.name}' declares no arms: set Experiment.arms = "
                               "{'scratch': [@finetune/Stage()], 'two_stage': [@pretrain/Stage(), ...]}")
        for arm, stages in self.arms.items():
            check_name(arm, "arm")
            if not isinstance(stages, (list, tuple)) or not stages:
                raise HarnessError(f"arm '{arm}' of experiment '{self.name}' has no stages")
            for stage in stages:
                if not isinstance(stage, Stage):
                    raise HarnessError(f"arm '{arm}' lists {stage!r}; arms hold stages, e.g. @pretrain/Stage()")


@dataclass
class PlannedStage:
    """A stage placed in the plan: its id, parent, arms sharing it and its folder."""

    id: str
    name: str
    parent: str | None
    arms: list[str]
    dir: str  # relative to <results_dir>/<experiment>
    depth: int  # 0 for a stage without parent
    spec: Stage = field(repr=False)

    def summary(self) -> dict[str, Any]:
        s = self.spec
        return {
            "id": self.id, "name": self.name, "parent": self.parent, "arms": self.arms, "dir": self.dir,
            "depth": self.depth, "steps": s.steps, "batch_size": s.batch_size, "lr": s.lr, "seed": s.seed,
            "mask": s.mask.name, "mask_ratio": s.mask.actual_ratio(s.model.grid) if s.mask_schedule is None
            else s.mask_schedule.mean_actual_ratio(s.mask, s.model.grid, s.steps),  # a schedule: its mean
            "model": _plain(s.model), "data": _plain(s.data),
            # everything else that the stage trains with: the report pools seeds only where all of it agrees
            "config": {k: v for k, v in s.describe().items() if k not in ("type", "name", "seed", *RUN_OPTIONS)},
        }


@dataclass
class Plan:
    experiment: str
    stages: dict[str, PlannedStage]  # parents before children
    arms: dict[str, list[str]]

    def stage_dir(self, results_dir: str | Path, stage_id: str) -> Path:
        return Path(results_dir) / self.experiment / self.stages[stage_id].dir

    def is_done(self, results_dir: str | Path, stage_id: str) -> bool:
        return (self.stage_dir(results_dir, stage_id) / DONE_MARKER).is_file()

    def data_problems(self, results_dir: str | Path, stage_ids: list[str] | None = None) -> list[str]:
        """What keeps the (selected) unfinished stages from reading their data, or their data from serving their
        evaluation's metrics (too few images), one line per problem (stages usually share a folder). `harness run`
        and `sweep` check it before anything trains: otherwise a later stage would find its folder missing only
        after the earlier ones had trained, or on a SLURM node."""
        problems: list[str] = []
        for sid in self.stages if stage_ids is None else stage_ids:
            if self.is_done(results_dir, sid):
                continue
            spec = self.stages[sid].spec
            try:
                spec.data.check()
                if spec.eval is not None:  # too few images for a metric would fail at the first evaluation
                    from harness.evaluate import check_reference_size

                    check_reference_size(spec.eval, len(spec.data.names()))
            except HarnessError as err:
                if str(err) not in problems:
                    problems.append(str(err))
        return problems

    def to_json(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "arms": self.arms,
                "stages": {sid: ps.summary() for sid, ps in self.stages.items()}}

    def write(self, results_dir: str | Path) -> Path:
        from harness.fileio import atomic_write_text

        path = Path(results_dir) / self.experiment / PLAN_FILE
        atomic_write_text(path, json.dumps(self.to_json(), indent=2) + "\n")
        return path


# Stage fields that change how a stage runs, not what it trains: left out of its id, so that switching them on
# for a half-done stage resumes it (stage.json still records them).
RUN_OPTIONS = ("compile", "attention", "tensorboard")


def stage_id(description: dict[str, Any], parent: str | None) -> str:
    description = {k: v for k, v in description.items() if k not in RUN_OPTIONS}
    blob = json.dumps({"parent": parent, "stage": description}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_plan(experiment: Experiment) -> Plan:
    stages: dict[str, PlannedStage] = {}
    arms: dict[str, list[str]] = {}
    for arm, arm_stages in experiment.arms.items():
        parent = None
        ids = []
        for depth, spec in enumerate(arm_stages):
            sid = stage_id(spec.describe(), parent)
            if sid in stages:
                stages[sid].arms.append(arm)
            else:
                stages[sid] = PlannedStage(id=sid, name=spec.name, parent=parent, arms=[arm],
                                           dir=f"{arm}/{spec.name}-{sid[:8]}", depth=depth, spec=spec)
            ids.append(sid)
            parent = sid
        arms[arm] = ids
    ordered = dict(sorted(stages.items(), key=lambda item: item[1].depth))  # stable: parents first
    return Plan(experiment=experiment.name, stages=ordered, arms=arms)


def plan_from_gin(gin_text: str | None = None) -> Plan:
    """Build the plan from gin (re-parsing `gin_text` first when given, as a worker does)."""
    from harness.config import explain_missing_macro, parse_gin_text

    if gin_text is not None:
        parse_gin_text(gin_text)
    try:
        experiment = Experiment()
    except RecursionError as err:
        raise HarnessError("the recipe refers to a component inside itself (e.g. `scratch/Stage.steps = "
                           "@scratch/Stage()`); check the @references of your --gin bindings") from err
    except (TypeError, RuntimeError) as err:  # gin: TypeError for an undefined macro, RuntimeError for REQUIRED
        friendly = explain_missing_macro(err)
        if friendly is not None:
            raise friendly from err
        if "REQUIRED" in str(err) or "Required bindings" in str(err) or "missing" in str(err):
            raise HarnessError(f"the recipe does not set everything an Experiment needs: {str(err).splitlines()[0]}"
                               " (a recipe must set Experiment.name and Experiment.arms)") from err
        raise
    return build_plan(experiment)
