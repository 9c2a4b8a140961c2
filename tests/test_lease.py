"""Owner-token leases against a real Redis: only the owner renews or releases."""

import time

from dailyq.lease import Lease


def test_only_one_owner_holds_a_lease(connection, prefix):
    first = Lease(connection, f"{prefix}:l", "a", 5000)
    second = Lease(connection, f"{prefix}:l", "b", 5000)
    assert first.acquire_or_renew()
    assert not second.acquire_or_renew()
    assert first.acquire_or_renew()  # renewing our own
    assert first.holder() == "a"


def test_release_is_compare_and_delete(connection, prefix):
    first = Lease(connection, f"{prefix}:l", "a", 5000)
    second = Lease(connection, f"{prefix}:l", "b", 5000)
    first.acquire_or_renew()
    assert not second.release()
    assert first.holder() == "a"
    assert first.release()
    assert second.acquire_or_renew()


def test_an_expired_lease_passes_on_and_the_old_owner_cannot_renew_or_delete_it(connection, prefix):
    first = Lease(connection, f"{prefix}:l", "a", 200)
    second = Lease(connection, f"{prefix}:l", "b", 5000)
    assert first.acquire_or_renew()
    time.sleep(0.3)  # a pause past the TTL, as SIGSTOP would cause
    assert second.acquire_or_renew()
    assert not first.renew()
    assert not first.release()
    assert second.holder() == "b"


def test_renew_never_takes_a_free_lease(connection, prefix):
    lease = Lease(connection, f"{prefix}:l", "a", 5000)
    assert not lease.renew()
    assert lease.holder() is None
