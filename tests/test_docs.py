"""The documentation stays true to the code: README.md (the front door) and docs/*.md (the reference).

What is checked here: the README stays short and links every page; relative links and their
anchors resolve; every repository path, ``peftcli.…`` name and ``python -m`` module named in a
code span exists; the module map in docs/architecture.md names files that exist; the Python
API's imports work; the method and merge-method tables equal their registries; and the
contributing page names only classes, attributes and signatures the code has. A rename in the
code fails here until the documentation follows it.
"""

from __future__ import annotations

import ast
import glob
import importlib
import importlib.util
import inspect
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
README_MAX_LINES = 250


def doc_paths() -> list[str]:
    """README.md, then every page of docs/ in name order."""
    return [README, *sorted(glob.glob(os.path.join(DOCS, "*.md")))]


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_docs() -> str:
    """The whole documentation, README.md and docs/*.md, as one text (each file whole)."""
    return "\n".join(read(p) for p in doc_paths())


def prose(text: str) -> str:
    """``text`` without its fenced code blocks."""
    return re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.MULTILINE | re.DOTALL)


def code_spans(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", prose(text))


def headings(text: str) -> list[tuple[int, str]]:
    """(level, title) of every heading outside fenced code."""
    found, fence = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(r"(#{1,6}) (.*)", line)):
            found.append((len(m.group(1)), m.group(2).strip()))
    return found


def section(text: str, title: re.Pattern) -> str | None:
    """From the heading whose title matches ``title`` to the next heading of its level or above."""
    lines, fence, start, level = text.splitlines(), False, None, 0
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fence = not fence
            continue
        m = None if fence else re.match(r"(#{1,6}) (.*)", line)
        if not m:
            continue
        if start is not None and len(m.group(1)) <= level:
            return "\n".join(lines[start:i])
        if start is None and title.match(m.group(2)):
            start, level = i, len(m.group(1))
    return None if start is None else "\n".join(lines[start:])


def command_section(name: str) -> tuple[str, str]:
    """(page, text) of the reference section of ``peftcli NAME``: the heading ``## `peftcli NAME ...`"""
    title = re.compile(rf"`peftcli {re.escape(name)}[ `]")
    found = [(p, s) for p in doc_paths() if (s := section(read(p), title)) is not None]
    assert len(found) == 1, f"peftcli {name} needs exactly one reference section in README.md + docs/, found {[p for p, _ in found]}"
    return os.path.relpath(found[0][0], ROOT), found[0][1]


def slug(title: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", title.lower())
    return text.replace(" ", "-")


def table(text: str, header: str) -> list[list[str]]:
    """The rows (cells, stripped) of the first Markdown table whose header line starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))])
    return rows


def resolve(dotted: str):
    """The object ``peftcli.a.b.C.attr`` names: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


# ---------------------------------------------------------------- the front door


def test_readme_is_a_short_front_door_linking_every_page():
    readme = read(README)
    assert len(readme.splitlines()) < README_MAX_LINES, "README.md is the front door: move reference text to docs/"
    pages = {os.path.basename(p) for p in doc_paths()[1:]}
    linked = set(re.findall(r"\]\(docs/([\w.-]+\.md)(?:#[^)]*)?\)", readme))
    assert pages and pages - linked == set(), f"docs pages the README does not link: {sorted(pages - linked)}"


def test_ci_installs_and_tests_as_the_readme_says():
    """The README's first block is what a newcomer runs and what .ci/run runs: they must agree."""
    block = re.search(r"^```bash\n(.*?)^```", read(README), flags=re.MULTILINE | re.DOTALL).group(1)
    commands = [c.strip() for line in block.splitlines() if not line.startswith("#") for c in line.split("&&")]
    ci = [line.strip() for line in read(os.path.join(ROOT, ".ci", "run")).splitlines() if line.strip() and not line.startswith("#")]
    installs = [line.replace(" -q", "") for line in ci if line.startswith("pip install")]
    assert installs and all(i in commands for i in installs), (installs, commands)
    assert "python -m pytest -q" in ci and "python -m pytest -q" in commands


def test_readme_tours_every_command():
    from peftcli.cli import cli

    readme = prose(read(README))
    missing = [name for name in cli.commands if f"`peftcli {name}`" not in readme]
    assert not missing, f"commands the README's tour does not name: {missing}"
    examples = "\n".join(re.findall(r"^```bash\n(.*?)^```", read(README), flags=re.MULTILINE | re.DOTALL))
    assert not [n for n in cli.commands if f"peftcli {n} " not in examples], "a command without an example in the README"


def test_every_command_has_one_reference_section():
    from peftcli.cli import cli

    for name in cli.commands:
        command_section(name)


def test_relative_links_and_anchors_resolve():
    problems = []
    for path in doc_paths():
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(read(path))):
            if re.match(r"[a-z]+:", target):
                continue  # an external address
            file, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            if not os.path.exists(dest):
                problems.append(f"{os.path.relpath(path, ROOT)}: {target} (no such file)")
            elif anchor and dest.endswith(".md") and anchor not in {slug(t) for _, t in headings(read(dest))}:
                problems.append(f"{os.path.relpath(path, ROOT)}: {target} (no such heading)")
    assert not problems, problems


