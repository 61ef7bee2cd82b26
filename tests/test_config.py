import pytest

from widedeep.config import PRESETS, TrainConfig, make_config
from widedeep.errors import UserError


def test_lecture_preset_is_the_lecture():
    c = make_config(preset="lecture")
    assert (c.widths, c.activation, c.optimizer, c.lr, c.epochs, c.batch_size, c.split) == (
        (6, 4), "sigmoid", "sgd", 0.1, 100, None, "none")
    assert c.init == "default" and not c.standardize


def test_flags_override_the_preset():
    c = make_config(preset="lecture", activation="relu", epochs=5)
    assert (c.activation, c.epochs, c.lr) == ("relu", 5, 0.1)


def test_depth_width_become_widths():
    assert make_config(depth=3, width=7).widths == (7, 7, 7)
    assert make_config(widths="6,4").widths == (6, 4)
    assert make_config(widths=[6, 4]).widths == (6, 4)


@pytest.mark.parametrize("options,words", [
    (dict(depth=-1), "depth must be >= 1, got depth=-1"),
    (dict(width=0), "width must be >= 1"),
    (dict(activation="nope"), "unknown activation 'nope'"),
    (dict(optimizer="rmsprop"), "unknown optimizer 'rmsprop'"),
    (dict(lr=-0.1), "lr out of range"),
    (dict(lr="fast"), "option lr has the wrong type"),
    (dict(epochs=0), "epochs out of range"),
    (dict(bogus=1), "unknown option"),
    (dict(preset="huge"), "unknown preset 'huge'"),
    (dict(csv="x.csv"), "--csv needs --target"),
    (dict(widths="6,x"), "widths must be an integer"),
    (dict(depth=2, widths=(3,)), "either --widths or --depth"),
    (dict(probe_epochs=(500,)), "probe epochs"),
])
def test_bad_options_name_the_bad_value(options, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(")):
        make_config(**options)


def test_config_round_trips_through_its_dict():
    c = make_config(preset="lecture", probe_epochs=(10, 50))
    d = c.to_dict()
    assert d["widths"] == [6, 4] and d["probe_epochs"] == [10, 50]
    assert make_config(**d) == c
    assert isinstance(c, TrainConfig) and "lecture" in PRESETS
