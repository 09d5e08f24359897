"""Which TensorRT names a module uses, read from its source, and whether TensorRT 10.13 has them.

Used by the stub checks in ``test_engine_trt.py`` (engines/trt.py) and ``test_build.py``
(export/trt_build.py). Nothing here is a hand-kept list of TensorRT names:

* the API comes from the ``tensorrt-stubs`` 10.13.0.35.1 .pyi files vendored in
  ``tests/data`` (the wheel on PyPI requires ``tensorrt==10.13.0.35`` itself, which cannot
  be installed without NVIDIA's index, so ``pip install -e '.[test]'`` cannot bring it);
* the uses come from an AST walk with a small type inference: a name bound by
  ``import tensorrt`` is the module; ``trt.Builder(...)`` is a ``Builder``; a method call's
  type is its return annotation in the stubs (``builder.create_network()`` is an
  ``INetworkDefinition``); parameters take the types of the arguments at the module's own
  call sites, ``self.x`` the types assigned to it in any method; classes that subclass a
  TensorRT class (loggers, progress monitors) must override methods the base has. Every
  attribute read or written on such a value, and every ``getattr``/``hasattr`` with a
  constant name, is a use.

A use whose owner's type the stubs leave open (an annotation of ``...``) is reported as
unresolved, so a chain the inference cannot follow fails the check instead of vanishing.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

STUBS = Path(__file__).parent / "data" / "tensorrt-stubs-10.13.0.35.1"
# Where each file of the wheel is kept under STUBS: ".txt" keeps linters and type checkers off them.
STUB_FILES = {"tensorrt/__init__.pyi": "tensorrt/__init__.pyi.txt",
              "tensorrt_bindings/tensorrt.pyi": "tensorrt_bindings/tensorrt.pyi.txt"}

# Methods whose return annotation the stub generator could not name (it wrote ``...``),
# with the class TensorRT's documentation gives. Each entry is checked to be still needed.
OPEN_RETURNS = {"OnnxParser.get_error": "ParserError"}

_GETATTR = ("getattr", "hasattr")
_BUILTIN = re.compile(r"^(None|int|float|bool|str|bytes|object|list|tuple|dict|set|capsule|numpy\.|typing\.(Iterator|"
                      r"ClassVar\[dict)|typing_extensions\.Buffer)")


# -- the stubs ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Member:
    kind: str  # "def", "property", "setter", "attr" or "class"
    annotation: str  # the return annotation of a def; the qualified name of a class
    params: tuple[str, ...] = ()  # a def's parameters after self, as written


@dataclass
class StubClass:
    bases: list[str]
    members: dict[str, list[Member]] = field(default_factory=dict)


@dataclass
class Stubs:
    version: str
    top: set[str]  # the names ``import tensorrt`` has
    classes: dict[str, StubClass]  # "Builder", "ILogger.Severity", ...; "" holds the module's functions and values

    def member(self, cls: str, name: str) -> list[Member]:
        """The stubs of ``cls.name`` (overloads of a def), looked up through the bases; [] when absent."""
        seen, todo = set(), [cls]
        while todo:
            current = todo.pop(0)
            if current in seen or current not in self.classes:
                continue
            seen.add(current)
            found = self.classes[current].members.get(name)
            if found:
                return found
            todo += self.classes[current].bases
        return []

    def type_of(self, annotation: str) -> str | None:
        """The stub class an annotation names; None for builtins; '?' when left open."""
        text = annotation.strip().replace("tensorrt_bindings.tensorrt.", "")
        text = re.sub(r"^typing\.ClassVar\[(.*)\]$", r"\1", text)
        text = re.sub(r"^typing\.Optional\[(.*)\]$", r"\1", text)
        text = re.sub(r"\s*\|\s*None$", "", text)
        if text in self.classes:
            return text
        if _BUILTIN.match(text):
            return None
        return "?"


def load_stubs(root: Path = STUBS) -> Stubs:
    bindings = (root / STUB_FILES["tensorrt_bindings/tensorrt.pyi"]).read_text()
    package = (root / STUB_FILES["tensorrt/__init__.pyi"]).read_text()
    classes = _parse_classes(bindings)
    for name, members in _parse_classes(package)[""].members.items():
        classes[""].members.setdefault(name, members)
    top = set(re.findall(r"^from tensorrt_bindings(?:\.tensorrt)? import (\w+)", package, re.M))
    top |= set(re.findall(r"^(?:def |class )?(\w+)\s*[:(]", package, re.M))
    version = re.search(r"^__version__: str = '([^']+)'", package, re.M)
    if not classes or not top or version is None:
        raise AssertionError(f"cannot read the TensorRT stubs in {root}")
    return Stubs(version.group(1), top, classes)


_CLASS = re.compile(r"^(\s*)class (\w+)(?:\((.*)\))?:")
_DEF = re.compile(r"^(\s*)def (\w+)\((.*)\)(?:\s*->\s*(.+?))?:\s*(?:#.*)?$")
_ATTR = re.compile(r"^(\s*)(\w+)\s*:\s*(.+?)(?:\s*=.*)?\s*(?:#.*)?$")
_DECORATOR = re.compile(r"^(\s*)@(\S+)")


def _parse_classes(text: str) -> dict[str, StubClass]:
    """Classes and their members, by indentation (the generated .pyi is not valid Python:
    some signatures have a parameter without default after one with a default)."""
    classes: dict[str, StubClass] = {"": StubClass([])}
    stack: list[tuple[int, str]] = [(0, "")]  # (indent of the members, qualified class name); "" the module
    in_doc, decorator = False, ""
    for line in text.splitlines():
        if in_doc:
            in_doc = line.count('"""') % 2 == 0
            continue
        if line.count('"""') % 2 == 1:
            in_doc = True
            continue
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        while indent < stack[-1][0]:
            stack.pop()
        owner = stack[-1][1] if indent == stack[-1][0] else None
        if owner is None:  # a statement inside a def
            continue
        if match := _CLASS.match(line):
            name = f"{owner}.{match.group(2)}" if owner else match.group(2)
            classes[owner].members.setdefault(match.group(2), []).append(Member("class", name))
            bases = [b.strip().rsplit(".", 1)[-1] for b in (match.group(3) or "").split(",") if b.strip()]
            classes[name] = StubClass(bases)
            stack.append((indent + 4, name))
        elif match := _DECORATOR.match(line):
            decorator = match.group(2)
        elif match := _DEF.match(line):
            kind = "property" if decorator == "property" else "setter" if decorator.endswith(".setter") else "def"
            params = tuple(_split_params(match.group(3)))
            if decorator != "staticmethod" and params[:1] in (("self",), ("this",)):
                params = params[1:]
            classes[owner].members.setdefault(match.group(2), []).append(Member(kind, match.group(4) or "None", params))
            decorator = ""
        elif match := _ATTR.match(line):
            classes[owner].members.setdefault(match.group(2), []).append(Member("attr", match.group(3)))
    return classes


