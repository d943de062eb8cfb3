"""Typed run configurations: one pydantic model per stage, TOML presets, command-line overrides.

A config file has one table per section, each a ``Config`` model (or a free-form dict)::

    # configs/shakespeare-char.toml
    [model]              # GPTConfig fields
    n_layer = 6
    [train]              # TrainConfig fields
    max_steps = 2000
    [data]               # the stage's data options
    dir = "data/shakespeare-char"

A ``Config`` declares its fields with their constraints (``int = Field(1000, gt=0)``, ``Literal[...]``) and its
cross-field rules in a ``model_validator``; a rule names its field by raising ``FieldError(field, message)``.
``load_config(name_or_path, overrides, sections={"model": GPTConfig, "train": TrainConfig, "data": DataConfig})``
reads a preset (``configs/NAME.toml`` or a path), applies overrides (``--key value`` or ``--section.key value``; a bare
key sets every section that has it, e.g. ``--block_size 128`` sets both ``[model]`` and ``[data]``), and turns any
error into one ``UserError`` line naming the file:line (or the ``--flag``) and the field; unknown sections/keys get a
did-you-mean. ``add_config_arguments(parser, sections)`` generates ``--config`` and one option per field;
``config_from_args(args, sections)`` returns the ``RunConfig``.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, TypeAdapter, ValidationError

from .errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The presets ship inside the package (the repository's top-level configs/ is a link to this folder), so
# `--config NAME` works from any directory and from a non-editable install.
PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"


class FieldError(ValueError):
    """Raised by a ``Config``'s cross-field rule: the message is about ``field``."""

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
    def from_dict(cls, values: dict, where: str = "", origin: Optional[dict] = None, strict: bool = True):
        """Validate ``values`` (from a file: types are not converted); errors are one ``UserError`` line naming
        ``where`` (or the field's entry in ``origin``: ``path:LINE`` or ``--flag``) and the field."""
        origin = origin or {}
        for key in values:
            if key not in cls.model_fields:
                raise UserError(f"{origin.get(key) or where or 'config'}: unknown {cls.section} field "
                                f"'{key}'{did_you_mean(key, cls.model_fields)}")
        try:
            return cls.model_validate(values, strict=strict)
        except ValidationError as e:
            raise UserError(explain(e.errors()[0], cls.section, where, origin)) from None


_MESSAGES = {"int_type": "expected int", "int_parsing": "expected int", "int_from_float": "expected int",
             "float_type": "expected float", "float_parsing": "expected float", "bool_type": "expected true or false",
             "bool_parsing": "expected true or false", "string_type": "expected a string", "list_type": "expected a list",
             "greater_than": "must be > {gt}", "greater_than_equal": "must be at least {ge}",
             "less_than": "must be < {lt}", "less_than_equal": "must be at most {le}",
             "literal_error": "must be one of {expected}", "missing": "is required"}


def explain(err: dict, section: str, where: str = "", origin: Optional[dict] = None) -> str:
    """One line for a pydantic error: ``path:LINE: [section] field: message, got VALUE`` (or ``--flag: ...``)."""
    ctx = err.get("ctx") or {}
    field = ".".join(str(x) for x in err["loc"][:1])
    if isinstance(ctx.get("error"), FieldError):
        field, message = ctx["error"].field, str(ctx["error"])
    else:
        message = _MESSAGES.get(err["type"], err["msg"]).format(**ctx) + f", got {err['input']!r}"
    at = (origin or {}).get(field) or where
    if at.startswith("--"):
        return f"{at}: {message}"
    return f"{at + ': ' if at else ''}[{section}] {field}: {message}"


def config_dirs() -> list[Path]:
    """Where preset names are looked up: ./configs (your own presets), then pocketgpt's bundled presets."""
    return list(dict.fromkeys([Path.cwd() / "configs", PACKAGE_CONFIGS]))


def list_presets() -> list[str]:
    return sorted({p.stem for d in config_dirs() if d.is_dir() for p in d.glob("*.toml")})


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
            if (d / f"{name}.toml").exists():
                return d / f"{name}.toml"
    presets = list_presets()
    hint = difflib.get_close_matches(name, presets, n=1)
    extra = f" (did you mean '{hint[0]}'?)" if hint else (f" (presets: {', '.join(presets)})" if presets else "")
    raise UserError(f"--config: {name_or_path}: no such file or preset{extra}")


def read_toml(path: str | Path) -> dict:
    from .io import read_text

    path = Path(path)
    try:
        return tomllib.loads(read_text(path))
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        where = f"{path}:{m.group(1)}" if m else str(path)
        raise UserError(f"{where}: invalid TOML ({str(e).split(' (at')[0]})") from None


def _key_line(path: Optional[Path], section: str, key: Optional[str] = None) -> str:
    """``path:LINE`` of ``key`` inside ``[section]`` (or of the section header), best effort."""
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
        elif key is not None and current == section and re.match(rf"^[\"']?{re.escape(key)}[\"']?\s*=", s):
            return f"{path}:{i}"
    return str(path)


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Literal:
        return "|".join(map(str, args))
    if type(None) in typing.get_args(tp):
        return f"{_type_name(args[0])} or none"
    return getattr(tp, "__name__", str(tp))


def _from_cli(raw: Any, tp: Any, flag: str) -> Any:
    """A command-line string (or list of strings) converted to the field's type; constraints are checked later."""
    if isinstance(raw, str) and raw.strip().lower() in ("none", "null") and type(None) in typing.get_args(tp):
        return None
    if isinstance(raw, str) and typing.get_origin(tp) is list:
        raw = [raw]
    try:
        return TypeAdapter(tp).validate_python(raw)
    except ValidationError as e:
        raise UserError(explain(e.errors()[0], "", flag)) from None


# --------------------------------------------------------------------------------------------------------------------
# the config object


class RunConfig:
    """The loaded configuration: ``cfg["train"]`` is a ``TrainConfig``, ``cfg["data"]`` a ``Config`` or dict.

    ``explicit[section]`` is the set of keys the file or the command line set (to fill other defaults later,
    e.g. ``vocab_size`` from the data), ``path`` the TOML file (None when built from overrides only)."""

    def __init__(self, sections: dict[str, Any], values: dict[str, dict], path: Optional[Path],
                 classes: dict[str, Optional[type]], origin: dict[str, dict]):
        self.sections, self.values, self.path, self.classes, self.origin = sections, values, path, classes, origin

    @property
    def explicit(self) -> dict[str, set[str]]:
        return {k: set(v) for k, v in self.values.items()}

    def __getitem__(self, name: str) -> Any:
        return self.sections[name]

    def __contains__(self, name: str) -> bool:
        return name in self.sections

    def rebuild(self, section: str, **defaults: Any) -> Any:
        """Re-create ``section`` with new defaults under the explicitly set values."""
        cls, merged = self.classes[section], {**defaults, **self.values.get(section, {})}
        self.sections[section] = (cls.from_dict(merged, str(self.path or ""), self.origin.get(section))
                                  if cls is not None else merged)
        return self.sections[section]

    def to_dict(self) -> dict[str, dict]:
        return {name: obj.to_dict() if isinstance(obj, Config) else dict(obj) for name, obj in self.sections.items()}


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
    defaults: dict[str, dict] | None = None,
) -> RunConfig:
    """Load a TOML preset (or nothing) + overrides into the given sections.

    sections: ``{"model": GPTConfig, "train": TrainConfig, "data": DataConfig, "notes": None}`` — ``None`` means a
        free-form table (any keys). Sections named in the file but not here are errors, except ``optional_sections``
        (kept as dicts: e.g. a stage-specific table another command reads).
    overrides: ``["--train.lr", "1e-3", "--max_steps=10"]`` tokens, ``[("train.lr", "1e-3")]`` pairs (strings are
        converted to the field's type), or ``{"train.lr": 1e-3}`` (values used as given).
    defaults: ``{"train": {...}}``, a command's own defaults under what the file and the overrides set.
    """
    sections = dict(sections or {})
    path = resolve_config_path(path_or_name) if path_or_name else None
    data = read_toml(path) if path else {}
    values: dict[str, dict] = {name: {} for name in sections}
    origin: dict[str, dict] = {name: {} for name in sections}
    fields_of = {name: (cls.model_fields if cls is not None else None) for name, cls in sections.items()}

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
        for key, val in table.items():
            if fields_of[sec] is not None and key not in fields_of[sec]:
                raise UserError(f"{_key_line(path, sec, key)}: [{sec}] unknown key '{key}'"
                                f"{did_you_mean(key, fields_of[sec])}")
            values[sec][key] = val
            origin[sec][key] = _key_line(path, sec, key)

    for key, raw, from_cli, flag in _normalise_overrides(overrides):
        sec, _, name = key.rpartition(".")
        if sec and sec not in sections:
            raise UserError(f"--{key}: unknown section '{sec}'{did_you_mean(sec, sections)}")
        if sec and fields_of[sec] is not None and name not in fields_of[sec]:
            raise UserError(f"--{key}: unknown key '{name}' in [{sec}]{did_you_mean(name, fields_of[sec])}")
        targets = [sec] if sec else [s for s, f in fields_of.items() if f is not None and name in f]
        if not targets:
            known = {k for f in fields_of.values() if f for k in f}
            raise UserError(f"--{key}: unknown option{did_you_mean(name, known)}")
        for s in targets:
            val = raw
            if from_cli and fields_of[s] is not None:
                val = _from_cli(raw, fields_of[s][name].annotation, flag)
            values[s][name] = val
            origin[s][name] = flag

    built: dict[str, Any] = {}
    for sec, cls in sections.items():
        merged = {**(defaults or {}).get(sec, {}), **values[sec]}
        built[sec] = cls.from_dict(merged, str(path or ""), origin[sec]) if cls is not None else merged
    return RunConfig(built, values, path, sections, origin)


