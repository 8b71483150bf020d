"""llama.cpp from the pinned llama-cpp-python source package: its sources, and its C++ `llama-server` built once.

Use it like this::

    python -m chatforge.models.llamacpp_build        # or `make llama-server`: builds and prints the binary's path
    sdist = llama_cpp_sdist()                         # the llama-cpp-python sdist, downloaded once (pip download)
    binary = build_llama_server()                     # ~/.cache/chatforge/llama.cpp/0.3.36-server/build/bin/...
    llama_server_binary()                             # that path if it is built, else None (tests skip on None)

The sdist vendors llama.cpp; the export takes its GGUF converter from it (`export.llama_cpp_converter`) and this
module builds its server with cmake (`-DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON`, Release, static libraries), about
5-10 minutes on 2 cores the first time. `llama-server --parallel N` batches continuously; `chatforge serve
--backend upstream --upstream-url http://host:port/v1` puts the gateway (keys, limits, metrics, feedback) in front.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from chatforge.models.source import cache_root

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
VENDORED_PREFIX = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"


class LlamaCppBuildError(RuntimeError):
    """The llama.cpp sources could not be fetched or built; the message says which step and shows its output."""


def llama_cpp_root() -> Path:
    """Where the GGUF converter is unpacked: ~/.cache/chatforge/llama.cpp/VERSION."""
    return cache_root() / "llama.cpp" / LLAMA_CPP_PYTHON_VERSION


def llama_server_root() -> Path:
    """Where llama-server's sources and build live: ~/.cache/chatforge/llama.cpp/VERSION-server/{src,build}."""
    return cache_root() / "llama.cpp" / f"{LLAMA_CPP_PYTHON_VERSION}-server"


def llama_cpp_sdist() -> Path:
    """The llama-cpp-python source archive, fetched once with `pip download` into the cache."""
    archive = llama_cpp_root().parent / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if archive.is_file():
        return archive
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chatforge-llamacpp-") as tmp:
        download = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", tmp],
            capture_output=True, text=True, check=False,
        )
        archives = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if download.returncode != 0 or not archives:
            raise LlamaCppBuildError("llama.cpp's sources come from PyPI (the llama-cpp-python source package); "
                                     f"`pip download` failed: {download.stderr.strip()[-300:]}")
        shutil.move(str(archives[0]), str(archive))
    return archive


def extract_vendored(target: Path, wanted: tuple[str, ...] = ("",)) -> Path:
    """Unpack the vendored llama.cpp files whose paths start with one of `wanted` ("" = all) into `target`."""
    with tempfile.TemporaryDirectory(prefix="chatforge-llamacpp-") as tmp:
        staging = Path(tmp) / "unpacked"
        with tarfile.open(llama_cpp_sdist()) as archive:
            members = [m for m in archive.getmembers()
                       if m.name.startswith(VENDORED_PREFIX) and m.name[len(VENDORED_PREFIX):].startswith(wanted)]
            archive.extractall(staging, members=members, filter="data")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(staging / VENDORED_PREFIX), str(target))
    return target


def llama_server_binary() -> Path | None:
    """The built `llama-server`, or None when `build_llama_server` has not run."""
    binary = llama_server_root() / "build" / "bin" / "llama-server"
    return binary if binary.is_file() else None


def build_llama_server(jobs: int = 2) -> Path:
    """Build llama.cpp's `llama-server` from the vendored sources (once; later calls return the binary)."""
    built = llama_server_binary()
    if built is not None:
        return built
    if shutil.which("cmake") is None:
        raise LlamaCppBuildError("building llama-server needs cmake and a C++ compiler (apt-get install cmake g++)")
    root = llama_server_root()
    source = extract_vendored(root / "src")
    build = root / "build"
    steps = [
        ["cmake", "-S", str(source), "-B", str(build), "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_SERVER=ON",
         "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
         "-DLLAMA_BUILD_EXAMPLES=OFF"],
        ["cmake", "--build", str(build), "--target", "llama-server", f"-j{jobs}"],
    ]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-10:])
            raise LlamaCppBuildError(f"`{' '.join(step[:3])} ...` failed:\n{tail}")
    binary = llama_server_binary()
    if binary is None:
        raise LlamaCppBuildError(f"the build finished but {build}/bin/llama-server is missing")
    return binary


if __name__ == "__main__":
    print(build_llama_server())
