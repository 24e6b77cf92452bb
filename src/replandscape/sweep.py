"""Sweeps: expanding models x shots x fine-tuning into Slurm jobs with resources and dependencies.

This module only plans (no submitit, no Slurm calls except the optional partition check), so
``--dry-run`` and the tests see exactly what would be queued. :mod:`replandscape.launch` submits a
plan with submitit.

A sweep file::

    sweep:
      name: paper
      output_root: outputs/paper          # each experiment writes to output_root/<run.name>
      experiments: [configs/experiments/mmlu-llama3-8b.yaml, ...]
      shots: [0, 1, 2, 5]                 # optional: replaces prompts.shots everywhere
      finetune: true                      # optional: replaces finetune.enabled everywhere
      overrides: ["analysis.maxk=500"]    # optional: applied to every experiment
      models: [qwen1.5-0.5b, pythia-1.4b] # optional axis: each experiment once per model file
      tasks: [expression, boolean]        # optional axis: each experiment once per task
      patch: true                         # optional: a patch job per experiment (circuit shift;
                                          # with patch.parts > 1 an array and a gather job)
      rsa: true                           # optional: an rsa job per experiment (RSA, probes)
      knockout: true                      # optional: a knockout job per experiment (narrow gate)
      share_finetune: true                # default: one fine-tuning per (model, mixture)

With ``models`` or ``tasks``, every experiment is expanded over them (experiment x model x task,
named ``<run.name>-<model>-<task>``): the task is an axis like the model.

Shared fine-tuning (docs/method.md §7.6): experiments that fine-tune on a task mixture
(``finetune.tasks``) train on the same data whatever their own task, so the task experiments of
one model and mixture would train the same model once each. :func:`share_finetunes` gives them
one folder, ``<output_root>/finetune-<model>-<hash8>`` (``finetune.output_dir``), and has that run
score every task of the sweep (``finetune.eval_tasks``), which makes their stage hashes equal:
the plan holds one ``finetune`` job for them (key ``<model>/finetune-<hash8>``) and each one's
``extract-ft`` and ``patch`` jobs depend on it. ``share_finetune: false`` keeps one fine-tuning
per experiment, in its own folder.

Per experiment: ``extract`` (a job array, one task per shot count), ``finetune``, ``extract-ft``
(after finetune), ``analyze`` (after both; MPI ranks through srun); then one ``figures`` job after
every analysis.

Whether an output is complete is decided by one function, :func:`output_complete`, for planning
(complete outputs are skipped) and for ``replandscape status`` alike. Each stage writes its marker
last: extraction renames its finished ``.h5`` into place, fine-tuning writes ``result.json`` after
its final adapter and evaluation, the analysis writes ``results.json`` with its parameters' hash.

Before anything is queued, :func:`check_gpu_memory` refuses a model whose weights cannot fit the
profile's GPUs (``cluster.gpu_mem_gb``) at ``model.gpus``, naming the GPU count that would.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from replandscape.config import (
    ExperimentConfig,
    build_dataclass,
    config_root,
    load_config,
    parse_override,
    read_yaml,
)
from replandscape.errors import UserError


@dataclass(frozen=True)
class SweepSpec:
    name: str
    output_root: str
    experiments: tuple[str, ...]
    shots: tuple[int, ...] | None = None
    finetune: bool | None = None
    overrides: tuple[str, ...] = ()
    models: tuple[str, ...] | None = None
    tasks: tuple[str, ...] | None = None
    # also patch every condition (replandscape run patch) after extraction and fine-tuning
    patch: bool = False
    # also run the RSA and probes (replandscape run rsa) after extraction
    rsa: bool = False
    # also knock out the position sets of every base condition with shots (replandscape run
    # knockout) after extraction
    knockout: bool = False
    # one fine-tuning per (model, settings, task mixture), shared by the experiments that differ
    # only in their own task (share_finetunes); false: one per experiment, in its own folder
    share_finetune: bool = True


@dataclass(frozen=True)
class Experiment:
    config_file: str
    overrides: tuple[str, ...]
    cfg: ExperimentConfig


@dataclass
class Sweep:
    name: str
    output_root: Path
    experiments: list[Experiment]
    source: str
    patch: bool = False
    rsa: bool = False
    knockout: bool = False


@dataclass
class JobSpec:
    """One Slurm job (or job array) of a plan."""

    key: str
    stage: str
    config_file: str
    overrides: tuple[str, ...]
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    cpus_per_task: int
    mem_gb: int
    timeout_min: int
    depends_on: tuple[str, ...] = ()
    array: tuple[tuple[str, ...], ...] = ()  # extra overrides per array task
    array_labels: tuple[str, ...] = ()
    array_outputs: tuple[str, ...] = ()  # what each array task must leave behind
    outputs: tuple[str, ...] = ()
    done: bool = False
    cluster: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tasks(self) -> int:
        return max(1, len(self.array))

    def describe(self) -> str:
        res = (f"nodes={self.nodes} tasks/node={self.tasks_per_node} gpus/node={self.gpus_per_node}"
               f" cpus/task={self.cpus_per_task} mem={self.mem_gb}G time={self.timeout_min}min")
        arr = f" array[{','.join(self.array_labels)}]" if self.array else ""
        dep = f" after {', '.join(self.depends_on)}" if self.depends_on else ""
        state = " (complete: skipped)" if self.done else ""
        return f"{self.key}{arr}: {res}{dep}{state}"


def _resolve_path(text: str, sweep_file: Path) -> str:
    path = Path(text)
    if path.is_absolute() and path.exists():
        return str(path)
    for base in (Path.cwd(), config_root(sweep_file.parent).parent, sweep_file.parent):
        if (base / path).is_file():
            return str((base / path).resolve())
    return str(path)


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> Sweep:
    """Load a sweep file and every experiment config in it (all validated before any submit)."""
    path = Path(path)
    data = read_yaml(path)
    unknown = [k for k in data if k != "sweep"]
    if unknown:
        raise UserError("unknown top-level key", file=str(path), key=unknown[0],
                        fix="a sweep file holds only 'sweep:'")
    spec = build_dataclass(SweepSpec, data["sweep"], "sweep", str(path))
    if not spec.experiments:
        raise UserError("no experiments", file=str(path), key="sweep.experiments",
                        fix="list experiment config files")
    group_overrides = [o for o in overrides if parse_override(o)[0][0] in ("cluster", "model")
                       or o.startswith(("cluster.", "model."))]
    other = [o for o in overrides if o not in group_overrides]
    for axis in ("models", "tasks"):
        if getattr(spec, axis) is not None and not getattr(spec, axis):
            raise UserError(f"the {axis} axis is empty", file=str(path), key=f"sweep.{axis}",
                            fix=f"list at least one, or remove sweep.{axis}")
    names: set[str] = set()
    experiments = []
    for i, exp in enumerate(spec.experiments):
        file = _resolve_path(exp, path)
        if not Path(file).is_file():
            raise UserError(f"experiment config '{exp}' not found", file=str(path),
                            key=f"sweep.experiments[{i}]", fix="check the path")
        for axis_overrides, suffix in _axis_points(spec):
            extra = (list(spec.overrides) + list(axis_overrides) + list(group_overrides)
                     + list(other))
            if spec.shots is not None:
                extra.append(f"prompts.shots=[{','.join(str(k) for k in spec.shots)}]")
            if spec.finetune is not None:
                extra.append(f"finetune.enabled={str(spec.finetune).lower()}")
            cfg = load_config(file, extra)
            if suffix:
                extra.append(f"run.name={cfg.run.name}{suffix}")
                cfg = load_config(file, extra)
            if cfg.run.name in names:
                raise UserError(f"two experiments are named '{cfg.run.name}'", file=str(path),
                                key=f"sweep.experiments[{i}]", fix="give each a distinct run.name")
            names.add(cfg.run.name)
            out = Path(spec.output_root) / cfg.run.name
            extra.append(f"run.output_dir={out}")
            cfg = load_config(file, extra)
            check_model_fits(cfg, file)
            experiments.append(Experiment(file, tuple(extra), cfg))
    if spec.share_finetune:
        experiments = share_finetunes(experiments, Path(spec.output_root), spec.tasks)
    check_finetune_folders(experiments, str(path))
    return Sweep(spec.name, Path(spec.output_root), experiments, str(path), patch=spec.patch,
                 rsa=spec.rsa, knockout=spec.knockout)


def share_finetunes(experiments: Sequence[Experiment], output_root: Path,
                    axis: Sequence[str] | None = None) -> list[Experiment]:
    """Give the experiments whose fine-tunings would be the same run one folder.

    Candidates fine-tune (``finetune.enabled``) on a mixture (``finetune.tasks``) of generated
    tasks (``data.source: builtin:task``) into the default folder. Each is given
    ``finetune.eval_tasks`` = its own plus the sweep's tasks (``axis``; without one, the own tasks
    of every candidate), so the run scores every task and its stage hash no longer depends on
    the experiment's own task (:func:`replandscape.stages.finetune.stage_hash`). Candidates with
    equal hashes (same model, data, prompts seed, fine-tuning settings, mixture and run seed) are
    a group; a group of two or more gets ``finetune.output_dir=<output_root>/finetune-<model>-
    <first 8 of the hash>`` besides. A candidate alone keeps its config unchanged.
    """
    from replandscape.evalset import BUILTIN_TASK
    from replandscape.stages.finetune import stage_hash

    def candidate(cfg: ExperimentConfig) -> bool:
        f = cfg.finetune
        return (f.enabled and bool(f.tasks) and f.output_dir is None
                and cfg.data.source == BUILTIN_TASK)

    out = list(experiments)
    chosen = [i for i, e in enumerate(out) if candidate(e.cfg)]
    tasks = list(axis) if axis else list(dict.fromkeys(out[i].cfg.task.name for i in chosen))
    groups: dict[str, list[tuple[int, tuple[str, ...]]]] = {}
    for i in chosen:
        cfg = out[i].cfg
        scored = tuple(dict.fromkeys((*cfg.finetune.eval_tasks, *tasks)))
        shared = cfg.replace(finetune=dataclasses.replace(cfg.finetune, eval_tasks=scored))
        groups.setdefault(stage_hash(shared), []).append((i, scored))
    for digest, members in groups.items():
        if len(members) < 2:
            continue
        model = "".join(c if c.isalnum() or c in "._-" else "_" for c in out[members[0][0]]
                        .cfg.model.name)
        folder = output_root / f"finetune-{model}-{digest[:8]}"
        for i, scored in members:
            exp = out[i]
            extra = (*exp.overrides, f"finetune.output_dir={folder}",
                     f"finetune.eval_tasks=[{','.join(scored)}]")
            cfg = load_config(exp.config_file, extra)
            if stage_hash(cfg) != digest:  # the overrides must give the identity grouped by
                raise AssertionError(f"{cfg.run.name}: shared fine-tuning hash mismatch")
            out[i] = Experiment(exp.config_file, extra, cfg)
    return out


def check_finetune_folders(experiments: Sequence[Experiment], where: str) -> None:
    """Refuse two experiments that would fine-tune different runs into one folder (a
    ``finetune.output_dir`` set by hand): the second would find a folder of another config.

    Raises:
        UserError: One line naming both experiments.
    """
    from replandscape.conditions import finetune_dir
    from replandscape.stages.finetune import stage_hash

    seen: dict[Path, tuple[str, str]] = {}
    for exp in experiments:
        if not exp.cfg.finetune.enabled:
            continue
        folder = finetune_dir(exp.cfg).resolve()
        digest = stage_hash(exp.cfg)
        other = seen.setdefault(folder, (exp.cfg.run.name, digest))
        if other[1] != digest:
            raise UserError(f"experiments '{other[0]}' and '{exp.cfg.run.name}' fine-tune "
                            f"different runs into one folder {folder}", file=where,
                            key="finetune.output_dir",
                            fix="give each fine-tuning its own finetune.output_dir (or null)")


def _axis_points(spec: SweepSpec) -> list[tuple[tuple[str, ...], str]]:
    """(overrides, run-name suffix) for every point of the sweep's model x task axes."""
    models: Sequence[str | None] = spec.models or (None,)
    tasks: Sequence[str | None] = spec.tasks or (None,)
    points = []
    for model in models:
        for task in tasks:
            overrides = ((f"model={model}",) if model else ()) + (
                (f"task.name={task}",) if task else ())
            suffix = "".join(f"-{v}" for v in (model, task) if v)
            points.append((overrides, suffix))
    return points


