"""Launcher specs, sweep grids, job graphs, stage states and the worker; inline and submitit-local runs."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from conftest_slurm import write_fast_recipe

from harness.cli import main as harness_main
from harness.errors import HarnessError
from harness.launch import InlineLauncher, LocalLauncher, SlurmLauncher, Variant, launch_plan, launcher_from_name
from harness.launch.jobs import StageJob, build_jobs, link_shared_folders, write_job_file
from harness.launch.slurm import SlurmSubmission, level_dependency, order_level, preview_levels
from harness.launch.state import QueueEntry, stage_state
from harness.sweep import Point, build_sweep, grid_points, parse_grid, point_suffix

GRID_2X2 = [parse_grid("MASK_RATIO=[0.5,0.75]"), parse_grid("pretrain/Stage.mask=['@PatchMask()', @BlockMask()]")]


# -- sweep grids ------------------------------------------------------------------------------------------------
def test_parse_grid_turns_values_into_gin_text():
    assert parse_grid("MASK_RATIO=[0.1,0.5,0.9]").values == ["0.1", "0.5", "0.9"]
    assert parse_grid("MASK=['@PatchMask()', @BlockMask()]").values == ["@PatchMask()", "@BlockMask()"]
    assert parse_grid("DiffusionConfig.schedule=['cosine', \"linear\"]").values == ["'cosine'", "'linear'"]
    grid = parse_grid(" Stage.betas = [(0.9, 0.99), (0.99,0.99)] ")
    assert (grid.key, grid.values) == ("Stage.betas", ["(0.9, 0.99)", "(0.99, 0.99)"])
    assert parse_grid("pretrain/Stage.eval=[None, True]").values == ["None", "True"]


@pytest.mark.parametrize("bad", ["MASK_RATIO", "MASK_RATIO=0.5", "X=[]", "X=[a b]", "X=[1, 1]", "1X=[1]",
                                 "=[1]"])
def test_parse_grid_rejects_bad_grids(bad):
    with pytest.raises(HarnessError, match="--grid"):
        parse_grid(bad)


def test_grid_points_are_the_cartesian_product_in_order():
    points = grid_points([parse_grid("A=[1,2,3]"), parse_grid("B=['x','y']")])
    assert [p.bindings for p in points] == [[("A", a), ("B", b)] for a in "123" for b in ("'x'", "'y'")]
    assert points[1].gin_lines() == ["A = 1", "B = 'y'"]
    with pytest.raises(HarnessError, match="repeat"):
        grid_points([parse_grid("A=[1]"), parse_grid("A=[2]")])
    assert point_suffix(Point([("MASK_RATIO", "0.5"), ("pretrain/Stage.mask", "@BlockMask()")])) == \
        "mask_ratio=0.5-mask=BlockMask"


def test_sweep_points_are_experiments_that_share_the_untouched_baseline(tmp_path):
    recipe = write_fast_recipe(tmp_path)
    sweep = build_sweep(str(recipe), [], GRID_2X2)
    assert [v.experiment for v in sweep] == [f"fast-mask_ratio={r}-mask={m}" for r in ("0.5", "0.75")
                                             for m in ("PatchMask", "BlockMask")]
    by_name = [{ps.name: (sid, ps) for sid, ps in v.plan.stages.items()} for v in sweep]
    assert len({names["scratch"][0] for names in by_name}) == 1  # no grid key reaches the baseline
    assert len({names["pretrain"][0] for names in by_name}) == 4
    assert len({names["finetune"][0] for names in by_name}) == 4
    pretrain = [names["pretrain"][1].spec.mask for names in by_name]
    assert [(m.name, m.ratio) for m in pretrain] == [("patch", 0.5), ("block2", 0.5), ("patch", 0.75),
                                                     ("block2", 0.75)]
    # A worker re-parsing a point's text gets the same plan (gin text is all that crosses processes).
    from harness.experiment import plan_from_gin

    again = plan_from_gin(sweep[3].gin_text)
    assert (again.experiment, list(again.stages)) == (sweep[3].experiment, list(sweep[3].plan.stages))

    jobs = build_jobs([Variant(v.gin_text, v.plan) for v in sweep], tmp_path / "results")
    assert [j.name for j in jobs].count("scratch") == 1 and len(jobs) == 9
    scratch = next(j for j in jobs if j.name == "scratch")
    assert len(scratch.links) == 3 and scratch.experiment == sweep[0].experiment
    assert [j.depth for j in jobs] == sorted(j.depth for j in jobs)


def test_sweep_refuses_a_grid_key_the_recipe_does_not_use(tmp_path):
    recipe = write_fast_recipe(tmp_path)
    with pytest.raises(HarnessError, match="identical stages"):  # a binding of a component no stage uses
        build_sweep(str(recipe), [], [parse_grid("EvalConfig.num_samples=[10,20]")])


@pytest.mark.parametrize("grid, message", [
    ("MASK_RATIOO=[0.5]", "--grid 'MASK_RATIOO = 0.5': the recipe never uses macro %MASK_RATIOO"),
    ("MASK_RATIOO=[0.5,0.75]", "--grid 'MASK_RATIOO = 0.5': the recipe never uses macro %MASK_RATIOO"),
    ("pretrian/Stage.lr=[1e-4]", "--grid 'pretrian/Stage.lr = 0.0001': no component runs in scope 'pretrian'")])
def test_sweep_refuses_a_misspelt_grid_key_like_a_misspelt_gin_override(tmp_path, capsys, grid, message):
    """One value used to plan an unchanged point (nothing to compare it with), where --gin is refused."""
    recipe = write_fast_recipe(tmp_path)
    code = harness_main(["sweep", str(recipe), "--grid", grid, "--dry-run", "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "changes nothing" in err and len(err.strip().splitlines()) == 1
    override = message.split("'")[1]  # the first point's binding, as --gin
    assert harness_main(["run", str(recipe), "--gin", override, "--dry-run"]) == 2
    assert "changes nothing" in capsys.readouterr().err  # the same rule as --gin


def test_sweep_dry_run_of_100_points_shows_the_arrays(tmp_path, capsys):
    """(How long it takes is a figure of docs/performance.md, measured by hand: machines vary.)"""
    recipe = write_fast_recipe(tmp_path)
    ratios = ",".join(f"{r / 100:.2f}" for r in range(5, 100, 10))
    lrs = ",".join(f"{k}e-4" for k in range(1, 11))
    code = harness_main(["sweep", str(recipe), "--grid", f"MASK_RATIO=[{ratios}]", "--grid",
                         f"pretrain/Stage.lr=[{lrs}]", "--dry-run", "--launcher", "slurm",
                         "--results-dir", str(tmp_path / "results")])
    out = capsys.readouterr().out
    assert code == 0
    assert "100 sweep points" in out and "201 distinct stages: 201 to run, 0 already done" in out
    assert out.count("aftercorr:<level0>") == 100 + 1  # the table's rows, and the level-1 array's sbatch options
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("  level ")] == [
        "  level 0 array[101]", "  level 1 array[100]"]
    assert not (tmp_path / "results").exists()  # a dry run writes nothing


def test_a_sweep_has_its_own_folder_that_report_and_status_read_alone(tmp_path, monkeypatch, capsys):
    """Points used to land in results/ beside every other experiment, so `harness report results/` pooled them
    with unrelated runs, and a second sweep of the recipe overwrote results/<name>.sweep.json."""
    import harness.launch.run as run
    from harness.commands.status import collect as status_of
    from harness.run_folder import find_experiments
    from harness.sweep import sweep_folder_name

    monkeypatch.setattr(run, "_run_inline", lambda jobs, results_dir: [])  # plans are written; nothing trains
    recipe, results = write_fast_recipe(tmp_path), tmp_path / "results"

    def sweep(grid: str) -> int:
        return harness_main(["sweep", str(recipe), "--grid", grid, "--results-dir", str(results)])

    assert harness_main(["run", str(recipe), "--results-dir", str(results), "--no-report"]) == 0  # unrelated
    assert sweep("finetune/Stage.lr=[1e-4,2e-4]") == 0
    folder = results / sweep_folder_name(build_sweep(str(recipe), [], [parse_grid("finetune/Stage.lr=[1e-4,2e-4]")]))
    assert folder.name.startswith("fast-sweep-") and len(folder.name) == len("fast-sweep-") + 8
    assert capsys.readouterr().err.splitlines()[-1] == \
        f"sweep folder: {folder} (`harness status {folder}`, `harness report {folder}`)"
    points = [folder / "fast-lr=0.0001", folder / "fast-lr=0.0002"]
    assert find_experiments(folder) == points  # what `harness report <folder>` reads: the points only
    assert sorted({r["experiment"] for r in status_of(folder)}) == [p.name for p in points]
    assert [p["experiment"] for p in json.loads((folder / "sweep.json").read_text())["points"]] == \
        [p.name for p in points]
    assert sorted({r["experiment"] for r in status_of(results)}) == ["fast", *(p.name for p in points)]
    # The same grid again resumes in its folder; another grid of the same recipe gets its own.
    assert sweep("finetune/Stage.lr=[1e-4, 2e-4]") == 0 and sweep("finetune/Stage.lr=[3e-4]") == 0
    other = results / sweep_folder_name(build_sweep(str(recipe), [], [parse_grid("finetune/Stage.lr=[3e-4]")]))
    assert sorted(p.name for p in results.iterdir() if not p.name.startswith(".")) == \
        sorted(["fast", folder.name, other.name])
    assert find_experiments(other) == [other / "fast-lr=0.0003"] and find_experiments(folder) == points


def test_the_sweep_folder_changes_with_what_trains_not_with_launcher_settings(tmp_path):
    """A longer time limit must resume the sweep in its folder; `--gin` that changes the stages must not mix
    their plans into the folder of another sweep."""
    from harness.sweep import sweep_folder_name

    recipe = str(write_fast_recipe(tmp_path))
    grid = [parse_grid("finetune/Stage.lr=[1e-4,2e-4]")]
    name = sweep_folder_name(build_sweep(recipe, [], grid))
    assert sweep_folder_name(build_sweep(recipe, ["SlurmLauncher.time_min = 5"], grid)) == name
    assert sweep_folder_name(build_sweep(recipe, ["Stage.seed = 1"], grid)) != name
    assert sweep_folder_name(build_sweep(recipe, [], [parse_grid("finetune/Stage.lr=[1e-4]")])) != name


def test_a_stage_finished_in_another_experiment_is_linked_not_trained(tmp_path, monkeypatch, capsys):
    """celebahq_mask50.gin includes celebahq_mask90.gin: both have the same scratch stage, trained twice before."""
    import harness.stage
    from harness.config import load_recipe
    from harness.experiment import plan_from_gin
    from harness.launch import launch_variants

    recipe, results = write_fast_recipe(tmp_path), tmp_path / "r"
    a = plan_from_gin(load_recipe(recipe, []))
    b_text = load_recipe(recipe, ["Experiment.name = 'other'", "Experiment.arms = {'baseline': [@scratch/Stage()]}"])
    b = plan_from_gin(b_text)
    (sid,) = b.stages
    assert sid in a.stages and a.stage_dir(results, sid).name == b.stage_dir(results, sid).name

    def stage_folder(folder: Path, stage_id: str) -> Path:
        folder.mkdir(parents=True)
        (folder / "stage.json").write_text(json.dumps({"id": stage_id}))
        (folder / "DONE").write_text("step 3\n")
        return folder

    # Found first, with the same folder name, but another stage: the full id in stage.json decides.
    stage_folder(results / "aaa" / "baseline" / f"scratch-{sid[:8]}", sid[:8] + "0" * 8)
    done = stage_folder(a.stage_dir(results, sid), sid)
    (job,) = build_jobs([Variant(b_text, b)], results)
    assert (job.done, job.stage_dir, job.links) == (True, done, [b.stage_dir(results, sid)])
    other = ["--gin", "Experiment.name = 'other'", "--gin", "Experiment.arms = {'baseline': [@scratch/Stage()]}"]
    assert harness_main(["run", str(recipe), "--results-dir", str(results), "--dry-run", *other]) == 0
    assert f"done in fast/scratch/scratch-{sid[:8]}" in capsys.readouterr().out

    def trained(*args, **kwargs):
        raise AssertionError("the finished stage was trained again")

    monkeypatch.setattr(harness.stage, "run_stage", trained)
    (result,) = launch_variants([Variant(b_text, b)], results, InlineLauncher())
    assert (result["status"], result["dir"]) == ("skipped", str(done))
    linked = b.stage_dir(results, sid)
    assert linked.is_symlink() and linked.resolve() == done.resolve()
    assert (linked / "DONE").is_file()  # B's report and any child of the stage find it in B's folder
    # A's folder deleted later: B's dangling link gives way and the stage trains in B's own folder.
    shutil.rmtree(done)
    ran = []
    monkeypatch.setattr(harness.stage, "run_stage", lambda text, stage_id, *args, **kwargs: ran.append(
        (stage_id, linked.is_symlink())) or {"status": "done"})
    (result,) = launch_variants([Variant(b_text, b)], results, InlineLauncher())
    assert (result["status"], result["dir"], ran) == ("done", str(linked), [(sid, False)])


# -- job graph and SLURM dependencies --------------------------------------------------------------------------
def _job(sid: str, depth: int = 0, parent: str | None = None, children: int = 0) -> StageJob:
    return StageJob(stage_id=sid, name=sid, experiment="e", gin_text="", stage_dir=Path("/nowhere") / sid,
                    depth=depth, parent=parent, done=False, children=children)


def test_level_dependency_is_aftercorr_only_for_a_one_to_one_mapping():
    level0 = order_level([_job("scratch"), _job("p1", children=1), _job("p2", children=1)], {})
    assert [j.stage_id for j in level0] == ["p1", "p2", "scratch"]  # parents of the next level first
    subs = {j.stage_id: SlurmSubmission(j, f"7_{i}", "7", i) for i, j in enumerate(level0)}
    level1 = order_level([_job("f2", 1, "p2"), _job("f1", 1, "p1")], subs)
    assert [j.stage_id for j in level1] == ["f1", "f2"]
    assert level_dependency(level1, subs) == "aftercorr:7"
    # A parent that is already done is not submitted: the mapping breaks, wait for the specific elements.
    del subs["p1"]
    assert level_dependency(order_level(level1, subs), subs) == "afterok:7_1"
    subs["p1"] = SlurmSubmission(level0[0], "9", None, None)  # a parent submitted as a plain job
    assert level_dependency(order_level(level1, subs), subs) == "afterok:7_1:9"
    assert level_dependency([_job("x")], {}) is None


def test_preview_of_single_jobs_chains_afterok():
    jobs = [_job("p", children=1), _job("s"), _job("f", 1, "p")]
    preview = preview_levels(jobs, arrays=False)
    assert [(d, [j.stage_id for j in lvl], dep) for d, lvl, dep in preview] == [
        (0, ["p"], None), (0, ["s"], None), (1, ["f"], "afterok:<p-p>")]


def test_a_job_still_queued_from_an_earlier_launch_is_not_submitted_again(tmp_path):
    from harness.launch.slurm import still_in_queue

    job = _job("p")
    job.stage_dir = tmp_path
    assert still_in_queue(job, {}) is None  # never launched
    write_job_file(tmp_path, "slurm", "8_2", array_job_id="8", array_index=2)
    earlier = still_in_queue(job, {"8_2": QueueEntry("RUNNING", "None")})
    assert (earlier.job_id, earlier.array_id, earlier.index) == ("8_2", "8", 2)  # children depend on it
    assert still_in_queue(job, {"8_2": QueueEntry("FAILED", "NonZeroExitCode")}) is None
    assert still_in_queue(job, {}) is None and still_in_queue(job, None) is None


def test_shared_stage_folders_become_relative_symlinks(tmp_path):
    job = _job("s")
    job.stage_dir = tmp_path / "exp-a" / "scratch" / "scratch-1"
    job.links = [tmp_path / "exp-b" / "scratch" / "scratch-1", tmp_path / "exp-c" / "scratch" / "scratch-1"]
    job.links[1].mkdir(parents=True)  # a real folder from an earlier run is left alone
    link_shared_folders(job)
    assert job.links[0].is_symlink() and not os.readlink(job.links[0]).startswith("/")
    assert job.links[0].resolve() == job.stage_dir.resolve()
    assert not job.links[1].is_symlink()


@pytest.mark.parametrize("launcher", [InlineLauncher(), LocalLauncher(), SlurmLauncher()])
def test_every_launcher_links_shared_stages_finished_in_another_point(tmp_path, monkeypatch, launcher):
    """A point added to a finished sweep: its shared stages are done elsewhere, so they are skipped, yet its folders
    for them must exist (its fine-tuning reads the parent's checkpoint there; its report shows the baseline)."""
    import harness.launch.run as run
    from harness.launch import launch_variants

    sweep = build_sweep(str(write_fast_recipe(tmp_path)), [], [parse_grid("finetune/Stage.lr=[1e-4,2e-4]")])
    results = tmp_path / "r"
    for sid, ps in sweep[0].plan.stages.items():  # the first point finished its scratch and pretrain stages
        if ps.name != "finetune":
            sweep[0].plan.stage_dir(results, sid).mkdir(parents=True)
            (sweep[0].plan.stage_dir(results, sid) / "DONE").write_text("step 3\n")
    seen = {}

    def launched(jobs, *_args):
        seen.update({sid: sweep[1].plan.stage_dir(results, sid).resolve()
                     for sid in sweep[1].plan.stages if sweep[1].plan.stage_dir(results, sid).is_symlink()})
        return []

    for name in ("_run_inline", "_run_local", "_run_slurm"):
        monkeypatch.setattr(run, name, launched)
    launch_variants([Variant(v.gin_text, v.plan) for v in sweep], results, launcher)
    shared = {sid: sweep[0].plan.stage_dir(results, sid).resolve() for sid, ps in sweep[1].plan.stages.items()
              if ps.name != "finetune"}
    assert len(shared) == 2 and seen == shared


def test_job_file_keeps_earlier_job_ids(tmp_path):
    write_job_file(tmp_path, "slurm", "11", array_index=None)
    info = write_job_file(tmp_path, "slurm", "12_3", array_index=3)
    saved = json.loads((tmp_path / "job.json").read_text())
    assert saved == info and saved["job_id"] == "12_3" and saved["previous_job_ids"] == ["11"]


# -- launcher specs ---------------------------------------------------------------------------------------------
def test_launcher_from_name(monkeypatch, tmp_path):
    import gin

    with pytest.raises(HarnessError, match="inline, local, slurm"):
        launcher_from_name("kubernetes")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    with pytest.raises(HarnessError, match="SLURM is not installed"):
        launcher_from_name("slurm")
    fake = tmp_path / "sbatch"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    with pytest.raises(HarnessError, match="no `srun` on PATH"):  # submitit's SlurmExecutor needs it too
        launcher_from_name("slurm")
    (tmp_path / "srun").symlink_to(fake)
    gin.clear_config()
    gin.parse_config("default_launcher.launcher = @SlurmLauncher()\nSlurmLauncher.partition = 'gpu'")
    try:
        assert launcher_from_name(None) == SlurmLauncher(partition="gpu")
        assert launcher_from_name("slurm").partition == "gpu"
        assert isinstance(launcher_from_name("local"), LocalLauncher)
    finally:
        gin.clear_config()
    assert isinstance(launcher_from_name(None), InlineLauncher)


def _fake_sbatch_only(tmp_path: Path, monkeypatch) -> None:
    """A PATH whose only SLURM commands are dummies of sbatch and srun (no squeue: the queue reads as unknown)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for command in ("sbatch", "srun"):  # submitit's SlurmExecutor looks for srun
        (bin_dir / command).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / command).chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))


def test_a_recipe_that_chooses_slurm_needs_sbatch_too(tmp_path, monkeypatch, capsys):
    """Without --launcher the recipe's SlurmLauncher skipped the check and failed later, with a traceback."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    recipe = write_fast_recipe(tmp_path)
    chooses_slurm = ["--gin", "default_launcher.launcher = @SlurmLauncher()", "--results-dir", str(tmp_path / "r")]
    assert harness_main(["run", str(recipe), *chooses_slurm, "--no-report"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("harness run: error: the recipe's launcher (default_launcher.launcher): SLURM is not "
                          "installed here") and len(err.splitlines()) == 1
    assert harness_main(["sweep", str(recipe), "--grid", "MASK_RATIO=[0.5]", *chooses_slurm]) == 2
    assert "SLURM is not installed" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    # previewing needs no SLURM
    assert harness_main(["sweep", str(recipe), "--grid", "MASK_RATIO=[0.5]", *chooses_slurm, "--dry-run"]) == 0
    assert harness_main(["run", str(recipe), *chooses_slurm, "--dry-run"]) == 0


@pytest.mark.parametrize("command", [["run", "--no-report"], ["sweep", "--grid", "MASK_RATIO=[0.5,0.75]"]])
def test_sbatch_refusing_an_option_is_one_line_naming_the_binding(tmp_path, monkeypatch, capsys, command):
    """submitit's FailedJobError (sbatch exited non-zero) escaped as a traceback with exit status 1."""
    import submitit
    from submitit.core.utils import FailedJobError

    def refused(self, command_text):
        raise FailedJobError("sbatch: error: invalid partition specified: nope\n"
                             "sbatch: error: Batch job submission failed: Invalid partition name specified")

    _fake_sbatch_only(tmp_path, monkeypatch)
    monkeypatch.setattr(submitit.SlurmExecutor, "_submit_command", refused)  # what sbatch's exit status raises
    recipe = write_fast_recipe(tmp_path)
    code = harness_main([command[0], str(recipe), *command[1:], "--launcher", "slurm", "--results-dir",
                         str(tmp_path / "r"), "--gin", "SlurmLauncher.partition = 'nope'"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"harness {command[0]}: error: SLURM refused to submit ")
    assert err.rstrip().endswith(": invalid partition specified: nope; Batch job submission failed: Invalid "
                                 "partition name specified; change SlurmLauncher.partition (now 'nope') in "
                                 "gin/launch/slurm.gin or with --gin 'SlurmLauncher.partition = ...'")


def test_sbatch_complaints_point_at_the_launcher_setting():
    from harness.launch.slurm import sbatch_advice, sbatch_complaint

    spec = SlurmLauncher(extra_sbatch=["--frobnicate=1"], account="lab")
    complaint = sbatch_complaint("sbatch: unrecognized option '--frobnicate=1'\nTry \"sbatch --help\" for more "
                                 "information\n")
    assert complaint == "unrecognized option '--frobnicate=1'"
    assert "SlurmLauncher.extra_sbatch (now ['--frobnicate=1'])" in sbatch_advice(spec, complaint)
    assert "SlurmLauncher.account (now 'lab')" in sbatch_advice(
        spec, "Batch job submission failed: Invalid account or account/partition combination specified")
    assert "SlurmLauncher.gpus_per_node" in sbatch_advice(spec, "Invalid generic resource (gres) specification")
    assert "SlurmLauncher.mem_gb_per_task" in sbatch_advice(spec, "Memory specification can not be satisfied")
    assert sbatch_advice(spec, "Requested node configuration is not available").startswith(
        "check the SlurmLauncher bindings")


def test_slurm_spec_becomes_the_sbatch_script():
    from submitit.slurm.slurm import _make_sbatch_string

    spec = SlurmLauncher(partition="gpu", account="lab", qos="high", constraint="a100|h100", gpus_per_node=4,
                         cpus_per_task=8, mem_gb_per_task=16, exclusive=True,
                         extra_sbatch=["--reservation=abc", "#SBATCH --mail-type=FAIL"], setup=["module load cuda"],
                         signal_delay_s=300, time_min=90)
    params = spec.sbatch_parameters()
    params.pop("array_parallelism")
    script = _make_sbatch_string("python -m x", "/tmp/logs/%j", dependency="aftercorr:12", **params)
    for line in ("--partition=gpu", "--account=lab", "--qos=high", "--constraint='a100|h100'", "--gpus-per-node=4",
                 "--ntasks-per-node=4", "--cpus-per-task=8", "--mem=65536M", "--signal=USR2@300", "--time=90",
                 "--requeue", "--kill-on-invalid-dep=yes", "--reservation=abc", "--mail-type=FAIL", "--exclusive",
                 "--dependency=aftercorr:12"):
        assert f"#SBATCH {line}\n" in script, line
    assert "module load cuda" in script
    with pytest.raises(HarnessError, match="long option"):
        SlurmLauncher(extra_sbatch=["-p gpu"])


@pytest.mark.parametrize("binding, message", [
    ("time_min = '4h'", "time_min = '4h' is not a valid int"),
    ("time_min = 0", "SlurmLauncher.time_min = 0 must be at least 1"),
    ("nodes = 0", "SlurmLauncher.nodes = 0 must be at least 1"),
    ("tasks_per_node = 0", "SlurmLauncher.tasks_per_node = 0 must be at least 1"),
    ("cpus_per_task = 0", "SlurmLauncher.cpus_per_task = 0 must be at least 1"),
    ("gpus_per_node = -1", "SlurmLauncher.gpus_per_node = -1 must be at least 0"),
    ("mem_gb_per_task = 0", "SlurmLauncher.mem_gb_per_task = 0.0 must be positive"),
    ("max_requeues = -1", "SlurmLauncher.max_requeues = -1 must be at least 0"),
    ("exclusive = 'yes'", "exclusive = 'yes' is not a valid bool"),
    ("partition = ''", "SlurmLauncher.partition is empty"),
    ("extra_sbatch = '--reservation=abc'", "extra_sbatch = '--reservation=abc' must be a list of strings"),
    ("extra_sbatch = ['--time=10']", "--time is set by SlurmLauncher.time_min"),
    ("extra_sbatch = ['--exclusive']", "--exclusive is set by SlurmLauncher.exclusive"),
    ("extra_sbatch = ['--dependency=afterok:1']", "--dependency is set by the harness"),
    ("extra_sbatch = ['--mem-per-gpu=10G']", "sbatch takes one of them"),
    ("signal_delay_s = 600", "signal_delay_s = 600 is not shorter than the time limit"),
    ("gpus_per_node = 2", "3 tasks per node but 2 GPUs per node"),
])
def test_a_bad_cluster_setting_is_one_line_naming_it(tmp_path, capsys, binding, message):
    """The profile's settings are checked when the launcher is made, before anything is planned or submitted."""
    base = ["SlurmLauncher.time_min = 5", "SlurmLauncher.tasks_per_node = 3", "SlurmLauncher.mem_gb_per_task = 4"]
    bindings = [b for b in base if b.split("=")[0] != binding.split("=")[0]] + [f"SlurmLauncher.{binding}"]
    code = harness_main(["run", str(write_fast_recipe(tmp_path)), "--launcher", "slurm", "--dry-run",
                         *[arg for b in bindings for arg in ("--gin", b)]])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_local_launcher_settings_are_checked():
    with pytest.raises(HarnessError, match="LocalLauncher.tasks_per_node = 0 must be at least 1"):
        LocalLauncher(tasks_per_node=0)
    with pytest.raises(HarnessError, match="3 tasks per node but 2 GPUs per node"):
        LocalLauncher(tasks_per_node=3, gpus_per_node=2)
    assert LocalLauncher(tasks_per_node=2).tasks_per_node == 2  # CPU ranks (gloo) need no GPU


def test_the_cluster_profile_sets_every_setting_and_asks_for_nothing_a_cluster_could_refuse():
    """gin/launch/slurm.gin documents every SlurmLauncher field; as shipped it equals the defaults: the cluster's
    partition, account, ..., no GPU, no memory or CPU request (the CI cluster takes it as it is)."""
    import dataclasses

    import gin
    from gin import config_parser
    from harness.launch.specs import from_profile, profile_path

    for cls in (SlurmLauncher, LocalLauncher):
        text = profile_path(cls.name).read_text()
        statements = list(config_parser.ConfigParser(text, gin.config.ParserDelegate(skip_unknown=True)))
        bound = {s.arg_name for s in statements if s.selector == cls.__name__}
        fields = {f.name for f in dataclasses.fields(cls)}
        assert bound == fields, f"{profile_path(cls.name)} misses {fields - bound}"
        assert from_profile(cls) == cls()
    # each SlurmLauncher line says what it sets (a comment on it, or on the lines just above)
    lines = profile_path("slurm").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("SlurmLauncher."):
            assert "#" in line or lines[i - 1].startswith("#"), line


def test_launcher_option_reads_its_profile_under_the_recipes_bindings(tmp_path, monkeypatch):
    """`--launcher slurm` with a recipe that does not include launch/slurm.gin gets the cluster profile; a binding
    of the recipe or of --gin wins over it; a recipe that chose SLURM itself keeps its own launcher."""
    import gin
    import harness.launch.specs as specs

    profile = tmp_path / "slurm.gin"
    profile.write_text("default_launcher.launcher = @SlurmLauncher()\nSlurmLauncher.partition = 'gpu'\n"
                       "SlurmLauncher.account = 'lab'  # comment\nSlurmLauncher.time_min = 600\n"
                       "SlurmLauncher.extra_sbatch = ['--reservation=abc']\n")
    monkeypatch.setattr(specs, "profile_path", lambda name: profile if name == "slurm" else tmp_path / "none.gin")
    gin.parse_config("SlurmLauncher.time_min = 30")  # as from the recipe or --gin
    chosen = launcher_from_name("slurm", require_slurm=False)
    assert (chosen.partition, chosen.account, chosen.time_min, chosen.extra_sbatch) == ("gpu", "lab", 30,
                                                                                       ["--reservation=abc"])
    assert launcher_from_name("local", require_slurm=False) == LocalLauncher()  # no local profile: defaults
    gin.clear_config()
    gin.parse_config("default_launcher.launcher = @SlurmLauncher()\nSlurmLauncher.qos = 'high'")
    assert launcher_from_name("slurm", require_slurm=False) == SlurmLauncher(qos="high")  # the recipe's own
    profile.write_text("SlurmLauncher.partiton = 'gpu'\n")
    with pytest.raises(HarnessError, match="SlurmLauncher has no setting partiton"):
        specs.from_profile(SlurmLauncher)
    profile.write_text("include 'other.gin'\n")
    with pytest.raises(HarnessError, match="bindings only"):
        specs.from_profile(SlurmLauncher)


def test_dry_run_prints_the_sbatch_options_each_stage_will_get(tmp_path, monkeypatch, capsys):
    """What `harness run --launcher slurm --dry-run` prints is what the submission sends: both come from
    `job_parameters`, and the dry run's options equal the #SBATCH lines of the file submitit would hand sbatch."""
    import submitit
    from submitit.core.utils import FailedJobError

    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM here: a dry run needs none
    recipe = write_fast_recipe(tmp_path)
    results = tmp_path / "r"
    profile = ["SlurmLauncher.partition = 'gpu'", "SlurmLauncher.account = 'lab'", "SlurmLauncher.qos = 'high'",
               "SlurmLauncher.constraint = 'a100'", "SlurmLauncher.time_min = 90", "SlurmLauncher.gpus_per_node = 2",
               "SlurmLauncher.cpus_per_task = 6", "SlurmLauncher.mem_gb_per_task = 8", "SlurmLauncher.exclusive = True",
               "SlurmLauncher.signal_delay_s = 300", "SlurmLauncher.nodes = 2",
               "SlurmLauncher.extra_sbatch = ['--reservation=abc', '--mail-type=FAIL']",
               "SlurmLauncher.setup = ['module load cuda/12.1']"]
    args = ["run", str(recipe), "--launcher", "slurm", "--results-dir", str(results),
            *[arg for b in profile for arg in ("--gin", b)]]
    assert harness_main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not results.exists()  # nothing written, nothing submitted
    assert "3 job(s), one per stage, each 2 node(s) x 2 task(s) = 4 DDP rank(s)" in out
    every = " ".join(line.strip() for line in out[out.index("every job: sbatch"):].split("\n  setup")[0].splitlines())
    for option in ("--partition=gpu", "--account=lab", "--qos=high", "--constraint=a100", "--time=90", "--nodes=2",
                   "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=6", "--mem=16384M", "--exclusive",
                   "--signal=USR2@300", "--reservation=abc", "--mail-type=FAIL", "--requeue",
                   "--kill-on-invalid-dep=yes", f"--output={results}/.submitit/%j/%j_0_log.out"):
        assert option in every.split(), option
    assert "  setup: module load cuda/12.1\n" in out
    stage_lines = {line.split(" (")[0].strip(): line for line in out.splitlines() if line.startswith("  fast/")}
    assert set(stage_lines) == {"fast/scratch", "fast/pretrain", "fast/finetune"}
    assert "--job-name=harness-scratch" in stage_lines["fast/scratch"]
    assert "--dependency='afterok:<pretrain-" in stage_lines["fast/finetune"]

    # The real submission, up to sbatch: the file submitit writes for the first stage has the same options.
    written = []

    def read_then_refuse(self, submission_file_path):
        written.append(Path(submission_file_path).read_text())
        raise FailedJobError("sbatch: error: stopped by the test")

    _fake_sbatch_only(tmp_path, monkeypatch)
    monkeypatch.setattr(submitit.SlurmExecutor, "_make_submission_command", read_then_refuse)
    assert harness_main([*args, "--no-report"]) == 2
    assert "stopped by the test" in capsys.readouterr().err
    submitted = [line.removeprefix("#SBATCH ") for line in written[0].splitlines() if line.startswith("#SBATCH")]
    first = next(line for line in out.splitlines() if line.startswith("  fast/"))
    previewed = every.removeprefix("every job: sbatch ").split() + first.split(": ", 1)[1].split()
    assert sorted(submitted) == sorted(previewed)


def test_sweep_dry_run_prints_the_sbatch_options_of_each_array(tmp_path, monkeypatch, capsys):
    """`harness sweep --launcher slurm --dry-run` printed the arrays but not their sbatch options, which
    `harness run --dry-run` prints: now each submission's (a level's job array, or a level's one stage), from
    `job_parameters` as the submission's, equal to the #SBATCH lines submitit writes for the first array."""
    import submitit
    from submitit.core.utils import FailedJobError

    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM here: a dry run needs none
    recipe = write_fast_recipe(tmp_path)
    results = tmp_path / "r"
    profile = ["SlurmLauncher.partition = 'gpu'", "SlurmLauncher.time_min = 90", "SlurmLauncher.gpus_per_node = 2",
               "SlurmLauncher.array_parallelism = 1", "SlurmLauncher.extra_sbatch = ['--reservation=abc']",
               "SlurmLauncher.setup = ['module load cuda/12.1']"]
    args = ["sweep", str(recipe), "--grid", "MASK_RATIO=[0.5,0.75]", "--launcher", "slurm", "--results-dir",
            str(results), *[arg for b in profile for arg in ("--gin", b)]]
    assert harness_main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not results.exists()  # nothing written, nothing submitted
    assert "2 submission(s) (2 job array(s), 0 single job(s)), each stage 1 node(s) x 2 task(s)" in out
    every = " ".join(line.strip() for line in out[out.index("every job: sbatch"):].split("\n  setup")[0].splitlines())
    for option in ("--partition=gpu", "--time=90", "--gpus-per-node=2", "--ntasks-per-node=2", "--reservation=abc",
                   "--requeue", "--kill-on-invalid-dep=yes"):
        assert option in every.split(), option
    (output,) = [option for option in every.split() if option.startswith("--output=")]  # in the sweep's folder
    assert output.startswith(f"--output={results}/fast-sweep-") and output.endswith("/.submitit/%A_%a/%A_%a_0_log.out")
    assert "  setup: module load cuda/12.1\n" in out
    levels = [line for line in out.splitlines() if line.startswith("  level ")]
    assert levels == ["  level 0 array[3]: --array=0-2%1 --job-name=harness-level0",
                      "  level 1 array[2]: --array=0-1%1 --dependency='aftercorr:<level0>' --job-name=harness-level1"]
    # a level of one stage is one job, named by its stage
    assert harness_main(["sweep", str(recipe), "--grid", "MASK_RATIO=[0.5]", "--launcher", "slurm", "--dry-run",
                         "--results-dir", str(results)]) == 0
    one = " ".join(capsys.readouterr().out.split())
    assert "(1 job array(s), 1 single job(s))" in one
    array, job = one.split(" level 0 array[2]: ")[1].split(" level 1 fast-mask_ratio=0.5/finetune (")
    assert {"--array=0-1%2", "--job-name=harness-level0"} <= set(array.split())
    assert {"--dependency='afterok:<level0>_0'", "--job-name=harness-finetune"} <= set(job.split())
    assert [o.endswith("/.submitit/%j/%j_0_log.out") for o in job.split() if o.startswith("--output=")] == [True]

    # The real submission, up to sbatch: the file submitit writes for the level-0 array has the same options.
    written = []

    def read_then_refuse(self, submission_file_path):
        written.append(Path(submission_file_path).read_text())
        raise FailedJobError("sbatch: error: stopped by the test")

    _fake_sbatch_only(tmp_path, monkeypatch)
    monkeypatch.setattr(submitit.SlurmExecutor, "_make_submission_command", read_then_refuse)
    assert harness_main(args) == 2
    assert "stopped by the test" in capsys.readouterr().err
    submitted = [line.removeprefix("#SBATCH ") for line in written[0].splitlines() if line.startswith("#SBATCH")]
    previewed = every.removeprefix("every job: sbatch ").split() + levels[0].split(": ", 1)[1].split()
    assert sorted(submitted) == sorted(previewed)


# -- stage state (harness status) -------------------------------------------------------------------------------
def _metrics(folder: Path, rows: list[tuple[int, float]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": loss}) + "\n" for s, loss in rows))


def test_stage_state_from_markers_job_file_and_queue(tmp_path):
    stage = tmp_path / "s"
    assert stage_state(stage, None).state == "pending"
    write_job_file(stage, "slurm", "5_1", stderr=str(tmp_path / "err.log"))
    queue = {"5_1": QueueEntry("PENDING", "Dependency")}
    queued = stage_state(stage, queue)
    assert (queued.state, queued.detail) == ("queued", "PENDING (Dependency)")
    assert stage_state(stage, None).state == "unknown"
    _metrics(stage, [(2, 0.9), (4, 0.7)])
    assert stage_state(stage, queue).state == "requeued"  # pending again after making progress
    running = stage_state(stage, {"5_1": QueueEntry("RUNNING", "None")})
    assert (running.state, running.step, running.loss) == ("running", 4, 0.7)
    (tmp_path / "err.log").write_text("\n".join(f"line {i}" for i in range(30)))
    gone = stage_state(stage, {}, log_lines=3)
    assert gone.state == "failed" and gone.log_tail == "line 27\nline 28\nline 29"
    (stage / "FAILED").write_text("HarnessError: no images in /data\n")
    assert stage_state(stage, {"5_1": QueueEntry("FAILED", "NonZeroExitCode")}).log_tail == \
        "HarnessError: no images in /data"
    cancelled = stage_state(stage, {"5_1": QueueEntry("CANCELLED", "DependencyNeverSatisfied")})
    assert (cancelled.state, cancelled.detail) == ("failed", "cancelled: its parent stage did not finish "
                                                             "(DependencyNeverSatisfied)")
    (stage / "DONE").write_text("step 4\n")
    assert stage_state(stage, {}).state == "done"

    local = tmp_path / "l"
    write_job_file(local, "local", str(os.getpid()), pid=os.getpid())
    assert stage_state(local, None).state == "running"
    write_job_file(local, "local", "1", pid=2 ** 22 + 12345)  # beyond pid_max: no such process
    assert stage_state(local, None).state == "failed"


def test_status_command_lists_every_stage(tmp_path, capsys):
    exp = tmp_path / "exp"
    exp.mkdir()
    plan = {"experiment": "exp", "stages": {
        "a" * 16: {"name": "pretrain", "dir": "two_stage/pretrain-aaaaaaaa", "arms": ["two_stage"], "depth": 0,
                   "steps": 4},
        "b" * 16: {"name": "finetune", "dir": "two_stage/finetune-bbbbbbbb", "arms": ["two_stage"], "depth": 1,
                   "steps": 2}}}
    (exp / "plan.json").write_text(json.dumps(plan))
    done = exp / "two_stage" / "pretrain-aaaaaaaa"
    _metrics(done, [(4, 0.5)])
    (done / "DONE").write_text("")
    failed = exp / "two_stage" / "finetune-bbbbbbbb"
    _metrics(failed, [(1, 0.8)])
    (failed / "FAILED").write_text("Traceback ...\nRuntimeError: out of memory\n")
    assert harness_main(["status", str(tmp_path), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["stage"], r["state"], r["step"], r["loss"]) for r in rows] == [
        ("pretrain", "done", 4, 0.5), ("finetune", "failed", 1, 0.8)]
    assert rows[1]["log_tail"].endswith("RuntimeError: out of memory")
    assert harness_main(["status", str(exp)]) == 0
    out = capsys.readouterr().out
    assert "1 done, 1 failed" in out and "RuntimeError: out of memory" in out
    assert harness_main(["status", str(tmp_path / "nothing")]) == 2


def test_status_shows_a_stage_whose_parent_failed_as_blocked(tmp_path, capsys):
    """`harness run` cancels the children of a failed stage; status says blocked (not pending) for them, down the
    chain, while a stage without a failed parent stays pending."""
    exp = tmp_path / "exp"
    exp.mkdir()
    a, b, c, d = ("a" * 16, "b" * 16, "c" * 16, "d" * 16)
    plan = {"experiment": "exp", "stages": {
        a: {"name": "pretrain", "dir": "two_stage/pretrain-aaaaaaaa", "arms": ["two_stage"], "depth": 0,
            "parent": None, "steps": 4},
        b: {"name": "finetune", "dir": "two_stage/finetune-bbbbbbbb", "arms": ["two_stage"], "depth": 1,
            "parent": a, "steps": 2},
        c: {"name": "polish", "dir": "two_stage/polish-cccccccc", "arms": ["two_stage"], "depth": 2,
            "parent": b, "steps": 2},
        d: {"name": "scratch", "dir": "scratch/scratch-dddddddd", "arms": ["scratch"], "depth": 0,
            "parent": None, "steps": 4}}}
    (exp / "plan.json").write_text(json.dumps(plan))
    failed = exp / "two_stage" / "pretrain-aaaaaaaa"
    _metrics(failed, [(1, 0.8)])
    (failed / "FAILED").write_text("HarnessError: data folder /data does not exist\n")
    assert harness_main(["status", str(exp), "--json"]) == 0
    rows = {r["stage"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert {name: r["state"] for name, r in rows.items()} == {
        "pretrain": "failed", "finetune": "blocked", "polish": "blocked", "scratch": "pending"}
    assert rows["finetune"]["detail"] == "waits for its parent stage pretrain (aaaaaaaa), which failed"
    assert rows["polish"]["detail"] == "waits for its parent stage finetune (bbbbbbbb), which is blocked"
    assert rows["scratch"]["detail"] == "" and set(rows["finetune"]) == set(rows["pretrain"])  # same fields
    assert harness_main(["status", str(exp)]) == 0  # the table shows the new state
    out = capsys.readouterr().out
    assert "2 blocked, 1 failed, 1 pending" in out and "waits for its parent stage pretrain" in out
    # once the parent is done, its child is pending again (it can run)
    (failed / "FAILED").unlink()
    (failed / "DONE").write_text("")
    assert harness_main(["status", str(exp), "--json"]) == 0
    states = [json.loads(line)["state"] for line in capsys.readouterr().out.splitlines()]
    assert sorted(states) == ["done", "pending", "pending", "pending"]


@pytest.mark.parametrize("child_entry", [None, QueueEntry("CANCELLED", "DependencyNeverSatisfied"),
                                         QueueEntry("PENDING", "DependencyNeverSatisfied")])
def test_status_under_slurm_shows_the_children_of_a_failed_stage_as_blocked(tmp_path, monkeypatch, capsys,
                                                                             child_entry):
    """A child job waits on its parent (afterok) and is cancelled with it: it used to show failed ("cancelled:
    its parent...", then "no longer in SLURM's queue") while the records said blocked."""
    import harness.launch.state as state

    exp = tmp_path / "exp"
    a, b, c, d = ("a" * 16, "b" * 16, "c" * 16, "d" * 16)
    chain = [(a, "pretrain", None), (b, "finetune", a), (c, "polish", b), (d, "again", None)]
    plan = {"experiment": "exp", "stages": {
        sid: {"name": name, "dir": f"arm/{name}-{sid[:8]}", "arms": ["arm"], "depth": i % 3, "parent": parent,
              "steps": 2} for i, (sid, name, parent) in enumerate(chain)}}
    exp.mkdir()
    (exp / "plan.json").write_text(json.dumps(plan))
    for i, (sid, name, _) in enumerate(chain):
        write_job_file(exp / plan["stages"][sid]["dir"], "slurm", f"7_{i}")
    (exp / "arm" / f"pretrain-{a[:8]}" / "FAILED").write_text("HarnessError: data folder /data does not exist\n")
    (exp / "arm" / f"again-{d[:8]}" / "FAILED").write_text("RuntimeError: out of memory\n")  # failed by itself
    queue = {} if child_entry is None else {"7_1": child_entry, "7_2": child_entry}
    monkeypatch.setattr(state, "slurm_queue", lambda: queue)  # the parents' jobs have left the queue
    assert harness_main(["status", str(exp), "--json"]) == 0
    rows = {r["stage"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert {name: r["state"] for name, r in rows.items()} == {
        "pretrain": "failed", "finetune": "blocked", "polish": "blocked", "again": "failed"}
    assert rows["finetune"]["detail"] == "waits for its parent stage pretrain (aaaaaaaa), which failed"
    assert rows["polish"]["detail"] == "waits for its parent stage finetune (bbbbbbbb), which is blocked"
    assert rows["finetune"]["log_tail"] == "" and rows["again"]["log_tail"] == "RuntimeError: out of memory"
    # a child that ran and failed by itself (FAILED of its own, its job gone) is failed, whatever its parent did
    (exp / "arm" / f"finetune-{b[:8]}" / "FAILED").write_text("RuntimeError: NaN loss\n")
    queue.clear()
    assert harness_main(["status", str(exp), "--json"]) == 0
    states = {r["stage"]: r["state"] for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert (states["finetune"], states["polish"]) == ("failed", "blocked")


@pytest.mark.parametrize("name, sampler", [("ddpm", ("ddpm", 1000, 1.0)), ("ddim50", ("ddim", 50, 0.0)),
                                           ("ddim250", ("ddim", 250, 1.0))])
def test_sampling_files_choose_the_evaluation_sampler(name, sampler):
    """gin/sampling/*.gin bind the evaluation's fid-scoped sampler (included after the eval file, or by --gin);
    the sample grids stay DDIM with Stage.sample_steps."""
    from harness.config import load_recipe
    from harness.experiment import plan_from_gin

    load_recipe("celeba64_mask_ablation", [f"include 'sampling/{name}.gin'"])
    stages = {ps.name: ps.spec for ps in plan_from_gin().stages.values()}
    evaluated = {n: (s.eval.sampler.kind, s.eval.sampler.steps, s.eval.sampler.eta) for n, s in stages.items()
                 if s.eval is not None}
    assert evaluated == {"scratch": sampler, "finetune": sampler}
    assert {s.sample_steps for s in stages.values()} == {50}


def test_mask_ablation_header_sweeps_plan_distinct_masks():
    """The two sweeps in recipes/celeba64_mask_ablation.gin's header: every point pretrains with its own mask."""
    ratio_sweep = build_sweep("celeba64_mask_ablation", [], [parse_grid("MASK_RATIO=[0.1,0.5,0.9]"),
                                                             parse_grid("MASK=['@PatchMask()','@BlockMask()']")])
    crop_sweep = build_sweep("celeba64_mask_ablation", ["MASK = @CropMask()"], [parse_grid("CROP_SIZE=[15,11,5]")])
    for sweep, expected in ((ratio_sweep, [("patch", 0.098), ("block4", 0.062), ("patch", 0.5), ("block4", 0.5),
                                           ("patch", 0.898), ("block4", 0.875)]),
                            (crop_sweep, [("crop15", 0.121), ("crop11", 0.527), ("crop5", 0.902)])):
        masks = []
        for v in sweep:
            (spec,) = [ps.spec for ps in v.plan.stages.values() if ps.name == "pretrain"]
            masks.append((spec.mask.name, round(spec.mask.actual_ratio(spec.model.grid), 3)))
        assert masks == expected


# -- the worker -------------------------------------------------------------------------------------------------
def test_signals_only_set_the_stop_flag():
    from harness.launch.worker import StopFlag, stop_on_signals

    flag = StopFlag()
    before = signal.getsignal(signal.SIGUSR2)
    with stop_on_signals(flag):
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)
        assert flag.is_set() and flag.signal_name == "SIGUSR2"
    assert signal.getsignal(signal.SIGUSR2) is before


def test_worker_requeues_on_slurm_warning_and_gives_up_after_max_requeues(monkeypatch):
    import harness.launch.worker as worker
    import harness.stage

    def preempted(gin_text, stage_id, results_dir, stop_event=None):
        stop_event.set("SIGUSR2")  # what the signal handler does
        assert stop_event.is_set()
        return {"status": "preempted", "stage_id": stage_id, "step": 7}

    calls = []
    monkeypatch.setattr(harness.stage, "run_stage", preempted)
    monkeypatch.setattr(worker, "requeue_this_job", lambda: calls.append(os.environ["SLURM_JOB_ID"]))
    # Not on SLURM: return the preempted result, a later launch resumes.
    assert worker.run_stage_job("", "abc", "/r")["status"] == "preempted" and calls == []
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setattr(worker, "distributed_from_env", _no_distributed)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(SystemExit):
        worker.run_stage_job("", "abc", "/r", max_requeues=2)
    assert calls == ["42"]
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    with pytest.raises(HarnessError, match="max_requeues = 2"):
        worker.run_stage_job("", "abc", "/r", max_requeues=2)
    assert calls == ["42"]


class _no_distributed:
    def __enter__(self):
        return 0, 1

    def __exit__(self, *exc):
        return False


def test_process_group_waits_hours_for_rank_0s_evaluation(monkeypatch):
    """Only rank 0 evaluates (FID sampling) while the others wait in a collective: torch's default 10-minute
    timeout would let the NCCL watchdog kill a long evaluation."""
    import datetime

    import torch
    import torch.distributed as dist

    import harness.launch.worker as worker

    calls = []
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroyed"))
    with worker.distributed_from_env() as (rank, world):
        assert (rank, world) == (0, 2)
    assert calls[0]["backend"] == "gloo" and calls[1] == "destroyed"
    assert calls[0].get("timeout", datetime.timedelta(minutes=10)) >= datetime.timedelta(hours=2)


@pytest.fixture
def own_environ(monkeypatch):
    """A copy of os.environ for the test: what distributed_from_env exports (RANK, WORLD_SIZE, ...) must not reach
    the next test, which would then wait for ranks that do not exist."""
    monkeypatch.setattr(os, "environ", dict(os.environ))


def _slurm_task(monkeypatch, procid: int, nodes: int = 2, tasks_per_node: int = 4, job_id: str = "4242") -> None:
    """The environment SLURM gives task `procid` of a job on `nodes` nodes x `tasks_per_node` tasks."""
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        os.environ.pop(name, None)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", job_id)
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]" if nodes == 2 else "gpu07")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", str(nodes))
    monkeypatch.setenv("SLURM_NTASKS", str(nodes * tasks_per_node))
    monkeypatch.setenv("SLURM_PROCID", str(procid))
    monkeypatch.setenv("SLURM_LOCALID", str(procid % tasks_per_node))
    monkeypatch.setenv("SLURM_NODEID", str(procid // tasks_per_node))


def test_rendezvous_of_nodes_times_tasks_from_slurms_variables(monkeypatch, own_environ):
    """2 nodes x 4 tasks: 8 ranks, RANK = SLURM_PROCID, LOCAL_RANK = SLURM_LOCALID, rank 0's node (the first of
    the node list) is the rendezvous address, and every task agrees on the port, also after a requeue."""
    from harness.launch.worker import rendezvous_variables

    seen = []
    for procid in range(8):
        _slurm_task(monkeypatch, procid)
        seen.append(rendezvous_variables())
    assert [v["RANK"] for v in seen] == [str(r) for r in range(8)]
    assert [v["LOCAL_RANK"] for v in seen] == ["0", "1", "2", "3"] * 2
    assert {v["WORLD_SIZE"] for v in seen} == {"8"} and {v["LOCAL_WORLD_SIZE"] for v in seen} == {"4"}
    assert {v["MASTER_ADDR"] for v in seen} == {"gpu07"}
    (port,) = {v["MASTER_PORT"] for v in seen}
    assert 20000 <= int(port) <= 60000
    _slurm_task(monkeypatch, 3, job_id="4243")  # another job (on the same node, maybe): another port
    assert rendezvous_variables()["MASTER_PORT"] != port
    monkeypatch.setenv("MASTER_PORT", "29500")  # set by the user: every task takes it
    assert rendezvous_variables()["MASTER_PORT"] == "29500"


def test_a_task_of_a_multi_task_job_joins_the_process_group_with_its_rank(monkeypatch, own_environ):
    """distributed_from_env exports the rendezvous for torch's env:// initialisation (gloo without a GPU), and
    leaves a torchrun environment (WORLD_SIZE already set) as it is."""
    import torch
    import torch.distributed as dist

    import harness.launch.worker as worker

    joined = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: joined.append(
        {k: os.environ[k] for k in ("MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")} | kwargs))
    monkeypatch.setattr(dist, "get_rank", lambda: int(os.environ["RANK"]))
    monkeypatch.setattr(dist, "get_world_size", lambda: int(os.environ["WORLD_SIZE"]))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: None)
    _slurm_task(monkeypatch, 6)
    with worker.distributed_from_env() as (rank, world):
        assert (rank, world) == (6, 8)
    assert joined[0]["MASTER_ADDR"] == "gpu07" and joined[0]["LOCAL_RANK"] == "2" and joined[0]["backend"] == "gloo"
    monkeypatch.setenv("RANK", "1")  # torchrun's own variables win
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with worker.distributed_from_env() as (rank, world):
        assert (rank, world) == (1, 2)
    assert joined[1]["MASTER_ADDR"] == "127.0.0.1"
    _slurm_task(monkeypatch, 0, nodes=1, tasks_per_node=1)  # one task: no process group at all
    with worker.distributed_from_env() as (rank, world):
        assert (rank, world) == (0, 1)
    assert len(joined) == 2


def test_sigterm_to_an_inline_run_starts_no_further_stage(tmp_path, monkeypatch):
    """SIGTERM checkpoints the running stage ('preempted'); the stages after it must not start in its place."""
    import harness.stage
    from harness.config import load_recipe
    from harness.experiment import plan_from_gin

    started = []

    def terminated(gin_text, stage_id, results_dir, stop_event=None):
        started.append(stage_id)
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. `kill` or SLURM's scancel on the inline run
        deadline = time.monotonic() + 5
        while not stop_event.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        return {"status": "preempted" if stop_event.is_set() else "done", "stage_id": stage_id, "step": 2}

    monkeypatch.setattr(harness.stage, "run_stage", terminated)
    text = load_recipe(write_fast_recipe(tmp_path), [])
    plan = plan_from_gin(text)
    results = launch_plan(plan, text, tmp_path / "r", InlineLauncher())
    assert started == [results[0]["stage_id"]]
    assert [(r["name"], r["status"]) for r in results] == [("scratch", "preempted"), ("pretrain", "cancelled"),
                                                           ("finetune", "cancelled")]
    assert results[0]["signal"] == "SIGTERM" and "stopped (SIGTERM)" in results[1]["error"]
    with pytest.raises(HarnessError, match="3 stage"):
        from harness.launch.run import raise_for_failures

        raise_for_failures(results)


# -- harness run / sweep: what they check before launching -------------------------------------------------------
@pytest.mark.parametrize("command", [["run"], ["run", "--launcher", "local"],
                                     ["sweep", "--grid", "MASK_RATIO=[0.5]"]])
def test_no_wait_is_refused_unless_the_launcher_is_slurm(tmp_path, capsys, command):
    """Inline (and local) stages end with this process: --no-wait would train everything and then exit 0
    without the report or the failures."""
    recipe = write_fast_recipe(tmp_path)
    code = harness_main([command[0], str(recipe), *command[1:], "--no-wait", "--results-dir", str(tmp_path / "r")])
    assert code == 2
    assert "error: --no-wait needs --launcher slurm" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing trained, nothing written


def test_harness_run_writes_the_plan_once_before_launching(tmp_path, monkeypatch):
    import harness.launch.run as run
    from harness.experiment import Plan

    writes, seen = [], []
    original = Plan.write
    monkeypatch.setattr(Plan, "write", lambda self, results_dir: writes.append(1) or original(self, results_dir))
    monkeypatch.setattr(run, "_run_inline", lambda jobs, results_dir: seen.append(
        (results_dir / "fast" / "plan.json").is_file()) or [])
    code = harness_main(["run", str(write_fast_recipe(tmp_path)), "--results-dir", str(tmp_path / "r"),
                         "--no-report"])
    assert (code, writes, seen) == (0, [1], [True])


@pytest.mark.parametrize("launcher", ["inline", "local"])
def test_stage_whose_unselected_parent_is_not_done_is_refused(tmp_path, capsys, launcher):
    recipe = write_fast_recipe(tmp_path)
    with _fails_after(60):  # the local launcher used to wait forever for the parent
        code = harness_main(["run", str(recipe), "--launcher", launcher, "--stage", "finetune", "--no-report",
                             "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "needs its parent pretrain" in err and "add --stage pretrain" in err
    assert not list((tmp_path / "r").glob("fast/*/finetune-*"))  # nothing launched


class _fails_after:
    """Turn a hang into a test failure (SIGALRM interrupts the launcher's polling sleep)."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds

    def __enter__(self):
        def timeout(_signum, _frame):
            raise TimeoutError(f"still running after {self.seconds} s")

        self.previous = signal.signal(signal.SIGALRM, timeout)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)
        return False


# -- real runs: inline and submitit's LocalExecutor -------------------------------------------------------------
@pytest.mark.slow
def test_local_executor_runs_the_stages_like_inline(tmp_path):
    import torch

    from harness.checkpoint import load_checkpoint, newest_valid_checkpoint
    from harness.config import load_recipe
    from harness.experiment import plan_from_gin

    recipe = write_fast_recipe(tmp_path)
    text = load_recipe(recipe, ["Experiment.arms = {'two_stage': [@pretrain/Stage(), @finetune/Stage()]}"])
    plan = plan_from_gin(text)
    local = launch_plan(plan, text, tmp_path / "local", LocalLauncher(poll_seconds=0.2))
    assert [(r["name"], r["status"]) for r in local] == [("pretrain", "done"), ("finetune", "done")]
    jobs = [json.loads((Path(r["dir"]) / "job.json").read_text()) for r in local]
    assert {j["launcher"] for j in jobs} == {"local"}
    assert len({j["pid"] for j in jobs}) == 2 and os.getpid() not in {j["pid"] for j in jobs}  # subprocesses
    # The fine-tuning process started after the pretraining stage was done.
    pretrain_dir, finetune_dir = Path(local[0]["dir"]), Path(local[1]["dir"])
    assert (finetune_dir / "stage.json").stat().st_mtime >= (pretrain_dir / "DONE").stat().st_mtime

    inline = launch_plan(plan, text, tmp_path / "inline", InlineLauncher())
    assert [r["status"] for r in inline] == ["done"] * 2
    for a, b in zip(local, inline):  # same recipe, same weights, whichever launcher ran it
        wa = load_checkpoint(newest_valid_checkpoint(Path(a["dir"]) / "checkpoints"))["model"]
        wb = load_checkpoint(newest_valid_checkpoint(Path(b["dir"]) / "checkpoints"))["model"]
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    again = launch_plan(plan, text, tmp_path / "local", LocalLauncher(poll_seconds=0.2))
    assert [r["status"] for r in again] == ["skipped"] * 2  # finished stages are not resubmitted


@pytest.mark.slow
def test_inline_failure_cancels_the_children_only(tmp_path):
    from harness.config import load_recipe
    from harness.experiment import plan_from_gin
    from harness.launch.run import raise_for_failures

    recipe = write_fast_recipe(tmp_path)
    text = load_recipe(recipe, ["pretrain/DataConfig.source = 'folder'",
                                f"pretrain/DataConfig.root = '{tmp_path / 'missing'}'"])
    results = launch_plan(plan_from_gin(text), text, tmp_path / "r")
    assert [(r["name"], r["status"]) for r in results] == [("scratch", "done"), ("pretrain", "failed"),
                                                           ("finetune", "cancelled")]
    assert "does not exist" in (Path(results[1]["dir"]) / "FAILED").read_text()
    assert not Path(results[2]["dir"]).exists()
    with pytest.raises(HarnessError, match="2 stage"):
        raise_for_failures(results)
    # the records (and so the report) call the cancelled child what `harness status` calls it
    from harness.results import collect

    plan_from_gin(text).write(tmp_path / "r")
    records = collect(tmp_path / "r" / "fast")
    statuses = {stage: set(group.status) for stage, group in records.groupby("stage")}
    assert statuses == {"scratch": {"done"}, "pretrain": {"failed"}, "finetune": {"blocked"}}


@pytest.mark.slow
def test_local_launcher_runs_a_stage_whose_parent_finished_earlier(tmp_path):
    """`--stage finetune` leaves the (finished) parent out of the launch; it used to be waited for forever."""
    recipe = write_fast_recipe(tmp_path)
    common = [str(recipe), "--no-report", "--results-dir", str(tmp_path / "r"), "--gin",
              "LocalLauncher.poll_seconds = 0.2"]
    assert harness_main(["run", *common, "--stage", "pretrain"]) == 0
    with _fails_after(180):
        assert harness_main(["run", *common, "--launcher", "local", "--stage", "finetune"]) == 0
    (finetune,) = (tmp_path / "r" / "fast" / "two_stage").glob("finetune-*")
    assert (finetune / "DONE").is_file() and json.loads((finetune / "job.json").read_text())["launcher"] == "local"
    assert not list((tmp_path / "r" / "fast").glob("scratch/scratch-*"))  # not selected, not run


@pytest.mark.slow
def test_a_point_added_to_a_finished_sweep_links_the_shared_stages(tmp_path):
    """Re-running a sweep with an extra value: another grid, so another sweep folder, whose stages finished by the
    first sweep (scratch, pretrain, and the first point's fine-tuning) are linked there, not trained again."""
    from harness.results import collect
    from harness.sweep import sweep_folder_name

    recipe = write_fast_recipe(tmp_path)
    results = tmp_path / "r"

    def sweep(values: str) -> Path:
        grid = f"finetune/Stage.lr=[{values}]"
        assert harness_main(["sweep", str(recipe), "--grid", grid, "--results-dir", str(results)]) == 0
        return results / sweep_folder_name(build_sweep(str(recipe), [], [parse_grid(grid)]))

    (first,) = [p.parent for p in sweep("1e-4").glob("*/plan.json")]
    second = sweep("1e-4,2e-4")
    assert second != first.parent
    same, new = second / first.name, second / "fast-lr=0.0002"
    for arm, stage in (("scratch", "scratch"), ("two_stage", "pretrain"), ("two_stage", "finetune")):
        (linked,) = (same / arm).glob(f"{stage}-*")
        assert linked.is_symlink() and linked.resolve() == (first / arm / linked.name).resolve()
    for arm, stage in (("scratch", "scratch"), ("two_stage", "pretrain")):
        (linked,) = (new / arm).glob(f"{stage}-*")
        assert linked.is_symlink() and linked.resolve() == (first / arm / linked.name).resolve()
        assert _steps_of(linked) == [1, 2, 3]  # trained once, by the first sweep
    (finetune,) = (new / "two_stage").glob("finetune-*")
    assert (finetune / "DONE").is_file() and not finetune.is_symlink()
    assert set(collect(new).stage) == {"scratch", "pretrain", "finetune"}  # the report has its baseline


def _steps_of(stage_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
