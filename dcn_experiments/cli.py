"""Turn user errors into one line on stderr and exit code 2 (no traceback)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from dcn_experiments.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])


def one_line(error: BaseException) -> str:
    """The error's message on one line (re-raised DataLoader worker errors keep only the cause)."""
    text = str(error).strip()
    if "Original Traceback" in text:  # raised inside a DataLoader worker
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())


def exit_on_user_error(fn: F) -> F:
    """Decorator: a ``UserError`` (also one re-raised from a DataLoader worker) exits with code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as error:
            print(f"error: {one_line(error)}", file=sys.stderr)
            sys.exit(2)
        except RuntimeError as error:
            if "Caught DataError" in str(error) or "Caught ConfigError" in str(error):
                print(f"error: {one_line(error)}", file=sys.stderr)
                sys.exit(2)
            raise

    return wrapper  # type: ignore[return-value]
