"""The VVU link state machine (A.7 of the protocol digest, docs/vvu-abi.md "Status").

Both ends of a VVU device follow the same two status bits, so both use this one
machine: the device model's tunnel (``device.tunnel``: it accepts a front-end
only while ARMED) and the guest driver's endpoint (``driver.endpoint``: it runs
a back-end session only while CONNECTED)::

    DOWN  --BACKEND_UP------->  ARMED       the driver set BACKEND_UP
    ARMED --FRONTEND_UP------>  CONNECTED   a front-end connected (FRONTEND_UP + irq)
    CONNECTED --FRONTEND_GONE-> DOWN        it hung up or sent bad input: status 0 + irq
    any   --BACKEND_DOWN----->  DOWN        the driver cleared BACKEND_UP, reset, NEEDS_RESET
    any   --DEVICE_GONE------>  GONE        the device reads all-ones (driver side: final)

A.7's CHR_OPENED state (a front-end connected before the driver is up) does not
exist here: the device model leaves such a front-end in the listen backlog
until ARMED before the link's first session, and refuses it (stops listening)
after one. Anything not in :data:`TRANSITIONS` is refused by
:meth:`LinkMachine.fire` with :class:`LinkStateError`, so a bug shows as a
precise error instead of a device in an impossible state.
"""

from __future__ import annotations

import enum

from vvu_runtime.virtio.errors import VirtioError


class LinkState(enum.Enum):
    DOWN = "down"                # no BACKEND_UP: the driver is not ready
    ARMED = "armed"              # BACKEND_UP: a front-end may connect
    CONNECTED = "connected"      # BACKEND_UP | FRONTEND_UP: messages flow
    GONE = "gone"                # the device is dead (reads all-ones): final


class LinkEvent(enum.Enum):
    BACKEND_UP = "backend up"
    FRONTEND_UP = "frontend up"
    FRONTEND_GONE = "frontend gone"
    BACKEND_DOWN = "backend down"
    DEVICE_GONE = "device gone"


_S, _E = LinkState, LinkEvent

#: (state, event) -> next state; every pair not listed is a bug.
TRANSITIONS: dict[tuple[LinkState, LinkEvent], LinkState] = {
    (_S.DOWN, _E.BACKEND_UP): _S.ARMED,
    (_S.ARMED, _E.FRONTEND_UP): _S.CONNECTED,
    (_S.CONNECTED, _E.FRONTEND_GONE): _S.DOWN,
    **{(s, _E.BACKEND_DOWN): _S.DOWN for s in (_S.DOWN, _S.ARMED, _S.CONNECTED)},
    **{(s, _E.DEVICE_GONE): _S.GONE for s in (_S.DOWN, _S.ARMED, _S.CONNECTED, _S.GONE)},
}


class LinkStateError(VirtioError):
    """An event that the link's current state does not allow (a bug, not bad input)."""


class LinkMachine:
    """The state of one VVU link, changed only through :meth:`fire`."""

    def __init__(self, name: str, state: LinkState = LinkState.DOWN) -> None:
        self.name = name
        self.state = state

    def can(self, event: LinkEvent) -> bool:
        return (self.state, event) in TRANSITIONS

    def fire(self, event: LinkEvent) -> LinkState:
        """Take ``event``; the new state. LinkStateError if the state does not allow it."""
        try:
            self.state = TRANSITIONS[self.state, event]
        except KeyError:
            raise LinkStateError(f"{self.name}: {event.value} in state "
                                 f"{self.state.value}") from None
        return self.state

    def __repr__(self) -> str:
        return f"LinkMachine({self.name!r}, {self.state})"


__all__ = ["TRANSITIONS", "LinkEvent", "LinkMachine", "LinkState", "LinkStateError"]
