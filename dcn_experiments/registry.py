"""One registry mechanism for every pluggable component (models, convs, datasets, tasks).

A registry maps a name, which is also the option name of the matching ``conf/`` group, to a
builder callable. Builders are registered with the ``@REGISTRY.register("name")`` decorator right
where they are defined; each room's ``__init__.py`` imports its modules explicitly so the
decorators run.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from dcn_experiments.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])


class Registry(Mapping[str, Callable[..., Any]]):
    """A named mapping from option names to builders.

    ``contract`` documents what a registered builder takes and returns; it is shown in ``repr``
    and in error messages so that a user adding an entry knows what to write.
    """

    def __init__(self, kind: str, contract: str) -> None:
        self.kind = kind
        self.contract = contract
        self._entries: dict[str, Callable[..., Any]] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[F], F]:
        """Decorator registering ``fn`` under ``name`` with optional metadata (e.g. ``task=``)."""

        def decorator(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice ({self._entries[name]} and {fn})")
            self._entries[name] = fn
            self._meta[name] = dict(meta)
            return fn

        return decorator

    def get(self, name: str) -> Callable[..., Any]:  # type: ignore[override]
        """Return the builder registered as ``name``; unknown names raise ``ConfigError``."""
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "none"
            raise ConfigError(f"unknown {self.kind} {name!r}; known {self.kind}s: {known}")
        return self._entries[name]

    def meta(self, name: str) -> dict[str, Any]:
        """Return the metadata given at registration of ``name``."""
        self.get(name)
        return self._meta[name]

    def build(self, name: str, /, **kwargs: Any) -> Any:
        """Call the builder ``name`` with ``kwargs``, dropping ``None`` values so YAML can say null.

        Keys the builder does not take raise ``ConfigError`` naming them and the accepted keys.
        """
        builder = self.get(name)
        parameters = inspect.signature(builder).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            unknown = sorted(set(kwargs) - set(parameters))
            if unknown:
                accepted = ", ".join(k for k, p in parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL)
                raise ConfigError(
                    f"{self.kind}={name} does not take {', '.join(f'{self.kind}.{k}' for k in unknown)} "
                    f"(accepted: {accepted}); remove it, or the experiment= config that sets it"
                )
        return builder(**{k: v for k, v in kwargs.items() if v is not None})

    def __getitem__(self, name: str) -> Callable[..., Any]:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {sorted(self._entries)}; {self.contract})"
