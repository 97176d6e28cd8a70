"""The core: the generation service, the exchange it runs, and what a prompt needs besides the upstream
(conversations, the auto-pull, draining at shutdown, who may manage models)."""
