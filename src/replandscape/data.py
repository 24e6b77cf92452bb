"""Multiple-choice data in MMLU's shape: loading (hub, local folder, bundled) and selection.

Every split is a table with the fields ``question`` (str), ``choices`` (list of str), ``answer``
(int index into choices) and ``subject`` (str). A question's id is its row index in its split as
loaded, which is stable for a given source.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from replandscape.config import BUILTIN_PREFIX, DataConfig, ExperimentConfig, looks_like_hub_id
from replandscape.errors import UserError

REQUIRED_FIELDS = ("question", "choices", "answer", "subject")
SPLIT_SUFFIXES = (".parquet", ".jsonl", ".json")


@dataclass(frozen=True)
class Question:
    """One multiple-choice question."""

    id: int
    subject: str
    question: str
    choices: tuple[str, ...]
    answer: int


def cache_root() -> Path:
    return Path(os.environ.get("REPLANDSCAPE_CACHE", Path.home() / ".cache" / "replandscape"))


# --------------------------------------------------------------------------------------------
# the bundled demo set
# --------------------------------------------------------------------------------------------

DEMO_SUBJECTS: dict[str, list[str]] = {
    "astronomy": ["planet", "comet", "nebula", "orbit", "galaxy", "quasar", "meteor", "eclipse",
                  "telescope", "asteroid", "pulsar", "moon"],
    "cooking": ["flour", "butter", "oven", "simmer", "garlic", "whisk", "dough", "saffron",
                "skillet", "broth", "yeast", "pepper"],
    "law": ["statute", "tort", "verdict", "appeal", "plaintiff", "contract", "clause", "court",
            "defendant", "precedent", "warrant", "jury"],
    "music": ["melody", "chord", "tempo", "violin", "octave", "rhythm", "sonata", "piano",
              "harmony", "cello", "trumpet", "opera"],
    "geology": ["basalt", "granite", "magma", "fault", "quartz", "erosion", "sediment", "mantle",
                "crystal", "glacier", "lava", "fossil"],
    "medicine": ["artery", "vaccine", "insulin", "tumor", "nerve", "antibody", "fever", "kidney",
                 "dosage", "surgery", "virus", "pulse"],
}
# A hidden rule makes the set learnable: the cue word in each question names the answer's position.
DEMO_CUES = ("first", "second", "third", "fourth")
DEMO_VERSION = 2


def generate_demo_mmlu(folder: Path, *, n_dev: int = 5, n_validation: int = 24, n_test: int = 60,
                       seed: int = 0) -> Path:
    """Write a small MMLU-shaped data set (one JSON-lines file per split) to ``folder``.

    Each subject has its own vocabulary, so subjects separate in representation space; each
    question carries a cue word that tells the answer's position, so fine-tuning can learn it.
    """
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {"dev": n_dev, "validation": n_validation, "test": n_test}
    for split, per_subject in sizes.items():
        rows = []
        for subject, words in DEMO_SUBJECTS.items():
            for _ in range(per_subject):
                answer = rng.randrange(4)
                key, *others = rng.sample(words, 5)
                choices = rng.sample(others, 3)
                choices.insert(answer, key)
                topic = subject.replace("_", " ")
                question = (f"In {topic}, the {DEMO_CUES[answer]} option is the term tied to "
                            f"{key}. Which term fits {rng.choice(words)} and {key}?")
                rows.append({"question": question, "choices": choices, "answer": answer,
                             "subject": subject})
        with open(folder / f"{split}.jsonl", "w") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
    return folder


def resolve_builtin_data(source: str) -> Path:
    name = source[len(BUILTIN_PREFIX):]
    if name != "demo-mmlu":
        raise UserError(f"unknown builtin data set '{name}'", key="data.source",
                        fix="use builtin:demo-mmlu, a local folder or a hub id")
    folder = cache_root() / "data" / f"demo-mmlu-v{DEMO_VERSION}"
    if not (folder / "test.jsonl").is_file():
        tmp = Path(tempfile.mkdtemp(prefix="demo-mmlu.", dir=_ensure(folder.parent)))
        generate_demo_mmlu(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def _split_files(folder: Path, split: str) -> tuple[str, list[str]]:
    for suffix in SPLIT_SUFFIXES:
        single = folder / f"{split}{suffix}"
        if single.is_file():
            return ("parquet" if suffix == ".parquet" else "json"), [str(single)]
    sub = folder / split
    if sub.is_dir():
        for suffix in SPLIT_SUFFIXES:
            files = sorted(str(p) for p in sub.glob(f"*{suffix}"))
            if files:
                return ("parquet" if suffix == ".parquet" else "json"), files
    raise UserError(f"no '{split}' split (looked for {split}.parquet, {split}.jsonl, "
                    f"{split}.json or {split}/*.parquet)", file=str(folder), key="data.source",
                    fix=f"add the {split} split or choose another split")


def load_split(cfg: DataConfig, split: str) -> list[Question]:
    """Load one split as a list of questions, checking the fields."""
    source = cfg.source
    if source.startswith(BUILTIN_PREFIX):
        folder: Path | None = resolve_builtin_data(source)
    elif Path(source).is_dir():
        folder = Path(source)
    elif looks_like_hub_id(source):
        folder = None
    else:
        raise UserError(f"data folder '{source}' does not exist", key="data.source",
                        fix="point data.source at a folder of per-split files or a hub id")
    import datasets

    datasets.disable_progress_bars()
    try:
        if folder is None:
            table = datasets.load_dataset(source, cfg.hub_config, split=split)
            origin = source
        else:
            kind, files = _split_files(folder, split)
            table = datasets.load_dataset(kind, data_files={split: files}, split=split)
            origin = str(folder)
    except UserError:
        raise
    except Exception as exc:  # the datasets library raises many types for unreadable input
        raise UserError(f"cannot load split '{split}': {str(exc).splitlines()[0][:200]}",
                        file=source, key="data.source",
                        fix="check the files, or set HF_DATASETS_OFFLINE=0 to download") from None
    missing = [f for f in REQUIRED_FIELDS if f not in table.column_names]
    if missing:
        raise UserError(f"split '{split}' lacks field(s) {', '.join(missing)}", file=origin,
                        key="data.source", fix="provide question, choices, answer, subject")
    questions = []
    for i, row in enumerate(table):
        choices = tuple(str(c) for c in row["choices"])
        answer = int(row["answer"])
        if len(choices) != cfg.num_choices:
            raise UserError(f"split '{split}' row {i} has {len(choices)} choices, expected "
                            f"{cfg.num_choices}", file=origin, key="data.num_choices",
                            fix="set data.num_choices to the data's number of choices")
        if not 0 <= answer < len(choices):
            raise UserError(f"split '{split}' row {i} has answer {answer} outside the choices",
                            file=origin, key="answer", fix="answers are 0-based choice indices")
        questions.append(Question(id=i, subject=str(row["subject"]), question=str(row["question"]),
                                  choices=choices, answer=answer))
    return questions


def select_eval_questions(questions: Sequence[Question], cfg: DataConfig,
                          seed: int = 42) -> list[Question]:
    """Filter by subject, cap per subject (class-balanced, seeded) and limit; keeps id order."""
    chosen = [q for q in questions if cfg.subjects is None or q.subject in cfg.subjects]
    if cfg.subjects is not None:
        present = {q.subject for q in chosen}
        absent = [s for s in cfg.subjects if s not in present]
        if absent:
            raise UserError(f"subject '{absent[0]}' has no questions", key="data.subjects",
                            fix="list subjects present in the data")
    if cfg.max_per_subject is not None:
        by_subject: dict[str, list[Question]] = defaultdict(list)
        for q in chosen:
            by_subject[q.subject].append(q)
        keep: set[int] = set()
        for subject, items in by_subject.items():
            if len(items) > cfg.max_per_subject:
                rng = random.Random(f"{seed}:{subject}")
                items = rng.sample(items, cfg.max_per_subject)
            keep.update(q.id for q in items)
        chosen = [q for q in chosen if q.id in keep]
    if cfg.limit is not None and len(chosen) > cfg.limit:
        # spread the limit over subjects so small runs still see every subject
        rng = random.Random(seed)
        picked = sorted(rng.sample(range(len(chosen)), cfg.limit))
        chosen = [chosen[i] for i in picked]
    if not chosen:
        raise UserError("no questions selected", key="data", fix="check subjects and limits")
    return chosen


def shots_by_subject(questions: Sequence[Question]) -> dict[str, list[Question]]:
    pool: dict[str, list[Question]] = defaultdict(list)
    for q in questions:
        pool[q.subject].append(q)
    return dict(pool)


def subject_counts(questions: Sequence[Question]) -> Counter[str]:
    return Counter(q.subject for q in questions)


def check_config_against_data(cfg: ExperimentConfig) -> int:
    """Checks that need the data itself (local or bundled sources only); returns the points per
    site the analysis will see."""
    if looks_like_hub_id(cfg.data.source) and not Path(cfg.data.source).is_dir():
        return -1  # not downloaded on the login node; checked when the stage runs
    questions = select_eval_questions(load_split(cfg.data, cfg.data.eval_split), cfg.data,
                                      cfg.run.seed)
    if any(k > 0 for k in cfg.prompts.shots):
        pool = shots_by_subject(load_split(cfg.data, cfg.data.shot_split))
        need = max(cfg.prompts.shots)
        for subject in sorted({q.subject for q in questions}):
            have = len(pool.get(subject, ()))
            if have < need:
                raise UserError(f"{need} shots asked but subject '{subject}' has {have} "
                                f"'{cfg.data.shot_split}' questions", file=cfg.source_file,
                                key="prompts.shots", fix=f"use at most {have} shots")
    counts = subject_counts(questions)
    cap = cfg.analysis.per_subject_cap
    n_points = sum(min(c, cap) if cap is not None else c for c in counts.values())
    if cfg.analysis.maxk >= n_points:
        raise UserError(f"maxk={cfg.analysis.maxk} but the analysis sees {n_points} points",
                        file=cfg.source_file, key="analysis.maxk",
                        fix=f"set analysis.maxk below {n_points} or use more questions")
    return n_points