def single_experiment(config_file: str, overrides: Sequence[str], *,
                      studies: Sequence[str] = ()) -> Sweep:
    """A one-experiment sweep (the demo on Slurm, ``replandscape submit CONFIG``); ``studies``
    adds the jobs of those further stages (``patch``, ``knockout``, ``rsa``)."""
    unknown = sorted(set(studies) - {"patch", "knockout", "rsa"})
    if unknown:
        raise UserError(f"unknown study stage '{unknown[0]}'", key="studies",
                        fix="use patch, knockout or rsa")
    cfg = load_config(config_file, overrides)
    check_model_fits(cfg, config_file)
    return Sweep(cfg.run.name, cfg.output_dir, [Experiment(config_file, tuple(overrides), cfg)],
                 config_file, patch="patch" in studies, rsa="rsa" in studies,
                 knockout="knockout" in studies)


def check_model_fits(cfg: ExperimentConfig, where: str) -> None:
    """Refuse ``cfg`` if a GPU stage of it cannot fit its GPUs (:func:`check_gpu_memory`); run on
    every experiment a sweep loads, so ``validate`` and ``submit`` refuse it before queueing.

    Raises:
        UserError: One line with the estimate and the GPU count that would hold the model.
    """
    for stage in ("extract", "finetune") if cfg.finetune.enabled else ("extract",):
        check_gpu_memory(cfg, stage, where)


