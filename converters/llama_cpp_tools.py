"""llama.cpp's Python conversion tools, taken from a PyPI package.

``convert_hf_to_gguf.py`` (with its sibling ``conversion/`` package and the ``gguf-py`` tree of
the *same* llama.cpp revision) is not on PyPI as such, but the llama-cpp-python source
distribution vendors the whole llama.cpp tree. ``ensure_llama_cpp_tools()`` finds an extracted
copy, or fetches that sdist with ``pip download --no-binary :all:`` and extracts only the few
files the converter needs (~2 MB). The quantizer is llama.cpp's own C function, reached
through the installed llama-cpp-python (same version as the sdist).

Where the tools live (first hit wins):

1. ``$MLXB_LLAMA_CPP_TOOLS`` (a folder holding ``convert_hf_to_gguf.py``; installed there if empty)
2. ``<venv>/share/mlxbackend/llama.cpp-<version>`` (what ``make install-gguf`` prepares)
3. ``~/.cache/mlxbackend/llama.cpp-<version>``

Command line (used by ``make install-gguf``): ``python -m converters.llama_cpp_tools [--dest DIR]
[--sdist FILE.tar.gz] [--check]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from mlxbackend import publish

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
ENV_DIR = "MLXB_LLAMA_CPP_TOOLS"
CONVERTER = "convert_hf_to_gguf.py"
# Paths under the sdist's vendor/llama.cpp that the converter needs at run time.
NEEDED = (CONVERTER, "conversion/", "gguf-py/gguf/", "gguf-py/pyproject.toml", "LICENSE")
MARKER = ".mlxbackend-complete"
# Python modules the converter imports (module -> pip name).
CONVERTER_MODULES = {
    "torch": "torch",
    "numpy": "numpy",
    "safetensors": "safetensors",
    "transformers": "transformers",
    "sentencepiece": "sentencepiece",
    "yaml": "pyyaml",
    "tqdm": "tqdm",
}

INSTALL_HINT = (
    "GGUF export is not part of the serving install (`make run`): install it with "
    "`make install-gguf` in the mlxbackend checkout, `scripts/install.sh --with-gguf`, or "
    "`pip install 'mlxbackend[gguf]'` (on Linux first `pip install torch==2.13.0` from the CPU "
    "index, https://download.pytorch.org/whl/cpu) and then "
    "`python -m converters.llama_cpp_tools`"
)


class ToolsMissing(RuntimeError):
    """llama.cpp's converter, its Python dependencies or llama-cpp-python are not installed."""


def _version() -> str:
    return LLAMA_CPP_PYTHON_VERSION


def candidate_dirs() -> list[Path]:
    """Folders searched for the tools, in order."""
    env = os.environ.get(ENV_DIR)
    if env:
        return [Path(env).expanduser()]
    name = f"llama.cpp-{_version()}"
    dirs = []
    if sys.prefix != sys.base_prefix:  # inside a venv
        dirs.append(Path(sys.prefix) / "share" / "mlxbackend" / name)
    dirs.append(Path.home() / ".cache" / "mlxbackend" / name)
    return dirs


def _complete(d: Path) -> bool:
    return (
        (d / CONVERTER).is_file()
        and (d / "gguf-py" / "gguf").is_dir()
        and ((d / MARKER).is_file() or (d / "conversion").is_dir())
    )


def find_llama_cpp_tools() -> Path | None:
    """The folder holding ``convert_hf_to_gguf.py``, or None when not installed."""
    for d in candidate_dirs():
        if _complete(d):
            return d
    return None


def _writable_target() -> Path:
    for d in candidate_dirs():
        parent = d.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(parent, os.W_OK):
            return d
    raise ToolsMissing(f"no writable folder for llama.cpp's tools among {candidate_dirs()}")


def download_sdist(dest: Path) -> Path:
    """``pip download`` the llama-cpp-python source distribution into ``dest``."""
    spec = f"llama-cpp-python=={_version()}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-q", spec, "-d", str(dest)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if res.returncode != 0 or not found:
        raise ToolsMissing(
            f"could not download the {spec} source package with pip "
            f"({' '.join(cmd)}): {(res.stderr or res.stdout).strip()[-2000:]}"
        )
    return found[0]


