"""``lm-mini eval SOURCE --benchmark NAME --questions FILE ...``: a benchmark's own files in, LLaVA's answers file out.

What LLaVA-Mini's ``llavamini/eval/model_vqa_loader.py`` (and ``model_vqa_science.py``, ``model_vqa_mmbench.py``,
``video/*.py``) do, for any registered benchmark (:mod:`lm_mini.eval.benchmarks`):

1. read the question file with the benchmark's reader, keep this job's chunk (LLaVA's ``get_chunk``:
   ``--num-chunks N`` pieces of ``ceil(len / N)`` questions, piece ``--chunk-idx K``);
2. prompt with the model's conversation template: one user turn ``<image>\\n`` + :meth:`Benchmark.prompt`
   (the official scripts' fixed suffixes included; a question without media gets no placeholder), ending
   at the assistant prefix; media through the model's own preprocessing (``lm_mini.data.media``), videos
   sampled as the benchmark's official script samples them;
3. batched generation with a KV cache (:func:`lm_mini.eval.generation.generate_answers`), greedy unless
   ``--temperature`` > 0;
4. one JSON line per question, written as it is answered: ``question_id`` (its JSON type from the file),
   ``prompt`` (:meth:`Benchmark.answer_prompt`), ``text``, ``answer_id``, ``model_id``, ``metadata``: the
   generation options (with the ``seed`` when sampling) and the weights that answered (``weights``: checkpoint,
   step, a fingerprint of the loaded tensors, :func:`weights_fingerprint`). A run given an existing answers file
   continues after its last complete line and regenerates nothing it holds; a file holding answers to other
   questions, or written by another model, checkpoint or generation options is refused. The default answers
   file is the checkpoint's own: ``<run>/eval/<checkpoint>/<label>.jsonl`` (``<model dir>/eval/<label>.jsonl``);
5. chunks merge by concatenation in chunk order (``--merge``), checked complete against the question file and
   written by one model, checkpoint and set of options;
6. when the benchmark can score (its annotations given, or in its question file) the official scorer runs
   (:meth:`Benchmark.score`), a submission file is written where the benchmark has one, and the scores go to
   the source's MLflow run as ``eval/<benchmark>/<score key>``, at the step of the checkpoint that answered.

Ctrl-C keeps every finished answer (:class:`Interrupted` says how many and where); the same command continues.

A suite (``--suite experiments/benchmarks/paper_image.yaml``) runs a list of benchmarks with their local
paths (:class:`Suite`).
"""
from __future__ import annotations

import logging
import math
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from lm_mini.eval.answers_files import (answers_weights, check_resumable, checkpoint_tag, chunk_file, get_chunk, merge_chunks,
                                         read_finished, weights_record)
from lm_mini.eval.benchmarks.base import BENCHMARKS, Answer, Benchmark, BenchmarkResult, MixedAnswers, Question, read_answers
from lm_mini.eval.suites import BenchmarkSpec, Suite, missing_files

log = logging.getLogger(__name__)
PathLike = Union[str, Path]
IMAGE_FILE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