# --------------------------------------------------------------------------------------------
# resources
# --------------------------------------------------------------------------------------------


def _gpu_layout(cfg: ExperimentConfig, gpus: int) -> tuple[int, int, int]:
    """(nodes, tasks per node, GPUs per node): one task per GPU, or one CPU task without GPUs."""
    c = cfg.cluster
    if c.gpus_per_node == 0:
        return 1, 1, 0
    per_node = min(gpus, c.gpus_per_node, cfg.model.gpus_per_node)
    nodes = math.ceil(gpus / per_node)
    return nodes, per_node, per_node


def _job(cfg: ExperimentConfig, exp: Experiment, stage: str, key: str, *, gpus: int,
         ranks: int | None = None, **kw: Any) -> JobSpec:
    c = cfg.cluster
    cpus = c.cpus_per_task
    if ranks is not None:  # CPU ranks (MPI analysis), spread over as many nodes as they need
        cpus = cfg.analysis.threads_per_rank or c.cpus_per_task
        per_node = max(1, c.cpus_per_node // cpus)
        nodes, tasks, gpn = math.ceil(ranks / per_node), min(ranks, per_node), 0
    else:
        nodes, tasks, gpn = _gpu_layout(cfg, gpus)
    mem = c.mem_gb_per_node
    return JobSpec(key=key, stage=stage, config_file=exp.config_file, overrides=exp.overrides,
                   nodes=nodes, tasks_per_node=tasks, gpus_per_node=gpn, cpus_per_task=cpus,
                   mem_gb=mem, timeout_min=c.timeout_min, cluster=dataclasses.asdict(c), **kw)


# Memory of one GPU, estimated from the config alone (no model is loaded). Weights take
# n_params_b * 1e9 * bytes per parameter, split over the GPUs only where ZeRO-3 partitions them.
BYTES_PER_PARAM = {"bfloat16": 2, "float16": 2, "float32": 4}
# activations of a batch, the CUDA context and allocator slack, as a factor on the estimate
INFERENCE_OVERHEAD = 1.2
FINETUNE_OVERHEAD = 1.2
# per LoRA parameter: fp32 master weight, gradient and Adam's two moments
LORA_STATE_BYTES = 16
# d_in + d_out of a LoRA target, in units of hidden_size (Llama-like shapes; MLP up to ~3.5x)
_ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "dense",
                      "qkv_proj", "c_attn", "c_proj", "out_proj", "Wqkv")
