"""Typed run configurations (a pydantic model per TOML table), presets, overrides; errors name file:LINE or --flag."""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, TypeAdapter, ValidationError

from .errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - tomli is a core dependency on 3.10
    import tomli as tomllib

# in the package (the repository's configs/ links here): `--config NAME` works anywhere, from any kind of install
PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"


class FieldError(ValueError):  # raised by a Config's cross-field rule: the message is about ``field``
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# a list of file paths / names; one string is a list of one
StrList = Annotated[list[str], BeforeValidator(lambda v: [v] if isinstance(v, str) else v)]


class Config(BaseModel):
    """A stage's options (one TOML section, ``section``): typed, constrained fields; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    section: ClassVar[str] = "config"

    def to_dict(self) -> dict:
        return self.model_dump()

    @classmethod
    def from_dict(cls, values: dict, where: str = "", origin: Optional[dict] = None):
        """Validate ``values`` as given (strict); an error names the field and ``origin[field]`` (or ``where``)."""
        for key in values:
            if key not in cls.model_fields:
                raise UserError(f"{(origin or {}).get(key) or where or 'config'}: unknown {cls.section} field "
                                f"'{key}'{did_you_mean(key, cls.model_fields)}")
        try:
            return cls.model_validate(values, strict=True)
        except ValidationError as e:
            raise UserError(explain(e.errors()[0], cls.section, where, origin)) from None


_MESSAGES = {"int_type": "expected int", "int_parsing": "expected int", "int_from_float": "expected int",
             "float_type": "expected float", "float_parsing": "expected float", "string_type": "expected a string",
             "bool_type": "expected true or false", "bool_parsing": "expected true or false",
             "list_type": "expected a list", "missing": "is required", "literal_error": "must be one of {expected}",
             "greater_than": "must be > {gt}", "greater_than_equal": "must be at least {ge}",
             "less_than": "must be < {lt}", "less_than_equal": "must be at most {le}"}


def explain(err: dict, section: str, where: str = "", origin: Optional[dict] = None) -> str:
    """One line for a pydantic error: ``path:LINE: [section] field: message, got VALUE`` (or ``--flag: ...``)."""
    ctx = err.get("ctx") or {}
    field = ".".join(str(x) for x in err["loc"][:1])
    if isinstance(ctx.get("error"), FieldError):
        field, message = ctx["error"].field, str(ctx["error"])
    else:
        message = _MESSAGES.get(err["type"], err["msg"]).format(**ctx) + f", got {err['input']!r}"
    at = (origin or {}).get(field) or where
    return f"{at}: {message}" if at.startswith("--") else f"{at + ': ' if at else ''}[{section}] {field}: {message}"


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A TOML file, or a preset name looked up in ./configs (your own presets), then in pocketgpt's bundled ones."""
    p = Path(name_or_path)
    if p.exists():
        if p.is_dir():
            raise UserError(f"--config: {p} is a directory, expected a .toml file")
        return p
    name = p.name.removesuffix(".toml")
    dirs = [d for d in dict.fromkeys([Path.cwd() / "configs", PACKAGE_CONFIGS]) if d.is_dir()]
    found = [d / f"{name}.toml" for d in dirs if (d / f"{name}.toml").exists()]
    if found and p.parent in (Path("."), Path("configs")):
        return found[0]
    presets = sorted({f.stem for d in dirs for f in d.glob("*.toml")})
    extra = did_you_mean(name, presets) or (f" (presets: {', '.join(presets)})" if presets else "")
    raise UserError(f"--config: {name_or_path}: no such file or preset{extra}")


def read_toml(path: str | Path) -> dict:
    from .io import read_text

    try:
        return tomllib.loads(read_text(path))
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        raise UserError(f"{path}{':' + m.group(1) if m else ''}: invalid TOML ({str(e).split(' (at')[0]})") from None


