"""Configuration (job.config): presets, then file, then --set; bad values, sizes and files refused
naming the key; which keys are the run's math."""

from __future__ import annotations

import dataclasses
import json
import re
import typing

import pytest

from job.config import MATH_SECTIONS, STAGE2_MATH_SECTIONS, Config, ConfigError, build_config, config_from_dict, diff_keys

pytestmark = pytest.mark.timeout(120)


def test_presets_resolve_and_differ():
    smoke, small, default = (build_config(p) for p in ("smoke", "small", "default"))
    assert default.data.num_samples == 10_000 and default.data.frames == 16 and default.data.height == 64
    assert default.train.epochs == 100 and default.checkpoint.every_epochs == 10
    assert default.checkpoint.every_minutes == 10 and default.monitor.heartbeat_seconds == 30
    assert default.train.log_every_batches == 5
    assert smoke.data.num_samples < small.data.num_samples < default.data.num_samples


def test_precedence_preset_then_file_then_set(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("seed = 3\n[train]\nepochs = 7\nbatch_size = 4\n")
    cfg = build_config("smoke", toml, ["train.epochs=9", "model.channel_mults=1,2", "train.bf16=false"])
    assert cfg.seed == 3 and cfg.train.batch_size == 4  # from the file
    assert cfg.train.epochs == 9  # --set wins over the file
    assert cfg.model.channel_mults == (1, 2) and cfg.train.bf16 is False
    as_json = tmp_path / "run.json"
    as_json.write_text(json.dumps({"optim": {"lr": 0.5}}))
    assert build_config("smoke", as_json).optim.lr == 0.5


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.epochz=3", "train.epochz"),
        ("nosuch.key=1", "nosuch"),
        ("train.epochs=three", "train.epochs"),
        ("train.epochs=1.5", "train.epochs"),
        ("train.epochs=0", "train.epochs"),
        ("optim.lr=-1", "optim.lr"),
        ("data.height=17", "data.height"),  # not divisible by the model's downsampling
        ("data.classes=linear,circular", "data.classes"),
        ("stage2.patch=3", "stage2.patch"),  # smoke has 8 x 8 codes a frame
        ("stage2.patch=0", "stage2.patch"),
        ("stage2.frame_masking=1.5", "stage2.frame_masking"),
        ("train.bf16=maybe", "train.bf16"),
        ("epochs", "epochs"),
    ],
)
def test_bad_values_name_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        build_config("smoke", None, [override])


def float_keys(section=Config(), prefix: str = "") -> list[str]:
    """Every dotted key whose field is a float, found by walking the dataclasses."""
    keys = []
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            keys += float_keys(value, f"{prefix}{f.name}.")
        elif hints[f.name] is float:
            keys.append(f"{prefix}{f.name}")
    return keys


@pytest.mark.parametrize("text", ["nan", "inf", "-inf"])
def test_every_float_setting_refuses_nan_and_infinity(text):
    keys = float_keys()
    assert "storage.connect_seconds" in keys and "optim.lr" in keys and len(keys) > 20
    for key in keys:
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: must be a finite number"):
            build_config("smoke", None, [f"{key}={text}"])


def test_a_config_file_with_nan_is_refused_too(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[storage]\nconnect_seconds = nan\n")
    with pytest.raises(ConfigError, match="storage.connect_seconds"):
        build_config("smoke", toml)


@pytest.mark.parametrize(
    "override, named",
    [
        ("model.channels=99999999", "model.channels"),
        ("model.channel_mults=1,100000", "model.channel_mults"),
        ("stage2.dim=99999999", "stage2.dim"),
        ("train.batch_size=99999999", "train.batch_size"),
    ],
)
def test_sizes_no_machine_can_hold_are_refused_naming_the_key(override, named):
    with pytest.raises(ConfigError, match=rf"^{re.escape(named)}: .*too large"):
        build_config("smoke", None, [override, "data.num_samples=200000000"])


def test_unreadable_config_file_is_a_config_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json"):
        build_config("smoke", bad)
    with pytest.raises(ConfigError, match="preset"):
        build_config("huge")


def test_math_keys_are_data_model_optim_seed_not_epochs():
    a = build_config("smoke").to_dict()
    b = build_config("smoke", None, ["train.epochs=9", "checkpoint.every_steps=2", "model.channels=4", "seed=1"]).to_dict()
    assert diff_keys(a, b, MATH_SECTIONS) == ["model.channels", "seed"]


def test_a_key_added_since_a_run_was_saved_counts_at_its_default():
    """A run saved before an option existed has no such key; the option's default is the
    behaviour it was trained with, so resuming it with the default changes nothing, and setting
    the option is a change like any other."""
    saved = build_config("smoke").to_dict()
    del saved["stage2"]["conv_position"]
    same = build_config("smoke", None, ["stage2.conv_position=false"]).to_dict()
    assert diff_keys(saved, same, STAGE2_MATH_SECTIONS) == []
    changed = build_config("smoke", None, ["stage2.conv_position=true"]).to_dict()
    assert diff_keys(saved, changed, STAGE2_MATH_SECTIONS) == ["stage2.conv_position"]


def test_a_saved_config_with_a_key_this_version_lacks_says_another_version_made_it():
    """A run trained by a newer version of the job has options this one does not know: reading it
    back (evaluate, verify, sample) is refused with a message that says why, not just which key."""
    saved = build_config("smoke").to_dict()
    saved["stage2"]["future_option"] = 1
    with pytest.raises(ConfigError, match=r"stage2\.future_option: unknown key.*another version of the job"):
        config_from_dict(saved)
    saved["stage2"].pop("future_option")
    saved["stage2"]["dim"] = "wide"  # a bad value is the old message: no version is to blame
    with pytest.raises(ConfigError) as refused:
        config_from_dict(saved)
    assert "another version" not in str(refused.value)