# --------------------------------------------------------------------------- questions -> batches
class QuestionDataset:
    """A benchmark's questions as model samples (``lm_mini.data.samples.collate`` batches them): the prompt's
    token ids (generation prompt, no labels) and the media's pixel views. ``__getitem__`` raises ``ValueError``
    naming the question and file when its media cannot be read."""

    def __init__(self, questions: Sequence[Question], benchmark: Benchmark, image_folder: Optional[PathLike],
                 tokenizer: Any, template: str, images: Any):
        self.questions, self.benchmark, self.folder = list(questions), benchmark, image_folder
        self.tokenizer, self.template, self.images = tokenizer, template, images
        self._ids: Dict[int, List[int]] = {}  # prompt ids rendered by check_prompts

    def __len__(self) -> int:
        return len(self.questions)

    def check_prompts(self, indices: Sequence[int]) -> None:
        """Render the prompts of the questions at ``indices`` now (kept for ``__getitem__``): a question the
        template cannot render fails before the first answer, naming it, not when its batch comes up."""
        for i in indices:
            self._ids[i] = self.prompt_ids(self.questions[i])

    def prompt_ids(self, q: Question) -> List[int]:
        from lm_mini.constants import IMAGE_PLACEHOLDER
        from lm_mini.data.conversation import build_prompt

        from lm_mini.data.errors import SampleError

        has_media = q.media is not None
        text = self.benchmark.prompt(q)
        if has_media and IMAGE_PLACEHOLDER not in text:  # model_vqa_loader.py; the video scripts keep a placed one
            text = IMAGE_PLACEHOLDER + "\n" + text
        try:
            return build_prompt([{"from": "human", "value": text}], self.tokenizer, self.template, has_media=has_media,
                                sample_id=str(q.question_id))
        except SampleError as e:
            raise ValueError(f"{self.benchmark.name}: question {q.question_id!r}: {e}") from e

    def media_path(self, q: Question) -> Path:
        if self.folder is None:
            raise ValueError(f"{self.benchmark.name}: question {q.question_id!r} has media {q.media!r}: give --image-folder")
        return self.benchmark.media_path(q, self.folder)

    def pixels(self, q: Question) -> Tuple[Any, int]:
        """``(views [V, 3, S, S], frames)`` of the question's image or video (frames 1 for an image)."""
        from lm_mini.data.media import decode_image, decode_video

        if isinstance(q.media, (bytes, bytearray)):  # MMBench / SEED TSVs carry the image itself
            return self.images.image(decode_image(bytes(q.media), str(q.question_id))), 1
        path = self.media_path(q)
        if not q.is_video:
            return self.images.image(decode_image(path.read_bytes(), str(path))), 1
        if path.is_dir():  # a folder of frames (MVBench's frame tasks): all of them, in name order
            names = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_FILE_SUFFIXES)
            if not names:
                raise ValueError(f"{path}: a video folder with no frame images")
            frames = [decode_image(p.read_bytes(), str(p)) for p in names]
        else:
            cap = self.benchmark.video_max_frames
            frames = decode_video(path.read_bytes(), self.benchmark.video_fps, cap if cap is not None else sys.maxsize, str(path))
        return self.images.video(frames), len(frames)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        from lm_mini.constants import IGNORE_INDEX
        from lm_mini.data.errors import SampleError

        q = self.questions[i]
        ids = self._ids[i] if i in self._ids else self.prompt_ids(q)
        try:
            pixels, frames = self.pixels(q) if q.media is not None else (None, 0)
        except (SampleError, OSError) as e:
            raise ValueError(f"{self.benchmark.name}: question {q.question_id!r}: cannot read its media: {e}") from e
        return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(ids), "pixel_values": pixels, "frames": frames,
                "is_video": bool(q.is_video and q.media is not None), "sample_id": i, "flags": []}


def check_media(dataset: QuestionDataset, indices: Optional[Sequence[int]] = None) -> None:
    """Every media file of the questions (at ``indices``) exists, checked before any generation: a wrong
    ``--image-folder`` fails at once, not hours in."""
    chosen = [dataset.questions[i] for i in indices] if indices is not None else dataset.questions
    missing = []
    for q in chosen:
        if isinstance(q.media, str):
            path = dataset.media_path(q)
            if not path.exists():
                missing.append(f"{q.question_id!r}: {path}")
    if missing:
        raise FileNotFoundError(f"{dataset.benchmark.name}: the media of {len(missing)} of {len(chosen)} questions not found "
                                f"(--image-folder {dataset.folder}), e.g. " + "; ".join(missing[:3]))


# --------------------------------------------------------------------------- generation
@dataclass
class LoadedModel:
    """A model ready for benchmark generation (``lm_mini.interop.export.load_model`` + its data processing).
    ``weights``: what the answers lines record of the weights (``metadata.weights``, :func:`weights_record`);
    empty where no weights were loaded (``--merge``, the parent of ``--devices``)."""

    model: Any
    cfg: Any
    tokenizer: Any
    images: Any  # ImageProcessor: the model's own preprocessing
    model_id: str
    info: Dict[str, Any] = field(default_factory=dict)  # the source's MLflow run id / tracking URI / step
    run_dir: Optional[Path] = None
    path: Optional[Path] = None
    weights: Dict[str, Any] = field(default_factory=dict)


class Interrupted(Exception):
    """Generation stopped by Ctrl-C: ``done`` (of ``total``) answers are kept in ``answers_file`` (a file, or the
    folder of a benchmark's chunk files); the same command continues after them."""

    def __init__(self, answers_file: Path, done: int, total: Optional[int] = None):
        of = f" of {total}" if total is not None else ""
        super().__init__(f"interrupted: {done}{of} answers kept in {answers_file}; run the same command again to continue")
        self.answers_file, self.done, self.total = answers_file, done, total


