"""Leases: one holder at a time, renewal keeps the token, take-over after expiry bumps it, racing
processes cannot both win, release hands it over at once. SQLite and Postgres."""
from __future__ import annotations

import threading
import time

from feedback.store.leases import Leases


def test_the_first_taker_holds_it_and_others_wait_for_expiry(store):
    leases = Leases(store)
    first = leases.acquire("fleet-rollouts", "gw-a", ttl=30)
    assert first.holder == "gw-a" and first.token == 1 and first.held_by("gw-a")
    assert leases.acquire("fleet-rollouts", "gw-b", ttl=30).holder == "gw-a"  # still gw-a's
    renewed = leases.acquire("fleet-rollouts", "gw-a", ttl=30)
    assert renewed.token == 1 and renewed.expires_at >= first.expires_at  # renewal: same token
    assert leases.acquire("other", "gw-b", ttl=30).holder == "gw-b"  # names are independent


def test_an_expired_lease_is_taken_over_with_a_higher_token(store):
    leases = Leases(store)
    leases.acquire("fleet-rollouts", "gw-a", ttl=0.2)
    time.sleep(0.3)  # gw-a stopped renewing (it died)
    taken = leases.acquire("fleet-rollouts", "gw-b", ttl=30)
    assert taken.holder == "gw-b" and taken.token == 2
    assert not leases.get("fleet-rollouts").held_by("gw-a")
    assert leases.acquire("fleet-rollouts", "gw-a", ttl=30).holder == "gw-b"  # the old holder came back: too late


def test_release_hands_it_over_without_waiting_for_the_ttl(store):
    leases = Leases(store)
    leases.acquire("fleet-rollouts", "gw-a", ttl=300)
    assert leases.release("fleet-rollouts", "gw-a")
    assert not leases.release("fleet-rollouts", "gw-x")  # not the holder: nothing released
    assert leases.acquire("fleet-rollouts", "gw-b", ttl=300).holder == "gw-b"


def test_racing_takers_of_an_expired_lease_agree_on_one_holder(store):
    leases = Leases(store)
    leases.acquire("fleet-rollouts", "gw-dead", ttl=0.1)
    time.sleep(0.2)
    barrier = threading.Barrier(6)
    won: list[str] = []

    def take(name: str) -> None:
        barrier.wait()
        if leases.acquire("fleet-rollouts", name, ttl=30).holder == name:
            won.append(name)

    threads = [threading.Thread(target=take, args=(f"gw-{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1, won
    final = leases.get("fleet-rollouts")
    assert final.holder == won[0] and final.token == 2
