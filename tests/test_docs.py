"""The documentation agrees with the code: its command lines run as written, and the figures it quotes are the code's.

Every ``python X.py ...`` in README.md, docs/*.md, weights/README.md and
preprocessing/README.md, in a code block or in inline code, is checked against
the argparse parser X.py really builds: the script is run in this process up
to the moment it parses its command line (no work done, and no second import of
torch), and every ``--flag`` of the documented line must be one of that
parser's options. Every ``configs/...`` or ``weights/...`` path in the docs'
code must be in the repository: a command that writes a new file there sends a user's copy into the
project's own folders, so the docs write to runs/ instead.
"""
import argparse
import functools
import json
import re
import runpy
import sys
from pathlib import Path

import pytest

import resume
from conftest import ROOT
from defaults import all_keys, get_cfg_defaults
from model import DLIB_RESNET, min_input_size

DOCS = sorted([ROOT / "README.md", ROOT / "weights" / "README.md", ROOT / "preprocessing" / "README.md",
               *(ROOT / "docs").glob("*.md")])
# `python X.py`, `python3 X.py`, `.venv/bin/python X.py`; then the rest of the command
COMMAND = re.compile(r"(?:^|[\s`(])(?:\S*/)?python3?\s+((?:[\w.-]+/)*[\w-]+\.py)\b(.*)")
# inline code that starts with a script and a flag, as a sentence quotes a command: `morph.py --subject_split`
BARE_SCRIPT = re.compile(r"^((?:[\w.-]+/)*[\w-]+\.py)(\s+--.*)")
# where a script quoted by its file name alone is looked for
SCRIPT_FOLDERS = (ROOT, ROOT / "preprocessing")
# placeholders of a documented command line that are no argument: `[--a X | --b Y]`, `KEY VALUE ...`
PLACEHOLDERS = ("", "|", "...", "…")
REPOSITORY_PATH = re.compile(r"(?<![\w./-])(?:configs|weights)/[\w./*-]*\w")
# scripts that pass the flags they do not take themselves on to the script a flag of theirs names
DRIVERS = {"crossval.py": "--script"}
MODEL_CARD = ROOT / "weights" / "README.md"
TRAINING_DOC = ROOT / "docs" / "training.md"
README = ROOT / "README.md"
# the README a newcomer reads first: quick start, pipeline, one command per stage; the rest is in docs/
README_MAX_LINES = 250
SHIPPED_REPORT = ROOT / "weights" / "report" / "report.json"


class ParserBuilt(Exception):
    """Stops a script at its first parse, carrying the parser it built."""

    def __init__(self, parser):
        super().__init__(parser.prog)
        self.parser = parser


def code_of(text):
    """The code of a Markdown text: each line of an indented or fenced block (``\\`` continuations joined),
    then each inline code span of the prose, its line breaks made spaces."""
    blocks, prose, fenced = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced or line.startswith("    "):
            blocks.append(line)
        else:
            prose.append(line)
    spans = re.findall(r"`([^`]+)`", "\n".join(prose))
    return "\n".join(blocks).replace("\\\n", " ").splitlines() + [" ".join(span.split()) for span in spans]


def bare_script_path(name):
    """A script quoted by its name alone, as a path from the repository's root (the name itself if none is)."""
    for folder in SCRIPT_FOLDERS:
        if (folder / name).is_file():
            return str((folder / name).relative_to(ROOT))
    return name


def commands(text):
    """(script, argument tokens) of each command line of a Markdown text; a trailing `# comment` is not part of it."""
    found = []
    for line in code_of(text):
        for part in line.split("&&"):
            part = re.split(r"\s#\s", part)[0]
            command, bare = COMMAND.search(part), BARE_SCRIPT.match(part.strip())
            if command or bare:
                script = command.group(1) if command else bare_script_path(bare.group(1))
                tokens = [token.strip("[]()") for token in (command or bare).group(2).split()]
                found.append((script, [token for token in tokens if token not in PLACEHOLDERS]))
    return found


@functools.cache
def parser_of(script):
    """The argparse parser ``script`` builds, taken at its first parse: the script does nothing else."""
    original, argv = argparse.ArgumentParser.parse_known_args, sys.argv

    def stop(parser, *_args, **_kwargs):
        raise ParserBuilt(parser)

    argparse.ArgumentParser.parse_known_args, sys.argv = stop, [str(ROOT / script)]
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except ParserBuilt as built:
        return built.parser
    finally:
        argparse.ArgumentParser.parse_known_args, sys.argv = original, argv
    raise AssertionError(f"{script} ran to its end without parsing a command line")


def forwarded_to(script, tokens):
    """The training script a driver passes its other flags to (crossval.py's --script), or None."""
    if script not in DRIVERS:
        return None
    flag = DRIVERS[script]
    given = [tokens[i + 1] for i, token in enumerate(tokens[:-1]) if token == flag]
    return given[-1] if given else parser_of(script).get_default(flag.lstrip("-"))


def command_problems(script, tokens):
    """What in one documented command line would fail as written: a missing script, flags it does not take."""
    if not (ROOT / script).is_file():
        return [f"{script} is not in the repository"]
    options = dict(parser_of(script)._option_string_actions)
    target = forwarded_to(script, tokens)
    if target is not None:
        options.update(parser_of(target)._option_string_actions)
    unknown = [flag for flag in (token.split("=", 1)[0] for token in tokens if token.startswith("--"))
               if flag not in options]
    return [f"{script} does not take {flag}" for flag in unknown]


