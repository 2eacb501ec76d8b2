"""ComfyUI entry point: ComfyUI imports this folder as a package.

The nodes live in ``nodes/comfyui.py``; outside ComfyUI (pytest, A1111) the pack
registers nothing and importing it has no side effect.
"""

import importlib.util

if importlib.util.find_spec("comfy") is not None and importlib.util.find_spec("folder_paths") is not None:
    from .nodes.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
