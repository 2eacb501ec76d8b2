"""ComfyUI entry point: ComfyUI imports this folder as a package and calls ``comfy_entrypoint``
(the V3 node API; ComfyUI would ignore it if this module also had ``NODE_CLASS_MAPPINGS``).

The nodes live in ``nodes/comfyui.py``; outside ComfyUI (pytest, A1111) the pack
registers nothing and importing it has no side effect.
"""

import importlib.util

if importlib.util.find_spec("comfy_api") is not None and importlib.util.find_spec("folder_paths") is not None:
    from .nodes.comfyui import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