def _normalise_overrides(overrides) -> list[tuple[str, Any, bool, str]]:
    """``(key, value, from the command line, --flag as typed)`` of each override."""
    if not overrides:
        return []
    if isinstance(overrides, dict):
        return [(k.replace("-", "_"), v, False, f"--{k}") for k, v in overrides.items()]
    items = list(overrides)
    if items and isinstance(items[0], (tuple, list)):
        return [(str(k).lstrip("-").replace("-", "_"), v, isinstance(v, (str, list)),
                 flag[0] if flag else "--" + str(k).lstrip("-")) for k, v, *flag in items]
    out, i = [], 0
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
        out.append((key.replace("-", "_"), val, True, f"--{key}"))
    return out


# --------------------------------------------------------------------------------------------------------------------
# command line


class _Override(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        lst = list(getattr(namespace, "config_overrides", None) or [])
        lst.append((self.key, "true" if values is None else values, option_string))
        namespace.config_overrides = lst


def add_config_arguments(parser: argparse.ArgumentParser, sections: dict[str, Optional[type]],
                         default_config: Optional[str] = None, aliases: Optional[dict[str, list[str]]] = None) -> None:
    """Add ``--config`` and one override option per field (``--key``, ``--section.key`` and ``aliases[key]``).

    Options the parser already defines are left alone (the command's own meaning wins)."""
    parser.add_argument("--config", default=default_config, metavar="NAME|FILE",
                        help="TOML preset name (configs/NAME.toml) or path" +
                             (f" (default: {default_config})" if default_config else ""))
    parser.set_defaults(config_overrides=[])
    group = parser.add_argument_group("config overrides", "any config field: --key VALUE sets it in every section "
                                      "that has it; --section.key VALUE sets one section")
    taken = set(parser._option_string_actions)
    for sec, cls in sections.items():
        for name, info in (cls.model_fields.items() if cls is not None else ()):
            tp = info.annotation
            nargs = "?" if tp is bool else ("+" if typing.get_origin(tp) is list else None)
            for key, shown in ((f"{sec}.{name}", False), (name, True)):
                opts = [f"--{key}", f"--{key.replace('_', '-')}"] + ((aliases or {}).get(key, []) if shown else [])
                opts = [o for o in dict.fromkeys(opts) if o not in taken]
                if not opts:
                    continue
                taken.update(opts)
                help_text = f"[{sec}] {_type_name(tp)}" + (f": {info.description}" if info.description else "")
                action = group.add_argument(*opts, action=_Override, nargs=nargs, dest="config_overrides",
                                            default=argparse.SUPPRESS, metavar="V",
                                            help=help_text if shown else argparse.SUPPRESS)
                action.key = key


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


def dump_toml(config: dict[str, Any]) -> str:
    """``{section: {key: value}}`` as TOML (``tomli_w``); ``None`` values are left out (TOML has no null)."""
    import tomli_w

    def drop_none(d):
        return {k: drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}

    return tomli_w.dumps(drop_none(config))
