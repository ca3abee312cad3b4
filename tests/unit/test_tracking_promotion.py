"""Replaying the alias history: what 'rollback' goes back to (no MLflow needed)."""

from __future__ import annotations

from pipeline.tracking import production_stack


def move(action: str, to: str, alias: str = "production", model: str = "asr") -> dict:
    return {"action": action, "to_version": to, "alias": alias, "model": model}


def test_promotions_push_and_rollbacks_pop():
    h = [move("promote", "1"), move("promote", "2"), move("promote", "3")]
    assert production_stack(h, "asr") == ["1", "2", "3"]
    h.append(move("rollback", "2"))
    assert production_stack(h, "asr") == ["1", "2"]
    h.append(move("rollback", "1"))
    assert production_stack(h, "asr") == ["1"]  # a second rollback never returns to the bad version 3
    h.append(move("promote", "4"))
    assert production_stack(h, "asr") == ["1", "4"]


def test_other_aliases_and_models_are_ignored():
    h = [move("promote", "1"), move("register", "2", alias="challenger"), move("promote", "9", model="other"),
         move("promote", "1")]
    assert production_stack(h, "asr") == ["1"]
