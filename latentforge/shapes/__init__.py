"""Shapes benchmark data: procedural captioned images whose captions are exactly true.

``render.py``: the scene spec (``Obj``, ``Scene``), vocabulary, seeded sampling with train / validation /
held-out splits, and the antialiased rasteriser. ``captions.py``: a caption grammar with paraphrases and its
exact parser. ``data.py``: a streaming ``ShapesDataset`` and ``export`` to an image folder. ``evaluate.py``:
the evaluator's entry points, built from ``detection.py`` (with ``color.py``, ``templates.py``, ``jpeg.py``),
``scoring.py`` and ``report.py``.
"""

from .captions import (
    PROMPT_COMPLETIONS,
    caption,
    complete_background,
    complete_layout,
    complete_prompt,
    complete_prompts,
    describe,
    parse,
)
from .data import ShapesDataset, collate, export, sample
from .render import (
    COLORS,
    HELDOUT_COLOR_SHAPES,
    HELDOUT_RELATIONS,
    HELDOUT_SHAPE_POSITIONS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLITS,
    Obj,
    Scene,
    heldout_combos,
    relation_holds,
    render,
    sample_scene,
    satisfies,
    scene_split,
)

__all__ = [
    "COLORS",
    "HELDOUT_COLOR_SHAPES",
    "HELDOUT_RELATIONS",
    "HELDOUT_SHAPE_POSITIONS",
    "POSITIONS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "Obj",
    "Scene",
    "ShapesDataset",
    "caption",
    "collate",
    "complete_background",
    "complete_layout",
    "complete_prompt",
    "complete_prompts",
    "PROMPT_COMPLETIONS",
    "describe",
    "export",
    "heldout_combos",
    "parse",
    "relation_holds",
    "render",
    "sample",
    "sample_scene",
    "satisfies",
    "scene_split",
]
