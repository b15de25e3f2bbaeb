"""Word tokenization and noun lemmatization for the object-based metrics, offline.

The official scorers call NLTK's ``word_tokenize`` and WordNet's noun lemmatizer. ``word_tokenize``
splits the text into sentences with the trained English Punkt model, then tokenizes each sentence
with ``NLTKWordTokenizer`` (an improved Treebank tokenizer: ``cat/dog`` stays one token, a
sentence-final period and ``'s`` are split off). We run the same two NLTK classes; only the Punkt
*model* (package data, not installable here) is missing, so sentences are split by an untrained
``PunktSentenceTokenizer``: the same algorithm without the learned abbreviation list, so a period
after an abbreviation (``e.g.``, ``mr.``, ``st.``) also ends a sentence and is split off as its own
token (``e.g`` + ``.``). An object word is affected only if the trained model lists it as an
abbreviation (we know of none).

WordNet (package data too) is replaced by ``lemminflect``'s noun lemmas (``dogs → dog``,
``mice → mouse``, ``glasses → glass``), which agree with WordNet on the object words the metrics
look for. As with WordNet, a token that is not a lower-case word (``TV``, ``Dogs``, ``cat/dog``,
``2.5``) is returned unchanged: WordNet's lemma index is lower-case, so it finds nothing for them.
Known differences: WordNet maps ``oxen → ox`` and ``leaves → leaf``, lemminflect keeps ``oxen`` and
gives ``leave`` (both words are on the synonym lists anyway); for a word WordNet does not know,
WordNet returns it unchanged while lemminflect may strip a plural ending.
"""
from __future__ import annotations

import functools
import re

import lemminflect
from nltk.tokenize import NLTKWordTokenizer
from nltk.tokenize.punkt import PunktSentenceTokenizer

_SENTENCES = PunktSentenceTokenizer()  # untrained: the Punkt algorithm without the English model
_WORDS = NLTKWordTokenizer()
_LOWER_WORD = re.compile(r"[a-z]+(?:[-'][a-z]+)*")


def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize(text)``: Punkt sentences, each through ``NLTKWordTokenizer`` (casing kept)."""
    return [token for sentence in _SENTENCES.tokenize(text) for token in _WORDS.tokenize(sentence)]


def words(text: str) -> list[str]:
    """``word_tokenize(text.lower())``: the tokens of the lower-cased text, as CHAIR reads a caption."""
    return word_tokenize(text.lower())


@functools.lru_cache(maxsize=1 << 16)
def noun_lemma(word: str) -> str:
    """The noun lemma of ``word``; a token that is not a lower-case word comes back unchanged."""
    if not _LOWER_WORD.fullmatch(word):
        return word
    lemmas = lemminflect.getLemma(word, upos="NOUN")
    return lemmas[0] if lemmas else word


def noun_lemmas(text: str) -> list[str]:
    """``words(text)``, each lemmatized as a noun."""
    return [noun_lemma(w) for w in words(text)]
