import pytest

from lmlab.config import RunConfig, load_config, save_config
from lmlab.errors import ConfigError


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  n_layer: 3\ntrain:\n  lr: 0.01\n")
    cfg = load_config(path, ["model.d_model=64", "train.lr=3e-4", "train.max_minutes=null", "train.compile=true"])
    assert cfg.model.n_layer == 3 and cfg.model.d_model == 64
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.max_minutes is None and cfg.train.compile is True


def test_int_widens_to_float():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


def test_save_then_load_round_trips(tmp_path):
    cfg = load_config(None, ["model.n_head=8", "data.path=x"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("override, message", [
    ("model.n_layers=3", "unknown config key 'model.n_layers' (did you mean 'model.n_layer'?)"),
    ("train.lr=abc", "train.lr expects float, got 'abc'"),
    ("model.n_layer=2.5", "model.n_layer expects int"),
    ("train.compile=maybe", "train.compile expects bool"),
    ("nonsense", "must look like section.key=value"),
    ("bogus.key=1", "unknown config key 'bogus'"),
])
def test_bad_overrides_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_defaults_are_a_runconfig():
    assert isinstance(load_config(None), RunConfig)