def _key_lines(path: Path) -> dict[tuple[str, Optional[str]], str]:
    """``{(section, key): "path:LINE"}`` for the keys of a TOML file (key None: the section's header)."""
    lines, section = {}, ""
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if m := re.match(r"\s*\[\s*([^\]\s]+)\s*\]", line):
            section = m.group(1).strip("\"'")
            lines.setdefault((section, None), f"{path}:{i}")
        elif m := re.match(r"\s*[\"']?([^\"'=\s]+)[\"']?\s*=", line):
            lines.setdefault((section, m.group(1)), f"{path}:{i}")
    return lines


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Literal:
        return "|".join(map(str, args))
    if type(None) in typing.get_args(tp):
        return f"{_type_name(args[0])} or none"
    return getattr(tp, "__name__", str(tp))


def _convert(raw: Any, tp: Any, flag: str) -> Any:
    """An override given as a string (or strings) converted to the field's type; constraints are checked later."""
    if isinstance(raw, str) and raw.strip().lower() in ("none", "null") and type(None) in typing.get_args(tp):
        return None
    if isinstance(raw, str) and typing.get_origin(tp) is list:
        raw = [raw]
    try:
        return TypeAdapter(tp).validate_python(raw)
    except ValidationError as e:
        raise UserError(explain(e.errors()[0], "", flag)) from None


@dataclass
class RunConfig:
    """``cfg["train"]``: a ``TrainConfig``; ``values[section]``: what the file or command line set (for rebuild)."""

    sections: dict[str, Config]
    values: dict[str, dict]
    path: Optional[Path]
    classes: dict[str, type]
    origin: dict[str, dict]

    @property
    def explicit(self) -> dict[str, set[str]]:
        return {k: set(v) for k, v in self.values.items()}

    def __getitem__(self, name: str) -> Any:
        return self.sections[name]

    def rebuild(self, section: str, **defaults: Any) -> Config:
        """Re-create ``section`` with new defaults under the explicitly set values."""
        merged = {**defaults, **self.values[section]}
        self.sections[section] = self.classes[section].from_dict(merged, str(self.path or ""), self.origin[section])
        return self.sections[section]

    def to_dict(self) -> dict[str, dict]:
        return {name: obj.to_dict() for name, obj in self.sections.items()}


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


def load_config(path_or_name: str | Path | None, overrides: list | dict | None = None,
                sections: dict[str, type] | None = None, *, defaults: dict[str, dict] | None = None) -> RunConfig:
    """A TOML preset (or nothing) + overrides as ``sections`` (``{"train": TrainConfig}``); overrides: ``["--lr",
    "1e-3", "--train.max_steps=10"]``, ``[("train.lr", "1e-3", "--flag")]`` or ``{"train.lr": 1e-3}`` (a bare key sets
    every section that has it). ``defaults``: ``{"train": {...}}``, under what the file and the overrides set."""
    sections = dict(sections or {})
    path = resolve_config_path(path_or_name) if path_or_name else None
    data, lines = (read_toml(path), _key_lines(path)) if path else ({}, {})
    values, origin = {name: {} for name in sections}, {name: {} for name in sections}

    for sec, table in data.items():
        if sec not in sections:
            if not isinstance(table, dict):
                raise UserError(f"{lines.get(('', sec), path)}: top-level key '{sec}' must be inside a [section] "
                                f"({', '.join('[' + s + ']' for s in sections)})")
            raise UserError(f"{lines.get((sec, None), path)}: unknown section [{sec}]{did_you_mean(sec, sections)}")
        if not isinstance(table, dict):
            raise UserError(f"{path}: '{sec}' must be a table [{sec}]")
        values[sec], origin[sec] = table, {key: lines.get((sec, key), str(path)) for key in table}
        for key in table:
            if key not in sections[sec].model_fields:
                raise UserError(f"{origin[sec][key]}: [{sec}] unknown key '{key}'"
                                f"{did_you_mean(key, sections[sec].model_fields)}")

    for key, raw, flag in _overrides(overrides):
        sec, _, name = key.rpartition(".")
        if sec and sec not in sections:
            raise UserError(f"--{key}: unknown section '{sec}'{did_you_mean(sec, sections)}")
        if sec and name not in sections[sec].model_fields:
            raise UserError(f"--{key}: unknown key '{name}' in [{sec}]{did_you_mean(name, sections[sec].model_fields)}")
        targets = [sec] if sec else [s for s, cls in sections.items() if name in cls.model_fields]
        if not targets:
            known = {k for cls in sections.values() for k in cls.model_fields}
            raise UserError(f"--{key}: unknown option{did_you_mean(name, known)}")
        for s in targets:
            tp = sections[s].model_fields[name].annotation
            values[s][name] = _convert(raw, tp, flag) if isinstance(raw, (str, list)) else raw
            origin[s][name] = flag

    cfg = RunConfig({}, values, path, sections, origin)
    for sec in sections:
        cfg.rebuild(sec, **(defaults or {}).get(sec, {}))
    return cfg