def missing_paths(text):
    """The configs/ and weights/ paths of a Markdown text's code that are not in the repository."""
    named = {path for line in code_of(text) for path in REPOSITORY_PATH.findall(line)}
    return sorted(path for path in named if not (ROOT / path).exists())


COMMANDS = [(doc, script, tokens) for doc in DOCS for script, tokens in commands(doc.read_text())]


def test_the_walk_finds_block_inline_and_bare_commands_and_what_is_wrong_in_them():
    text = ("Quick start:\n\n"
            "    .venv/bin/python demo.py --img_dir samples && python val.py --nope X   # a comment --no\n"
            "\n```\npython preprocessing/utkface.py --img_dir D \\\n    --output_dir O [--seed 0]\n```\n"
            "Prose with `python train-ldl.py --data_dir D\n--config configs/none.yaml`, `morph.py --subject_split`\n"
            "and `python missing.py --x`; output to `weights/new.pth`.\n")
    found = commands(text)
    assert found == [("demo.py", ["--img_dir", "samples"]), ("val.py", ["--nope", "X"]),
                     ("preprocessing/utkface.py", ["--img_dir", "D", "--output_dir", "O", "--seed", "0"]),
                     ("train-ldl.py", ["--data_dir", "D", "--config", "configs/none.yaml"]),
                     ("preprocessing/morph.py", ["--subject_split"]), ("missing.py", ["--x"])]
    assert [command_problems(script, tokens) for script, tokens in found] == [
        [], ["val.py does not take --nope"], [], [], [], ["missing.py is not in the repository"]]
    assert missing_paths(text) == ["configs/none.yaml", "weights/new.pth"]


def test_the_docs_hold_the_commands_this_test_walks():
    """A pattern that stopped matching would pass every check below on no commands."""
    scripts = {script for _, script, _ in COMMANDS}
    assert {"demo.py", "app.py", "train-mt.py", "train-ldl.py", "val.py", "export.py", "ship.py", "draw_augmentations.py",
            "preprocessing/utkface.py", "preprocessing/morph.py"} <= scripts


@pytest.mark.parametrize("doc, script, tokens", COMMANDS, ids=[f"{doc.relative_to(ROOT)}:{script}:{index}"
                                                             for index, (doc, script, _) in enumerate(COMMANDS)])
def test_each_documented_command_names_a_script_and_flags_it_takes(doc, script, tokens):
    problems = command_problems(script, tokens)
    assert not problems, f"{doc.relative_to(ROOT)}: python {script} {' '.join(tokens)}: {'; '.join(problems)}"


@pytest.mark.parametrize("doc", DOCS, ids=[str(doc.relative_to(ROOT)) for doc in DOCS])
def test_each_configs_or_weights_path_in_the_docs_is_in_the_repository(doc):
    """Recipes and shipped files named in the docs exist, including those a documented command writes."""
    missing = missing_paths(doc.read_text())
    assert not missing, f"{doc.relative_to(ROOT)} names {', '.join(missing)}, not in the repository"


def doc_sentence(doc, containing):
    text = " ".join(doc.read_text().split())
    return next(sentence for sentence in re.split(r"(?<=\.) ", text) if containing in sentence)


def test_training_doc_names_every_key_a_resume_cannot_change():
    sentence = doc_sentence(TRAINING_DOC, "cannot change on resume")
    model_keys = [key for key in all_keys(get_cfg_defaults()) if key.startswith("MODEL.")]
    for key in resume.FROZEN_ON_RESUME:
        assert f"`{key}`" in sentence or (key in model_keys and "`MODEL.*`" in sentence), key


def test_training_doc_gives_dlib_resnets_smallest_input_as_the_model_probes_it():
    sentence = doc_sentence(TRAINING_DOC, "it runs at any size from")
    assert re.search(r"any size from (\d+) px", sentence).group(1) == str(min_input_size(DLIB_RESNET))


def test_the_model_cards_validation_table_is_its_report():
    """The card's row (N, MAE, CA(3), CA(5), CA(7), gender and ethnicity accuracy) rounds the shipped report.json."""
    report = json.loads(SHIPPED_REPORT.read_text())
    row = next(line for line in MODEL_CARD.read_text().splitlines() if line.startswith(f"| {report['n']} |"))
    cells = [re.match(r"[*\s]*([\d.]+)", cell).group(1) for cell in row.strip("|").split("|")]
    expected = [str(report["n"]), f"{report['mae']:.2f}",
                *(f"{100 * report[key]:.1f}" for key in ("ca3", "ca5", "ca7", "gender_accuracy", "race_accuracy"))]
    assert cells == expected


def test_readme_stays_short_and_links_every_docs_page():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    unlinked = [page.name for page in sorted((ROOT / "docs").glob("*.md")) if f"](docs/{page.name}" not in text]
    assert not unlinked, f"README.md links no {', '.join(unlinked)}"


def test_the_project_describes_its_own_design():
    """The contracts live in docs/design.md: no file of the repository points outside it for them."""
    files = [*ROOT.glob("*.py"), *ROOT.glob("*/*.py"), *ROOT.glob("*.md"), *ROOT.glob("*/*.md")]
    pointing_out = [str(path.relative_to(ROOT)) for path in files
                    if path != Path(__file__) and "DESIGN.md" in path.read_text()]
    assert not pointing_out
    assert "## Contracts" in (ROOT / "docs" / "design.md").read_text()
