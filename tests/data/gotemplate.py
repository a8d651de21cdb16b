"""A small evaluator for the subset of Go's text/template that velotune's Ollama templates use
(if / else if / else, range with $i, variables with := and =, eq ne and or not len index slice,
field access), so tests can check the Ollama side renders what the Jinja side does. Test helper
only; written for these tests, it is not a general Go template engine."""

import re

_ACTION = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_TOKEN = re.compile(r'\s*(\(|\)|"(?:\\.|[^"\\])*"|-?\d+|:=|=|[$.\w]+)')


def _parse(template):
    """Nested list of nodes: ("text", s) / ("expr", toks) / ("assign", name, toks, declare) /
    ("if", [(cond, body), ...], else_body) / ("range", ivar, vvar, toks, body)."""
    pos, root, stack = 0, [], []
    current = root
    for m in _ACTION.finditer(template):
        if m.start() > pos:
            current.append(("text", template[pos:m.start()]))
        pos = m.end()
        toks = _TOKEN.findall(m.group(1))
        head = toks[0]
        if head == "if":
            node = ("if", [(toks[1:], [])], [])
            current.append(node)
            stack.append((current, node))
            current = node[1][0][1]
        elif head == "else":
            parent, node = stack[-1]
            if len(toks) > 1 and toks[1] == "if":
                node[1].append((toks[2:], []))
                current = node[1][-1][1]
            else:
                current = node[2]
        elif head == "range":  # range $i, $_ := EXPR   (the comma is dropped by the tokenizer)
            node = ("range", toks[1], toks[2], toks[4:], [])
            current.append(node)
            stack.append((current, node))
            current = node[4]
        elif head == "end":
            current, _ = stack.pop()
        elif len(toks) > 1 and toks[1] in (":=", "="):
            current.append(("assign", toks[0], toks[2:], toks[1] == ":="))
        else:
            current.append(("expr", toks))
    if pos < len(template):
        current.append(("text", template[pos:]))
    assert not stack, "unbalanced {{ end }}"
    return root


def _truthy(value):
    return bool(value)


class _Scope:
    def __init__(self, root):
        self.frames = [{"$": root}]

    def lookup(self, name):
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise KeyError(name)

    def assign(self, name, value, declare):
        if declare:
            self.frames[-1][name] = value
            return
        for frame in reversed(self.frames):
            if name in frame:
                frame[name] = value
                return
        raise KeyError(f"assignment to undeclared {name}")


def _fields(value, chain):
    for f in chain:
        if f:
            value = value[f]
    return value


_FUNCS = {
    "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "and": lambda *a: all(map(_truthy, a)),
    "or": lambda *a: any(map(_truthy, a)), "not": lambda a: not _truthy(a), "len": len,
    "index": lambda seq, i: seq[i], "slice": lambda seq, i: seq[i:],
}


def _eval(toks, dot, scope):
    value, rest = _command(list(toks), dot, scope)
    assert not rest, rest
    return value


def _command(toks, dot, scope):
    args = []
    while toks and toks[0] != ")":
        args.append(_operand(toks, dot, scope))
    if args and callable(args[0]):
        return args[0](*args[1:]), toks
    assert len(args) == 1, args
    return args[0], toks


def _operand(toks, dot, scope):
    tok = toks.pop(0)
    if tok == "(":
        value, toks_left = _command(toks, dot, scope)
        assert toks_left.pop(0) == ")"
        if toks_left and toks_left[0].startswith("."):
            value = _fields(value, toks_left.pop(0).split(".")[1:])
        return value
    if tok.startswith('"'):
        return bytes(tok[1:-1], "utf-8").decode("unicode_escape") if "\\" in tok else tok[1:-1]
    if re.fullmatch(r"-?\d+", tok):
        return int(tok)
    if tok.startswith("$"):
        name, *chain = tok.split(".")
        return _fields(scope.lookup(name), chain)
    if tok.startswith("."):
        return _fields(dot, tok.split(".")[1:])
    return _FUNCS[tok]


def _run(nodes, dot, scope, out):
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "expr":
            value = _eval(node[1], dot, scope)
            out.append("" if value is None else str(value))
        elif kind == "assign":
            scope.assign(node[1], _eval(node[2], dot, scope), node[3])
        elif kind == "if":
            for cond, body in node[1]:
                if _truthy(_eval(cond, dot, scope)):
                    scope.frames.append({})
                    _run(body, dot, scope, out)
                    scope.frames.pop()
                    break
            else:
                scope.frames.append({})
                _run(node[2], dot, scope, out)
                scope.frames.pop()
        elif kind == "range":
            for i, item in enumerate(_eval(node[3], dot, scope)):
                scope.frames.append({node[1]: i, node[2]: item})
                _run(node[4], item, scope, out)
                scope.frames.pop()


def render(template, messages, system=""):
    """Render like Ollama: `.Messages` holds role/content messages (system ones included)."""
    root = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages], "System": system}
    out = []
    _run(_parse(template), root, _Scope(root), out)
    return "".join(out)
