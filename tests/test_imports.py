"""Imports point one way, read from the AST of every file (imports inside functions included):

  method files (the paper: encoder, grouping, kernels, adapters, loss, few-shot probe) import only
    each other;
  plumbing (data, checkpoint, files, command line, runtime, training) imports method files and
    plumbing;
  only the entry points import tools/, and nothing in the project forms a cycle, tools/ included.
"""
import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD = {"model", "grouping", "kernels", "adapters", "loss", "fewshot"}
PLUMBING = {"data", "checkpoint", "files", "cli", "runtime", "training"}
ENTRY_POINTS = {"train_stage1", "train_stage2", "evaluate"}


def project_modules():
    """{module name: path} of every .py of the repository outside tests/."""
    modules = {}
    for folder in ("", "tools"):
        for name in sorted(os.listdir(os.path.join(REPO, folder))):
            if name.endswith(".py") and name != "__init__.py":
                module = (folder + "." if folder else "") + name[:-3]
                modules[module] = os.path.join(REPO, folder, name)
    return modules


def imports_of(path, modules):
    """The project modules a file imports anywhere in it (`from tools import x` counts as
    tools.x)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def graph():
    modules = project_modules()
    return {m: imports_of(path, modules) - {m} for m, path in modules.items()}


def test_every_top_level_file_has_a_place():
    top = {m for m in project_modules() if not m.startswith("tools.")}
    assert top == METHOD | PLUMBING | ENTRY_POINTS, top ^ (METHOD | PLUMBING | ENTRY_POINTS)


def test_method_files_import_only_method_files():
    edges = graph()
    for m in METHOD:
        assert edges[m] <= METHOD, (m, edges[m] - METHOD)


def test_plumbing_imports_no_tooling_and_no_entry_point():
    edges = graph()
    for m in PLUMBING:
        assert edges[m] <= METHOD | PLUMBING, (m, edges[m] - METHOD - PLUMBING)
    assert edges["files"] == set(), "files.py is the leaf: it imports nothing from the project"


def test_only_entry_points_use_tools():
    edges = graph()
    for m, deps in edges.items():
        if not m.startswith("tools.") and any(d.startswith("tools.") for d in deps):
            assert m in ENTRY_POINTS, (m, deps)


def test_no_cycles_anywhere():
    edges = graph()
    state = {}  # module -> "open" while on the path, "done" after

    def visit(m, path):
        state[m] = "open"
        for d in sorted(edges[m]):
            assert state.get(d) != "open", " -> ".join(path + [d])
            if d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


def test_the_checker_sees_function_level_imports(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from tools import synthetic\n    import data\n")
    assert (imports_of(str(source), {"tools.synthetic": "", "data": ""})
            == {"tools.synthetic", "data"})


def test_commands_start_without_the_compiler():
    """Importing an entry point loads neither torch._dynamo nor open_clip: together they are about
    2-3 s of every command's start-up, and only --compile and CLIP weights need them."""
    import subprocess
    import sys

    code = ("import sys, train_stage1, train_stage2, evaluate; "
            "print(sorted({m.split('.')[0] for m in sys.modules "
            "if m.startswith(('torch._dynamo', 'open_clip'))}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout
