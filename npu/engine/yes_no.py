"""The words a boolean answer may be written with, in the language of the question.

A boolean format lets the model answer with its own yes/no words rather than JSON
`true`/`false`: English always (`yes`, `no`, `Yes`, `No`, `YES`, `NO`), plus the words
of the question's language when it is one of the few told apart here by their script
(Chinese, Japanese, Korean, Russian) or, for Latin script, by common short words
(German, French, Spanish, Italian, Portuguese, Dutch). Every word the tokenizer can
spell is then allowed and the model's logits choose among them; each word counts for
its value, so "Yes" and "yes" are one answer.

Pure: no tokenizer, no engine.
"""

from __future__ import annotations

import re

_ENGLISH = (("yes", "Yes", "YES"), ("no", "No", "NO"))

WORDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "en": _ENGLISH,
    "de": (("ja", "Ja"), ("nein", "Nein")),
    "fr": (("oui", "Oui"), ("non", "Non")),
    "es": (("sí", "Sí", "si", "Si"), ("no", "No")),
    "it": (("sì", "Sì", "si", "Si"), ("no", "No")),
    "pt": (("sim", "Sim"), ("não", "Não")),
    "nl": (("ja", "Ja"), ("nee", "Nee")),
    "ru": (("да", "Да"), ("нет", "Нет")),
    "zh": (("是", "是的", "有", "对"), ("否", "不是", "没有", "不对")),
    "ja": (("はい",), ("いいえ",)),
    "ko": (("네", "예"), ("아니요", "아니오")),
}

# Words that give a Latin-script question away (a handful each; English has none: it is the default).
_LATIN_MARKERS = {
    "de": {"ist", "gibt", "es", "ein", "eine", "der", "die", "das", "siehst", "im", "bild", "auf", "dem"},
    "fr": {"est-ce", "est", "il", "y", "une", "un", "le", "la", "vois", "tu", "dans", "l'image", "qu'il"},
    "es": {"hay", "es", "un", "una", "el", "la", "ves", "en", "imagen", "está"},
    "it": {"c'è", "è", "un", "una", "il", "lo", "la", "vedi", "nell'immagine", "immagine"},
    "pt": {"há", "existe", "um", "uma", "o", "a", "vês", "você", "na", "imagem"},
    "nl": {"is", "er", "een", "de", "het", "zie", "je", "afbeelding", "op"},
}
_ENGLISH_MARKERS = {"is", "there", "a", "an", "the", "do", "does", "you", "see", "in", "image", "are", "any"}
_SCRIPTS = (
    ("ja", re.compile(r"[\u3040-\u30ff]")),  # kana before Han: Japanese uses both
    ("ko", re.compile(r"[\uac00-\ud7af]")),
    ("zh", re.compile(r"[\u4e00-\u9fff]")),
    ("ru", re.compile(r"[\u0400-\u04ff]")),
)
_WORD_RE = re.compile(r"[\w'-]+", re.UNICODE)


def question_language(question: str) -> str:
    """A language code of WORDS for the question ("en" when nothing else stands out)."""
    for code, script in _SCRIPTS:
        if script.search(question):
            return code
    words = [w.lower() for w in _WORD_RE.findall(question)]
    best, best_hits = "en", sum(w in _ENGLISH_MARKERS for w in words)
    for code, markers in _LATIN_MARKERS.items():
        hits = sum(w in markers for w in words)
        if hits > best_hits:
            best, best_hits = code, hits
    return best


def boolean_words(question: str) -> dict[str, bool]:
    """Every word a yes/no answer to `question` may be, with the value it stands for."""
    words: dict[str, bool] = {}
    for code in dict.fromkeys(("en", question_language(question))):
        yes, no = WORDS[code]
        words.update({word: True for word in yes})
        words.update({word: False for word in no})
    return words
