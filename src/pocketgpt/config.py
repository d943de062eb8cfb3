"""TOML run configurations with command-line overrides, shared by every training stage.

A config file has one table per section, each mapping onto a dataclass (or a free-form dict)::

    # configs/shakespeare-char.toml
    [model]              # GPTConfig fields
    n_layer = 6
    [train]              # TrainConfig fields
    max_steps = 2000
    [data]               # the stage's data options
    dir = "data/shakespeare-char"

``load_config(name_or_path, overrides, sections={"model": GPTConfig, "train": TrainConfig, "data": DataConfig})``
reads a preset (``configs/NAME.toml`` or a path), applies overrides (``--key value`` or ``--section.key value``; a bare
key sets every section that has it, e.g. ``--block_size 128`` sets both ``[model]`` and ``[data]``), coerces types
from the dataclass annotations, and rejects unknown sections/keys with a did-you-mean naming the file, line and
section. Stages reuse it with their own sections; on the command line ``add_config_arguments(parser, sections)`` adds
``--config`` and one option per field, and ``config_from_args(args, sections)`` returns the ``RunConfig``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Optional

from .errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The presets ship inside the package (the repository's top-level configs/ is a link to this folder), so
# `--config NAME` works from any directory and from a non-editable install.
PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"


def config_dirs() -> list[Path]:
    """Where preset names are looked up: ./configs (your own presets), then pocketgpt's bundled presets."""
    dirs = [Path.cwd() / "configs", PACKAGE_CONFIGS]
    out = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def list_presets() -> list[str]:
    names = set()
    for d in config_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.toml"))
    return sorted(names)


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path to a TOML file, or a preset name (``shakespeare-char`` → ``configs/shakespeare-char.toml``)."""
    p = Path(name_or_path)
    if p.exists():
        if p.is_dir():
            raise UserError(f"--config: {p} is a directory, expected a .toml file")
        return p
    name = p.name[:-5] if p.name.endswith(".toml") else p.name
    if len(p.parts) == 1 or (len(p.parts) == 2 and p.parts[0] == "configs"):
        for d in config_dirs():
            cand = d / f"{name}.toml"
            if cand.exists():
                return cand
    presets = list_presets()
    hint = difflib.get_close_matches(name, presets, n=1)
    extra = f" (did you mean '{hint[0]}'?)" if hint else (f" (presets: {', '.join(presets)})" if presets else "")
    raise UserError(f"--config: {name_or_path}: no such file or preset{extra}")


def read_toml(path: str | Path) -> dict:
    from .io import read_text

    path = Path(path)
    text = read_text(path)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        where = f"{path}:{m.group(1)}" if m else str(path)
        raise UserError(f"{where}: invalid TOML ({str(e).split(' (at')[0]})") from None


def _key_line(path: Optional[Path], section: str, key: Optional[str] = None) -> str:
    """``path:LINE`` of ``key`` inside ``[section]`` (or of the section header), best effort."""
    if path is None:
        return "command line"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return str(path)
    current = None
    for i, line in enumerate(lines, 1):
        s = line.strip()
        m = re.match(r"^\[\s*([^\]\s]+)\s*\]", s)
        if m:
            current = m.group(1).strip("\"'")
            if key is None and current == section:
                return f"{path}:{i}"
            continue
        if key is not None and current == section and re.match(rf"^[\"']?{re.escape(key)}[\"']?\s*=", s):
            return f"{path}:{i}"
    return str(path)


# --------------------------------------------------------------------------------------------------------------------
# types


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
        return Any, True
    return tp, False


def _type_name(tp: Any) -> str:
    base, opt = _unwrap_optional(tp)
    name = getattr(base, "__name__", str(base))
    return f"{name} or none" if opt else name


def coerce(value: Any, tp: Any, where: str, from_cli: bool = False) -> Any:
    """Check (TOML) or convert (command-line string) ``value`` to the annotated type ``tp``."""
    base, optional = _unwrap_optional(tp)
    if from_cli and isinstance(value, str):
        v = value.strip()
        if optional and v.lower() in ("none", "null", ""):
            return None
        if base is str:
            return value
        if base is bool:
            if v.lower() in ("true", "1", "yes", "on"):
                return True
            if v.lower() in ("false", "0", "no", "off"):
                return False
            raise UserError(f"{where}: expected true or false, got {value!r}")
        try:
            value = tomllib.loads(f"v = {v}")["v"]
        except tomllib.TOMLDecodeError:
            if base is Any:
                return value
            raise UserError(f"{where}: expected {_type_name(tp)}, got {value!r}") from None
    if value is None and optional:
        return None
    if base is Any:
        return value
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
    elif base is str:
        ok = isinstance(value, str)
    else:
        origin = typing.get_origin(base) or base
        ok = isinstance(value, origin) if isinstance(origin, type) else True
    if not ok:
        raise UserError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------------------------------
# the config object


class RunConfig:
    """The loaded configuration: ``cfg["train"]`` is a ``TrainConfig``, ``cfg["data"]`` a dataclass or dict.

    ``explicit[section]`` is the set of keys the file or the command line set (to fill other defaults later,
    e.g. ``vocab_size`` from the data), ``path`` the TOML file (None when built from overrides only)."""

    def __init__(self, sections: dict[str, Any], values: dict[str, dict], path: Optional[Path],
                 classes: dict[str, Optional[type]]):
        self.sections = sections
        self.values = values
        self.path = path
        self.classes = classes

    @property
    def explicit(self) -> dict[str, set[str]]:
        return {k: set(v) for k, v in self.values.items()}

    def __getitem__(self, name: str) -> Any:
        return self.sections[name]

    def __contains__(self, name: str) -> bool:
        return name in self.sections

    def rebuild(self, section: str, **defaults: Any) -> Any:
        """Re-create ``section`` with new defaults under the explicitly set values (keeps ``__post_init__`` right)."""
        cls = self.classes[section]
        merged = {**defaults, **self.values.get(section, {})}
        self.sections[section] = cls(**merged) if cls is not None else merged
        return self.sections[section]

    def to_dict(self) -> dict[str, dict]:
        out = {}
        for name, obj in self.sections.items():
            out[name] = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj)
        return out


# other toolkits' names for our fields (nanoGPT, transformers): too far apart for difflib to pair them
_ALIASES = {"learning_rate": "lr", "max_iters": "max_steps", "num_train_steps": "max_steps",
            "gradient_accumulation_steps": "grad_accum", "per_device_train_batch_size": "batch_size",
            "warmup_iters": "warmup_steps", "max_grad_norm": "grad_clip", "context_length": "block_size"}


def did_you_mean(word: str, options) -> str:
    """`` (did you mean 'X'?)`` for the closest of ``options`` (keys, or ``--flags``), or ``""``."""
    dashes = word[: len(word) - len(word.lstrip("-"))]
    alias = _ALIASES.get(word.lstrip("-").replace("-", "_"))
    if alias is not None and dashes + alias in options:
        return f" (did you mean '{dashes + alias}'?)"
    hint = difflib.get_close_matches(word, sorted(options), n=1)
    return f" (did you mean '{hint[0]}'?)" if hint else ""



def load_config(
    path_or_name: str | Path | None,
    overrides: list[str] | list[tuple[str, str]] | dict[str, Any] | None = None,
    sections: dict[str, Optional[type]] | None = None,
    *,
    optional_sections: tuple[str, ...] = (),
) -> RunConfig:
    """Load a TOML preset (or nothing) + overrides into the given sections.

    sections: ``{"model": GPTConfig, "train": TrainConfig, "data": DataConfig, "notes": None}`` — ``None`` means a
        free-form table (any keys). Sections named in the file but not here are errors, except ``optional_sections``
        (kept as dicts: e.g. a stage-specific table another command reads).
    overrides: ``["--train.lr", "1e-3", "--max_steps=10"]`` tokens, ``[("train.lr", "1e-3")]`` pairs (strings are
        parsed and coerced), or ``{"train.lr": 1e-3}`` (values used as given).
    """
    sections = dict(sections or {})
    path = resolve_config_path(path_or_name) if path_or_name else None
    data = read_toml(path) if path else {}
    values: dict[str, dict] = {name: {} for name in sections}
    types_of = {name: (_field_types(cls) if cls is not None else None) for name, cls in sections.items()}

    for sec, table in data.items():
        if sec not in sections:
            if sec in optional_sections:
                continue
            if not isinstance(table, dict):
                raise UserError(f"{_key_line(path, '', sec)}: top-level key '{sec}' must be inside a [section] "
                                f"({', '.join('[' + s + ']' for s in sections)})")
            raise UserError(f"{_key_line(path, sec)}: unknown section [{sec}]{did_you_mean(sec, sections)}")
        if not isinstance(table, dict):
            raise UserError(f"{path}: '{sec}' must be a table [{sec}]")
        ftypes = types_of[sec]
        for key, val in table.items():
            where = f"{_key_line(path, sec, key)}: [{sec}] {key}"
            if ftypes is None:
                values[sec][key] = val
                continue
            if key not in ftypes:
                raise UserError(f"{_key_line(path, sec, key)}: [{sec}] unknown key '{key}'{did_you_mean(key, ftypes)}")
            values[sec][key] = coerce(val, ftypes[key], where)

    for key, raw, from_cli in _normalise_overrides(overrides):
        if "." in key:
            sec, name = key.split(".", 1)
            if sec not in sections:
                raise UserError(f"--{key}: unknown section '{sec}'{did_you_mean(sec, sections)}")
            targets = [sec]
            ftypes = types_of[sec]
            if ftypes is not None and name not in ftypes:
                raise UserError(f"--{key}: unknown key '{name}' in [{sec}]{did_you_mean(name, ftypes)}")
        else:
            name = key
            targets = [s for s, ft in types_of.items() if ft is not None and name in ft]
            if not targets:
                known = {k for ft in types_of.values() if ft for k in ft}
                raise UserError(f"--{key}: unknown option{did_you_mean(name, known)}")
        for sec in targets:
            ftypes = types_of[sec]
            tp = ftypes[name] if ftypes is not None else Any
            values[sec][name] = coerce(raw, tp, f"--{key}", from_cli=from_cli)

    built: dict[str, Any] = {}
    for sec, cls in sections.items():
        if cls is None:
            built[sec] = dict(values[sec])
            continue
        try:
            built[sec] = cls(**values[sec])
        except TypeError as e:  # a required field without a value
            raise UserError(f"{path or 'config'}: [{sec}] {e}") from None
    return RunConfig(built, values, path, sections)


def _normalise_overrides(overrides) -> list[tuple[str, Any, bool]]:
    if not overrides:
        return []
    if isinstance(overrides, dict):
        return [(k.replace("-", "_"), v, False) for k, v in overrides.items()]
    out = []
    items = list(overrides)
    if items and isinstance(items[0], (tuple, list)):
        return [(str(k).lstrip("-").replace("-", "_"), v, isinstance(v, str)) for k, v in items]
    i = 0
    while i < len(items):
        tok = str(items[i])
        if not tok.startswith("--"):
            raise UserError(f"unexpected argument {tok!r} (overrides look like --key value or --section.key value)")
        tok = tok[2:]
        if "=" in tok:
            key, val = tok.split("=", 1)
            i += 1
        elif i + 1 < len(items) and not str(items[i + 1]).startswith("--"):
            key, val = tok, str(items[i + 1])
            i += 2
        else:
            key, val = tok, "true"
            i += 1
        out.append((key.replace("-", "_"), val, True))
    return out


# --------------------------------------------------------------------------------------------------------------------
# command line


class _Override(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        lst = list(getattr(namespace, "config_overrides", None) or [])
        lst.append((self.metavar_key, "true" if values is None else values))
        namespace.config_overrides = lst


def add_config_arguments(parser: argparse.ArgumentParser, sections: dict[str, Optional[type]],
                         default_config: Optional[str] = None) -> None:
    """Add ``--config`` and one override option per dataclass field (``--key`` and ``--section.key``).

    Options the parser already defines are left alone (the stage's own meaning wins)."""
    parser.add_argument("--config", default=default_config, metavar="NAME|FILE",
                        help="TOML preset name (configs/NAME.toml) or path" +
                             (f" (default: {default_config})" if default_config else ""))
    parser.set_defaults(config_overrides=[])
    group = parser.add_argument_group("config overrides", "any config field: --key VALUE sets it in every section "
                                      "that has it; --section.key VALUE sets one section")
    seen: set[str] = set()
    existing = set(parser._option_string_actions)
    for sec, cls in sections.items():
        if cls is None:
            continue
        for name, tp in _field_types(cls).items():
            base, _ = _unwrap_optional(tp)
            nargs = "?" if base is bool else None
            for key, shown in ((f"{sec}.{name}", False), (name, True)):
                opts = [f"--{key}"]
                if "_" in key:
                    opts.append(f"--{key.replace('_', '-')}")
                opts = [o for o in opts if o not in existing and o not in seen]
                if not opts:
                    continue
                seen.update(opts)
                action = group.add_argument(*opts, action=_Override, nargs=nargs, dest="config_overrides",
                                            default=argparse.SUPPRESS, metavar="V",
                                            help=(f"[{sec}] {_type_name(tp)}" if shown else argparse.SUPPRESS))
                action.metavar_key = key


def add_resume_arguments(parser: argparse.ArgumentParser) -> None:
    """``--resume`` / ``--restart``, the same for every training command (default: resume when RUN/ckpt exists)."""
    parser.add_argument("--resume", action="store_true",
                        help="require a checkpoint in RUN/ckpt to resume from (by default a run resumes when one exists)")
    parser.add_argument("--restart", "--fresh", dest="restart", action="store_true",
                        help="ignore a checkpoint in RUN/ckpt and start over")


def resume_from_args(args: argparse.Namespace) -> Optional[bool]:
    """The Trainer's ``resume``: True (required), False (start over) or None (automatic)."""
    if args.resume and args.restart:
        raise UserError("--resume and --restart exclude each other")
    return True if args.resume else (False if args.restart else None)


def config_from_args(args: argparse.Namespace, sections: dict[str, Optional[type]], **kw) -> RunConfig:
    return load_config(getattr(args, "config", None), getattr(args, "config_overrides", None) or [], sections, **kw)


# --------------------------------------------------------------------------------------------------------------------
# writing TOML (for run_config.toml)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
            return {"nan": "nan", "inf": "inf", "-inf": "-inf"}[repr(v)]
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + " }"
    return json.dumps(str(v))


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def dump_toml(config: dict[str, Any]) -> str:
    """``{section: {key: value}}`` as TOML; ``None`` values are written as comments (TOML has no null)."""
    lines = []
    top = {k: v for k, v in config.items() if not isinstance(v, dict)}
    for k, v in top.items():
        if v is not None:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    for sec, table in config.items():
        if not isinstance(table, dict):
            continue
        if lines:
            lines.append("")
        lines.append(f"[{_toml_key(sec)}]")
        for k, v in table.items():
            if v is None:
                lines.append(f"# {k} = (none)")
            else:
                lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"
