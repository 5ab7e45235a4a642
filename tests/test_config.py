import dataclasses
import json

import pytest

from ldjax.config import parse_config, to_dict


@dataclasses.dataclass(frozen=True)
class _Cfg:
    out: str = "runs/x"
    lr: float = 1e-3
    steps: int = 10
    use_bias: bool = True
    widths: tuple[int, ...] = (8, 8)
    name: str | None = None


def test_defaults_file_then_flags(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": 0.5, "steps": 3}))
    cfg = parse_config(_Cfg, ["--config", str(path), "--steps", "7", "--use-bias", "false", "--widths", "1", "2", "3"])
    assert cfg == _Cfg(lr=0.5, steps=7, use_bias=False, widths=(1, 2, 3))
    assert to_dict(cfg)["widths"] == [1, 2, 3]


def test_unknown_field_in_file_is_an_error(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"learning_rate": 0.5}))
    with pytest.raises(SystemExit):
        parse_config(_Cfg, ["--config", str(path)])


def test_bad_bool_is_an_error():
    with pytest.raises(SystemExit):
        parse_config(_Cfg, ["--use-bias", "maybe"])
