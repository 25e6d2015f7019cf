"""Answer metrics as ``torchmetrics.Metric`` classes (they sync across ranks), registered in :data:`METRICS`.

Names that carry a benchmark's rule give the official number (the rules: :mod:`lm_mini.eval.answer_processing`,
official files and commits cited there); lenient variants say so in their name:

- ``vqa_accuracy``: VQAv2 as LLaVA scores it: the answer through ``EvalAIAnswerProcessor``
  (``convert_vqav2_for_submission.py``), then ``vqaEval.py``'s accuracy against the annotators' answers;
- ``exact_match``: equality after the VQA normalisation (ours; not a benchmark's rule);
- ``multiple_choice``: ``eval_science_qa.py``'s option letter (LLaVA's rule): ``"B"``, ``"B. ..."`` or
  ``"The answer is B."``; ``multiple_choice_lenient``: a letter in any usual form, or the option's text;
- ``pope``: ``eval_pope.py``'s yes/no reading; ``pope_lenient``: "no"/"not" in any case in the first sentence.

Each metric names what its targets are (``target_kind``): ``"answers"`` (a string or a list of acceptable /
annotator answers per prediction), ``"choice"`` (a gold letter plus the options or their number) or
``"yes_no"``.
"""
from __future__ import annotations

import re
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Union

import torch
from torchmetrics import Metric

from lm_mini.eval.answer_processing import (
    option_letters,
    pope_answer,
    yes_no_scores,
    scienceqa_choice,
    vqaeval_normalize,
    vqav2_accuracy,
)
from lm_mini.registry import METRICS

Targets = Sequence[Union[str, Sequence[str]]]


def normalize_vqa_answer(text: str) -> str:
    """The VQA answer normalisation (``vqaEval.py``'s processPunctuation + processDigitArticle), whitespace cleaned."""
    return vqaeval_normalize(text.replace("\n", " ").replace("\t", " ").strip())