def load_for_benchmarks(source: PathLike, device: Optional[str] = None, model_id: Optional[str] = None,
                        backends: Optional[Mapping[str, str]] = None) -> LoadedModel:
    import torch

    from lm_mini.data.streaming import build_processor
    from lm_mini.interop.export import load_model
    from lm_mini.runs import resolve_source

    found = resolve_source(source)
    device = device if device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_model(found, device, backends)  # backends: {"model.attn_implementation": ...} or the saved ones
    processor = build_processor(cfg)
    name = model_id or (found.run_dir.name if found.run_dir is not None else Path(found.path).name)
    info = dict(found.info)  # with the checkpoint's global_step, read with its weights
    return LoadedModel(model, cfg, processor.tokenizer, processor.images, name, info, found.run_dir, Path(found.path),
                       weights_record(model, info, Path(found.path)))


def generate_benchmark_answers(loaded: LoadedModel, benchmark: Benchmark, questions: Sequence[Question], answers_file: Path,
                               image_folder: Optional[PathLike], options: Any, batch_size: int = 1, num_workers: int = 0,
                               progress: Optional[Callable[[int, int], None]] = None, seed: int = 0,
                               first_index: int = 0) -> int:
    """Answer ``questions`` into ``answers_file`` line by line, after the answers it already holds; returns how
    many were generated now (0 for a finished file).

    Sampling (``options.temperature`` > 0) seeds torch before each batch from ``seed`` and the position of the
    batch's first question in the benchmark (``first_index``: this chunk's first question), so a sampled run is
    reproducible, and with batches of one a resumed or chunked run answers as one fresh run; the seed is recorded
    in ``metadata.generation``. Ctrl-C raises :class:`Interrupted` after the last finished batch is written."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from lm_mini.data.samples import Collator
    from lm_mini.eval.generation import generate_answers, stop_token_ids

    template = loaded.cfg.data.template
    dataset = QuestionDataset(questions, benchmark, image_folder, loaded.tokenizer, template, loaded.images)
    sampling = options.temperature > 0
    generation = dict(options.to_dict(), **({"seed": seed} if sampling else {}))
    metadata = {"generation": generation, "weights": dict(loaded.weights)}
    expected = {"model_id": loaded.model_id, "metadata": metadata}
    done = read_finished(answers_file)
    check_resumable(answers_file, done, [benchmark.answer_key(q) for q in questions], expected)
    todo = list(range(len(done), len(questions)))
    if not todo:
        return 0
    check_media(dataset, todo)
    dataset.check_prompts(todo)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else loaded.tokenizer.eos_token_id
    loader = DataLoader(Subset(dataset, todo), batch_size=batch_size, num_workers=num_workers, collate_fn=Collator(int(pad)))
    stop = stop_token_ids(loaded.tokenizer, template)
    device = next(loaded.model.parameters()).device
    answers_file.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    try:
        with answers_file.open("a", encoding="utf-8") as f:
            for batch in loader:
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                if sampling:  # a 64-bit seed: (seed, question position) never collide
                    torch.manual_seed((seed << 32) + first_index + int(batch["sample_ids"][0]))
                texts = generate_answers(loaded.model, batch, loaded.tokenizer, stop, options)
                f.write("".join(Answer(questions[i].question_id, benchmark.answer_prompt(questions[i]), text,
                                       uuid.uuid4().hex, loaded.model_id, metadata,
                                       benchmark.answer_fields(questions[i])).to_json() + "\n"
                                for i, text in zip(batch["sample_ids"], texts)))
                f.flush()  # a killed job keeps every finished batch
                written += len(texts)
                if progress is not None:
                    progress(len(done) + written, len(questions))
    except KeyboardInterrupt:
        raise Interrupted(answers_file, len(done) + written, len(questions)) from None
    return written


# --------------------------------------------------------------------------- scoring
def score_run(benchmark: Benchmark, answers: Sequence[Mapping[str, Any]], questions: Sequence[Question],
              annotations: Optional[PathLike], out_dir: Path, judge: Optional[str] = None,
              questions_file: Optional[PathLike] = None, submission_questions: Optional[PathLike] = None
              ) -> Optional[BenchmarkResult]:
    """:func:`lm_mini.eval.benchmarks.scoring.score_answers` (the official score, submission / judge input file), as
    ``lm-mini score`` runs it; a GPT-judged benchmark without a ``judge`` command gets its judge input only (None)."""
    from lm_mini.eval.benchmarks.scoring import score_answers

    if benchmark.judged and not judge:
        benchmark.write_submission(answers, out_dir, questions, annotations)
        return None
    return score_answers(benchmark, answers, questions, annotations, out_dir, judge, submission_questions,
                         questions_file=questions_file)


def upload_dir(answers_file: Path) -> Path:
    """Where a benchmark's submission / judge input goes: ``<answers stem>_upload/`` beside the answers (as ``lm-mini score``)."""
    return answers_file.with_name(answers_file.stem + "_upload")


