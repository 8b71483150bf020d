"""CLI options made from config fields: the field's description is the flag's help, its type the flag's type (the
values of a Literal its choices), so an option is documented once, in chatforge/config.py.

Use it like this (in a command module)::

    TRAIN_OPTIONS = ConfigOptions(TrainConfig, [
        field_option("lr"),                      # --lr: help, type and checks from TrainConfig.lr
        field_option("lora.r", "--lora-r"),      # a nested field under today's flag name
        field_option("out", "--out", "-o"),      # with a short alias
    ])

    @app.command("train")
    @TRAIN_OPTIONS.add_to                        # below @app.command: adds one keyword parameter per option
    def train_command(config: ConfigOption = None, **options: Any) -> None:
        cfg = merge_overrides(load_project(config).train, TRAIN_OPTIONS.overrides(options))

    device: Annotated[str | None, config_option(TrainConfig, "device")] = None    # one option in a signature

Adding an option is adding a field with a description and one `field_option` line. Every option defaults to None,
"not given": the project file's value, else the field's default, stays. A bool field becomes `--x/--no-x`.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

Command = TypeVar("Command", bound=Callable[..., Any])

# (config model, dotted field) of every option made here: tests check that each one has a description.
EXPOSED_FIELDS: list[tuple[type[BaseModel], str]] = []
SCALARS = (bool, int, float, str)


@dataclass(frozen=True)
class FieldOption:
    """A flag that sets `field` (and the fields in `also_sets`); `note` follows the field's description in --help."""

    field: str
    flags: tuple[str, ...]
    also_sets: tuple[str, ...] = ()
    note: str = ""

    @property
    def parameter_name(self) -> str:
        """The keyword the command receives it under: `--lora-r` -> `lora_r`."""
        return self.flags[0].lstrip("-").replace("-", "_")


def field_option(field: str, *flags: str, also_sets: tuple[str, ...] = (), note: str = "") -> FieldOption:
    """The option for `field` (dotted: "lora.r"); flags default to `--FIELD` with dashes ("max_length" -> --max-length)."""
    return FieldOption(field, flags or ("--" + field.replace("_", "-"),), also_sets, note)


def config_field(model: type[BaseModel], dotted: str) -> FieldInfo:
    """The pydantic field behind `dotted` in `model` ("generation.top_p" walks into EvalConfig.generation)."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        model = model.model_fields[part].annotation  # type: ignore[assignment]  (a nested section's model)
    return model.model_fields[leaf]


def option_type(info: FieldInfo) -> Any:
    """The flag's type: the field's own when the CLI can parse it (a scalar, a Literal, a list of scalars), else
    str, which the field's validator parses (split.ratios takes "80/10/10"); always optional (None = not given)."""
    return _parsed_type(info) | None


def _parsed_type(info: FieldInfo) -> Any:
    annotation = info.annotation
    if get_origin(annotation) in (Union, types.UnionType):
        members = [member for member in get_args(annotation) if member is not type(None)]
        annotation = members[0] if len(members) == 1 else str
    parseable = (annotation in SCALARS or get_origin(annotation) is Literal
                 or (get_origin(annotation) is list and get_args(annotation)[0] in SCALARS))
    return annotation if parseable else str


def config_option(model: type[BaseModel], field: str, *flags: str, note: str = "") -> Any:
    """`Annotated[type | None, typer.Option(...)]` for one field, for a command that declares its options itself."""
    return _annotation(model, field_option(field, *flags, note=note))


def _annotation(model: type[BaseModel], option: FieldOption) -> Any:
    info = config_field(model, option.field)
    EXPOSED_FIELDS.extend((model, field) for field in (option.field, *option.also_sets))
    flags = option.flags
    if _parsed_type(info) is bool:
        flags = (f"{flags[0]}/--no-{flags[0].removeprefix('--')}", *flags[1:])
    help_text = " ".join(part for part in (info.description or "", option.note) if part)
    return Annotated[option_type(info), typer.Option(*flags, help=help_text)]


class ConfigOptions:
    """The options one command takes from one config model; see the module docstring."""

    def __init__(self, model: type[BaseModel], options: list[FieldOption]) -> None:
        self.model = model
        self.options = options
        self.parameters = [inspect.Parameter(option.parameter_name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                             annotation=_annotation(model, option)) for option in options]

    def add_to(self, command: Command) -> Command:
        """Decorator: the command's signature (what typer reads) gets these options in place of its `**options`."""
        signature = inspect.signature(command, eval_str=True)
        declared = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        clash = {p.name for p in declared} & {p.name for p in self.parameters}
        if clash:
            raise ValueError(f"{command.__name__}: parameters {sorted(clash)} are declared and made from config fields")
        command.__signature__ = signature.replace(parameters=[*declared, *self.parameters])  # type: ignore[attr-defined]
        return command

    def overrides(self, given: dict[str, Any]) -> dict[str, Any]:
        """Dotted field -> value for `merge_overrides` (None = not given, so the file's value or the default stays)."""
        return {field: given.get(option.parameter_name)
                for option in self.options for field in (option.field, *option.also_sets)}
