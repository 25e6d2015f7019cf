"""Video multiple choice: MVBench, MLVU, EgoSchema, as LLaVA-Mini's scripts ask and score them.

Sources (ictnlp/LLaVA-Mini@47da1137f7b503be685ab5faa9f64a88b102e786): ``llavamini/eval/video/mvbench_mc.py``,
``mlvu_mc.py``, ``egoschema_mc.py`` and ``scripts/llavamini/eval_video/run_*_mc.sh``. All three sample one frame
per second of the clip (``load_video(num_frm=None)``: ``int(frames // fps)`` frames, the middles of equal
segments; MVBench/MLVU at most 1000, and a folder of frames gives all its frames -- the task's time bound is
not used) and stop at the conversation's separator.
"""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from lm_mini.eval.benchmarks.base import BENCHMARKS, Benchmark, BenchmarkResult, PathLike, Question
from lm_mini.eval.benchmarks.common import Referenced, load_json, mean, pair_answers, percent, require

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv")  # the order egoschema_mc.py / run_inference_video_qa.py try


def qa_template(data: Dict[str, Any]) -> Tuple[str, str]:
    """``qa_template`` of ``mvbench_mc.py``/``mlvu_mc.py``: the question with ``(A) ...`` options, and the gold
    ``"(X) answer"`` (``(@)`` when the answer is not a candidate, which nothing matches)."""
    question = f"Question: {data['question']}\nOptions:\n"
    answer_idx = -1
    for idx, c in enumerate(data["candidates"]):
        question += f"({chr(ord('A') + idx)}) {c}\n"
        if c == data["answer"]:
            answer_idx = idx
    return question.rstrip(), f"({chr(ord('A') + answer_idx)}) {data['answer']}"


def check_ans(pred: str, gt: str) -> bool:
    """``check_ans`` of ``mvbench_mc.py``/``mlvu_mc.py``: the gold letter between its parentheses against the
    character before the prediction's first ``)`` (the whole prediction when it has none)."""
    gt_option = gt[gt.index("(") + 1:gt.index(")")]
    if ")" in pred:
        index = pred.index(")")
        pred = pred[index - 1:index]
    return pred == gt_option


