"""A run's config as a TOML file: ``jaxnet train --config run.toml``, ``--print-config``, ``config.toml``.

The file is flat: one ``field = value`` per :class:`jaxnet.app.config.TrainConfig` field (lists for the
tuple fields); a field left out takes its default or the dataset's preset, as on the command line, and
flags given with ``--config`` override the file. :func:`dumps` writes every field that is set (a field
whose value is None is left out: reading the file back leaves it unset, which is the same), so the
``config.toml`` of a run folder reproduces the run.

Reading uses the standard library's ``tomllib`` (Python 3.11+; ``tomli`` on 3.10); writing needs no
library, the values being numbers, strings, booleans and flat lists of them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from jaxnet.app.config import TrainConfig

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"a config holds only finite numbers, got {value!r}")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string: the same escapes
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"a config value must be a number, string, boolean or list, got {type(value).__name__}")


def dumps(config: dict) -> str:
    """``config`` (``TrainConfig.to_dict()``) as TOML, fields in their declared order."""
    lines = ["# jaxnet train --config FILE (flags given with it override these values)"]
    lines += [f"{name} = {_value(config[name])}" for name in CONFIG_KEYS if config.get(name) is not None]
    return "\n".join(lines) + "\n"


def load_config_file(path) -> dict:
    """The fields a config file sets, checked by name (values are checked by the config itself).

    Raises:
      ValueError: the file is missing, not TOML, nested, or names a field that does not exist.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"config file {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {path} cannot be read: {e}") from None
    if path.suffix == ".json":  # a run folder's config.json (its config.toml says the same)
        try:
            values = json.loads(text)
        except ValueError as e:
            raise ValueError(f"config file {path} is not valid JSON: {e} (a run folder's config.toml is the same "
                             "config as TOML)") from None  # fmt: skip
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} holds no config (a JSON object of field: value)")
        values = {name: v for name, v in values.items() if v is not None}  # TOML has no null: unset
    else:
        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {path} is not valid TOML: {e}") from None
    nested = [name for name, v in values.items() if isinstance(v, dict)]
    if nested:
        raise ValueError(f"config file {path}: {nested[0]!r} is a table; the config is flat (field = value)")
    unknown = [name for name in values if name not in CONFIG_KEYS]
    if unknown:
        raise ValueError(f"config file {path}: unknown field {unknown[0]!r} (fields: {', '.join(CONFIG_KEYS)})")
    return {name: tuple(v) if isinstance(v, list) else v for name, v in values.items()}