def _overrides(overrides) -> list[tuple[str, Any, str]]:
    """``(key, value, --flag as typed)`` of each override."""
    items = [(k, v, f"--{k}") for k, v in overrides.items()] if isinstance(overrides, dict) else list(overrides or [])
    if items and isinstance(items[0], tuple):
        return [(k.lstrip("-").replace("-", "_"), v, flag) for k, v, flag in items]
    out = []
    while items:
        tok = str(items.pop(0))
        if not tok.startswith("--"):
            raise UserError(f"unexpected argument {tok!r} (overrides look like --key value or --section.key value)")
        key, eq, val = tok[2:].partition("=")
        if not eq:
            val = str(items.pop(0)) if items and not str(items[0]).startswith("--") else "true"
        out.append((key.replace("-", "_"), val, f"--{key}"))
    return out


class _Override(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        namespace.config_overrides = [*getattr(namespace, "config_overrides", []), (self.dest, values, option_string)]


def add_config_arguments(parser: argparse.ArgumentParser, sections: dict[str, type],
                         default_config: Optional[str] = None, aliases: Optional[dict[str, list[str]]] = None) -> None:
    """``--config`` and per field ``--key``, ``--section.key``, ``aliases[key]`` (an option the parser has wins)."""
    parser.add_argument("--config", default=default_config, metavar="NAME|FILE",
                        help="TOML preset name (configs/NAME.toml) or path" +
                             (f" (default: {default_config})" if default_config else ""))
    parser.set_defaults(config_overrides=[])
    group = parser.add_argument_group("config overrides", "any config field: --key VALUE sets it in every section "
                                      "that has it; --section.key VALUE sets one section")
    taken = set(parser._option_string_actions)
    for sec, cls in sections.items():
        for name, info in cls.model_fields.items():
            tp = info.annotation
            nargs = "?" if tp is bool else ("+" if typing.get_origin(tp) is list else None)
            help_text = f"[{sec}] {_type_name(tp)}" + (f": {info.description}" if info.description else "")
            for key, extra in ((f"{sec}.{name}", []), (name, (aliases or {}).get(name, []))):
                opts = [o for o in dict.fromkeys([f"--{key}", f"--{key.replace('_', '-')}", *extra]) if o not in taken]
                if opts:  # the override's key is its dest; a bool given bare is "true"
                    taken.update(opts)
                    group.add_argument(*opts, action=_Override, nargs=nargs, const="true", dest=key, metavar="V",
                                       default=argparse.SUPPRESS, help=help_text if key == name else argparse.SUPPRESS)


def dump_toml(config: dict[str, Any]) -> str:
    """``{section: {key: value}}`` as TOML (``tomli_w``); ``None`` values are left out (TOML has no null)."""
    import tomli_w

    def drop_none(d):
        return {k: drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}

    return tomli_w.dumps(drop_none(config))
