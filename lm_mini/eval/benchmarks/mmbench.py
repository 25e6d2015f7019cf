"""MMBench (and MMBench-CN): the TSV question file, ``model_vqa_mmbench.py``'s prompt, the submission sheet of
``convert_mmbench_for_submission.py`` and, where the TSV has answers (dev), VLMEvalKit's accuracy.

Sources: ictnlp/LLaVA-Mini@47da1137f7b503be685ab5faa9f64a88b102e786 ``llavamini/eval/model_vqa_mmbench.py``,
``scripts/convert_mmbench_for_submission.py``, ``scripts/llavamini/eval_image/mmbench.sh`` (``--single-pred-prompt``,
no ``--all-rounds``); open-compass/VLMEvalKit@e8e78f05f3080fe28154f2130321f17951c3be94
``vlmeval/utils/matching_util.py`` (``can_infer``) and ``vlmeval/dataset/utils/multiple_choice.py``
(``mcq_circular_eval``, ``mcq_vanilla_eval``).
"""
from __future__ import annotations

import base64
import binascii
import math
import re
import string
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

from lm_mini.eval.benchmarks.base import BENCHMARKS, Benchmark, BenchmarkResult, PathLike, Question
from lm_mini.eval.benchmarks.common import Referenced, mean, pair_answers, percent, require

ALL_OPTIONS = ("A", "B", "C", "D")  # model_vqa_mmbench.py's all_options: at most four options are shown
_SUFFIX = {"en": "Answer with the option's letter from the given choices directly.", "cn": "请直接回答选项字母。"}
_DROPPED = ("hint", "category", "source", "image", "comment", "l2-category")  # convert_mmbench_for_submission.py
_CIRCULAR = 1_000_000  # VLMEvalKit: a row with index i + k * 1e6 is a circular shift of row i


def is_none(value: Any) -> bool:
    """``is_none`` of ``model_vqa_mmbench.py``: None, NaN, or the strings "nan"/"none" in any case."""
    return (value is None or (type(value) is float and math.isnan(value))
            or (type(value) is str and value.lower() in ("nan", "none")))


def _native(value: Any) -> Any:
    """A pandas cell as plain Python (numpy ints/floats to int/float)."""
    return value.item() if hasattr(value, "item") else value


# --------------------------------------------------------------------------- VLMEvalKit's answer matching
_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")
_REJECTIONS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
               "I'm sorry, but without the image provided", "Cannot determine the answer")


def can_infer_option(answer: str, choices: Mapping[str, Any]) -> Union[str, bool]:
    """VLMEvalKit's ``can_infer_option`` (``VERBOSE`` unset): the one option letter standing alone among the
    last five words (after ``.()[],:;!*#{}`` become spaces), "Z" for a refusal, or a verbose "answer is X"."""
    if "Failed to obtain answer via API" in answer:
        return False
    if any(err in answer for err in _REJECTIONS):
        return "Z"
    mod = answer
    for c in ".()[],:;!*#{}":
        mod = mod.replace(c, " ")
    splits = [x.strip() for x in mod.split()]
    count = sum(1 for c in choices if c in splits)
    if count == 1:
        for ch in choices:
            if ch in splits and splits.index(ch) > len(splits) - 5:
                return ch
    elif count == 0 and sum(1 for c in ("Z", "") if c in splits) == 1:
        return "Z"
    match = _VERBOSE_ANSWER.search(answer or "")
    if match and match.group(1).upper() in choices:
        return match.group(1).upper()
    return False


def can_infer_text(answer: str, choices: Mapping[str, Any]) -> Union[str, bool]:
    """VLMEvalKit's ``can_infer_text``: the one option whose text the (not too long) answer contains."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return False
    cands = [k for k, v in choices.items() if str(v).lower() in answer]
    return cands[0] if len(cands) == 1 else False


def can_infer(answer: Any, choices: Mapping[str, Any]) -> Union[str, bool]:
    """VLMEvalKit's ``can_infer``: the option letter an answer gives, or False."""
    answer = str(answer)
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)


