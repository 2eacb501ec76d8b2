"""ComfyUI entry point: ComfyUI imports this folder as a package.

The nodes arrive with their own issue; until then the pack registers none, and
importing it (as pytest may) has no side effect.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
