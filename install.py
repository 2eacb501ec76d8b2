"""A1111/Forge installer hook, run at each launch: install only what the tab needs and
the host lacks.

Nothing the host has is changed: torch, gradio and transformers are the host's and never
installed, and pip is held to the versions of every package already there, so it picks a
version of what is missing that fits them (unheld, a newest diffusers upgrades A1111
1.8's huggingface_hub to 2.x, which its transformers 4.30 rejects).  diffusers itself is
not needed here: the tab works on the host's loaded model and never reads a model file.
"""

import tempfile
from importlib import metadata
from pathlib import Path

import launch  # provided by A1111/Forge

SKIPPED = {"torch", "gradio", "transformers", "diffusers"}  # the host's; only the standalone app's


def requirement_name(requirement: str) -> str:
    for separator in "<>=!~;[ ":
        requirement = requirement.split(separator)[0]
    return requirement.strip()


def installed_versions() -> str:
    """A pip constraints file's text: each installed distribution at its installed version."""
    versions = {}
    for distribution in metadata.distributions():  # sys.path order: the first of a name is the one imported
        name = distribution.metadata["Name"]
        if name:
            versions.setdefault(name.lower(), f"{name}=={distribution.version}")
    return "\n".join(sorted(versions.values())) + "\n"


def missing_requirements(requirements_file: Path) -> list[str]:
    lines = (line.split("#")[0].strip() for line in requirements_file.read_text().splitlines())
    return [
        requirement
        for requirement in lines
        if requirement
        and requirement_name(requirement).lower() not in SKIPPED
        and not launch.is_installed(requirement_name(requirement))
    ]


missing = missing_requirements(Path(__file__).with_name("requirements.txt"))
if missing:
    with tempfile.TemporaryDirectory() as folder:
        constraints = Path(folder) / "host-packages.txt"
        constraints.write_text(installed_versions())
        for requirement in missing:
            name = requirement_name(requirement)
            launch.run_pip(f'install "{requirement}" -c "{constraints}"', f"{name} for concept erasing")
