"""What every config section shares: the strict base model, PII settings, the device spec and config errors.

Use it like this (in a config module)::

    class ThingConfig(StrictModel):
        pii: PiiConfig = PiiConfig()
        device: DeviceSpec = Field(default="auto", description=DEVICE_HELP)

    cfg = merge_overrides(ThingConfig(), {"pii.enabled": False})   # ConfigError names the field

`chatforge.config` re-exports all of it, so `from chatforge.config import PiiConfig` keeps working.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are an error, so a typo in chatforge.yaml never passes silently."""

    model_config = ConfigDict(extra="forbid")


PII_TYPES = ["EMAIL", "PHONE", "CREDIT_CARD", "IBAN", "IP_ADDRESS", "URL_CREDENTIALS", "API_KEY", "SSN", "PERSON"]


class PiiConfig(StrictModel):
    enabled: bool = Field(default=True, description="redact PII and secrets")
    types: list[str] = Field(
        default=[t for t in PII_TYPES if t != "PERSON"], description=f"which of {PII_TYPES} to redact"
    )
    person_names: bool = Field(default=False, description="detect person names with Presidio (when installed)")

    @field_validator("types")
    @classmethod
    def _known_types(cls, types: list[str]) -> list[str]:
        unknown = sorted(set(types) - set(PII_TYPES))
        if unknown:
            raise ValueError(f"unknown PII types {unknown}; known: {PII_TYPES}")
        return types


DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
DEVICE_SPEC = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,3})?)$")


def check_device_spec(spec: str) -> str:
    """`spec` lower-cased if it names a device kind (see chatforge.device); else ValueError."""
    normalised = spec.strip().lower()
    if not DEVICE_SPEC.match(normalised):
        raise ValueError(f"device {spec!r}: expected {DEVICE_CHOICES}")
    return normalised


DeviceSpec = Annotated[str, AfterValidator(check_device_spec)]
DEVICE_HELP = "where the model runs: auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps"


class ConfigError(ValueError):
    """A config file or flag is wrong; the message names the file and the field."""


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: 'prepare.split.ratios: split '1/2': expected three numbers'."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"])
        lines.append(f"{where}: {err['msg']}")
    return "; ".join(lines)


def merge_overrides(cfg: BaseModel, overrides: dict[str, Any]) -> Any:
    """Return a copy of cfg with dotted-path overrides applied (`{"fit.max_tokens": 512}`); None values are ignored."""
    data = cfg.model_dump()
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    try:
        return type(cfg).model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
