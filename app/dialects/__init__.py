"""The wire formats of other APIs MiniVault speaks (OpenAI, Ollama), translated to and from its own."""
