"""The 80 COCO categories, the CHAIR synonym list, and COCO ground-truth objects per image.

Package data (``rlaifv_jax/eval/data``): ``coco_categories.json`` (COCO 2014's 80 instance
categories with their ids) and ``synonyms.txt``, the synonym list of RLAIF-V's Object HalBench
scorer (``eval/data/synonyms_refine.txt`` in openbmb/RLAIF-V, a refinement of the CHAIR list of
Rohrbach et al. 2018): one line per category, the category first, then words that name it.

Words are mapped to categories as the CHAIR code does: tokenize, lemmatize each word as a noun,
merge "double words" (two-word names such as ``hot dog``, and rules such as ``baby bird → bird``,
``passenger jet → jet``, ``toilet seat → toilet``, ``wine glas → wine glass``), drop ``seat`` when
``toilet`` is present, then look every word up in the synonym list.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import json
import logging
import os
from collections.abc import Iterable, Sequence

from rlaifv_jax.eval import text

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

# CHAIR's hard-coded rules: qualifiers that would otherwise fire "person" (baby/adult animals,
# passenger vehicles), and two-word names that must not fire their parts (home plate, train track).
_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
_VEHICLES = ("jet", "train")
_KEEP_WHOLE = ("home plate", "train track")


def categories() -> list[dict]:
    """COCO 2014's 80 instance categories, ``[{"id", "name"}]``."""
    with open(os.path.join(DATA_DIR, "coco_categories.json"), encoding="utf-8") as f:
        return json.load(f)


@dataclasses.dataclass(frozen=True)
class CocoVocabulary:
    """Word → COCO category (every synonym) and the double-word merge table."""

    category_of: dict[str, str]
    double_words: dict[str, str]

    @classmethod
    @functools.cache
    def load(cls) -> "CocoVocabulary":
        """The packaged synonym list (cached)."""
        category_of: dict[str, str] = {}
        with open(os.path.join(DATA_DIR, "synonyms.txt"), encoding="utf-8") as f:
            for line in f:
                names = [w.strip() for w in line.strip().split(", ") if w.strip()]
                for name in names:
                    category_of[name] = names[0]
        double = {w: w for w in list(category_of) + list(_KEEP_WHOLE) if len(w.split(" ")) >= 2}
        for animal in _ANIMALS:
            double[f"baby {animal}"] = double[f"adult {animal}"] = animal
        for vehicle in _VEHICLES:
            double[f"passenger {vehicle}"] = vehicle
        double["bow tie"] = "tie"
        double["toilet seat"] = "toilet"
        double["wine glas"] = "wine glass"  # the official table's entry for a lemmatizer artefact
        return cls(category_of, double)

    def merge_double_words(self, lemmas: Sequence[str]) -> list[str]:
        """Left to right, replace each listed word pair by its merged form."""
        out, i = [], 0
        while i < len(lemmas):
            pair = " ".join(lemmas[i:i + 2])
            if pair in self.double_words:
                out.append(self.double_words[pair])
                i += 2
            else:
                out.append(lemmas[i])
                i += 1
        return out

    def phrase_words(self, phrase: str) -> list[str]:
        """Lemmatized, double-word-merged words of ``phrase`` (the CHAIR preprocessing)."""
        return self.merge_double_words(text.noun_lemmas(phrase))

    def to_objects(self, words: Iterable[str]) -> list[tuple[str, str]]:
        """``(word, category)`` for every word that names a COCO category, in order (repeats kept);
        ``seat`` is dropped when ``toilet`` is present."""
        words = list(words)
        if "toilet" in words and "seat" in words:
            words = [w for w in words if w != "seat"]
        return [(w, self.category_of[w]) for w in words if w in self.category_of]

    def objects(self, caption: str) -> list[tuple[str, str]]:
        """COCO objects a free text mentions (the CHAIR rule path)."""
        return self.to_objects(self.phrase_words(caption))


def annotation_files(root: str, kind: str) -> list[str]:
    """COCO 2014 ``annotations/{kind}_*2014.json`` files in ``root``, else anywhere beneath it."""
    pattern = f"{kind}_*2014.json"
    files = sorted(glob.glob(os.path.join(root, "annotations", pattern)))
    return files or sorted(glob.glob(os.path.join(root, "**", "annotations", pattern), recursive=True))


def _load_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read COCO annotations ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path}: not a COCO annotation file (no 'annotations' list)")
    return data


def ground_truth(root: str, image_ids: Iterable[int], vocab: CocoVocabulary) -> tuple[dict[int, set[str]], dict]:
    """COCO categories present in each image: its instance labels ∪ the objects its captions
    mention (through the synonym list).

    Reads every ``annotations/instances_*2014.json`` and ``annotations/captions_*2014.json`` under
    ``root`` (train and val, as the official scorer merges both). Returns the sets and a report
    naming the files read and the images that no annotation file covers.
    """
    wanted = {int(i) for i in image_ids}
    instances, captions = annotation_files(root, "instances"), annotation_files(root, "captions")
    if not instances or not captions:
        raise ValueError(f"{root}: needs COCO 2014 annotations/instances_*2014.json and "
                         f"annotations/captions_*2014.json beneath it (found {len(instances)} instance and "
                         f"{len(captions)} caption files)")
    truth: dict[int, set[str]] = {i: set() for i in wanted}
    covered: set[int] = set()
    for path in instances:
        data = _load_json(path)
        names = {c["id"]: c["name"] for c in data.get("categories", [])}
        unknown = sorted(set(names.values()) - set(vocab.category_of))
        if unknown:
            raise ValueError(f"{path}: categories {unknown} are not on the synonym list")
        for ann in data["annotations"]:
            if ann.get("image_id") in truth:
                if ann.get("category_id") not in names:
                    raise ValueError(f"{path}: annotation {ann.get('id')} has unknown category_id "
                                     f"{ann.get('category_id')!r}")
                truth[ann["image_id"]].add(vocab.category_of[names[ann["category_id"]]])
                covered.add(ann["image_id"])
    for path in captions:
        for ann in _load_json(path)["annotations"]:
            if ann.get("image_id") in truth:
                truth[ann["image_id"]].update(c for _, c in vocab.objects(str(ann.get("caption", ""))))
                covered.add(ann["image_id"])
    missing = sorted(wanted - covered)
    if missing:
        logging.warning("%d images have no COCO annotation in %s (e.g. %s): every object they mention counts "
                        "as hallucinated", len(missing), root, missing[:5])
    report = {"instances_files": instances, "captions_files": captions, "images_without_annotations": missing}
    return truth, report
