"""The hyperparameter language: parsing, aliases, schedules, errors that say what is valid, and round trips."""

from __future__ import annotations

import dataclasses
import json

import pytest
from preannotate.hyperparameters import (
    OPTIMIZERS,
    HyperparameterError,
    Hyperparameters,
    help_text,
    parse_pairs,
    valid_keys,
)
from preannotate.models.registry import ARCHITECTURES, default_hyperparameters


def parse(text: str) -> Hyperparameters:
    return Hyperparameters().updated(text)


# --- the language -------------------------------------------------------------------------------------------


def test_key_value_lines():
    hp = parse("num-steps=2000\nbatch-size=8\ninitial-learning-rate=0.02\noptimizer=adamw\n")

    recipe = hp.recipe
    assert (recipe.num_steps, recipe.batch_size, recipe.initial_learning_rate) == (2000, 8, 0.02)
    assert recipe.optimizer == "adamw"
    assert isinstance(hp.recipe.num_steps, int) and isinstance(hp.recipe.initial_learning_rate, float)


@pytest.mark.parametrize("text", [
    "num-steps=2000; batch-size=4; momentum=0.8",
    "num-steps=2000, batch-size=4, momentum=0.8",
    "num_steps = 2000 ;batch_size= 4\n\n  momentum =0.8  ",
    "NUM-STEPS=2000;Batch_Size=4;MOMENTUM=0.8;",
])
def test_separators_dashes_and_underscores_alike(text):
    hp = parse(text)

    assert (hp.recipe.num_steps, hp.recipe.batch_size, hp.recipe.momentum) == (2000, 4, 0.8)


def test_a_list_continues_after_a_comma():
    hp = parse("augment=flip,colour, batch-size=2")

    assert hp.recipe.augment == ("flip", "colour") and hp.recipe.batch_size == 2
    assert parse("augment=scale\nwarmup-steps=10").recipe.augment == ("scale",)
    assert parse("augment=color+flip+flip").recipe.augment == ("colour", "flip")  # spelling, '+', duplicates
    assert parse("augment=none").recipe.augment == ()
    assert parse_pairs("augment=flip,colour,scale; seed=3") == {"augment": "flip,colour,scale", "seed": "3"}


def test_comments_run_to_the_end_of_the_line():
    hp = parse("# one epoch, to try\nepochs=1  # quick, for now\naugment=flip\n# colour, scale later\nseed=7")

    assert (hp.recipe.epochs, hp.recipe.augment, hp.recipe.seed) == (1.0, ("flip",), 7)


def test_value_without_a_key_is_an_error():
    with pytest.raises(HyperparameterError, match=r"'2000' is not key=value \(e.g. num-steps=2000"):
        parse("2000; batch-size=4")


def test_empty_text_changes_nothing():
    assert parse("") == Hyperparameters()
    assert parse(" ;\n, ") == Hyperparameters()


# --- schedules ----------------------------------------------------------------------------------------------


def test_multi_step_schedule_in_step_order():
    hp = parse("schedule=multi-step; schedule-step-2=8000; schedule-lr-2=0.0001; "
               "schedule_step_1=5000; schedule_lr_1=0.001")

    assert hp.recipe.schedule == "multi-step"
    assert hp.recipe.schedule_steps == [5000, 8000] and hp.recipe.schedule_lrs == [0.001, 0.0001]


def test_schedule_steps_without_rates_decay_by_gamma():
    hp = parse("schedule=multistep; schedule-step-1=100; schedule-step-2=200; schedule-gamma=0.5")

    assert hp.recipe.schedule_steps == [100, 200] and hp.recipe.schedule_lrs == [] and hp.recipe.schedule_gamma == 0.5


def test_schedule_steps_as_one_list():
    hp = parse("schedule=multi-step; schedule-steps=100,200; schedule-lrs=0.01 0.001")

    assert hp.recipe.schedule_steps == [100, 200] and hp.recipe.schedule_lrs == [0.01, 0.001]


def test_numbered_step_replaces_the_one_it_names():
    rcnn = default_hyperparameters("fasterrcnn_resnet50_fpn")
    assert rcnn.recipe.schedule_steps == [9000] and rcnn.recipe.schedule_lrs == [0.00003]

    hp = rcnn.updated("schedule-step-1=6000; schedule-step-2=8000; schedule-lr-2=0.000001")

    assert hp.recipe.schedule_steps == [6000, 8000] and hp.recipe.schedule_lrs == [0.00003, 0.000001]


