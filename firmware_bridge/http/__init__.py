"""HTTP gateways: OpenAI (+DecentralGPT), Ollama, Ai00 and Jan/Cortex APIs over the unit bus (http-apis.md)."""
