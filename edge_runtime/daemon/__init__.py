"""The edge daemon in modules of one idea each: config (settings and the one argument parser),
jobs (training queue, worker, recovery), generation, state (what the daemon holds), service (the
gRPC servicer, where errors become status codes), auth (token, TLS) and server (start, stop, main)."""
