"""slimgpt_core.zero_shot without lm-eval installed: the error names the extra to install."""

from __future__ import annotations

import sys

import pytest

from slimgpt_core import zero_shot


def test_without_lm_eval_the_error_names_the_zeroshot_extra(monkeypatch):
    for name in ("lm_eval", "lm_eval.tasks", "lm_eval.models.huggingface"):
        monkeypatch.setitem(sys.modules, name, None)  # what an install without it looks like
    zero_shot._task_manager.cache_clear()
    try:
        assert not zero_shot.available()
        with pytest.raises(zero_shot.ZeroShotUnavailable, match=r"slimgpt-service\[zeroshot\]"):
            zero_shot.check_tasks(["arc_easy"])
    finally:
        zero_shot._task_manager.cache_clear()