def test_schedule_steps_must_increase():
    with pytest.raises(HyperparameterError, match="must increase"):
        parse("schedule=multi-step; schedule-step-1=8000; schedule-step-2=5000")


def test_schedule_rates_need_matching_steps():
    with pytest.raises(HyperparameterError, match="schedule-lr-N needs a schedule-step-N"):
        parse("schedule=multi-step; schedule-step-1=100; schedule-lr-1=0.01; schedule-lr-2=0.001")
    with pytest.raises(HyperparameterError, match="schedule-lr-N needs a schedule-step-N"):
        parse("schedule-lr-1=0.01")
    # as many rates as steps, but rate 2 has no step 2
    with pytest.raises(HyperparameterError, match=r"steps for N in \[1, 3\], rates for N in \[1, 2\]"):
        parse("schedule=multi-step; schedule-step-1=100; schedule-step-3=300; schedule-lr-1=0.1; schedule-lr-2=0.01")


def test_multi_step_without_steps_is_an_error():
    with pytest.raises(HyperparameterError, match="multi-step needs schedule-step-1"):
        parse("schedule=multi-step")
    with pytest.raises(HyperparameterError, match="multi-step"):
        parse("schedule=multistep; schedule-steps=")


@pytest.mark.parametrize("text, key", [
    ("schedule-step-1=1.5", "schedule-step-1"),
    ("schedule-step-1=-100", "schedule-step-1"),
    ("schedule-lr-1=fast; schedule-step-1=10", "schedule-lr-1"),
    ("schedule-steps=100,abc", "schedule-steps"),
])
def test_bad_schedule_values_name_the_key(text, key):
    with pytest.raises(HyperparameterError, match=f"bad value for {key}"):
        parse(text)


@pytest.mark.parametrize("text, schedule", [
    ("schedule=OneCycle", "one-cycle"), ("schedule=plateau", "on-plateau"),
    ("schedule=cosine_annealing", "cosine"), ("schedule=step; schedule-step-size=100", "step"),
])
def test_schedule_spellings(text, schedule):
    assert parse(text).recipe.schedule == schedule


# --- aliases ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, field, value", [
    ("lr=0.05", "initial_learning_rate", 0.05),
    ("learning-rate=0.05", "initial_learning_rate", 0.05),
    ("steps=300", "num_steps", 300),
    ("num_train_steps=300", "num_steps", 300),
    ("iterations=300", "num_steps", 300),
    ("num-epochs=2.5", "epochs", 2.5),
    ("batch=6", "batch_size", 6),
    ("gpus=2", "num_clones", 2),
    ("patience=3", "early_stopping_patience", 3),
    ("warmup=50", "warmup_steps", 50),
    ("augmentations=scale", "augment", ("scale",)),
    ("min-dimension=600", "image_size", 600),
    ("max-dimension=1024", "max_image_size", 1024),
    ("clip-grad-norm=10", "gradient_clip_norm", 10.0),
    ("trainable-layers=3", "trainable_backbone_layers", 3),
])
def test_aliases(text, field, value):
    hp = parse(text)

    assert hp.value(field) == value
    default = Hyperparameters().to_dict()
    assert {key for key, value in hp.to_dict().items() if value != default[key]} == {field}


@pytest.mark.parametrize("text, fraction", [("val-split=25", 0.25), ("val_split=0", 0.0), ("val-split=12.5", 0.125)])
def test_val_split_is_a_percentage(text, fraction):
    assert parse(text).sources.val_fraction == pytest.approx(fraction)


def test_val_split_errors_name_the_key():
    with pytest.raises(HyperparameterError, match="bad value for val-split"):
        parse("val-split=a fifth")
    with pytest.raises(HyperparameterError, match="bad value for val-split"):
        parse("val-split=95")  # 0.95 of the frames held out is more than the 0.9 allowed
    assert parse("val-fraction=0.9").sources.val_fraction == 0.9


# --- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("typed, meant", [
    ("learnin-rate", "learning-rate"), ("batchsize", "batch-size"), ("num_step", "num-steps"),
    ("--Image_Sze", "image-size"), ("schedule", None), ("warmup", None), ("nms-iou", "nms-iou-threshold"),
    ("backbon", "backbone"), ("rpn-max-proposal", "rpn-max-proposals"), ("zzz", None)])
