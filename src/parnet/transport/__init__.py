"""Transport: one framed, authenticated connection to one peer (``link``), its receive
buffers (``bufpool``), liveness (``heartbeat``) and connection set-up (``handshake``)."""
