"""Typed, strict, composable configuration.

A config file is YAML holding some of the sections of :class:`ExperimentConfig`, plus an optional
``defaults:`` mapping that pulls in group files (``model: llama3-8b`` loads
``configs/model/llama3-8b.yaml``; ``cluster: local-slurm`` loads ``configs/cluster/local-slurm.yaml``).
Composition order, later winning: group defaults, the file itself, command-line overrides. An override
is ``a.b=value`` (value parsed as YAML) or ``GROUP=NAME`` to swap a group file.

Loading is strict: unknown keys, wrong types and impossible values raise :class:`UserError` with the
file, the key path and the fix in one line. The resolved config and its hash go beside every output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from replandscape.atomic import write_text_atomic
from replandscape.errors import UserError
from replandscape.outputs import ensure_dir

GROUPS = ("model", "cluster")
_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
BUILTIN_PREFIX = "builtin:"


# --------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    """Where a run writes and how it is seeded."""

    name: str = "run"
    output_dir: str = "outputs/run"
    seed: int = 42


@dataclass(frozen=True)
class DataConfig:
    """A multiple-choice data set in MMLU's shape (question, choices, answer, subject)."""

    # "cais/mmlu" (hub id), a local folder of per-split parquet/json files, or "builtin:demo-mmlu".
    source: str = "cais/mmlu"
    hub_config: str = "all"
    eval_split: str = "test"
    shot_split: str = "dev"
    train_splits: tuple[str, ...] = ("dev", "validation")
    subjects: tuple[str, ...] | None = None
    # keep at most this many eval questions per subject (class-balanced subsample); None = all
    max_per_subject: int | None = None
    limit: int | None = None
    num_choices: int = 4


@dataclass(frozen=True)
class TaskConfig:
    """What the model is asked (docs/method.md §1): MMLU, or a generated implicit-pattern task
    answered by generation (§7). The task is an axis of a run, like the model and the condition."""

    # "mmlu" (multiple choice, scored from the answer-letter logits) or a generated task:
    # expression, relation, boolean, algebra, code, parity (replandscape.tasks)
    name: str = "mmlu"
    # generated tasks: which variants are evaluated
    variants: tuple[Literal["pattern", "misleading"], ...] = ("pattern", "misleading")
    # generated tasks: the rule that decides `correct` (both are stored): "strict" = the
    # continuation starts with the answer, not followed by a letter or digit; "substring" = the
    # answer occurs anywhere in it (the released rule)
    scoring: Literal["strict", "substring"] = "strict"
    # generated tasks: tokens generated per prompt; null = the task's own (longest answer + 1)
    max_new_tokens: int | None = None
    # generated tasks with data.source "builtin:task": items per variant of the generated splits
    n_test: int = 200
    n_dev: int = 64
    n_train: int = 1000


@dataclass(frozen=True)
class PromptConfig:
    """Few-shot prompt construction (docs/method.md §2)."""

    shots: tuple[int, ...] = (0, 1, 2, 5)
    seed: int = 42
    max_shots: int = 5
    add_bos: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """A causal LM and the resources it needs."""

    name: str = "model"
    # a local folder, a hub id, or "builtin:tiny-llama" (built offline on first use)
    path: str = ""
    revision: str | None = None
    family: Literal["llama", "mistral", "qwen2", "gpt_neox", "gpt_neo", "other"] = "llama"
    n_layers: int = 32
    hidden_size: int = 4096
    n_params_b: float = 8.0
    context_length: int = 8192
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    cpu_dtype: Literal["bfloat16", "float32"] = "float32"
    gpus: int = 1
    gpus_per_node: int = 4
    # tiny builtin model shape (used only by builtin: paths)
    tiny_intermediate_size: int = 128
    tiny_heads: int = 4


SiteKind = Literal["input_layernorm", "post_attention_layernorm", "residual", "block_output",
                   "norm", "logits"]


