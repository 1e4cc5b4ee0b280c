"""``visualglm demo train --set NAME=VALUE``: typed changes of the training recipe, clear errors otherwise."""

from __future__ import annotations

import subprocess
import sys

import pytest

from visualglm.cli.demo import recipe_changes
from visualglm.demo.recipe import TrainRecipe


def test_values_take_the_type_of_the_field() -> None:
    changes = recipe_changes(TrainRecipe(), ["length_buckets=0", "recase = 0.15", "freeze_encoder=true",
                                             "turn_weights=0.4,0.15,0.15,0.15,0.15", "qtype_weights=1,1,2,1"])
    assert changes == {"length_buckets": 0, "recase": 0.15, "freeze_encoder": True,
                       "turn_weights": (0.4, 0.15, 0.15, 0.15, 0.15), "qtype_weights": (1.0, 1.0, 2.0, 1.0)}
    assert type(changes["length_buckets"]) is int and type(changes["recase"]) is float
    assert recipe_changes(TrainRecipe(), ["turn_weights=1,1"])["turn_weights"] == (1.0, 1.0)  # any length


@pytest.mark.parametrize(("assignment", "message"), [
    ("nonsense=1", "NAME one of"),
    ("steps", "NAME=VALUE"),
    ("steps=1.5", "steps takes a int value"),
    ("recase=lots", "recase takes a float value"),
    ("freeze_vision=maybe", "true or false"),
    ("qtype_weights=1,2", "expected 4 comma-separated numbers"),
    ("lang_mode_weights=a,b,c", "lang_mode_weights takes a tuple value"),
])
def test_bad_assignments_name_the_problem(assignment, message) -> None:
    with pytest.raises(ValueError, match=message):
        recipe_changes(TrainRecipe(), [assignment])


def test_the_command_reports_a_bad_assignment_without_a_traceback(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "visualglm", "demo", "train", "--out", str(tmp_path / "x"),
                             "--set", "vocab=2000"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    assert "vocab_size" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("change", "message"), [
    ({"length_buckets": -1}, "length_buckets must be at least 0"),
    ({"steps": 0}, "steps must be at least 1"),
    ({"recase": 1.5}, "recase is a share"),
    ({"drop_word": -0.1}, "drop_word is a share"),
    ({"synonym": 1.5}, "synonym is a share"),
    ({"learning_rate": 0.0}, "learning_rate must be positive"),
    ({"turn_weights": (0.0, 0.0)}, "turn_weights needs weights"),
    ({"oos_weight": -1.0}, "oos_weight"),
    ({"name_alignment": -0.1}, "name_alignment must be at least 0"),
])
def test_a_recipe_out_of_range_is_refused_before_training(change, message) -> None:
    import dataclasses

    from visualglm.demo.train import train

    recipe = dataclasses.replace(TrainRecipe(), **change)
    with pytest.raises(ValueError, match=message):
        recipe.validate()
    with pytest.raises(ValueError, match=message):
        train("/nonexistent/never-written", recipe, progress=False, log=lambda *_: None)
    TrainRecipe().validate()  # the shipped recipe is in range
