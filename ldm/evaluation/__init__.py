"""Prompt-adherence evaluation of generated images: a code-based detector and GenEval-style rules."""

from ldm.evaluation.detect import Detection, detect_objects
from ldm.evaluation.geneval import check, judge, score

__all__ = ["Detection", "check", "detect_objects", "judge", "score"]
