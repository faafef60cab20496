"""The edge ingress: HTTP and raw-frame listeners, API surfaces, auth, Server-Timing."""
