"""The SQLite ledger (billing_svc/ledger.py) on a real file: idempotent batches, arrival order, reservations."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

from billing_svc import plans
from billing_svc.ledger import Ledger
from cyberdesk_common.lifecycle_events import InstanceState as S
from cyberdesk_common.lifecycle_events import LifecycleEvent

US = 1_000_000
T0 = 1_764_547_200 * US


def _ev(instance: str, state: S, at_us: int, tenant: str = "t1", desktop: bool = False) -> LifecycleEvent:
    return LifecycleEvent(
        str(uuid.uuid4()), tenant, instance, None, state, at_us, 2, 1024, "base", "", disk_mib=2048, desktop=desktop
    )


def _life(instance: str, tenant: str = "t1") -> list[LifecycleEvent]:
    return [
        _ev(instance, S.PENDING, T0, tenant),
        _ev(instance, S.STARTING, T0 + 100_000, tenant),
        _ev(instance, S.RUNNING, T0 + 300_000, tenant),
        _ev(instance, S.PAUSED, T0 + 10 * US + 300_000, tenant),
        _ev(instance, S.RUNNING, T0 + 13 * US + 300_000, tenant),
        _ev(instance, S.STOPPING, T0 + 20 * US + 300_000, tenant),
        _ev(instance, S.TERMINATED, T0 + 20 * US + 400_000, tenant),
    ]


def _entries(events: list[LifecycleEvent]) -> list[tuple[str, LifecycleEvent]]:
    return [(f"{e.time_us // 1000}-{n}", e) for n, e in enumerate(events)]


def test_a_redelivered_batch_counts_once_and_survives_reopening(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    batch = _entries(_life("i-1"))
    assert ledger.apply(batch, T0) == 7
    assert ledger.apply(batch, T0) == 0  # the same entries again: nothing new
    assert ledger.apply(batch[2:4], T0) == 0
    report = ledger.usage("t1", 0, 2**62, T0 + 100 * US)
    assert (report.total.instance_seconds, report.total.paused_seconds) == (17, 3)
    ledger.close()
    again = Ledger(tmp_path / "l.db")
    assert again.event_count() == 7
    assert again.usage("t1", 0, 2**62, T0 + 100 * US).total == report.total
    assert again.usage("t2", 0, 2**62, T0 + 100 * US).total.instance_seconds == 0  # tenants apart


def test_out_of_order_batches_give_the_same_ledger(tmp_path: Path) -> None:
    events = _entries(_life("i-1"))
    forward, backward = Ledger(tmp_path / "a.db"), Ledger(tmp_path / "b.db")
    forward.apply(events, T0)
    for entry in reversed(events):
        backward.apply([entry], T0)
    far = T0 + 1000 * US
    assert forward.usage("t1", 0, 2**62, far).total == backward.usage("t1", 0, 2**62, far).total
    assert backward.usage("t1", 0, 2**62, far).instances[0].state is S.TERMINATED


def test_running_usage_grows_until_the_end(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    ledger.apply(_entries(_life("i-1")[:3]), T0)  # RUNNING since T0 + 0.3 s, still open
    five = ledger.usage("t1", 0, 2**62, T0 + 5 * US + 500_000)
    assert five.total.instance_seconds == 5 and five.instances[0].open
    assert ledger.usage("t1", 0, 2**62, T0 + 8 * US).total.instance_seconds == 8
    # A period: [T0 + 2 s, T0 + 4 s) of it.
    assert ledger.usage("t1", T0 + 2 * US, T0 + 4 * US, T0 + 8 * US).total.vcpu_seconds == 4


def test_windows_for_stripe_sum_to_the_ledger(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    ledger.apply(_entries(_life("i-1") + _life("i-2", "t2")), T0)
    start = T0 // US
    values = [v for w in range(start, start + 60, 7) for v in ledger.window_values(w, w + 7, T0 + 100 * US)]
    vcpu = sum(v.value for v in values if v.meter == "vcpu_seconds" and v.instance_id == "i-1")
    assert vcpu == ledger.usage("t1", 0, 2**62, T0).total.vcpu_seconds == 34
    assert {v.tenant for v in values} == {"t1", "t2"}
    assert all(v.identifier == f"cd1:{v.instance_id}:{v.meter}:{v.window_start_s}" for v in values)


def test_two_racing_admissions_for_the_last_slot_cannot_both_win(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    Ledger(path).set_plan("t1", plans.CATALOG["free"], T0, "test", T0)  # one instance at a time
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def admit(n: int) -> None:
        own = Ledger(path)  # a connection of its own, as a second process would have
        barrier.wait()
        _plan, refusal = own.admit_create("t1", f"i-{n}", 1, 512, 2048, False, 600, T0)
        results.append(refusal is None)
        own.close()

    threads = [threading.Thread(target=admit, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]


def test_reservations_end_with_the_instance_a_release_or_their_expiry(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    ledger.set_plan("t1", plans.CATALOG["free"], T0, "test", T0)
    assert ledger.admit_create("t1", "i-1", 1, 512, 2048, False, 60, T0)[1] is None
    assert ledger.admit_create("t1", "i-1", 1, 512, 2048, False, 60, T0)[1] is None  # a retry: same slot
    assert ledger.admit_create("t1", "i-2", 1, 512, 2048, False, 60, T0)[1] is not None
    assert ledger.release("t1", "i-1") and not ledger.release("t1", "i-1")
    assert ledger.admit_create("t1", "i-2", 1, 512, 2048, False, 60, T0)[1] is None
    # i-2 appears in the ledger (its reservation becomes the instance), then fails: the slot is free.
    ledger.apply(_entries([_ev("i-2", S.PENDING, T0)]), T0)
    assert ledger.held("t1", T0).instances == 1
    ledger.apply(_entries([_ev("i-2", S.FAILED, T0 + US)]), T0)
    assert ledger.held("t1", T0).instances == 0
    # A reservation nobody releases lapses after its TTL.
    assert ledger.admit_create("t1", "i-3", 1, 512, 2048, False, 60, T0)[1] is None
    assert ledger.admit_create("t1", "i-4", 1, 512, 2048, False, 60, T0 + 121 * US)[1] is None


def test_a_newer_plan_wins_whatever_the_order(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    assert ledger.plan("t1") == (plans.CATALOG["local"], "default")
    assert ledger.set_plan("t1", plans.CATALOG["pro"], T0 + 2, "stripe:evt_2", T0)[0]
    applied, current = ledger.set_plan("t1", plans.CATALOG["free"], T0 + 1, "stripe:evt_1", T0)
    assert not applied and current.name == "pro"
    assert ledger.plan("t1") == (plans.CATALOG["pro"], "stripe:evt_2")