def test_an_unknown_key_is_one_sentence_with_the_keys_it_may_mean(typed, meant):
    if meant is None and typed in ("schedule", "warmup"):  # known keys and aliases are no error
        parse(f"{typed}=1" if typed == "warmup" else "schedule=cosine")
        return
    with pytest.raises(HyperparameterError) as error:
        parse(f"batch-size=2; {typed}=0.1")
    message = str(error.value)
    assert message.startswith(f"unknown hyperparameter {typed!r}") and "\n" not in message
    assert ("did you mean" in message) == (meant is not None) and (meant is None or meant in message)
    assert "--help-hyperparameters" in message and len(message) < 200  # not the ~70 keys at once
    assert "schedule-steps" not in valid_keys() and "schedule-step-N" in valid_keys()


@pytest.mark.parametrize("text, key", [
    ("batch-size=four", "batch-size"),
    ("batch-size=2.5", "batch-size"),
    ("batch-size=0", "batch-size"),
    ("lr=fast", "lr"),
    ("lr=0", "lr"),
    ("lr=11", "lr"),
    ("lr=nan", "lr"),
    ("epochs=inf", "epochs"),
    ("momentum=1.5", "momentum"),
    ("weight_decay=-0.1", "weight_decay"),
    ("optimizer=lbfgs", "optimizer"),
    ("schedule=linear", "schedule"),
    ("augment=flip,rotate", "augment"),
    ("letterbox=maybe", "letterbox"),
    ("init=imagenet", "init"),
    ("image-size=16", "image-size"),
    ("trainable-backbone-layers=7", "trainable-backbone-layers"),
    ("score-threshold=1.2", "score-threshold"),
    ("num-clones=0", "num-clones"),
])
def test_bad_values_name_the_key(text, key):
    with pytest.raises(HyperparameterError, match=f"bad value for {key}:"):
        parse(text)


def test_bad_value_messages_say_what_is_valid():
    with pytest.raises(HyperparameterError, match="'lbfgs' is not one of " + ", ".join(OPTIMIZERS)):
        parse("optimizer=lbfgs")
    with pytest.raises(HyperparameterError, match=r"must be between 0 and 1\)"):
        parse("momentum=1.5")
    with pytest.raises(HyperparameterError, match=r"must be at least 1\)"):
        parse("batch-size=0")


def test_hyperparameter_error_is_a_value_error():
    with pytest.raises(ValueError):
        parse("optimizer=lbfgs")


def test_choices_booleans_and_optional_values():
    hp = parse("optimizer=Adam; letterbox=yes; init=previous; early-stopping-patience=4; image-size=512")
    assert (hp.recipe.optimizer, hp.recipe.init, hp.recipe.early_stopping_patience) == ("adam", "previous", 4)
    assert (hp.network.letterbox, hp.network.image_size) == (True, 512)

    cleared = hp.updated("letterbox=off; early-stopping-patience=none; image-size=")
    assert (cleared.network.letterbox, cleared.recipe.early_stopping_patience, cleared.network.image_size) == (
        False, None, None)


# --- Python values, dicts and round trips -------------------------------------------------------------------


def test_to_dict_from_dict_round_trip():
    hp = parse("num-steps=1234; lr=0.02; optimizer=rmsprop; schedule=multi-step; schedule-step-1=500; "
               "schedule-step-2=900; schedule-lr-1=0.01; schedule-lr-2=0.001; augment=flip,scale; "
               "letterbox=true; image-size=256; max-image-size=512; gradient-clip-norm=5; val-split=10; "
               "early-stopping-patience=3; max-training-hours=1.5; seed=42")
    data = hp.to_dict()

    assert data["augment"] == ["flip", "scale"] and data["schedule_steps"] == [500, 900]
    assert Hyperparameters.from_dict(data) == hp
    assert Hyperparameters.from_dict(json.loads(json.dumps(data))) == hp
    assert Hyperparameters.from_dict(Hyperparameters().to_dict()) == Hyperparameters()


