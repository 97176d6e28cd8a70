"""The CLI's command groups; app/cli.py assembles them into the `minivault` program (one line per module)."""