def mlflow_metrics(label: str, result: BenchmarkResult) -> Dict[str, float]:
    """``eval/<label>/<score key>`` for every score (valid MLflow names)."""
    from lm_mini.eval.mlflow_scores import metric_name

    return {metric_name("eval", label, key): float(value) for key, value in result.scores.items()}


@dataclass
class BenchmarkRun:
    """What one benchmark run did: where its answers are, how many were generated now, its scores."""

    spec: BenchmarkSpec
    answers_file: Path
    n_questions: int
    generated: int
    result: Optional[BenchmarkResult] = None
    mlflow_run_id: Optional[str] = None
    chunk: Optional[Tuple[int, int]] = None  # (num_chunks, chunk_idx) when this run was one chunk (not scored)
    merged: Optional[Tuple[int, int]] = None  # (chunk files, answers) when this run merged chunks

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = self.result.to_json() if self.result is not None else {"benchmark": self.spec.name}
        if self.spec.label and self.spec.label != self.spec.name:
            out["label"] = self.spec.label
        out.update({"answers_file": str(self.answers_file), "questions": self.n_questions, "generated": self.generated})
        if self.chunk:
            out["chunk"] = {"num_chunks": self.chunk[0], "chunk_idx": self.chunk[1]}
        if self.merged:
            out["merged"] = {"chunks": self.merged[0], "answers": self.merged[1]}
        if self.mlflow_run_id:
            out["mlflow_run_id"] = self.mlflow_run_id
        return out


def default_answers_file(loaded_or_root: Any, label: str) -> Path:
    """``<run>/eval/<checkpoint>/<label>.jsonl`` for a run or checkpoint (each checkpoint its own answers: a run
    directory names its newest checkpoint, which changes as training goes on), ``<model dir>/eval/<label>.jsonl``
    for a model directory, ``<root>/eval/<label>.jsonl`` for a folder."""
    if not isinstance(loaded_or_root, LoadedModel):
        return Path(loaded_or_root) / "eval" / f"{label}.jsonl"
    root = Path(loaded_or_root.run_dir or loaded_or_root.path) / "eval"
    tag = checkpoint_tag(loaded_or_root.info)
    return (root / tag if tag else root) / f"{label}.jsonl"


def check_answers_of_source(answers: Sequence[Mapping[str, Any]], loaded: LoadedModel, answers_file: Path) -> None:
    """Merged answers logged to SOURCE's MLflow run must come from SOURCE's checkpoint (when both say which)."""
    written = answers_weights(answers).get("checkpoint")
    mine = loaded.info.get("checkpoint")
    if written and mine and str(written) != str(mine):
        raise MixedAnswers(f"{answers_file}: the answers were written by checkpoint {written}, but {loaded.path} is "
                           f"checkpoint {mine}: give the checkpoint that wrote them as SOURCE (or no SOURCE, to score "
                           "without logging)")


@dataclass
class PreparedBenchmark:
    """A benchmark run whose files were checked and whose questions were read (:func:`prepare`), ready for a model."""

    spec: BenchmarkSpec
    benchmark: Benchmark
    questions: List[Question]


def prepare(spec: BenchmarkSpec, scoring: bool = True) -> PreparedBenchmark:
    """What can fail without the model fails here, before a model is loaded (minutes for a large one): the spec's
    files exist, its question file reads, and -- for a run that scores (``scoring``: not one chunk of several) --
    the benchmark can be scored with the files given (:meth:`Benchmark.check_scorable`: POPE without labels)."""
    benchmark: Benchmark = BENCHMARKS.create(spec.name)
    missing = missing_files(spec)
    if missing:
        raise FileNotFoundError("not found: " + "; ".join(missing))
    questions = benchmark.read_questions(spec.questions)
    if scoring:
        benchmark.check_scorable(questions, spec.annotations)
    return PreparedBenchmark(spec, benchmark, questions)


