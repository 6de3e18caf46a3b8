import pytest

from rolekd.config import load_config
from rolekd.errors import UserError


def test_defaults_are_the_papers_recipe():
    c = load_config()
    t = c.train
    assert (t.optimizer, t.lr, t.momentum, t.nesterov, t.weight_decay, t.batch_size, t.epochs) == \
        ("sgd", 0.1, 0.9, True, 5e-4, 128, 200)
    assert (c.data.train_size, c.data.val_size, c.data.split_seed) == (4000, 46000, 0)


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: x\ntrain:\n  lr: 0.05\n  epochs: 3\nmodel:\n  name: wrn_16_2\n")
    c = load_config(f, ["train.batch_size=64", "w_bits=4", "teacher=runs/t", "augment.cutout=0"])
    assert (c.train.lr, c.train.epochs, c.train.batch_size, c.model.name) == (0.05, 3, 64, "wrn_16_2")
    assert (c.quant.w_bits, c.kd.teacher, c.augment.cutout) == (4, "runs/t", 0)


@pytest.mark.parametrize("text,overrides,match", [
    ("train:\n  lrr: 1\n", [], r"unknown key train\.lrr \(known here: epochs"),
    ("train:\n  lr: fast\n", [], r"train\.lr: .*number"),
    ("", ["w_bits=9"], "w_bits=9 is not supported"),
    ("", ["data.name=imagenet"], "data.name"),
    ("train: [1, 2\n", [], r"line \d+: not valid YAML"),
    ("- 1\n- 2\n", [], "top level must be a mapping"),
    ("", ["nonsense"], "is not key=value"),
    ("!!python/object/apply:os.system ['echo hi']\n", [], "not valid YAML"),
])
def test_bad_configs_are_one_line_errors(tmp_path, text, overrides, match):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(UserError, match=match) as e:
        load_config(f, overrides)
    assert "\n" not in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_on_and_off_words_survive_yaml():
    """YAML 1.1 reads on / off as booleans; the word-valued keys take them back as words, from a file too."""
    from rolekd.config import load_config

    cfg = load_config(None, ["train.channels_last=on", "train.amp=off"])
    assert cfg.train.channels_last == "on" and cfg.train.amp == "off"
    assert load_config(None, ["train.channels_last=off"]).train.channels_last == "off"