@dataclass(frozen=True)
class ExtractConfig:
    """Extraction of last-token representations (docs/method.md §3)."""

    sites: tuple[SiteKind, ...] = ("input_layernorm", "norm", "logits")
    pooling: Literal["last", "mean"] = "last"
    batch_size: int = 8
    max_batch_tokens: int = 16384
    store_dtype: Literal["model", "float16", "float32"] = "model"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    zero_stage: Literal[0, 3] = 3
    padding_side: Literal["left", "right"] = "left"
    checkpoints: Literal["final", "all"] = "final"
    # how a LoRA checkpoint is applied: "unmerged" runs the adapter beside the base weights (in its
    # own precision: the model the fine-tuning stage evaluated); "merged" adds it into the weights
    # in float32 layer by layer, then casts (faster; updates under half a bf16 step are lost)
    adapter: Literal["unmerged", "merged"] = "unmerged"
    # generated tasks with named spans (regression: examples, query; reading: relevant,
    # distractor, question): also keep each span's pooled state at every hidden site, stored as
    # SITE@SPAN.POOL (a prompt without the span gets zeros, and has_span.SPAN says which);
    # [task] stands for every span the task declares
    spans: tuple[str, ...] = ()
    span_pooling: tuple[Literal["max", "mean"], ...] = ("max", "mean")
    # named spans whose attention mass from the kept token is read, per layer and head (the
    # kept token's query row only): attention/CONDITION.h5, mass/SPAN [N, L, H]; [task]: all
    attention_spans: tuple[str, ...] = ()
    # mpio: one shared file through MPI-IO (h5py with MPI, ranks launched by srun/mpiexec);
    # shards: one file per rank joined by virtual datasets; auto: mpio when it can, else shards
    writer: Literal["auto", "mpio", "shards"] = "auto"


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning, LoRA or full-parameter (docs/method.md §4; generated tasks §7.6)."""

    enabled: bool = True
    # "lora": adapters on target_modules; "full": every weight trained (ZeRO-3 partitions the
    # weights, gradients and optimizer states over ranks), checkpoints saved as whole models
    method: Literal["lora", "full"] = "lora"
    # "answer": the loss of the answer tokens alone (per-sample mean, weighted); "all": every
    # token of the sample (the released implicit-task recipe), a token mean over the batch
    loss: Literal["answer", "all"] = "answer"
    lora_rank: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                       "up_proj", "down_proj")
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    effective_batch: int = 16
    micro_batch: int = 1
    epochs: int = 1
    max_seq_len: int = 1024
    warmup_ratio: float = 0.05
    warmup_max_steps: int = 3
    min_lr_ratio: float = 0.01
    samples_per_subject: int | None = None
    log_checkpoints: int = 0
    eval_every: int = 0
    # 3 partitions parameters, gradients and optimizer state over ranks; 2 only the last two;
    # 0 replicates (the fastest choice for one rank, where there is nothing to partition)
    zero_stage: Literal[0, 2, 3] = 3
    save_every: int = 0
    # generated tasks: the tasks whose train splits are mixed (empty: the run's own task),
    # samples_per_task items of each (seeded choice), of the variants in train_variants
    tasks: tuple[str, ...] = ()
    samples_per_task: int = 1000
    train_variants: tuple[Literal["pattern", "misleading"], ...] = ("pattern", "misleading")
    # learning-rate shape after the warm-up: "cosine" decays to min_lr_ratio, "constant" stays
    schedule: Literal["cosine", "constant"] = "cosine"
    # warm-up steps; null: ceil(warmup_ratio x steps) capped at warmup_max_steps
    warmup_steps: int | None = None
    # cap on the optimiser steps (null: epochs x steps per epoch)
    max_steps: int | None = None
    # a checkpoint every N steps (0: the log-spaced log_checkpoints instead)
    checkpoint_every: int = 0
    # generated tasks: more tasks whose 0-shot test accuracy the stage also measures (besides the
    # mixture and the run's own task), so one run shared by a sweep's task axis scores each task
    eval_tasks: tuple[str, ...] = ()
    # the fine-tuning folder; null: <run.output_dir>/finetune. Runs whose fine-tuning is the same
    # (a sweep's task experiments on one mixture) can point at one folder and train once
    output_dir: str | None = None


@dataclass(frozen=True)
class PatchConfig:
    """Activation patching per condition: which components carry the answer (docs/method.md
    §7.7). Pairs are a clean prompt and its corrupted twin of equal token length."""

    # "last_token": the last token recomputed over the clean run's cached keys and values (exact,
    # one batch of single-token queries per block); "full": one full forward per component
    method: Literal["last_token", "full"] = "last_token"
    # "noise": corrupted activations into the clean run; "denoise": the reverse
    direction: Literal["noise", "denoise"] = "noise"
    # also attribution patching (activation difference x gradient), reported beside the exact
    attribution: bool = True
    # base conditions patched: these shot counts (null: every prompts.shots); fine-tuned: the
    # checkpoints the extraction lists (extract.checkpoints) when finetune.enabled
    shots: tuple[int, ...] | None = None
    finetuned: bool = True
    # pairs per condition (the first ones kept; null: all) and pairs run together
    limit: int | None = 64
    pair_batch: int = 4
    # circuit shift: the top-k components compared between conditions, by absolute effect
    top_k: int = 10
    # Slurm array tasks sharing the work units (condition x pair group): a sweep queues `parts`
    # tasks, task I run with patch.part=I, then one job that gathers them into the effect files
    # and the circuit shift
    parts: int = 1
    # the share this run computes (0..parts-1), nothing gathered; null: every unit not yet done,
    # then the gather
    part: int | None = None
    # the decoder blocks cut into this many contiguous groups, each pair group x block group a
    # unit of its own: more units to spread (each repeats the pairs' two unpatched forwards)
    layer_groups: int = 1


@dataclass(frozen=True)
class KnockoutConfig:
    """Attention knockout: which tokens carry the in-context information to the answer
    (docs/method.md §7.7, the narrow gate)."""

    # position sets whose keys later positions may not read: header_last, shot_last,
    # separators, header, shots, query, shot.I, separator.I, chars:A-B
    position_sets: tuple[str, ...] = ("header_last", "shot_last", "separators")
    # layer windows [start, stop) over decoder blocks; empty: the whole model
    windows: tuple[tuple[int, ...], ...] = ()
    # the scan knocks out one position at a time over the last N positions (0: no scan)
    scan_last: int = 16
    # base conditions knocked out (null: the shot counts of prompts.shots above 0)
    shots: tuple[int, ...] | None = None
    # prompts per condition (the first ones; null: all) and per forward pass
    limit: int | None = 64
    batch_size: int = 8


@dataclass(frozen=True)
class AnalysisConfig:
    """Geometry analysis parameters (docs/method.md §5)."""

    maxk: int = 1000
    range_max: int = 100
    id_scale_index: int = 4
    density_k: int = 16
    z: float = 1.6
    per_subject_cap: int | None = 200
    overlap_fraction: float = 0.3
    dendrogram: bool = True
    dendrogram_min_size: int = 30
    dendrogram_label_fraction: float = 0.2
    engine: Literal["fast", "dadapy"] = "fast"
    # where the fast engine's products run: "auto" takes a CUDA GPU when the job has one
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads_per_rank: int | None = None
    ranks: int = 2
    sites: tuple[int, ...] | None = None
    # split each site's neighbour search over all ranks by row blocks (sites then go one after
    # another): for sites too large for one rank, e.g. 70B logits
    split_site_rows: bool = False


@dataclass(frozen=True)
class RsaConfig:
    """Similarity analysis and probes of every (run, site) against the task's hypotheses
    (docs/method.md, "Similarity, probes, attention"); the ``rsa`` stage."""

    # "condition": one row per condition (the mean of its items); "item": one row per item
    level: Literal["condition", "item"] = "condition"
    n_permutations: int = 1000
    seed: int = 0
    # standardise every dimension over the items before averaging
    zscore: bool = True
    # labels probed (null: the task's own, regression: slope, intercept; reading:
    # question_type, distractor); a label of numbers with more than 2 values is probed by ridge
    # regression, any other by logistic regression
    probe_labels: tuple[str, ...] | None = None
    # parameterized probing: [label, parameter] pairs, the label probed within each value of the
    # task parameter (null: the task's own, regression: y within slope; reading: distractor
    # within question_type; skipped where a file lacks them)
    parameterized: tuple[tuple[str, ...], ...] | None = None
    folds: int = 5
    # site indices into the files' site names (span sites included; null: every site)
    sites: tuple[int, ...] | None = None
    threads_per_rank: int | None = None


@dataclass(frozen=True)
class FiguresConfig:
    """Which figures to draw, in which formats."""

    what: tuple[Literal["profiles", "ari", "dendrogram", "accuracy", "report"], ...] = (
        "profiles", "ari", "dendrogram", "accuracy", "report")
    formats: tuple[Literal["png", "pdf"], ...] = ("png", "pdf")


@dataclass(frozen=True)
class ClusterConfig:
    """Where stages run: in-process, or Slurm with this site's details (the only place for them)."""

    name: str = "local"
    executor: Literal["local", "slurm"] = "local"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int | None = None  # nodes in the partition (None: not checked)
    gpus_per_node: int = 0
    gpu_mem_gb: float | None = None  # memory of one GPU (None: the model-fits check is skipped)
    cpus_per_node: int = 2
    mem_gb_per_node: int = 16
    cpus_per_task: int = 1
    timeout_min: int = 60
    max_array_parallel: int = 16
    setup: tuple[str, ...] = ()
    scratch_root: str | None = None
    mpi: Literal["pmix", "pmi2", "mpirun"] = "pmix"
    constraint: str | None = None
    exclusive: bool = False


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one run of the pipeline needs; each stage reads its own section."""

    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    patch: PatchConfig = field(default_factory=PatchConfig)
    knockout: KnockoutConfig = field(default_factory=KnockoutConfig)
    rsa: RsaConfig = field(default_factory=RsaConfig)
    figures: FiguresConfig = field(default_factory=FiguresConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    source_file: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source_file", None)
        return _plain(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def hash(self) -> str:
        """sha256 of the resolved config (canonical JSON): the identity of a run's outputs."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir)

    def replace(self, **sections: Any) -> ExperimentConfig:
        return dataclasses.replace(self, **sections)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# strict conversion of plain data into dataclasses
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str, file: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return build_dataclass(tp, value, key, file)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key, file)
            except UserError as exc:
                errors.append(exc)
        raise UserError(f"expected {_type_name(tp)}, got {value!r}", file=file, key=key,
                        fix="correct the value's type")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed):
            raise UserError(f"{value!r} is not allowed", file=file, key=key,
                            fix=f"use {_type_name(tp)}")
        return value
    if origin is tuple:
        (item_tp, *_rest) = get_args(tp)
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise UserError(f"expected a list, got {value!r}", file=file, key=key,
                            fix=f"write {_type_name(tp)}")
        return tuple(_convert(item_tp, v, f"{key}[{i}]", file) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"expected true or false, got {value!r}", file=file, key=key,
                            fix="write true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"expected an integer, got {value!r}", file=file, key=key,
                            fix="write a whole number")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"expected a number, got {value!r}", file=file, key=key,
                            fix="write a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"expected a string, got {value!r}", file=file, key=key,
                            fix="quote the value")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a bug in this module