def run_benchmark(loaded: Optional[LoadedModel], spec: Union[BenchmarkSpec, PreparedBenchmark],
                  answers_file: Optional[PathLike] = None, options: Any = None, num_chunks: int = 1, chunk_idx: int = 0,
                  batch_size: int = 1, num_workers: int = 0, merge: bool = False, log_mlflow: bool = True,
                  judge: Optional[str] = None, progress: Optional[Callable[[int, int], None]] = None,
                  seed: int = 0) -> BenchmarkRun:
    """Generate (this chunk of) ``spec``'s answers, or merge the chunks (``merge``), then score the whole answers
    file and log the scores to the source's MLflow run, at the step of the checkpoint that answered. A chunk of
    several is only generated (merge, then score). ``spec`` may come :func:`prepare`-d (checked before the model
    was loaded); else it is prepared here, before generating."""
    from lm_mini.eval.generation import GenerationOptions
    from lm_mini.eval.mlflow_scores import log_scores

    prepared = spec if isinstance(spec, PreparedBenchmark) else prepare(spec, scoring=not merge and num_chunks == 1)
    spec, benchmark, questions = prepared.spec, prepared.benchmark, prepared.questions
    if answers_file is None:
        if loaded is None:
            raise ValueError("give --answers-file (the merged file) or the model it came from")
        answers_file = default_answers_file(loaded, spec.key)
    answers_file = Path(answers_file)
    info = dict(loaded.info) if loaded is not None else {}
    if merge:
        merged = merge_chunks(answers_file, num_chunks, [benchmark.answer_key(q) for q in questions])
        run = BenchmarkRun(spec, answers_file, len(questions), 0, merged=(merged.chunks, len(merged.answers)))
        if loaded is not None:
            check_answers_of_source(merged.answers, loaded, answers_file)
            step = answers_weights(merged.answers).get("step")  # no weights loaded here: the answers say the step
            info.update({} if step is None else {"global_step": step})
    else:
        if loaded is None:
            raise ValueError("give the model to evaluate (run directory, checkpoint or model directory)")
        options = options or GenerationOptions.from_config(loaded.cfg.eval, max_new_tokens=spec.max_new_tokens or benchmark.max_new_tokens)
        mine = get_chunk(questions, num_chunks, chunk_idx)
        first = chunk_idx * max(1, math.ceil(len(questions) / num_chunks))  # split_list's piece size
        target = chunk_file(answers_file, num_chunks, chunk_idx) if num_chunks > 1 else answers_file
        generated = generate_benchmark_answers(loaded, benchmark, mine, target, spec.image_folder, options, batch_size,
                                               num_workers, progress, seed, first)
        run = BenchmarkRun(spec, target, len(mine), generated, chunk=(num_chunks, chunk_idx) if num_chunks > 1 else None)
        if num_chunks > 1:
            return run  # one piece of the benchmark: scored after --merge
    answers = read_answers(answers_file)
    run.result = score_run(benchmark, answers, questions, spec.annotations, upload_dir(answers_file), judge,
                           spec.questions, spec.submission_questions)
    if run.result is not None and log_mlflow and loaded is not None and run.result.scores:
        run.mlflow_run_id = log_scores(info, mlflow_metrics(spec.key, run.result),
                                       [answers_file] + [Path(p) for p in run.result.files.values() if Path(p).is_file()],
                                       artifact_path=f"eval/{spec.key}")
    return run


def prepare_suite(suite: Suite, only: Sequence[str] = ()) -> List[PreparedBenchmark]:
    """The benchmarks of ``suite`` to run (``only``: these names or labels), every one :func:`prepare`-d: all missing
    paths are named at once, before anything runs (and before a model is loaded)."""
    specs = [s for s in suite.benchmarks if not only or s.key in only or s.name in only]
    unknown = [o for o in only if not any(o in (s.key, s.name) for s in suite.benchmarks)]
    if unknown:
        raise ValueError(f"--only {', '.join(unknown)}: not in the suite ({', '.join(s.key for s in suite.benchmarks)})")
    for spec in specs:
        BENCHMARKS.get(spec.name)  # an unknown name fails now
    missing = [m for s in specs for m in missing_files(s)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} suite path(s) not found (suite root {suite.root}): " + "; ".join(missing))
    return [prepare(spec) for spec in specs]


def run_suite(loaded: LoadedModel, suite: Union[Suite, Sequence[PreparedBenchmark]], only: Sequence[str] = (),
              answers_dir: Optional[PathLike] = None, options_for: Optional[Callable[[BenchmarkSpec], Any]] = None,
              **kwargs: Any) -> Iterator[BenchmarkRun]:
    """Each benchmark of ``suite`` (``only``: these labels; or the :func:`prepare_suite` list) in turn."""
    prepared = prepare_suite(suite, only) if isinstance(suite, Suite) else list(suite)
    for item in prepared:
        out = Path(answers_dir) / f"{item.spec.key}.jsonl" if answers_dir else None
        yield run_benchmark(loaded, item, out, options_for(item.spec) if options_for else None, **kwargs)
