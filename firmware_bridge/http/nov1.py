"""Imported by `python -m firmware_bridge.http` before FastAPI: pydantic.v1 stays out of the process.

FastAPI checks every route's annotations for pydantic.v1 models by importing pydantic.v1, the whole
package (1.5 MB in this process); no model of the gateways is one, and when that import fails the check
answers "not a v1 model", as it does on a pydantic without v1.
"""
import sys

sys.modules.setdefault("pydantic.v1", None)  # type: ignore[arg-type]  # `import pydantic.v1` raises ImportError
