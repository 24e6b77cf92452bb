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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from replandscape.config import BUILTIN_PREFIX, DataConfig, ExperimentConfig, looks_like_hub_id
from replandscape.errors import UserError
from replandscape.outputs import ensure_dir

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
    return ensure_dir(path, key="REPLANDSCAPE_CACHE")


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def _split_files(folder: Path, split: str) -> tuple[str, list[Path]]:
    for suffix in SPLIT_SUFFIXES:
        single = folder / f"{split}{suffix}"
        if single.is_file():
            return ("parquet" if suffix == ".parquet" else "json"), [single]
    sub = folder / split
    if sub.is_dir():
        for suffix in SPLIT_SUFFIXES:
            files = sorted(sub.glob(f"*{suffix}"))
            if files:
                return ("parquet" if suffix == ".parquet" else "json"), files
    raise UserError(f"no '{split}' split (looked for {split}.parquet, {split}.jsonl, "
                    f"{split}.json or {split}/*.parquet)", file=str(folder), key="data.source",
                    fix=f"add the {split} split or choose another split")


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def validate_row(row: object, row_id: int, num_choices: int, *, file: str,
                 where: str) -> Question:
    """Check one data row's fields and types and return it as a :class:`Question`.

    Every row of every source (JSON lines, parquet, hub) goes through here, so a row the suite
    accepts always has a string question and subject, a list of exactly ``num_choices`` string
    choices and an integer answer indexing them.

    Args:
        row: the row as read (a mapping of field to value).
        row_id: the question's id (its index in the split).
        num_choices: the number of choices every row must have (``data.num_choices``).
        file: the file (or hub id) the row came from, named in the error.
        where: the row's place in ``file``, named in the error (``"line 7"`` or ``"row 6"``).

    Returns:
        The question.

    Raises:
        UserError: a field is missing or has the wrong type or value.
    """
    def bad(message: str, fix: str) -> UserError:
        return UserError(message, file=file, key=where, fix=fix)

    if not isinstance(row, dict):
        raise bad(f"expected an object with fields {', '.join(REQUIRED_FIELDS)}, got "
                  f"{_describe(row)}", "write one JSON object per row")
    missing = [f for f in REQUIRED_FIELDS if row.get(f) is None]
    if missing:
        raise bad(f"lacks field(s) {', '.join(missing)}",
                  "give every row question, choices, answer and subject")
    for name in ("question", "subject"):
        if not isinstance(row[name], str):
            raise bad(f"{name} is {_describe(row[name])}, not a string", f"quote the {name}")
    if not row["subject"].strip():
        raise bad("subject is empty", "give every row its subject's name")
    choices = row["choices"]
    if isinstance(choices, (str, bytes)) or not isinstance(choices, (list, tuple)):
        raise bad(f"choices is {_describe(choices)}, not a list",
                  'write choices as a list of strings, e.g. ["a", "b", "c", "d"]')
    for i, choice in enumerate(choices):
        if not isinstance(choice, str):
            raise bad(f"choices[{i}] is {_describe(choice)}, not a string", "quote every choice")
    if len(choices) != num_choices:
        raise bad(f"has {len(choices)} choices but data.num_choices is {num_choices}",
                  f"give every row {num_choices} choices or set data.num_choices")
    answer = row["answer"]
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().isalpha():
        letter = answer.strip().upper()
        raise bad(f"answer is the letter {answer!r}, not a choice index",
                  f"write the 0-based index of the right choice: {letter} is "
                  f"{ord(letter) - ord('A')}")
    if isinstance(answer, str):
        raise bad(f"answer is the string {_describe(answer)}, not a choice index",
                  f"write the 0-based index of the right choice as a number, "
                  f"0..{num_choices - 1}")
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise bad(f"answer is {_describe(answer)}, not a whole number",
                  f"write the 0-based index of the right choice, 0..{num_choices - 1}")
    if not 0 <= answer < len(choices):
        raise bad(f"answer {answer} is outside the {len(choices)} choices",
                  f"answers are 0-based choice indices, 0..{len(choices) - 1}")
    return Question(id=row_id, subject=row["subject"], question=row["question"],
                    choices=tuple(choices), answer=answer)


