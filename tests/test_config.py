from dataclasses import dataclass, field
from typing import Literal

import pytest

from chatloop.config import ConfigError, help_text, parse_args
from chatloop.model import ModelOverrides, preset
from chatloop.train.pretrain import PretrainConfig


@dataclass
class Inner:
    width: int = 4
    """How wide."""
    on: bool = True
    """A nested switch."""


@dataclass
class Example:
    lr: float = 1e-3
    """Learning rate."""
    name: str = "x"
    """A name."""
    flag: bool = False
    """A switch."""
    mode: Literal["a", "b"] = "a"
    """One of two."""
    files: list[str] = field(default_factory=list)
    """Some files."""
    limit: int | None = None
    """An optional limit."""
    inner: Inner = field(default_factory=Inner)
    """A nested section."""


def test_defaults_yaml_and_overrides_in_order_of_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.5\nname: from-file\ninner:\n  width: 8\n")
    cfg = parse_args(Example, ["--config", str(path), "--name=cli", "--flag", "--inner.width", "16",
                               "--files", "a.txt", "b.txt", "--limit=none", "--mode", "b"])
    assert cfg == Example(lr=0.5, name="cli", flag=True, mode="b", files=["a.txt", "b.txt"], limit=None,
                          inner=Inner(16))
    assert parse_args(Example, ["--no-flag", "--limit=3"]).limit == 3
    assert parse_args(Example, ["--inner.no-on"]).inner.on is False  # a nested bool's --SECTION.no-FIELD


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr=fast"], "--lr: expected a number, got 'fast'"),
        (["--bogus=1"], "unknown field 'bogus' of Example"),
        (["--inner.depth=1"], "unknown field 'depth' of Inner"),
        (["--mode=c"], "expected one of 'a' | 'b'"),
        (["--flag=maybe"], "expected true or false"),
        (["positional"], "overrides are written --FIELD=VALUE"),
    ],
)
def test_bad_overrides_name_the_flag_and_the_expectation(argv, message):
    with pytest.raises(ConfigError, match=message.replace("|", r"\|").replace("(", r"\(")):
        parse_args(Example, argv)


def test_bad_yaml_names_the_file_and_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"c.yaml: field 'lr': expected a number"):
        parse_args(Example, ["--config", str(path)])
    path.write_text("inner:\n  nope: 1\n")
    with pytest.raises(ConfigError, match=r"c.yaml.inner: unknown field 'nope'"):
        parse_args(Example, ["--config", str(path)])
    path.write_text("lr: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        parse_args(Example, ["--config", str(path)])
    with pytest.raises(ConfigError, match="config file not found"):
        parse_args(Example, ["--config", str(tmp_path / "missing.yaml")])


def test_help_lists_every_field_with_default_and_docstring():
    text = help_text(PretrainConfig)
    for name in ("--lr", "--beta2", "--seq_len", "--model.n_layer", "--preset", "--inputs", "--precision"):
        assert name in text
    assert "Adam beta2 (InstructGPT: 0.95)." in text
    assert "default: 0.95" in text
    assert "Number of transformer blocks." in text  # docs of the nested model overrides come from GPTConfig


def test_model_overrides_change_single_fields_of_a_preset():
    cfg = parse_args(PretrainConfig, ["--preset=small", "--model.n_layer=2", "--model.d_model=128"])
    model = preset(cfg.preset, cfg.model)
    assert (model.n_layer, model.d_model, model.n_head) == (2, 128, 8)
    assert model.d_ff == 384  # re-derived from the new width
    assert isinstance(cfg.model, ModelOverrides)
