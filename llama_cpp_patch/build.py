"""Build llama.cpp with the Doubter patch (shared library + the `llama-doubter` tool) into a cache directory.

The llama.cpp sources come from the `llama-cpp-python==0.3.36` sdist (`vendor/llama.cpp`), fetched with pip and
checked against a pinned sha256. The build lands in `$PEFT_DOUBTER_LLAMA_CPP_CACHE/<hash>/` (default
`~/.cache/peft-doubter/llama.cpp/<hash>/`), where <hash> covers the patch, the tool sources and the generated key
header; a finished build is reused. Usage: `python llama_cpp_patch/build.py [--jobs N] [--force]` (the build
directory on stdout, the log on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


PATCH_DIR = Path(__file__).resolve().parent
PATCH = PATCH_DIR / "doubter.patch"
TOOL_DIR = PATCH_DIR / "tool"
# A source checkout has src/peft_doubter/ beside this folder; an installed wheel has this folder inside peft_doubter/.
PACKAGE_DIR = next((p for p in (PATCH_DIR.parent / "src" / "peft_doubter", PATCH_DIR.parent)
                    if (p / "deploy" / "sidecar_format.py").is_file()), PATCH_DIR.parent)
SDIST_REQUIREMENT = "llama-cpp-python==0.3.36"
SDIST_NAME = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VENDOR_PREFIX = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
CACHE_ENV = "PEFT_DOUBTER_LLAMA_CPP_CACHE"
SDIST_ENV = "PEFT_DOUBTER_LLAMA_CPP_SDIST"  # optional: a local copy of the sdist (offline builds)
DONE = "build-info.json"  # written last: its presence marks a finished build
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_COMMON=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_DOUBTER=ON",
    "-DGGML_CUDA=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_VULKAN=OFF",
)


def keys_header() -> str:
    """The C header with the sidecar's key and tensor names, generated from this checkout's
    `deploy/sidecar_format.py`. It is imported under a stand-in for the package root, so that its relative import of
    `names` works without running `peft_doubter/__init__.py` (which registers with PEFT and pulls in torch)."""
    root = "_doubter_build_package"
    if root not in sys.modules:
        package = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(root, None, is_package=True))
        package.__path__ = [str(PACKAGE_DIR)]
        sys.modules[root] = package
    return importlib.import_module(f"{root}.deploy.sidecar_format").c_header()


def source_hash() -> str:
    """sha256 over everything that determines the build: sdist, patch, tool sources, key header, CMake flags."""
    digest = hashlib.sha256()
    parts = [("sdist", SDIST_SHA256.encode()), ("flags", "\n".join(CMAKE_FLAGS).encode()),
             ("header", keys_header().encode()), ("patch", PATCH.read_bytes())]
    parts += [(f"tool/{p.name}", p.read_bytes()) for p in sorted(TOOL_DIR.iterdir()) if p.is_file()]
    for name, data in parts:
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "peft-doubter" / "llama.cpp")


def build_dir() -> Path:
    """Where the build for the current sources lives (finished or not)."""
    return cache_root() / source_hash()


def find_build() -> Path | None:
    """The finished build for the current sources, or None."""
    path = build_dir()
    return path if (path / DONE).is_file() else None


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(cmd: list[str], log, cwd: Path | None = None) -> None:
    log("+ " + " ".join(cmd))
    result = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"command failed ({result.returncode}): {' '.join(cmd)}\n{result.stdout[-6000:]}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch_sdist(workdir: Path, log) -> Path:
    local = os.environ.get(SDIST_ENV)
    if local:
        sdist = Path(local)
    else:
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", SDIST_REQUIREMENT,
              "-d", str(workdir)], log)
        sdist = workdir / SDIST_NAME
    digest = _sha256(sdist)
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{sdist} has sha256 {digest}, expected {SDIST_SHA256}")
    return sdist


def _extract_llama_cpp(sdist: Path, dest: Path) -> None:
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            if member.name.startswith(VENDOR_PREFIX) and len(member.name) > len(VENDOR_PREFIX):
                member.name = member.name[len(VENDOR_PREFIX):]
                members.append(member)
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **safe)
    (dest / ".git").unlink(missing_ok=True)  # a submodule pointer that would confuse git-based tools


def _log_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def build(jobs: int | None = None, force: bool = False, log=_log_stderr) -> Path:
    """Build (or reuse) the patched llama.cpp; returns the build directory (binaries under `build/bin`)."""
    path = build_dir()
    with _lock(cache_root() / f"{path.name}.lock"):
        if (path / DONE).is_file() and not force:
            return path
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        start = time.monotonic()
        with tempfile.TemporaryDirectory(dir=cache_root()) as tmp:
            sdist = _fetch_sdist(Path(tmp), log)
            _extract_llama_cpp(sdist, path / "src")
        fetched = time.monotonic()
        _run(["patch", "-p1", "--batch", "--forward", "-i", str(PATCH)], log, cwd=path / "src")
        shutil.copytree(TOOL_DIR, path / "src" / "tools" / "doubter")
        (path / "src" / "src" / "llama-doubter-keys.h").write_text(keys_header())
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        _run(["cmake", "-S", str(path / "src"), "-B", str(path / "build"), *generator, *CMAKE_FLAGS], log)
        configured = time.monotonic()
        jobs = str(jobs or os.cpu_count() or 1)
        _run(["cmake", "--build", str(path / "build"), "--target", "llama-doubter", "-j", jobs], log)
        done = time.monotonic()
        seconds = {"fetch_extract": fetched - start, "patch_configure": configured - fetched,
                   "compile": done - configured, "total": done - start}
        info = {"hash": path.name, "sdist": SDIST_REQUIREMENT, "sdist_sha256": SDIST_SHA256,
                "cmake_flags": CMAKE_FLAGS, "seconds": {k: round(v, 1) for k, v in seconds.items()}}
        (path / DONE).write_text(json.dumps(info, indent=2) + "\n")
        log(f"built {path} in {done - start:.0f} s")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=None, help="Parallel compile jobs (default: all cores).")
    parser.add_argument("--force", action="store_true", help="Rebuild even if a finished build exists.")
    parser.add_argument("--print-dir", action="store_true", help="Only print the build directory for these sources.")
    args = parser.parse_args()
    if args.print_dir:
        print(build_dir())
        return
    print(build(jobs=args.jobs, force=args.force))


if __name__ == "__main__":
    main()
