"""The package layout is a picture of the architecture: modules stand in layers, each importing only its own layer
and the ones below (followed through modules, transitively, including imports inside functions, under
TYPE_CHECKING, and the CLI's verbs, which it imports by name); no two modules import each other; the synthetic world
(chatloop/world/) stands above the loop, which never names it, so only the demo pipeline and the CLI reach it."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import pytest

import chatloop
from chatloop import lora
from chatloop.cli import VERBS
from chatloop.train import trainer

ROOT = Path(chatloop.__file__).parent

# Bottom to top. A module imports from its own layer and the layers below, never above (docs/ARCHITECTURE.md draws
# them). A new module takes its place here.
LAYERS: list[tuple[str, set[str]]] = [
    ("base", {"chatloop", "chatloop.errors", "chatloop.io", "chatloop.config"}),
    ("model", {"chatloop.model", "chatloop.tokenizer"}),
    ("runtime", {"chatloop.engine", "chatloop.checkpoint", "chatloop.lora", "chatloop.device",
                 "chatloop.distributed"}),
    ("data", {"chatloop.data.*"}),
    ("stages", {"chatloop.train.*", "chatloop.sample", "chatloop.generate", "chatloop.evaluate",
                "chatloop.model_import", "chatloop.export"}),
    ("apps", {"chatloop.labeling.*", "chatloop.serve.*"}),
    ("loop", {"chatloop.realloop", "chatloop.report"}),
    ("world", {"chatloop.world.*"}),
    ("demo", {"chatloop.pipeline", "chatloop.demo"}),
    ("cli", {"chatloop.cli"}),
]
WORLD = next(i for i, (name, _) in enumerate(LAYERS) if name == "world")
# Every module outside the world that reaches it, through any chain of imports: `chatloop run` and `chatloop demo`
# play the world's users and labelers, and the CLI names every verb.
WORLD_USERS = {"chatloop.pipeline", "chatloop.demo", "chatloop.cli"}
# The verbs whose work is the world's own: write it, rank with its simulated labelers, work the labeling app as them.
WORLD_VERBS = {"world", "rank", "label simulate"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports() -> dict[str, set[str]]:
    """Each chatloop module -> the chatloop modules it imports anywhere in its source (also inside functions and
    under TYPE_CHECKING): `from chatloop.a import b` counts as chatloop.a.b where that is a module; the CLI
    imports each verb's module."""
    found_modules = modules()
    graph: dict[str, set[str]] = {}
    for name, path in found_modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in found_modules else node.module
                          for a in node.names}
        if name == "chatloop.cli":
            found |= {module for module, *_ in VERBS.values()}
        graph[name] = {m for m in found if m in found_modules and m != name}
    return graph


def layer(module: str) -> int:
    for i, (_, members) in enumerate(LAYERS):
        if module in members or any(p.endswith(".*") and (module + ".").startswith(p[:-1]) for p in members):
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py: give it its place")


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every module `start` reaches through imports, with one chain of imports that gets there."""
    paths = {start: [start]}
    todo = [start]
    while todo:
        m = todo.pop()
        for d in sorted(graph[m]):
            if d not in paths:
                paths[d] = paths[m] + [d]
                todo.append(d)
    del paths[start]
    return paths


def test_every_module_has_a_layer_and_no_import_runs_up_even_through_other_modules():
    graph = imports()
    assert any(m.startswith("chatloop.world.") for m in graph), "chatloop/world/ is missing"
    upward = []
    for m in sorted(graph):
        for target, path in sorted(reachable(graph, m).items()):
            if layer(target) > layer(m):
                upward.append(f"{m} ({LAYERS[layer(m)][0]}) reaches {target} ({LAYERS[layer(target)][0]}): "
                              + " -> ".join(path))
    assert not upward, "imports that run up a layer:\n" + "\n".join(upward)


def test_only_the_demo_pipeline_and_the_cli_reach_the_synthetic_world():
    graph = imports()
    users = {m for m in graph if layer(m) != WORLD and any(layer(t) == WORLD for t in reachable(graph, m))}
    assert users == WORLD_USERS, f"the modules outside the world that reach it: {sorted(users)}"
    world_verbs = {verb for verb, (module, *_) in VERBS.items() if layer(module) == WORLD}
    assert world_verbs == WORLD_VERBS, "every other verb (`chatloop ppo`, `eval`, ...) runs without the world"


def test_the_loop_never_names_the_world_in_its_code():
    """A plug-in the loop loads by name (`--judge`, `--reward_fn`: chatloop.config.resolve_function) is given by
    the caller; a default or a string in the loop's code that names the world would be an import in disguise.
    Docstrings may say where the world's plug-ins are."""
    named = []
    for name, path in sorted(modules().items()):
        if layer(name) >= WORLD:
            continue
        tree = ast.parse(path.read_text(), str(path))
        docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
        named += [f"{path.relative_to(ROOT.parent)}:{n.lineno}: {n.value!r}" for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and isinstance(n.value, str) and "chatloop.world" in n.value
                  and id(n) not in docstrings]
    assert not named, "the loop names the world:\n" + "\n".join(named)


def test_no_import_cycles_among_chatloops_modules():
    graph = {m: deps - {"chatloop"} for m, deps in imports().items()}  # every module imports the package first
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module_name, config_name", [
    ("chatloop.train.pretrain", "PretrainConfig"), ("chatloop.train.sft", "SFTConfig"),
    ("chatloop.train.reward", "RMConfig"), ("chatloop.train.dpo", "DPOConfig"), ("chatloop.train.ppo", "PPOConfig"),
])
def test_every_field_a_stage_lists_in_help_is_read_by_it(module_name, config_name):
    """A `--help` field the stage does nothing with is a bug: each field is read as `cfg.FIELD` by the stage's
    module or by the helpers every stage calls (trainer: opening, optimizer, schedule; lora: the adapter)."""
    module = importlib.import_module(module_name)
    text = "\n".join(inspect.getsource(m) for m in (module, trainer, lora))
    unread = [f.name for f in dataclasses.fields(getattr(module, config_name))
              if not re.search(rf"\bcfg\.{f.name}\b", text)]
    assert not unread, f"{config_name}: fields nothing reads: {unread}"


def test_no_function_is_over_100_lines():
    """Long functions hide steps: a stage's numbered steps are helpers of their own once the stage outgrows a
    screenful or two."""
    long = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 100:
                long.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name} "
                            f"({node.end_lineno - node.lineno + 1} lines)")
    assert not long, "functions over 100 lines:\n" + "\n".join(long)