def build_dataclass(cls: type, data: Any, key: str = "", file: str = "<config>") -> Any:
    """Build ``cls`` from a mapping, refusing unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise UserError(f"expected a mapping, got {data!r}", file=file, key=key or "<top>",
                        fix="write a YAML mapping (key: value lines)")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name != "source_file"}
    unknown = [k for k in data if k not in fields]
    if unknown:
        name = unknown[0]
        path = f"{key}.{name}" if key else str(name)
        close = _closest(str(name), list(fields))
        fix = f"did you mean '{close}'?" if close else f"known keys: {', '.join(fields)}"
        raise UserError("unknown key", file=file, key=path, fix=fix)
    kwargs = {}
    for name, value in data.items():
        path = f"{key}.{name}" if key else name
        kwargs[name] = _convert(hints[name], value, path, file)
    return cls(**kwargs)


def _closest(word: str, options: Sequence[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return match[0] if match else None


# --------------------------------------------------------------------------------------------
# composition
# --------------------------------------------------------------------------------------------


def repo_root() -> Path:
    """The checkout holding ``configs/`` (the package is installed editable from it)."""
    env = os.environ.get("REPLANDSCAPE_ROOT")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2]


def config_root(near: Path | None = None) -> Path:
    """The ``configs`` folder: the nearest ancestor of ``near`` named so, else the checkout's."""
    if near is not None:
        for parent in [near.resolve(), *near.resolve().parents]:
            if parent.name == "configs" and parent.is_dir():
                return parent
    return repo_root() / "configs"


