"""The llm unit: text generation, scoring and embeddings on a GGUF model converted for onnxruntime."""
from core.registry import UnitInfo

UNIT = UnitInfo("llm", "units.llm", max_tasks=2, converter="models.gguf_llama:convert_manifest")
