"""Answer metrics as ``torchmetrics.Metric`` classes, so they sync across ranks.

- ``VQAAccuracy``: VQAv2 with the official answer normalisation and the min(#matching/3, 1) rule,
  averaged over the 10-choose-9 annotator subsets.
- ``ExactMatch``: normalised string equality.
- ``MultipleChoiceAccuracy``: option-letter extraction (ScienceQA / MMBench / SEED style).
- ``POPEMetrics``: yes/no accuracy, precision, recall, F1 ("yes" is the positive class).
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Union

import torch
from torchmetrics import Metric

# --------------------------------------------------------------------------- VQA normalisation
# From the official VQA evaluation code (vqaEval.py), which LLaVA's and lmms-eval's processors follow.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # a period not followed by a digit (the official regex, quirk kept)
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        # Official rule: drop the mark where it touches a space (or the text has a digit comma), else make it a space.
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """The official VQA answer normalisation: whitespace, punctuation, number words, articles, contractions."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_score(prediction: str, gt_answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the annotators' answers (usually 10).

    For each annotator, the prediction scores min(#matches among the *other* annotators / 3, 1);
    the score is the mean over annotators (= the average over the 10-choose-9 subsets).
    """
    if not gt_answers:
        raise ValueError("vqa_score needs at least one ground-truth answer")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in gt_answers]
    if len(gts) == 1:  # a single reference answer counts as unanimous annotators (else no subset could match)
        gts = gts * 10
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1 :]
        scores.append(min(1.0, sum(a == pred for a in others) / 3.0))
    return sum(scores) / len(scores)


class _MeanMetric(Metric):
    """Sum of per-sample scores and their count, summed across ranks."""

    full_state_update = False
    higher_is_better = True

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


class VQAAccuracy(_MeanMetric):
    """``update(preds: list[str], targets: list[list[str]])``: one list of annotator answers per prediction."""

    def update(self, preds: Sequence[str], targets: Sequence[Union[str, Sequence[str]]]) -> None:
        _check_lengths(preds, targets)
        self._add([vqa_score(p, [t] if isinstance(t, str) else list(t)) for p, t in zip(preds, targets)])


class ExactMatch(_MeanMetric):
    """Exact match after VQA normalisation (case, punctuation, articles, number words).

    ``targets`` may hold a string or a list of acceptable strings per prediction."""

    def update(self, preds: Sequence[str], targets: Sequence[Union[str, Sequence[str]]]) -> None:
        _check_lengths(preds, targets)
        scores = []
        for p, t in zip(preds, targets):
            options = [t] if isinstance(t, str) else list(t)
            scores.append(float(normalize_vqa_answer(p) in {normalize_vqa_answer(o) for o in options}))
        self._add(scores)


# --------------------------------------------------------------------------- multiple choice
_STRONG_PATTERNS = [  # a letter the answer plainly gives
    re.compile(r"^\s*\(?([A-Za-z])\)?\s*(?:[.:)\]]|$)"),  # "B", "b", "(b)", "B.", "B) text", "b: text"
    re.compile(r"(?i:answer\s*(?:is|:)?\s*(?:option\s*)?)\(?([A-Z])\)?(?![A-Za-z])"),  # "The answer is B"
    re.compile(r"(?i:(?:option|choice)\s*)\(?([A-Z])\)?(?![A-Za-z])"),  # "option C"
    re.compile(r"\(([A-Z])\)"),  # "... (C) ..."
]
_STANDALONE = re.compile(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])")  # a capital letter alone: the last resort
_WORD_NOT_LETTER = re.compile(r"[AI]\s+[a-z]")  # "A red circle", "I think ...": an article or pronoun
_GOLD_LETTER = re.compile(r"\s*\(?([A-Za-z])\)?\s*[.:)\]]?\s*")


def extract_choice(text: str, options: Union[int, Sequence[str]]) -> Optional[str]:
    """The option letter a free-form answer picks, or None.

    ``options``: the number of options (letters A, B, ...) or the option texts. In order: a letter
    given plainly ("B", "(b)", "B. ...", "the answer is B"); else the one option whose text the
    answer repeats; else a capital letter standing alone, where it is not the word "A" or "I"."""
    n = options if isinstance(options, int) else len(options)
    letters = [chr(ord("A") + i) for i in range(n)]
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


def gold_letter(target: str) -> str:
    """A gold answer as its letter: "B", "(B)", "b." -> "B" (anything else as written, upper-cased)."""
    m = _GOLD_LETTER.fullmatch(target)
    return m.group(1).upper() if m else target.strip().upper()


class MultipleChoiceAccuracy(_MeanMetric):
    """``update(preds: list[str], targets: list[str letter], options: list[int | list[str]])``.

    An answer from which no valid letter can be extracted counts as wrong (and is counted in ``unparsed``)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("unparsed", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], targets: Sequence[str], options: Sequence[Union[int, Sequence[str]]]) -> None:
        _check_lengths(preds, targets)
        _check_lengths(preds, options)
        scores = []
        for p, t, o in zip(preds, targets, options):
            choice = extract_choice(p, o)
            self.unparsed += int(choice is None)
            scores.append(float(choice == gold_letter(t)))
        self._add(scores)


# --------------------------------------------------------------------------- POPE
def parse_yes_no(text: str) -> str:
    """LLaVA's POPE rule: first sentence; 'no' if it contains the word no/not, else 'yes'."""
    first = text.strip().split(".")[0].lower()
    words = re.findall(r"[a-z']+", first)
    return "no" if ("no" in words or "not" in words) else "yes"


class POPEMetrics(Metric):
    """Yes/no hallucination metrics; ``compute()`` -> dict(accuracy, precision, recall, f1, yes_ratio)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("tp", "fp", "tn", "fn"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], targets: Sequence[str]) -> None:
        _check_lengths(preds, targets)
        for p, t in zip(preds, targets):
            pred_yes = parse_yes_no(p) == "yes"
            label = t.strip().lower()
            if label not in ("yes", "no"):
                raise ValueError(f"POPE target must be 'yes' or 'no', got {t!r}")
            gold_yes = label == "yes"
            self.tp += int(pred_yes and gold_yes)
            self.fp += int(pred_yes and not gold_yes)
            self.tn += int(not pred_yes and not gold_yes)
            self.fn += int(not pred_yes and gold_yes)

    def compute(self) -> Dict[str, torch.Tensor]:
        tp, fp, tn, fn = (x.double() for x in (self.tp, self.fp, self.tn, self.fn))
        total = tp + fp + tn + fn
        precision = tp / (tp + fp) if tp + fp > 0 else torch.tensor(0.0, dtype=torch.float64)
        recall = tp / (tp + fn) if tp + fn > 0 else torch.tensor(0.0, dtype=torch.float64)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else torch.tensor(0.0, dtype=torch.float64)
        out = {
            "accuracy": (tp + tn) / total if total > 0 else torch.tensor(float("nan")),
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "yes_ratio": (tp + fp) / total if total > 0 else torch.tensor(float("nan")),
        }
        return {k: v.float() for k, v in out.items()}


METRICS = {
    "vqa_accuracy": VQAAccuracy,
    "exact_match": ExactMatch,
    "multiple_choice": MultipleChoiceAccuracy,
    "pope": POPEMetrics,
}


def build_metric(name: str) -> Metric:
    if name not in METRICS:
        raise KeyError(f"unknown metric '{name}'. Known metrics: {', '.join(sorted(METRICS))}")
    return METRICS[name]()


def _check_lengths(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"got {len(a)} predictions but {len(b)} targets")
