"""The shape of the codebase: flat files that import each other without cycles, each small
enough to read, and a core that never imports the reference libraries."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ("layers.py", "checkpoints.py", "vision.py", "connectors.py", "pretraining.py", "adapters.py", "decoding.py",
        "model.py", "data.py", "train.py", "eval.py")


def local_imports(path: Path, local: set[str]) -> set[str]:
    """The repository's own top-level modules that `path` imports, at any depth of the file."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    return imported & local


def test_no_import_cycle_among_top_level_files():
    files = {path.stem: path for path in ROOT.glob("*.py")}
    graph = {name: local_imports(path, set(files)) - {name} for name, path in files.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for imported in sorted(graph[name]):
            assert state.get(imported) != "open", f"import cycle: {' -> '.join(trail + [name, imported])}"
            if imported not in state:
                visit(imported, trail + [name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_core_files_stay_readable_and_free_of_reference_libraries():
    for name in CORE:
        source = (ROOT / name).read_text()
        assert len(source.splitlines()) <= 1000, f"{name} has {len(source.splitlines())} lines"
        modules = {module for module in local_imports(ROOT / name, {"transformers", "peft", "timm"})}
        assert not modules, f"{name} imports {modules}"
