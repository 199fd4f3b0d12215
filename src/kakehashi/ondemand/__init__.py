"""The on-demand access system (spec 002): time-limited, randomly placed entry ports.

* :mod:`.grants` - the sans-IO core: request validation, port drawing, edge selection
  policies, the S26 access decision, audit event records;
* :mod:`.messages` - what the manager, the edges and the inner relays say to each other;
* :mod:`.manager` - the connection management device (REST API under ``/v1``);
* :mod:`.edge` - the first relay (public entry ports), :mod:`.inner` - the second relay
  (inside the closed network), both kept in step by :mod:`.channel`;
* :mod:`.cli` - ``kakehashi ondemand ...``.
"""
