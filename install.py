"""A1111/Forge installer hook, run at each launch: install only what is missing.

torch, gradio and transformers belong to the host and are never touched.
"""

from pathlib import Path

import launch  # provided by A1111/Forge

HOST_OWNED = {"torch", "gradio", "transformers"}

for line in Path(__file__).with_name("requirements.txt").read_text().splitlines():
    requirement = line.split("#")[0].strip()
    if not requirement:
        continue
    name = requirement.split(">")[0].split("<")[0].split("=")[0].strip()
    if name.lower() not in HOST_OWNED and not launch.is_installed(name):
        launch.run_pip(f'install "{requirement}"', f"{name} for concept erasing")
