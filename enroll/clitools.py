"""What both CLIs share beyond output formats: ``--version``, device ids among selectors, and
shell completion scripts generated from the argparse parsers.

It lives in ``enroll`` because ``tunnel`` may import ``enroll`` but never the reverse. Nothing
here imports more than the standard library at module level: ``tunnel agent`` builds its parser
on every start, and a device should not pay for ``--version`` or completion it never asks for.
"""

from __future__ import annotations

import argparse
import re
import sys

from enroll.errors import FleetError

PACKAGE = "fleet-tunnel"


class Refused(FleetError):
    """A command refused its own input (a bad option value, a missing choice): one line on
    stderr, exit status 1, nothing changed. Errors of the layers below carry their own type."""

    code = "refused"


def package_version() -> str:
    """The installed package's version; ``unknown`` when it runs from a tree with no metadata
    (a plain checkout on PYTHONPATH), so ``--version`` never fails."""
    from importlib import metadata

    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return "unknown"


class VersionAction(argparse.Action):
    """``--version``: print ``PROG VERSION`` and exit 0. Unlike argparse's own version action the
    metadata lookup happens only when the option is given, not each time the parser is built."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="print the version and exit"):  # noqa: A002 - argparse's keyword
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog} {package_version()}")
        parser.exit(0)


# --- device ids among selectors -------------------------------------------------------------

#: What makes an argument a selector term rather than a bare id: an operator, a set, a negation.
_SELECTOR_MARKS = ("=", "!", " in ", " notin ", "(")


def is_bare(arg: str) -> bool:
    """True for an argument with no selector syntax: it may be a device id."""
    return not any(mark in arg for mark in _SELECTOR_MARKS)


def split_ids(args: list[str], known_ids) -> tuple[list[str], list[str]]:
    """Split ``tunnel ls`` / ``enroll devices`` arguments into device ids and selector terms.

    An argument with no selector syntax that names a known device id is that device; anything
    else stays a selector term, so ``customer=acme``, ``!decommissioned`` and a bare label key
    (``gpu``, "has the label") keep working. An id wins over a label key of the same name: the
    user typed something that is exactly a device they can see.
    """
    known = set(known_ids)
    ids, terms = [], []
    for arg in args:
        bare = is_bare(arg)
        (ids if bare and arg.strip() in known else terms).append(arg.strip() if bare else arg)
    return ids, terms


# --- shell completion -----------------------------------------------------------------------

SHELLS = ("bash", "zsh", "fish")


class _Node:
    """One command level: its subcommands, its options, and the choices of those options."""

    def __init__(self, parser: argparse.ArgumentParser):
        self.subs: dict[str, tuple[str, _Node]] = {}
        #: (flags, help, choices, takes a value)
        self.options: list[tuple[list[str], str, list[str], bool]] = []
        #: the choices of positional arguments (e.g. the shell of 'completion')
        self.values: list[str] = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help or "" for a in action._choices_actions}
                for name, child in action.choices.items():
                    self.subs[name] = (helps.get(name, ""), _Node(child))
            elif action.option_strings and action.help != argparse.SUPPRESS:
                choices = [str(c) for c in action.choices] if action.choices else []
                self.options.append((list(action.option_strings), action.help or "", choices,
                                     action.nargs != 0))
            elif not action.option_strings and action.choices:
                self.values += [str(c) for c in action.choices]

    def walk(self, path: tuple[str, ...] = ()):
        yield path, self
        for name, (_, child) in self.subs.items():
            yield from child.walk((*path, name))


def _bash_func(prog: str) -> str:
    return "_" + re.sub(r"[^A-Za-z0-9_]", "_", prog)


def _bash(prog: str, root: _Node) -> str:
    import shlex

    fn = _bash_func(prog)
    words, subs, choices = [], [], []
    for path, node in root.walk():
        key = shlex.quote(" ".join(path))
        flags = [f for flags, *_ in node.options for f in flags]
        words.append(f"        {key}) echo {shlex.quote(' '.join([*node.subs, *node.values, *flags]))} ;;")
        if node.subs:
            subs.append(f"        {key}) echo {shlex.quote(' '.join(node.subs))} ;;")
        for flags, _, opts, takes_value in node.options:
            if takes_value:  # a value follows: its choices, else the shell's own (file) completion
                for flag in flags:
                    choices.append(f"        {shlex.quote(' '.join((*path, '|', flag)))}) "
                                   f"echo {shlex.quote(' '.join(opts) or '-')} ;;")
    nl = "\n"
    return f"""\
