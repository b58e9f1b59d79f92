"""The wheels the GPU check brings to a GPU machine without network: what actionrec needs that its image lacks.

    .venv/bin/python benchmarks/gpu_wheels.py            # download into .whl/ (git-ignored), check, print sizes
    .venv/bin/python benchmarks/gpu_wheels.py --check    # no download: is .whl/ complete, does the bundle fit?

The machine planned for (one H100 or H200, Python 3.12, manylinux x86-64) has its own PyTorch (2.11, CUDA 13),
accelerate, einops, torchmetrics, transformers, timm, numpy, matplotlib, pytest, safetensors and the usual
scientific stack. Its PyTorch is used as it is: nothing here pins or replaces torch. Brought along: PyAV,
webdataset, DeepSpeed (its source package, built here into a pure-Python wheel; it compiles no ops at build
time) and submitit, with the dependencies the machine lacks. Versions are the project's pins (pyproject.toml),
and for the dependencies the versions installed in this environment, so the GPU runs the tested set.

Left behind, on purpose:
  - wandb (20 MB, a third of the budget): the check's runs log with WandB disabled; offline WandB is tested on CPU.
  - torchcodec: a torchcodec build pairs with one torch release and the registry holds only 0.17 (for torch
    2.14), not the 0.11 that torch 2.11 needs; CUDA-decoding builds are published only on download.pytorch.org.
    The check records whether torchcodec loads there; the loader's `auto` decoder falls back to PyAV.

On the GPU machine the check installs the bundle itself before importing anything (gpu_check.py --wheels .whl):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/actionrec-site .whl/*.whl
    export PYTHONPATH=/tmp/actionrec-site:$PWD

The whole bundle (the working tree that travels, git-tracked and untracked-not-ignored files, plus the wheels)
must stay under 64 MiB; this script prints it and exits 1 if it does not.
"""

from __future__ import annotations

