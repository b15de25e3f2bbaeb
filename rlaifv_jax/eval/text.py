"""Word tokenization and noun lemmatization for the object-based metrics, offline.

The official scorers use NLTK (``word_tokenize`` + WordNet's noun lemmatizer), whose data cannot
be downloaded here; we use a Treebank-like regular expression and ``lemminflect``'s noun lemmas
(``dogs → dog``, ``mice → mouse``, ``glasses → glass``), which agree with WordNet on the object
words the metrics look for. Known differences: WordNet maps ``oxen → ox`` and ``leaves → leaf``,
lemminflect keeps ``oxen`` and gives ``leave`` (both words are on the synonym lists anyway).
"""
from __future__ import annotations

import functools
import re

import lemminflect

# Words (letters/digits, inner hyphens kept: "t-shirt"), the possessive "'s" split off as NLTK does,
# and any other non-space character as its own token (so punctuation separates words).
_TOKEN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*|'s\b|[^\sa-z0-9]")


def words(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens of ``text``."""
    return _TOKEN.findall(text.lower())


@functools.lru_cache(maxsize=1 << 16)
def noun_lemma(word: str) -> str:
    """The noun lemma of a lower-case ``word`` (the word itself when lemminflect has none)."""
    if not word[:1].isalpha():
        return word
    lemmas = lemminflect.getLemma(word, upos="NOUN")
    return lemmas[0] if lemmas else word


def noun_lemmas(text: str) -> list[str]:
    """``words(text)``, each lemmatized as a noun."""
    return [noun_lemma(w) for w in words(text)]
