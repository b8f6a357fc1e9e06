"""Fleet identity: the CA, join tokens, device enrollment with signed labels, and the registry."""
