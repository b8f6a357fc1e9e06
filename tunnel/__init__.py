"""fleet-tunnel: devices dial out over one QUIC connection; engineers reach them through it."""