def vqa_score(prediction: str, gt_answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction as LLaVA's pipeline scores it (:func:`vqav2_accuracy`), in [0, 1].

    A single reference answer counts as ten annotators who agree (our shards' plain gold answer): the official
    rule then compares the processed prediction with that answer as written, without normalising it."""
    if not gt_answers:
        raise ValueError("vqa_score needs at least one ground-truth answer")
    gts = list(gt_answers) * 10 if len(gt_answers) == 1 else list(gt_answers)
    return vqav2_accuracy(prediction, gts)


class _MeanMetric(Metric):
    """Sum of per-sample scores and their count, summed across ranks."""

    full_state_update = False
    higher_is_better = True
    target_kind: ClassVar[str] = "answers"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _add(self, scores: List[float]) -> None:
        self.score_sum += float(sum(scores))
        self.total += len(scores)

    def compute(self) -> torch.Tensor:
        if self.total == 0:
            return torch.tensor(float("nan"))
        return (self.score_sum / self.total).float()


@METRICS.register("vqa_accuracy")
class VQAAccuracy(_MeanMetric):
    """``update(preds: list[str], targets: list[list[str]])``: the annotators' answers per prediction (VQAv2: 10)."""

    def update(self, preds: Sequence[str], targets: Targets) -> None:
        _check_lengths(preds, targets)
        self._add([vqa_score(p, [t] if isinstance(t, str) else list(t)) for p, t in zip(preds, targets)])


@METRICS.register("exact_match")
class ExactMatch(_MeanMetric):
    """Exact match after VQA normalisation (case, punctuation, articles, number words).

    ``targets`` may hold a string or a list of acceptable strings per prediction."""

    def update(self, preds: Sequence[str], targets: Targets) -> None:
        _check_lengths(preds, targets)
        scores = []
        for p, t in zip(preds, targets):
            options = [t] if isinstance(t, str) else list(t)
            scores.append(float(normalize_vqa_answer(p) in {normalize_vqa_answer(o) for o in options}))
        self._add(scores)


# --------------------------------------------------------------------------- multiple choice
_GOLD_LETTER = re.compile(r"\s*\(?([A-Za-z])\)?\s*[.:)\]]?\s*")


def gold_letter(target: str) -> str:
    """A gold answer as its letter: "B", "(B)", "b." -> "B" (anything else as written, upper-cased)."""
    m = _GOLD_LETTER.fullmatch(target)
    return m.group(1).upper() if m else target.strip().upper()


class _ChoiceAccuracy(_MeanMetric):
    """``update(preds: list[str], targets: list[str letter], options: list[int | list[str]])``: an answer from
    which no option letter can be read counts as wrong (and in ``unparsed``)."""

    target_kind: ClassVar[str] = "choice"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("unparsed", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def read_choice(self, text: str, options: Union[int, Sequence[str]]) -> Optional[str]:
        raise NotImplementedError

    def update(self, preds: Sequence[str], targets: Sequence[str], options: Sequence[Union[int, Sequence[str]]]) -> None:
        _check_lengths(preds, targets)
        _check_lengths(preds, options)
        scores = []
        for p, t, o in zip(preds, targets, options):
            choice = self.read_choice(p, o)
            self.unparsed += int(choice is None)
            scores.append(float(choice == gold_letter(t)))
        self._add(scores)


@METRICS.register("multiple_choice")
class MultipleChoiceAccuracy(_ChoiceAccuracy):
    """The option letter as LLaVA's ``eval_science_qa.py`` reads it (:func:`scienceqa_choice`): ``"(B)"``, ``"b"``,
    ``"B)"`` or ``"Answer: B"`` are not an answer (``multiple_choice_lenient`` reads them)."""

    def read_choice(self, text: str, options: Union[int, Sequence[str]]) -> Optional[str]:
        return scienceqa_choice(text, options if isinstance(options, int) else len(options))


_STRONG_PATTERNS = [  # a letter the answer plainly gives
    re.compile(r"^\s*\(?([A-Za-z])\)?\s*(?:[.:)\]]|$)"),  # "B", "b", "(b)", "B.", "B) text", "b: text"
    re.compile(r"(?i:answer\s*(?:is|:)?\s*(?:option\s*)?)\(?([A-Z])\)?(?![A-Za-z])"),  # "The answer is B"
    re.compile(r"(?i:(?:option|choice)\s*)\(?([A-Z])\)?(?![A-Za-z])"),  # "option C"
    re.compile(r"\(([A-Z])\)"),  # "... (C) ..."
]
_STANDALONE = re.compile(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])")  # a capital letter alone: the last resort
_WORD_NOT_LETTER = re.compile(r"[AI]\s+[a-z]")  # "A red circle", "I think ...": an article or pronoun


def extract_choice_lenient(text: str, options: Union[int, Sequence[str]]) -> Optional[str]:
    """The option letter a free-form answer picks, or None -- more lenient than any official parser.

    ``options``: the number of options (letters A, B, ...) or the option texts. In order: a letter
    given plainly ("B", "(b)", "B. ...", "the answer is B"); else the one option whose text the
    answer repeats; else a capital letter standing alone, where it is not the word "A" or "I"."""
    n = options if isinstance(options, int) else len(options)
    letters = option_letters(n)
    for pattern in _STRONG_PATTERNS:
        for m in pattern.finditer(text):
            if m.group(1).upper() in letters:
                return m.group(1).upper()
    if not isinstance(options, int):
        norm = normalize_vqa_answer(text)
        hits = [letters[i] for i, o in enumerate(options) if normalize_vqa_answer(o) and normalize_vqa_answer(o) in norm]
        if len(hits) == 1:
            return hits[0]
    for m in _STANDALONE.finditer(text):
        if m.group(1) in letters and not _WORD_NOT_LETTER.match(text, m.start()):
            return m.group(1)
    return None


@METRICS.register("multiple_choice_lenient")
class LenientMultipleChoiceAccuracy(_ChoiceAccuracy):
    """The option letter by :func:`extract_choice_lenient` (not an official number)."""

    def read_choice(self, text: str, options: Union[int, Sequence[str]]) -> Optional[str]:
        return extract_choice_lenient(text, options)


# --------------------------------------------------------------------------- POPE
def parse_yes_no_lenient(text: str) -> str:
    """A lenient yes/no reading (not POPE's): first sentence, any case; 'no' if it has the word no/not."""
    first = text.strip().split(".")[0].lower()
    words = re.findall(r"[a-z']+", first)
    return "no" if ("no" in words or "not" in words) else "yes"


@METRICS.register("pope")
class POPEMetrics(Metric):
    """Yes/no hallucination metrics with ``eval_pope.py``'s reading of an answer (:func:`pope_answer`);
    ``compute()`` -> dict(accuracy, precision, recall, f1, yes_ratio), fractions ("yes" is the positive
    class). Where ``eval_pope.py`` divides by zero (no "yes" predicted or none gold), 0."""

    full_state_update = False
    target_kind: ClassVar[str] = "yes_no"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("tp", "fp", "tn", "fn"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def read_yes_no(self, text: str) -> str:
        return pope_answer(text)

    def update(self, preds: Sequence[str], targets: Sequence[str]) -> None:
        _check_lengths(preds, targets)
        for p, t in zip(preds, targets):
            pred_yes = self.read_yes_no(p) == "yes"
            label = t.strip().lower()
            if label not in ("yes", "no"):
                raise ValueError(f"POPE target must be 'yes' or 'no', got {t!r}")
            gold_yes = label == "yes"
            self.tp += int(pred_yes and gold_yes)
            self.fp += int(pred_yes and not gold_yes)
            self.tn += int(not pred_yes and not gold_yes)
            self.fn += int(not pred_yes and gold_yes)

    def compute(self) -> Dict[str, torch.Tensor]:
        return {k: torch.tensor(v, dtype=torch.float32)
                for k, v in yes_no_scores(int(self.tp), int(self.fp), int(self.tn), int(self.fn)).items()}


@METRICS.register("pope_lenient")
class LenientPOPEMetrics(POPEMetrics):
    """POPE's metrics with :func:`parse_yes_no_lenient` ("NO", "No!" read as no; not the official number)."""

    def read_yes_no(self, text: str) -> str:
        return parse_yes_no_lenient(text)


def build_metric(name: str, **kwargs: Any) -> Metric:
    """A metric by its registered name (or ``package.module:Class``); unknown names list the known ones.
    ``kwargs`` go to the torchmetrics ``Metric`` (e.g. ``sync_on_compute=False``)."""
    return METRICS.create(name, **kwargs)


def _check_lengths(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"got {len(a)} predictions but {len(b)} targets")
