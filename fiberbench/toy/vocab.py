"""Words of the shapes world: the CLIP vocabulary of its factors and the toy CLIP's tokenizer.

:data:`TOY_VOCAB` is the default vocabulary of :func:`fiberbench.analysis.semantics.score_fiber` on the
toy world; its labels are spelled like the factor values of :mod:`fiberbench.toy.world` (size in thirds:
small / medium / large; mirror as the way the arrow points), so CLIP's labels and the oracle's compare.
"""
from __future__ import annotations

from open_clip.tokenizer import SimpleTokenizer

Vocabulary = dict  # group -> {label: [prompt, ...]}

TOY_VOCAB: Vocabulary = {
    "shape": {s: [f"a photo of a {s}.", f"a {s}.", f"a picture of a {s}."]
              for s in ["circle", "square", "triangle", "arrow"]},
    "color": {c: [f"a photo of a {c} shape.", f"a {c} shape.", f"something {c}."]
              for c in ["red", "green", "blue", "yellow", "magenta", "cyan"]},
    "background": {b: [f"a shape on a {b} background.", f"a photo with a {b} background.", f"on a {b} background."]
                   for b in ["black", "gray", "white"]},
    "mirror": {"right": ["an arrow pointing right.", "a shape pointing right."],
               "left": ["an arrow pointing left.", "a shape pointing left."]},
    "size": {w: [f"a {w} shape.", f"a photo of a {w} shape."] for w in ["small", "medium", "large"]},
}


def toy_tokenizer(context_length: int) -> SimpleTokenizer:
    """open_clip's own BPE tokenizer (bundled vocabulary: no download) at the toy context length."""
    return SimpleTokenizer(context_length=context_length)
