"""Architecture test: the layering of DESIGN.md, enforced from the code's own imports.

Every module under node/ and protocol/ is read with `ast` (nothing is imported), so lazy imports
inside functions and `if TYPE_CHECKING:` blocks count like any other. Enforced:

1. no import cycles among project modules;
2. LAYERS: a module imports only from its own layer or lower ones, and every module is in one layer;
3. protocol/ imports nothing from node (the wire format stands alone);
4. only node/swarm/ imports hivemind (the p2p stack stays behind one seam);
5. only protocol/record.py calls `.sign(...)` (one place decides what a signature covers);
6. only node/identity.py creates or loads private keys;
7. only node/cli/ imports node.daemon (the CLI is the one thing that starts a node);
8. no module-level monkeypatching: no top-level assignment or `setattr` into an imported namespace.

Why: these are the seams the design relies on; a test keeps them from eroding one import at a time.

Import resolution: `import a.b.c` and `from a.b import c` both name `a.b.c`, and the edge goes to the
longest prefix of that name which is a project module; so `from node.x import func` is an edge to
node.x, and `from node.swarm import membership` one to node.swarm.membership when that is a module
(else to node.swarm). Importing node.swarm.x is not an edge to node or node.swarm: Python runs those
`__init__` files, but they are trivial, and counting them would make everything cycle through them.

Each check is a plain function `check_*(root, layers) -> list[str]` of violations, so the tests at
the bottom run the same checks on small fake trees to prove that each rule fails when broken.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

# The architecture diagram of DESIGN.md, in code. Layers lowest first; a module may import from its
# own layer and lower ones only. An entry is a module name or a prefix ending in ".*" (submodules
# only). A new module is added to the layer that owns its noun. Names not on disk (yet) are fine.
LAYERS = [
    ["protocol", "protocol.*"],
    ["node", "node.durable", "node.config", "node.logs"],
    ["node.manifest", "node.identity"],
    ["node.data", "node.preference"],
    ["node.tiny"],
    ["node.model"],
    ["node.shards", "node.checkpoint", "node.ledger", "node.receipt_sets", "node.credit", "node.metrics", "node.trainer", "node.rotation"],
    ["node.swarm", "node.swarm.exact", "node.swarm.deadline", "node.swarm.validator", "node.swarm.statements", "node.swarm.stores"],
    ["node.swarm.averager", "node.swarm.probe", "node.swarm.reach", "node.swarm.dht"],
    ["node.swarm.membership", "node.swarm.traffic", "node.swarm.outcome"],
    ["node.swarm.quorum"],
    ["node.swarm.swarm", "node.swarm.follow"],
    ["node.spotcheck", "node.receipts"],
    ["node.stack", "node.rounds", "node.statesync", "node.splitguard", "node.status", "node.control", "node.control_client", "node.republish"],
    ["node.dashboard", "node.console"],
    ["node.daemon", "node.export", "node.doctor", "node.demo", "node.serve", "node.serve_api", "node.swarmview"],
    ["node.cli", "node.cli.*", "node.__main__"],
]

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("node", "protocol")
SIGNER = "protocol.record"  # the one module that may call .sign(...)
KEY_OWNER = "node.identity"  # the one module that may create or load private keys
KEY_FUNCTIONS = {"load_pem_private_key", "load_der_private_key", "generate_private_key"}
KEY_CLASS_METHODS = {"generate", "from_private_bytes"}  # on Ed25519PrivateKey


# ---- reading the tree ---------------------------------------------------------------------------


@dataclass
class Module:
    name: str  # dotted name; a package's __init__ is the package's name
    rel: str  # path relative to the root, for messages
    tree: ast.Module
    is_pkg: bool


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def collect_modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """{dotted module name: path} for every .py file under the given packages."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def parse_modules(root: Path) -> dict[str, Module]:
    return {
        name: Module(name, path.relative_to(root).as_posix(),
                     ast.parse(path.read_text(encoding="utf-8"), str(path)), path.name == "__init__.py")
        for name, path in collect_modules(root).items()
    }


