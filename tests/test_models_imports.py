"""The model zoo knows nothing of the run config: `actionrec/models/` takes plain keyword options, and the
run config -> model bridge (`actionrec.engine.run_model.build_model_for`) lives outside it."""

import ast

import pytest

from tests.train_fixtures import REPO, modules_loaded_by

MODELS_DIR = REPO / "actionrec" / "models"
RUN_SIDE = ("actionrec.config", "actionrec.engine")  # the engine imports the run config


def imported_modules(path):
    """Every module a file imports, at top level or lazily inside a function (relative imports resolved)."""
    package = "actionrec.models"
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]  # `from actionrec import config`
    return names


@pytest.mark.parametrize("path", sorted(MODELS_DIR.rglob("*.py")), ids=lambda p: p.relative_to(MODELS_DIR).as_posix())
def test_no_model_file_imports_the_run_config(path):
    offending = [name for name in imported_modules(path)
                 if any(name == side or name.startswith(side + ".") for side in RUN_SIDE)]
    assert not offending, f"{path.relative_to(REPO)} imports {offending}: models must not know the run config"


def test_importing_the_model_zoo_loads_no_run_config():
    loaded = modules_loaded_by("import actionrec.models")
    assert "actionrec.models.registry" in loaded
    assert not [name for name in loaded if name.startswith(RUN_SIDE)]