def _split_params(text: str) -> list[str]:
    """``a: int, b: dict[str, int] = None`` -> ["a: int", "b: dict[str, int] = None"]."""
    params, depth, current = [], 0, ""
    for char in text:
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        if char == "," and depth == 0:
            params.append(current.strip())
            current = ""
        else:
            current += char
    return [p for p in [*params, current.strip()] if p]


def accepts(params: tuple[str, ...], positional: int, keywords: Iterable[str] = ()) -> bool:
    """Whether a def with ``params`` (after self) can be called with ``positional`` arguments
    and the named ``keywords``."""
    names = [p.split(":")[0].split("=")[0].strip() for p in params]
    if any(n.startswith("*") for n in names):
        return True  # *args / **kwargs: the stubs say nothing
    required = [n for n, p in zip(names, params) if "=" not in p]
    keywords = set(keywords)
    if positional > len(names) or not keywords <= set(names[positional:]):
        return False
    return set(required[positional:]) <= keywords


# -- the source ---------------------------------------------------------------------------
# A type: ("module",) the tensorrt module; ("class", C) a TensorRT class; ("inst", C) an
# instance; ("method", C, m, unbound) a method; ("open", what) a value whose type the stubs
# leave open; ("localclass", node) one of the module's classes deriving from TensorRT's and
# ("local", node) an instance of it.
Type = tuple


