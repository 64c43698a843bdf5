"""The command line, the demo and the embedded server."""