import argparse
import email.parser
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"
LIMIT_BYTES = 64 * 2**20
TARGET_PYTHON = "3.12"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
MARKER_ENV = {"python_version": TARGET_PYTHON, "python_full_version": f"{TARGET_PYTHON}.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}

# What the bundle holds: the project's missing dependencies, then what they need that the machine lacks.
BUNDLE = ["av", "webdataset", "deepspeed", "submitit",
          "braceexpand",  # webdataset
          "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection"]  # deepspeed
BUILT_FROM_SOURCE = {"deepspeed"}  # sdist only on the registry

# Installed on the GPU machine's image (its package list, 2026-11-17), as far as actionrec and the bundle's
# wheels need them.
ON_GPU_MACHINE = {canonicalize_name(n) for n in """
    torch torchvision accelerate einops torchmetrics transformers timm numpy matplotlib pytest pytest-timeout
    safetensors tqdm pyyaml pillow pandas scikit-learn psutil msgpack ninja packaging py-cpuinfo nvidia-ml-py
    cloudpickle typing-extensions requests protobuf click filelock fsspec huggingface-hub triton
""".split()}


def pinned_versions() -> dict[str, str]:
    """Bundle name -> version: pyproject's pin, else the version installed here (the tested set)."""
    pins = {}
    for spec in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(spec)
        exact = [s.version for s in requirement.specifier if s.operator == "=="]
        if exact:
            pins[canonicalize_name(requirement.name)] = exact[0]
    return {name: pins.get(canonicalize_name(name)) or importlib.metadata.version(name) for name in BUNDLE}


def bundled_wheels(folder: Path) -> dict[str, tuple[str, Path]]:
    """Canonical name -> (version, path) of the wheels in `folder`; two versions of one package is an error
    (pip refuses the whole install)."""
    found: dict[str, tuple[str, Path]] = {}
    for path in sorted(folder.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(path.name)
        if name in found:
            raise SystemExit(f"error: two wheels of {name} in {folder}: {found[name][1].name}, {path.name}; delete one")
        found[name] = (str(version), path)
    return found


def download(folder: Path) -> None:
    folder.mkdir(exist_ok=True)
    have = bundled_wheels(folder)
    pip = [sys.executable, "-m", "pip"]
    for name, version in pinned_versions().items():
        key = canonicalize_name(name)
        if key in have and have[key][0] == version:
            continue
        if key in have:
            have[key][1].unlink()  # another version: replace it
        print(f"fetching {name}=={version}", flush=True)
        if key in BUILT_FROM_SOURCE:
            # No ops are compiled at build time (DS_BUILD_OPS=0): DeepSpeed JIT-builds what a config needs.
            command = pip + ["wheel", "-q", "--no-deps", f"{name}=={version}", "-w", str(folder)]
            subprocess.run(command, check=True, env=dict(os.environ, DS_BUILD_OPS="0"))
        else:
            command = pip + ["download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", TARGET_PYTHON,
                             "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)],
                             "-d", str(folder), f"{name}=={version}"]
            subprocess.run(command, check=True)


def missing_requirements(wheels: dict[str, tuple[str, Path]]) -> list[str]:
    """Requirements of the bundled wheels (for Python 3.12 on Linux x86-64, no extras) that neither the
    bundle nor the GPU machine's image satisfies."""
    problems = []
    for name, (_, path) in wheels.items():
        with zipfile.ZipFile(path) as archive:
            metadata_name = next(n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
            metadata = email.parser.Parser().parsestr(archive.read(metadata_name).decode())
        for line in metadata.get_all("Requires-Dist") or []:
            requirement = Requirement(line)
            if requirement.marker is not None and not Marker(str(requirement.marker)).evaluate(MARKER_ENV):
                continue
            needed = canonicalize_name(requirement.name)
            if needed in wheels:
                if wheels[needed][0] not in requirement.specifier:
                    problems.append(f"{name} needs {requirement}, the bundle has {wheels[needed][0]}")
            elif needed not in ON_GPU_MACHINE:
                problems.append(f"{name} needs {requirement}: neither in the bundle nor on the GPU machine")
    return problems


def working_tree_bytes() -> int:
    """What the GPU tool copies: git-tracked plus untracked files that git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return sum((REPO / name).stat().st_size for name in listed if name and (REPO / name).is_file())


def report(folder: Path) -> int:
    wheels = bundled_wheels(folder)
    expected = {canonicalize_name(n): v for n, v in pinned_versions().items()}
    absent = [f"{n}=={v}" for n, v in expected.items() if wheels.get(n, ("",))[0] != v]
    problems = missing_requirements(wheels)
    tree = working_tree_bytes()
    total_wheels = sum(path.stat().st_size for _, path in wheels.values())
    print(f"{'wheel':<80} {'MiB':>6}")
    for _, path in sorted(wheels.values(), key=lambda item: -item[1].stat().st_size):
        print(f"{path.name:<80} {path.stat().st_size / 2**20:6.2f}")
    print(f"{'wheels':<80} {total_wheels / 2**20:6.2f}")
    print(f"{'working tree (tracked + untracked-not-ignored)':<80} {tree / 2**20:6.2f}")
    total = tree + total_wheels
    verdict = "fits" if total < LIMIT_BYTES else "DOES NOT FIT"
    print(f"{'bundle':<80} {total / 2**20:6.2f}  ({verdict} the 64 MiB limit)")
    for line in [f"missing wheel: {a}" for a in absent] + problems:
        print(f"error: {line}")
    return 0 if total < LIMIT_BYTES and not absent and not problems else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="do not download: check the folder and the size")
    parser.add_argument("--dir", type=Path, default=WHEELS, help="wheel folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.check:
        download(args.dir)
    elif not args.dir.is_dir():
        print(f"error: {args.dir} does not exist: run benchmarks/gpu_wheels.py without --check first", file=sys.stderr)
        return 1
    return report(args.dir)


if __name__ == "__main__":
    sys.exit(main())
