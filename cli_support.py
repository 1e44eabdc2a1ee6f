"""The CLI's machinery (``pipeline.py`` holds the commands): one-line errors, options whose defaults and
help come from the config dataclasses, options shared between commands, comma-separated integers."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

err = Console(stderr=True)
state = {"debug": False}  # pipeline --debug: tracebacks instead of one-line errors
F = TypeVar("F", bound=Callable[..., Any])


def friendly(fn: F) -> F:
    """Turn expected failures (bad input, missing weights, ...) into a one-line error and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            err.print("[red]interrupted[/]: everything committed so far is kept; run the same command to resume",
                      soft_wrap=True)
            raise typer.Exit(130) from None
        except typer.Exit:  # a command's own exit code (typer.Exit is a RuntimeError: let it through first)
            raise
        except (ValueError, RuntimeError, OSError, KeyError) as e:
            text = in_flags(e)
            if state["debug"]:
                if text != str(e) and hasattr(e, "add_note"):  # Python >= 3.11
                    e.add_note(f"pipeline: {text}")
                raise
            err.print(f"[red]error[/]: {escape(text)}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


#: keywords whose flag is not ``--`` + the keyword with hyphens (``gc_candidates(older_than_days=...)``)
FLAGS = {"older_than_days": "--older-than"}


def flag(keyword: str) -> str:
    """The flag of a library keyword: ``store_format`` → ``--store-format``."""
    return FLAGS.get(keyword, "--" + keyword.replace("_", "-"))


def in_flags(e: BaseException) -> str:
    """``e``'s message with the keywords it names (its ``options``, see ``common.errors``) as flags: a
    leading ``steps`` becomes ``--steps``; ``keyword=True`` the bare flag; ``keyword='v'`` or
    ``keyword=V`` the flag and its value (``--text-encoder minilm``)."""
    text = str(e)
    for keyword in getattr(e, "options", ()):
        name = re.escape(keyword)
        text = re.sub(rf"^{name}(?=[\s:])", flag(keyword), text)
        text = re.sub(rf"(?<![\w/.'\"-]){name}=(?:(True)\b|'([^'\s]*)'|)",
                      lambda m, k=keyword: flag(k) if m[1] else f"{flag(k)} {m[2] or ''}", text)
    return text


_UNSET: Any = object()


def _field(config: type, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(config):
        if f.name == name:
            return f
    raise KeyError(f"{config.__name__} has no field {name!r}")


def option(config: type, name: str, *decls: str, default: Any = _UNSET, help: Optional[str] = None,
           **kw: Any) -> Any:
    """A typer option whose default and help come from field ``name`` of dataclass ``config`` (its
    ``metadata["help"]``), the one source of truth; a tuple default is shown comma-separated, as typed.
    ``default`` / ``help`` override where the CLI's differ (a flag that negates a field, say)."""
    f = _field(config, name)
    if default is _UNSET:
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = ...
    if isinstance(default, tuple):
        default = ",".join(str(v) for v in default)
    return typer.Option(default, *decls, help=f.metadata.get("help", "") if help is None else help, **kw)


def _cli_type(hint: Any) -> Any:
    """What typer parses for a field of type ``hint``: a tuple as comma-separated text, ``Path | str`` as text."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner = _cli_type(rest[0]) if len(rest) == 1 else str
        return Optional[inner] if len(rest) < len(args) else inner
    return str if typing.get_origin(hint) is tuple else hint


def field_option(config: type, name: str) -> tuple[Any, Any]:
    """A :func:`shared_options` entry for field ``name`` of ``config``: the type typer parses and the option, a
    bool field a single flag (``--resume``, not ``--resume/--no-resume``)."""
    hint = typing.get_type_hints(config)[name]
    return _cli_type(hint), option(config, name, *((flag(name),) if hint is bool else ()))


def config_options(config: type, *, skip: tuple[str, ...] = (), flags: Optional[dict[str, Any]] = None,
                   **own: tuple[Any, Any]) -> dict[str, tuple[Any, Any]]:
    """:func:`shared_options` entries for every field of dataclass ``config`` but ``skip``, in field order: the
    type, default and help from the field. ``flags`` gives fields their own option names (``resume=("--resume",)``);
    a keyword in ``own`` replaces a field's entry by a parameter of the CLI's own (``color_order=("bgr", (bool,
    typer.Option(...)))``), which :func:`config_values` leaves to the command."""
    hints, flags, out = typing.get_type_hints(config), flags or {}, {}
    for f in dataclasses.fields(config):
        if f.name in skip:
            continue
        if f.name in own:
            name, entry = own[f.name]
            out[name] = entry
        else:
            out[f.name] = (_cli_type(hints[f.name]), option(config, f.name, *flags.get(f.name, ())))
    return out


def config_values(config: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (options parsed by :func:`config_options`) as ``config``'s field values: comma-separated text
    back to tuples (integers where the field holds integers); names that are not fields are left out."""
    hints, out = typing.get_type_hints(config), {}
    for f in dataclasses.fields(config):
        if f.name not in values:
            continue
        value, hint = values[f.name], hints[f.name]
        tuple_type = next((t for t in (hint, *typing.get_args(hint)) if typing.get_origin(t) is tuple), None)
        if tuple_type is not None and isinstance(value, str):
            if typing.get_args(tuple_type)[0] is int:
                value = ints(value, flag(f.name)) or ()
            else:
                value = tuple(v.strip() for v in value.split(",") if v.strip())
        out[f.name] = value
    return out


def shared_options(**params: tuple[Any, Any]) -> Callable[[F], F]:
    """Give a command the options ``params`` (name → (type, typer.Option)) besides its own; the command
    receives them as one dict, its keyword ``common``. Commands that share options declare them once."""

    def decorate(fn: F) -> F:
        own = [p for name, p in inspect.signature(fn).parameters.items() if name != "common"]
        hints = {k: v for k, v in typing.get_type_hints(fn).items() if k not in ("common", "return")}
        extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=kind)
                 for name, (kind, opt) in params.items()]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            common = {name: kwargs.pop(name) for name in params if name in kwargs}
            return fn(*args, common=common, **kwargs)

        wrapper.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
             for p in own] + extra)
        wrapper.__annotations__ = {**hints, **{name: kind for name, (kind, _) in params.items()}, "return": None}
        del wrapper.__wrapped__  # typer must read the new signature, not the function's own
        return wrapper  # type: ignore[return-value]

    return decorate