@dataclass
class Uses:
    names: set[str] = field(default_factory=set)  # "Builder.create_network", "__version__", ...
    unresolved: set[str] = field(default_factory=set)  # uses on values of an open type
    lines: dict[str, int] = field(default_factory=dict)  # first line of each use
    calls: list[tuple[str, int, tuple[str, ...], int]] = field(default_factory=list)  # (name, #args, keywords, line)
    overrides: list[tuple[str, tuple[str, ...], int]] = field(default_factory=list)  # (base.method, params, line)

    def add(self, name: str, line: int, unresolved: bool = False) -> None:
        (self.unresolved if unresolved else self.names).add(name)
        self.lines.setdefault(name, line)


class _Analysis:
    def __init__(self, source: str, stubs: Stubs) -> None:
        self.tree, self.stubs = ast.parse(source), stubs
        self.parent: dict[ast.AST, ast.AST] = {}
        for node in ast.walk(self.tree):
            for child in ast.iter_child_nodes(node):
                self.parent[child] = node
        self.env: dict[tuple[ast.AST, str], set[Type]] = {}  # (scope, name) -> types
        self.returns: dict[ast.AST, set[Type]] = {}  # function -> return types
        self.functions = {node.name: node for node in self.tree.body if isinstance(node, ast.FunctionDef)}
        self.uses = Uses()
        self.changed = True

    # scopes
    def scope(self, node: ast.AST) -> ast.AST:
        node = self.parent.get(node)
        while node is not None and not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module)):
            node = self.parent.get(node)
        return node if node is not None else self.tree

    def enclosing_class(self, node: ast.AST) -> ast.ClassDef | None:
        while node is not None and not isinstance(node, ast.ClassDef):
            node = self.parent.get(node)
        return node

    def lookup(self, name: str, node: ast.AST) -> set[Type]:
        scope = self.scope(node)
        while scope is not None:
            if (scope, name) in self.env:
                return self.env[scope, name]
            scope = self.scope(scope) if scope is not self.tree else None
        return set()

    def bind(self, scope: ast.AST, name: str, types: Iterable[Type]) -> None:
        types = set(types)
        current = self.env.setdefault((scope, name), set())
        if not types <= current:
            current |= types
            self.changed = True

    # evaluation
    def member(self, owner: Type, attr: str, node: ast.AST, record: bool) -> set[Type]:
        kind = owner[0]
        if kind == "module":
            if record:
                self.uses.add(attr, node.lineno)
            if attr in self.stubs.classes:
                return {("class", attr)}
            result: set[Type] = set()
            for member in self.stubs.member("", attr):
                if member.kind == "def":
                    result.add(("method", "", attr, False))
                elif member.kind == "attr":
                    result |= self.typed(member.annotation, attr)
            if not result and attr in self.stubs.top:  # a helper re-exported without a stub
                result.add(("open", attr))
            return result
        if kind == "local":
            own = {n.name for n in owner[1].body if isinstance(n, ast.FunctionDef)}
            own |= {t.attr for t in ast.walk(owner[1]) if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                    and t.value.id == "self" and isinstance(t.ctx, ast.Store)}
            if attr in own:
                return set()
            bases = self.local_bases(owner[1])
            return set().union(*(self.member(("inst", base), attr, node, record) for base in bases))
        if kind == "open":
            if record:
                self.uses.add(f"{owner[1]}.{attr}", node.lineno, unresolved=True)
            return set()
        if kind not in ("class", "inst"):
            return set()
        cls = owner[1]
        if record:
            self.uses.add(_qual(cls, attr), node.lineno)
        result = set()
        for member in self.stubs.member(cls, attr):
            if member.kind == "class":
                result.add(("class", member.annotation))
            elif member.kind == "def":
                result.add(("method", cls, attr, kind == "class"))  # called on the class: self is passed
            elif member.kind in ("property", "attr"):
                result |= self.typed(member.annotation, _qual(cls, attr))
        return result

    def typed(self, annotation: str, what: str) -> set[Type]:
        if what in OPEN_RETURNS:
            return {("inst", OPEN_RETURNS[what])}
        cls = self.stubs.type_of(annotation)
        return set() if cls is None else {("open", f"{what}()")} if cls == "?" else {("inst", cls)}

    def local_bases(self, cls: ast.ClassDef) -> list[str]:
        return [t[1] for base in cls.bases for t in self.eval(base) if t[0] == "class"]

    def eval(self, node: ast.AST, record: bool = False) -> set[Type]:
        if isinstance(node, ast.Name):
            return self.lookup(node.id, node)
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                cls = self.enclosing_class(node)
                if cls is not None:
                    return set(self.env.get((cls, "self." + node.attr), set()))
            owners = self.eval(node.value)
            return set().union(*(self.member(owner, node.attr, node, record) for owner in owners))
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in _GETATTR and len(node.args) >= 2:
                name = node.args[1]
                if isinstance(name, ast.Constant) and isinstance(name.value, str):
                    attribute = ast.Attribute(node.args[0], name.value, ast.Load(), lineno=node.lineno)
                    self.parent[attribute] = node
                    found = self.eval(attribute, record)
                    return found if func.id == "getattr" else set()
            result: set[Type] = set()
            for kind in self.eval(func):
                if kind[0] == "class":
                    result.add(("inst", kind[1]))
                elif kind[0] == "method":
                    for member in self.stubs.member(kind[1], kind[2]):
                        result |= self.typed(member.annotation, _qual(kind[1], kind[2]))
                elif kind[0] == "open":
                    result.add(("open", f"{kind[1]}()"))
                elif kind[0] == "localclass":
                    result.add(("local", kind[1]))
            target = self.callee(func)
            if target is not None:
                result |= self.returns.get(target, set())
            return result
        return set()

    def callee(self, func: ast.AST) -> ast.FunctionDef | None:
        if isinstance(func, ast.Name):
            return self.functions.get(func.id)
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "self":
            cls = self.enclosing_class(func)
            for node in cls.body if cls is not None else ():
                if isinstance(node, ast.FunctionDef) and node.name == func.attr:
                    return node
        return None

    # propagation to a fixed point
    def assign(self, target: ast.AST, value: ast.AST | None, node: ast.AST) -> None:
        if value is None:
            return
        if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple) and len(target.elts) == len(value.elts):
            for t, v in zip(target.elts, value.elts):
                self.assign(t, v, node)
        elif isinstance(target, ast.Name):
            self.bind(self.scope(node), target.id, self.eval(value))
        elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
            cls = self.enclosing_class(node)
            if cls is not None:
                self.bind(cls, "self." + target.attr, self.eval(value))

    def propagate(self) -> None:
        rounds = 0
        while self.changed:
            self.changed, rounds = False, rounds + 1
            if rounds > 50:
                raise AssertionError("type propagation does not settle")
            for node in ast.walk(self.tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    for alias in node.names:
                        if isinstance(node, ast.Import) and alias.name == "tensorrt":
                            self.bind(self.scope(node), alias.asname or "tensorrt", {("module",)})
                elif isinstance(node, ast.Assign):
                    for target in node.targets:
                        self.assign(target, node.value, node)
                elif isinstance(node, ast.AnnAssign):
                    self.assign(node.target, node.value, node)
                elif isinstance(node, ast.Return) and node.value is not None:
                    function = self.scope(node)
                    types = self.eval(node.value)
                    if not types <= self.returns.setdefault(function, set()):
                        self.returns[function] |= types
                        self.changed = True
                elif isinstance(node, ast.ClassDef) and node.bases:
                    if any(t[0] == "class" for base in node.bases for t in self.eval(base)):
                        self.bind(self.scope(node), node.name, {("localclass", node)})
                elif isinstance(node, ast.Call):
                    target = self.callee(node.func)
                    if target is None:
                        continue
                    params = [a.arg for a in target.args.args]
                    if isinstance(node.func, ast.Attribute):
                        params = params[1:]  # self
                    for name, arg in zip(params, node.args):
                        self.bind(target, name, self.eval(arg))
                    for keyword in node.keywords:
                        if keyword.arg in params:
                            self.bind(target, keyword.arg, self.eval(keyword.value))

    def record(self) -> Uses:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Call) and not any(isinstance(a, ast.Starred) for a in node.args):
                keywords = tuple(k.arg for k in node.keywords)
                if None in keywords:  # **kwargs
                    continue
                for kind in self.eval(node.func):
                    if kind[0] == "class" and self.stubs.member(kind[1], "__init__"):
                        self.uses.calls.append((f"{kind[1]}.__init__", len(node.args), keywords, node.lineno))
                    elif kind[0] == "method":
                        positional = len(node.args) - (1 if kind[3] else 0)
                        self.uses.calls.append((_qual(kind[1], kind[2]), positional, keywords, node.lineno))
            if isinstance(node, ast.Attribute):
                self.eval(node, record=True)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _GETATTR:
                self.eval(node, record=True)
            elif isinstance(node, ast.ClassDef) and ("localclass", node) in self.lookup(node.name, node):
                self.record_overrides(node)
        return self.uses

    def record_overrides(self, cls: ast.ClassDef) -> None:
        """The methods a subclass of a TensorRT class defines are the base's, called by TensorRT."""
        methods = [m for m in cls.body if isinstance(m, ast.FunctionDef) and m.name != "__init__"]
        for base in self.local_bases(cls):
            for method in methods:
                name = f"{base}.{method.name}"
                self.uses.add(name, method.lineno)
                self.uses.overrides.append((name, _params(method), method.lineno))


