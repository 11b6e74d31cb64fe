#!/usr/bin/env python3
"""The layering check of server/src: imports only look down, and no file
imports itself back through others (ARCHITECTURE.md, "Architecture
invariants"). Run by scripts/test.sh, which .ci/run calls.

Reads every server/src/**/*.rs and derives file -> file edges from the paths
the code names: `use crate::…` and `use super::…` trees, `crate::x::y` and
`super::x` paths in code (`vaultguard_server::…` in main.rs), and
`m::item` in code where `m` is a module brought in by `use` (so an edge
lists the items it uses). Each file gets its layer from LAYERS below, and
the check fails, naming the offending edges, on:
  - a file that no LAYERS row places (a new file must be placed);
  - an edge from a file to one in a higher layer (a lower number);
  - a cycle among files (each strongly connected component is printed with
    its edges).
Comments, strings and `#[cfg(test)]` items are left out: test code may build
what the code under test is handed (an AppState, a hub), and does not ship.

    scripts/check-layers.py               # the check (exit 1 on a violation)
    scripts/check-layers.py --graph       # also print every file's edges by layer
    scripts/check-layers.py --self-test   # the parser and checks on a known tree
"""

import fnmatch
import pathlib
import re
import sys

# Top (1) to bottom (4). A file may import its own layer or any layer below;
# within a layer the cycle check keeps the order one-way. The first matching
# pattern places a file.
LAYERS = [
    # 1. Assembly and transport: the binary, AppState's assembly and the
    #    listeners, the HTTP surface, the gRPC adapters.
    (1, "main.rs"),
    (1, "lib.rs"),
    (1, "server.rs"),
    (1, "http.rs"),
    (1, "console.rs"),
    (1, "grpc/*"),
    # 2. The domain, and AppState (its context, assembled by server.rs).
    (2, "domain/*"),
    (2, "state.rs"),
    # 3. The services the domain uses.
    (3, "audit.rs"),
    (3, "auth.rs"),
    (3, "custody.rs"),
    (3, "ethereum.rs"),
    (3, "crypto.rs"),
    (3, "directory.rs"),
    (3, "health.rs"),
    (3, "hub.rs"),
    (3, "issuer.rs"),
    (3, "limits.rs"),
    (3, "oauth_client.rs"),
    (3, "oidc.rs"),
    (3, "outbound.rs"),
    (3, "request_body.rs"),
    (3, "request_id.rs"),
    (3, "tls.rs"),
    # 4. The bottom: storage, configuration, errors, time, identifiers.
    (4, "store/*"),
    (4, "clock.rs"),
    (4, "config.rs"),
    (4, "error.rs"),
    (4, "ids.rs"),
    (4, "telemetry.rs"),
    (4, "validate.rs"),
    # Test-only (`#[cfg(test)] mod props` in lib.rs): shared fixtures of the
    # unit tests, which may use anything.
    (0, "props.rs"),
]

LAYER_NAMES = {0: "test-only", 1: "top", 2: "domain", 3: "services", 4: "bottom"}

# Edges known to break the rules until a branch that removes them is merged,
# each allowed only for exactly the items listed: the check fails when the
# edge names anything else, and when it names less (narrow or remove the
# entry), so the list empties as the branch lands.
ALLOWED_FOR_NOW: dict = {}

ROOT = pathlib.Path(__file__).resolve().parent.parent / "server" / "src"

TOKEN = re.compile(
    r"""
      (?P<ws>\s+)
    | (?P<line_comment>//[^\n]*)
    | (?P<block_comment>/\*)
    | (?P<raw_string>b?r(?P<hashes>\#*)")
    | (?P<string>b?")
    | (?P<char>b?'(?:[^'\\\n]|\\(?:[nrt0\\'"]|x[0-9a-fA-F]{2}|u\{[0-9a-fA-F]{1,6}\}))')
    | (?P<lifetime>'[A-Za-z_][A-Za-z0-9_]*)
    | (?P<ident>r\#[A-Za-z_][A-Za-z0-9_]*|[A-Za-z_][A-Za-z0-9_]*)
    | (?P<path_sep>::)
    | (?P<number>[0-9][0-9A-Za-z_.]*)
    | (?P<punct>.)
    """,
    re.VERBOSE | re.DOTALL,
)


