"""The documents cannot rot silently: their links resolve, their command lines name scripts and
options that exist, the README's test command is the one CI runs, the README stays a front page,
its paper-to-code map names code that exists, and its findings table equals the committed reports.
Fast: no training, no model; the intervals are recomputed from the committed per-problem answers."""

import ast
import functools
import glob
import json
import os
import re

import pytest

import evaluate
import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = [README, os.path.join(ROOT, "results", "README.md")] + sorted(
    glob.glob(os.path.join(ROOT, "docs", "*.md"))
)
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
COMMAND = re.compile(r"\bpython3?\s+([\w./-]+\.py)\b([^#;|&]*)")


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def rel(path):
    return os.path.relpath(path, ROOT)


def doc_ids():
    return [rel(p) for p in DOCS]


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@functools.lru_cache
def anchors(path):
    """Every heading's anchor in a markdown file, the repeats numbered as GitHub numbers them."""
    seen, found = {}, set()
    for line in FENCE.sub("", read(path)).splitlines():
        if line.startswith("#"):
            base = slug(line.lstrip("#"))
            found.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return found


def prose(text):
    """Markdown without its fenced blocks and code spans: where links are links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def command_texts(text):
    """The shell text of a document: each fenced block's lines (backslash continuations joined)
    and each code span, whitespace collapsed (a span may wrap across lines)."""
    texts = []
    for block in FENCE.findall(text):
        body = block.split("\n", 1)[1].rsplit("```", 1)[0]
        texts += body.replace("\\\n", " ").splitlines()
    texts += [" ".join(span.split()) for span in CODE_SPAN.findall(FENCE.sub("", text))]
    return texts


@functools.lru_cache
def config_fields(script):
    """The options a script accepts: the fields of the dataclass its main() hands to parse_config,
    read from its source (no import: no model, no torch)."""
    tree = ast.parse(read(os.path.join(ROOT, script)))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", None) == "parse_config"
            and isinstance(node.args[0], ast.Call)
            and getattr(node.args[0].func, "id", None) in classes
        ):
            cls = classes[node.args[0].func.id]
            fields = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}
            for base in cls.bases:  # class Config(distill_rl.Config): the stage's options too
                if isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name):
                    fields |= config_fields(f"{base.value.id}.py") or set()
            return fields
    return None


def top_level_names(path):
    tree = ast.parse(read(path))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def section(text, heading):
    """The lines of the README section under `## heading`, up to the next `## `."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no section '## {heading}'"
    return match.group(1)


def table_rows(text):
    """The body rows of the first markdown table in text, as lists of stripped cells."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


@pytest.mark.parametrize("doc", doc_ids())
def test_every_relative_link_resolves(doc):
    path = os.path.join(ROOT, doc)
    for target in LINK.findall(prose(read(path))):
        if re.match(r"[a-z]+:", target):  # https:, mailto: are not files of the repository
            continue
        file, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        assert os.path.exists(linked), f"{doc} links to {target}, which does not exist"
        if anchor:
            assert anchor in anchors(linked), f"{doc} links to {target}: no such heading"


@pytest.mark.parametrize("doc", doc_ids())
def test_every_command_line_names_a_script_and_its_options(doc):
    text = read(os.path.join(ROOT, doc))
    for line in command_texts(text):
        for script, args in COMMAND.findall(line):
            if f"cat > {script} " in text:  # a script the document writes itself
                continue
            assert os.path.isfile(os.path.join(ROOT, script)), f"{doc}: `{line}`: no {script}"
            fields = config_fields(script)
            for arg in args.split():
                if arg.endswith(".py"):  # a preset
                    assert os.path.isfile(os.path.join(ROOT, arg)), f"{doc}: `{line}`: no {arg}"
                elif arg.startswith("--") and "=" in arg:
                    key = arg[2:].split("=", 1)[0]
                    assert fields is not None, f"{doc}: `{line}`: {script} takes no options"
                    assert key in fields, f"{doc}: `{line}`: {script} has no option --{key}"


def test_readme_test_command_is_the_one_ci_runs():
    ci = [
        line.strip()
        for line in read(os.path.join(ROOT, ".ci", "run")).splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    blocks = [b for b in FENCE.findall(read(README)) if "pytest" in b]
    assert blocks, "README.md shows no test command"
    shown = [line.strip() for line in blocks[0].splitlines()[1:-1] if line.strip()]
    runs = [ci[i : i + len(shown)] for i in range(len(ci))]
    assert shown in runs, f"README.md's test command {shown} is not what .ci/run runs: {ci}"


def test_readme_is_a_front_page():
    size = os.path.getsize(README)
    assert size <= 15_000, f"README.md is {size} bytes; at most 15,000"
    first = read(README).splitlines()[:30]
    assert any("bash run.sh" in line for line in first), "`bash run.sh` not in its first 30 lines"


def test_paper_to_code_map_names_code_that_exists():
    rows = table_rows(section(read(README), "Paper to code"))
    assert rows, "README.md's paper-to-code map is empty"
    for paper, code in rows:
        spans = CODE_SPAN.findall(code)
        file, names = spans[0], spans[1:]
        assert os.path.isfile(os.path.join(ROOT, file)), f"{paper}: no file {file}"
        missing = set(names) - top_level_names(os.path.join(ROOT, file))
        assert not missing, f"{paper}: {file} defines no {sorted(missing)}"


def answers(entries, name):
    """{run folder: {split: "0110..."}} of one row of a report: what stats.paired_diffs pairs."""
    return {e["run"]: e["correct"] for e in entries if e["name"] == name}


def test_findings_table_equals_the_committed_reports():
    rows = table_rows(section(read(README), "What the studies found"))
    assert rows, "README.md's findings table is empty"
    for comparison, source, splits, seeds, shown, reading in rows:
        a, b = re.split(r"\s[−-]\s", CODE_SPAN.findall(comparison)[0])
        path = os.path.normpath(os.path.join(ROOT, LINK.findall(source)[0]))
        report = json.loads(read(path))
        entries = list(report["checkpoints"].values())
        chosen = [splits] if splits != "all 4" else list(entries[0]["correct"])
        d = stats.paired_diffs(answers(entries, a), answers(entries, b), chosen)
        assert d is not None, f"{comparison}: {rel(path)} has no pair of {a} and {b}"
        ci = stats.paired_bootstrap(d)
        mean, lo, hi = 100 * ci.mean, 100 * ci.lo, 100 * ci.hi
        computed = f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}]"
        assert shown == computed, f"{comparison}: {rel(path)} gives {computed}, the README {shown}"
        assert int(seeds) == len(d), f"{comparison}: {len(d)} seeds in {rel(path)}, not {seeds}"
        n = len({e["run"] for e in entries})
        if evaluate.interim(report):
            expected = f"interim: {n} of at least {evaluate.MIN_SEEDS} seeds, not a verdict"
            assert reading == expected, f"{comparison}: an interim study's row reads '{expected}'"
        else:
            expected = "resolved" if ci.excludes_zero() else "not separable"
            assert reading.startswith(expected), f"{comparison}: its interval reads '{expected}'"
