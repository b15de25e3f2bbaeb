"""The architecture's one rule: layers import only downward (core <- data, models <- engine <-
training, feedback, eval <- stages <- pipelines <- entry points), never a sibling package."""
import ast
import pathlib

LAYER = {"core": 0, "data": 1, "models": 1, "engine": 2, "training": 3, "feedback": 3, "eval": 3, "stages": 4,
         "pipelines": 5, "main": 6, "plan": 6, "plan_inputs": 6, "plan_decode": 6, "plan_tune": 6, "plan_report": 6,
         "evaluate": 6}
ROOT = pathlib.Path(__file__).parents[1] / "rlaifv_jax"


def test_no_module_imports_upward_or_sideways():
    bad = []
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            continue
        me = parts[0]
        assert me in LAYER, f"{path}: package {me!r} has no layer; add it to LAYER"
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlaifv_jax"):
                names = ([node.module] if node.module != "rlaifv_jax" else [f"rlaifv_jax.{a.name}" for a in node.names])
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("rlaifv_jax.")]
            for name in names:
                other = name.split(".")[1]
                if other != me and LAYER[other] >= LAYER[me] and not (LAYER[me] == 6 and LAYER[other] == 6):
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, bad