ATTENTION_WIDTH = 2.0
MLP_WIDTH = 4.5
# the stages that load the model on GPUs (patch and knockout as extraction does)
GPU_STAGES = ("extract", "finetune", "extract-ft", "patch", "knockout")


def lora_params(cfg: ExperimentConfig) -> float:
    """Estimated LoRA parameter count: per block and target, rank x (d_in + d_out)."""
    f, m = cfg.finetune, cfg.model
    width = sum(ATTENTION_WIDTH if t in _ATTENTION_TARGETS else MLP_WIDTH
                for t in f.target_modules)
    return float(m.n_layers * f.lora_rank * width * m.hidden_size)


def gpu_memory_gb(cfg: ExperimentConfig, stage: str, gpus: int) -> tuple[float, bool]:
    """(estimated GB on each GPU, whether the weights are partitioned) for ``stage`` on ``gpus``
    GPUs: weights (partitioned under ZeRO-3 with more than one GPU), plus for fine-tuning the
    trained weights' optimiser states (LoRA's, or every weight's for ``finetune.method: full``),
    times the stage's overhead factor."""
    m = cfg.model
    weights = m.n_params_b * BYTES_PER_PARAM[m.dtype]  # GB
    if stage == "finetune":
        sharded = cfg.finetune.zero_stage == 3 and gpus > 1
        # full fine-tuning keeps a gradient and AdamW's float32 master copy and two moments of
        # every weight (16 bytes each beside the weights); LoRA only of its adapters
        trained = m.n_params_b * 1e9 if cfg.finetune.method == "full" else lora_params(cfg)
        states = trained * LORA_STATE_BYTES / 1e9
        state_shards = gpus if cfg.finetune.zero_stage >= 2 and gpus > 1 else 1
        per_gpu = weights / (gpus if sharded else 1) + states / state_shards
        return per_gpu * FINETUNE_OVERHEAD, sharded
    sharded = cfg.extract.zero_stage == 3 and gpus > 1
    return weights / (gpus if sharded else 1) * INFERENCE_OVERHEAD, sharded