def test_from_dict_checks_python_values_too():
    assert Hyperparameters.from_dict({"batch_size": 3, "epochs": 2, "letterbox": True}).recipe.epochs == 2.0
    assert Hyperparameters.from_dict({"batch-size": "3"}).recipe.batch_size == 3

    for bad in ({"batch_size": 2.5}, {"batch_size": None}, {"batch_size": True}, {"optimizer": 3},
                {"initial_learning_rate": float("nan")}, {"schedule_steps": [100, "x"]}):
        with pytest.raises(HyperparameterError, match="bad value"):
            Hyperparameters.from_dict(bad)
    with pytest.raises(HyperparameterError, match="unknown hyperparameter 'speed'"):
        Hyperparameters.from_dict({"speed": 3})


def test_updated_leaves_the_original_alone():
    base = Hyperparameters()
    changed = base.updated({"batch_size": 16, "augment": ["colour"]})

    assert (base.recipe.batch_size, base.recipe.augment) == (4, ("flip",))
    assert (changed.recipe.batch_size, changed.recipe.augment) == (16, ("colour",))


# --- total steps --------------------------------------------------------------------------------------------


def test_total_steps_num_steps_wins_over_epochs():
    assert parse("num-steps=750; epochs=100").recipe.total_steps(train_images=10_000) == 750


@pytest.mark.parametrize("text, images, steps", [
    ("epochs=1; batch-size=4", 10, 3),              # ceil(10 / 4)
    ("epochs=1; batch-size=4", 12, 3),
    ("epochs=3; batch-size=4", 13, 12),             # 3 x ceil(13 / 4)
    ("epochs=2; batch-size=4; num-clones=2", 17, 6),  # 2 x ceil(17 / 8)
    ("epochs=0.5; batch-size=1", 10, 5),
    ("epochs=0.01; batch-size=1", 10, 1),           # at least one step
    ("batch-size=4", 9, 3),                         # neither: one epoch
    ("epochs=5; batch-size=4", 0, 5),               # no images: one batch an epoch
])
def test_total_steps_from_epochs(text, images, steps):
    assert parse(text).recipe.total_steps(train_images=images) == steps


# --- the registry's defaults --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_default_hyperparameters_of_every_architecture(name):
    architecture = ARCHITECTURES[name]
    hp = default_hyperparameters(name)

    assert isinstance(hp, Hyperparameters)
    assert hp.network.image_size == architecture.image_size and hp.network.max_image_size == architecture.max_image_size
    assert hp.network.image_size >= 32 and hp.network.max_image_size >= hp.network.image_size
    for key, value in architecture.defaults.items():
        assert hp.value(key) == (value if not isinstance(value, tuple) else tuple(value))
    hp.check()
    assert Hyperparameters.from_dict(hp.to_dict()) == hp
    assert hp.recipe.total_steps(train_images=100) == hp.recipe.num_steps
    if hp.recipe.schedule == "multi-step":
        assert hp.recipe.schedule_steps and all(step < hp.recipe.num_steps for step in hp.recipe.schedule_steps)


def test_help_text_lists_every_key():
    text = help_text()

    for key in valid_keys()[:-2]:
        assert f"  {key} " in text
    assert "schedule-step-N, schedule-lr-N" in text


# --- by concern ----------------------------------------------------------------------------------------------------

def test_every_key_belongs_to_one_concern_and_the_named_groups_to_theirs():
    from preannotate.hyperparameters import (
        COMPOSITION,
        CONCERNS,
        FIELDS,
        KNOBS,
        POSTPROCESSING,
        STAGES,
        Network,
        Postprocessing,
        Recipe,
        Sources,
    )

    names = [f.name for cls in CONCERNS.values() for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names)) == len(FIELDS)  # no key in two concerns
    fields_of = {cls: {f.name for f in dataclasses.fields(cls)} for cls in CONCERNS.values()}
    assert set(POSTPROCESSING) <= fields_of[Postprocessing] and {*KNOBS, *COMPOSITION} <= fields_of[Network]
    assert set(STAGES) <= fields_of[Recipe] and fields_of[Sources] == {"train_on", "val_fraction"}


def test_which_keys_the_user_gave_survives_every_copy():
    hp = parse("batch-size=2; train-on=all; image-size=320")
    assert hp.given == {"batch_size", "train_on", "image_size"}
    assert hp.replaced(num_steps=10, letterbox=True).given == hp.given  # what the trainer fits is not the user's
    assert dataclasses.replace(hp, recipe=dataclasses.replace(hp.recipe, seed=3)).given == hp.given
    assert hp.updated("seed=3").given == hp.given | {"seed"}
    assert hp.sources.train_on == ("all",) and hp.network.image_size == 320 and hp.recipe.batch_size == 2