def read_config_text(path: Path) -> str:
    """The text of a config file, or a one-line :class:`UserError` when it is missing,
    unreadable or not UTF-8 text (a binary file given by mistake, e.g. a checkpoint)."""
    if path.is_dir():
        raise UserError("is a folder, not a config file", file=str(path),
                        fix="give the path of a YAML file (configs live under configs/)")
    if not path.is_file():
        raise UserError("config file not found", file=str(path),
                        fix="check the path (configs live under configs/)")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read the config file: {exc.strerror or exc}", file=str(path),
                        fix="check the file's permissions") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"not a text file (byte {exc.start + 1} on line {line} is not UTF-8)",
                        file=str(path), fix="give a YAML config file saved as UTF-8 text") from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise UserError(f"not a text file (a NUL byte on line {line})", file=str(path),
                        fix="give a YAML config file saved as UTF-8 text")
    return text


def read_yaml(path: Path) -> dict[str, Any]:
    """Read one config file as a mapping; every config file of the suite is read here."""
    text = read_config_text(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"invalid YAML{where}", file=str(path), fix="fix the YAML syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError("expected a YAML mapping at the top", file=str(path),
                        fix="write key: value lines")
    return data


def deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def group_file(group: str, name: str, root: Path) -> Path:
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml"):
        return candidate if candidate.is_absolute() else (Path.cwd() / candidate)
    return root / group / f"{name}.yaml"