def check_gpu_memory(cfg: ExperimentConfig, stage: str, where: str) -> None:
    """Refuse a GPU stage whose model cannot fit ``model.gpus`` GPUs of ``cluster.gpu_mem_gb``.

    Skipped when the profile has no GPUs or does not state their memory.

    Raises:
        UserError: One line with the estimate and the fewest GPUs (whole nodes past one node)
            under ZeRO-3 that would hold it.
    """
    c, m = cfg.cluster, cfg.model
    if stage not in GPU_STAGES or c.gpus_per_node == 0 or c.gpu_mem_gb is None:
        return
    need, sharded = gpu_memory_gb(cfg, stage, m.gpus)
    if need <= c.gpu_mem_gb:
        return
    section = "finetune" if stage == "finetune" else "extract"
    n = fewest_gpus(cfg, stage, c.gpu_mem_gb)
    how = "partitioned over" if sharded else "whole on each of"
    zero = "" if getattr(cfg, section).zero_stage == 3 else f" and {section}.zero_stage=3"
    raise UserError(f"{stage} of {m.name} ({m.n_params_b:g}B parameters in {m.dtype}) needs "
                    f"about {need:.0f} GB per GPU with the weights {how} model.gpus={m.gpus}, "
                    f"one GPU of the profile has {c.gpu_mem_gb:g} GB; it needs at least {n} GPUs",
                    file=where, key="model.gpus",
                    fix=f"set model.gpus={n}{zero} (or use GPUs with more memory)")


def fewest_gpus(cfg: ExperimentConfig, stage: str, gpu_mem_gb: float) -> int:
    """The fewest GPUs of ``gpu_mem_gb`` that hold ``stage`` with ZeRO-3, rounded up to whole
    nodes of ``model.gpus_per_node`` past one node (what ``model.gpus`` accepts)."""
    section = "finetune" if stage == "finetune" else "extract"
    zero3 = cfg.replace(**{section: dataclasses.replace(getattr(cfg, section), zero_stage=3)})
    n = 1
    while gpu_memory_gb(zero3, stage, n)[0] > gpu_mem_gb and n < 100_000:
        n += 1
    per_node = cfg.model.gpus_per_node
    if n > per_node and n % per_node:
        n += per_node - n % per_node
    return n


