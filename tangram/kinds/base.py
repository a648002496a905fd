"""What every resource kind provides to the registry: its pool configuration model and a
factory that builds its manager from it; and the helpers the kinds share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from tangram.core.managers.base import Manager


class ConfigError(ValueError):
    """The configuration file is malformed; the message names the field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True, slots=True)
class Kind:
    """A resource kind: ``manager`` its class, ``model`` its pool's configuration (a
    pydantic model whose ``kind`` field is ``Literal[name]``), ``build(pool name,
    validated model)`` makes its manager (ConfigError for what the schema alone cannot
    see)."""

    name: str
    manager: type[Manager]
    model: type[BaseModel]
    build: Callable[[str, Any], Manager]


def node_names(base: str | None, default: str, count: int) -> list[str]:
    root = base or default
    return [root] if count == 1 else [f"{root}-{i}" for i in range(count)]


def unique(pool: str, names: list[str]) -> None:
    if len(set(names)) != len(names):
        raise ConfigError(f"pool {pool}: node names must be unique, got {names}")
