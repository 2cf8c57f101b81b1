"""The server side: the daemon (accept loop, routing) and one worker process per client network."""
