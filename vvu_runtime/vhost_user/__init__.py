"""The vhost-user protocol: codec, sessions, transports (no device logic here).

* ``messages``  - request codes, payload layouts, message tables, decode/encode
* ``errors``    - the exception tree (see its docstring)
* ``transport`` - Channel/UnixChannel, the Transport seam (memory, kicks, calls)
* ``vring``     - Vring: what devices use (pop/push/notify/fail)
* ``device``    - VhostUserDevice: what backends implement
* ``backend``   - BackendSession: the back-end state machine driving a device
* ``server``    - VhostUserServer (listen) / VhostUserClient (connect)
* ``frontend``  - VhostUserFrontend, GuestRam, setup_queue: a front-end for tests/tools
* ``inflight``  - the INFLIGHT_SHMFD area of a session
* ``probe``     - the ``vvu-probe`` command
"""
