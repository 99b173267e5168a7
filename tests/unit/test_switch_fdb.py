"""The forwarding database: learning, moves, ageing, limits."""

from __future__ import annotations

import pytest

from tests.support.net_frames import mac
from vvu_runtime.backends.switch.fdb import Fdb


def test_learn_and_lookup() -> None:
    fdb: Fdb[str] = Fdb(ageing_time=10)
    assert fdb.lookup(mac(1), 0) is None
    assert fdb.learn(mac(1), "a", 0)
    assert fdb.lookup(mac(1), 5) == "a"
    assert len(fdb) == 1 and mac(1) in fdb
    assert fdb.counters.learned == 1


def test_move_to_another_port() -> None:
    fdb: Fdb[str] = Fdb()
    fdb.learn(mac(1), "a", 0)
    fdb.learn(mac(1), "b", 1)
    assert fdb.lookup(mac(1), 1) == "b"
    assert fdb.counters.moved == 1
    assert fdb.entries_on("a") == 0 and fdb.entries_on("b") == 1


def test_lookup_expires_old_entries() -> None:
    fdb: Fdb[str] = Fdb(ageing_time=10)
    fdb.learn(mac(1), "a", 0)
    assert fdb.lookup(mac(1), 10) == "a"
    assert fdb.lookup(mac(1), 10.5) is None
    assert len(fdb) == 0 and fdb.counters.aged == 1


def test_seeing_an_address_refreshes_it() -> None:
    fdb: Fdb[str] = Fdb(ageing_time=10)
    fdb.learn(mac(1), "a", 0)
    fdb.learn(mac(1), "a", 8)
    assert fdb.lookup(mac(1), 17) == "a"


def test_age_sweeps_stale_entries() -> None:
    fdb: Fdb[str] = Fdb(ageing_time=10)
    fdb.learn(mac(1), "a", 0)
    fdb.learn(mac(2), "b", 5)
    assert fdb.age(12) == 1
    assert mac(1) not in fdb and mac(2) in fdb
    assert fdb.entries_on("a") == 0


def test_flush_port() -> None:
    fdb: Fdb[str] = Fdb()
    for i in range(5):
        fdb.learn(mac(i), "a" if i % 2 else "b", 0)
    assert fdb.flush_port("a") == 2
    assert len(fdb) == 3 and fdb.entries_on("a") == 0


def test_global_limit_refuses_new_addresses() -> None:
    fdb: Fdb[str] = Fdb(max_entries=3)
    for i in range(3):
        assert fdb.learn(mac(i), f"p{i}", 0)
    assert not fdb.learn(mac(10), "p0", 0)
    assert fdb.counters.refused_full == 1
    assert fdb.learn(mac(0), "p0", 1)  # known addresses still refresh


def test_per_port_limit_protects_other_ports() -> None:
    fdb: Fdb[str] = Fdb(max_entries=100, max_per_port=4)
    for i in range(50):
        fdb.learn(mac(i), "hostile", 0)
    assert fdb.entries_on("hostile") == 4
    assert fdb.learn(mac(1000), "good", 0)
    assert fdb.lookup(mac(1000), 0) == "good"


def test_iteration_and_bad_parameters() -> None:
    fdb: Fdb[str] = Fdb()
    fdb.learn(mac(1), "a", 3)
    [(m, e)] = list(fdb)
    assert m == mac(1) and e.port == "a" and e.seen == 3
    with pytest.raises(ValueError):
        Fdb(ageing_time=0)
    with pytest.raises(ValueError):
        Fdb(max_entries=0)