def ints(value: Optional[str], name: str) -> Optional[tuple[int, ...]]:
    """Comma-separated integers (``name``: the option, for the error), or None."""
    if value is None:
        return None
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{name} takes comma-separated integers, e.g. 50,150,250 (got {value!r})")
    if not out:
        raise typer.BadParameter(f"{name} is empty")
    return out


def run_app(app: typer.Typer) -> None:
    """Run ``app`` as a command: a bad option or argument is reported on one line (exit code 2)."""
    try:
        from typer._click import exceptions as cx  # typer >= 0.20 carries its own click
    except ImportError:  # pragma: no cover - older typer on click
        from click import exceptions as cx

    try:
        code = app(standalone_mode=False)
    except cx.NoArgsIsHelpError as e:
        e.show()
        code = e.exit_code
    except cx.ClickException as e:
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        err.print(f"[red]error[/]: {escape(e.format_message())}{hint}", highlight=False, soft_wrap=True)
        code = e.exit_code
    except typer.Abort:
        err.print("[red]aborted[/]")
        code = 1
    raise SystemExit(code if isinstance(code, int) else 0)


def key_values(text: Optional[str], option_name: str) -> dict[str, Any]:
    """``KEY=VALUE[,KEY=VALUE]`` as a dict (integers as ints); a part without ``=`` is a usage error."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{part!r} is not KEY=VALUE", param_hint=option_name)
        value = value.strip()
        out[key.strip()] = int(value) if value.lstrip("-").isdigit() else value
    return out