def _json_rows(path: Path) -> Iterator[tuple[str, object]]:
    """Rows of a JSON-lines file (or of a ``.json`` file holding one array), each with its place
    (``line N``) for errors; read here rather than by ``datasets`` so a bad line is named."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
            fh.seek(0)
            if path.suffix == ".json" and head.startswith(b"["):
                yield from _json_array_rows(path, fh.read())
                return
            for number, raw in enumerate(fh, start=1):
                where = f"line {number}"
                try:
                    text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise UserError(f"is not UTF-8 text (byte {exc.start + 1} of the line)",
                                    file=str(path), key=where,
                                    fix="save the file as UTF-8") from None
                if not text.strip():
                    continue
                try:
                    row = json.loads(text.strip())
                except json.JSONDecodeError as exc:
                    raise UserError(f"is not valid JSON ({exc.msg} at column {exc.colno})",
                                    file=str(path), key=where,
                                    fix="write one JSON object per line") from None
                yield where, row
    except OSError as exc:
        raise UserError(f"cannot read the data file: {exc.strerror or exc}", file=str(path),
                        key="data.source", fix="check the file's permissions") from None


def _json_array_rows(path: Path, raw: bytes) -> Iterator[tuple[str, object]]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError("is not UTF-8 text", file=str(path), key=f"line {line}",
                        fix="save the file as UTF-8") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"is not valid JSON ({exc.msg} at column {exc.colno})", file=str(path),
                        key=f"line {exc.lineno}",
                        fix="write a JSON array of objects, or one object per line") from None
    for i, row in enumerate(rows):  # a list: the caller saw the file open with '['
        yield f"row {i}", row


def _table_rows(table: Iterable[object]) -> Iterator[tuple[str, object]]:
    for i, row in enumerate(table):
        yield f"row {i}", row


def _load_table(kind: str, source: str, split: str, *, hub_config: str | None = None,
                file: Path | None = None) -> Iterable[object]:
    """A split through ``datasets``: a parquet file, or a hub id (the only source that may need
    the network, so the only one whose fix mentions downloading)."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if file is None:
            return datasets.load_dataset(source, hub_config, split=split)
        return datasets.load_dataset(kind, data_files={split: [str(file)]}, split=split)
    except UserError:
        raise
    except Exception as exc:  # the datasets library raises many types for unreadable input
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        if file is None:
            raise UserError(f"cannot load split '{split}': {first}", file=source,
                            key="data.source", fix="check the hub id and data.hub_config, or "
                            "set HF_DATASETS_OFFLINE=0 to download") from None
        raise UserError(f"cannot read split '{split}': {first}", file=str(file),
                        key="data.source",
                        fix="check that the file is a parquet table (e.g. written by "
                        "pandas.DataFrame.to_parquet)") from None


def load_split(cfg: DataConfig, split: str) -> list[Question]:
    """Load one split as a list of questions; every row is checked by :func:`validate_row`."""
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
    sources: list[tuple[str, Iterable[tuple[str, object]]]]
    if folder is None:
        sources = [(source, _table_rows(_load_table("hub", source, split,
                                                    hub_config=cfg.hub_config)))]
        origin = source
    else:
        kind, files = _split_files(folder, split)
        sources = [(str(f), _json_rows(f) if kind == "json"
                    else _table_rows(_load_table(kind, source, split, file=f))) for f in files]
        origin = str(files[0]) if len(files) == 1 else str(folder / split)
    questions: list[Question] = []
    for file, rows in sources:
        for where, row in rows:
            questions.append(validate_row(row, len(questions), cfg.num_choices, file=file,
                                          where=where))
    if not questions:
        raise UserError(f"split '{split}' has no rows", file=origin, key="data.source",
                        fix=f"add questions to the {split} split or choose another split")
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
    if cfg.task.name != "mmlu":
        from replandscape.evalset import check_task_against_data

        return check_task_against_data(cfg)
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