def imported_names(mod: Module) -> list[tuple[str, int]]:
    """(absolute dotted name, line) for every import statement anywhere in the file."""
    out = []
    for node in ast.walk(mod.tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: level 1 is the module's own package
                package = mod.name.split(".") if mod.is_pkg else mod.name.split(".")[:-1]
                keep = len(package) - (node.level - 1)
                if keep <= 0:
                    continue  # beyond the top-level package: Python refuses it anyway
                base = ".".join(package[:keep] + ([node.module] if node.module else []))
            out += [(base if a.name == "*" else f"{base}.{a.name}", node.lineno) for a in node.names]
    return sorted(out, key=lambda item: item[1])


def resolve(name: str, modules) -> str | None:
    """The longest prefix of `name` that is a project module, or None (not a project import)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in modules:
            return ".".join(parts[:i])
    return None


def import_edges(modules: dict[str, Module]) -> dict[str, dict[str, int]]:
    """{importer: {imported project module: first line}}; self-imports dropped."""
    edges: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, mod in modules.items():
        for imported, line in imported_names(mod):
            target = resolve(imported, modules)
            if target is not None and target != name:
                edges[name].setdefault(target, line)
    return edges


def layer_of(name: str, layers) -> set[int]:
    return {i for i, layer in enumerate(layers) for entry in layer
            if name == entry or (entry.endswith(".*") and name.startswith(entry[:-1]))}


# ---- the rules ----------------------------------------------------------------------------------


def _reach(start: str, edges) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _shortest_cycle(start: str, edges, group: set[str]) -> list[str]:
    parent, queue = {}, deque([start])
    while queue:
        cur = queue.popleft()
        for nxt in sorted(edges[cur]):
            if nxt == start:
                chain = [cur]
                while chain[-1] != start:
                    chain.append(parent[chain[-1]])
                return chain[::-1] + [start]
            if nxt in group and nxt not in parent:
                parent[nxt] = cur
                queue.append(nxt)
    raise AssertionError("unreachable: start is in its own cycle group")


def check_cycles(root: Path, layers=LAYERS) -> list[str]:
    """Rule 1: no import cycles. One message per cycle group (strongly connected component)."""
    modules = parse_modules(root)
    edges = import_edges(modules)
    reach = {name: _reach(name, edges) for name in edges}
    out, done = [], set()
    for name in sorted(edges):
        if name in done or name not in reach[name]:
            continue
        group = {other for other in reach[name] if name in reach[other]}
        done |= group
        chain = _shortest_cycle(name, edges, group)
        where = ", ".join(f"{modules[a].rel}:{edges[a][b]}" for a, b in zip(chain, chain[1:]))
        msg = f"import cycle: {' -> '.join(chain)}  [{where}]"
        if len(group) > len(chain) - 1:
            msg += f"  (whole cycle group: {', '.join(sorted(group))})"
        out.append(msg)
    return out


def check_layers(root: Path, layers=LAYERS) -> list[str]:
    """Rule 2: every module is in exactly one layer, and no module imports a higher layer."""
    modules = parse_modules(root)
    out, layer = [], {}
    for name, mod in sorted(modules.items()):
        found = layer_of(name, layers)
        if not found:
            out.append(f"{mod.rel}: module {name} is in no layer: add it to LAYERS in "
                       f"tests/test_layering.py (the layer that owns its noun)")
        elif len(found) > 1:
            out.append(f"{mod.rel}: module {name} is in more than one layer of LAYERS: {sorted(found)}")
        else:
            layer[name] = found.pop()
    for src, targets in sorted(import_edges(modules).items()):
        for dst, line in targets.items():
            if src in layer and dst in layer and layer[dst] > layer[src]:
                out.append(f"{modules[src].rel}:{line}: {src} (layer {layer[src]}) imports "
                           f"{dst} (layer {layer[dst]}), a higher layer")
    return out


def check_protocol_independent(root: Path, layers=LAYERS) -> list[str]:
    """Rule 3: protocol/ imports nothing from node."""
    return [f"{mod.rel}:{line}: protocol module {mod.name} imports {imported} from node"
            for mod in parse_modules(root).values() if _in(mod.name, "protocol")
            for imported, line in imported_names(mod) if _in(imported, "node")]


def check_hivemind_seam(root: Path, layers=LAYERS) -> list[str]:
    """Rule 4: only node/swarm/ imports hivemind."""
    return [f"{mod.rel}:{line}: imports {imported}; only node/swarm/ may import hivemind"
            for mod in parse_modules(root).values() if not _in(mod.name, "node.swarm")
            for imported, line in imported_names(mod) if _in(imported, "hivemind")]


def check_signing(root: Path, layers=LAYERS) -> list[str]:
    """Rule 5: only protocol/record.py calls a method named `sign`."""
    return [f"{mod.rel}:{node.lineno}: calls {ast.unparse(node.func)}(...); only {SIGNER} signs"
            for mod in parse_modules(root).values() if mod.name != SIGNER
            for node in ast.walk(mod.tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "sign"]


def _key_references(tree: ast.Module):
    classes = {"Ed25519PrivateKey"} | {a.asname for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                                        for a in n.names if a.name == "Ed25519PrivateKey" and a.asname}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in KEY_FUNCTIONS:
            yield node.lineno, node.id
        elif isinstance(node, ast.ImportFrom):
            yield from ((node.lineno, a.name) for a in node.names if a.name in KEY_FUNCTIONS)
        elif isinstance(node, ast.Attribute) and (node.attr in KEY_FUNCTIONS or (
                node.attr in KEY_CLASS_METHODS and (
                    (isinstance(node.value, ast.Name) and node.value.id in classes)
                    or (isinstance(node.value, ast.Attribute) and node.value.attr == "Ed25519PrivateKey")))):
            yield node.lineno, ast.unparse(node)


def check_private_keys(root: Path, layers=LAYERS) -> list[str]:
    """Rule 6: only node/identity.py creates or loads private keys."""
    return [f"{mod.rel}:{line}: uses {what}; only {KEY_OWNER} creates or loads private keys"
            for mod in parse_modules(root).values() if mod.name != KEY_OWNER
            for line, what in _key_references(mod.tree)]


def check_daemon_entry(root: Path, layers=LAYERS) -> list[str]:
    """Rule 7: only node.cli (and its submodules) imports node.daemon."""
    modules = parse_modules(root)
    return [f"{modules[src].rel}:{line}: {src} imports {dst}; only node.cli may start the daemon"
            for src, targets in sorted(import_edges(modules).items()) if not _in(src, "node.cli")
            for dst, line in targets.items() if _in(dst, "node.daemon")]


def _top_level(body):
    """Module-level statements, descending into if/try/with/for/while blocks but not defs/classes."""
    for stmt in body:
        yield stmt
        for field in ("body", "orelse", "finalbody"):
            if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield from _top_level(getattr(stmt, field, []))
        for handler in getattr(stmt, "handlers", []):
            yield from _top_level(handler.body)


def _root_name(node) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _targets(stmt):
    todo = list(stmt.targets) if isinstance(stmt, ast.Assign) else [stmt.target]
    while todo:
        target = todo.pop()
        if isinstance(target, (ast.Tuple, ast.List)):
            todo += target.elts
        elif isinstance(target, ast.Starred):
            todo.append(target.value)
        else:
            yield target


def _calls_outside_lambdas(node):
    if isinstance(node, ast.Call):
        yield node
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, ast.Lambda):
            yield from _calls_outside_lambdas(child)


def check_no_monkeypatching(root: Path, layers=LAYERS) -> list[str]:
    """Rule 8: no module-level assignment or setattr into an imported name's namespace."""
    out = []
    for mod in parse_modules(root).values():
        stmts = list(_top_level(mod.tree.body))
        imported = {a.asname or a.name.split(".")[0] for s in stmts if isinstance(s, ast.Import) for a in s.names}
        imported |= {a.asname or a.name for s in stmts if isinstance(s, ast.ImportFrom)
                     and s.module != "__future__" for a in s.names if a.name != "*"}
        for stmt in stmts:
            if isinstance(stmt, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                out += [f"{mod.rel}:{stmt.lineno}: module-level assignment to {ast.unparse(t)}, "
                        f"inside imported {_root_name(t)}" for t in _targets(stmt)
                        if isinstance(t, ast.Attribute) and _root_name(t) in imported]
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or hasattr(stmt, "body"):
                continue  # a compound statement's own body is visited as its own statements
            out += [f"{mod.rel}:{call.lineno}: module-level {ast.unparse(call)} on imported {_root_name(call.args[0])}"
                    for call in _calls_outside_lambdas(stmt)
                    if isinstance(call.func, ast.Name) and call.func.id == "setattr"
                    and call.args and _root_name(call.args[0]) in imported]
    return out


CHECKS = [check_cycles, check_layers, check_protocol_independent, check_hivemind_seam,
          check_signing, check_private_keys, check_daemon_entry, check_no_monkeypatching]


# ---- the real repository ------------------------------------------------------------------------


def test_checker_sees_the_repo():
    modules = collect_modules(REPO)
    assert {"protocol.record", "node.identity", "node.daemon", "node.cli"} <= set(modules)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_repo(check):
    violations = check(REPO, LAYERS)
    if violations:
        pytest.fail(f"{check.__name__}: {len(violations)} violation(s):\n  " + "\n  ".join(violations),
                    pytrace=False)


# ---- tests of the test: fake trees ----------------------------------------------------------------

FAKE_LAYERS = [
    ["protocol", "protocol.*"],
    ["node", "node.durable"],
    ["node.identity", "node.ghost"],  # node.ghost is not on disk: fine
    ["node.ledger"],
    ["node.swarm", "node.swarm.*"],
    ["node.daemon", "node.export"],
    ["node.cli", "node.cli.*"],
]

ED = "from cryptography.hazmat.primitives.asymmetric.ed25519 import "
CLEAN = {
    "protocol/__init__.py": "",
    "protocol/record.py": "def sign_record(key, body):\n    return key.sign(body)\n",
    "protocol/peerid.py": ED + "Ed25519PublicKey\nfrom . import record\n"
                          "def load(raw):\n    return Ed25519PublicKey.from_public_bytes(raw)\n",
    "node/__init__.py": "__version__ = '0.0'\n",
    "node/durable.py": "import os\nCACHE = {}\nCACHE['x'] = 1\n",
    "node/identity.py": ED + "Ed25519PrivateKey\n"
                        "from cryptography.hazmat.primitives.serialization import load_pem_private_key\n"
                        "from node import durable\ndef new_key():\n    return Ed25519PrivateKey.generate()\n",
    "node/ledger.py": "from node.durable import CACHE\nfrom protocol.record import sign_record\n"
                      "from protocol import peerid\n",
    "node/swarm/__init__.py": "",
    "node/swarm/helper.py": "from ..ledger import sign_record\n",
    "node/swarm/peer.py": "from typing import TYPE_CHECKING\nimport hivemind\nfrom hivemind.averaging import allreduce\n"
                          "from . import helper\nif TYPE_CHECKING:\n    from node.identity import new_key\n",
    "node/daemon.py": "import torch\nfrom node import __version__\nfrom node.swarm import peer\n"
                      "class Node:\n    torch.x = 1\n    def start(self):\n        torch.y = 1\n        self.key = None\n",
    "node/export.py": "def export():\n    from node.ledger import sign_record\n",
    "node/cli/__init__.py": "from node.daemon import Node\n",
    "node/cli/train.py": "def main():\n    from node import daemon\n",
}


def make_tree(root: Path, changes: dict[str, str] | None = None) -> Path:
    for rel, text in {**CLEAN, **(changes or {})}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_clean_fake_tree_passes(tmp_path, check):
    assert check(make_tree(tmp_path), FAKE_LAYERS) == []


def test_import_resolution(tmp_path):
    edges = import_edges(parse_modules(make_tree(tmp_path)))
    assert edges["node.daemon"] == {"node": 2, "node.swarm.peer": 3}  # not node.swarm
    assert edges["node.swarm.peer"] == {"node.swarm.helper": 4, "node.identity": 6}
    assert edges["node.swarm.helper"] == {"node.ledger": 1}
    assert edges["node.cli.train"] == {"node.daemon": 2}
    assert edges["protocol.peerid"] == {"protocol.record": 2}


BROKEN = [
    (check_cycles, {"node/ledger.py": CLEAN["node/ledger.py"] + "def f():\n    from node.swarm import helper\n"},
     "import cycle: node.ledger -> node.swarm.helper -> node.ledger"),
    (check_cycles, {"node/daemon.py": "def f():\n    from . import export\n",
                    "node/export.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from node.daemon import N\n"},
     "import cycle: node.daemon -> node.export -> node.daemon"),
    (check_layers, {"node/durable.py": "from node.ledger import x\n"},
     "node/durable.py:1: node.durable (layer 1) imports node.ledger (layer 3)"),
    (check_layers, {"node/identity.py": "def g():\n    import node.cli.train\n"}, "imports node.cli.train (layer 6)"),
    (check_layers, {"node/extra.py": ""}, "node.extra is in no layer: add it to LAYERS"),
    (check_protocol_independent, {"protocol/peerid.py": "def f():\n    from node.config import C\n"},
     "protocol/peerid.py:2: protocol module protocol.peerid imports node.config.C"),
    (check_hivemind_seam, {"node/daemon.py": "import hivemind\n"}, "node/daemon.py:1: imports hivemind"),
    (check_hivemind_seam, {"node/daemon.py": "def f():\n    from hivemind.p2p import P2P\n"},
     "node/daemon.py:2: imports hivemind.p2p.P2P"),
    (check_signing, {"node/ledger.py": "def f(key):\n    return key.sign(b'x')\n"}, "node/ledger.py:2: calls key.sign"),
    (check_private_keys, {"node/daemon.py": ED + "Ed25519PrivateKey\nkey = Ed25519PrivateKey.generate()\n"},
     "node/daemon.py:2: uses Ed25519PrivateKey.generate"),
    (check_private_keys, {"node/ledger.py": ED + "Ed25519PrivateKey as K\nk = K.from_private_bytes(b'')\n"},
     "node/ledger.py:2: uses K.from_private_bytes"),
    (check_private_keys, {"protocol/peerid.py": "from cryptography.hazmat.primitives import serialization\n"
                                                "def f(b):\n    return serialization.load_pem_private_key(b, None)\n"},
     "protocol/peerid.py:3: uses serialization.load_pem_private_key"),
    (check_daemon_entry, {"node/export.py": "def f():\n    from node import daemon\n"},
     "node/export.py:2: node.export imports node.daemon"),
    (check_no_monkeypatching, {"node/ledger.py": "import somemod\nsomemod.attr = 1\n"},
     "node/ledger.py:2: module-level assignment to somemod.attr"),
    (check_no_monkeypatching, {"node/swarm/peer.py": "from hivemind.averaging import allreduce as hivemind_allreduce\n"
                                                     "hivemind_allreduce.TensorPartReducer = object\n"},
     "assignment to hivemind_allreduce.TensorPartReducer"),
    (check_no_monkeypatching, {"node/daemon.py": "try:\n    import torch\nexcept ImportError:\n    torch = None\n"
                                                 "else:\n    torch.backends.flag = True\n"},
     "node/daemon.py:6: module-level assignment to torch.backends.flag"),
    (check_no_monkeypatching, {"node/daemon.py": "import torch\ntorch.count += 1\n"}, "assignment to torch.count"),
    (check_no_monkeypatching, {"node/daemon.py": "import torch\nwith open('x'):\n    torch.a: int = 1\n"},
     "node/daemon.py:3: module-level assignment to torch.a"),
    (check_no_monkeypatching, {"node/daemon.py": "import torch\nif True:\n    setattr(torch, 'x', 1)\n"},
     "node/daemon.py:3: module-level setattr(torch, 'x', 1)"),
]


@pytest.mark.parametrize("check, changes, expected", BROKEN, ids=[f"{c.__name__}-{i}" for i, (c, _, _) in enumerate(BROKEN)])
def test_broken_fake_tree_fails(tmp_path, check, changes, expected):
    violations = check(make_tree(tmp_path, changes), FAKE_LAYERS)
    assert any(expected in v for v in violations), violations
