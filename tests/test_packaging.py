"""A wheel carries the model-card template and the llama.cpp patch, and an installed copy finds them in itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, peft_doubter, peft_doubter.hub.card as hub, peft_doubter.deploy.llama_cpp as llama_cpp
build = llama_cpp._build_module()
print(json.dumps({"package": peft_doubter.__file__, "template": str(hub.TEMPLATE_PATH),
                  "template_exists": hub.TEMPLATE_PATH.is_file(), "patch_dir": str(llama_cpp.PATCH_DIR),
                  "package_dir": str(build.PACKAGE_DIR), "hash": build.source_hash()}))
"""


def _probe(pythonpath: str | None) -> dict:
    import json

    env = {**os.environ, "PYTHONPATH": pythonpath} if pythonpath else dict(os.environ)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True,
                         cwd=ROOT.parent).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_installed_wheel_finds_its_card_template_and_llama_cpp_patch(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "wheel"), str(ROOT)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("peft_doubter-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True)
    installed, source = _probe(str(tmp_path / "site")), _probe(None)
    inside = tmp_path / "site" / "peft_doubter"
    assert Path(installed["package"]).parent == inside
    packages = {path.parent.relative_to(ROOT / "src") for path in (ROOT / "src").rglob("__init__.py")}
    missing = sorted(str(package) for package in packages if not (tmp_path / "site" / package / "__init__.py").is_file())
    assert not missing, f"sub-packages left out of the wheel (pyproject packages list): {missing}"
    assert installed["template_exists"] and Path(installed["template"]).parent == inside / "hub_cards"
    assert Path(installed["patch_dir"]) == inside / "llama_cpp_patch"
    assert Path(installed["package_dir"]) == inside  # where the build reads deploy/sidecar_format.py
    # The same sources, so the same llama.cpp build cache key as the checkout.
    assert installed["hash"] == source["hash"]
    assert Path(source["template"]) == ROOT / "hub_cards" / "doubter_card.md.j2"
