"""The llm unit: text generation, scoring and embeddings on a GGUF model converted for onnxruntime."""