# ---------------------------------------------------------------- names in the documentation exist

REPO_PATH = re.compile(r"(peftcli|tests|scripts|recipes|benchmarks|completions|docs)/[\w./*-]*")


def test_every_repository_path_named_exists():
    missing = []
    for path in doc_paths():
        for span in code_spans(read(path)):
            if REPO_PATH.fullmatch(span) and "NAME" not in span and not glob.glob(os.path.join(ROOT, span)):
                missing.append(f"{os.path.relpath(path, ROOT)}: {span}")
    assert not missing, missing


def test_every_peftcli_name_and_module_named_exists():
    missing = []
    for path in doc_paths():
        text = read(path)
        names = [s for s in code_spans(text) if re.fullmatch(r"peftcli(\.\w+)+", s)]
        modules = re.findall(r"python -m ([\w.]+)", text)
        for name in names:
            try:
                resolve(name)
            except (ImportError, AttributeError):
                missing.append(f"{os.path.relpath(path, ROOT)}: {name}")
        missing += [f"{os.path.relpath(path, ROOT)}: python -m {m}" for m in modules if importlib.util.find_spec(m) is None]
    assert not missing, missing


def _module_map() -> list[tuple[str, str]]:
    """(line, repository path) of every file and directory docs/architecture.md's module map names."""
    block = re.search(r"^```\n(peftcli/\n.*?)^```", read(os.path.join(DOCS, "architecture.md")), flags=re.MULTILINE | re.DOTALL).group(1)
    stack: list[tuple[int, str]] = []  # (indent, directory) of the enclosing directories
    found = []
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1] if stack else ""
        first = line.split()[0] if line.strip() else ""
        here = parent
        if first.endswith("/") and re.fullmatch(r"[\w/]+/", first) and indent < 20:
            found.append((line, parent + first))
            stack.append((indent, parent + first))
            here = parent + first
        for token in re.findall(r"[\w/]+\.py\b", line):
            # a name with a directory is relative to where the line's own entry sits
            found.append((line, (parent if "/" in token else here) + token))
    return found


def test_the_module_map_names_files_that_exist():
    entries = _module_map()
    assert len(entries) > 50, "the module map was not found or not parsed"
    missing = [f"{path}  (from: {line.strip()})" for line, path in entries if not os.path.exists(os.path.join(ROOT, path))]
    assert not missing, "docs/architecture.md's module map names files that do not exist:\n" + "\n".join(missing)


def test_the_python_api_examples_import():
    text = read(os.path.join(DOCS, "python-api.md"))
    imports = [line for block in re.findall(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL) for line in block.splitlines()
               if re.match(r"(from \S+ )?import ", line)]
    assert len(imports) >= 5
    for line in imports:
        exec(line.split("#")[0], {})  # noqa: S102 - the documented import lines themselves


# ---------------------------------------------------------------- the registries' tables

YES_NO = {"yes": True, "no": False}


def test_the_methods_table_is_the_registry():
    from peftcli.methods import METHODS

    rows = table(read(os.path.join(DOCS, "methods.md")), "| method | class |")
    assert [r[0].strip("`") for r in rows] == list(METHODS), "docs/methods.md lists the methods of peftcli.methods.METHODS, in order"
    for name, cls, _what, folds, schedule, in_place, identity, peft_type in rows:
        m = METHODS[name.strip("`")]
        assert resolve(cls.strip("`")) is type(m), (name, cls)
        assert YES_NO[folds] == m.folds and schedule == m.schedule, name
        assert YES_NO[in_place] == m.trains_in_place and YES_NO[identity] == m.identity_at_init, name
        assert peft_type.strip("`") == (m.peft_type or "—"), name


