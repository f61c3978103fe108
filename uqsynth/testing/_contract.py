"""What every contract suite shares: run all checks, or one pytest item per check."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

Check = Callable[[Callable[[], object]], None]


def run_checks(checks: Sequence[Check], factory: Callable[[], object], name: str) -> None:
    """Run ``checks`` on ``factory``; the first failure names the check and ``name``."""
    for check in checks:
        try:
            check(factory)
        except AssertionError as error:
            raise AssertionError(f"{check.__name__} failed for {name}: {error}") from error


def parametrize(
    checks: Sequence[Check], factories: Sequence[Callable[[], object]], name: Callable[[Callable[[], object]], str]
) -> pytest.MarkDecorator:
    """``pytest.mark.parametrize`` over every (factory, check) pair, with ids ``<name>-<check>``."""
    params = [
        pytest.param(factory, check, id=f"{name(factory)}-{check.__name__}") for factory in factories for check in checks
    ]
    return pytest.mark.parametrize(("factory", "check"), params)