# bash completion for {prog}, generated by '{prog} completion bash'.
# Load it with:  source <({prog} completion bash)
{fn}_words() {{
    case "$1" in
{nl.join(words)}
    esac
}}
{fn}_subs() {{
    case "$1" in
{nl.join(subs)}
    esac
}}
{fn}_choices() {{
    case "$1" in
{nl.join(choices)}
    esac
}}
{fn}() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="" path="" i w
    [ "$COMP_CWORD" -gt 0 ] && prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${{COMP_WORDS[i]}}"
        case " $({fn}_subs "$path") " in
            *" $w "*) path="${{path:+$path }}$w" ;;
        esac
    done
    local values
    values="$({fn}_choices "${{path:+$path }}| $prev")"
    if [ "$values" = "-" ]; then
        COMPREPLY=()  # a free value (file, address): -o default completes file names
        return
    fi
    [ -n "$values" ] || values="$({fn}_words "$path")"
    COMPREPLY=($(compgen -W "$values" -- "$cur"))
}}
complete -o default -F {fn} {prog}
"""


def _zsh(prog: str, root: _Node) -> str:
    # zsh runs the bash function through its bashcompinit layer: one generator, same behaviour.
    return (f"# zsh completion for {prog}, generated by '{prog} completion zsh'.\n"
            f"# Load it with:  source <({prog} completion zsh)\n"
            "(( $+functions[compdef] )) || { autoload -U +X compinit && compinit; }\n"
            "autoload -U +X bashcompinit && bashcompinit\n"
            + _bash(prog, root).split("\n", 2)[2])


def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _fish(prog: str, root: _Node) -> str:
    lines = [f"# fish completion for {prog}, generated by '{prog} completion fish'.",
             f"# Load it with:  {prog} completion fish | source",
             f"complete -c {prog} -f"]
    for path, node in root.walk():
        if path:
            cond = "; and ".join(f"__fish_seen_subcommand_from {p}" for p in path)
        else:
            cond = "__fish_use_subcommand"
        if node.subs:
            names = " ".join(node.subs)
            sub_cond = cond if not path else f"{cond}; and not __fish_seen_subcommand_from {names}"
            for name, (help_text, _) in node.subs.items():
                lines.append(f"complete -c {prog} -n {_fish_quote(sub_cond)} -a {name} "
                             f"-d {_fish_quote(help_text)}")
        opt_cond = cond if path else "true"
        for value in node.values:
            lines.append(f"complete -c {prog} -n {_fish_quote(cond)} -a {value}")
        for flags, help_text, opts, takes_value in node.options:
            spec = " ".join(f"-l {f[2:]}" if f.startswith("--") else f"-s {f[1:]}" for f in flags)
            extra = (f" -r -f -a {_fish_quote(' '.join(opts))}" if opts
                     else " -r -F" if takes_value else "")
            lines.append(f"complete -c {prog} -n {_fish_quote(opt_cond)} {spec}{extra} "
                         f"-d {_fish_quote(help_text.split(';')[0][:80])}")
    return "\n".join(lines) + "\n"


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for ``shell``, built from the parser's subcommands and options."""
    root = _Node(parser)
    return {"bash": _bash, "zsh": _zsh, "fish": _fish}[shell](parser.prog, root)


def print_completion(parser: argparse.ArgumentParser, shell: str) -> int:
    sys.stdout.write(completion_script(parser, shell))
    return 0
