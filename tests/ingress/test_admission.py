"""Requests in progress at the ingress, per tenant and per key (casola.ingress.admission)."""

from __future__ import annotations

from casola.ingress.admission import Admission, Refusal, Ticket


def test_a_tenant_is_held_to_its_share_and_a_key_to_its_own_limit() -> None:
    adm = Admission(max_inflight=100, per_tenant=3)
    got = [adm.admit("a", "k1", 0, 0.0) for _ in range(4)]
    assert all(isinstance(t, Ticket) for t in got[:3])
    assert isinstance(got[3], Refusal) and "tenant 'a' has 3" in got[3].message
    assert isinstance(adm.admit("b", "k2", 2, 0.0), Ticket)
    assert isinstance(adm.admit("b", "k2", 2, 0.0), Ticket)
    refused = adm.admit("b", "k2", 2, 0.0)
    assert isinstance(refused, Refusal) and "key k2 has 2" in refused.message
    assert isinstance(adm.admit("b", "k3", 2, 0.0), Ticket)  # the tenant's other key is not held by k2
    adm.release(got[0], 1.0)  # type: ignore[arg-type]
    assert isinstance(adm.admit("a", "k1", 0, 1.0), Ticket)
    assert adm.total == 6 and adm.in_flight("a") == 3


def test_a_full_ingress_still_admits_a_tenant_below_its_fair_share() -> None:
    adm = Admission(max_inflight=10, per_tenant=10)
    for _ in range(10):
        assert isinstance(adm.admit("flood", "", 0, 0.0), Ticket)
    assert isinstance(adm.admit("flood", "", 0, 0.0), Refusal)  # full, and flood has more than its share
    for _ in range(5):  # fair share with two tenants: 5 each, overshooting the limit
        assert isinstance(adm.admit("quiet", "", 0, 0.0), Ticket)
    assert isinstance(adm.admit("quiet", "", 0, 0.0), Refusal)
    assert adm.total == 15 <= 2 * adm.max_inflight  # bounded all the same


def test_retry_after_follows_the_tenants_measured_drain() -> None:
    adm = Admission(max_inflight=100, per_tenant=1)
    first = adm.admit("a", "", 0, 0.0)
    assert isinstance(first, Ticket)
    refused = adm.admit("a", "", 0, 0.0)
    assert isinstance(refused, Refusal) and refused.retry_after_ms == 1000  # nothing measured yet: 1 s
    adm.release(first, 0.0)
    t = 0.0
    for _ in range(100):  # a request every 5 s: its next place frees in about 5 s
        t += 5.0
        ticket = adm.admit("a", "", 0, t)
        assert isinstance(ticket, Ticket)
        adm.release(ticket, t + 5.0)
    held = adm.admit("a", "", 0, t)
    refused = adm.admit("a", "", 0, t)
    assert isinstance(held, Ticket) and isinstance(refused, Refusal)
    assert 3000 <= refused.retry_after_ms <= 8000