@BENCHMARKS.register("mmbench")
class MMBench(Benchmark):
    """MMBench from its TSV (``index, question, hint, A..D, answer?, category, image (base64), ...``).

    Prompt (``model_vqa_mmbench.py --single-pred-prompt``): the hint (unless empty/"nan"/"none") and a newline,
    the question, ``"\\nA. <option>"`` for each option of A-D up to the first empty one, then
    ``"\\nAnswer with the option's letter from the given choices directly."``; the answers line's ``prompt``
    is that text without the last line. 1024 new tokens.

    Writes the upload sheet as ``convert_mmbench_for_submission.py`` (the TSV without hint, category, source,
    image, comment, l2-category, a ``prediction`` column inserted 7th, one row per TSV row) as ``.xlsx``
    (needs ``openpyxl``: ``pip install 'lm_mini[benchmarks]'``; without it a ``.tsv``, and a note says so).

    Where the TSV has an ``answer`` column (dev), scores in percent as VLMEvalKit's ``exact_matching`` policy
    (its evaluation without a GPT matcher): the letter by ``can_infer`` (a letter standing alone, else the
    option text); ``accuracy`` over the rows with an answer (``mcq_vanilla_eval``) and ``circular_accuracy``
    (``mcq_circular_eval``: the rows with index ``i``, ``i + 1e6``, ... are the circular shifts of question
    ``i``, right only if every shift is). Answers ``can_infer`` cannot read count wrong (``unmatched``); the
    MMBench server asks a GPT matcher about them instead, so its number can be higher. VLMEvalKit evaluates
    every row of the sheet: a row without a prediction counts wrong (and fails its circular group).

    Answers lines carry ``model_vqa_mmbench.py``'s ``round_id`` (0: no ``--all-rounds``), ``options`` and
    ``option_char`` besides LLaVA's fields."""

    name = "mmbench"
    max_new_tokens = 1024
    needs_questions = True
    headline = "circular_accuracy"
    lang = "en"
    missing_answers = "wrong"
    missing_rule = "VLMEvalKit scores every row of the sheet (an empty prediction matches no option)"

    def read_questions(self, path: PathLike) -> List[Question]:
        try:
            import pandas as pd
        except ImportError as e:  # pragma: no cover - pandas comes with mlflow
            raise ImportError("MMBench's TSV is read with pandas (as model_vqa_mmbench.py does): "
                              "pip install 'lm_mini[benchmarks]'") from e
        table = pd.read_table(path)  # as the official script: its NaN rules decide which options exist
        for column in ("index", "question", "image"):
            if column not in table.columns:
                raise ValueError(f"{path}: MMBench TSV has no {column!r} column (columns: {', '.join(table.columns)})")
        records = [OrderedDict((str(k), _native(v)) for k, v in row.items()) for _, row in table.iterrows()]
        # Newer TSVs (VLMEvalKit's MMBench_DEV_EN.tsv) give a circular copy's image as its main row's index
        full = {str(r["index"]): r["image"] for r in records if isinstance(r["image"], str) and len(r["image"]) > 64}
        out = []
        for number, record in enumerate(records, 2):
            cell = record["image"]
            cell = full.get(str(cell).split(".")[0], cell) if not (isinstance(cell, str) and len(cell) > 64) else cell
            try:
                image = base64.b64decode(cell, validate=False)
            except (binascii.Error, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{number}: the 'image' cell is neither base64 nor the index of a row with "
                                 f"an image ({e})") from None
            options = []
            for letter in ALL_OPTIONS:  # get_options: up to the first empty option
                if letter not in record or is_none(record[letter]):
                    break
                options.append(record[letter])
            record["_options"] = options
            category = record.get("category")
            out.append(Question(record["index"], str(record["question"]), image, False,
                                None if is_none(category) else str(category), record))
        return out

    def answer_prompt(self, question: Question) -> str:
        hint = question.record.get("hint")
        text = question.text if is_none(hint) else f"{hint}\n{question.text}"
        for letter, option in zip(ALL_OPTIONS, question.record["_options"]):
            text += f"\n{letter}. {option}"
        return text

    def prompt(self, question: Question) -> str:
        return self.answer_prompt(question) + "\n" + _SUFFIX[self.lang]

    def answer_fields(self, question: Question) -> Dict[str, Any]:
        options = list(question.record["_options"])
        return {"round_id": 0, "options": options, "option_char": list(ALL_OPTIONS[:len(options)])}

    def score(self, answers, questions=None, annotations=None, judge=None) -> BenchmarkResult:
        questions = require(questions, self, "the question file (--questions: the MMBench TSV)")
        if not any("answer" in q.record and not is_none(q.record["answer"]) for q in questions):
            answered = {a["question_id"] for a in answers}
            missing = [q.question_id for q in questions if q.question_id not in answered]
            return BenchmarkResult(self.name, n=0, unanswered=missing, notes=[
                "the TSV has no answers (a test split): not scored locally; upload the submission sheet"] + ([
                    f"{len(missing)} of {len(questions)} rows have no prediction in the sheet: the server counts them "
                    "wrong"] if missing else []))
        for a in answers:
            if a.get("round_id", 0) not in (0, None):
                raise ValueError("mmbench: answers from --all-rounds (round_id > 0) are not scored here; the TSV's "
                                 "rows with index + k*1e6 are the circular shifts")
        pairs, unanswered = pair_answers(self, answers, questions)
        ref = Referenced(self, pairs, lambda a, q: None if is_none(q.record.get("answer")) else str(q.record["answer"]),
                         "the TSV's answer column")
        predicted: Dict[int, Union[str, bool, None]] = {}
        gold = {}
        for a, q, answer in ref.scored:
            choices = {c: q.record[c] for c in string.ascii_uppercase if c in q.record and not _isna(q.record[c])}
            predicted[q.question_id] = can_infer(a["text"], choices)
            gold[q.question_id] = answer
        without = set(unanswered)
        missing = [q for q in questions if q.question_id in without and not is_none(q.record.get("answer"))]
        for q in missing:  # a row of the sheet without a prediction: wrong
            predicted[q.question_id], gold[q.question_id] = None, str(q.record["answer"])
        missing = [q.question_id for q in missing]
        hits = [float(predicted[i] == gold[i]) for i in predicted]
        groups: Dict[int, List[int]] = OrderedDict()
        for index in predicted:
            groups.setdefault(int(index % _CIRCULAR), []).append(index)
        # mcq_circular_eval: one group per main row (index < 1e6), right when every shift of it is
        circular = [float(all(predicted[i] == gold[i] for i in members))
                    for main, members in groups.items() if main in predicted]
        scores = {"accuracy": percent(mean(hits))}
        if circular:
            scores["circular_accuracy"] = percent(mean(circular))
        unmatched = sum(1 for p in predicted.values() if p is False)
        scores["unmatched"] = float(unmatched)
        notes = [f"{unmatched} answers give no option letter VLMEvalKit's can_infer reads: counted wrong (the MMBench "
                 "server would ask a GPT matcher)"] if unmatched else []
        return ref.result(self, scores, missing, notes, missing_scored=len(missing), total=len(predicted))

    def write_submission(self, answers, out_dir, questions=None, annotations=None) -> Optional[Path]:
        if questions is None:
            return None
        import pandas as pd

        columns = [c for c in questions[0].record if not c.startswith("_")]
        table = pd.DataFrame([[q.record.get(c) for c in columns] for q in questions], columns=columns)
        table = table.drop(columns=[c for c in _DROPPED if c in table.columns])
        table.insert(min(6, len(table.columns)), "prediction", None)
        for a in answers:
            table.loc[table["index"] == a["question_id"], "prediction"] = a["text"]
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            import openpyxl  # noqa: F401
        except ImportError:
            path = out_dir / f"{self.name}_submission.tsv"
            table.to_csv(path, sep="\t", index=False)
            return path
        path = out_dir / f"{self.name}_submission.xlsx"
        table.to_excel(path, index=False, engine="openpyxl")
        return path


def _isna(value: Any) -> bool:
    """``pd.isna`` of a cell (build_choices keeps the option columns that are not NaN)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


@BENCHMARKS.register("mmbench_cn")
class MMBenchCN(MMBench):
    """MMBench-CN as LLaVA-Mini's ``scripts/llavamini/eval_image/mmbench_cn.sh`` asks it: without ``--lang cn``,
    so with the English suffix (haotian-liu/LLaVA@c121f0432da27facab705978f83c4ada465e46fd
    ``scripts/v1_5/eval/mmbench_cn.sh`` passes ``--lang cn``: "请直接回答选项字母。", :class:`MMBenchCNLLaVA`)."""

    name = "mmbench_cn"


@BENCHMARKS.register("mmbench_cn_llava15")
class MMBenchCNLLaVA(MMBench):
    """MMBench-CN as LLaVA-1.5 asks it (``--lang cn``: the suffix "请直接回答选项字母。")."""

    name = "mmbench_cn_llava15"
    lang = "cn"
