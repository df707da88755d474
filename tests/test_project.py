"""Project-wide rules: public names, layering, optional extras, README."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import unbroken

SRC = Path(unbroken.__file__).parent
LAYERS = {"model": 1, "storage": 2, "engine": 3, "edges": 4}

PUBLIC = {
    "AmbiguityPolicyRequired", "AmbiguousEffect", "Context", "ControlIntegrity", "DecodeError",
    "EffectClass", "EncodeError", "EncryptionRequired", "Engine", "EngineNotOpen",
    "ExecutionCanceled", "ExecutionFailed", "ExecutionHandle", "ExecutionInfo",
    "ExecutionLocked", "ExecutionStatus", "IntegrityError", "IntegrityViolation", "Intent",
    "JournalUnavailable", "OnAmbiguous", "PayloadTooLarge", "PromiseRejected",
    "ReplayDivergence", "ReplayIntegrity", "RetryPolicy", "Step", "StepCapExceeded",
    "StepFailed", "StepHandle", "StepInfo", "StepOutcome", "UnbrokenError",
    "UnknownExecution", "UnknownPromise", "UnknownWorkflow", "__version__", "current_step",
}


def test_public_names_are_pinned() -> None:
    assert set(unbroken.__all__) == PUBLIC
    for name in unbroken.__all__:
        assert hasattr(unbroken, name), name


def test_errors_form_one_tree_under_unbroken_error() -> None:
    from unbroken import errors

    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.UnbrokenError), name
    assert issubclass(errors.ReplayIntegrity, errors.IntegrityError)
    assert issubclass(errors.ControlIntegrity, errors.IntegrityError)
    assert issubclass(errors.IntegrityViolation, errors.IntegrityError)


def test_execution_status_compares_equal_to_its_string() -> None:
    assert unbroken.ExecutionStatus.COMPLETED == "completed"
    assert [s.value for s in unbroken.ExecutionStatus] == [
        "running", "completed", "failed", "aborted", "canceled",
    ]


def _modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts)
        if path.name in ("__init__.py", "__main__.py"):
            continue
        found[name] = path
    return found


def _layer(path: Path) -> int:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    for label, rank in LAYERS.items():
        if f"(layer: {label})" in doc.replace("\n", " "):
            return rank
    raise AssertionError(f"{path} does not name its layer in its docstring")


def _imports(name: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    package = name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            base = base[: len(base) - node.level + 1]
            target = ".".join([*base, node.module] if node.module else base)
            out.add(target)
            out.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("unbroken"):
            out.add(str(node.module))
    return out


def test_imports_flow_down_the_layers() -> None:
    modules = _modules()
    layers = {name: _layer(path) for name, path in modules.items()}
    for package in ("unbroken.storage",):
        layers[package] = LAYERS["storage"]
    for name, path in modules.items():
        for target in _imports(name, path):
            if target in layers:
                assert layers[target] <= layers[name], f"{name} imports {target} from above"


def test_modules_stay_small() -> None:
    for name, path in _modules().items():
        assert len(path.read_text().splitlines()) <= 600, name


def test_import_unbroken_loads_no_optional_extra() -> None:
    code = (
        "import sys, unbroken, unbroken.testing\n"
        "heavy = ('psycopg', 'textual', 'opentelemetry', 'pydantic', 'click', 'nacl')\n"
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_cli_command_has_help_and_is_in_the_readme() -> None:
    from click.testing import CliRunner

    from unbroken.cli import main

    readme = (SRC.parent.parent / "README.md").read_text()
    runner = CliRunner()
    for name in main.commands:
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0, name
        assert f"unbroken {name}" in readme, f"README does not show 'unbroken {name}'"
