"""The package layout is a picture of the architecture: the synthetic world (chatloop/world/) stands beside the loop,
and no two of chatloop's modules import each other, even inside a function or under TYPE_CHECKING."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import pytest

import chatloop
from chatloop.train import ppo as ppo_module
from chatloop.train import trainer

ROOT = Path(chatloop.__file__).parent

# Where the world may be used: the demo pipeline writes it and ranks with its labelers, eval and the report card
# score with its gold judge, the CLI names its verbs. Every other module is the loop a user runs on real data.
WORLD_USERS = {"chatloop.pipeline", "chatloop.demo", "chatloop.evaluate", "chatloop.report", "chatloop.cli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Each chatloop module -> the chatloop modules it imports anywhere in its source (also inside functions and
    under TYPE_CHECKING): `from chatloop.a import b` counts as chatloop.a.b where that is a module."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                          for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name and m != "chatloop"}
    return graph


def test_only_the_pipeline_eval_report_and_cli_use_the_synthetic_world():
    graph = imports()
    assert any(m.startswith("chatloop.world.") for m in graph), "chatloop/world/ is missing"
    users = {m for m, deps in graph.items() if not m.startswith("chatloop.world")
             and any(d.startswith("chatloop.world") for d in deps)}
    assert users <= WORLD_USERS, f"outside the world, only {sorted(WORLD_USERS)} may import it: {sorted(users)}"


def test_no_import_cycles_among_chatloops_modules():
    graph = imports()
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
    ("chatloop.world.gold", "GoldPPOConfig"),
])
def test_every_field_a_stage_lists_in_help_is_read_by_it(module_name, config_name):
    """A `--help` field the stage does nothing with is a bug: each field is read as `cfg.FIELD` by the stage's
    module (or the one it builds on) or by the trainer helpers every stage calls (optimizer, schedule)."""
    module = importlib.import_module(module_name)
    sources = [inspect.getsource(module), inspect.getsource(trainer)]
    if module_name == "chatloop.world.gold":
        sources.append(inspect.getsource(ppo_module))
    text = "\n".join(sources)
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
