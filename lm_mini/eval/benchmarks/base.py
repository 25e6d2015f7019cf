"""What a benchmark is: its own question file, the official prompt rule, LLaVA's answers file, the official scorer.

The contract between the generic runner (``lm_mini.eval.benchmark_runner``: generation, chunks, answers
files, suites, MLflow) and one benchmark family (a module in this package: reading its question file,
its prompt, its official scoring and submission files):

- :meth:`Benchmark.read_questions` turns the benchmark's own question file (LLaVA's ``.jsonl``, MMBench's
  ``.tsv``, a video benchmark's ``.json``) into :class:`Question` objects, in file order, with
  ``question_id`` of its original JSON type;
- :meth:`Benchmark.prompt` is the user turn's text after the media placeholder, exactly as the official
  inference script builds it (fixed suffixes included);
- the runner writes one LLaVA answers line per question (:class:`Answer`, as ``model_vqa_loader.py``) whose
  ``prompt`` is :meth:`Benchmark.answer_prompt` (the official scripts' ``cur_prompt``: scorers read it back);
- :meth:`Benchmark.score` reads answers lines (``question_id``, ``prompt``, ``text``, ...) back and returns a
  :class:`BenchmarkResult` equal to what the official scorer computes; benchmarks scored by a server
  write a submission file instead (:meth:`Benchmark.write_submission`) and score what they can locally.

``question_id`` alone does not name a question in every LLaVA file: TextVQA's is the *image* id and MME's
the image path (two questions per image). An answer belongs to the question with the same
:func:`answer_key` ``(question_id, prompt)`` (:meth:`Benchmark.answer_key` for a :class:`Question`); resume
and chunk merging must key on it, not on ``question_id``.

A question file may ask one question twice (two lines of one ``(question_id, prompt)``): its answers pair
with those lines in order; only answers beyond what the question file asks are refused.

Scores are in the units the paper's tables use: percentages (0-100), MME in its points (acc + acc+ per
subtask, summed). Answers to questions without a reference are left out of every score and listed in
:attr:`BenchmarkResult.excluded`. An incomplete answers file (questions of the benchmark's set -- the
question file, or where the official script takes it, the annotations -- without an answer, listed in
:attr:`BenchmarkResult.unanswered`) is scored as the official script scores it, per benchmark
(:attr:`Benchmark.missing_answers`): counted wrong, not counted (the script scores the answers it is given),
or refused (the script fails on it); the result's notes say which.

Every line of one answers file comes from one model, one set of weights and one set of generation options
(:func:`provenance`: ``model_id``, ``metadata.weights.fingerprint``, ``metadata.generation``): resuming, merging
chunks and scoring refuse a file that mixes them (:func:`check_one_source`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, Hashable, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from lm_mini.registry import Registry

PathLike = Union[str, Path]


@dataclass(frozen=True)
class Question:
    """One question of a benchmark, as its file gives it.

    ``media``: the image/video path relative to ``--image-folder`` (``str``), the media itself (``bytes``:
    MMBench/SEED carry base64 images in their TSV), or None (a text-only question). ``record`` is the whole
    original entry (options, answers, categories ... whatever the benchmark adds)."""

    question_id: Any  # str or int, as in the file; answers files keep it so
    text: str  # the question as the file gives it (LLaVA's "text")
    media: Union[str, bytes, None] = None
    is_video: bool = False
    category: Optional[str] = None
    record: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Answer:
    """One line of LLaVA's answers file (``llavamini/eval/model_vqa_loader.py``). ``extra``: the fields a benchmark's
    official script adds to its lines (MMBench's ``round_id``, ``options``, ``option_char``), written after ``text``
    as that script writes them."""

    question_id: Any
    prompt: str
    text: str
    answer_id: str
    model_id: str
    metadata: Dict[str, Any] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        line = {"question_id": self.question_id, "round_id": None, "prompt": self.prompt, "text": self.text}
        line.update(self.extra)
        if "round_id" not in self.extra:
            del line["round_id"]
        line.update({"answer_id": self.answer_id, "model_id": self.model_id, "metadata": self.metadata})
        return json.dumps(line)


@dataclass
class BenchmarkResult:
    """Scores of one answers file. ``scores`` keys: ``<metric>`` or ``<split>/<metric>`` (``adversarial/f1``),
    metric names ``accuracy``, ``precision``, ``recall``, ``f1``, ``yes_ratio``, ... where they apply.
    ``excluded``: ids of questions left out of every score (no reference answer), never counted correct."""

    benchmark: str
    n: int  # questions scored
    scores: Dict[str, float] = field(default_factory=dict)
    excluded: List[Any] = field(default_factory=list)
    files: Dict[str, str] = field(default_factory=dict)  # what was written: submission sheets, per-split files
    notes: List[str] = field(default_factory=list)  # e.g. "test-dev: no annotations; submission written"
    unanswered: List[Any] = field(default_factory=list)  # ids of given questions the answers file lacks (not scored)

    def to_json(self) -> Dict[str, Any]:
        """The ``--json`` object of ``lm-mini eval`` / ``lm-mini score``."""
        out: Dict[str, Any] = {"benchmark": self.benchmark, "n": self.n, "scores": dict(self.scores)}
        if self.excluded:
            out["excluded"] = {"n": len(self.excluded), "question_ids": list(self.excluded)}
        if self.unanswered:
            out["unanswered"] = {"n": len(self.unanswered), "question_ids": list(self.unanswered)}
        if self.files:
            out["files"] = dict(self.files)
        if self.notes:
            out["notes"] = list(self.notes)
        return out


class Benchmark:
    """One benchmark (a subclass per benchmark, registered in :data:`BENCHMARKS` under its name)."""

    name: ClassVar[str] = ""
    modality: ClassVar[str] = "image"  # "image" or "video"
    # Generation as the official script runs it (the runner's defaults; flags override).
    max_new_tokens: ClassVar[int] = 128
    needs_annotations: ClassVar[bool] = False  # True: score() needs --annotations (else only a submission file)
    needs_questions: ClassVar[bool] = False  # True: score() needs the question file (the runner passes it)
    judged: ClassVar[bool] = False  # GPT-judged: answers file only, scored by a user's --judge command
    headline: ClassVar[str] = "accuracy"  # the score key the paper's Table 1 reports
    # Video frames as the official script samples them: ``video_fps`` frames per second of the clip (evenly,
    # the middle of each segment), at most ``video_max_frames`` (None: no cap). A folder of frames: all of them.
    video_fps: ClassVar[float] = 1.0
    video_max_frames: ClassVar[Optional[int]] = None
    # A question of the benchmark's set without an answer (an incomplete answers file), as the official script
    # treats it: "wrong" (counted, wrong), "not_counted" (the script scores the answers it is given) or "refuse"
    # (the script fails on it, or answers every question before it scores). ``missing_rule`` names the official
    # code that does so; results and errors quote it.
    missing_answers: ClassVar[str] = "refuse"
    missing_rule: ClassVar[str] = "the official script scores complete answers files only"

    def read_questions(self, path: PathLike) -> List[Question]:
        """LLaVA's question ``.jsonl``: ``question_id, image|video, text, category`` per line."""
        return read_llava_questions(path)

    def prompt(self, question: Question) -> str:
        """The user text after the media placeholder (LLaVA puts ``<image>\\n`` before it)."""
        return question.text

    def answer_prompt(self, question: Question) -> str:
        """The answers line's ``prompt`` as the official script writes it (``cur_prompt``): the question file's
        text for ``model_vqa_loader.py``; scorers read it back (TextVQA and MME find the question by it)."""
        return question.text

    def answer_key(self, question: Question) -> Tuple[Hashable, str]:
        """The key an answer to ``question`` has (:func:`answer_key` of its answers line)."""
        return (question.question_id, self.answer_prompt(question))

    def answer_fields(self, question: Question) -> Dict[str, Any]:
        """Fields the official inference script adds to an answers line besides LLaVA's six (see :class:`Answer`)."""
        return {}

    def check_scorable(self, questions: Sequence[Question], annotations: Optional[PathLike]) -> None:
        """Raise ``ValueError`` saying what to give when these questions cannot be scored with these annotations
        and the benchmark has no submission file to write instead (the runner asks before generating)."""

    def submission_questions_for(self, questions_file: PathLike) -> Tuple[Optional[Path], Optional[str]]:
        """``(question list, note)``: the question file the submission must list when it is not the one asked
        (VQAv2: LLaVA's test2015 file beside the test-dev one; None: the question file asked), and what to tell
        the user about it (None: nothing)."""
        return None, None

    def media_path(self, question: Question, folder: PathLike) -> Path:
        """Where ``question``'s media lies under ``--image-folder`` (video benchmarks try the official extensions)."""
        if not isinstance(question.media, str):
            raise ValueError(f"{self.name}: question {question.question_id!r} has no media path")
        return Path(folder) / question.media

    def score(self, answers: Sequence[Mapping[str, Any]], questions: Optional[Sequence[Question]] = None,
              annotations: Optional[PathLike] = None, judge: Optional[str] = None) -> BenchmarkResult:
        """``judge``: the user's judge command (GPT-judged benchmarks only)."""
        raise NotImplementedError(f"benchmark {self.name}: no local scorer (see write_submission)")

    def write_submission(self, answers: Sequence[Mapping[str, Any]], out_dir: PathLike,
                         questions: Optional[Sequence[Question]] = None,
                         annotations: Optional[PathLike] = None) -> Optional[Path]:
        """The file a benchmark's evaluation server (or GPT judge) takes, written into ``out_dir``; None where there
        is none, or where it needs the question file / annotations and they are not given."""
        return None


BENCHMARKS: Registry = Registry("benchmark", home="lm_mini.eval.benchmarks")


class IncompleteAnswers(ValueError):
    """An answers file lacks answers the official scorer needs (a benchmark whose ``missing_answers`` is "refuse")."""


class SubmissionNotWritten(Exception):
    """``write_submission`` declines (e.g. the official converter fails on a missing answer); the message says why
    and becomes a note of the result."""


class MixedAnswers(ValueError):
    """Answers of different models, weights or generation options in what must be one answers file."""


# --------------------------------------------------------------------------- where answers come from
def provenance(answer: Mapping[str, Any]) -> Tuple[Any, Optional[str], str]:
    """What produced an answers line: ``(model_id, weights fingerprint, generation options as JSON)``. The weights
    fingerprint (``metadata.weights.fingerprint``, written by ``lm-mini eval``) tells checkpoints of one run apart,
    whose ``model_id`` is the same; LLaVA's own answers files have neither (None, "null")."""
    meta = answer.get("metadata") or {}
    weights = meta.get("weights") if isinstance(meta, Mapping) else None
    generation = meta.get("generation") if isinstance(meta, Mapping) else None
    return (answer.get("model_id"), (weights or {}).get("fingerprint") if isinstance(weights, Mapping) else None,
            json.dumps(generation, sort_keys=True))


def describe_provenance(answer: Mapping[str, Any]) -> str:
    """An answers line's source for messages: model, checkpoint/step and weights fingerprint, generation options."""
    meta = answer.get("metadata") or {}
    weights = meta.get("weights") if isinstance(meta, Mapping) else None
    parts = [f"model {answer.get('model_id')!r}"]
    if isinstance(weights, Mapping):
        where = weights.get("checkpoint") or weights.get("source")
        parts.append((f"{where} " if where else "") + (f"step {weights['step']} " if weights.get("step") is not None else "")
                     + f"weights {weights.get('fingerprint')}")
    else:
        parts.append("no weights record")
    generation = meta.get("generation") if isinstance(meta, Mapping) else None
    parts.append(f"generation {json.dumps(generation, sort_keys=True) if generation is not None else 'not recorded'}")
    return ", ".join(parts)


def check_one_source(answers: Sequence[Tuple[str, Mapping[str, Any]]], what: str) -> None:
    """Refuse ``answers`` (``(where, line)`` pairs: "file:line") unless one model, one set of weights and one set of
    generation options wrote them all: a chunk, a resumed part or a file of another checkpoint mixed in would
    give one score to two models."""
    if not answers:
        return
    first_where, first = answers[0]
    source = provenance(first)
    for where, a in answers[1:]:
        if provenance(a) != source:
            raise MixedAnswers(f"{what}: answers of different models, weights or generation options: {first_where} "
                               f"({describe_provenance(first)}) and {where} ({describe_provenance(a)}). Score or merge "
                               "the answers of one model and checkpoint only (re-run the other part with the same "
                               "model, checkpoint and options, or delete it)")


# --------------------------------------------------------------------------- files
def read_jsonl(path: PathLike, what: str = "line") -> List[Dict[str, Any]]:
    """JSON lines, each an object; a bad line is an error naming the file and line number."""
    path = Path(path)
    out = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a JSON {what} ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object per {what}, got {type(obj).__name__}")
            out.append(obj)
    return out


def read_llava_questions(path: PathLike) -> List[Question]:
    """LLaVA's question file (``llava_textvqa_val_v051_ocr.jsonl``, ``llava_vqav2_mscoco_test-dev2015.jsonl``, ...)."""
    out = []
    for number, rec in enumerate(read_jsonl(path, "question"), 1):
        missing = [k for k in ("question_id", "text") if k not in rec]
        if missing:
            raise ValueError(f"{path}:{number}: question has no {', '.join(repr(k) for k in missing)} "
                             f"(LLaVA question files have question_id, image|video, text, category)")
        media, is_video = (rec["video"], True) if "video" in rec else (rec.get("image"), False)
        out.append(Question(rec["question_id"], rec["text"], media, is_video, rec.get("category"), rec))
    return out


def answer_key(answer: Mapping[str, Any]) -> Tuple[Hashable, str]:
    """``(question_id, prompt)`` of an answers line: what names its question (see the module docstring)."""
    return (answer["question_id"], answer.get("prompt", ""))


def read_answers(path: PathLike) -> List[Dict[str, Any]]:
    """An answers file (ours or LLaVA's): every line needs ``question_id`` and ``text``."""
    answers = read_jsonl(path, "answer")
    for number, a in enumerate(answers, 1):
        if "question_id" not in a or "text" not in a:
            raise ValueError(f"{path}: answer {number} has no 'question_id'/'text' (LLaVA answers-file lines have "
                             "question_id, prompt, text, answer_id, model_id, metadata)")
    return answers


def write_answers(path: PathLike, answers: Iterable[Answer]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for a in answers:
            f.write(a.to_json() + "\n")