def extract_tools(sdist: Path, dest: Path) -> Path:
    """Extract the converter files from a llama-cpp-python sdist into ``dest`` (atomically)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = publish.temp_name(dest)
    tmp.mkdir()
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            members = []
            for m in tar.getmembers():
                parts = m.name.split("/", 1)
                if len(parts) < 2 or not parts[1].startswith("vendor/llama.cpp/"):
                    continue
                rel = parts[1][len("vendor/llama.cpp/") :]
                if not (m.isfile() or m.isdir()) or not any(
                    rel == n or (n.endswith("/") and rel.startswith(n)) for n in NEEDED
                ):
                    continue
                if "__pycache__" in rel or rel.endswith(".pyc"):
                    continue
                m.name = rel
                members.append(m)
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **kwargs)
        if not (tmp / CONVERTER).is_file() or not (tmp / "gguf-py" / "gguf").is_dir():
            raise ToolsMissing(f"{sdist} does not contain vendor/llama.cpp/{CONVERTER} and gguf-py")
        (tmp / MARKER).write_text(f"llama-cpp-python {_version()} sdist: {Path(sdist).name}\n")
        try:
            publish.place_folder(
                tmp, dest
            )  # an existing dest is replaced only once this one is complete
        except OSError:  # another process installed it meanwhile
            if not _complete(dest):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def ensure_llama_cpp_tools(
    *, download: bool = True, sdist: str | os.PathLike | None = None, dest=None
) -> Path:
    """Return the folder with ``convert_hf_to_gguf.py``, installing it first when missing.

    ``sdist``: a local llama-cpp-python ``.tar.gz`` to extract instead of downloading one;
    ``dest``: install/look there instead of the default folders; ``download=False`` only looks.
    """
    if dest is not None:
        dest = Path(dest).expanduser()
        if _complete(dest) and sdist is None:
            return dest
    else:
        found = find_llama_cpp_tools()
        if found is not None and sdist is None:
            return found
    if sdist is None and not download:
        where = dest or " or ".join(str(d) for d in candidate_dirs())
        raise ToolsMissing(
            f"llama.cpp's {CONVERTER} is not installed (looked in {where}); {INSTALL_HINT}"
        )
    target = dest or _writable_target()
    if sdist is not None:
        return extract_tools(Path(sdist), target)
    with tempfile.TemporaryDirectory(prefix="mlxb-llama-sdist-") as tmp:
        return extract_tools(download_sdist(Path(tmp)), target)


def missing_converter_modules() -> list[str]:
    """pip names of the converter's Python dependencies that are not importable."""
    return [pip for mod, pip in CONVERTER_MODULES.items() if importlib.util.find_spec(mod) is None]


def check_converter_deps() -> None:
    missing = missing_converter_modules()
    if missing:
        raise ToolsMissing(
            f"llama.cpp's {CONVERTER} needs Python packages that are not installed: "
            f"{', '.join(missing)}; {INSTALL_HINT}"
        )


def check_quantizer() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        raise ToolsMissing(
            "quantizing to this GGUF type uses llama.cpp's quantizer from llama-cpp-python, which "
            f"is not installed: `pip install 'mlxbackend[llamacpp]'` (llama-cpp-python=={_version()}; "
            "`make install-gguf` or `scripts/install.sh --with-gguf` does it)"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m converters.llama_cpp_tools",
        description="Install llama.cpp's convert_hf_to_gguf.py (+ gguf-py) from the "
        f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} source package on PyPI.",
    )
    parser.add_argument("--dest", help="install into this folder instead of the default")
    parser.add_argument("--sdist", help="use this local llama-cpp-python .tar.gz, no download")
    parser.add_argument("--check", action="store_true", help="only report, install nothing")
    args = parser.parse_args(argv)
    try:
        path = ensure_llama_cpp_tools(download=not args.check, sdist=args.sdist, dest=args.dest)
    except ToolsMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    missing = missing_converter_modules()
    if missing:
        print(f"warning: the converter also needs: {', '.join(missing)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
