"""`key_filter`: what a key's claims put in RequestMeta.filter."""

from __future__ import annotations

import pytest

from casola.auth import SCOPE_RUN, Claims
from casola.ingress.jobs import Caller, key_filter


@pytest.mark.parametrize("policy", ["", "off", "race", "block"])
def test_a_known_policy_is_carried_as_is(policy: str) -> None:
    assert key_filter(Claims("k_1", "acme", (SCOPE_RUN,), filter=policy)) == policy


def test_auth_off_and_a_policy_from_a_newer_issuer_mean_none() -> None:
    assert key_filter(None) == ""
    assert key_filter(Claims("k_1", "acme", (SCOPE_RUN,), filter="audit")) == ""


def test_a_caller_has_no_policy_unless_given_one() -> None:
    assert Caller("anonymous", "").filter == ""
