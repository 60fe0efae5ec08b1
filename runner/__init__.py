"""bem-runner: files dropped into an inbox become bem calls; each leaves one result in an outbox."""

__version__ = "0.1.0"