def tokens(text):
    """The file's identifiers, `::` and punctuation, with their line numbers;
    comments, strings and char literals dropped."""
    out = []
    pos, line = 0, 1
    while pos < len(text):
        match = TOKEN.match(text, pos)
        kind = match.lastgroup
        end = match.end()
        if kind == "block_comment":
            depth, end = 1, match.end()
            while depth and end < len(text):
                if text.startswith("/*", end):
                    depth, end = depth + 1, end + 2
                elif text.startswith("*/", end):
                    depth, end = depth - 1, end + 2
                else:
                    end += 1
        elif kind == "raw_string":
            closing = '"' + match.group("hashes")
            found = text.find(closing, end)
            end = len(text) if found < 0 else found + len(closing)
        elif kind == "string":
            while end < len(text) and text[end] != '"':
                end += 2 if text[end] == "\\" else 1
            end += 1
        elif kind in ("ident", "path_sep", "punct"):
            out.append((kind, match.group(), line))
        line += text.count("\n", pos, end)
        pos = end
    return out


def module_path(rel):
    """`domain/step_ups.rs` -> ("domain", "step_ups"); mod.rs and the crate
    roots name their folder."""
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "mod" or rel.as_posix() in ("lib.rs", "main.rs"):
        parts = parts[:-1]
    return tuple(parts)


def parse_use_tree(toks, i, prefix, out):
    """Parses one use tree starting at toks[i]; appends to `out` each full
    path it names, the local name it binds (None for a glob or `as _`) and
    the line; returns the index after the tree."""
    path = list(prefix)
    while i < len(toks):
        kind, text, line = toks[i]
        if text == "{":
            i += 1
            while i < len(toks) and toks[i][1] != "}":
                i = parse_use_tree(toks, i, path, out)
                if i < len(toks) and toks[i][1] == ",":
                    i += 1
            return i + 1
        if text == "*":
            out.append((tuple(path), None, line))
            return i + 1
        if kind == "ident":
            if text != "self":
                path.append(text)
            i += 1
            if i < len(toks) and toks[i][1] == "::":
                i += 1
                continue
            local = path[-1] if path else None
            if i + 1 < len(toks) and toks[i][1] == "as":
                local = None if toks[i + 1][1] == "_" else toks[i + 1][1]
                i += 2
            out.append((tuple(path), local, line))
            return i
        return i + 1
    return i


def resolve(segments, current, files, crate_alias):
    """The module path an absolute-or-relative path names, or None for a path
    outside the crate (std, dependencies)."""
    if not segments:
        return None
    head, rest = segments[0], list(segments[1:])
    if head == "crate" or head == crate_alias:
        base = []
    elif head == "super":
        base = list(current[:-1])
        while rest and rest[0] == "super":
            base, rest = base[:-1], rest[1:]
    elif head == "self":
        base = list(current)
    else:
        return None
    full = tuple(base + rest)
    for cut in range(len(full), -1, -1):
        if full[:cut] in files:
            return full[:cut], (full[cut] if cut < len(full) else "self")
    return None


def edges_of(root, rel, files):
    """(target module path, item named in it, line) for every path to another
    module of the crate that the file names outside comments, strings and
    test items. A module brought in by `use` (`use crate::domain::step_ups;`)
    counts by the items the code names through it (`step_ups::PENDING`)."""
    toks = tokens((root / rel).read_text())
    own = module_path(rel)
    crate_alias = "vaultguard_server" if rel.as_posix() == "main.rs" else "crate"
    found = []
    # Local names of imported modules -> (module path, line of the use).
    modules = {}
    named = []  # (local name, token index, line) of `name::item` in code
    # Inline modules: a stack of (brace depth at which it closes, name).
    inline = []
    depth = 0
    pending_mod = None
    test_attr = False
    test_depth = None  # brace depth at which a #[cfg(test)] item ends
    test_semicolon = False
    i = 0
    while i < len(toks):
        kind, text, line = toks[i]
        if text == "#" and i + 1 < len(toks) and toks[i + 1][1] in ("[", "!"):
            j = i + 1 + (toks[i + 1][1] == "!")
            attr, level = [], 0
            while j < len(toks):
                attr.append(toks[j][1])
                level += {"[": 1, "]": -1}.get(toks[j][1], 0)
                j += 1
                if level == 0:
                    break
            if "".join(attr) == "[cfg(test)]" and test_depth is None:
                test_attr = True
            i = j
            continue
        if test_attr and test_depth is None and text not in ("pub", "(", ")", "crate"):
            # The item the attribute applies to starts here: it ends at the
            # `}` closing its body, or at `;` if it has none.
            test_depth, test_semicolon, test_attr = depth, True, False
        if text == "mod" and i + 2 < len(toks) and toks[i + 1][0] == "ident":
            if toks[i + 2][1] == "{":
                pending_mod = toks[i + 1][1]
        if text == "{":
            depth += 1
            test_semicolon = False
            if pending_mod is not None:
                inline.append((depth, pending_mod))
                pending_mod = None
            i += 1
            continue
        if text == "}":
            if inline and inline[-1][0] == depth:
                inline.pop()
            depth -= 1
            if test_depth is not None and depth == test_depth and not test_semicolon:
                test_depth = None
            i += 1
            continue
        if text == ";" and test_depth is not None and test_semicolon and depth == test_depth:
            test_depth = None
            i += 1
            continue
        current = own + tuple(name for _, name in inline)
        in_test = test_depth is not None
        if text == "use":
            paths = []
            j = parse_use_tree(toks, i + 1, [], paths)
            while j < len(toks) and toks[j][1] != ";":
                j += 1
            if not in_test:
                for segments, local, at in paths:
                    target = resolve(segments, current, files, crate_alias)
                    if target is None:
                        continue
                    if target[1] == "self" and local is not None:
                        modules[local] = (target[0], at)
                    else:
                        found.append((*target, at))
            elif test_semicolon and depth == test_depth:
                test_depth = None
            i = j + 1
            continue
        if kind == "ident" and i + 1 < len(toks) and toks[i + 1][1] == "::":
            previous = toks[i - 1][1] if i else ""
            segments = [text]
            j = i + 1
            while j + 1 < len(toks) and toks[j][1] == "::" and toks[j + 1][0] == "ident":
                segments.append(toks[j + 1][1])
                j += 2
            if previous != "::" and not in_test:
                if text in ("crate", "super", "self", crate_alias):
                    target = resolve(segments, current, files, crate_alias)
                    if target is not None:
                        found.append((*target, line))
                elif len(segments) > 1:
                    named.append((text, segments[1], line))
            i = j
            continue
        i += 1
    used = set()
    for local, item, line in named:
        if local in modules:
            found.append((modules[local][0], item, line))
            used.add(local)
    for local, (module, line) in modules.items():
        if local not in used:
            found.append((module, "self", line))
    return found


