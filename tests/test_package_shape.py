"""The package's shape: no import cycles between its modules (imports inside functions count), nothing that uploads."""
import ast
from pathlib import Path

import smpconv_timm

PACKAGE = Path(smpconv_timm.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def imports_of(path: Path) -> set:
    """Package modules imported anywhere in the file (module level, functions, classes)."""
    name = module_name(path)
    package = name if path.name == '__init__.py' else name.rsplit('.', 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')
                base = '.'.join(base[:len(base) - node.level + 1])
                target = f'{base}.{node.module}' if node.module else base
            else:
                target = node.module or ''
            for alias in node.names:  # 'from . import x' names a submodule or a name of the package
                sub = f'{target}.{alias.name}'
                found.add(sub if (PACKAGE.parent / sub.replace('.', '/')).with_suffix('.py').exists()
                          or (PACKAGE.parent / sub.replace('.', '/') / '__init__.py').exists() else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m == 'smpconv_timm' or m.startswith('smpconv_timm.')} - {name}


def test_no_import_cycles():
    graph = {module_name(p): imports_of(p) for p in PACKAGE.rglob('*.py')}
    assert 'smpconv_timm.smpconv' in graph and 'smpconv_timm.kernels.dwconv' in graph
    # importing 'pkg.sub.mod' from outside 'pkg.sub' runs 'pkg.sub' (its __init__) first
    for mod, deps in graph.items():
        parents = {d.rsplit('.', 1)[0] for d in deps if d.count('.') > 1}
        graph[mod] = deps | {p for p in parents if p in graph and mod != p and not mod.startswith(p + '.')}

    state, cycles = {}, []

    def visit(mod, stack):
        state[mod] = 'open'
        for dep in sorted(graph.get(mod, ())):
            if state.get(dep) == 'open':
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[mod] = 'done'

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert not cycles, 'import cycles: ' + '; '.join(' -> '.join(c) for c in cycles)


def test_nothing_in_the_package_uploads():
    uploads = {'HfApi', 'upload_folder', 'upload_file', 'create_repo', 'create_commit', 'push_to_hf_hub'}
    found = []
    for path in PACKAGE.rglob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.id] if isinstance(node, ast.Name) else [node.attr] if isinstance(node, ast.Attribute) else \
                [a.name for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
            found += [f'{path.relative_to(PACKAGE)}:{node.lineno}: {n}' for n in names if n.split('.')[-1] in uploads]
    assert not found, found
    assert (PACKAGE.parent / 'hub' / 'publish.py').is_file() or not (PACKAGE.parent / 'hub').exists()
