"""The dispatcher's job ledger: which jobs it knows, by state. Pure, no server."""

from __future__ import annotations

import pytest
from livekit.protocol import agent as proto

from openrtc.agents.routing import Route
from openrtc.dispatcher.ledger import MAX_UNSURE, JobLedger, Offer

pytestmark = pytest.mark.unit


def offer(job_id: str, agent: str | None = "dental", at: float = 100.0) -> Offer:
    route = Route(agent, 3, "room metadata") if agent else None
    return Offer(proto.Job(id=job_id), route, None, at, at)


def test_a_job_from_offer_to_its_final_status() -> None:
    jobs = JobLedger()
    jobs.offer(offer("J1"))
    taken = jobs.take_offer("J1")
    assert taken is not None
    assert jobs.take_offer("J1") is None
    jobs.assign("J1", "dental")
    jobs.written("J1", "dental", hold=True)
    assert jobs.is_held("J1")
    assert jobs.held_count == 1
    assert not jobs.assigning
    jobs.ended("J1")
    assert not jobs.is_held("J1")


def test_a_job_written_for_a_socket_that_dropped_is_not_held() -> None:
    jobs = JobLedger()
    jobs.assign("J1", "dental")
    jobs.written("J1", "dental", hold=False)
    assert not jobs.is_held("J1")
    assert not jobs.assigning


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda j: j.written("J1", "dental", hold=True), "dental"),  # held
        (lambda j: j.assign("J1", "dental"), "dental"),  # being written
        (lambda j: j.offer(offer("J1", "support")), "support"),  # offered only
        (lambda j: j.offer(offer("J1", None)), None),  # unknown agent: nobody to tell
        (lambda j: None, None),  # not ours
    ],
)
def test_a_termination_finds_the_job_in_any_state(setup: object, expected: str | None) -> None:
    jobs = JobLedger()
    setup(jobs)  # type: ignore[operator]
    assert jobs.terminated("J1") == expected
    assert not jobs.is_held("J1")
    assert "J1" not in jobs.offers


def test_a_dropped_socket_forgets_held_jobs_and_offers_but_not_the_unsure() -> None:
    jobs = JobLedger()
    assert jobs.socket_dropped() is None
    jobs.offer(offer("J1"))
    jobs.written("J2", "dental", hold=True)
    jobs.not_written("J3", "dental")
    assert jobs.socket_dropped() == 1
    assert not jobs.offers
    assert not jobs.held
    assert list(jobs.unsure) == ["J3"]


def test_unsure_jobs_are_bounded_and_settled_one_by_one() -> None:
    jobs = JobLedger()
    for i in range(MAX_UNSURE + 5):
        jobs.not_written(f"J{i}", "dental")
    assert len(jobs.unsure) == MAX_UNSURE
    settled = []
    for job_id, _agent in jobs.unsure_jobs():
        settled.append(job_id)
        jobs.settle(job_id)
        if len(settled) == 3:
            break
    assert settled == ["J0", "J1", "J2"]
    assert len(jobs.unsure) == MAX_UNSURE - 3


def test_offers_never_assigned_expire() -> None:
    jobs = JobLedger()
    jobs.offer(offer("old", at=10.0))
    jobs.offer(offer("new", at=50.0))
    assert jobs.expire_offers(cutoff=20.0) == ["old"]
    assert list(jobs.offers) == ["new"]


def test_a_job_s_tenant_is_known_while_it_is_assigned_or_held_and_then_forgotten() -> None:
    jobs = JobLedger()
    for job_id in ("J1", "J2", "J3", "J4", "J5"):
        jobs.assign(job_id, "dental", f"t-{job_id}")
    assert jobs.tenant_of("J1") == "t-J1"
    jobs.written("J1", "dental", hold=True)
    jobs.written("J2", "dental", hold=False)  # its socket is gone: not held
    jobs.not_written("J3", "dental")
    assert (jobs.tenant_of("J1"), jobs.tenant_of("J2"), jobs.tenant_of("J3")) == ("t-J1", "", "")
    assert jobs.terminated("J4") == "dental"  # still assigning: known until written
    assert jobs.tenant_of("J4") == "t-J4"
    jobs.written("J4", "dental", hold=True)
    jobs.ended("J4")
    assert jobs.terminated("J1") == "dental"
    assert jobs.tenant_of("J1") == jobs.tenant_of("J4") == ""
    jobs.written("J5", "dental", hold=True)
    jobs.socket_dropped()
    assert jobs.tenants == {}
    assert jobs.tenant_of("unknown") == ""
