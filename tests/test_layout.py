"""The package's import graph: no cycles, no module reaching into another's underscore
names, nothing from the repository's configs/ or tests/ (an installed wheel has neither)."""

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'euro_lm'


def _modules():
  """Dotted name -> path of every module in euro_lm (a package is its __init__)."""
  modules = {}
  for path in PACKAGE.rglob('*.py'):
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    if parts[-1] == '__init__':
      parts = parts[:-1]
    modules['.'.join(parts)] = path
  return modules


MODULES = _modules()


def _imports(name):
  """(imported euro_lm module, names taken from it, line) for each import in module `name`,
  at any depth (imports inside functions count: they break no cycle, they only hide it)."""
  tree = ast.parse(MODULES[name].read_text(encoding='utf-8'))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, (), node.lineno
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      for alias in node.names:
        submodule = f'{node.module}.{alias.name}'
        if submodule in MODULES:
          yield submodule, (), node.lineno
        else:
          yield node.module, (alias.name,), node.lineno


def _edges():
  return {
      name: sorted({target for target, _, _ in _imports(name) if target in MODULES})
      for name in MODULES
  }


def test_the_import_graph_has_no_cycles():
  edges, state, stack = _edges(), {}, []

  def visit(name):
    state[name] = 'open'
    stack.append(name)
    for target in edges[name]:
      if state.get(target) == 'open':
        cycle = stack[stack.index(target) :] + [target]
        pytest.fail('import cycle: ' + ' -> '.join(cycle))
      if target not in state:
        visit(target)
    stack.pop()
    state[name] = 'done'

  for name in sorted(MODULES):
    if name not in state:
      visit(name)


def test_no_module_takes_another_modules_underscore_names():
  offences = []
  for name, path in MODULES.items():
    aliases = {}  # local name -> euro_lm module, for `module._name` below
    for target, taken, line in _imports(name):
      offences += [f'{path}:{line}: {target}.{n}' for n in taken if n.startswith('_')]
    tree = ast.parse(path.read_text(encoding='utf-8'))
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        for alias in node.names:
          if f'{node.module}.{alias.name}' in MODULES:
            aliases[alias.asname or alias.name] = f'{node.module}.{alias.name}'
      elif isinstance(node, ast.Import):
        for alias in node.names:
          if alias.asname and alias.name in MODULES:
            aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
      if (
          isinstance(node, ast.Attribute)
          and isinstance(node.value, ast.Name)
          and node.value.id in aliases
          and node.attr.startswith('_')
          and not node.attr.startswith('__')
          and aliases[node.value.id] != name
      ):
        offences.append(f'{path}:{node.lineno}: {aliases[node.value.id]}.{node.attr}')
  assert not offences, 'underscore names used across modules:\n' + '\n'.join(offences)


def test_the_package_stands_alone():
  outside = [
      f'{MODULES[name]}:{line}: {target}'
      for name in MODULES
      for target, _, line in _imports(name)
      if target.split('.')[0] in ('configs', 'tests')
  ]
  assert not outside, 'euro_lm imports the repository:\n' + '\n'.join(outside)


def _readme_layout():
  readme = (PACKAGE.parent / 'README.md').read_text(encoding='utf-8')
  section = readme.split('\n## Layout\n', 1)[1].split('\n## ', 1)[0]
  return section.split('```', 2)[1]


def test_the_readme_layout_names_every_module_and_nothing_else():
  """README's layout block and the tree agree: each euro_lm module file is named there (in
  its package's lines), and each `.py` name or `pkg/` folder there exists."""
  block = _readme_layout()
  files = [p.relative_to(PACKAGE) for p in PACKAGE.rglob('*.py') if p.name != '__init__.py']
  missing = [str(f) for f in files if f.name != '__main__.py' and f.name not in block]
  missing += [
      f'{p}/'
      for p in {f.parent for f in files}
      if str(p) != '.' and f'{p.as_posix()}/' not in block
  ]
  assert not missing, 'README layout does not name: ' + ', '.join(sorted(missing))
  names = {p.name for p in PACKAGE.rglob('*.py')} | {'setup.cfg'}

  unknown = [
      n
      for n in re.findall(r'\b([\w]+\.py)\b', block)
      if n not in names
      and not (PACKAGE.parent / 'configs' / n).exists()
      and not (PACKAGE.parent / 'launch' / n).exists()
  ]
  assert not unknown, 'README layout names files that do not exist: ' + ', '.join(unknown)
