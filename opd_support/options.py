"""
What each option accepts, as data. Every Config field is declared with arg(default, rule, help);
its Rule is its domain (a kind and the kind's parameters), from which the command line is parsed
and the resolved config is checked. A field without a Rule does not construct.
"""
import argparse
import dataclasses
import math
import os


class UserError(Exception):
    """Bad input: the entry points print the message as one line and exit with code 2."""


class Stopped(Exception):
    """A run stopped by a signal after writing its checkpoint: one line, exit code 75."""


@dataclasses.dataclass
class Rule:
    """kind: num | choice | names | pairs | text | file | folder | flag; domain: the kind's
    parameters; says: the accepted values in words; ok(value) -> bool; parse: the command line's
    string -> value (ValueError when it cannot); why(value): the reason a value is malformed."""
    kind: str
    domain: dict
    says: str
    ok: object
    parse: object = str
    why: object = None


def num(typ, lo, hi=math.inf, lo_open=False, hi_open=False):
    """A finite int or float in a range."""
    words = ("an integer" if typ is int else "a finite number") + \
        (f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}" if hi < math.inf else
         f" {'>' if lo_open else '>='} {lo}")
    isnum = (lambda v: type(v) is int) if typ is int else \
        (lambda v: type(v) in (int, float) and math.isfinite(v))
    ok = lambda v: (isnum(v) and (v > lo if lo_open else v >= lo)
                    and (v < hi if hi_open else v <= hi))
    return Rule("num", dict(typ=typ, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open), words, ok,
                typ)


def one_of(*xs):
    return Rule("choice", dict(choices=xs), "one of " + ", ".join(xs), lambda v: v in xs)


def names(xs, empty_ok=False):
    """A comma-separated list of some of xs, each at most once ('' too when empty_ok)."""
    def ok(v):
        items = v.split(",")
        return (not v and empty_ok) or (bool(v) and all(i in xs for i in items)
                                        and len(set(items)) == len(items))
    return Rule("names", dict(choices=xs, empty_ok=empty_ok),
                ("nothing, or " if empty_ok else "") + "distinct comma-separated names among "
                + ", ".join(xs), ok)


def pairs(keys, value):
    """NAME=VALUE,... with NAME among keys (any when None), VALUE accepted by the Rule value."""
    def ok(v):
        items = [i.partition("=") for i in v.split(",") if i.strip()]
        try:
            return bool(items) == bool(v) and all(
                sep and k.strip() and (keys is None or k.strip() in keys)
                and value.ok(value.parse(x.strip())) for k, sep, x in items)
        except ValueError:
            return False
    says = (f"NAME=VALUE pairs, NAME {'among ' + ', '.join(keys) if keys else 'any'}, "
            f"VALUE {value.says}")
    return Rule("pairs", dict(keys=keys, value=value), says, ok)


def text(empty_ok=False, check=None, says="a non-empty text"):
    """A string; check(v) returns False or raises ValueError when it is malformed."""
    def ok(v):
        if not v:
            return empty_ok
        try:
            return check is None or check(v) is not False
        except ValueError:
            return False

    def why(v):
        try:
            check(v)
        except ValueError as e:
            return str(e)
    return Rule("text", dict(empty_ok=empty_ok, check=check), says, ok, why=why if check else None)


def file():
    """'' or an existing file."""
    return Rule("file", {}, "a readable file", lambda v: not v or os.path.isfile(v))


def folder():
    """A folder (made when missing), not a file."""
    return Rule("folder", {}, "a folder (made when missing), not a file",
                lambda v: bool(v) and not (os.path.exists(v) and not os.path.isdir(v)))


def task_files(keys):
    """'', a readable file (every task's), or TASK=FILE pairs with TASK among keys."""
    each = pairs(keys, Rule("file", {}, "a readable file", lambda v: os.path.isfile(v)))

    def ok(v):
        return (not v or os.path.isfile(v)) if "=" not in v else each.ok(v)
    return Rule("files", dict(keys=keys), "a readable file, or TASK=FILE pairs with TASK among "
                + ", ".join(keys), ok)


FLAG = Rule("flag", {}, "a flag", lambda v: type(v) is bool)


def arg(default, rule, help):
    """A Config field: its default (None: the stage's, see the table), its Rule, a help line."""
    return dataclasses.field(default=default, metadata={"help": help, "rule": rule})


def parse(cls, argv=None, description="", default_of=None, renamed=None):
    """The command line -> cls: every value is parsed by its field's Rule, so a bad one is one
    UserError naming the option, the value and the domain. default_of(name) -> the words --help
    shows for a field whose default is None (it depends on the stage); renamed: {old name: new
    name} of options renamed, whose old name is one UserError naming the new one."""
    import sys
    for a in sys.argv[1:] if argv is None else argv:
        old = a[2:].partition("=")[0] if a.startswith("--") else None
        if old in (renamed or {}):
            raise UserError(f"--{old} is now --{renamed[old]}")

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # argparse would print its usage and exit: one line instead
            raise UserError(message)
    ap = Parser(description=description)
    for f in dataclasses.fields(cls):
        rule, helps = f.metadata["rule"], f.metadata["help"]
        if rule is FLAG:
            ap.add_argument(f"--{f.name}", action="store_true", help=helps)
            continue
        default = default_of(f.name) if f.default is None and default_of else repr(f.default)
        ap.add_argument(f"--{f.name}", default=None, metavar=f.name.upper(),
                        help=f"{helps}; accepts {rule.says}; default {default}".replace("%", "%%"))
    args, values = vars(ap.parse_args(argv)), {}
    for f in dataclasses.fields(cls):
        v, rule = args[f.name], f.metadata["rule"]
        if isinstance(v, str):
            try:
                v = rule.parse(v)
            except ValueError:
                raise UserError(f"--{f.name}: got {args[f.name]!r}, accepts {rule.says}") from None
        values[f.name] = f.default if v is None else v
    return cls(**values)


def check_fields(cfg):
    """Every field of a config against its Rule: the first one out of its domain is a UserError."""
    for f in dataclasses.fields(cfg):
        v, rule = getattr(cfg, f.name), f.metadata["rule"]
        if not rule.ok(v):
            reason = rule.why(v) if rule.why else None
            raise UserError(f"--{f.name}: got {v!r}, accepts {rule.says}" +
                            (f" ({reason})" if reason else ""))
