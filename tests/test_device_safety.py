"""Every tensor the package creates says where it lives: a static check (``ast``) over lightning_desloc/.

NCCL rejects CPU tensors in collectives ("No backend type associated with device type cpu"), and a tensor
made without ``device=`` lands on the CPU. So every call of a torch tensor factory in the package
(``torch.tensor``, ``zeros``, ``ones``, ``empty``, ``full``, ``arange``, ``rand``, ``randn``, ``eye``,
``linspace``, ``as_tensor``, ...) must pass ``device=`` (not ``device=None``), unless it is in
:data:`ALLOWED_ON_CPU` with the reason it is meant to be on the CPU. ``torch.*_like`` and
``tensor.new_*`` take the device of their argument and are not factories here. The check reads the
source, so it covers code paths no CPU test can tell apart from correct ones; tests/gpu runs the fits.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_desloc"

#: torch functions that create a tensor from sizes, values or a range (the device defaults to the CPU)
FACTORIES = frozenset({
    "tensor", "as_tensor", "asarray", "zeros", "ones", "empty", "full", "arange", "range", "linspace",
    "logspace", "eye", "rand", "randn", "randint", "randperm", "normal", "empty_strided", "scalar_tensor",
    "tril_indices", "triu_indices", "sparse_coo_tensor", "sparse_csr_tensor", "bartlett_window",
    "blackman_window", "hamming_window", "hann_window", "kaiser_window",
    # these two have no device argument at all: the tensor is always on the CPU
    "frombuffer", "from_numpy",
})

#: (module path relative to the package, enclosing function's qualified name, factory) -> why it is on the CPU
ALLOWED_ON_CPU: dict[tuple[str, str, str], str] = {
    # the pickled bytes of a broadcast object are host memory; they are copied (copy_) into a buffer made
    # on the Comm's device, and only that buffer is handed to the collective
    ("comm.py", "Comm.broadcast_object", "frombuffer"):
        "host bytes copied into a device buffer before the broadcast",
    # numpy's RNG state is saved into this rank's checkpoint shard (a file), never sent
    ("checkpoint.py", "_capture_rng", "from_numpy"):
        "numpy RNG state for the shard file, never in a collective",
}


@dataclass(frozen=True)
class FactoryCall:
    module: str
    function: str  # qualified name of the enclosing function, "<module>" at top level
    factory: str
    line: int

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.module, self.function, self.factory)

    def __str__(self) -> str:
        return f"{self.module}:{self.line} torch.{self.factory}(...) in {self.function} has no device="


class _FactoryFinder(ast.NodeVisitor):
    """Calls of :data:`FACTORIES` as ``torch.f(...)`` (``torch`` under any alias) or as a bare name
    imported with ``from torch import f``, without a ``device=`` keyword (or with ``device=None``)."""

    def __init__(self, module: str) -> None:
        self.module = module
        self.torch_names = {"torch"}  # names bound to the torch module
        self.direct: dict[str, str] = {}  # local name -> factory, from "from torch import ..."
        self.scope: list[str] = []
        self.found: list[FactoryCall] = []

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == "torch":
                self.torch_names.add(alias.asname or "torch")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module == "torch":
            for alias in node.names:
                if alias.name in FACTORIES:
                    self.direct[alias.asname or alias.name] = alias.name

    def _scoped(self, node: ast.AST, name: str) -> None:
        self.scope.append(name)
        self.generic_visit(node)
        self.scope.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._scoped(node, node.name)

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._scoped(node, node.name)

    def _factory_of(self, func: ast.expr) -> Optional[str]:
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in self.torch_names:
            return func.attr if func.attr in FACTORIES else None
        if isinstance(func, ast.Name):
            return self.direct.get(func.id)
        return None

    def visit_Call(self, node: ast.Call) -> None:
        factory = self._factory_of(node.func)
        if factory is not None and not _passes_a_device(node):
            self.found.append(FactoryCall(self.module, ".".join(self.scope) or "<module>", factory, node.lineno))
        self.generic_visit(node)


def _passes_a_device(call: ast.Call) -> bool:
    for kw in call.keywords:
        if kw.arg == "device":
            return not (isinstance(kw.value, ast.Constant) and kw.value.value is None)
    return False


def factory_calls_without_device(source: str, module: str = "<string>") -> list[FactoryCall]:
    """Every tensor-factory call in ``source`` that does not pass a device (allow-listed ones included)."""
    finder = _FactoryFinder(module)
    finder.visit(ast.parse(source))
    return finder.found


def violations(source: str, module: str, allowed: dict[tuple[str, str, str], str]) -> list[FactoryCall]:
    return [c for c in factory_calls_without_device(source, module) if c.key not in allowed]


def package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


# ----------------------------------------------------------------------------------------------- the package
def test_every_tensor_factory_in_the_package_passes_a_device():
    found = []
    for path in package_modules():
        found += violations(path.read_text(), path.relative_to(PACKAGE).as_posix(), ALLOWED_ON_CPU)
    assert not found, "tensors made on the CPU by default (NCCL rejects them in collectives); pass device=, " \
                      "or add the call to ALLOWED_ON_CPU with the reason:\n" + "\n".join(map(str, found))


def test_every_allow_list_entry_still_names_a_call():
    seen = set()
    for path in package_modules():
        seen |= {c.key for c in factory_calls_without_device(path.read_text(), path.relative_to(PACKAGE).as_posix())}
    stale = sorted(set(ALLOWED_ON_CPU) - seen)
    assert not stale, f"ALLOWED_ON_CPU entries that match no call any more (remove them): {stale}"


# ----------------------------------------------------------------------------------------------- the checker
VIOLATING = '''
import torch
import torch as th
from torch import zeros as z, ones

def ok(x, device):
    a = torch.zeros(3, device=device)
    b = torch.empty_like(x)            # *_like: the device of x
    c = x.new_zeros(4)                 # new_*: the device of x
    d = torch.tensor([1.0], device=x.device)
    return a, b, c, d

class Round:
    def sizes(self, n):
        return torch.tensor([n], dtype=torch.int64)      # line 15: no device

def more(n):
    u = th.arange(n)                   # line 18: torch under another name
    v = z(2)                           # line 19: imported factory
    w = ones(2, device=None)           # line 20: device=None is the CPU
    q = torch.frombuffer(bytearray(b"ab"), dtype=torch.uint8)   # line 21: allow-listed below
    return u, v, w, q
'''


def test_the_checker_finds_factories_without_a_device():
    found = factory_calls_without_device(VIOLATING, "example.py")
    assert [(c.line, c.function, c.factory) for c in found] == [
        (15, "Round.sizes", "tensor"), (18, "more", "arange"), (19, "more", "zeros"), (20, "more", "ones"),
        (21, "more", "frombuffer"),
    ]
    allowed = {("example.py", "more", "frombuffer"): "host bytes"}
    assert [c.line for c in violations(VIOLATING, "example.py", allowed)] == [15, 18, 19, 20]
    # the package test fails on such a module: its message names the call
    assert "example.py:15 torch.tensor(...) in Round.sizes has no device=" in str(found[0])
