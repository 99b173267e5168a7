"""The VVU link machine (A.7) that the tunnel and the endpoint share."""

from __future__ import annotations

import pytest

from vvu_runtime.virtio.vvu_link import (
    TRANSITIONS,
    LinkEvent,
    LinkMachine,
    LinkState,
    LinkStateError,
)


def test_a_front_end_comes_and_goes_and_comes_back() -> None:
    link = LinkMachine("vvu0")
    assert link.state is LinkState.DOWN
    assert link.fire(LinkEvent.BACKEND_UP) is LinkState.ARMED
    assert link.fire(LinkEvent.FRONTEND_UP) is LinkState.CONNECTED
    assert link.fire(LinkEvent.FRONTEND_GONE) is LinkState.DOWN
    assert link.fire(LinkEvent.BACKEND_UP) is LinkState.ARMED


@pytest.mark.parametrize("state", [LinkState.DOWN, LinkState.ARMED, LinkState.CONNECTED])
def test_backend_down_and_device_gone_from_anywhere(state: LinkState) -> None:
    assert LinkMachine("x", state).fire(LinkEvent.BACKEND_DOWN) is LinkState.DOWN
    assert LinkMachine("x", state).fire(LinkEvent.DEVICE_GONE) is LinkState.GONE


@pytest.mark.parametrize("state, event", [
    (LinkState.DOWN, LinkEvent.FRONTEND_UP),       # no front-end before BACKEND_UP
    (LinkState.CONNECTED, LinkEvent.FRONTEND_UP),  # one front-end at a time
    (LinkState.ARMED, LinkEvent.FRONTEND_GONE),
    (LinkState.GONE, LinkEvent.BACKEND_UP),        # a dead device stays dead
])
def test_the_guard_refuses_what_the_table_lacks(state: LinkState, event: LinkEvent) -> None:
    link = LinkMachine("vvu0", state)
    assert not link.can(event)
    with pytest.raises(LinkStateError, match=f"vvu0: {event.value} in state {state.value}"):
        link.fire(event)
    assert link.state is state


def test_every_state_but_gone_can_be_left() -> None:
    sources = {s for s, _ in TRANSITIONS}
    assert sources == set(LinkState)
    assert {TRANSITIONS[s, e] for s, e in TRANSITIONS if s is LinkState.GONE} == {LinkState.GONE}
