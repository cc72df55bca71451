"""Load balancer: netstack balance (L4 TCP relay, UDP sessions, health, config)."""
