"""The package's layout (the map in omni_helpers/__init__.py): each layer imports only from itself and the
layers below it, no module imports back into one that imports it, and requests are built without MindSpore."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest

from tests.script_runs import ROOT

PACKAGE = ROOT / "omni_helpers"
LAYERS = [  # bottom first, as the package docstring lists them
    "request",
    "patching",
    "measuring",
    "runtime",
    "parallel",
    "mindone_changes",
    "loading",
    "generation",
    "outputs",
    "serving",
]


def module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path) -> set[str]:
    """The omni_helpers modules a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("omni_helpers"):
            assert node.level == 0, f"{path}: a relative import; the package imports by full name"
            for alias in node.names:
                as_module = f"{node.module}.{alias.name}"
                found.add(
                    as_module if (PACKAGE.parent / (as_module.replace(".", "/") + ".py")).exists() else node.module
                )
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("omni_helpers")}
    return found


def layer_of(module: str) -> int:
    return LAYERS.index(module.split(".")[1])


def package_graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def test_every_folder_and_top_module_is_a_layer_of_the_map():
    tops = {path.stem for path in PACKAGE.iterdir() if path.suffix == ".py" or (path / "__init__.py").exists()}
    assert tops - {"__init__", "__pycache__"} == set(LAYERS)
    docstring = (PACKAGE / "__init__.py").read_text()
    positions = [re.search(rf"^    {layer}[/.]", docstring, re.M).start() for layer in LAYERS]
    assert positions == sorted(positions), "the package docstring lists the layers bottom first"


def test_each_layer_imports_only_from_itself_and_the_layers_below():
    upward = [
        f"{module} -> {imported}"
        for module, imported_modules in package_graph().items()
        if module != "omni_helpers"
        for imported in imported_modules
        if imported != "omni_helpers" and layer_of(imported) > layer_of(module)
    ]
    assert upward == []


def test_no_module_imports_one_that_imports_it():
    graph = package_graph()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for following in graph.get(start, ()):
            if following == goal or (
                following not in seen and not seen.add(following) and reaches(following, goal, seen)
            ):
                return True
        return False

    assert [module for module in graph if reaches(module, module, set())] == []


def test_a_script_checks_its_request_without_importing_mindspore():
    code = (
        "import sys\n"
        "import omni_helpers.request.cli, omni_helpers.request.validation, omni_helpers.request.request_files\n"
        "import omni_helpers.request.cancellation, omni_helpers.serving.openai_api\n"
        "print(sorted(name for name in ('mindspore', 'mindone', 'torch') if name in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]])
def test_the_code_is_formatted_and_its_imports_sorted_and_used_as_pyproject_toml_says(command):
    done = subprocess.run([sys.executable, "-m", "ruff", *command, "."], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, (
        f"run `ruff format .` and `ruff check --fix .` here:\n{done.stdout[-2000:]}{done.stderr[-1000:]}"
    )
