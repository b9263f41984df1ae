"""Every `minirlhf ...` command line of the README gets past the parser, the config and the checks its command makes
before any model loads; an unknown flag, config key or name fails this test.

What counts as a command line:
- in a fenced code block, a line that starts with `minirlhf ` or runs it as `-m minirlhf ` (torchrun). Its trailing
  `# comment` is dropped, but a `minirlhf ...` inside the comment (`# or: minirlhf dpo ...`) is a command line too,
  and `# also: rloo, a2c` names more commands, whose names are checked;
- in prose and tables, an inline code span that starts with `minirlhf `, also across a line break. A span of only
  a command's name (`minirlhf loop`, `minirlhf feedback serve`) names it, and only the name is checked.

The README's notation, turned into lines to run:
- `[...]` is optional: what it holds is kept, so every option shown is checked; a bare `...` ("and so on") is
  dropped, but where a flag's value belongs (`--policy ...`) it is a placeholder;
- `a|b|c` is a choice: every alternative is checked, one line each (so is `generate/evaluate` in prose);
- an UPPER_CASE word (RUN_DIR, FILE.jsonl, N) is a placeholder: PLACEHOLDERS gives it a plausible value of its
  kind, a number where a number belongs; STAGE stands for every command with --resume, NAME for every RL
  algorithm. A placeholder not listed fails the test. `--section.key=value` means "any key" and is dropped;
- `--config FILE` reads the file when the repository has it (configs/...), else the user's own file (my.yaml):
  a YAML file setting what the stage needs (its policy); `--resume RUN_DIR` a run folder holding the stage's
  saved config.

A line then runs through `cli.build_parser()`; a training stage through `cli._stage_config` (config keys and values,
as the CLI resolves them); then the checks the command makes before loading a model: `cli.tool_config` (a tool's
config, typed and bounded), for an RL algorithm `registry.get`, `rl.check` and the reward's `rewards.check`, for
`loop` `loop.check`. Nothing is read or loaded beyond that (data files, runs and models named are not opened), so this runs in about a second.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from minirlhf import UserError, cli
from minirlhf import registry as registry_of_stages
from minirlhf.rl import registry
from minirlhf.stages import rl
from minirlhf.config import save_config
from minirlhf.feedback import loop
from minirlhf.models import rewards
from minirlhf.pipeline import DemoConfig

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDES = [README, ROOT / "CONTRIBUTING.md"] + sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "history.md")
"""the user's documents: the README and the guides it points to, read as one text (history.md records commands as
they were)"""


def user_docs() -> str:
    return "\n".join(path.read_text(encoding="utf-8") for path in GUIDES)

RUN = "runs/readme-run"
PLACEHOLDERS = {
    "RUN_DIR": RUN, "RUN": RUN, "GENERATOR_RUN": RUN, "CLASSIFIER_RUN": RUN, "REWARD_MODEL_RUN": RUN, "RM_RUN": RUN,
    "JUDGE": RUN, "P": "smollm2", "MODEL": "HuggingFaceTB/SmolLM2-135M-Instruct", "SOURCE": "tweets",
    "FILE": "data.jsonl", "FILE.jsonl": "data.jsonl", "FILE.yaml": "my.yaml",
    "ADMIN_LINK": "http://127.0.0.1:8000/admin?token=readme",
    "N": "8", "R": "2", "K": "2", "B": "1",  # numbers: labels, steps, rounds, annotators, beta
}
"""a plausible value for each placeholder the README uses"""
NOTATION = {"--section.key=value"}
"""tokens that stand for "any option" rather than for one"""
PLACEHOLDER = re.compile(r"(?<![\w.])[A-Z][A-Z0-9_]*(?:\.(?:jsonl|yaml))?(?![\w])")
RL_COMMANDS = [a.name.replace("_", "-") for a in registry.ALGORITHMS.values()]
STAGES = {s.command: s.load_config() for s in registry_of_stages.STAGES.values() if s.command} | {"demo": DemoConfig} | \
    {a.name.replace("_", "-"): a.config for a in registry.ALGORITHMS.values()}
"""each training command's config class, as cli.py builds its commands"""
SUBCOMMANDS = {"STAGE": [name for name in STAGES if name != "demo"], "NAME": RL_COMMANDS}


class CommandError(Exception):
    """A README line that the command would refuse."""


