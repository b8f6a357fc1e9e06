"""What both CLIs share: the command table and its stdlib-only parser builder, the shared
option groups, ``--version``, device ids among selectors, and shell completion scripts.

Each CLI declares its commands as data (a ``Program`` of ``Command``s: name, handler, help,
arguments, subcommands) instead of hand-written argparse; ``Program.parser`` builds argparse from
it and ``Program.completion`` writes bash/zsh/fish scripts from the same table, so a command, an
option or a choice added once appears in ``--help``, in parsing and in completion alike.

It lives in ``enroll`` because ``tunnel`` may import ``enroll`` but never the reverse. Nothing
here imports more than the standard library at module level: ``tunnel agent`` builds its parser
on every start, and a device should not pay for ``--version`` or completion it never asks for
(nor for a CLI framework: the device install gains no dependency).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

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


# --- the command table ----------------------------------------------------------------------


@dataclass(frozen=True)
class Opt:
    """One argument: its flags (or a positional's name) and ``add_argument``'s keywords.

    ``default_env`` names an environment variable read when the parser is built (not when this
    table is imported): its value is the default, and a ``required`` option stops being required
    while it is set (``tunnel login --proxy`` and ``$FLEET_PROXY``).
    """

    flags: tuple[str, ...]
    kwargs: Mapping[str, object] = field(default_factory=dict)
    default_env: str | None = None

    def add_to(self, container, **override) -> argparse.Action:
        kwargs = {**self.kwargs, **override}
        if self.default_env:
            value = os.environ.get(self.default_env) or None
            kwargs["default"] = value
            kwargs["required"] = bool(kwargs.get("required")) and value is None
        return container.add_argument(*self.flags, **kwargs)


def opt(*flags: str, default_env: str | None = None, **kwargs) -> Opt:
    """``opt("--ttl", default="8h", help=...)``: ``add_argument``'s signature, as data."""
    return Opt(flags, kwargs, default_env)


@dataclass(frozen=True)
class OneOf:
    """Options of which at most one may be given (a mutually exclusive group)."""

    opts: tuple[Opt, ...]

    def add_to(self, container, **override) -> None:
        group = container.add_mutually_exclusive_group()
        for option in self.opts:
            option.add_to(group, **override)


def one_of(*opts: Opt) -> OneOf:
    return OneOf(opts)


@dataclass(frozen=True)
class Command:
    """A command: ``run(args) -> exit status``, or ``subcommands`` (``enroll token create``).

    ``args`` are ``Opt``/``OneOf`` in the order ``--help`` lists them; a shared option group is
    a tuple of ``Opt`` spread into it. ``description`` (default: ``help``) heads ``--help``.
    """

    name: str
    help: str
    run: Callable[[argparse.Namespace], int] | None = None
    args: tuple[Opt | OneOf, ...] = ()
    subcommands: tuple[Command, ...] = ()
    description: str | None = None


@dataclass(frozen=True)
class Extension:
    """Commands another module registers on the subparsers itself (``tunnel audit``).

    ``register(subparsers)`` may import what it needs and add nothing when that is missing (a
    device has no ``[server]`` extra); ``Program.parser(extensions=False)`` skips it entirely,
    so ``tunnel agent`` never imports it.
    """

    register: Callable[[argparse._SubParsersAction], None]


@dataclass(frozen=True)
class Program:
    """A whole CLI: ``prog``, its top-level help, its commands, and ``inherit``: options every
    level accepts (``enroll --state DIR token ls`` and ``enroll token ls --state DIR``)."""

    prog: str
    description: str
    commands: tuple[Command | Extension, ...]
    epilog: str | None = None  # the root's and each top-level command's (exit statuses, env)
    inherit: tuple[Opt, ...] = ()

    def parser(self, *, extensions: bool = True) -> argparse.ArgumentParser:
        parser = self._new(argparse.ArgumentParser, prog=self.prog, description=self.description,
                           epilog=self.epilog)
        for option in self.inherit:  # the root holds the default; a level below sets it if given
            option.add_to(parser, default=None)
        parser.add_argument("--version", action=VersionAction)
        self._add_commands(parser, self.commands, "command", "COMMAND", self.epilog, extensions)
        return parser

    def completion(self, shell: str) -> str:
        """The completion script for ``shell``, read from this table (and its extensions)."""
        root = _Node.of_program(self)
        return {"bash": _bash, "zsh": _zsh, "fish": _fish}[shell](self.prog, root)

    @staticmethod
    def _new(make, *, epilog, **kw):
        # an epilog is a preformatted block (a table of exit statuses): keep its line breaks
        if epilog is not None:
            kw.update(epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
        return make(**kw)

    def _add_commands(self, parser, commands, dest, metavar, epilog, extensions) -> None:
        sub = parser.add_subparsers(dest=dest, required=True, metavar=metavar)
        for command in commands:
            if isinstance(command, Extension):
                if extensions:
                    command.register(sub)
                continue
            child = self._new(sub.add_parser, name=command.name, help=command.help,
                              description=command.description or command.help, epilog=epilog)
            self._add_arguments(child, command)
            if command.subcommands:  # nested levels carry no epilog: their parent's says it
                self._add_commands(child, command.subcommands, f"{command.name}_command",
                                   "ACTION", None, extensions)

    def _add_arguments(self, parser, command: Command) -> None:
        for option in self.inherit:  # not given here: keep what the level above parsed
            option.add_to(parser, default=argparse.SUPPRESS)
        for arg in command.args:
            arg.add_to(parser)
        if command.run is not None:
            parser.set_defaults(func=command.run)


# --- option groups both CLIs use --------------------------------------------------------------

#: the --format choices (``enroll.output.FORMATS``; spelled here to keep this module stdlib-only)
FORMATS = ("table", "json", "yaml")

FORMAT = (opt("--format", choices=FORMATS, default="table",
              help="output format: table for people, json or yaml for scripts (default: table)"),)
STATE = (opt("--state", metavar="DIR",
             help="fleet state directory (default: $FLEET_STATE or the XDG data dir)"),)
#: an engineer command: who you are and which proxy you dial (resolved in ``tunnel.cli``)
ENGINEER = (
    opt("--identity", metavar="DIR",
        help="engineer identity directory (default: $FLEET_IDENTITY, else ~/.config/fleet-tunnel)"),
    opt("--proxy", metavar="HOST:PORT",
        help="proxy to dial (default: $FLEET_PROXY, else the one in client.yaml)"),
)


def completion_command(handler: Callable[[argparse.Namespace], int], prog: str) -> Command:
    """``PROG completion bash|zsh|fish``, the same in both CLIs."""
    return Command(
        "completion", "print a shell completion script (bash, zsh or fish)", handler,
        (opt("shell", choices=SHELLS, help="the shell to complete in"),),
        description=(f"print a shell completion script (bash, zsh or fish); load it with "
                     f"'source <({prog} completion bash)' (zsh: the same with zsh), or "
                     f"'{prog} completion fish | source'"),
    )


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
    ids: list[str] = []
    terms: list[str] = []
    for arg in args:
        bare = is_bare(arg)
        (ids if bare and arg.strip() in known else terms).append(arg.strip() if bare else arg)
    return ids, terms


# --- shell completion -----------------------------------------------------------------------

SHELLS = ("bash", "zsh", "fish")


class _Node:
    """One command level: its subcommands, its options, and the choices of those options."""

    def __init__(self) -> None:
        self.subs: dict[str, tuple[str, _Node]] = {}
        #: (flags, help, choices, takes a value)
        self.options: list[tuple[list[str], str, list[str], bool]] = []
        #: the choices of positional arguments (e.g. the shell of 'completion')
        self.values: list[str] = []

    @classmethod
    def of_program(cls, program: Program) -> _Node:
        root = cls()
        root._add_options(program.inherit, version=True)
        root._add_subs(program.commands, program.inherit)
        return root

    @classmethod
    def of_command(cls, command: Command, inherit: tuple[Opt, ...]) -> _Node:
        node = cls()
        node._add_options((*inherit, *command.args))
        node._add_subs(command.subcommands, inherit)
        return node

    @classmethod
    def of_parser(cls, parser: argparse.ArgumentParser) -> _Node:
        """A level an ``Extension`` registered with argparse directly."""
        node = cls()
        node._add_actions(parser._actions)
        return node

    def _add_options(self, args, *, version: bool = False) -> None:
        # argparse itself says what each option is (takes a value? its choices? -h/--help)
        scratch = argparse.ArgumentParser()
        for arg in args:
            arg.add_to(scratch)
        if version:
            scratch.add_argument("--version", action=VersionAction)
        self._add_actions(scratch._actions)

    def _add_subs(self, commands, inherit) -> None:
        for command in commands:
            if isinstance(command, Extension):
                scratch = argparse.ArgumentParser().add_subparsers()
                command.register(scratch)
                self._add_actions([scratch])
            else:
                self.subs[command.name] = (command.help, _Node.of_command(command, inherit))

    def _add_actions(self, actions) -> None:
        for action in actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help or "" for a in action._choices_actions}
                for name, child in action.choices.items():
                    self.subs[name] = (helps.get(name, ""), _Node.of_parser(child))
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


def print_completion(program: Program, shell: str) -> int:
    sys.stdout.write(program.completion(shell))
    return 0
