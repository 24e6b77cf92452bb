"""Sweeps on the real local Slurm cluster: dependencies, status, failures, requeue, cancellation."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import REPO, TINY_MODEL, cli, one_line_error, tiny_config
from replandscape.storage import open_activations
from replandscape.sweep import load_sweep, plan_sweep, single_experiment

SLURM = ("cluster=local-slurm",)


def _sweep_file(tmp: Path, cfg: Path, **extra: object) -> Path:
    path = tmp / "sweep.yaml"
    spec = {"name": "t", "output_root": str(tmp / "root"), "experiments": [str(cfg)],
            "shots": [0, 2], "finetune": True, **extra}
    path.write_text(yaml.safe_dump({"sweep": spec}))
    return path


def _small(tmp: Path, **sections: dict) -> Path:
    base: dict[str, dict] = {
        "data": {"source": "builtin:demo-mmlu", "limit": 60},
        "finetune": {"epochs": 1, "effective_batch": 8, "micro_batch": 8,
                     "samples_per_subject": 8, "log_checkpoints": 2},
        "analysis": {"maxk": 20, "range_max": 16, "id_scale_index": 2, "density_k": 8,
                     "dendrogram_min_size": 3, "ranks": 2}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return tiny_config(tmp, **base)


def test_plan_has_arrays_dependencies_and_resources(tmp_path: Path) -> None:
    sweep = load_sweep(_sweep_file(tmp_path, _small(tmp_path)), SLURM)
    jobs = {j.key: j for j in plan_sweep(sweep)}
    assert list(jobs) == ["t/extract", "t/finetune", "t/extract-ft", "t/analyze", "t/figures"]
    assert jobs["t/extract"].array_labels == ("shots0", "shots2")
    assert jobs["t/extract-ft"].depends_on == ("t/finetune",)
    assert set(jobs["t/analyze"].depends_on) == {"t/extract", "t/extract-ft"}
    assert jobs["t/analyze"].tasks_per_node == 2 and jobs["t/figures"].depends_on == ("t/analyze",)
    out = cli("submit", str(_sweep_file(tmp_path, _small(tmp_path))), *SLURM, "--dry-run")
    assert out.returncode == 0 and "array[shots0,shots2]" in out.stdout


def test_paper_sweep_sizes_jobs_from_the_models() -> None:
    sweep = load_sweep(REPO / "configs" / "sweeps" / "paper.yaml", ["cluster=example-gpu"])
    jobs = {j.key: j for j in plan_sweep(sweep)}
    big = jobs["mmlu-llama3-70b/extract"]
    assert (big.nodes, big.tasks_per_node, big.gpus_per_node) == (1, 4, 4)
    small = jobs["mmlu-llama3-8b/extract"]
    assert (small.nodes, small.tasks_per_node, small.gpus_per_node) == (1, 1, 1)
    assert len(jobs) == 3 * 4 + 1


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (("cluster=no-such-site",), "no cluster config named 'no-such-site'"),
        (("cluster=local-slurm", "model.gpus=8", "model.gpus_per_node=8",
          "cluster.gpus_per_node=4"), "needs 2 nodes, the partition has 1"),
        (("cluster=local-slurm", "analysis.ranks=4", "cluster.cpus_per_task=2"),
         "needs 4 nodes, the partition has 1"),
    ],
)
def test_bad_submissions_are_refused_before_queueing(tmp_path: Path, overrides: tuple[str, ...],
                                                     words: str) -> None:
    line = one_line_error(cli("submit", str(_small(tmp_path)), *overrides))
    assert words in line
    assert not (tmp_path / "out" / "sweep-t.json").exists()


@pytest.mark.slurm
def test_unknown_partition_is_refused(slurm_cluster: object, tmp_path: Path) -> None:
    line = one_line_error(cli("submit", str(_small(tmp_path)), *SLURM, "cluster.partition=gpu"))
    assert "partition 'gpu' does not exist" in line and "local" in line


@pytest.mark.slurm
def test_outputs_of_another_config_are_refused(slurm_cluster: object, tmp_path: Path) -> None:
    cfg = _small(tmp_path)
    (tmp_path / "out" / "finetune").mkdir(parents=True)
    (tmp_path / "out" / "finetune" / "stage.sha256").write_text("0" * 64 + "\n")
    line = one_line_error(cli("submit", str(cfg), *SLURM))
    assert "another config" in line and "finetune" in line
    assert not (tmp_path / "out" / "sweep-t.json").exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_small_sweep_runs_end_to_end_as_real_jobs(slurm_cluster: object, tmp_path: Path) -> None:
    sweep_file = _sweep_file(tmp_path, _small(tmp_path))
    proc = cli("submit", str(sweep_file), *SLURM, "--wait", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "root"
    record = json.loads((root / "sweep-t.json").read_text())
    assert [j["key"] for j in record["jobs"]] == ["t/extract", "t/finetune", "t/extract-ft",
                                                  "t/analyze", "t/figures"]
    results = json.loads((root / "t" / "analysis" / "results.json").read_text())
    assert set(results["runs"]) == {"tiny/mmlu/shots0", "tiny/mmlu/shots2", "tiny/mmlu/ft-final"}
    assert "over 2 rank(s)" in Path(record["jobs"][3]["logs"][0]).read_text()
    # the figures job drew the real results: one line per condition, the expected panels
    from matplotlib.image import imread

    from replandscape.figures import plot_profiles
    from replandscape.results import read_results

    fig = plot_profiles(read_results(root / "t" / "analysis" / "results.json"), "tiny")
    assert len(fig.axes) == 3 and all(len(ax.get_lines()) == 3 for ax in fig.axes)
    png = imread(root / "figures" / "profiles_tiny_mmlu.png")
    assert png.shape[0] > 200 and png.std() > 0
    report = (root / "figures" / "report.md").read_text()
    assert "profiles_tiny_mmlu.png" in report and "fine-tuned" in report
    status = cli("status", str(root))
    assert status.returncode == 0 and status.stdout.count("COMPLETED") == 6
    # the array tasks left the experiment's own config beside its outputs
    exp = load_sweep(sweep_file, SLURM).experiments[0].cfg
    assert (root / "t" / "config.sha256").read_text().strip() == exp.hash
    # submitting again skips every complete output and queues nothing
    again = cli("submit", str(sweep_file), *SLURM, "--dry-run")
    assert again.stdout.count("complete: skipped") == 4
    # other analysis parameters: extraction and fine-tuning are reused, the analysis is not
    other = cli("submit", str(sweep_file), *SLURM, "analysis.z=2.5", "--dry-run")
    assert other.returncode == 0, other.stderr
    skipped = [ln for ln in other.stdout.splitlines() if "complete: skipped" in ln]
    assert len(skipped) == 3 and not any("analyze" in ln for ln in skipped), other.stdout
    resubmit = cli("submit", str(sweep_file), *SLURM)
    assert resubmit.returncode == 0 and "submitted 1 job(s)" in resubmit.stdout  # figures only


@pytest.mark.slurm
def test_failing_job_shows_its_error_in_status(slurm_cluster: object, tmp_path: Path) -> None:
    from replandscape.launch import submit

    cfg = _small(tmp_path, prompts={"shots": [0]}, finetune={"enabled": False})
    sweep = single_experiment(str(cfg), [*SLURM, "model.context_length=16"])
    assert submit(sweep, wait=True, wait_timeout_s=300) == 1
    status = cli("status", str(tmp_path / "out"))
    assert status.returncode == 1
    assert "FAILED" in status.stdout
    assert "error: replandscape: error:" in status.stdout and "context" in status.stdout


@pytest.mark.slurm
def test_cancelled_job_reads_cancelled(slurm_cluster: object, tmp_path: Path) -> None:
    from replandscape.launch import submit_plan

    # a job that runs for minutes, so that it cannot complete between being seen running and
    # the cancel taking effect (a few seconds of work did, on a loaded machine)
    model = dict(TINY_MODEL, name="slow", n_layers=8, hidden_size=512, tiny_intermediate_size=2048)
    cfg = _small(tmp_path, data={"limit": 360}, model=model, prompts={"shots": [5]},
                 extract={"batch_size": 1}, finetune={"enabled": False})
    sweep = single_experiment(str(cfg), SLURM)
    jobs = [j for j in plan_sweep(sweep) if j.stage == "extract"]
    record = submit_plan(sweep, jobs, tmp_path / "logs")
    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "out" / "sweep-t.json").write_text(json.dumps(record))
    jid = record["jobs"][0]["job_ids"][0]
    slurm_cluster.wait_for_state(jid, ("RUNNING",), timeout_s=60)  # type: ignore[attr-defined]
    slurm_cluster.run("scancel", jid.split("_")[0])  # type: ignore[attr-defined]
    state = slurm_cluster.wait_for_state(jid, ("CANCELLED",), timeout_s=60)  # type: ignore[attr-defined]
    assert state.startswith("CANCELLED")
    status = cli("status", str(tmp_path / "out"))
    assert "CANCELLED" in status.stdout and status.returncode == 1


@pytest.mark.slurm
@pytest.mark.slow
def test_interrupted_job_is_requeued_and_ends_like_an_uninterrupted_one(
        slurm_cluster: object, tmp_path: Path) -> None:
    import submitit

    from replandscape.launch import StageJob

    # a model big enough that the job is still running when it is interrupted (~10 s of work)
    model = dict(TINY_MODEL, name="slow", n_layers=6, hidden_size=256, tiny_intermediate_size=1024)
    cfg = _small(tmp_path, data={"source": "builtin:demo-mmlu", "limit": 200}, model=model,
                 prompts={"shots": [5]}, extract={"batch_size": 2, "store_dtype": "float32"},
                 finetune={"enabled": False})
    ref = cli("run", "extract", str(cfg), f"run.output_dir={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr
    ex = submitit.AutoExecutor(folder=tmp_path / "logs" / "%j", cluster="slurm")
    ex.update_parameters(slurm_partition="local", timeout_min=10, cpus_per_task=1, mem_gb=4)
    job = ex.submit(StageJob(), "extract", str(cfg), ["cluster=local-slurm"])
    partial = [tmp_path / "out" / "activations" / "shots5.parts" / "rank0000.h5",
               tmp_path / "out" / "activations" / "shots5.mpio.h5"]  # srun ranks are MPI ranks
    deadline = time.monotonic() + 180
    while not any(p.exists() for p in partial):  # interrupt once it has written rows
        assert time.monotonic() < deadline, "the job never started writing"
        time.sleep(0.5)
    time.sleep(1)
    job._interrupt()  # SIGUSR2, as on preemption: submitit checkpoints and requeues
    requeued = False
    while True:
        assert time.monotonic() < deadline + 240, "the requeued job never finished"
        state = slurm_cluster.state(job.job_id)  # type: ignore[attr-defined]
        if state.startswith(("PENDING", "REQUEUED")):
            requeued = True
            slurm_cluster.release(job.job_id)  # type: ignore[attr-defined]
        if state.startswith("COMPLETED"):
            break
        assert not state.startswith(("FAILED", "CANCELLED")), state
        time.sleep(1)
    log = Path(str(job.paths.stderr)).read_text()
    assert requeued or "requeue" in log.lower()
    with open_activations(tmp_path / "ref" / "activations" / "shots5.h5") as a, \
            open_activations(tmp_path / "out" / "activations" / "shots5.h5") as b:
        for name in a.site_names:
            np.testing.assert_allclose(a.site(name), b.site(name), atol=1e-6)
        assert np.array_equal(a.rows("question_id"), b.rows("question_id"))


def test_ls_lists_outputs_and_partial_runs(tmp_path: Path) -> None:
    cfg = _small(tmp_path, prompts={"shots": [0]})
    assert cli("run", "extract", str(cfg)).returncode == 0
    (tmp_path / "out" / "activations" / "shots2.parts").mkdir()
    out = cli("ls", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(ln.split()[:2] == ["shots0", "60"] for ln in lines)
    assert any("shots2" in ln and "partial" in ln for ln in lines)
    assert "shots0" not in "".join(ln for ln in lines if "partial" in ln)


@pytest.mark.slurm
def test_second_submission_on_running_outputs_is_refused(slurm_cluster: object,
                                                          tmp_path: Path) -> None:
    cfg = _small(tmp_path, prompts={"shots": [5]}, extract={"batch_size": 1},
                 finetune={"enabled": False})
    first = cli("submit", str(cfg), *SLURM)
    assert first.returncode == 0, first.stderr
    try:
        line = one_line_error(cli("submit", str(cfg), *SLURM))
        assert "still has" in line and "queued or running" in line
    finally:
        record = json.loads((tmp_path / "out" / "sweep-t.json").read_text())
        ids = {i.split("_")[0] for j in record["jobs"] for i in j["job_ids"]}
        slurm_cluster.run("scancel", *ids)  # type: ignore[attr-defined]
        for i in ids:
            slurm_cluster.wait_for_state(i, ("CANCELLED", "COMPLETED", "FAILED"),  # type: ignore[attr-defined]
                                         timeout_s=60)


def test_validate_checks_every_experiment_of_a_sweep(tmp_path: Path) -> None:
    sweep = _sweep_file(tmp_path, _small(tmp_path))
    ok = cli("validate", str(sweep))
    assert ok.returncode == 0 and "sweep t: 1 experiment(s)" in ok.stdout
    # only the data tell: 6 subjects x 3 points per subject < maxk 20
    bad = _sweep_file(tmp_path, _small(tmp_path), overrides=["analysis.per_subject_cap=3"])
    line = one_line_error(cli("validate", str(bad)))
    assert "analysis.maxk" in line and "sees 18 points" in line


def test_a_model_larger_than_its_gpus_is_refused_before_queueing(tmp_path: Path) -> None:
    from replandscape.config import load_config
    from replandscape.sweep import fewest_gpus, gpu_memory_gb

    exp = REPO / "configs" / "experiments" / "mmlu-llama3-70b.yaml"
    line = one_line_error(cli("submit", str(exp), "cluster=example-gpu", "model.gpus=1",
                              "--dry-run"))
    assert "model.gpus" in line and "needs at least 3 GPUs" in line and "80 GB" in line
    assert "set model.gpus=3" in line
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"sweep": {"name": "big", "output_root": str(tmp_path / "o"),
                                               "experiments": [str(exp)]}}))
    line = one_line_error(cli("validate", str(sweep), "-o", "cluster=example-gpu",
                              "-o", "model.gpus=1"))
    assert "needs at least 3 GPUs" in line
    # the shipped layout fits: 4 x 80 GB, weights partitioned by ZeRO-3
    cfg = load_config(str(exp), ["cluster=example-gpu"])
    assert cfg.model.gpus == 4 and cfg.cluster.gpu_mem_gb == 80
    need, sharded = gpu_memory_gb(cfg, "extract", 4)
    assert sharded and need == pytest.approx(70.6 * 2 * 1.2 / 4)
    assert gpu_memory_gb(cfg, "finetune", 4)[0] < 80 < gpu_memory_gb(cfg, "finetune", 1)[0]
    assert fewest_gpus(cfg, "finetune", 80) == 3 and fewest_gpus(cfg, "extract", 200) == 1


def test_an_unfinished_finetune_is_not_done_for_submit_or_status(tmp_path: Path) -> None:
    from replandscape.launch import record_entry

    cfg = _small(tmp_path, prompts={"shots": [0]})
    run = cli("run", "finetune", str(cfg))
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "out"

    def seen() -> tuple[bool, str]:
        jobs = plan_sweep(single_experiment(str(cfg), SLURM))
        (out / "sweep-t.json").write_text(json.dumps(
            {"sweep": "t", "jobs": [record_entry(j) for j in jobs]}))
        status = cli("status", str(out))
        assert status.returncode == 0, status.stderr
        line = next(ln for ln in status.stdout.splitlines() if "t/finetune" in ln)
        return next(j for j in jobs if j.stage == "finetune").done, line.split()[-1]

    assert seen() == (True, "1/1")
    # cut short after its adapters were listed (checkpoints.json) but before its marker
    result = out / "finetune" / "result.json"
    kept = result.read_text()
    result.unlink()
    assert (out / "finetune" / "checkpoints.json").is_file()
    assert seen() == (False, "0/1")
    result.write_text(kept[: len(kept) // 2])  # a damaged marker is not a finished run either
    assert seen() == (False, "0/1")


def test_an_unreachable_slurm_is_one_line_before_anything_is_queued(tmp_path: Path) -> None:
    """sinfo failing (no controller, no config) is refused in one line naming the fix, and no
    job is queued nor any record written."""
    import shutil

    if shutil.which("sinfo") is None:
        pytest.skip("no Slurm client here")
    cfg = tiny_config(tmp_path)
    proc = cli("submit", str(cfg), "cluster=local-slurm",
               SLURM_CONF=str(tmp_path / "no-such-slurm.conf"))
    line = one_line_error(proc)
    assert "Slurm does not answer" in line and "slurm/cluster.sh env" in line
    assert not list((tmp_path / "out").glob("sweep-*.json"))
