"""The dispatcher loop and the transports."""