@dataclass(frozen=True)
class Line:
    lineno: int
    text: str
    """the command line, from `minirlhf` on"""
    name_only: bool = False
    prose: bool = False
    """found in an inline code span rather than a code block"""


# ---------------------------------------------------------------------------- finding the lines


def readme_lines(text: str) -> list[Line]:
    """Every command line of a README text: in code blocks, and in the inline code spans of the prose."""
    found, prose, code = [], [], False
    for lineno, line in enumerate(text.splitlines(), 1):
        if re.match(r"\s*```", line):
            code = not code
        elif code:
            found += _code_lines(lineno, line)
        else:
            prose.append((lineno, line))
    return found + _prose_lines(prose)


def _code_lines(lineno: int, line: str) -> list[Line]:
    m = re.search(r"(?:^\s*|\s-m\s+)(minirlhf\s.*)$", line)
    if not m:
        return []
    command, *comment = re.split(r"\s+(?=#(?:\s|$))", m.group(1), maxsplit=1)
    comment = comment[0] if comment else ""
    lines = [Line(lineno, command.strip())]
    if (also := re.match(r"#\s*also:\s*(.+)", comment)) is not None:
        lines += [Line(lineno, f"minirlhf {name.strip()}", name_only=True) for name in also.group(1).split(",")]
    elif (inner := re.search(r"\bminirlhf\s.*", comment)) is not None:
        lines.append(Line(lineno, inner.group(0).strip()))
    return lines


def _prose_lines(prose: list[tuple[int, str]]) -> list[Line]:
    text = "\n".join(line for _, line in prose)
    lines = []
    for m in re.finditer(r"`([^`]+)`", text):
        span = " ".join(m.group(1).split())
        if span.startswith("minirlhf "):
            words = span.split()[1:]
            name_only = all(re.fullmatch(r"[a-z][a-z0-9-]*", w) or w in SUBCOMMANDS for w in words)
            lines.append(Line(prose[text.count("\n", 0, m.start())][0], span, name_only, prose=True))
    return lines


# ---------------------------------------------------------------------------- from notation to argv


def variants(line: Line) -> list[list[str]]:
    """The argument lists a README line stands for: the first alternative of every choice, then each other
    alternative of each choice in turn; placeholders filled in."""
    tokens = _tokens(line.text)
    command, rest = tokens[0], tokens[1:]
    choices = [_subcommands(command)] + [_choices(t) for t in rest]
    picked = [[c[0] for c in choices]]
    for i, options in enumerate(choices):
        picked += [[*(c[0] for c in choices[:i]), alt, *(c[0] for c in choices[i + 1:])] for alt in options[1:]]
    out = []
    for argv in picked:
        argv = [argv[0], *(_filled(t) for t in argv[1:])]
        if argv not in out:
            out.append(argv)
    return out


def _tokens(text: str) -> list[str]:
    """The words after `minirlhf`, optional brackets taken off, notation dropped, a `...` value filled in."""
    tokens = []
    for word in shlex.split(text)[1:]:
        word = word.removeprefix("[").removesuffix("]")
        if word in NOTATION:
            tokens.append("...")  # so that a `...` after it is not read as its value
        elif word == "..." and tokens and re.fullmatch(r"--?[\w.-]+", tokens[-1]):
            tokens.append(RUN)  # `--policy ...`: any value
        else:
            tokens.append(word)
    return [t for t in tokens if t != "..."]


def _subcommands(word: str) -> list[str]:
    if word in SUBCOMMANDS:
        return SUBCOMMANDS[word]
    return word.replace("/", "|").split("|")


def _choices(token: str) -> list[str]:
    flag, eq, value = token.partition("=") if token.startswith("-") else ("", "", token)
    return [flag + eq + v for v in value.split("|")]


def _filled(token: str) -> str:
    if token.startswith("-"):
        flag, eq, value = token.partition("=")
        return flag + eq + _filled(value) if eq else token

    def placeholder(m: re.Match) -> str:
        if m.group(0) not in PLACEHOLDERS:
            raise CommandError(f"unknown placeholder {m.group(0)!r}; add a plausible value to PLACEHOLDERS")
        return PLACEHOLDERS[m.group(0)]

    return PLACEHOLDER.sub(placeholder, token)


# ---------------------------------------------------------------------------- checking a line


