"""The one way to configure a run: dataclasses, presets, a file, then ``--set`` overrides.

Precedence, lowest first: dataclass defaults (the ``default`` GPU preset), the chosen preset,
``--config FILE`` (JSON or TOML), repeated ``--set key=value``. Every override names a dotted
key; an unknown key, a value of the wrong type or an impossible value raises ``ConfigError``
before any work starts, and the command line turns that into exit 2.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from pathlib import Path
from typing import Any

from job.config.checks import validate
from job.config.sections import NOT_MATH_KEYS, Config, ConfigError, flatten
from job.presets import PRESETS


def build_config(
    preset: str = "default",
    config_file: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
) -> Config:
    """Resolve the config of a run: defaults, preset, file, then ``key=value`` overrides."""
    if preset not in PRESETS:
        raise ConfigError(f"preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = Config()
    for key, value in PRESETS[preset].items():
        set_value(config, key, value)
    if config_file is not None:
        for key, value in flatten(_read_config_file(Path(config_file))).items():
            set_value(config, key, value)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.epochs=3")
        set_value(config, key.strip(), text)
    validate(config)
    return config


class UnknownKey(ConfigError):
    """A dotted key no section of this version's config has."""


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a config from its ``to_dict`` form (a run's config.json, a checkpoint's state). A key
    this version lacks was written by another one, with options this one does not know."""
    config = Config()
    for key, value in flatten(values).items():
        try:
            set_value(config, key, value)
        except UnknownKey as exc:
            raise ConfigError(
                f"{exc}. The run was made by another version of the job, with options this one lacks: "
                "read it with that version or a newer one"
            ) from exc
    validate(config)
    return config


def get_value(config: Config | dict[str, Any], key: str) -> Any:
    """The value of a dotted key, from a Config or from its dict form (a checkpoint's config)."""
    value: Any = config
    for part in key.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


def set_value(config: Config, key: str, value: Any) -> None:
    """Set a dotted key, converting ``value`` (a string from the command line, or a parsed
    value from a file) to the field's declared type."""
    *sections, name = key.split(".")
    target: Any = config
    for i, section in enumerate(sections):
        child = getattr(target, section, None) if _has_field(target, section) else None
        if not dataclasses.is_dataclass(child):
            raise UnknownKey(f"{key}: unknown key ({'.'.join(sections[: i + 1])} is not a section)")
        target = child
    if not _has_field(target, name) or dataclasses.is_dataclass(getattr(target, name)):
        raise UnknownKey(f"{key}: unknown key; known keys: {', '.join(_keys_of(target, sections))}")
    field_type = typing.get_type_hints(type(target))[name]
    setattr(target, name, _convert(key, value, field_type))


def diff_keys(old: dict[str, Any], new: dict[str, Any], sections: typing.Sequence[str]) -> list[str]:
    """Dotted keys under ``sections`` whose values differ between two ``to_dict`` configs. A key
    that ``old`` lacks (a run saved before the option existed) counts at its default: every
    option's default is the behaviour that came before it."""
    flat_old, flat_new = {**flatten(Config().to_dict()), **flatten(old)}, flatten(new)
    changed = []
    for key in sorted(set(flat_old) | set(flat_new)):
        in_scope = any(key == s or key.startswith(s + ".") for s in sections)
        if in_scope and key not in NOT_MATH_KEYS and flat_old.get(key) != flat_new.get(key):
            changed.append(key)
    return changed


def _has_field(obj: Any, name: str) -> bool:
    return dataclasses.is_dataclass(obj) and name in {f.name for f in dataclasses.fields(obj)}


def _keys_of(obj: Any, prefix: list[str]) -> list[str]:
    return [".".join([*prefix, f.name]) for f in dataclasses.fields(obj)]


def _convert(key: str, value: Any, field_type: Any) -> Any:
    origin = typing.get_origin(field_type)
    try:
        if origin is tuple:
            item_type = typing.get_args(field_type)[0]
            if isinstance(value, str):
                text = value.strip()
                items = json.loads(text) if text.startswith("[") else [v for v in text.split(",") if v.strip()]
            else:
                items = list(value)
            return tuple(_convert(key, item, item_type) for item in items)
        if field_type is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if field_type is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value.strip().replace("_", "")) if isinstance(value, str) else int(value)
        if field_type is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if field_type is str:
            if not isinstance(value, str):
                raise ValueError
            return value
    except (ValueError, TypeError, json.JSONDecodeError):
        pass
    name = getattr(field_type, "__name__", str(field_type))
    raise ConfigError(f"{key}: expected {name}, got {value!r}")


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read ({exc.strerror})") from exc
    try:
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--config {path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of sections")
    return values