def _load_group(group: str, name: Any, root: Path, file: str) -> dict[str, Any]:
    if not isinstance(name, str):
        raise UserError(f"expected a name, got {name!r}", file=file, key=f"defaults.{group}",
                        fix=f"name a file of {root / group}")
    path = group_file(group, name, root)
    if not path.is_file():
        known = sorted(p.stem for p in (root / group).glob("*.yaml"))
        raise UserError(f"no {group} config named '{name}'", file=file, key=f"defaults.{group}",
                        fix=f"use one of: {', '.join(known)}" if known else f"create {path}")
    data = read_yaml(path)
    data.pop("defaults", None)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"override '{text}' is not key=value", key=text,
                        fix="write e.g. prompts.shots=[0,5] or cluster=local-slurm")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise UserError(f"override key '{key}' is not a dotted name", key=key,
                        fix="write e.g. analysis.maxk=100")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def compose(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Resolve group defaults, the file and the overrides into one plain mapping."""
    file = Path(path)
    data = read_yaml(file)
    root = config_root(file.parent)
    defaults = data.pop("defaults", {}) or {}
    if not isinstance(defaults, Mapping):
        raise UserError("expected a mapping of group: name", file=str(file), key="defaults",
                        fix="write e.g. defaults: {model: llama3-8b}")
    parsed = [parse_override(o) for o in overrides]
    for keys, value in parsed:  # GROUP=NAME swaps a group file before anything else merges
        if len(keys) == 1 and keys[0] in GROUPS:
            defaults = {**defaults, keys[0]: value}
    for group in defaults:
        if group not in GROUPS:
            raise UserError("unknown config group", file=str(file), key=f"defaults.{group}",
                            fix=f"groups are: {', '.join(GROUPS)}")
    merged: dict[str, Any] = {}
    for group, name in defaults.items():
        merged = deep_merge(merged, {group: _load_group(group, name, root, str(file))})
    merged = deep_merge(merged, data)
    for keys, value in parsed:
        if len(keys) == 1 and keys[0] in GROUPS:
            continue
        node = merged
        for k in keys[:-1]:
            nxt = node.get(k)
            if not isinstance(nxt, dict):
                nxt = {}
                node[k] = nxt
            node = nxt
        node[keys[-1]] = value
    return merged


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = (), *,
                check_paths: bool = True) -> ExperimentConfig:
    """Load, compose, type-check and validate one experiment config."""
    merged = compose(path, overrides)
    cfg = build_dataclass(ExperimentConfig, merged, "", str(path))
    cfg = dataclasses.replace(cfg, source_file=str(path))
    validate_values(cfg, str(path), check_paths=check_paths)
    return cfg


def config_from_dict(data: Mapping[str, Any], file: str = "<dict>") -> ExperimentConfig:
    cfg = build_dataclass(ExperimentConfig, data, "", file)
    validate_values(cfg, file, check_paths=False)
    return cfg


# --------------------------------------------------------------------------------------------
# values that type-check but cannot work
# --------------------------------------------------------------------------------------------


def is_builtin(path: str) -> bool:
    return path.startswith(BUILTIN_PREFIX)


def looks_like_hub_id(path: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", path)) and not Path(path).exists()


def validate_values(cfg: ExperimentConfig, file: str, *, check_paths: bool = True) -> None:
    def bad(key: str, message: str, fix: str) -> UserError:
        return UserError(message, file=file, key=key, fix=fix)

    t = cfg.task
    if t.name != "mmlu":
        from replandscape.tasks import TASK_NAMES

        if t.name not in TASK_NAMES:
            raise bad("task.name", f"unknown task '{t.name}'",
                      f"use mmlu or one of {', '.join(TASK_NAMES)}")
        if not t.variants or len(set(t.variants)) != len(t.variants):
            raise bad("task.variants", "no variants, or one listed twice",
                      "list pattern and/or misleading once each")
        if t.max_new_tokens is not None and t.max_new_tokens < 1:
            raise bad("task.max_new_tokens", "must be at least 1", "use null (the task's own)")
        for key in ("n_test", "n_dev", "n_train"):
            if getattr(t, key) < 1:
                raise bad(f"task.{key}", "must be at least 1", "use a positive number")
    pt = cfg.patch
    if pt.parts < 1:
        raise bad("patch.parts", f"{pt.parts} array tasks", "use 1 or more")
    if pt.part is not None and not 0 <= pt.part < pt.parts:
        raise bad("patch.part", f"share {pt.part} of {pt.parts}",
                  f"use 0..{pt.parts - 1} (or raise patch.parts)")
    if pt.layer_groups < 1:
        raise bad("patch.layer_groups", f"{pt.layer_groups} groups of blocks", "use 1 or more")
    if pt.pair_batch < 1:
        raise bad("patch.pair_batch", f"{pt.pair_batch} pairs a group", "use 1 or more")
    p = cfg.prompts
    if not p.shots:
        raise bad("prompts.shots", "no shot counts given", "list at least one, e.g. [0, 5]")
    for i, k in enumerate(p.shots):
        if k < 0 or k > p.max_shots:
            raise bad(f"prompts.shots[{i}]", f"{k} shots asked but the shot split holds "
                      f"{p.max_shots} per subject", f"use 0..{p.max_shots}")
    if len(set(p.shots)) != len(p.shots):
        raise bad("prompts.shots", "repeated shot count", "list each shot count once")
    if cfg.data.limit is not None and cfg.data.limit < 1:
        raise bad("data.limit", "must be positive", "use a positive number or null")
    if cfg.data.num_choices < 2 or cfg.data.num_choices > 26:
        raise bad("data.num_choices", "must be 2..26", "MMLU has 4")
    if cfg.data.eval_split in cfg.data.train_splits:
        raise bad("data.train_splits", f"the evaluation split '{cfg.data.eval_split}' is also "
                  "trained on", "train on dev and validation only")
    m = cfg.model
    if check_paths:
        if not m.path:
            raise bad("model.path", "no model path", "set model.path to a folder or hub id")
        if not (is_builtin(m.path) or looks_like_hub_id(m.path) or Path(m.path).is_dir()):
            raise bad("model.path", f"model folder '{m.path}' does not exist",
                      "point it at a folder made by save_pretrained, a hub id, or builtin:tiny-llama")
        src = cfg.data.source
        if not (is_builtin(src) or looks_like_hub_id(src) or Path(src).is_dir()):
            raise bad("data.source", f"data folder '{src}' does not exist",
                      "point it at a folder of per-split parquet/json files, a hub id, or "
                      "builtin:demo-mmlu")
    for key in ("n_layers", "hidden_size", "context_length", "gpus", "gpus_per_node"):
        if getattr(m, key) < 1:
            raise bad(f"model.{key}", "must be at least 1", "use a positive number")
    if m.gpus > m.gpus_per_node and m.gpus % m.gpus_per_node:
        raise bad("model.gpus", f"{m.gpus} GPUs do not fill whole nodes of {m.gpus_per_node}",
                  "use a multiple of model.gpus_per_node")
    e = cfg.extract
    if not e.sites:
        raise bad("extract.sites", "no sites", "keep at least input_layernorm")
    if e.batch_size < 1:
        raise bad("extract.batch_size", "must be at least 1", "use a positive number")
    f = cfg.finetune
    if f.method == "lora" and f.lora_rank < 1:
        raise bad("finetune.lora_rank", "must be at least 1", "use e.g. 64")
    if f.method == "lora" and not f.target_modules:
        raise bad("finetune.target_modules", "no target modules", "list e.g. q_proj, v_proj")
    for key, names, what in (("finetune.tasks", f.tasks, "a task mixture"),
                             ("finetune.eval_tasks", f.eval_tasks, "scoring more tasks")):
        if not names:
            continue
        from replandscape.tasks import TASK_NAMES

        if t.name == "mmlu":
            raise bad(key, f"{what} needs a generated task (task.name is mmlu)",
                      f"leave {key} empty or set task.name")
        for i, name in enumerate(names):
            if name not in TASK_NAMES:
                raise bad(f"{key}[{i}]", f"unknown task '{name}'",
                          f"use one of {', '.join(TASK_NAMES)}")
        if len(set(names)) != len(names):
            raise bad(key, "a task is listed twice", "list each task once")
    if f.output_dir is not None and not f.output_dir.strip():
        raise bad("finetune.output_dir", "an empty folder name",
                  "use null (run.output_dir/finetune) or a folder")
    if f.samples_per_task < 1:
        raise bad("finetune.samples_per_task", "must be at least 1", "use e.g. 1000")
    if not f.train_variants or len(set(f.train_variants)) != len(f.train_variants):
        raise bad("finetune.train_variants", "no variants, or one listed twice",
                  "list pattern and/or misleading once each")
    if f.warmup_steps is not None and f.warmup_steps < 0:
        raise bad("finetune.warmup_steps", "must be 0 or more", "use e.g. 20, or null")
    if f.max_steps is not None and f.max_steps < 1:
        raise bad("finetune.max_steps", "must be at least 1", "use e.g. 300, or null")
    if f.checkpoint_every < 0:
        raise bad("finetune.checkpoint_every", "must be 0 or more", "use e.g. 10, or 0")
    if f.checkpoint_every and f.log_checkpoints:
        raise bad("finetune.checkpoint_every", "set together with finetune.log_checkpoints",
                  "set one of them to 0")
    if f.effective_batch % f.micro_batch:
        raise bad("finetune.effective_batch", f"{f.effective_batch} is not a multiple of the "
                  f"micro-batch {f.micro_batch}", "make effective_batch a multiple of micro_batch")
    if not 0 <= f.lora_dropout < 1:
        raise bad("finetune.lora_dropout", "must be in [0, 1)", "use e.g. 0.1")
    if f.lr <= 0:
        raise bad("finetune.lr", "must be positive", "use e.g. 1e-4")
    a = cfg.analysis
    if a.maxk < 2:
        raise bad("analysis.maxk", "must be at least 2", "use e.g. 1000")
    if a.range_max < 2 or a.range_max > a.maxk:
        raise bad("analysis.range_max", f"{a.range_max} must be in 2..maxk ({a.maxk})",
                  "lower range_max or raise maxk")
    n_scales = max(1, (a.range_max // 2).bit_length())
    if not 0 <= a.id_scale_index < n_scales:
        raise bad("analysis.id_scale_index", f"{a.id_scale_index} but range_max={a.range_max} "
                  f"gives {n_scales} Gride scales", f"use 0..{n_scales - 1}")
    if a.density_k >= a.maxk:
        raise bad("analysis.density_k", "must be below maxk", "use e.g. 16")
    if a.z <= 0:
        raise bad("analysis.z", "must be positive", "use e.g. 1.6")
    if a.ranks < 1:
        raise bad("analysis.ranks", "must be at least 1", "use e.g. 2")
    n_points = expected_points(cfg)
    if n_points is not None and a.maxk >= n_points:
        raise bad("analysis.maxk", f"maxk={a.maxk} but the data give at most {n_points} points",
                  f"set analysis.maxk below {n_points} or use more questions")
    c = cfg.cluster
    if c.executor == "slurm" and not c.partition:
        raise bad("cluster.partition", "a Slurm cluster profile needs a partition",
                  "set cluster.partition (see sinfo)")
    if c.timeout_min < 1:
        raise bad("cluster.timeout_min", "must be at least 1 minute", "use e.g. 60")
    if c.gpu_mem_gb is not None and c.gpu_mem_gb <= 0:
        raise bad("cluster.gpu_mem_gb", "must be positive", "use the GPU's memory, e.g. 80")


def expected_points(cfg: ExperimentConfig) -> int | None:
    """Upper bound on the points per site, when the config alone tells it."""
    bounds = []
    if cfg.data.limit is not None:
        bounds.append(cfg.data.limit)
    if cfg.data.max_per_subject is not None and cfg.data.subjects is not None:
        bounds.append(cfg.data.max_per_subject * len(cfg.data.subjects))
    return min(bounds) if bounds else None


def save_resolved(cfg: ExperimentConfig, folder: str | os.PathLike[str]) -> Path:
    """Write the resolved config and its hash beside an output."""
    folder = ensure_dir(folder, "run.output_dir")
    path = folder / "config.yaml"
    text = f"# resolved config, sha256 {cfg.hash}\n# source: {cfg.source_file}\n" + cfg.to_yaml()
    write_text_atomic(path, text)
    write_text_atomic(folder / "config.sha256", cfg.hash + "\n")
    return path
