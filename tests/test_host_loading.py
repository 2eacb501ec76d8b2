"""The repository folder loads the way ComfyUI loads a custom-node pack: by path, as a package."""

import importlib.util
import sys

from support import ROOT


def test_pack_folder_imports_as_a_package_by_path():
    name = "concept_erasing_pack_under_test"
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        # ComfyUI takes NODE_CLASS_MAPPINGS first and would then ignore the V3 comfy_entrypoint
        assert not hasattr(module, "NODE_CLASS_MAPPINGS")
        assert not hasattr(module, "comfy_entrypoint")  # outside ComfyUI: nothing registered
        engine = importlib.import_module(f"{name}.erase_engine")  # the engine rides inside the pack
        assert engine.__version__ and engine.EraseConfig(erase=["x"]).erase == ["x"]
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def test_registry_metadata_and_minimal_requirements():
    import tomllib

    import erase_engine

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["version"] == erase_engine.__version__  # the registry reads pyproject's
    assert {"PublisherId", "DisplayName", "Icon"} <= project["tool"]["comfy"].keys()
    assert (ROOT / "docs" / "icon.png").is_file() and project["tool"]["comfy"]["Icon"].endswith("docs/icon.png")
    assert "Repository" in project["project"]["urls"]
    assert project["tool"]["comfy"]["requires-comfyui"].startswith(">=")  # the V3 node API's oldest tested
    requirements = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    names = {r.split(">")[0].split("<")[0].split("=")[0].strip().lower() for r in requirements if r}
    assert names and not names & {"torch", "torchvision", "gradio"}  # the hosts bring their own