def check_resources(job: JobSpec, cfg: ExperimentConfig, where: str) -> None:
    """Refuse a job the profile cannot hold: GPUs, nodes, CPUs per node, GPU memory."""
    c = cfg.cluster
    if job.gpus_per_node:
        check_gpu_memory(cfg, job.stage, where)
    if job.gpus_per_node > c.gpus_per_node:
        raise UserError(f"job {job.key} needs {job.gpus_per_node} GPUs per node, the profile has "
                        f"{c.gpus_per_node}", file=where, key="cluster.gpus_per_node",
                        fix="use a cluster profile with more GPUs per node or lower model.gpus")
    if c.nodes is not None and job.nodes > c.nodes:
        raise UserError(f"job {job.key} needs {job.nodes} nodes, the partition has {c.nodes}",
                        file=where, key="cluster.nodes",
                        fix="lower model.gpus or analysis.ranks, or use a larger partition")
    cpus = job.tasks_per_node * job.cpus_per_task
    if cpus > c.cpus_per_node:
        raise UserError(f"job {job.key} needs {cpus} CPUs per node, the profile has "
                        f"{c.cpus_per_node}", file=where, key="cluster.cpus_per_task",
                        fix="lower cluster.cpus_per_task or analysis.ranks")


def plan_sweep(sweep: Sweep) -> list[JobSpec]:
    """Every job of the sweep, in submission order, with dependencies by key."""
    from replandscape.conditions import finetune_dir, shot_conditions

    jobs: list[JobSpec] = []
    analyses: list[str] = []
    # fine-tuning folders, and the experiments reading each: one job per folder
    readers: dict[Path, int] = {}
    for exp in sweep.experiments:
        if exp.cfg.finetune.enabled:
            folder = finetune_dir(exp.cfg).resolve()
            readers[folder] = readers.get(folder, 0) + 1
    ft_jobs: dict[Path, JobSpec] = {}
    shared_owner: dict[str, Experiment] = {}
    for exp in sweep.experiments:
        cfg = exp.cfg
        name = cfg.run.name
        out = cfg.output_dir
        shots = [c.shots for c in shot_conditions(cfg)]
        pending = [k for k in shots
                   if not output_complete("extract", out / "activations" / f"shots{k}.h5", cfg)]
        extract = _job(cfg, exp, "extract", f"{name}/extract", gpus=cfg.model.gpus,
                       array=tuple((f"prompts.shots=[{k}]",) for k in (pending or shots)),
                       array_labels=tuple(f"shots{k}" for k in (pending or shots)),
                       array_outputs=tuple(str(out / "activations" / f"shots{k}.h5")
                                           for k in (pending or shots)),
                       outputs=tuple(str(out / "activations" / f"shots{k}.h5") for k in shots),
                       done=not pending)
        jobs.append(extract)
        deps = [extract.key]
        ft_key: str | None = None
        if cfg.finetune.enabled:
            folder = finetune_dir(cfg)
            ft = ft_jobs.get(folder.resolve())
            if ft is None:
                marker = folder / "result.json"
                key = f"{name}/finetune"
                if readers[folder.resolve()] > 1:  # one run shared by several experiments
                    from replandscape.stages.finetune import stage_hash

                    key = f"{cfg.model.name}/finetune-{stage_hash(cfg)[:8]}"
                    shared_owner[key] = exp
                ft = _job(cfg, exp, "finetune", key, gpus=cfg.model.gpus,
                          outputs=(str(marker),), done=output_complete("finetune", marker, cfg))
                ft_jobs[folder.resolve()] = ft
                jobs.append(ft)
            ft_key = ft.key
            ft_done = ft.done and output_complete("extract-ft", out / "activations" / "ft-final.h5",
                                                  cfg)
            eft = _job(cfg, exp, "extract-ft", f"{name}/extract-ft", gpus=cfg.model.gpus,
                       depends_on=(ft.key,), outputs=(str(out / "activations" / "ft-final.h5"),),
                       done=ft_done)
            jobs.append(eft)
            deps.append(eft.key)
        if sweep.patch:
            jobs.extend(_patch_jobs(cfg, exp, name, extract.key, ft_key))
        if sweep.knockout:
            from replandscape.stages.knockout import knockout_outputs

            # after extraction, which has made the task's data
            files = knockout_outputs(cfg, exp.config_file)
            jobs.append(_job(cfg, exp, "knockout", f"{name}/knockout", gpus=cfg.model.gpus,
                             depends_on=(extract.key,), outputs=tuple(str(f) for f in files),
                             done=all(f.is_file() for f in files)))
        if sweep.rsa:
            rsa_results = out / "rsa" / "results.json"
            rsa_deps = [j.key for j in jobs if j.key in (extract.key, f"{name}/extract-ft")]
            jobs.append(_job(cfg, exp, "rsa", f"{name}/rsa", gpus=0, ranks=cfg.analysis.ranks,
                             depends_on=tuple(rsa_deps), outputs=(str(rsa_results),),
                             done=rsa_results.is_file()))
        results = out / "analysis" / "results.json"
        an_done = output_complete("analyze", results, cfg) and all(
            results.stat().st_mtime >= Path(o).stat().st_mtime
            for j in jobs if j.key in deps for o in j.outputs if Path(o).exists()) and all(
            j.done for j in jobs if j.key in deps)
        analyze = _job(cfg, exp, "analyze", f"{name}/analyze", gpus=0,
                       ranks=cfg.analysis.ranks, depends_on=tuple(deps),
                       outputs=(str(results),), done=an_done)
        jobs.append(analyze)
        analyses.append(analyze.key)
    first = sweep.experiments[0]
    figures = _job(first.cfg, first, "figures", f"{sweep.name}/figures", gpus=0, ranks=1,
                   depends_on=tuple(analyses), outputs=(str(sweep.output_root / "figures"),))
    jobs.append(figures)
    for exp in sweep.experiments:
        for job in jobs:
            if job.key.startswith(f"{exp.cfg.run.name}/"):
                check_resources(job, exp.cfg, exp.config_file)
    for job in jobs:
        if job.key in shared_owner:
            owner = shared_owner[job.key]
            check_resources(job, owner.cfg, owner.config_file)
    # a dependency on a complete job is dropped; a job after an incomplete one is not complete
    done = {j.key for j in jobs if j.done}
    for job in jobs:
        if any(d not in done for d in job.depends_on):
            job.done = False
            done.discard(job.key)
        job.depends_on = tuple(d for d in job.depends_on if d not in done)
    return jobs


