from pathlib import Path

import pytest
import yaml

from dkd.config import ConfigError, RunConfig, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_equal_shipped_synthetic_yaml():
    assert load_config(ROOT / "configs" / "synthetic.yaml") == RunConfig()


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["method.name=dis", "method.k=10", "optim.lr=0.01",
                             "train.steps=7", "teacher.checkpoint=runs/t"])
    assert (cfg.method.name, cfg.method.k, cfg.optim.lr, cfg.train.steps) == ("dis", 10, 0.01, 7)
    assert cfg.teacher.checkpoint == "runs/t"


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: {name: kd, temperature: 2.0}\ntrain: {steps: 5}\n")
    cfg = load_config(f, ["train.steps=9"])
    assert cfg.method.temperature == 2.0 and cfg.train.steps == 9


@pytest.mark.parametrize("override, needle", [
    (["method.name=foo"], "unknown method 'foo'"),
    (["method.temperature=0"], "method.temperature"),
    (["data.num_classes=1"], "data.num_classes"),
    (["train.steps=abc"], "train.steps"),
    (["method.name=dis"], "needs method.k"),
    (["method.name=dis", "method.k=100"], "method.k = 100 must be < data.num_classes = 100"),
    (["method.name=dis", "method.k=0"], "method.k"),
    (["data.nope=1"], "data.nope"),
    (["dist.zero_stage=3"], "ZeRO stage 3 is not supported"),
    (["optim.name=lbfgs"], "optim.name"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(None, override)
    assert needle in str(err.value)


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/x.yaml")
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["method.name"])


def test_dump_round_trips():
    cfg = load_config(None, ["method.name=ftis", "method.k=5"])
    assert RunConfig.model_validate(yaml.safe_load(dump_config(cfg))) == cfg


def test_readme_config_reference_is_current():
    from dkd.config import reference_markdown

    assert reference_markdown() in (ROOT / "README.md").read_text(), \
        "README's config table is stale: run `make docs`"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    load_config(path)
