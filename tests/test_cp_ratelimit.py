"""Rate limits per token and per project over the real `limits` async moving-window limiter."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from controlplane.errors import RateLimited
from controlplane.policy import PolicyHolder
from controlplane.ratelimit import RateLimiter

DEFAULT = Path(__file__).resolve().parent.parent / "policies" / "default.yaml"


def holder_with(tmp_path: Path, per_token: str, per_project: str) -> tuple[PolicyHolder, Path]:
    doc = yaml.safe_load(DEFAULT.read_text())
    doc["rate_limits"] = {"per_token": per_token, "per_project": per_project}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(doc))
    return PolicyHolder.load(path), path


@pytest.fixture
async def limiter(tmp_path: Path) -> AsyncIterator[RateLimiter]:
    # Minute windows: the test cannot flake on a slow machine, and Retry-After is checkable.
    holder, _ = holder_with(tmp_path, "3/minute", "5/minute")
    limiter = RateLimiter(holder)
    yield limiter
    await limiter.aclose()


async def test_fourth_call_of_a_token_is_refused_with_retry_after(limiter: RateLimiter) -> None:
    for _ in range(3):
        await limiter.check("jti-a", "p1")
    with pytest.raises(RateLimited) as caught:
        await limiter.check("jti-a", "p1")
    retry_after = caught.value.retry_after_s
    assert 55 <= retry_after <= 60
    assert "this token" in caught.value.detail


async def test_tokens_are_counted_independently(limiter: RateLimiter) -> None:
    for _ in range(3):
        await limiter.check("jti-a", None)
    for _ in range(3):
        await limiter.check("jti-b", None)  # jti-a's spent budget does not touch jti-b
    with pytest.raises(RateLimited):
        await limiter.check("jti-b", None)


async def test_project_limit_spans_its_tokens(limiter: RateLimiter) -> None:
    for _ in range(3):
        await limiter.check("jti-a", "p1")
    for _ in range(2):
        await limiter.check("jti-b", "p1")
    with pytest.raises(RateLimited) as caught:
        await limiter.check("jti-c", "p1")  # a fresh token, but p1 has used its 5
    assert "project 'p1'" in caught.value.detail
    assert 55 <= caught.value.retry_after_s <= 60
    await limiter.check("jti-d", "p2")  # other projects are unaffected


async def test_token_refusal_does_not_spend_the_project_budget(limiter: RateLimiter) -> None:
    for _ in range(3):
        await limiter.check("jti-a", "p1")
    for _ in range(4):
        with pytest.raises(RateLimited):
            await limiter.check("jti-a", "p1")
    for _ in range(2):
        await limiter.check("jti-b", "p1")  # p1 still has 2 of its 5 left
    with pytest.raises(RateLimited):
        await limiter.check("jti-c", "p1")


async def test_second_window_short_retry_after(tmp_path: Path) -> None:
    holder, _ = holder_with(tmp_path, "1/second;100/minute", "100/minute")
    limiter = RateLimiter(holder)
    try:
        await limiter.check("jti-a", "p1")
        with pytest.raises(RateLimited) as caught:
            await limiter.check("jti-a", "p1")
        assert caught.value.retry_after_s == 1
    finally:
        await limiter.aclose()


async def test_policy_reload_changes_the_limits(tmp_path: Path) -> None:
    holder, path = holder_with(tmp_path, "1/minute", "100/minute")
    limiter = RateLimiter(holder)
    try:
        await limiter.check("jti-a", "p1")
        with pytest.raises(RateLimited):
            await limiter.check("jti-a", "p1")
        doc = yaml.safe_load(path.read_text())
        doc["rate_limits"]["per_token"] = "3/minute"
        path.write_text(yaml.safe_dump(doc))
        assert holder.reload(path)[0]
        await limiter.check("jti-a", "p1")
    finally:
        await limiter.aclose()
