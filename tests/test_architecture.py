"""The house's rules, checked on the source: no import cycles, a light servicer, explicit adapters."""

import ast
import subprocess
import sys
from pathlib import Path

from mlxbackend.proto import backend_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mlxbackend"
HEAVY = ("mlx", "mlx_lm", "mlx_whisper", "transformers", "diffusionkit", "torch")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def first_party_imports(path: Path, modules: set) -> set:
    """Every mlxbackend module `path` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text(), str(path))
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n in modules and n != this)
    return found


def import_graph() -> dict:
    files = [p for p in PACKAGE.rglob("*.py") if "proto" not in p.parts]
    modules = {module_name(p) for p in files}
    return {module_name(p): first_party_imports(p, modules) for p in files}


def find_cycle(graph: dict) -> list:
    """One cycle as a list of modules, or []."""
    state: dict = {}
    stack: list = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_the_package_modules():
    graph = import_graph()
    assert len(graph) > 50 and graph["mlxbackend.servicer"]  # the walk sees the package
    cycle = find_cycle(graph)
    assert not cycle, " -> ".join(cycle)


def test_jobs_and_capabilities_do_not_import_the_grpc_layer():
    graph = import_graph()
    rpc = {"mlxbackend.servicer", "mlxbackend.server"}
    offenders = {
        m: sorted(deps & rpc)
        for m, deps in graph.items()
        if deps & rpc and m not in rpc | {"mlxbackend.cli"}
    }
    assert not offenders, offenders


def test_importing_the_servicer_imports_no_heavy_library():
    code = (
        "import sys, mlxbackend.servicer, mlxbackend.server, mlxbackend.host\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def _fields_read(function_name: str) -> set:
    """`request.<field>` attributes read inside a servicer function."""
    tree = ast.parse((PACKAGE / "servicer.py").read_text())
    fn = next(
        n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function_name
    )
    return {
        n.attr
        for n in ast.walk(fn)
        if isinstance(n, ast.Attribute)
        and isinstance(n.value, ast.Name)
        and n.value.id == "request"
    }


def test_job_requests_are_adapted_field_by_field():
    """Every FineTuneRequest / QuantizationRequest field is read by name: a field can be followed
    from the RPC to where it acts, and none is dropped silently or splatted."""
    for message, adapter in (
        (pb.FineTuneRequest, "fine_tune_config"),
        (pb.QuantizationRequest, "quantization_config"),
    ):
        names = {f.name for f in message.DESCRIPTOR.fields}
        assert names == _fields_read(adapter), (message.__name__, names ^ _fields_read(adapter))
    source = (PACKAGE / "servicer.py").read_text()
    assert "DESCRIPTOR.fields" not in source and "**fields" not in source


def test_tree_is_ruff_formatted():
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        import pytest

        pytest.skip("ruff is installed by the test extra")
    out = subprocess.run(
        [str(ruff), "format", "--check", "mlxbackend", "converters", "tests", "scripts"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
