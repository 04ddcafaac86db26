"""The install story: the lock agrees with pyproject.toml, and the wheel alone is a working fura.

The lock (requirements/lock-cpu.txt) is what scripts/setup.sh installs and CI tests; pyproject.toml keeps
compatible ranges for people who install fura into their own environments. Every locked version of a
direct dependency must lie inside those ranges, or a user following pyproject.toml could never get the
tested set. The wheel test installs the built wheel alone (no repository beside it) and drives the CLI
from a directory outside the repository, reusing this environment's packages.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import save_tiny_llama_dir
from fura.recipes.catalog import shipped_names

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lock-cpu.txt"


def locked_versions() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"{LOCK.name}: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


def declared_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    return [req for req in map(Requirement, lines) if canonicalize_name(req.name) != "fura"]


def test_every_declared_dependency_is_locked_inside_its_range():
    pins = locked_versions()
    assert {"torch", "transformers", "peft", "trl", "kernels"} <= set(pins)
    for req in declared_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is declared in pyproject.toml but not pinned in {LOCK.name}"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK.name} pins {name}=={pins[name]}, outside pyproject.toml's {req}: widen the range or re-lock"
        )


def test_setup_installs_from_the_lock():
    setup = (REPO / "scripts" / "setup.sh").read_text(encoding="utf-8")
    assert "requirements/lock-cpu.txt" in setup and "--latest" in setup


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> Path:
    """A fresh venv holding only the built wheel (--no-deps); this environment's packages come in through a .pth."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # build from a copy, so the build leaves nothing in the repository
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    python = [sys.executable, "-m", "pip"]
    subprocess.run(
        [*python, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", root / "dist", source], check=True
    )
    (wheel,) = (root / "dist").glob("fura-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    site = Path(
        subprocess.check_output(
            [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    subprocess.run([*python, "--python", venv / "bin" / "python", "install", "-q", "--no-deps", wheel], check=True)
    # Only now, or pip would see (and replace) this environment's own fura through the .pth.
    (site / "locked_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def fura(venv: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([venv / "bin" / "fura", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_alone_lists_copies_and_dry_runs_a_shipped_recipe(wheel_env, tmp_path):
    work = tmp_path / "elsewhere"  # outside the repository: nothing of it is reachable from here
    work.mkdir()
    where = subprocess.run(
        [wheel_env / "bin" / "python", "-c", "import fura; print(fura.__file__)"],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(wheel_env)), where

    version = fura(wheel_env, work, "--version")
    assert version.returncode == 0 and version.stdout.startswith("fura ") and "torch " in version.stdout

    listing = fura(wheel_env, work, "recipes")
    assert listing.returncode == 0, listing.stderr
    assert all(name in listing.stdout for name in shipped_names())
    assert "88.01" in listing.stdout  # the paper's number next to commonsense/fura

    copied = fura(wheel_env, work, "recipes", "cp", "commonsense/fura", "x.yaml")
    assert copied.returncode == 0, copied.stderr
    assert "track: commonsense" in (work / "x.yaml").read_text()

    model = save_tiny_llama_dir(tmp_path / "tiny", ["the correct answer is true"])
    data = work / "train.json"
    data.write_text(json.dumps([{"instruction": "q", "output": "the correct answer is true"}] * 4))
    dry = fura(
        wheel_env,
        work,
        "train",
        "--config",
        "commonsense/fura",
        "--model",
        str(model),
        "--data",
        str(data),
        "--output-dir",
        str(work / "out"),
        "--set",
        "data_args.val_size=2",
        "--set",
        "training.bf16=false",
        "--dry-run",
    )
    assert dry.returncode == 0, dry.stderr[-3000:]
