"""Object HalBench (RLAIF-V / RLHF-V): detailed descriptions of 300 COCO val2014 images, scored
with CHAIR against COCO ground truth.

``--data`` is a directory holding the question JSONL (``{"image_id", "question", "image"}`` with a
base64 image per line, e.g. ``obj_halbench_300_with_image.jsonl``) and COCO 2014's
``annotations/instances_*2014.json`` and ``annotations/captions_*2014.json`` beneath it, or the
JSONL file itself (annotations beneath its directory).

Ground truth per image: COCO instance labels ∪ objects its captions mention (``coco``). Objects
in an answer come from an extractor (``objects``: the CHAIR rule path, or the official extraction
prompt run by a judge LLM). Metrics, as RLAIF-V's ``eval_gpt_obj_halbench.py`` defines them:

* ``response_hall``: answers with ≥ 1 hallucinated object / answers that mention ≥ 1 COCO object
  (the paper's "Resp.", the script's ``CHAIRs_refine``);
* ``mention_hall``: hallucinated mentions / all mentions (the paper's "Ment.", CHAIRi);
* ``chair_s``: answers with ≥ 1 hallucinated object / all answers;
* ``recall``: distinct ground-truth categories mentioned / ground-truth categories, pooled;
* ``avg_len``: mean number of space-separated words per answer.
"""
from __future__ import annotations

import glob
import os
from typing import Any

from rlaifv_jax.eval import coco
from rlaifv_jax.eval.chair import chair_metrics
from rlaifv_jax.eval.objects import LLMExtractor, RuleExtractor
from rlaifv_jax.eval.questions import Question, check_unique, read_jsonl, require

NAME = "object_halbench"
DECODING = {"num_beams": 3, "max_new_tokens": 1024}  # RLAIF-V's eval_rlaifv_objhal.sh
# eval_gpt_obj_halbench.py --use_gpt: the extraction prompt as a system message to gpt-3.5-turbo-0613 through
# gpt4_grpc.Chat.chat_completion's defaults (temperature 0.2, top_p 1, max_tokens 512)
PAPER_JUDGE = {"model": "gpt-3.5-turbo-0613", "role": "system", "temperature": 0.2, "max_tokens": 512}


def _question_file(path: str) -> tuple[str, str]:
    if not os.path.isdir(path):
        return path, os.path.dirname(os.path.abspath(path))
    files = sorted(glob.glob(os.path.join(path, "*.jsonl")))
    if len(files) != 1:
        raise ValueError(f"{path}: expected exactly one question .jsonl file in the directory, found "
                         f"{[os.path.basename(f) for f in files]}; pass the file itself as --data")
    return files[0], path


def load(path: str, images: str | None = None) -> tuple[list[Question], str]:
    """The questions (base64 images) and the directory holding the COCO annotations."""
    question_file, root = _question_file(path)
    if not coco.annotation_files(root, "instances") or not coco.annotation_files(root, "captions"):
        raise ValueError(f"{root}: needs COCO 2014 annotations/instances_*2014.json and "
                         "annotations/captions_*2014.json beneath it")
    questions = []
    for n, rec in read_jsonl(question_file, "the Object HalBench question file"):
        where = f"{question_file}:{n}"
        require(rec, {"image_id": (int, str), "question": str}, where)
        try:
            image_id = int(rec["image_id"])
        except ValueError:
            raise ValueError(f"{where}: image_id must be a COCO image id, got {rec['image_id']!r}") from None
        image = rec.get("image") if isinstance(rec.get("image"), str) else None
        questions.append(Question(str(image_id), rec["question"], image, {"image_id": image_id},
                                  image_is_base64=True))
    if not questions:
        raise ValueError(f"{question_file}: no questions")
    check_unique(questions, question_file)
    return questions, root


def score(questions: list[Question], root: str, answers: dict[str, str], judge=None) -> tuple[dict[str, Any], dict]:
    """CHAIR metrics over the answered questions; each answer's mentions and hallucinations."""
    vocab = coco.CocoVocabulary.load()
    asked = [q for q in questions if q.id in answers]
    texts = [answers[q.id].replace("Assistant:", "").strip() for q in asked]
    truth, report = coco.ground_truth(root, [q.meta["image_id"] for q in asked], vocab)
    extractor = RuleExtractor(vocab) if judge is None else LLMExtractor(judge, vocab)
    extractions = extractor([(q.question, t) for q, t in zip(asked, texts)])
    mentions = [[c for _, c in e.objects] for e in extractions]
    truths = [truth[q.meta["image_id"]] for q in asked]
    m = chair_metrics(mentions, truths, unique=False)
    failed = [q.id for q, e in zip(asked, extractions) if e.failed]
    metrics = {"response_hall": m["chair_response"], "mention_hall": m["chair_mention"], "chair_s": m["chair_s"],
               "recall": m["recall"], "avg_len": sum(len(t.split(" ")) for t in texts) / len(texts) if texts else 0.0,
               "extractor": extractor.name, "n": len(asked), "n_mentioning": m["n_responses_mentioning"],
               "n_mentions": m["n_mentions"], "n_hallucinated_mentions": m["n_hallucinated_mentions"],
               "n_extraction_failed": len(failed), "extraction_failed_ids": failed,
               "images_without_annotations": report["images_without_annotations"]}
    items = {}
    for q, e, t in zip(asked, extractions, truths):
        items[q.id] = {"objects": [list(o) for o in e.objects], "ground_truth": sorted(t),
                       "hallucinated": [w for w, c in e.objects if c not in t]}
        if e.reply is not None:
            items[q.id].update(judge_reply=e.reply, extraction_failed=e.failed)
    return metrics, items