def _params(method: ast.FunctionDef) -> tuple[str, ...]:
    """A def's parameters after self, as the stubs write them ("x", "y=...", "*args")."""
    args = method.args
    defaults = [""] * (len(args.args) - len(args.defaults)) + ["=..."] * len(args.defaults)
    params = tuple(a.arg + d for a, d in zip(args.args, defaults))[1:]
    return params + ((f"*{args.vararg.arg}",) if args.vararg else ())


def _qual(cls: str, member: str) -> str:
    return f"{cls}.{member}" if cls else member


def tensorrt_uses(source: str, stubs: Stubs) -> Uses:
    """Every TensorRT name ``source`` uses (see the module docstring)."""
    analysis = _Analysis(source, stubs)
    analysis.propagate()
    return analysis.record()


def missing_from(stubs: Stubs, names: Iterable[str]) -> list[str]:
    """The names ("X" on the module or "Class.member") TensorRT 10.13 does not have."""
    missing = []
    for name in sorted(names):
        cls, _, member = name.rpartition(".")
        found = (name in stubs.top) if not cls else bool(stubs.member(cls, member))
        if not found:
            missing.append(name)
    return missing


def wrong_calls(stubs: Stubs, uses: Uses) -> list[str]:
    """Calls no overload in the stubs accepts, and overrides that cannot take TensorRT's arguments."""
    problems = []
    for name, positional, keywords, line in uses.calls:
        cls, _, member = name.rpartition(".")
        overloads = [m for m in stubs.member(cls, member) if m.kind == "def"]
        if overloads and not any(accepts(m.params, positional, keywords) for m in overloads):
            signatures = " | ".join(f"({', '.join(m.params)})" for m in overloads)
            problems.append(f"line {line}: {name} called with {positional} positional {list(keywords)}; "
                            f"stubs: {signatures}")
    for name, params, line in uses.overrides:
        cls, _, member = name.rpartition(".")
        overloads = [m for m in stubs.member(cls, member) if m.kind == "def"]
        if overloads and not any(accepts(params, len(m.params)) for m in overloads):
            signatures = " | ".join(f"({', '.join(m.params)})" for m in overloads)
            problems.append(f"line {line}: override {name}({', '.join(params)}) cannot take TensorRT's {signatures}")
    return problems


def module_attributes(source: str, name: str = "trt") -> set[str]:
    """Every ``X`` written as ``<name>.X`` in code (not in strings or comments): a check,
    independent of the inference, that it followed the module everywhere."""
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT)]
    before = [None, *tokens]
    return {c.string for p, a, b, c in zip(before, tokens, tokens[1:], tokens[2:])
            if a.type == tokenize.NAME and a.string == name and b.string == "." and c.type == tokenize.NAME
            and (p is None or p.string != ".")}