class _TaskTableMC(Benchmark):
    """MVBench/MLVU: one JSON per task under ``json/``, videos under a task folder; scored as the script's
    ``result_*.json``: per-task accuracy by :func:`check_ans` over every question of the task, and ``accuracy`` =
    their mean (``Avg``). A question whose answer is not among its candidates counts, as in the script: its gold
    is ``"(@) answer"``, which no letter answer matches (noted). The script answers every question before it
    scores: an incomplete answers file is refused."""

    modality = "video"
    max_new_tokens = 1024
    needs_questions = True
    video_max_frames = 1000
    missing_answers = "refuse"
    missing_rule = "the official *_mc.py script answers every question of the task files before it scores"
    TASKS: Dict[str, Tuple[str, str]] = {}  # task name -> (json file, media folder), both relative to the root

    def read_questions(self, path: PathLike) -> List[Question]:
        """``path``: the benchmark's root folder (the script's ``--data_dir``, holding ``json/``); media paths are
        relative to it, so ``--image-folder`` is the same folder."""
        root = Path(path)
        if root.name == "json" and not (root / "json").is_dir():
            root = root.parent
        missing = [f for f, _ in self.TASKS.values() if not (root / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{root}: {self.name} needs its task files {', '.join(missing)} (the folder the "
                                    "official script's --data_dir names)")
        out = []
        for task, (json_file, media_dir) in self.TASKS.items():
            items = load_json(root / json_file, f"{self.name} task {task!r}: a JSON list of questions")
            stem = Path(json_file).stem
            for i, data in enumerate(items):
                for key in ("question", "candidates", "answer", "video"):
                    if key not in data:
                        raise ValueError(f"{root / json_file}: question {i} has no {key!r}")
                question, gold = qa_template(data)
                record = dict(data, task_type=task, gold=gold)
                out.append(Question(f"{stem}/{i}", question, f"{media_dir}/{data['video']}", True, task, record))
        return out

    def prompt(self, question: Question) -> str:
        return question.text + "\nAnswer with one letter."

    def score(self, answers, questions=None, annotations=None, judge=None) -> BenchmarkResult:
        pairs, unanswered = pair_answers(self, answers, require(questions, self, "the question folder (--questions)"))
        ref = Referenced(self, pairs, lambda a, q: q.record["gold"], "the task files")
        per_task: Dict[str, List[float]] = defaultdict(list)
        for a, q, gold in ref.scored:
            per_task[q.category].append(float(check_ans(a["text"], gold)))
        scores = {f"{task}/accuracy": percent(mean(v)) for task, v in per_task.items()}
        scores["accuracy"] = mean(list(scores.values()))  # the script's Avg: the mean of the task accuracies
        odd = [q.question_id for _, q, gold in ref.scored if gold.startswith("(@)")]
        notes = [f"{len(odd)} questions have an answer that is not among their candidates ({', '.join(odd[:5])}): "
                 "counted, and wrong unless the answer reads '(@)', as the script scores them"] if odd else []
        return ref.result(self, scores, unanswered, notes)


@BENCHMARKS.register("mvbench")
class MVBench(_TaskTableMC):
    """MVBench (``mvbench_mc.py``): 20 tasks; prompt ``"Question: ...\\nOptions:\\n(A) ...\\n(B) ..."`` plus
    ``"\\nAnswer with one letter."``; the answers line's ``prompt`` is the question without that line.
    ``--questions``/``--image-folder``: the MVBench folder (``json/*.json``, ``video/...``)."""

    name = "mvbench"
    TASKS = {
        "Action Sequence": ("json/action_sequence.json", "video/star/Charades_v1_480"),
        "Action Prediction": ("json/action_prediction.json", "video/star/Charades_v1_480"),
        "Action Antonym": ("json/action_antonym.json", "video/ssv2_video"),
        "Fine-grained Action": ("json/fine_grained_action.json", "video/Moments_in_Time_Raw/videos"),
        "Unexpected Action": ("json/unexpected_action.json", "video/FunQA_test/test"),
        "Object Existence": ("json/object_existence.json", "video/clevrer/video_validation"),
        "Object Interaction": ("json/object_interaction.json", "video/star/Charades_v1_480"),
        "Object Shuffle": ("json/object_shuffle.json", "video/perception/videos"),
        "Moving Direction": ("json/moving_direction.json", "video/clevrer/video_validation"),
        "Action Localization": ("json/action_localization.json", "video/sta/sta_video"),
        "Scene Transition": ("json/scene_transition.json", "video/scene_qa/video"),
        "Action Count": ("json/action_count.json", "video/perception/videos"),
        "Moving Count": ("json/moving_count.json", "video/clevrer/video_validation"),
        "Moving Attribute": ("json/moving_attribute.json", "video/clevrer/video_validation"),
        "State Change": ("json/state_change.json", "video/perception/videos"),
        "Fine-grained Pose": ("json/fine_grained_pose.json", "video/nturgbd"),
        "Character Order": ("json/character_order.json", "video/perception/videos"),
        "Egocentric Navigation": ("json/egocentric_navigation.json", "video/vlnqa"),
        "Episodic Reasoning": ("json/episodic_reasoning.json", "video/tvqa/frames_fps3_hq"),  # folders of frames
        "Counterfactual Inference": ("json/counterfactual_inference.json", "video/clevrer/video_validation"),
    }


@BENCHMARKS.register("mlvu")
class MLVU(_TaskTableMC):
    """MLVU multiple choice (``mlvu_mc.py``): 7 tasks, asked and scored as MVBench.
    ``--questions``/``--image-folder``: the MLVU folder (``json/*.json``, ``video/<task>/...``)."""

    name = "mlvu"
    TASKS = {
        "count": ("json/4_count.json", "video/4_count"),
        "ego": ("json/3_ego.json", "video/3_ego"),
        "needle": ("json/2_needle.json", "video/2_needle"),
        "order": ("json/5_order.json", "video/5_order"),
        "plotQA": ("json/1_plotQA.json", "video/1_plotQA"),
        "anomaly_reco": ("json/6_anomaly_reco.json", "video/6_anomaly_reco"),
        "topic_reasoning": ("json/7_topic_reasoning.json", "video/7_topic_reasoning"),
    }


EGOSCHEMA_PROMPT = """You are a helpful expert in first person view video analysis. Please provide a single-letter answer (A, B, C, D, E) to the following multiple-choice question based on this video.
{question}
Choices:
A: {optionA}
B: {optionB}
C: {optionC}
D: {optionD}
E: {optionE}

Answer with one letter."""


def egoschema_choice(text: str) -> int:
    """``first_char_as_answer`` of ``egoschema_mc.py``: the index of the first character of the answer that is a
    capital A-E, wherever it stands ("The answer is C" gives 2, "Both A and C" gives 1, for its "B"), else -1."""
    for ch in text:
        if ch in "ABCDE":
            return "ABCDE".index(ch)
    return -1


@BENCHMARKS.register("egoschema")
class EgoSchema(Benchmark):
    """EgoSchema (``egoschema_mc.py``). Questions: the script's ``--gt_file`` (a JSON list of ``{"q_uid",
    "question", "option 0".."option 4", "answer"?}``, ``answer`` the option's index); media ``<q_uid>`` with the
    first of .mp4/.avi/.mov/.mkv that exists in ``--image-folder``. Prompt: the script's fixed template
    (options ``A: ...``, "Answer with one letter."), 128 new tokens. ``accuracy``: the first character of A-E in
    the answer (:func:`egoschema_choice`) is the answer's option, in percent, over every question with an
    ``answer`` (as the script's ``total``: a question it does not answer, its video missing, counts wrong; so
    does one without an answers line here); questions without ``answer`` (the hidden part of the full set) are
    excluded. Writes ``egoschema_submission.csv`` (``q_uid,answer``) for the full set's Kaggle evaluation, the
    answer being the script's ``pred``: the option index, or -1 where the answer has no letter A-E (the script
    writes no file; lmms-eval's ``egoschema`` task submits -1 for such an answer too, ``tasks/egoschema/utils.py``,
    EvolvingLMMs-Lab/lmms-eval@75571cfe; the server counts it wrong)."""

    name = "egoschema"
    modality = "video"
    needs_questions = True
    missing_answers = "wrong"
    missing_rule = "egoschema_mc.py counts every question of its file (one it does not answer is wrong)"

    def read_questions(self, path: PathLike) -> List[Question]:
        data = load_json(path, "EgoSchema's question file (a JSON list of {'q_uid', 'question', 'option 0'..})")
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of {{'q_uid', 'question', 'option 0', ...}}")
        out = []
        for number, rec in enumerate(data, 1):
            missing = [k for k in ("q_uid", "question", *(f"option {i}" for i in range(5))) if k not in rec]
            if missing:
                raise ValueError(f"{path}: question {number} has no {', '.join(repr(k) for k in missing)}")
            text = EGOSCHEMA_PROMPT.format(question=rec["question"], optionA=rec["option 0"], optionB=rec["option 1"],
                                           optionC=rec["option 2"], optionD=rec["option 3"], optionE=rec["option 4"])
            out.append(Question(rec["q_uid"], text, rec["q_uid"], True, None, rec))
        return out

    def media_path(self, question: Question, folder: PathLike) -> Path:
        return find_video(Path(folder), str(question.media))

    def score(self, answers, questions=None, annotations=None, judge=None) -> BenchmarkResult:
        questions = require(questions, self, "the question file (--questions)")
        pairs, unanswered = pair_answers(self, answers, questions)
        if not any(q.record.get("answer") is not None for q in questions):
            return BenchmarkResult(self.name, n=0, unanswered=unanswered, notes=[
                "the question file has no answers (the full set's are hidden): not scored here; upload the "
                "submission CSV to EgoSchema's Kaggle competition"])

        def reference(a, q) -> Optional[int]:
            gold = q.record.get("answer")
            if gold is None:
                return None
            if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold <= 4:
                raise ValueError(f"egoschema: question {q.question_id!r} has answer {gold!r}; expected an option index 0-4")
            return gold

        ref = Referenced(self, pairs, reference, "the question file's 'answer' fields")
        without = set(unanswered)
        missing = [q.question_id for q in questions if q.question_id in without and q.record.get("answer") is not None]
        hits = [float(egoschema_choice(a["text"]) == gold) for a, _, gold in ref.scored] + [0.0] * len(missing)
        return ref.result(self, {"accuracy": percent(mean(hits))}, missing, missing_scored=len(missing), total=len(hits))

    def write_submission(self, answers, out_dir, questions=None, annotations=None) -> Optional[Path]:
        """EgoSchema's Kaggle file: ``q_uid,answer`` rows, the answer read as :func:`egoschema_choice` (-1: none)."""
        path = Path(out_dir) / "egoschema_submission.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["q_uid", "answer"])
            writer.writerows([a["question_id"], egoschema_choice(a["text"])] for a in answers)
        return path


def find_video(folder: Path, stem: str) -> Path:
    """The first of ``<stem>.mp4/.avi/.mov/.mkv`` in ``folder`` that exists (the scripts' loop), else ``.mp4``."""
    for ext in VIDEO_EXTENSIONS:
        if (folder / f"{stem}{ext}").exists():
            return folder / f"{stem}{ext}"
    return folder / f"{stem}{VIDEO_EXTENSIONS[0]}"