def _patch_jobs(cfg: ExperimentConfig, exp: Experiment, name: str, extract_key: str,
                finetune_key: str | None = None) -> list[JobSpec]:
    """The patching of one experiment, after its extraction and fine-tuning (``finetune_key``,
    its own or a shared one): one job, or with ``patch.parts`` > 1 an array of that many tasks
    (task I computes share I of the work units, ``patch.part=I``) and a job after it that
    gathers the shares and draws the circuit shift."""
    from replandscape.stages.patch import part_marker

    circuits = cfg.output_dir / "patching" / "circuits.json"
    if finetune_key is None and cfg.finetune.enabled:
        finetune_key = f"{name}/finetune"
    deps = (extract_key,) + ((finetune_key,) if finetune_key else ())
    done = circuits.is_file()
    parts = cfg.patch.parts
    if parts == 1:
        return [_job(cfg, exp, "patch", f"{name}/patch", gpus=cfg.model.gpus, depends_on=deps,
                     outputs=(str(circuits),), done=done)]
    markers = [str(part_marker(cfg, i)) for i in range(parts)]
    pending = [i for i in range(parts) if not done and not Path(markers[i]).is_file()]
    shares = _job(cfg, exp, "patch", f"{name}/patch", gpus=cfg.model.gpus, depends_on=deps,
                  array=tuple((f"patch.part={i}",) for i in (pending or range(parts))),
                  array_labels=tuple(f"part{i}" for i in (pending or range(parts))),
                  array_outputs=tuple(markers[i] for i in (pending or range(parts))),
                  outputs=tuple(markers), done=not pending)
    gather = _job(cfg, exp, "patch", f"{name}/patch-gather", gpus=cfg.model.gpus,
                  depends_on=(shares.key,), outputs=(str(circuits),), done=done)
    return [shares, gather]


