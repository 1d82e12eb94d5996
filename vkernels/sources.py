"""Which source files implement a kernel family on a backend, and their hash.

A verification record (vkernels/verified.json) keeps the hash of the sources its tests ran, and
``auto`` trusts it only while the running code hashes the same: a kernel edited after its GPU run is
unverified again. A family is an op module ``vkernels/ops/<family>.py`` (one that defines
``SCHEMAS``); its sources on a backend are

- vkernels/ops/<family>.py and the vkernels modules it imports, transitively (shapes.py,
  ops/library.py; for triton the kernel module triton_kernels/<family>.py and what that imports),
  leaving out the package's ``__init__`` and ``dispatch`` (they pick a backend, they compute nothing)
  and, for cuda, the Triton kernels;
- for cuda, csrc/cuda/<family>.cu and the headers it includes (quoted includes, transitively). These
  are hashed by setup.py when it builds ``vkernels._C`` and baked into it (``_C.source_hashes``), so an
  installed wheel, which ships no csrc/, knows what its binary was built from;
- the same again for every family whose backend ops this family's op layer calls by name
  (``backend_op("max_pool2d_backward", ...)`` in ops/conv.py makes pooling part of conv).

Stdlib only: setup.py loads this file by path before anything is installed.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
_NOT_COMPUTING = ("__init__.py", "dispatch.py")  # package-level modules left out (paths relative to PACKAGE)
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def families(package: Path = PACKAGE) -> list[str]:
    """The op families: modules of vkernels/ops that define SCHEMAS."""
    return sorted(name for name, names in _schema_names_by_module(package).items() if "SCHEMAS" in names)


def source_hash(family: str, backend: str, package: Path = PACKAGE, cuda_hashes: dict[str, str] | None = None) -> str | None:
    """The hash of ``family``'s sources on ``backend`` ("triton" or "cuda"); None when a part is
    missing (no ops module, or for cuda no hash of a family's .cu in ``cuda_hashes``)."""
    members = _families_called(family, package)
    if members is None:
        return None
    digest = hashlib.sha256(backend.encode())
    files = set().union(*(_python_closure(package / "ops" / f"{member}.py", backend, package) for member in members))
    for path in sorted(files):
        digest.update(f"{path.relative_to(package).as_posix()}\0{_file_hash(path)}\0".encode())
    if backend == "cuda":
        for member in sorted(members):
            if cuda_hashes is None or member not in cuda_hashes:
                return None
            digest.update(f"csrc/cuda/{member}.cu\0{cuda_hashes[member]}\0".encode())
    return digest.hexdigest()[:16]


def source_hashes(package: Path = PACKAGE, cuda_hashes: dict[str, str] | None = None) -> dict[str, dict[str, str | None]]:
    """family -> backend -> source_hash, for every family."""
    return {family: {backend: source_hash(family, backend, package, cuda_hashes) for backend in ("triton", "cuda")}
            for family in families(package)}


def cuda_source_hashes(csrc: Path) -> dict[str, str]:
    """family -> hash of csrc/cuda/<family>.cu and the headers it includes."""
    return {path.stem: _include_closure_hash(path, csrc) for path in sorted((csrc / "cuda").glob("*.cu"))}


def cuda_source_hashes_json(csrc: Path) -> str:
    return json.dumps(cuda_source_hashes(csrc), sort_keys=True)


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _include_closure_hash(source: Path, csrc: Path) -> str:
    csrc = csrc.resolve()
    seen, todo = set(), [source.resolve()]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _INCLUDE.findall(path.read_text()):
            for directory in (path.parent, csrc, csrc / "cuda"):
                if (directory / name).is_file():
                    todo.append((directory / name).resolve())
                    break
    digest = hashlib.sha256()
    for path in sorted(seen):
        digest.update(f"{path.relative_to(csrc).as_posix()}\0{_file_hash(path)}\0".encode())
    return digest.hexdigest()[:16]


def _python_closure(start: Path, backend: str, package: Path) -> set[Path]:
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        relative = path.relative_to(package).as_posix()
        if relative in _NOT_COMPUTING or (backend != "triton" and relative.startswith("triton_kernels/")):
            continue
        seen.add(path)
        todo += _imported_files(path, package)
    return seen


@functools.cache
def _imported_files(path: Path, package: Path) -> list[Path]:
    """Files of the vkernels modules ``path`` imports (``from vkernels.x import y`` gives x/y.py when
    y is a module, else x.py)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [_module_file(alias.name, package) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                found.append(_module_file(f"{node.module}.{alias.name}", package) or _module_file(node.module, package))
    return [file for file in found if file is not None]


def _module_file(dotted: str, package: Path) -> Path | None:
    top, *parts = dotted.split(".")
    if top != package.name:
        return None
    base = package.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.resolve()
    return None


@functools.cache
def _schema_names_by_module(package: Path) -> dict[str, set[str]]:
    """ops module -> the names it assigns at top level, plus the keys of its SCHEMAS dict."""
    names = {}
    for path in (package / "ops").glob("*.py"):
        tree = ast.parse(path.read_text())
        found = set()
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "SCHEMAS" for t in node.targets):
                found.add("SCHEMAS")
                if isinstance(node.value, ast.Dict):
                    found |= {key.value for key in node.value.keys if isinstance(key, ast.Constant)}
        names[path.stem] = found
    return names


def _families_called(family: str, package: Path) -> set[str] | None:
    """``family`` and every family whose backend ops its op layer calls by name, transitively."""
    schemas = _schema_names_by_module(package)
    if "SCHEMAS" not in schemas.get(family, ()):
        return None
    members, todo = set(), [family]
    while todo:
        member = todo.pop()
        if member in members:
            continue
        members.add(member)
        for node in ast.walk(ast.parse((package / "ops" / f"{member}.py").read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "backend_op" and node.args
                    and isinstance(node.args[0], ast.Constant)):
                todo += [other for other, names in schemas.items() if node.args[0].value in names - {"SCHEMAS"}]
    return members
