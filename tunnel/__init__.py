"""fleet-tunnel: devices dial out over one connection (QUIC, or TLS over TCP where UDP is blocked); engineers reach them through it."""