def output_complete(stage: str, path: str | Path, cfg: ExperimentConfig | None = None) -> bool:
    """Whether ``path``, an output of ``stage``, is complete: the one test that planning (which
    skips complete outputs) and ``replandscape status`` (which counts them) share.

    * ``extract``, ``extract-ft``: the ``.h5`` opens as a finished activation file (it is
      renamed into place only at the end).
    * ``finetune``: ``result.json`` of the fine-tuning folder (``finetune/``, or the shared
      ``finetune.output_dir``) parses with its schema and the final adapter is beside it (the
      file is written last; ``checkpoints.json`` exists from the first adapter).
    * ``analyze``: ``analysis/results.json`` reads, with this config's parameters' hash.
    * ``figures``: the folder exists.

    With ``cfg``, a marker must also be of that configuration (fine-tuning stage hash, analysis
    parameters hash); without it (a record whose config is gone) only the file is checked.
    """
    path = Path(path)
    if stage in ("extract", "extract-ft"):
        return _complete_h5(path)
    if stage == "finetune":
        from replandscape.stages.finetune import result_complete, stage_hash

        return result_complete(path, stage_hash(cfg) if cfg is not None else None)
    if stage == "analyze":
        return _results_current(path, cfg)
    return path.exists()


def _results_current(path: Path, cfg: ExperimentConfig | None) -> bool:
    """Whether an analysis results file exists and was computed with this config's parameters
    (any parameters when ``cfg`` is None)."""
    if not path.is_file():
        return False
    from replandscape.results import params_hash, read_results
    from replandscape.stages.analyze import analysis_params

    try:
        results = read_results(path)
    except UserError:
        return False
    return cfg is None or results.params_hash == params_hash(analysis_params(cfg.analysis))


def _complete_h5(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        from replandscape.storage import open_activations

        with open_activations(path):
            return True
    except UserError:
        return False


def slurm_fix(profile: str) -> str:
    """How to reach the cluster of ``profile`` when its tools cannot."""
    if profile == "local-slurm":
        return ('start the local cluster and point the tools at it: bash slurm/cluster.sh start '
                '&& eval "$(bash slurm/cluster.sh env)" (make demo-slurm does both)')
    return "check that sinfo and sbatch work on this host (module load slurm, SLURM_CONF)"


def check_partition(partition: str, where: str, profile: str = "") -> None:
    """Refuse, before anything is queued, a cluster whose controller does not answer and a
    partition it does not have (when sinfo is here to ask)."""
    sinfo = shutil.which("sinfo")
    if sinfo is None:
        return
    try:
        out = subprocess.run([sinfo, "-h", "-o", "%R"], capture_output=True, text=True,
                             timeout=30)
    except subprocess.TimeoutExpired:
        # sbatch would hang the same way (e.g. looking for a controller that is not there)
        raise UserError("Slurm does not answer here (sinfo: no answer in 30 s)", file=where,
                        key="cluster", fix=slurm_fix(profile)) from None
    except (OSError, subprocess.SubprocessError):
        return
    if out.returncode != 0:
        said = [ln.strip() for ln in out.stderr.splitlines() if ln.strip()]
        raise UserError(f"Slurm does not answer here (sinfo: {said[-1] if said else 'failed'})",
                        file=where, key="cluster", fix=slurm_fix(profile))
    names = {p.strip().rstrip("*") for p in out.stdout.split()}
    if names and partition not in names:
        raise UserError(f"partition '{partition}' does not exist on this cluster",
                        file=where, key="cluster.partition",
                        fix=f"use one of {', '.join(sorted(names))}")


def check_outputs_free(sweep: Sweep) -> None:
    """Refuse, before anything is queued, outputs that a stage of another config wrote (two
    sweeps, one output root): the stage would refuse them inside its job. Each stage's outputs
    are identified by what changes them, so a sweep that differs only in its analysis, figures
    or cluster settings reuses the extraction and the fine-tuning."""
    from replandscape.stages import extract, finetune

    for exp in sweep.experiments:
        for condition in extract.shot_conditions(exp.cfg):
            extract.existing_output(exp.cfg, condition)
        if exp.cfg.finetune.enabled:
            finetune.check_output_folder(exp.cfg)