def layer_of(rel, table):
    for layer, pattern in table:
        if fnmatch.fnmatchcase(rel, pattern):
            return layer
    return None


def strongly_connected(nodes, edges):
    """Tarjan's algorithm; the components of more than one file."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(10000)
    for node in sorted(nodes):
        if node not in index:
            visit(node)
    return components


def graph_of(root):
    """The files under `root` and their edges: (from, to) -> {item: line}."""
    sources = sorted(p.relative_to(root) for p in root.rglob("*.rs"))
    files = {module_path(rel): rel.as_posix() for rel in sources}
    edges = {}
    for rel in sources:
        name = rel.as_posix()
        for target, item, line in edges_of(root, rel, files):
            target_name = files[target]
            if target_name in (name, "lib.rs"):
                continue
            edges.setdefault((name, target_name), {}).setdefault(item, line)
    return [rel.as_posix() for rel in sources], edges


def check(sources, edges, table, allowed_for_now):
    """The problems of a graph under a layer table, and the edges allowed
    for now that it still has."""
    problems, notes = [], []
    layers = {name: layer_of(name, table) for name in sources}
    problems += [f"{name}: in no layer (add it to LAYERS in scripts/check-layers.py)" for name, layer in layers.items() if layer is None]

    def where(edge):
        items = edges[edge]
        first = min(items.values())
        return f"server/src/{edge[0]}:{first} uses {', '.join(sorted(items))}"

    # Edges allowed for now: only while they name nothing but the listed
    # items, and reported once they name fewer.
    allowed = set()
    for edge, names in sorted(allowed_for_now.items()):
        used = set(edges.get(edge, {}))
        if not used:
            problems.append(f"{edge[0]} -> {edge[1]} is gone: remove it from ALLOWED_FOR_NOW")
        elif not used <= names:
            problems.append(f"{edge[0]} -> {edge[1]} is allowed for {', '.join(sorted(names))} only: {where(edge)}")
        elif used != names:
            problems.append(f"{edge[0]} -> {edge[1]} no longer uses {', '.join(sorted(names - used))}: narrow ALLOWED_FOR_NOW")
        else:
            allowed.add(edge)
            notes.append(f"allowed for now: {edge[0]} -> {edge[1]}  [{where(edge)}]")

    for edge in sorted(edges):
        source, target = edge
        low, high = layers.get(source), layers.get(target)
        if not low or not high or high >= low or edge in allowed:
            continue
        problems.append(
            f"upward import: {source} ({LAYER_NAMES[low]}) -> {target} ({LAYER_NAMES[high]})  [{where(edge)}]"
        )

    # Test-only files take part in neither check.
    production = {name for name, layer in layers.items() if layer != 0}
    graph = {}
    for source, target in edges:
        if source in production and target in production and (source, target) not in allowed:
            graph.setdefault(source, set()).add(target)
    for component in strongly_connected(production, graph):
        members = set(component)
        inner = [
            f"    {s} -> {t}  [{where((s, t))}]"
            for s in component
            for t in sorted(graph.get(s, ()))
            if t in members
        ]
        problems.append(f"import cycle among {len(component)} files: {', '.join(component)}\n" + "\n".join(inner))
    return problems, notes, layers


SELF_TEST = {
    # Every way a file names another: use trees, renames, modules imported
    # by use and named through, paths in code, super, and what is not code.
    "lib.rs": "pub mod a; pub mod b; pub mod c; pub mod d; #[cfg(test)] mod t;",
    "a/mod.rs": "pub mod x;\nuse crate::{b::{self, One as Uno}, c};\nfn f() { b::two(); c::Three; }",
    "a/x.rs": "use super::super::d::Four;\n/// crate::c::NotThis\n/* crate::c::Nor /* this */ */\nfn g() { let s = \"crate::c::\\\"Nor\"; let c = '\"'; let r = r#\"crate::c::\"Raw\"#; }",
    "b.rs": "pub fn two() { crate::d::five(); }\n#[cfg(test)]\nmod tests { use crate::a::x::Up; }",
    "c.rs": "#[cfg(test)]\nuse crate::a::Up;\npub struct Three; fn h<'a>(x: &'a str) { crate::d::six(x) }",
    "d.rs": "pub fn five() {} pub fn six(_: &str) {} pub struct Four;",
    "t.rs": "use crate::a::Anything;",
}


def self_test():
    """The parser and the checks on a small tree with known edges."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        for name, text in SELF_TEST.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
        sources, edges = graph_of(root)
        found = {edge: set(items) for edge, items in edges.items()}
        expected = {
            ("a/mod.rs", "b.rs"): {"One", "two"},
            ("a/mod.rs", "c.rs"): {"Three"},
            ("a/x.rs", "d.rs"): {"Four"},
            ("b.rs", "d.rs"): {"five"},
            ("c.rs", "d.rs"): {"six"},
            ("t.rs", "a/mod.rs"): {"Anything"},
        }
        assert found == expected, found
        table = [(1, "a/*"), (2, "b.rs"), (2, "c.rs"), (3, "d.rs"), (0, "t.rs")]
        problems, _, _ = check(sources, edges, table, {})
        assert problems == ["lib.rs: in no layer (add it to LAYERS in scripts/check-layers.py)"], problems
        table.append((1, "lib.rs"))
        assert check(sources, edges, table, {})[0] == []
        # Upward and circular: d.rs (layer 3) naming b.rs (layer 2).
        edges[("d.rs", "b.rs")] = {"two": 1}
        problems = check(sources, edges, table, {})[0]
        assert len(problems) == 2 and problems[0].startswith("upward import: d.rs (services) -> b.rs (domain)"), problems
        assert problems[1].startswith("import cycle among 2 files: b.rs, d.rs"), problems
        # Allowed for exactly its items, and reported when it changes.
        assert check(sources, edges, table, {("d.rs", "b.rs"): {"two"}})[0] == []
        edges[("d.rs", "b.rs")]["three"] = 2
        problems = check(sources, edges, table, {("d.rs", "b.rs"): {"two"}})[0]
        assert problems[0].startswith("d.rs -> b.rs is allowed for two only"), problems
        problems = check(sources, edges, table, {("d.rs", "b.rs"): {"two", "three", "four"}})[0]
        assert problems[0].startswith("d.rs -> b.rs no longer uses four"), problems
        del edges[("d.rs", "b.rs")]
        problems = check(sources, edges, table, {("d.rs", "b.rs"): {"two"}})[0]
        assert problems == ["d.rs -> b.rs is gone: remove it from ALLOWED_FOR_NOW"], problems
    print("check-layers self-test passed")


def main():
    if "--self-test" in sys.argv[1:]:
        self_test()
        return 0
    sources, edges = graph_of(ROOT)
    problems, notes, layers = check(sources, edges, LAYERS, ALLOWED_FOR_NOW)
    for note in notes:
        print(note)
    if "--graph" in sys.argv[1:]:
        for layer in sorted(set(layers.values()) - {None}):
            members = sorted(n for n, l in layers.items() if l == layer)
            print(f"layer {layer} ({LAYER_NAMES[layer]}), {len(members)} files")
            for name in members:
                targets = sorted(t for s, t in edges if s == name)
                print(f"  {name} -> {', '.join(targets) or '-'}")
    summary = f"{len(sources)} files, {len(edges)} edges"
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print(f"layering check failed: {summary}, {len(problems)} problems", file=sys.stderr)
        return 1
    print(f"layering check passed: {summary}, no cycle, nothing upward")
    return 0


if __name__ == "__main__":
    sys.exit(main())
