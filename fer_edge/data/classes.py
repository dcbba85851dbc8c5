"""The expression classes: one canonical order, each dataset's label order,
and the aliases datasets use for folder names.  The one place class names are
spelled out in the code."""
from __future__ import annotations

from fer_edge import UserError

# FER2013's label order (0..6); contempt (CK+) is the optional 8th class.
CANONICAL_CLASSES = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral", "contempt"]
# The seven FER2013 expressions, in FER2013's label order (0..6): the default model's classes.
FER2013_CLASSES = CANONICAL_CLASSES[:7]
# RAF-DB basic's label order (its labels are 1..7).
RAFDB_CLASSES = ["surprise", "fear", "disgust", "happy", "sad", "angry", "neutral"]

ALIASES = {
    "angry": "angry", "anger": "angry", "mad": "angry",
    "disgust": "disgust", "disgusted": "disgust",
    "fear": "fear", "fearful": "fear", "afraid": "fear", "scared": "fear",
    "happy": "happy", "happiness": "happy", "joy": "happy", "smile": "happy",
    "sad": "sad", "sadness": "sad",
    "surprise": "surprise", "surprised": "surprise",
    "neutral": "neutral", "natural": "neutral", "calm": "neutral",
    "contempt": "contempt",
}


def canonical_class(name: str) -> str | None:
    """The canonical name of a class folder (case-insensitive), or None if unknown."""
    return ALIASES.get(name.strip().lower())


def resolve_classes(names, classes: list[str] | None = None) -> tuple[list[str], dict[str, int]]:
    """(class list, folder name -> label index) for the folder names found.

    Without ``classes`` every name must be a known expression (or alias); the
    list is the canonical order restricted to the classes present.  With
    ``classes`` (the user's --classes) those names are used as given, in that
    order, and a folder outside them is an error.
    """
    names = sorted(names)
    if classes:
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise UserError(f"class folder(s) {', '.join(unknown)} not in --classes ({', '.join(classes)})")
        return list(classes), {n: classes.index(n) for n in names}
    mapped = {}
    for n in names:
        c = canonical_class(n)
        if c is None:
            known = ", ".join(sorted(ALIASES))
            raise UserError(f"unknown class folder {n!r}; known names: {known} (or give --classes)")
        mapped[n] = c
    if len(set(mapped.values())) != len(mapped):
        dup = [n for n in names if list(mapped.values()).count(mapped[n]) > 1]
        raise UserError(f"class folders {', '.join(dup)} name the same expression")
    present = [c for c in CANONICAL_CLASSES if c in mapped.values()]
    return present, {n: present.index(c) for n, c in mapped.items()}