def test_the_merge_method_tables_are_the_registry():
    from peftcli.merging.methods import REGISTRY

    text = read(os.path.join(DOCS, "merging.md"))
    rows = table(text, "| method | class |")
    assert [r[0].strip("`") for r in rows] == list(REGISTRY), "docs/merging.md lists peftcli.merging.methods.REGISTRY, in order"
    for name, cls, inputs, weights, options, needs_base in rows:
        m = REGISTRY[name.strip("`")]
        assert resolve(cls.strip("`")) is type(m), (name, cls)
        least, most = m.inputs
        assert inputs == (f"exactly {least}" if least == most else f"{least} or more" if most is None else f"{least} to {most}"), name
        assert YES_NO[weights] == m.takes_weights and YES_NO[needs_base] == m.needs_base, name
        flags = sorted("--" + n.replace("_", "-") for n in m.option_names())
        assert sorted(re.findall(r"`(--[\w-]+)`", options)) == flags, (name, options)
    formulas = table(text, "| `--method` |")
    assert [r[0].strip("`") for r in formulas] == list(REGISTRY), "every merge method needs its row of what it computes"


# ---------------------------------------------------------------- the contributing page

NOT_CODE = {"hasattr", "transformers", "None", "adapter_model.safetensors", "adapter_config.json", "__post_init__"}


def _named_in(path: str):
    """The classes and modules ``path`` names in code spans (dotted names and repository files)."""
    classes, modules = [], []
    for span in code_spans(read(path)):
        if re.fullmatch(r"peftcli(\.\w+)+", span):
            obj = resolve(span)
            (classes if inspect.isclass(obj) else modules if inspect.ismodule(obj) else []).append(obj)
        elif re.fullmatch(r"(peftcli|tests)/[\w/]+\.py", span) and "NAME" not in span:
            name = span[:-3].replace("/", ".").removesuffix(".__init__")
            modules.append(importlib.import_module(name) if span.startswith("peftcli/") else _test_globals(span))
    for mod in [m for m in modules if inspect.ismodule(m)]:
        classes += [v for v in vars(mod).values() if inspect.isclass(v) and v.__module__ == mod.__name__]
    return classes, modules


def _test_globals(path: str) -> dict:
    """The top-level names a test file assigns or defines (read, not imported)."""
    tree = ast.parse(read(os.path.join(ROOT, path)))
    names = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else []
        for t in targets:
            names[getattr(t, "id", getattr(t, "name", None))] = True
    return names


def _has(owner, name: str) -> bool:
    if isinstance(owner, dict):
        return name in owner
    return hasattr(owner, name) or name in getattr(owner, "__annotations__", {})


def _parameters(func) -> list[str]:
    return [p for p in inspect.signature(func).parameters if p != "self"]


def test_the_contributing_page_names_what_the_code_has():
    """Every identifier or call in a code span of docs/contributing.md is an attribute of a class or
    module the page names (with the parameters it shows), a top-level name of a test file it names,
    or a peftcli subcommand."""
    from peftcli.cli import cli

    path = os.path.join(DOCS, "contributing.md")
    classes, modules = _named_in(path)
    owners = [*classes, *modules]
    assert len(classes) > 10
    problems = []
    for span in code_spans(read(path)):
        m = re.fullmatch(r"(\w+)(?:\((.*)\))?", span)
        if not m or span in NOT_CODE or span in cli.commands or span == "NAME":
            continue
        name, args = m.groups()
        having = [o for o in owners if _has(o, name)]
        if not having:
            problems.append(f"{span}: no class or module the page names has {name!r}")
            continue
        if args and args != "..." and all(re.fullmatch(r"\*|\w+(=\w+)?", a.strip()) for a in args.split(",")):
            shown = [a.strip().split("=")[0] for a in args.split(",") if a.strip() != "*"]
            funcs = [getattr(o, name) for o in having if not isinstance(o, dict) and callable(getattr(o, name, None))]
            if not any(_parameters(f) == shown for f in funcs):
                problems.append(f"{span}: {name} takes {[_parameters(f) for f in funcs]}")
    assert not problems, problems


def test_the_module_map_names_every_module():
    named = {path for _, path in _module_map()}
    modules = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "peftcli", "**", "*.py"), recursive=True))
    missing = [m for m in modules if m not in named and not m.endswith("/__init__.py")]
    assert not missing, f"modules docs/architecture.md's module map does not name (add a line saying what each holds): {missing}"