def check(argv: list[str], tmp: Path):
    """Raise when the command would refuse `argv` before loading any model; return the stage's config, if any."""
    argv = _local_files(argv, tmp)
    parser, out = _parser(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            args, extra = parser.parse_known_args(argv)
    except SystemExit as e:
        if e.code == 0 and "--help" in argv:
            return None
        raise CommandError(f"argparse refused it: {(out.getvalue().strip().splitlines() or ['?'])[-1]}") from None
    if extra and not getattr(args, "stage", False):
        raise CommandError(f"unrecognized arguments: {' '.join(extra)}")
    try:
        cli.tool_config(args)
        if not getattr(args, "stage", False):
            return None
        cfg = cli._stage_config(STAGES[args.command], args, extra)
        if args.command in RL_COMMANDS:
            rl.check(cfg, registry.get(args.command), cfg.batch_size)
            rewards.check(cfg.reward)
        if args.command == "loop":
            loop.check(cfg)
        return cfg
    except UserError as e:
        raise CommandError(str(e)) from e


@functools.cache
def _parser():
    return cli.build_parser()  # half a second (every stage's --help text); parsing leaves it as it was


def check_name(words: list[str]) -> None:
    """A command named in prose exists (its --help answers); an RL algorithm is in the registry."""
    check([*words, "--help"], Path("."))
    if words[0] in RL_COMMANDS:
        registry.get(words[0])


def _local_files(argv: list[str], tmp: Path) -> list[str]:
    """--config and --resume as the command reads them: the repository's config file, or the user's own (a file
    with what the stage needs); a run folder with the stage's saved config."""
    stage = STAGES.get(argv[0]) if argv else None
    out = list(argv)
    for i, word in enumerate(out[:-1]):
        if word == "--config" and not (ROOT / out[i + 1]).is_file():
            out[i + 1] = str(_user_config(tmp / "user-config.yaml", stage))
        elif word == "--config":
            out[i + 1] = str(ROOT / out[i + 1])
        elif word == "--resume" and stage is not None:
            out[i + 1] = str(_saved_run(tmp / f"resume-{argv[0]}", stage))
    return out


def _user_config(path: Path, stage) -> Path:
    path.write_text("policy: smollm2\n" if stage is not None and hasattr(stage(), "policy") else "{}\n")
    return path


def _saved_run(folder: Path, stage) -> Path:
    cfg = stage()
    if hasattr(cfg, "policy"):
        cfg.policy = "smollm2"
    folder.mkdir(exist_ok=True)
    save_config(cfg, folder / "config.yaml")
    return folder


def check_line(line: Line, tmp: Path) -> list[str]:
    """Every failure of a README line's variants, as `argv: reason`."""
    failures = []
    try:
        lines = variants(line)
    except CommandError as e:
        return [f"{line.text}: {e}"]
    for argv in lines:
        try:
            check_name(argv) if line.name_only else check(argv, tmp)
        except CommandError as e:
            failures.append(f"minirlhf {shlex.join(argv)}: {e}")
    return failures


# ---------------------------------------------------------------------------- the tests

LINES = readme_lines(user_docs())


def test_no_command_line_of_the_readme_is_missed():
    """Counted another way: every line a reader would type, and every inline span that starts a command."""
    text = user_docs()
    parts = re.split(r"^\s*```.*$", text, flags=re.M)  # prose, code, prose, ...
    typed = {line for code in parts[1::2] for line in code.splitlines()
             if re.match(r"\s*(\S*torchrun\s.*-m\s+)?minirlhf\s", line)}
    lines = text.splitlines()
    assert len(typed) >= 20 and typed == {lines[line.lineno - 1] for line in LINES if not line.prose}
    assert sum(prose.count("`minirlhf ") for prose in parts[::2]) == len([line for line in LINES if line.prose]) >= 10


@pytest.mark.parametrize("line", LINES, ids=[f"{line.lineno}:{line.text[9:40]}" for line in LINES])
def test_every_readme_command_line_is_accepted(line, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing under a runs/ folder of the checkout is read as a run
    assert not check_line(line, tmp_path)


@pytest.mark.parametrize("text, reason", [
    ("minirlhf ppo --no_such_key=1", "unknown config key 'no_such_key'"),
    ("minirlhf ppo --policy P --reward RUN --train.lr=fast", "train.lr must be float"),
    ("minirlhf grpo --policy P --group_size=3", "must be a multiple of group_size=3"),
    ("minirlhf a2c --policy P --minibatch_size=8", "one gradient step per rollout"),
    ("minirlhf rloo --policy P --reward.classifier_weight=0", "the reward is 0 for every response"),
    ("minirlhf loop --policy smollm2 --method nope", "--method must be dpo or an RL algorithm"),
    ("minirlhf loop --policy P --annotator people", "--annotator must be web or simulate:JUDGE"),
    ("minirlhf generate RUN_DIR --no-such-flag", "unrecognized arguments: --no-such-flag"),
    ("minirlhf generate RUN_DIR --temperature 0", "--temperature must be > 0"),
    ("minirlhf feedback serve --select best", "--select must be one of random, uncertain"),
    ("minirlhf nope RUN_DIR", "argparse refused it"),
    ("minirlhf evaluate --prompts FILE.jsonl", "argparse refused it"),  # no RUN_DIR
    ("minirlhf sft --policy MODEL --data FILES", "unknown placeholder 'FILES'"),
])
def test_a_bad_line_is_caught(text, reason, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    failures = check_line(Line(0, text), tmp_path)
    assert failures and reason in failures[0], failures


def test_a_bad_alternative_or_name_is_caught(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    failures = check_line(Line(0, "minirlhf loop --policy P [--method ppo|nope|dpo]"), tmp_path)
    assert len(failures) == 1 and failures[0].startswith("minirlhf loop --policy smollm2 --method nope: "), failures
    assert check_line(Line(0, "minirlhf nope", name_only=True), tmp_path)
    assert not check_line(Line(0, "minirlhf feedback serve", name_only=True), tmp_path)


def test_the_notation_becomes_lines_to_run():
    text = ("intro `minirlhf loop --policy P\n[--method ppo|dpo]` and `minirlhf generate/evaluate RUN_DIR`\n"
            "```bash\nminirlhf grpo --policy ... --reward ... [--group_size=4 ...]  # also: rloo, a2c\n"
            "minirlhf train-classifier [--section.key=value ...]  # or: minirlhf demo\n```\n")
    lines = readme_lines(text)
    assert [(line.lineno, line.text, line.name_only) for line in lines] == [  # code blocks first, then prose
        (4, "minirlhf grpo --policy ... --reward ... [--group_size=4 ...]", False),
        (4, "minirlhf rloo", True), (4, "minirlhf a2c", True),
        (5, "minirlhf train-classifier [--section.key=value ...]", False), (5, "minirlhf demo", False),
        (1, "minirlhf loop --policy P [--method ppo|dpo]", False),
        (2, "minirlhf generate/evaluate RUN_DIR", False)]
    assert variants(lines[0]) == [["grpo", "--policy", RUN, "--reward", RUN, "--group_size=4"]]
    assert variants(lines[3]) == [["train-classifier"]]
    assert variants(lines[5]) == [["loop", "--policy", "smollm2", "--method", "ppo"],
                                  ["loop", "--policy", "smollm2", "--method", "dpo"]]
    assert variants(lines[6]) == [["generate", RUN], ["evaluate", RUN]]


def test_the_readme_loop_line_takes_dr_grpo(tmp_path, monkeypatch):
    """Journey (a): `loop --method dr-grpo`, as the README spells it, passes the loop's own check."""
    monkeypatch.chdir(tmp_path)
    loops = [argv for line in LINES if line.text.startswith("minirlhf loop --") for argv in variants(line)]
    dr_grpo = [argv for argv in loops if "dr-grpo" in argv]
    assert dr_grpo, loops
    for argv in dr_grpo:
        cfg = check(argv, tmp_path)
        assert cfg.method == "dr-grpo" and registry.get(cfg.method).name == "dr_grpo"


def test_every_docs_page_is_linked_from_the_readme_and_every_relative_link_resolves():
    readme = README.read_text(encoding="utf-8")
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert len(pages) >= 9 and all(f"](docs/{page.name})" in readme for page in pages), \
        [page.name for page in pages if f"](docs/{page.name})" not in readme]
    broken = [f"{path.name}: {target}" for path in GUIDES + [ROOT / "docs" / "history.md"]
              for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8"))
              if "://" not in target and not (path.parent / target).exists()]
    assert not broken, broken
